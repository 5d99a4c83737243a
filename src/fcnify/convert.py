"""`fcnify convert`: read, check, rewrite, transplant, save, verify.

Each step lives in its own module; this one strings them together and makes
the outputs appear all at once (or not at all).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .version import __version__
from .surgery.bound import ScoreLayer, score_layer
from .caffe.caffemodel import Weights, read_weights, write_weights
from .surgery.correspond import check_correspondence
from .errors import ConversionError, NotEquivalentError
from .files import OutputSet
from .caffe.geometry import MapGeometry, map_geometry, output_blobs, score_blob, smallest_input
from .io.models import ModelCard
from .caffe.netdef import NetDef, read_netdef, to_text
from .engines import PROOF_ENGINE, Engine, check_layer_types, make_engine
from .io.preprocess import Preprocess, PreprocessOverrides
from .resolve import card_for_model_def, resolve_card  # noqa: F401 (card_for_model_def: re-exported)
from .caffe.shapes import image_input, infer, input_shapes
from .surgery.surgery import Surgery, convert_net, keep_output_names
from .surgery.transplant import Provenance, check_weights, transplant
from .surgery.verify import VerifyReport, verify

SUFFIX = "_full_conv"


@dataclass
class ConvertResult:
    """What `convert` did, with the evidence."""

    surgery: Surgery
    card: ModelCard
    outputs: dict[str, Path] = field(default_factory=dict)
    report: VerifyReport | None = None
    provenance: list[Provenance] = field(default_factory=list)
    unused_source_layers: list[str] = field(default_factory=list)
    geometry: MapGeometry | None = None
    minimum_input: tuple[int, int] | None = None
    blobs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    scores: ScoreLayer | None = None  # the original's score layer: sets verify's bound
    scores_problem: str = ""          # why there is none

    @property
    def changed(self) -> bool:
        return self.surgery.changed

    @property
    def equivalent(self) -> bool | None:
        return None if self.report is None else self.report.equivalent


def card_for(model_def: Path, weights: Path | None, card: ModelCard | None = None,
             preprocess: Preprocess | None = None) -> ModelCard:
    """The card of the net being converted (resolve.resolve_card): given, next to the prototxt, or defaults.

    The net is `model_def`; a given card describes it. The weights being
    converted are the card's weights: verification runs the original with
    them (a shipped card may have none, or point elsewhere).
    """
    if card is not None:
        return resolve_card(card=card, weights=weights, preprocess=preprocess)
    found = resolve_card(model_def=model_def, weights=weights, preprocess=preprocess)
    return replace(found, fully_convolutional=False)


def check_detector(surgery: Surgery, card: ModelCard, path: Path) -> None:
    """The card's background class and labels must fit the net's classes and its box head be
    one of the net's outputs with 4 values per cell, before anything is written."""
    from .io.models import check_background_class
    from .surgery.surgery import named_blob
    outs = output_blobs(surgery.net)
    scores = surgery.shapes.blobs.get(score_blob(surgery.net), ())
    check_background_class(card.background_class, path, scores[1] if len(scores) >= 2 else None)
    if len(scores) >= 2:
        card.load_labels(scores[1])  # a labels file of another length: one line, nothing written
    head = card.box_head
    if head is None:
        return
    name = named_blob(head, outs)
    if name is None:
        raise ConversionError(f"box head {head!r} is not an output of the net; its outputs are "
                              f"{', '.join(outs)}", path)
    shape = surgery.shapes.blobs.get(name, ())
    if len(shape) < 2 or shape[1] != 4:
        raise ConversionError(f"box head {head!r} has {shape[1] if len(shape) >= 2 else '?'} values per "
                              "cell; a box regression has 4 (x0, y0, x1, y1 offsets)", path)


def check_channels(netdef: NetDef, card: ModelCard) -> None:
    """The preprocessing must give the channels the net takes, before any Caffe run."""
    from .errors import InputError
    declared = next(iter(input_shapes(netdef.param).values()), None)
    pre = card.preprocess
    if declared is not None and len(declared) == 4 and declared[1] != pre.num_channels:
        raise InputError(f"the net takes {declared[1]} channel(s); the preprocessing "
                         f"({pre.channels}) gives {pre.num_channels}: give --channels "
                         + ("gray" if declared[1] == 1 else "rgb or bgr"), netdef.path)


