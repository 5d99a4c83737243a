"""Blob and parameter shapes of a net at a given input size, computed in Python.

This mirrors each layer's LayerSetUp/Reshape in Caffe, including the CHECKs
that would abort Caffe, so that a bad net is reported with the layer's name
before Caffe ever sees it. It also tells the memory planner how big every
blob gets, and the weights checker what shape every parameter must have.
Layer types not modelled here are reported as such; callers may then ask
Caffe itself, in a child process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NetDefinitionError
from .layers import DATA_LAYERS, ELEMENTWISE, LOSS_LAYERS  # noqa: F401 - ELEMENTWISE: shapes.ELEMENTWISE

Shape = tuple[int, ...]

INT_MAX = 2**31 - 1



@dataclass
class LayerShapes:
    """Shapes flowing through one layer, and the parameter shapes it expects."""

    name: str
    type: str
    bottoms: list[Shape]
    tops: list[Shape]
    params: list[Shape] = field(default_factory=list)


@dataclass
class NetShapes:
    """Every blob's shape (last writer wins, as in Caffe) and per-layer detail."""

    blobs: dict[str, Shape]
    layers: list[LayerShapes]
    unmodelled: list[str] = field(default_factory=list)  # layer names whose type we skip

    def layer(self, name: str) -> LayerShapes:
        for ls in self.layers:
            if ls.name == name:
                return ls
        raise KeyError(name)

    def params(self) -> dict[str, list[Shape]]:
        return {ls.name: ls.params for ls in self.layers if ls.params}


class UnmodelledLayer(Exception):
    """A layer type whose shapes fcnify does not compute."""


def count(shape: Shape) -> int:
    return math.prod(shape) if shape else 1


def canonical_axis(axis: int, num_axes: int, what: str) -> int:
    if not -num_axes <= axis < num_axes:
        raise ValueError(f"{what} {axis} is out of range for a {num_axes}-axis blob")
    return axis % num_axes if num_axes else 0


def input_shapes(net) -> dict[str, Shape]:
    """The shapes declared by the net's Input layers (by top name)."""
    out: dict[str, Shape] = {}
    for layer in net.layer:
        if layer.type == "Input":
            shapes = [tuple(int(d) for d in s.dim) for s in layer.input_param.shape]
            for i, top in enumerate(layer.top):
                if shapes:
                    out[top] = shapes[i] if len(shapes) > 1 else shapes[0]
    return out


def image_input(net, path: Path | None = None) -> tuple[str, Shape]:
    """The first Input blob and its declared N x C x H x W shape: what an image is fed to."""
    declared = input_shapes(net)
    if not declared:
        raise NetDefinitionError("declares no input shape (a deploy net has an Input layer "
                                 "with a shape, or input: and input_dim:)", path)
    name, shape = next(iter(declared.items()))
    if len(shape) != 4:
        raise NetDefinitionError(f"input '{name}' has shape {shape}; fcnify needs a 4-axis "
                                 "N x C x H x W image input", path)
    return name, shape


def infer(net, inputs: dict[str, Shape] | None = None, path: Path | None = None) -> NetShapes:
    """Propagate shapes through `net` (a NetParameter), with Caffe's checks.

    `inputs` overrides the Input layers' declared shapes (e.g. a larger image).
    Raises NetDefinitionError naming the layer on anything Caffe would reject,
    and on a layer type fcnify cannot compute shapes for.
    """
    return _propagate(net, inputs, path, partial=False, limits=True)


def infer_partial(net, inputs: dict[str, Shape] | None = None, path: Path | None = None) -> NetShapes:
    """The shapes fcnify can compute, for questions about part of a net (its classes, its heads).

    A layer of a type fcnify does not model stops the propagation of its tops
    (listed in NetShapes.unmodelled) instead of failing; everything else is
    checked as infer() checks it.
    """
    return _propagate(net, inputs, path, partial=True, limits=True)


