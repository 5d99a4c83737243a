"""Read a net definition (prototxt) into a current-format NetParameter.

Caffe upgrades old definitions when it loads them and aborts on anything it
cannot parse. fcnify parses with protobuf first, so a syntax error becomes a
message with a line number, and upgrades the old formats itself: V1
(`layers { type: CONVOLUTION }`) and the `input:`/`input_dim:` header, which
become `layer { type: "Convolution" }` and an Input layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from ..errors import NetDefinitionError
from ..files import read_bytes, sniff
from .proto import caffe_pb2

# V1 layer type enum name -> current type string (Caffe's own spelling).
V1_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DATA": "Data", "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU",
    "SIGMOID": "Sigmoid", "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence", "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH", "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}
# V1 fields that are not copied by name into LayerParameter.
V1_SPECIAL = {"bottom", "top", "name", "type", "blobs", "param", "blob_share_mode",
              "blobs_lr", "weight_decay", "layer", "include", "exclude", "loss_weight"}


@dataclass
class NetDef:
    """A parsed, upgraded net definition and where it came from."""

    param: object  # caffe NetParameter, current format, TEST-phase layers only
    path: Path | None
    upgraded_from: str | None = None  # "V1" / "input fields" when upgraded

    @property
    def name(self) -> str:
        return self.param.name or (self.path.stem if self.path else "net")

    def layer(self, name: str):
        for layer in self.param.layer:
            if layer.name == name:
                return layer
        raise KeyError(name)


def read_netdef(path: str | Path, phase: str = "TEST") -> NetDef:
    """Parse, upgrade and phase-filter a prototxt file; errors name the file and line."""
    path = Path(path)
    data = read_bytes(path, "net definition (prototxt)")
    return parse_netdef(data, path, phase)


def parse_netdef(data: bytes | str, path: Path | None = None, phase: str = "TEST") -> NetDef:
    text = _decode(data, path)
    net = caffe_pb2().NetParameter()
    try:
        text_format.Parse(text, net, allow_unknown_extension=False)
    except text_format.ParseError as exc:
        raise NetDefinitionError(_parse_error_message(exc), path) from None
    return _finish(net, path, phase)


def _decode(data: bytes | str, path: Path | None) -> str:
    if isinstance(data, str):
        return data
    kind = sniff(data)
    if kind:
        raise NetDefinitionError(f"this is {kind}, not a text prototxt", path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NetDefinitionError("not a text prototxt (binary data; is this a .caffemodel? "
                                 "pass it with --weights)", path) from None
    if "\x00" in text:
        raise NetDefinitionError("not a text prototxt (contains NUL bytes; is this a "
                                 ".caffemodel? pass it with --weights)", path)
    return text


def _parse_error_message(exc: text_format.ParseError) -> str:
    msg = str(exc)
    m = re.match(r"^(\d+):(\d+) : (.*)$", msg, re.S)
    if m:
        line, col, rest = m.groups()
        rest = " ".join(rest.split())
        return f"syntax error at line {line}, column {col}: {rest}"
    return "syntax error: " + " ".join(msg.split())


def _finish(net, path: Path | None, phase: str) -> NetDef:
    upgraded = None
    if len(net.layers):
        if len(net.layer):
            raise NetDefinitionError("mixes old 'layers' and new 'layer' definitions", path)
        _upgrade_v1(net, path)
        upgraded = "V1"
    if len(net.input):
        _upgrade_input_fields(net, path)
        upgraded = upgraded or "input fields"
    _filter_phase(net, phase, path)
    if not len(net.layer):
        raise NetDefinitionError("defines no layers", path)
    check_topology(net, path)
    return NetDef(net, path, upgraded)


def _upgrade_v1(net, path: Path | None) -> None:
    pb = caffe_pb2()
    v1_enum = pb.V1LayerParameter.DESCRIPTOR.enum_types_by_name["LayerType"]
    layer_fields = pb.LayerParameter.DESCRIPTOR.fields_by_name
    for old in net.layers:
        if old.HasField("layer"):
            raise NetDefinitionError("uses the V0 layer format (Caffe before 2014), which "
                                     "fcnify does not upgrade; upgrade it with Caffe's "
                                     "upgrade_net_proto_text tool", path)
        new = net.layer.add()
        new.name = old.name
        new.bottom.extend(old.bottom)
        new.top.extend(old.top)
        type_name = v1_enum.values_by_number[old.type].name if old.type in v1_enum.values_by_number else None
        if type_name not in V1_TYPES:
            raise NetDefinitionError(f"layer '{old.name}': V1 layer type {type_name or old.type} "
                                     "has no current equivalent", path)
        new.type = V1_TYPES[type_name]
        new.blobs.extend(old.blobs)
        new.include.extend(old.include)
        new.exclude.extend(old.exclude)
        new.loss_weight.extend(old.loss_weight)
        n_params = max(len(old.param), len(old.blob_share_mode), len(old.blobs_lr), len(old.weight_decay))
        for i in range(n_params):
            spec = new.param.add()
            if i < len(old.param):
                spec.name = old.param[i]
            if i < len(old.blob_share_mode):
                spec.share_mode = old.blob_share_mode[i]
            if i < len(old.blobs_lr):
                spec.lr_mult = old.blobs_lr[i]
            if i < len(old.weight_decay):
                spec.decay_mult = old.weight_decay[i]
        for field, value in old.ListFields():
            if field.name in V1_SPECIAL:
                continue
            target = layer_fields.get(field.name)
            if target is None or target.message_type is None:
                raise NetDefinitionError(f"layer '{old.name}': V1 field {field.name} has no "
                                         "current equivalent", path)
            getattr(new, field.name).CopyFrom(value)
    del net.layers[:]


def _upgrade_input_fields(net, path: Path | None) -> None:
    """`input: "data" input_dim: ...` (or input_shape) -> an Input layer in front."""
    pb = caffe_pb2()
    n = len(net.input)
    shapes = [list(s.dim) for s in net.input_shape]
    dims = list(net.input_dim)
    if not shapes:
        if len(dims) != 4 * n:
            raise NetDefinitionError(f"declares {n} input(s) but {len(dims)} input_dim values "
                                     f"(expected {4 * n})", path)
        shapes = [dims[4 * i:4 * i + 4] for i in range(n)]
    if len(shapes) != n:
        raise NetDefinitionError(f"declares {n} input(s) but {len(shapes)} input_shape(s)", path)
    layer = pb.LayerParameter(name="input", type="Input")
    for name, shape in zip(net.input, shapes):
        layer.top.append(name)
        layer.input_param.shape.add().dim.extend(shape)
    layers = [layer] + [l for l in net.layer]
    del net.layer[:]
    net.layer.extend(layers)
    del net.input[:]
    del net.input_shape[:]
    del net.input_dim[:]


def _rule_matches(rule, phase_value: int) -> bool:
    if rule.HasField("phase") and rule.phase != phase_value:
        return False
    if rule.HasField("min_level") and 0 < rule.min_level:
        return False
    if rule.HasField("max_level") and 0 > rule.max_level:
        return False
    if len(rule.stage):  # the deploy state has no stages
        return False
    return True


def _filter_phase(net, phase: str, path: Path | None = None) -> None:
    """Keep the layers Caffe would instantiate in `phase` (level 0, no stages)."""
    phase_value = 1 if phase == "TEST" else 0
    keep = []
    for layer in net.layer:
        if len(layer.include) and len(layer.exclude):
            raise NetDefinitionError(f"layer '{layer.name}' has both include and exclude rules; "
                                     "Caffe accepts one or the other", path)
        if len(layer.include):
            ok = any(_rule_matches(r, phase_value) for r in layer.include)
        else:
            ok = not any(_rule_matches(r, phase_value) for r in layer.exclude)
        if ok:
            layer.ClearField("include")
            layer.ClearField("exclude")
            keep.append(layer)
    if len(keep) != len(net.layer):
        kept = list(keep)
        del net.layer[:]
        net.layer.extend(kept)


def check_topology(net, path: Path | None) -> None:
    """Every bottom must be produced by an earlier layer; names must be unique.

    A top may reuse an existing blob's name only in place, as Caffe's Net
    wires it: it is the layer's bottom at the same position, and that version
    of the blob has no other reader (a second reader makes Caffe insert a
    Split, and the name is then produced twice, which aborts Caffe).
    """
    available: set[str] = set()
    names: set[str] = set()
    last_writer: dict[str, tuple[int, int]] = {}
    readers: dict[tuple[int, int], int] = {}
    for i, layer in enumerate(net.layer):
        if not layer.name:
            raise NetDefinitionError(f"a layer of type '{layer.type}' has no name", path)
        if layer.name in names:
            raise NetDefinitionError(f"two layers are named '{layer.name}'", path)
        names.add(layer.name)
        if not layer.type:
            raise NetDefinitionError(f"layer '{layer.name}' has no type", path)
        for bottom in layer.bottom:
            if bottom not in available:
                raise NetDefinitionError(f"layer '{layer.name}' reads bottom '{bottom}', "
                                         "which no earlier layer produces", path)
            readers[last_writer[bottom]] = readers.get(last_writer[bottom], 0) + 1
        for j, top in enumerate(layer.top):
            last_writer[top] = (i, j)
            available.add(top)
        for j, weight in enumerate(layer.loss_weight[:len(layer.top)]):
            if weight:  # Caffe counts a loss output as one more reader
                readers[(i, j)] = readers.get((i, j), 0) + 1
        for field, values, per in (("propagate_down", layer.propagate_down, layer.bottom),
                                   ("loss_weight", layer.loss_weight, layer.top)):
            if len(values) and len(values) != len(per):
                blob = "bottom" if field == "propagate_down" else "top"
                raise NetDefinitionError(f"layer '{layer.name}' gives {len(values)} {field} "
                                         f"value(s) for {len(per)} {blob}(s); Caffe needs none "
                                         f"or one per {blob}", path)
        if len(layer.blobs):
            raise NetDefinitionError(f"layer '{layer.name}' carries {len(layer.blobs)} parameter "
                                     "blob(s) in the net definition; fcnify takes weights only "
                                     "from the caffemodel (remove them from the prototxt)", path)
    produced: set[str] = set()
    writer: dict[str, tuple[int, int]] = {}
    for i, layer in enumerate(net.layer):
        read = [writer[b] for b in layer.bottom]
        for j, top in enumerate(layer.top):
            in_place = (j < len(layer.bottom) and layer.bottom[j] == top
                        and readers.get(read[j], 0) <= 1)
            if top in produced and not in_place:
                raise NetDefinitionError(
                    f"layer '{layer.name}' writes top '{top}', which an earlier layer already "
                    "produces; Caffe allows that only in place (the same blob as its bottom at "
                    "that position, read by no other layer)", path)
            produced.add(top)
            writer[top] = (i, j)


def to_text(net) -> str:
    """Prototxt text of a NetParameter, as Caffe writes it."""
    return text_format.MessageToString(net)


# Layers whose parameter's `engine` picks Caffe's own code or cuDNN (layer_factory.cpp).
ENGINE_PARAMS = {"Convolution": "convolution_param", "Deconvolution": "convolution_param",
                 "Pooling": "pooling_param", "LRN": "lrn_param", "ReLU": "relu_param",
                 "Sigmoid": "sigmoid_param", "Softmax": "softmax_param", "TanH": "tanh_param"}