def default_prefix(model_def: Path, card: ModelCard | None) -> Path:
    stem = model_def.stem
    if stem in ("deploy", "model", "net") and card is not None:
        stem = card.name
    elif stem in ("deploy", "model", "net"):
        stem = model_def.parent.name or stem
    return Path.cwd() / stem


def output_prefix(out: str | Path | None, model_def: Path, card: ModelCard | None) -> Path:
    """The prefix the outputs are written under, from `--out`.

    A path ending in '/' or naming an existing folder is a folder to write
    into (under the net's own name, as without --out); anything else is a
    prefix, as `--out out/mynet` has always been. Users type `--out out/`
    meaning the folder, and got `out_full_conv.*` beside it.
    """
    if out is None or str(out) == "":
        return default_prefix(model_def, card)
    text = str(out)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return Path(text) / default_prefix(model_def, card).name
    return Path(text)


def prepare(model_def: str | Path, weights: str | Path, *, input_size: tuple[int, int] | None = None,
            card: ModelCard | None = None, layer_types: frozenset[str] | None = None,
            engine: str = PROOF_ENGINE, keep_names: bool = False) -> tuple[ConvertResult, Weights]:
    """Everything that needs no Caffe: parse, check, convert, transplant.

    `layer_types` are the types the engine that will run the net supports
    (default: those this Caffe build registers); `engine` names it in errors.
    `keep_names` keeps the net's output blobs under their original names.
    """
    model_def, weights = Path(model_def), Path(weights)
    netdef = read_netdef(model_def)
    if layer_types is None:
        layer_types = make_engine(PROOF_ENGINE).layer_types()
    check_layer_types(netdef.param, layer_types, model_def, engine)
    surgery = convert_net(netdef, input_size)
    if keep_names:
        surgery = keep_output_names(surgery)
    w = read_weights(weights)
    the_card = card_for(model_def, weights, card)
    check_channels(netdef, the_card)
    check_detector(surgery, the_card, model_def)
    result = ConvertResult(surgery, the_card)
    checked = check_weights(surgery.original_shapes, w, model_def)
    result.unused_source_layers = checked.unused
    declared = next(iter(input_shapes(netdef.param).values()), ())
    result.geometry = map_geometry(surgery.net, path=model_def,  # windows of the classifier's size
                                   classifier_input=tuple(declared[2:4]) if len(declared) == 4 else None)
    result.minimum_input = smallest_input(surgery.net)
    if not surgery.changed:
        return result, w
    result.blobs, result.provenance = transplant(surgery, w, checked)
    try:
        result.scores = score_layer(surgery.original.param, score_blob(surgery.original.param), w)
    except ValueError as exc:
        result.scores_problem = str(exc)
    return result, w


def blob_pairs(surgery: Surgery) -> list[tuple[str, str]]:
    """(original, converted) blobs to compare: the scores before Softmax, and the output."""
    orig = surgery.original.param
    pairs = []
    for blob in dict.fromkeys([score_blob(orig), output_blobs(orig)[-1]]):
        pairs.append((blob, surgery.blob_map[blob]))
    return pairs


def counterpart(blob: str, fcn, blob_map: dict[str, str]) -> str | None:
    """The FCN's output for the original's output `blob`: its converted name, else its own."""
    outs = output_blobs(fcn)
    for name in (blob_map.get(blob), blob):
        if name in outs:
            return name
    return None