def infer_any_size(net, inputs: dict[str, Shape] | None = None, path: Path | None = None) -> NetShapes:
    """Shapes at an input too large for one pass: blobs past INT_MAX are allowed.

    For sizing a map that will be computed in tiles; anything else is checked
    as infer() checks it.
    """
    return _propagate(net, inputs, path, partial=False, limits=False)


def _propagate(net, inputs: dict[str, Shape] | None, path: Path | None, *, partial: bool,
               limits: bool) -> NetShapes:
    blobs: dict[str, Shape] = {}
    layers: list[LayerShapes] = []
    unmodelled: list[str] = []
    unknown_blobs: set[str] = set()
    shared: dict[str, list] = {}
    for layer in net.layer:
        if any(b in unknown_blobs for b in layer.bottom):
            unknown_blobs.update(layer.top)
            unmodelled.append(layer.name)
            continue
        bottoms = [blobs[b] for b in layer.bottom]
        try:
            tops, params = layer_shapes(layer, bottoms, inputs)
        except UnmodelledLayer:
            if not partial:
                raise NetDefinitionError(f"layer '{layer.name}': fcnify cannot compute shapes "
                                         f"for layer type '{layer.type}'", path) from None
            unknown_blobs.update(layer.top)
            unmodelled.append(layer.name)
            continue
        except ValueError as exc:
            raise NetDefinitionError(f"layer '{layer.name}' ({layer.type}): {exc}", path) from None
        _check_param_specs(layer, params, shared, path)
        for top, shape in zip(layer.top, tops):
            if any(d < 0 for d in shape):
                raise NetDefinitionError(f"layer '{layer.name}' ({layer.type}): output shape "
                                         f"{shape} is negative (input too small)", path)
            if limits and count(shape) > INT_MAX:
                raise NetDefinitionError(f"layer '{layer.name}' ({layer.type}): blob '{top}' "
                                         f"would hold {count(shape):,} values, over Caffe's "
                                         f"limit of {INT_MAX:,} (INT_MAX)", path)
            blobs[top] = shape
        layers.append(LayerShapes(layer.name, layer.type, bottoms, list(tops), params))
    return NetShapes(blobs, layers, unmodelled)


def _check_param_specs(layer, params: list[Shape], shared: dict[str, list], path: Path | None) -> None:
    """`param { }` specs as Net::Init and AppendParam accept them (they abort otherwise).

    At most one spec per parameter blob; a named blob shared with an earlier
    layer must have its shape (its size, with share_mode PERMISSIVE) and the
    same lr_mult/decay_mult where both give one. `shared` collects the names.
    """
    where = f"layer '{layer.name}' ({layer.type})"
    if len(layer.param) > len(params):
        raise NetDefinitionError(f"{where}: {len(layer.param)} param specs for "
                                 f"{len(params)} parameter blob(s)", path)
    for spec, shape in zip(layer.param, params):
        if not spec.name:
            continue
        owner = shared.get(spec.name)
        if owner is None:
            shared[spec.name] = [shape, layer.name, {f: getattr(spec, f) for f in
                                                     ("lr_mult", "decay_mult") if spec.HasField(f)}]
            continue
        permissive = spec.share_mode == spec.PERMISSIVE  # sizes only
        if (count(shape) != count(owner[0])) if permissive else (tuple(shape) != tuple(owner[0])):
            raise NetDefinitionError(f"{where}: shares param '{spec.name}' of shape {shape} with "
                                     f"layer '{owner[1]}', where it has shape {owner[0]}", path)
        for field_name in ("lr_mult", "decay_mult"):
            if spec.HasField(field_name):
                value = getattr(spec, field_name)
                if owner[2].setdefault(field_name, value) != value:
                    raise NetDefinitionError(f"{where}: shared param '{spec.name}' has "
                                             f"{field_name} {value}, another layer gives it "
                                             f"{owner[2][field_name]}", path)


def _need_bottoms(layer, bottoms: list[Shape], n: int | None = None, minimum: int = 1) -> None:
    if n is not None and len(bottoms) != n:
        raise ValueError(f"needs {n} bottom(s), has {len(bottoms)}")
    if len(bottoms) < minimum:
        raise ValueError(f"needs at least {minimum} bottom(s), has {len(bottoms)}")


