"""A Caffe net as an ONNX graph, Caffe's arithmetic kept, input height and width left free.

Built node by node with onnx.helper from the net definition (no tracing), so
one file serves any input size, as the fully-convolutional net does in
Caffe. Where ONNX's operator and Caffe's layer disagree at the edges, the
graph computes Caffe's answer:

- Pooling keeps Caffe's output size: ceil rounding, and with padding the last
  window is dropped when it would start in the padding. The right/bottom
  padding that makes every window lie inside therefore depends on the input
  size, and is computed in the graph from Shape (Pad, then a pad-free pool).
  MAX pads with -inf. AVE divides by Caffe's divisor, the window clipped to
  the *padded* input, also computed in the graph (ONNX's count_include_pad
  counts the overhang beyond the padding too; without it, the padding not
  at all). Stride 1 and unpadded MAX pooling need none of this and use
  ONNX's own attributes.
- LRN ACROSS_CHANNELS is ONNX's LRN (same window, same alpha/size);
  WITHIN_CHANNEL is Caffe's own sub-net: x * (1 + alpha * avg(x^2))^-beta
  over n x n with padding counted, as Caffe's AVE pooling counts it there.
- BatchNorm divides its mean and variance by the stored moving-average
  factor (0 means 0), as Caffe does; a net that asks for batch statistics
  is refused. PReLU's slope broadcasts per channel or is shared.

Every initializer is one of the caffemodel's blobs unchanged, named
LAYER/INDEX (reshapes and BatchNorm's scaling are graph nodes that ONNX
Runtime folds at load), so the engine can prove which weights it runs.
A layer type or setting without an exact ONNX form is refused by name
before anything is written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..version import __version__
from ..caffe.caffemodel import read_weights
from ..errors import FcnifyError, NetDefinitionError, SetupError, WeightsError
from ..caffe.shapes import Shape, canonical_axis, conv_geometry, image_input, infer, input_shapes, pool_geometry, rounds_up
from ..surgery.transplant import check_weights

# imported by require_onnx() when a graph is built: `import onnx` alone costs ~0.7 s of CPU (its
# ml_dtypes), which a classify-map run whose graph is cached (onnx_cache.py) never pays
onnx = TensorProto = helper = numpy_helper = None

OPSET = 17
EXPORTABLE = frozenset({
    "Input", "Convolution", "Deconvolution", "Pooling", "LRN", "ReLU", "PReLU", "ELU", "Sigmoid",
    "TanH", "AbsVal", "Power", "Dropout", "Split", "InnerProduct", "Flatten", "Softmax", "Concat",
    "Eltwise", "BatchNorm", "Scale",
})


INT64 = np.int64


def require_onnx() -> None:
    """Import onnx (once); SetupError when the optional extra (pip install 'fcnify[onnx]') is missing."""
    global onnx, TensorProto, helper, numpy_helper
    if onnx is not None:
        return
    try:
        import onnx as module
        from onnx import TensorProto as tensor_proto, helper as helpers, numpy_helper as arrays
    except ImportError:
        raise SetupError("ONNX export needs the onnx package: pip install 'fcnify[onnx]'") from None
    onnx, TensorProto, helper, numpy_helper = module, tensor_proto, helpers, arrays


class Unexportable(NetDefinitionError):
    """A layer, or a layer's setting, that has no exact ONNX form."""


class ExportError(FcnifyError):
    """The exported model failed onnx.checker: fcnify built it wrong (failed work, exit 1)."""

    exit_code = 1


def check_exportable(net, path: Path | None = None) -> None:
    """Refuse, by name, the first layer whose type fcnify cannot export."""
    for layer in net.layer:
        if layer.type not in EXPORTABLE:
            raise Unexportable(f"layer '{layer.name}': layer type '{layer.type}' has no exact ONNX "
                               f"form in fcnify's exporter (it exports {', '.join(sorted(EXPORTABLE))})",
                               path)