def check_conversion(original_net, converted_net, original, fcn, weights: Weights, pre: Preprocess,
                     blob_map: dict[str, str], transplanted: dict | None = None,
                     samples: int = 3, path: Path | None = None) -> VerifyReport:
    """The equivalence check of convert, verify and export alike: one place that picks the
    inputs (verify.sample_inputs' seeds at the original's input size, preprocessed by `pre`)
    and what is compared, so the same pair gives the same report whichever command ran it.

    Compared: the scores before Softmax and the final output (the score layer's bound), and
    every other output head both nets have (a box regression: MTCNN's conv5-2), each against
    its own layer's bound. `blob_map` names the FCN's blobs (surgery.blob_map).
    """
    try:
        scores = score_layer(original, score_blob(original), weights)
    except ValueError as exc:
        raise ConversionError(f"cannot check the conversion: {exc}", path) from None
    pairs = list(dict.fromkeys([(score_blob(original), counterpart(score_blob(original), fcn, blob_map)
                                 or score_blob(fcn)),
                                (output_blobs(original)[-1], counterpart(output_blobs(original)[-1], fcn,
                                                                         blob_map) or output_blobs(fcn)[-1])]))
    heads = []
    for blob in output_blobs(original):
        other = counterpart(blob, fcn, blob_map)
        if blob in {a for a, _ in pairs} or other is None or score_blob(original, blob) != blob:
            continue  # compared already, not in the FCN, or a Softmax (its scores' bound sets it)
        try:
            heads.append((blob, other, score_layer(original, blob, weights)))
        except ValueError:
            continue  # not made by a Convolution or InnerProduct: no bound to hold it to
    blob, shape = image_input(original)
    shape = (1,) + tuple(shape[1:])  # one image at a time: the declared batch adds nothing
    return verify(original_net, converted_net, blob, shape, pairs, pre, transplanted, samples=samples,
                  scores=scores, heads=heads)


def check_bf16(original_net, converted_net, original, fcn, weights: Weights, pre: Preprocess,
               blob_map: dict[str, str], samples: int = 3, path: Path | None = None):
    """check_conversion's inputs and score pair, measured by bf16's criterion (surgery/bf16.py)."""
    from .surgery.bf16 import verify_bf16
    try:
        scores = score_layer(original, score_blob(original), weights)
    except ValueError as exc:
        raise ConversionError(f"cannot check the conversion: {exc}", path) from None
    pair = (score_blob(original), counterpart(score_blob(original), fcn, blob_map) or score_blob(fcn))
    blob, shape = next(iter(input_shapes(original).items()))
    return verify_bf16(original_net, converted_net, blob, (1,) + tuple(shape[1:]), pair, pre, scores,
                       samples=samples)


def run_verify(result: ConvertResult, prototxt: Path, caffemodel: Path, runner: Engine,
               samples: int = 3, weights: Weights | None = None) -> VerifyReport:
    surgery = result.surgery
    if result.scores is None:
        raise ConversionError(f"cannot check the conversion: {result.scores_problem}", surgery.original.path)
    original = runner.load(surgery.original.path, result.card.weights)
    converted = runner.load(prototxt, caffemodel)
    try:
        return check_conversion(original, converted, surgery.original.param, surgery.net,
                                weights if weights is not None else read_weights(result.card.weights),
                                result.card.preprocess, surgery.blob_map, result.blobs, samples,
                                surgery.original.path)
    finally:
        original.close()
        converted.close()


def card_dict(result: ConvertResult, prototxt: Path, caffemodel: Path, card_file: Path) -> dict:
    """The card `convert` writes: the net it describes (the converted one, or the original
    when there was nothing to convert), how to feed it, its geometry and the evidence."""
    s = result.surgery
    card = replace(result.card, model_def=prototxt, weights=caffemodel, fully_convolutional=True)
    d = card.to_dict(relative_to=card_file.parent)
    d.update({
        "fcnify_version": __version__,
        "converted": s.changed,
        "source": {"model_def": str(s.original.path.resolve()),
                   "weights": str(Path(result.card.weights).resolve()) if result.card.weights else None,
                   "upgraded_from": s.original.upgraded_from},
        "score_blob": s.blob_map[score_blob(s.original.param)],
        "output_blob": s.blob_map[output_blobs(s.original.param)[-1]],
        "input_blob": image_input(s.net)[0],
        "original_input_shape": list(image_input(s.original.param)[1]),
        "geometry": result.geometry.to_dict() if result.geometry else None,
        "minimum_input": list(result.minimum_input) if result.minimum_input else None,
        "conversions": [c.__dict__ | {"old_params": [list(p) for p in c.old_params],
                                      "new_params": [list(p) for p in c.new_params]}
                        for c in s.conversions],
        "verification": result.report.to_dict() if result.report else None,
    })
    return d