def layer_shapes(layer, bottoms: list[Shape], inputs: dict[str, Shape] | None = None):
    """(top shapes, parameter shapes) of one layer; ValueError on what Caffe would reject."""
    inputs = inputs or {}
    t = layer.type
    if t == "Input":
        return _input(layer, inputs), []
    if t in DATA_LAYERS:
        raise ValueError("is a data layer that reads a database; give fcnify a deploy "
                         "prototxt with an Input layer")
    if t in LOSS_LAYERS:
        raise ValueError("is a training-only layer (loss/accuracy needs labels); give fcnify "
                         "the deploy prototxt")
    _check_blob_counts(layer)
    if t in ELEMENTWISE:
        _need_bottoms(layer, bottoms, 1)
        _check_elementwise(layer, bottoms[0])
        return [bottoms[0]] * max(1, len(layer.top)), []
    handler = _HANDLERS.get(t)
    if handler is None:
        raise UnmodelledLayer(t)
    return handler(layer, bottoms)


# Layer::CheckBlobCounts: (fewest, most) bottoms and tops per type, None for no limit.
ONE = (1, 1)
BLOB_COUNTS = {t: (ONE, ONE) for t in ELEMENTWISE | {"InnerProduct", "Flatten", "Reshape",
                                                     "BatchNorm", "PReLU"}}
BLOB_COUNTS.update({
    "Input": ((0, 0), (1, None)),
    "Convolution": ((1, None), (1, None)),
    "Deconvolution": ((1, None), (1, None)),
    "Pooling": (ONE, (1, 2)),
    "Concat": ((1, None), ONE),
    "Eltwise": ((2, None), ONE),
    "Split": (ONE, (1, None)),
    "Slice": (ONE, (1, None)),
    "Scale": ((1, 2), ONE),
    "Bias": ((1, 2), ONE),
    "Silence": ((1, None), (0, 0)),
    "Crop": ((2, 2), ONE),
})
ONE_TOP_PER_BOTTOM = {"Convolution", "Deconvolution"}
NOT_IN_PLACE = {"AbsVal", "Flatten", "Reshape", "Split"}  # their SetUp CHECKs top != bottom


def _check_blob_counts(layer) -> None:
    """The numbers of bottoms and tops Caffe accepts for this type (it aborts otherwise)."""
    counts = BLOB_COUNTS.get(layer.type)
    if counts is None:
        return
    for (low, high), n, what in zip(counts, (len(layer.bottom), len(layer.top)), ("bottom", "top")):
        if n < low or (high is not None and n > high):
            wanted = str(low) if low == high else (f"at least {low}" if high is None
                                                   else f"{low} to {high}")
            raise ValueError(f"takes {wanted} {what}(s), has {n}")
    if layer.type in ONE_TOP_PER_BOTTOM and len(layer.top) != len(layer.bottom):
        raise ValueError(f"needs one top per bottom, has {len(layer.bottom)} bottom(s) and "
                         f"{len(layer.top)} top(s)")
    if layer.type in NOT_IN_PLACE and len(layer.bottom) and layer.bottom[0] in layer.top:
        raise ValueError(f"cannot work in place (top '{layer.bottom[0]}' is its bottom)")


def _input(layer, inputs: dict[str, Shape]) -> list[Shape]:
    declared = [tuple(int(d) for d in s.dim) for s in layer.input_param.shape]
    if not declared:
        raise ValueError("declares no input shape")
    if len(declared) not in (1, len(layer.top)):
        raise ValueError(f"has {len(layer.top)} tops but {len(declared)} shapes")
    out = []
    for i, top in enumerate(layer.top):
        shape = inputs.get(top, declared[i] if len(declared) > 1 else declared[0])
        if any(d <= 0 for d in shape):
            raise ValueError(f"input '{top}' has a non-positive dimension {shape}")
        out.append(tuple(shape))
    return out