@dataclass
class Graph:
    """The nodes and initializers being built, and which ONNX value holds each Caffe blob."""

    net: object
    params: dict[str, list[np.ndarray]]
    shapes: dict[str, Shape]
    path: Path | None = None
    external: bool = False  # parameters as placeholders, their arrays handed to ONNX Runtime
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)  # Caffe blob -> ONNX value now holding it
    reserved: set[str] = field(default_factory=set)  # Caffe's blob names, kept for their final values
    _names: set[str] = field(default_factory=set)
    _consts: dict[tuple, str] = field(default_factory=dict)

    def fresh(self, hint: str) -> str:
        name, i = hint, 1
        while name in self._names or name in self.reserved:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        """One node with one output; returns the output's name."""
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        """A small constant tensor (shared between nodes)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh(f"const/{len(self._consts)}")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def param(self, layer, index: int) -> str:
        """Blob `index` of the layer's parameters, unchanged, as initializer LAYER/INDEX."""
        blobs = self.params.get(layer.name, [])
        if index >= len(blobs):
            raise WeightsError(f"layer '{layer.name}' has {len(blobs)} parameter blob(s), "
                               f"needs blob {index}", self.path)
        name = f"{layer.name}/{index}"
        if name not in self._names:
            self._names.add(name)
            if self.external:
                self.initializers.append(_placeholder(name, blobs[index].shape))
            else:
                self.initializers.append(numpy_helper.from_array(
                    np.ascontiguousarray(blobs[index], dtype=np.float32), name))
        return name

    def refuse(self, layer, why: str) -> Unexportable:
        return Unexportable(f"layer '{layer.name}' ({layer.type}): {why}; it has no exact ONNX form",
                            self.path)

    def rank(self, blob: str) -> int:
        return len(self.shapes[blob])

    def dim(self, x: str, axis: int) -> str:
        """x.shape[axis] as a 1-element int64 tensor."""
        return self.op("Shape", [x], f"{x}/dim{axis}", start=axis, end=axis + 1)


EXTERNAL = "fcnify-in-memory"  # the location of a placeholder initializer's data