def write_net(out: OutputSet, surgery: Surgery, blobs: dict, prototxt: Path, caffemodel: Path) -> tuple[Path, Path]:
    """Stage the prototxt and caffemodel; returns the temporary paths."""
    tmp_proto = out.path_for(prototxt)
    tmp_proto.write_text(f"# Fully convolutional version of {surgery.original.path.name}, "
                         f"written by fcnify {__version__}.\n" + to_text(surgery.net))
    tmp_model = out.path_for(caffemodel)
    with open(tmp_model, "wb") as f:
        write_weights(f, surgery.net, blobs)
    return tmp_proto, tmp_model


def convert(model_def: str | Path, weights: str | Path, out_prefix: str | Path | None = None, *,
            input_size: tuple[int, int] | None = None, force: bool = False, check: bool = True,
            gpu: int | None = None, card: ModelCard | None = None, runner: Engine | None = None,
            samples: int = 3, keep_output_names: bool = False,
            preprocess: Preprocess | None = None) -> ConvertResult:
    """Convert a net and its weights; write PREFIX_full_conv.{prototxt,caffemodel,json}.

    Converted blobs are renamed NAME-conv (Caffe's reference naming); with
    `keep_output_names` the net's output blobs keep their names, for code that
    reads a net's heads by name.

    Nothing is written when the net has nothing to convert. When the check
    finds the conversion not equivalent, the files are still written (for
    inspection) and NotEquivalentError is raised with the report attached.
    `preprocess` (see preprocess.resolve_preprocess) goes into the card,
    replacing the given card's or the defaults.
    """
    if preprocess is not None:
        card = card_for(Path(model_def), Path(weights), card, preprocess)
    runner = runner if (runner is not None or not check) else make_engine(PROOF_ENGINE, gpu)
    result, w = prepare(model_def, weights, input_size=input_size, card=card,
                        layer_types=runner.layer_types() if runner is not None else None,
                        engine=runner.name if runner is not None else PROOF_ENGINE,
                        keep_names=keep_output_names)
    prefix = output_prefix(out_prefix, Path(model_def), card)
    if not result.changed:
        return write_card_only(result, Path(f"{prefix}{SUFFIX}.json"), force)
    names = {k: Path(f"{prefix}{SUFFIX}.{ext}") for k, ext in
             (("prototxt", "prototxt"), ("caffemodel", "caffemodel"), ("card", "json"))}
    out = OutputSet(force)
    for p in names.values():
        out.check(p)
    with out:
        tmp_proto, tmp_model = write_net(out, result.surgery, result.blobs, names["prototxt"],
                                         names["caffemodel"])
        if check:
            result.report = run_verify(result, tmp_proto, tmp_model, runner, samples, w)
        out.write_text(names["card"], json.dumps(card_dict(result, names["prototxt"], names["caffemodel"],
                                                           names["card"]), indent=2) + "\n")
    result.outputs = names
    if result.report is not None and not result.report.equivalent:
        raise NotEquivalentError("the converted net does NOT reproduce the original's outputs "
                                 f"(files kept for inspection: {names['prototxt']})", result=result)
    return result


def write_card_only(result: ConvertResult, card_file: Path, force: bool) -> ConvertResult:
    """A net with nothing to convert still gets its card: preprocessing, labels, detector
    fields and geometry, pointing at the original prototxt and caffemodel (not copied: a
    card is a description, and the net's own files stay the one copy of it). Without one,
    every run of such a net (MTCNN's P-Net) retyped all of its options."""
    out = OutputSet(force)
    out.check(card_file)
    with out:
        out.write_text(card_file, json.dumps(card_dict(result, result.surgery.original.path,
                                                       Path(result.card.weights), card_file),
                                             indent=2) + "\n")
    result.outputs = {"card": card_file}
    return result