def _check_elementwise(layer, shape: Shape) -> None:
    if layer.type == "LRN":
        p = layer.lrn_param
        if len(shape) != 4:
            raise ValueError(f"needs a 4-axis input, got {shape}")
        if p.local_size % 2 != 1:
            raise ValueError(f"local_size must be odd, is {p.local_size}")
    elif layer.type == "Softmax":
        canonical_axis(layer.softmax_param.axis, len(shape), "softmax axis")
    elif layer.type == "Dropout":
        r = layer.dropout_param.dropout_ratio
        if not 0.0 <= r < 1.0:
            raise ValueError(f"dropout_ratio must be in [0, 1), is {r}")


def _spatial(values, default: int, n: int, what: str, h=None, w=None) -> list[int]:
    """Caffe's kernel/stride/pad/dilation: one value, one per axis, or _h/_w."""
    if h is not None or w is not None:
        if n != 2:
            raise ValueError(f"{what}_h/{what}_w need 2 spatial axes")
        if len(values):
            raise ValueError(f"give either {what} or {what}_h/{what}_w, not both")
        # Caffe reads the one not given as its proto default, 0 (refused below).
        return [int(h if h is not None else 0), int(w if w is not None else 0)]
    values = [int(v) for v in values]
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} values for {n} spatial axes")
    return values


def _hw(p, name: str):
    h = getattr(p, f"{name}_h") if p.HasField(f"{name}_h") else None
    w = getattr(p, f"{name}_w") if p.HasField(f"{name}_w") else None
    return h, w


def conv_geometry(p, n_spatial: int):
    """(kernel, stride, pad, dilation) lists of a ConvolutionParameter."""
    kernel = _spatial(p.kernel_size, 0, n_spatial, "kernel", *_hw(p, "kernel"))
    if not len(p.kernel_size) and not (p.HasField("kernel_h") or p.HasField("kernel_w")):
        raise ValueError("kernel_size is required")
    stride = _spatial(p.stride, 1, n_spatial, "stride", *_hw(p, "stride"))
    pad = _spatial(p.pad, 0, n_spatial, "pad", *_hw(p, "pad"))
    dilation = _spatial(p.dilation, 1, n_spatial, "dilation")
    if any(k <= 0 for k in kernel):
        raise ValueError(f"kernel dimensions must be positive, are {kernel}")
    if any(s <= 0 for s in stride):
        raise ValueError(f"stride must be positive, is {stride}")
    if any(d <= 0 for d in dilation):
        raise ValueError(f"dilation must be positive, is {dilation}")
    return kernel, stride, pad, dilation


