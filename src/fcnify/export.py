"""`fcnify export`: a card's net, made fully convolutional, as a file another runtime loads.

The ONNX graph itself is built in engines/onnx_export.py (the onnx engine runs
the same graph); this module adds what an export needs around it: surgery and
transplant for nets with InnerProduct layers (convert.prepare), the model
card's metadata, the output file written only when complete, and the check
against Caffe (verify.py's criterion).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .caffe.caffemodel import read_weights
from .engines import PROOF_ENGINE
from .caffe.shapes import infer, input_shapes
from .engines.onnx_export import (EXPORTABLE, OPSET, ExportError, add_softmax, card_metadata,
                                  check_exportable, net_params,
                                  require_onnx, to_onnx)


@dataclass
class ExportResult:
    """What `fcnify export` wrote."""

    path: Path
    name: str
    converted: bool  # the net had InnerProduct layers and was converted first
    inputs: dict[str, list]
    outputs: list[str]
    size: int
    report: object = None  # verify.VerifyReport against Caffe, when checked

    def summary(self) -> str:
        ins = ", ".join(f"{n} {' x '.join(map(str, d))}" for n, d in self.inputs.items())
        how = "converted to fully convolutional, then " if self.converted else ""
        checked = "; NOT checked against Caffe (verification skipped)" if self.report is None else (
            f"; matches Caffe on {len(self.report.inputs)} inputs, {self.report.params_checked} "
            "parameter blobs identical")
        return (f"{self.name}: {how}exported to {self.path} ({self.size / 2**20:.1f} MiB, ONNX opset {OPSET}, "
                f"passed onnx.checker{checked}); input {ins}; outputs {', '.join(self.outputs)}")


def fully_convolutional(card) -> tuple[object, dict[str, list[np.ndarray]], bool]:
    """(NetParameter, parameters, converted) of the card's net, converted in memory where
    convert would convert it (surgery and transplant; no engine runs)."""
    from .convert import prepare
    from .caffe.netdef import read_netdef
    from .caffe.shapes import infer_partial
    from .surgery.surgery import needs_surgery
    net = read_netdef(card.model_def).param
    check_exportable(net, card.model_def)
    # the test convert makes: a global pooling that collapses the map needs the surgery too,
    # else the file keeps a 1x1 output while its metadata claims a stride
    if needs_surgery(net, infer_partial(net, path=card.model_def)):
        result, _ = prepare(card.model_def, card.weights, card=card, layer_types=EXPORTABLE, engine="onnx")
        return result.surgery.net, result.blobs, True
    return net, net_params(net, card.weights, card.model_def), False


def export_onnx(card, out: str | Path, force: bool = False, check: bool = True,
                samples: int = 3, softmax: bool | None = None) -> ExportResult:
    """Write the card's fully-convolutional net to `out` as ONNX, checked by onnx.checker and,
    with `check`, against Caffe running the card's own net (verify.py's criterion).

    The output path is checked first; the file appears only when complete and
    equivalent (NotEquivalentError, exit 1, otherwise). `softmax` (None: the
    card's) adds a Softmax output to a net without one, as classify-map
    applies it; the metadata's fcnify.softmax says which output is the map.
    """
    from .files import OutputSet
    from .caffe.geometry import score_blob, output_blobs, softmax_plan
    require_onnx()
    import onnx
    out = Path(out)
    files = OutputSet(force)
    files.check(out)
    net, params, converted = fully_convolutional(card)
    outputs = list(dict.fromkeys([*output_blobs(net), score_blob(net)]))
    num_classes = infer(net, path=card.model_def).blobs[score_blob(net)][1]
    plan = softmax_plan(net, None, card.softmax if softmax is None else softmax)
    meta = card_metadata(card, net, num_classes, card.model_def, plan)
    model = to_onnx(net, params, outputs, card.model_def, meta, name=card.name)
    if plan.by == "fcnify":
        outputs.append(add_softmax(model, plan.scores))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported model fails onnx.checker: {str(exc).strip().splitlines()[0]}",
                          card.model_def) from None
    data = model.SerializeToString()
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    del model
    result = ExportResult(out, card.name, converted, dims, outputs, len(data))
    with files:
        staged = files.path_for(out)
        staged.write_bytes(data)
        del data
        if check:
            result.report = check_against_caffe(card, net, params, staged, samples)
            if not result.report.equivalent:
                from .errors import NotEquivalentError
                raise NotEquivalentError("the exported model does NOT reproduce Caffe's outputs "
                                         "(nothing written)", out)
    return result


def check_against_caffe(card, net, params: dict, onnx_file: Path, samples: int = 3):
    """convert's check (convert.check_conversion): the card's net in Caffe (as given, before
    any conversion) against the ONNX file in ONNX Runtime, scores before Softmax, outputs and
    every other head, plus every initializer against the parameters that went in."""
    from .convert import check_conversion
    from .engines import make_engine
    from .caffe.netdef import read_netdef
    from .engines.onnx_engine import OnnxFileNet
    from .surgery.surgery import convert_net
    netdef = read_netdef(card.model_def)
    blob_map = convert_net(netdef).blob_map  # names only: which converted blob is which head
    with make_engine(PROOF_ENGINE).load(card.model_def, card.weights) as a, OnnxFileNet(onnx_file) as b:
        return check_conversion(a, b, netdef.param, net, read_weights(card.weights), card.preprocess,
                                blob_map, params, samples, card.model_def)