def _placeholder(name: str, shape) -> "onnx.TensorProto":
    """An initializer without data: ONNX Runtime gets the array itself (add_external_initializers)."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", EXTERNAL
    return tensor


def to_onnx(net, params: dict[str, list[np.ndarray]], outputs: list[str] | None = None,
            path: Path | None = None, metadata: dict[str, str] | None = None,
            name: str | None = None, external: bool = False) -> "onnx.ModelProto":
    """The ONNX model of `net` with `params` (layer -> blobs), its graph outputs the Caffe blobs
    `outputs` (default: the net's outputs). Inputs: N x C x H x W with N, H, W free.

    With `external`, the parameters are placeholders named LAYER/INDEX whose arrays the caller
    hands to ONNX Runtime: no copy of the weights goes through protobuf."""
    from ..caffe.geometry import output_blobs
    require_onnx()
    check_exportable(net, path)
    shapes = infer(net, path=path).blobs
    g = Graph(net, params, shapes, path, external=external, reserved=set(shapes))
    last = {}
    for i, layer in enumerate(net.layer):
        for top in layer.top:
            last[top] = i
    inputs = []
    for blob, shape in input_shapes(net).items():
        dims = ["N", shape[1], "H", "W"] if len(shape) == 4 else ["N", *shape[1:]]
        inputs.append(helper.make_tensor_value_info(blob, TensorProto.FLOAT, dims))
        g.values[blob] = blob
        g._names.add(blob)
    for i, layer in enumerate(net.layer):
        if layer.type == "Input":
            continue
        first = len(g.nodes)
        tops = _LAYERS[layer.type](g, layer, [g.values[b] for b in layer.bottom])
        for top, value in zip(layer.top, tops):
            # the blob's last writer gives its value the blob's name: outputs keep Caffe's names
            final = last[top] == i and top not in g._names
            g.values[top] = _name_value(g, value, top if final else g.fresh(f"{top}@{layer.name}"), first)
    outs = []
    for blob in outputs or output_blobs(net):
        if blob not in g.values:
            raise NetDefinitionError(f"the net has no blob named '{blob}'", path)
        value = g.values[blob]
        if value != blob:
            value = g.op("Identity", [value], f"{blob}/out")
        outs.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, _out_dims(blob, shapes[blob])))
    graph = helper.make_graph(g.nodes, name or (net.name or "fcnify_net"), inputs, outs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="fcnify", producer_version=__version__)
    model.ir_version = min(model.ir_version, 8)  # what ONNX Runtime 1.15 and later read
    for key, value in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return model


def _out_dims(blob: str, shape: Shape) -> list:
    """An output's shape: the batch and the spatial axes free (named after the blob), the rest fixed."""
    if len(shape) == 4:
        return ["N", shape[1], f"{blob}_height", f"{blob}_width"]
    return ["N", *shape[1:]]


def _name_value(g: Graph, value: str, name: str, first: int) -> str:
    """Rename `value`, made by one of the nodes from `first` on, to `name` (else an Identity)."""
    g._names.add(name)
    for node in reversed(g.nodes[first:]):
        if value in node.output:
            node.output[list(node.output).index(value)] = name
            node.name = name
            g._names.discard(value)
            return name
    g.nodes.append(helper.make_node("Identity", [value], [name], name=name))
    return name


# ---------------------------------------------------------------- layers

def _convolution(g: Graph, layer, xs: list[str]) -> list[str]:
    p = layer.convolution_param
    rank = g.rank(layer.bottom[0])
    if canonical_axis(p.axis, rank, "axis") != 1:
        raise g.refuse(layer, "channels are not on axis 1")
    kernel, stride, pad, dilation = conv_geometry(p, rank - 2)
    ins = [g.param(layer, 0)] + ([g.param(layer, 1)] if p.bias_term else [])
    kind = "ConvTranspose" if layer.type == "Deconvolution" else "Conv"
    return [g.op(kind, [x, *ins], layer.name, kernel_shape=kernel, strides=stride, pads=pad + pad,
                 dilations=dilation, group=p.group or 1) for x in xs]


def _pooling(g: Graph, layer, xs: list[str]) -> list[str]:
    p = layer.pooling_param
    bottom = layer.bottom[0]
    if len(layer.top) > 1:
        raise g.refuse(layer, "MAX pooling's second (mask) top")
    if g.rank(bottom) != 4:
        raise g.refuse(layer, f"a {g.rank(bottom)}-axis input")
    try:
        kernel, stride, pad = pool_geometry(p, g.shapes[bottom])
    except ValueError as exc:
        raise NetDefinitionError(f"layer '{layer.name}': {exc}", g.path) from None
    is_max = p.pool == p.MAX
    x = xs[0]
    if p.global_pooling:
        return [g.op("GlobalMaxPool" if is_max else "GlobalAveragePool", [x], layer.name)]
    ceil = rounds_up(p)
    if all(s == 1 for s in stride):  # every window starts inside and Caffe's divisor is k*k
        if is_max:
            return [g.op("MaxPool", [x], layer.name, kernel_shape=kernel, pads=pad + pad)]
        return [g.op("AveragePool", [x], layer.name, kernel_shape=kernel, pads=pad + pad,
                     count_include_pad=1)]
    if ceil and not any(pad) and any(k < s for k, s in zip(kernel, stride)):
        raise g.refuse(layer, f"kernel {kernel} smaller than stride {stride} without padding: at "
                       "some input sizes Caffe's last window starts past the input and gives "
                       "-FLT_MAX (MAX) or divides by zero (AVE)")
    if is_max and ceil and not any(pad):  # ONNX's ceil_mode: the same windows, the same size
        return [g.op("MaxPool", [x], layer.name, kernel_shape=kernel, strides=stride, ceil_mode=1)]
    after = [_pad_after(g, x, 2 + i, kernel[i], stride[i], pad[i], ceil=ceil, padded=any(pad))
             for i in (0, 1)]
    pads = g.op("Concat", [g.const([0, 0, *pad], INT64), g.const([0, 0], INT64), *after],
                f"{layer.name}/pads", axis=0)
    fill = g.const(-np.inf if is_max else 0.0)
    padded = g.op("Pad", [x, pads, fill], f"{layer.name}/padded", mode="constant")
    if is_max:
        return [g.op("MaxPool", [padded], layer.name, kernel_shape=kernel, strides=stride)]
    avg = g.op("AveragePool", [padded], f"{layer.name}/avg", kernel_shape=kernel, strides=stride)
    return [g.op("Mul", [avg, _ave_factor(g, layer, avg, x, kernel, stride, pad)], layer.name)]


def _pad_after(g: Graph, x: str, axis: int, k: int, s: int, p: int, *, ceil: bool, padded: bool) -> str:
    """Padding after the input on `axis` so the last of Caffe's windows lies inside (>= 0;
    a pool without padding ignores the fewer than `s` rows left over)."""
    size = g.dim(x, axis)
    if ceil:
        # (out - 1) * s = r + m with r = size + 2p - k and m = (-r) mod s
        m = g.op("Mod", [g.op("Sub", [g.const([k - 2 * p], INT64), size], f"{x}/negr{axis}"),
                         g.const([s], INT64)], f"{x}/m{axis}", fmod=0)
        after = g.op("Add", [m, g.const([p], INT64)], f"{x}/after{axis}")
        if padded:  # Caffe drops a last window that starts in the padding: r + m >= size + p
            drop = g.op("Cast", [g.op("GreaterOrEqual", [m, g.const([k - p], INT64)], f"{x}/drop{axis}")],
                        f"{x}/dropi{axis}", to=TensorProto.INT64)
            after = g.op("Sub", [after, g.op("Mul", [drop, g.const([s], INT64)], f"{x}/drops{axis}")],
                         f"{x}/after{axis}")
    else:
        r = g.op("Add", [size, g.const([2 * p - k], INT64)], f"{x}/r{axis}")
        after = g.op("Sub", [g.const([p], INT64), g.op("Mod", [r, g.const([s], INT64)], f"{x}/rm{axis}",
                                                         fmod=0)], f"{x}/after{axis}")
    return g.op("Max", [after, g.const([0], INT64)], f"{x}/after{axis}")


def _ave_factor(g: Graph, layer, avg: str, x: str, kernel, stride, pad) -> str:
    """k_h*k_w / Caffe's divisor per output cell, the divisor being the window clipped to
    [-pad, size + pad) on each axis (pooling_layer.cpp); 1 inside the image."""
    counts = []
    for i in (0, 1):
        n = g.op("Squeeze", [g.dim(avg, 2 + i), g.const([0], INT64)], f"{layer.name}/n{i}")
        idx = g.op("Range", [g.const(0, INT64), n, g.const(1, INT64)], f"{layer.name}/i{i}")
        start = g.op("Sub", [g.op("Mul", [idx, g.const(stride[i], INT64)], f"{layer.name}/is{i}"),
                             g.const(pad[i], INT64)], f"{layer.name}/start{i}")
        limit = g.op("Add", [g.dim(x, 2 + i), g.const([pad[i]], INT64)], f"{layer.name}/limit{i}")
        end = g.op("Min", [g.op("Add", [start, g.const(kernel[i], INT64)], f"{layer.name}/sk{i}"), limit],
                   f"{layer.name}/end{i}")
        count = g.op("Cast", [g.op("Sub", [end, start], f"{layer.name}/c{i}")], f"{layer.name}/count{i}",
                     to=TensorProto.FLOAT)
        counts.append(g.op("Unsqueeze", [count, g.const([1 - i], INT64)], f"{layer.name}/count{i}"))
    divisor = g.op("Mul", counts, f"{layer.name}/divisor")
    return g.op("Div", [g.const(float(kernel[0] * kernel[1])), divisor], f"{layer.name}/factor")


def _lrn(g: Graph, layer, xs: list[str]) -> list[str]:
    p = layer.lrn_param
    x = xs[0]
    if p.local_size % 2 == 0:
        raise g.refuse(layer, "an even local_size (Caffe refuses it too)")
    if p.norm_region == p.ACROSS_CHANNELS:
        return [g.op("LRN", [x], layer.name, size=p.local_size, alpha=p.alpha, beta=p.beta, bias=p.k)]
    pre = (p.local_size - 1) // 2
    sq = g.op("Mul", [x, x], f"{layer.name}/square")
    avg = g.op("AveragePool", [sq], f"{layer.name}/avg", kernel_shape=[p.local_size] * 2,
               pads=[pre] * 4, count_include_pad=1)
    base = g.op("Add", [g.op("Mul", [avg, g.const(p.alpha)], f"{layer.name}/scaled"), g.const(1.0)],
                f"{layer.name}/base")
    return [g.op("Mul", [x, g.op("Pow", [base, g.const(-p.beta)], f"{layer.name}/pow")], layer.name)]


def _relu(g: Graph, layer, xs: list[str]) -> list[str]:
    slope = layer.relu_param.negative_slope
    if slope:
        return [g.op("LeakyRelu", [xs[0]], layer.name, alpha=slope)]
    return [g.op("Relu", [xs[0]], layer.name)]


def _channel_view(g: Graph, layer, value: str, shape: tuple[int, ...], axis: int, rank: int) -> str:
    """A parameter of `shape` reshaped to broadcast from `axis` of a rank-`rank` blob."""
    view = list(shape) + [1] * (rank - axis - len(shape))
    return g.op("Reshape", [value, g.const(view, INT64)], f"{value}/view")


def _prelu(g: Graph, layer, xs: list[str]) -> list[str]:
    slope = g.param(layer, 0)
    shape = g.params[layer.name][0].shape
    rank = g.rank(layer.bottom[0])
    if not layer.prelu_param.channel_shared:
        slope = _channel_view(g, layer, slope, shape, 1, rank)
    return [g.op("PRelu", [xs[0], slope], layer.name)]


def _elu(g: Graph, layer, xs: list[str]) -> list[str]:
    return [g.op("Elu", [xs[0]], layer.name, alpha=layer.elu_param.alpha)]


def _unary(op: str):
    return lambda g, layer, xs: [g.op(op, [xs[0]], layer.name)]


def _identity(g: Graph, layer, xs: list[str]) -> list[str]:
    return [g.op("Identity", [xs[0]], f"{layer.name}/{i}") for i in range(len(layer.top))]


def _power(g: Graph, layer, xs: list[str]) -> list[str]:
    p = layer.power_param
    if p.power == 0 or p.scale == 0:
        raise g.refuse(layer, "power 0 or scale 0 (a constant output)")
    y = xs[0]
    if p.scale != 1:
        y = g.op("Mul", [y, g.const(p.scale)], f"{layer.name}/scaled")
    if p.shift != 0:
        y = g.op("Add", [y, g.const(p.shift)], f"{layer.name}/shifted")
    if p.power != 1:
        y = g.op("Pow", [y, g.const(p.power)], layer.name)
    return [y if y != xs[0] else g.op("Identity", [y], layer.name)]


def _softmax(g: Graph, layer, xs: list[str]) -> list[str]:
    axis = canonical_axis(layer.softmax_param.axis, g.rank(layer.bottom[0]), "softmax axis")
    return [g.op("Softmax", [xs[0]], layer.name, axis=axis)]


def _concat(g: Graph, layer, xs: list[str]) -> list[str]:
    p = layer.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    return [g.op("Concat", xs, layer.name, axis=canonical_axis(axis, g.rank(layer.bottom[0]), "axis"))]


def _eltwise(g: Graph, layer, xs: list[str]) -> list[str]:
    p = layer.eltwise_param
    if p.operation == p.MAX:
        return [g.op("Max", xs, layer.name)]
    if p.operation == p.PROD:
        out = xs[0]
        for x in xs[1:]:
            out = g.op("Mul", [out, x], layer.name)
        return [out]
    coeffs = list(p.coeff) or [1.0] * len(xs)
    if len(coeffs) != len(xs):
        raise NetDefinitionError(f"layer '{layer.name}': {len(coeffs)} coeff for {len(xs)} bottoms",
                                 g.path)
    terms = [x if c == 1 else g.op("Mul", [x, g.const(c)], f"{layer.name}/term{i}")
             for i, (c, x) in enumerate(zip(coeffs, xs))]
    out = terms[0]
    for t in terms[1:]:  # left to right, as Caffe accumulates
        out = g.op("Add", [out, t], layer.name)
    return [out]


def _batch_norm(g: Graph, layer, xs: list[str]) -> list[str]:
    p = layer.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise g.refuse(layer, "use_global_stats: false (statistics of each batch)")
    rank = g.rank(layer.bottom[0])
    channels = g.shapes[layer.bottom[0]][1]
    factor = g.param(layer, 2)
    f = g.op("Reshape", [factor, g.const([], INT64)], f"{layer.name}/f") if \
        g.params[layer.name][2].size == 1 else None
    if f is None:
        raise WeightsError(f"layer '{layer.name}': BatchNorm's third blob must hold one value", g.path)
    zero = g.op("Equal", [f, g.const(0.0)], f"{layer.name}/f0")
    scale = g.op("Where", [zero, g.const(0.0), g.op("Div", [g.const(1.0), f], f"{layer.name}/inv")],
                 f"{layer.name}/scale")
    view = [channels] + [1] * (rank - 2)
    mean = g.op("Mul", [g.op("Reshape", [g.param(layer, 0), g.const(view, INT64)], f"{layer.name}/m"),
                        scale], f"{layer.name}/mean")
    var = g.op("Mul", [g.op("Reshape", [g.param(layer, 1), g.const(view, INT64)], f"{layer.name}/v"),
                       scale], f"{layer.name}/var")
    std = g.op("Sqrt", [g.op("Add", [var, g.const(p.eps)], f"{layer.name}/vare")], f"{layer.name}/std")
    centred = g.op("Sub", [xs[0], mean], f"{layer.name}/centred")
    return [g.op("Div", [centred, std], layer.name)]


def _scale(g: Graph, layer, xs: list[str]) -> list[str]:
    p = layer.scale_param
    if len(xs) > 1:
        raise g.refuse(layer, "the scale taken from a second bottom")
    rank = g.rank(layer.bottom[0])
    shape = g.params[layer.name][0].shape
    axis = 0 if len(shape) == 0 else canonical_axis(p.axis, rank, "axis")
    out = g.op("Mul", [xs[0], _channel_view(g, layer, g.param(layer, 0), shape, axis, rank)],
               f"{layer.name}/scaled")
    if p.bias_term:
        bias = _channel_view(g, layer, g.param(layer, 1), shape, axis, rank)
        out = g.op("Add", [out, bias], layer.name)
    return [out]


def _inner_product(g: Graph, layer, xs: list[str]) -> list[str]:
    p = layer.inner_product_param
    if canonical_axis(p.axis, g.rank(layer.bottom[0]), "axis") != 1:
        raise g.refuse(layer, "an axis other than 1")
    flat = g.op("Flatten", [xs[0]], f"{layer.name}/flat", axis=1)
    ins = [flat, g.param(layer, 0)] + ([g.param(layer, 1)] if p.bias_term else [])
    return [g.op("Gemm", ins, layer.name, transB=0 if p.transpose else 1)]


def _flatten(g: Graph, layer, xs: list[str]) -> list[str]:
    p = layer.flatten_param
    rank = g.rank(layer.bottom[0])
    if canonical_axis(p.axis, rank, "axis") != 1 or canonical_axis(p.end_axis, rank, "end_axis") != rank - 1:
        raise g.refuse(layer, "a flatten other than axis 1 to the last axis")
    return [g.op("Flatten", [xs[0]], layer.name, axis=1)]


_LAYERS = {
    "Convolution": _convolution, "Deconvolution": _convolution, "Pooling": _pooling, "LRN": _lrn,
    "ReLU": _relu, "PReLU": _prelu, "ELU": _elu, "Sigmoid": _unary("Sigmoid"), "TanH": _unary("Tanh"),
    "AbsVal": _unary("Abs"), "Power": _power, "Dropout": _identity, "Split": _identity,
    "InnerProduct": _inner_product, "Flatten": _flatten, "Softmax": _softmax, "Concat": _concat,
    "Eltwise": _eltwise, "BatchNorm": _batch_norm, "Scale": _scale,
}


# ---------------------------------------------------------------- files

def net_params(net, weights: Path | None, path: Path | None = None) -> dict[str, list[np.ndarray]]:
    """Each parameterised layer's blobs from the caffemodel, checked, in their declared shapes."""
    shapes = infer(net, path=path)
    expected = shapes.params()
    if not expected:
        return {}
    if weights is None:
        raise WeightsError(f"the net has {len(expected)} layer(s) with parameters: give its weights "
                           "(a .caffemodel)", path)
    w = read_weights(weights)
    check_weights(shapes, w, path)
    return {name: [np.asarray(blob, dtype=np.float32).reshape(shape)
                   for blob, shape in zip(w[name].blobs, want)] for name, want in expected.items()}


SOFTMAX_SUFFIX = "_softmax"


def add_softmax(model: "onnx.ModelProto", scores: str) -> str:
    """Append a Softmax over the classes (axis 1) of the output `scores`, as a further output
    named SCORES_softmax, for a net that has none of its own (--softmax on); returns its name."""
    require_onnx()
    name = scores + SOFTMAX_SUFFIX
    source = next(o for o in model.graph.output if o.name == scores)
    model.graph.node.append(helper.make_node("Softmax", [scores], [name], axis=1, name="fcnify" + SOFTMAX_SUFFIX))
    out = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
    out.type.tensor_type.shape.CopyFrom(source.type.tensor_type.shape)
    model.graph.output.append(out)
    return name


def class_output(net, plan) -> str:
    """The ONNX output that is the class map under a softmax plan (caffe.geometry.softmax_plan)."""
    from ..caffe.geometry import output_blobs
    if plan.by == "net":
        return output_blobs(net)[-1]
    return plan.scores + SOFTMAX_SUFFIX if plan.by == "fcnify" else plan.scores


def card_metadata(card, net, num_classes: int, path: Path | None = None, plan=None) -> dict[str, str]:
    """The model card's preprocessing, labels, detector fields, softmax and the map geometry of
    the net actually written, as ONNX metadata (JSON values)."""
    from ..caffe.geometry import map_geometry, output_blobs, score_blob
    labels = card.load_labels(num_classes) if card is not None else None
    meta = {
        "fcnify.version": __version__,
        "fcnify.input_blob": image_input(net)[0],
        "fcnify.score_blob": score_blob(net),
        "fcnify.output_blob": output_blobs(net)[-1],
        "fcnify.geometry": json.dumps(map_geometry(net, path=path).to_dict()),
    }
    if card is not None:
        meta["fcnify.name"] = card.name
        meta["fcnify.preprocess"] = json.dumps(card.preprocess.to_dict())
        meta["fcnify.background_class"] = json.dumps(card.background_class)
        meta["fcnify.box_head"] = json.dumps(card.box_head)
    if plan is not None:
        meta["fcnify.softmax"] = json.dumps(plan.to_dict() | {"output": class_output(net, plan)})
        meta["fcnify.class_output"] = class_output(net, plan)
    meta["fcnify.labels"] = json.dumps(None if labels is None else list(labels.names))
    if labels is not None and labels.ids is not None:
        meta["fcnify.label_ids"] = json.dumps(list(labels.ids))
    return meta