def _convolution(layer, bottoms, deconv: bool = False):
    p = layer.convolution_param
    _need_bottoms(layer, bottoms, minimum=1)
    shape = bottoms[0]
    axis = canonical_axis(p.axis, len(shape), "axis")
    n_spatial = len(shape) - axis - 1
    if n_spatial < 1:
        raise ValueError(f"input {shape} has no spatial axes after axis {axis}")
    if any(b != shape for b in bottoms[1:]):
        raise ValueError(f"all bottoms must have the same shape, got {bottoms}")
    kernel, stride, pad, dilation = conv_geometry(p, n_spatial)
    channels = shape[axis]
    group = p.group
    if group <= 0:
        raise ValueError(f"group must be positive, is {group}")
    if p.num_output <= 0:
        raise ValueError("num_output must be positive")
    if channels % group or p.num_output % group:
        raise ValueError(f"group {group} must divide both the {channels} input channels "
                         f"and num_output {p.num_output}")
    out_spatial = []
    for i in range(n_spatial):
        extent = dilation[i] * (kernel[i] - 1) + 1
        size = shape[axis + 1 + i]
        if deconv:
            out = stride[i] * (size - 1) + extent - 2 * pad[i]
        else:
            out = (size + 2 * pad[i] - extent) // stride[i] + 1
            if size + 2 * pad[i] < extent:
                raise ValueError(f"kernel {extent} is larger than the input {size} plus padding "
                                 f"2x{pad[i]} (input too small)")
        out_spatial.append(out)
    top = shape[:axis] + (p.num_output,) + tuple(out_spatial)
    if deconv:
        params = [(channels, p.num_output // group, *kernel)]
    else:
        params = [(p.num_output, channels // group, *kernel)]
    if p.bias_term:
        params.append((p.num_output,))
    return [top] * len(layer.top), params


def pool_geometry(p, shape: Shape):
    """(kernel, stride, pad) of a PoolingParameter applied to a 4-axis input."""
    h, w = shape[2], shape[3]
    if p.global_pooling:
        if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
            raise ValueError("global_pooling cannot be combined with a kernel size")
        kernel = [h, w]
    elif p.HasField("kernel_size"):
        if p.HasField("kernel_h") or p.HasField("kernel_w"):
            raise ValueError("give either kernel_size or kernel_h/kernel_w, not both")
        kernel = [p.kernel_size] * 2
    elif p.HasField("kernel_h") and p.HasField("kernel_w"):
        kernel = [p.kernel_h, p.kernel_w]
    else:
        raise ValueError("kernel_size (or kernel_h and kernel_w) is required")
    # PoolingLayer::LayerSetUp: pad (stride) alone, or both of pad_h and pad_w (stride_h
    # and stride_w) without it.
    for name in ("pad", "stride"):
        h, w = p.HasField(f"{name}_h"), p.HasField(f"{name}_w")
        if (h or w) and (p.HasField(name) or not (h and w)):
            raise ValueError(f"give either {name} or both {name}_h and {name}_w")
    pad = [p.pad_h, p.pad_w] if p.HasField("pad_h") else [p.pad] * 2
    stride = [p.stride_h, p.stride_w] if p.HasField("stride_h") else [p.stride] * 2
    if any(k <= 0 for k in kernel):
        raise ValueError(f"kernel must be positive, is {kernel}")
    if any(s <= 0 for s in stride):
        raise ValueError(f"stride must be positive, is {stride}")
    if p.global_pooling and (any(pad) or any(s != 1 for s in stride)):
        raise ValueError("global pooling needs pad 0 and stride 1")
    if p.pool == p.STOCHASTIC:  # PoolingLayer::Forward_cpu is NOT_IMPLEMENTED, an abort
        raise ValueError("STOCHASTIC pooling has no CPU implementation in Caffe (it aborts "
                         "when run); use MAX or AVE")
    if any(pad):
        if p.pool not in (p.MAX, p.AVE):
            raise ValueError("padding is implemented only for MAX and AVE pooling")
        if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
            raise ValueError(f"pad {pad} must be smaller than the kernel {kernel}")
    return kernel, stride, pad


def rounds_up(p) -> bool:
    """Whether a PoolingParameter rounds its output size up (CEIL, Caffe's default) rather than
    down (round_mode FLOOR; a caffe.proto without round_mode always rounds up)."""
    return not (hasattr(p, "round_mode") and p.round_mode == p.FLOOR)


def pooled_size(size: int, kernel: int, stride: int, pad: int, *, ceil: bool = True,
                padded: bool | None = None) -> int:
    """Caffe's pooled output size: ceil (or round_mode FLOOR) rounding, then drop a window
    starting in the padding. Caffe drops it on both axes when either is padded (`padded`,
    default: this axis is)."""
    rounding = math.ceil if ceil else math.floor
    out = int(rounding(float(size + 2 * pad - kernel) / stride)) + 1
    if (pad if padded is None else padded) and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _pooling(layer, bottoms):
    _need_bottoms(layer, bottoms, 1)
    shape = bottoms[0]
    if len(shape) != 4:
        raise ValueError(f"needs a 4-axis input, got {shape}")
    kernel, stride, pad = pool_geometry(layer.pooling_param, shape)
    ceil = rounds_up(layer.pooling_param)
    padded = any(pad)  # PoolingLayer::Reshape: `if (pad_h_ || pad_w_)` clips both axes
    out_h = pooled_size(shape[2], kernel[0], stride[0], pad[0], ceil=ceil, padded=padded)
    out_w = pooled_size(shape[3], kernel[1], stride[1], pad[1], ceil=ceil, padded=padded)
    if len(layer.top) > 1 and layer.pooling_param.pool != layer.pooling_param.MAX:
        raise ValueError("only MAX pooling can have a second (mask) top")
    top = (shape[0], shape[1], out_h, out_w)
    return [top] * len(layer.top), []


def _inner_product(layer, bottoms):
    p = layer.inner_product_param
    _need_bottoms(layer, bottoms, 1)
    shape = bottoms[0]
    axis = canonical_axis(p.axis, len(shape), "axis")
    if p.num_output <= 0:
        raise ValueError("num_output must be positive")
    k = count(shape[axis:])
    top = shape[:axis] + (p.num_output,)
    params = [(k, p.num_output) if p.transpose else (p.num_output, k)]
    if p.bias_term:
        params.append((p.num_output,))
    return [top], params


def _concat(layer, bottoms):
    p = layer.concat_param
    _need_bottoms(layer, bottoms, minimum=1)
    shape = bottoms[0]
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    if p.HasField("concat_dim") and p.HasField("axis"):
        raise ValueError("give either axis or concat_dim, not both")
    axis = canonical_axis(axis, len(shape), "axis")
    total = 0
    for b in bottoms:
        if len(b) != len(shape) or any(b[i] != shape[i] for i in range(len(shape)) if i != axis):
            raise ValueError(f"bottoms {bottoms} differ outside the concat axis {axis}")
        total += b[axis]
    return [shape[:axis] + (total,) + shape[axis + 1:]], []


def _eltwise(layer, bottoms):
    p = layer.eltwise_param
    _need_bottoms(layer, bottoms, minimum=2)
    if any(b != bottoms[0] for b in bottoms):
        raise ValueError(f"all bottoms must have the same shape, got {bottoms}")
    if len(p.coeff) and (p.operation != p.SUM or len(p.coeff) != len(bottoms)):
        raise ValueError("coeff needs SUM and one coefficient per bottom")
    return [bottoms[0]], []


def _flatten(layer, bottoms):
    p = layer.flatten_param
    _need_bottoms(layer, bottoms, 1)
    shape = bottoms[0]
    start = canonical_axis(p.axis, len(shape), "axis")
    end = canonical_axis(p.end_axis, len(shape), "end_axis")
    if end < start:
        raise ValueError(f"end_axis {p.end_axis} comes before axis {p.axis}")
    return [shape[:start] + (count(shape[start:end + 1]),) + shape[end + 1:]], []


def _reshape(layer, bottoms):
    p = layer.reshape_param
    _need_bottoms(layer, bottoms, 1)
    shape = bottoms[0]
    dims = [int(d) for d in p.shape.dim]
    n = len(shape)
    start = p.axis if p.axis >= 0 else n + p.axis + 1
    if not 0 <= start <= n:
        raise ValueError(f"axis {p.axis} is out of range")
    end = n if p.num_axes == -1 else start + p.num_axes
    if p.num_axes < -1 or end > n:
        raise ValueError(f"num_axes {p.num_axes} is out of range")
    if dims.count(-1) > 1:
        raise ValueError("at most one dimension may be -1")
    new = []
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= n:
                raise ValueError("a 0 (copy) dimension points past the input's axes")
            new.append(shape[start + i])
        elif d < -1:
            raise ValueError(f"dimension {d} is invalid")
        else:
            new.append(d)
    out = list(shape[:start]) + new + list(shape[end:])
    if -1 in out:
        known = count(tuple(d for d in out if d != -1))
        if known == 0 or count(shape) % known:
            raise ValueError(f"cannot infer -1 reshaping {shape} to {tuple(out)}")
        out[out.index(-1)] = count(shape) // known
    if count(tuple(out)) != count(shape):
        raise ValueError(f"reshape {shape} -> {tuple(out)} changes the number of values")
    return [tuple(out)], []


def _split(layer, bottoms):
    _need_bottoms(layer, bottoms, 1)
    return [bottoms[0]] * len(layer.top), []


def _slice(layer, bottoms):
    p = layer.slice_param
    _need_bottoms(layer, bottoms, 1)
    shape = bottoms[0]
    axis = p.slice_dim if p.HasField("slice_dim") else p.axis
    axis = canonical_axis(axis, len(shape), "axis")
    points = list(p.slice_point)
    n = len(layer.top)
    if points:
        if len(points) != n - 1:
            raise ValueError(f"{len(points)} slice points for {n} tops")
        edges = [0] + points + [shape[axis]]
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"slice points {points} must increase within {shape[axis]}")
        sizes = [b - a for a, b in zip(edges, edges[1:])]
    else:
        if shape[axis] % n:
            raise ValueError(f"axis size {shape[axis]} does not split into {n} equal parts")
        sizes = [shape[axis] // n] * n
    return [shape[:axis] + (s,) + shape[axis + 1:] for s in sizes], []


def _batch_norm(layer, bottoms):
    _need_bottoms(layer, bottoms, 1)
    shape = bottoms[0]
    channels = shape[1] if len(shape) > 1 else 1
    return [shape], [(channels,), (channels,), (1,)]


def _scale_or_bias(layer, bottoms):
    p = layer.scale_param if layer.type == "Scale" else layer.bias_param
    _need_bottoms(layer, bottoms, minimum=1)
    shape = bottoms[0]
    if len(bottoms) > 2:
        raise ValueError("takes one or two bottoms")
    if len(bottoms) == 2:
        # the bias (a parameter) has the second bottom's shape (Caffe's BiasLayer, num_axes = its axes)
        return [shape], ([tuple(bottoms[1])] if layer.type == "Scale" and p.bias_term else [])
    axis = canonical_axis(p.axis, len(shape), "axis")
    num_axes = p.num_axes
    if num_axes < -1 or (num_axes >= 0 and axis + num_axes > len(shape)):
        raise ValueError(f"num_axes {num_axes} is out of range")
    param = shape[axis:] if num_axes == -1 else shape[axis:axis + num_axes]
    params = [tuple(param)]
    if layer.type == "Scale" and p.bias_term:
        params.append(tuple(param))
    return [shape], params


def _prelu(layer, bottoms):
    _need_bottoms(layer, bottoms, 1)
    shape = bottoms[0]
    if len(shape) < 2:
        raise ValueError(f"needs at least 2 axes, got {shape}")
    # a shared slope is a 0-axis blob in Caffe (PReLULayer: Blob(vector<int>(0)))
    return [shape], [() if layer.prelu_param.channel_shared else (shape[1],)]


def _silence(layer, bottoms):
    return [], []


def _crop(layer, bottoms):
    p = layer.crop_param
    _need_bottoms(layer, bottoms, 2)
    a, b = bottoms
    if len(a) != len(b):
        raise ValueError(f"bottoms {a} and {b} differ in number of axes")
    axis = canonical_axis(p.axis, len(a), "axis")
    offsets = list(p.offset)
    if len(offsets) not in (0, 1, len(a) - axis):
        raise ValueError(f"{len(offsets)} offsets for {len(a) - axis} cropped axes")
    out = list(a)
    for i in range(axis, len(a)):
        off = offsets[0] if len(offsets) == 1 else (offsets[i - axis] if offsets else 0)
        if b[i] + off > a[i]:
            raise ValueError(f"crop of axis {i} ({b[i]} + offset {off}) exceeds the input {a[i]}")
        out[i] = b[i]
    return [tuple(out)], []


_HANDLERS = {
    "Convolution": _convolution,
    "Deconvolution": lambda layer, bottoms: _convolution(layer, bottoms, deconv=True),
    "Pooling": _pooling,
    "InnerProduct": _inner_product,
    "Concat": _concat,
    "Eltwise": _eltwise,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Split": _split,
    "Slice": _slice,
    "BatchNorm": _batch_norm,
    "Scale": _scale_or_bias,
    "Bias": _scale_or_bias,
    "PReLU": _prelu,
    "Silence": _silence,
    "Crop": _crop,
}

MODELLED_TYPES = frozenset(_HANDLERS) | ELEMENTWISE | {"Input"}