def convert_in_memory(model_def: str | Path, weights: str | Path, *, card: ModelCard | None = None,
                      runner: Engine | None = None, check: bool = True,
                      workdir: Path) -> tuple[ConvertResult, Path, Path]:
    """Convert into `workdir`, a temporary folder the caller removes (classify-map on an unconverted net)."""
    runner = runner or make_engine(PROOF_ENGINE)
    result, w = prepare(model_def, weights, card=card, layer_types=runner.layer_types(),
                        engine=runner.name)
    if not result.changed:
        raise ConversionError("has no InnerProduct layer to convert; pass it as an already "
                              "fully-convolutional net", Path(model_def))
    tmpdir = Path(workdir)
    out = OutputSet(force=True)
    proto, model = tmpdir / "net_full_conv.prototxt", tmpdir / "net_full_conv.caffemodel"
    with out:
        tmp_proto, tmp_model = write_net(out, result.surgery, result.blobs, proto, model)
        if check:
            result.report = run_verify(result, tmp_proto, tmp_model, runner, weights=w)
    if result.report is not None and not result.report.equivalent:
        raise NotEquivalentError("converting it in memory did not reproduce the original's outputs; "
                                 "run `fcnify convert` to see the report", Path(model_def))
    return result, proto, model


def verify_files(original: Path, fcn: Path, weights: str | Path | None = None,
                 fcn_weights: str | Path | None = None, *, samples: int = 3, gpu: int | None = None,
                 verbose: bool = False, engine: str = PROOF_ENGINE, card: str | Path | None = None,
                 precision: str = "f32", overrides: PreprocessOverrides | None = None) -> VerifyReport:
    """`fcnify verify`: compare any fully-convolutional net with its original.

    The FCN may come from fcnify or be written by hand (Caffe's own
    net_surgery example): outputs are paired by role (scores before Softmax,
    final output) and by name (other heads). When its layer names follow
    fcnify's surgery, every parameter blob is also checked against the
    original's weights. Both nets run on `engine` (engines.ENGINES), on the
    inputs convert's check uses (check_conversion), preprocessed as `card`
    says (default: the FCN's own card, as convert wrote it; else the
    original's card or Caffe's defaults), with the terms in `overrides`
    (io.preprocess.PreprocessOverrides) over it.

    `precision="bf16"` runs the FCN in bf16 and the original in float32 on
    `engine` and returns bf16's own measurement (surgery.bf16.Bf16Report), never
    an equivalence; the engine or the CPU that cannot compute bf16 is refused
    first (engines.check_choice: one line, exit 2).
    """
    from .files import check_input_file
    from .io.models import read_card, sibling_card
    fcn_weights = Path(fcn_weights) if fcn_weights else fcn.with_suffix(".caffemodel")
    card_file = Path(card) if card is not None else sibling_card(fcn)
    fcn_card = read_card(card_file) if card_file is not None else None
    if weights is None:
        data = json.loads(card_file.read_text()) if card_file else {}
        weights = (data.get("source") or {}).get("weights")
        if weights is None:
            raise ConversionError("cannot tell the original's weights: pass --weights", fcn)
    check_input_file(weights, "weights (caffemodel)")
    check_input_file(fcn_weights, "weights (caffemodel)")
    original_def = read_netdef(original)
    fcn_def = read_netdef(fcn)
    reduced = make_engine(engine, gpu, verbose=verbose, precision=precision) if precision != "f32" else None
    runner = make_engine(engine, gpu, verbose=verbose)
    registered = runner.layer_types()
    check_layer_types(original_def.param, registered, original, runner.name)
    check_layer_types(fcn_def.param, registered, fcn, runner.name)
    surgery = convert_net(original_def)
    check_correspondence(original_def, fcn_def, surgery)
    pre = (overrides or PreprocessOverrides()).apply((fcn_card or card_for(original, Path(weights))).preprocess)
    w = read_weights(weights)
    checked = check_weights(infer(original_def.param, path=original), w, original)
    fw = read_weights(fcn_weights)
    check_weights(infer(fcn_def.param, path=fcn), fw, fcn)
    transplanted = None
    if surgery.changed and {l.name for l in surgery.net.layer} == {l.name for l in fcn_def.param.layer}:
        transplanted, _ = transplant(surgery, w, checked)
    with runner.load(original, weights) as a, (reduced or runner).load(fcn, fcn_weights) as b:
        if reduced is not None:
            return check_bf16(a, b, original_def.param, fcn_def.param, w, pre, surgery.blob_map, samples,
                              original)
        return check_conversion(a, b, original_def.param, fcn_def.param, w, pre, surgery.blob_map,
                                transplanted, samples, original)
