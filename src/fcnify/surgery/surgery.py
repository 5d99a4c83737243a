"""Rewrite a classification net's InnerProduct layers as convolutions.

An InnerProduct reading an N x C x H x W blob computes exactly what a
Convolution with an H x W kernel computes at the one position where it fits;
on a larger input the convolution slides, which makes the net dense. An
InnerProduct that reads an already-converted layer becomes a 1x1 convolution.
Layers that only exist to flatten for an InnerProduct are dropped, and a
global pooling in front of one, or in front of a classifier that follows it
(NIN, SqueezeNet), is frozen to the kernel it had at the declared input size,
stride 1 (otherwise it would pool the whole larger image into one cell).
Everything is derived from the net's own shapes; nothing is CaffeNet-specific.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ConversionError, NetDefinitionError
from ..caffe.netdef import NetDef
from ..caffe.layers import AXIS_PARAM, CELLWISE, VIEWS
from ..caffe.shapes import (LayerShapes, NetShapes, Shape, canonical_axis, count, infer,
                     layer_shapes, pool_geometry)

SUFFIX = "-conv"


def named_blob(wanted: str, blobs) -> str | None:
    """`wanted` among `blobs` as the user may name it: as it is, or as in the original net (the
    converted blob is NAME-conv), so heads can be named as a net's documentation does."""
    return next((name for name in (wanted, wanted + SUFFIX) if name in blobs), None)


@dataclass(frozen=True)
class Conversion:
    """One change the surgery made, for the report."""

    kind: str  # "inner_product", "global_pooling", "removed"
    layer: str
    new_layer: str | None
    old_type: str
    new_type: str | None
    old_params: tuple[Shape, ...] = ()
    new_params: tuple[Shape, ...] = ()
    transpose: bool = False
    detail: str = ""


@dataclass
class Surgery:
    """The fully-convolutional net and how it relates to the original."""

    original: NetDef
    net: object  # NetParameter
    conversions: list[Conversion]
    source_layer: dict[str, str]  # new layer name -> original layer name (weights come from it)
    blob_map: dict[str, str]  # original blob name -> its name in the new net
    original_shapes: NetShapes
    shapes: NetShapes  # of the new net at the original input size
    input_shape: Shape = ()  # written into the new net's Input layer

    @property
    def changed(self) -> bool:
        return bool(self.conversions)

    def converted(self) -> list[Conversion]:
        return [c for c in self.conversions if c.kind == "inner_product"]


def _fail(msg: str, path: Path | None) -> None:
    raise ConversionError(msg, path)


def _consumers(net) -> dict[str, list]:
    out: dict[str, list] = {}
    for layer in net.layer:
        for b in layer.bottom:
            out.setdefault(b, []).append(layer)
    return out


def _is_flatten(layer, in_shape: Shape, out_shape: Shape) -> bool:
    """A Flatten/Reshape that turns N x C x H x W into N x (C*H*W)."""
    return (layer.type in ("Flatten", "Reshape") and len(in_shape) >= 2 and len(out_shape) == 2
            and out_shape[0] == in_shape[0] and out_shape[1] == count(in_shape[1:]))


def _frozen_globals(net, shapes: NetShapes) -> set[str]:
    """Global pooling layers whose output reaches an InnerProduct through cell-wise layers."""
    producer: dict[str, object] = {}
    found: set[str] = set()
    for layer in net.layer:
        if layer.type == "InnerProduct":
            blob = layer.bottom[0]
            while blob in producer:
                src = producer[blob]
                if src.type == "Pooling" and src.pooling_param.global_pooling:
                    found.add(src.name)
                    break
                if src.type in VIEWS and len(src.bottom) == 1:
                    blob = src.bottom[0]
                    continue
                break
        for top in layer.top:
            if top not in layer.bottom:
                producer[top] = layer
    return found


def _merges_downstream(net, layer_index: int, top: str) -> bool:
    """Whether a later layer combines `top`'s descendants with a blob from elsewhere.

    A squeeze-and-excitation branch does (its pooled vector rescales the map);
    a classifier head does not.
    """
    down = {top}
    for layer in list(net.layer)[layer_index + 1:]:
        reads = [b for b in layer.bottom if b in down]
        if not reads:
            continue
        if len(reads) != len(layer.bottom):
            return True
        down.update(layer.top)
    return False


def _collapses(layer, ls: LayerShapes) -> bool:
    """A pooling that takes its whole input to one cell at the declared size, and would not slide.

    Global pooling, or a kernel covering the whole unpadded input with a
    stride or size that is not already the dense form (kernel equal to the
    input, stride 1: ResNet's 7x7 average pool, left as it is).
    """
    if layer.type != "Pooling" or not ls.bottoms or len(ls.bottoms[0]) != 4 or not ls.tops:
        return False
    p = layer.pooling_param
    h, w = ls.bottoms[0][2], ls.bottoms[0][3]
    if tuple(ls.tops[0][2:]) != (1, 1):
        return False
    if p.global_pooling:
        return True
    try:
        kernel, stride, pad = pool_geometry(p, ls.bottoms[0])
    except ValueError:
        return False
    if any(pad) or kernel[0] < h or kernel[1] < w:
        return False
    return not (list(kernel) == [h, w] and list(stride) == [1, 1])


def frozen_poolings(net, shapes: NetShapes) -> set[str]:
    """Poolings to freeze to their kernel at the declared size, stride 1.

    Those in front of an InnerProduct, and those that collapse the map on the
    way to the net's outputs (a classifier after global pooling: NIN,
    SqueezeNet, MobileNet), which on a larger input would still give one cell.
    """
    found = _frozen_globals(net, shapes)
    by_name = {ls.name: ls for ls in shapes.layers}
    for i, layer in enumerate(net.layer):
        ls = by_name.get(layer.name)
        if ls is not None and _collapses(layer, ls) and not _merges_downstream(net, i, layer.top[0]):
            found.add(layer.name)
    return found


def convert_net(netdef: NetDef, input_size: tuple[int, int] | None = None) -> Surgery:
    """Build the fully-convolutional version of `netdef` (weights are transplanted separately)."""
    path = netdef.path
    orig = netdef.param
    orig_shapes = infer(orig, path=path)
    consumers = _consumers(orig)
    frozen = frozen_poolings(orig, orig_shapes)
    layer_by_name = {ls.name: ls for ls in orig_shapes.layers}

    new = type(orig)()
    new.CopyFrom(orig)
    new.ClearField("layer")
    new.name = (orig.name or "net") + "_full_conv"

    rename: dict[str, str] = {}
    spatial: set[str] = set()  # new-net blobs that were 2-axis in the original
    new_blobs: dict[str, Shape] = {}
    new_layer_shapes = []
    conversions: list[Conversion] = []
    source: dict[str, str] = {}
    names = {l.name for l in orig.layer}
    blob_names = {t for l in orig.layer for t in l.top}

    for layer in orig.layer:
        info = layer_by_name[layer.name]
        new_layer = new.layer.add()
        new_layer.CopyFrom(layer)
        del new_layer.bottom[:]
        new_layer.bottom.extend(rename.get(b, b) for b in layer.bottom)
        bottoms_new = [new_blobs[b] for b in new_layer.bottom]

        if (layer.type in ("Flatten", "Reshape") and info.tops
                and _is_flatten(layer, info.bottoms[0], info.tops[0])
                and consumers.get(layer.top[0])
                and all(c.type == "InnerProduct" for c in consumers[layer.top[0]])):
            del new.layer[-1]
            rename[layer.top[0]] = new_layer.bottom[0]
            conversions.append(Conversion("removed", layer.name, None, layer.type, None,
                                          detail=f"flattened {info.bottoms[0]} for an InnerProduct"))
            continue

        if layer.type == "InnerProduct":
            _to_convolution(layer, new_layer, info, bottoms_new, names, path)
            taken = [t + SUFFIX for t in layer.top if t + SUFFIX in blob_names]
            if taken:  # Caffe would see the renamed output produced twice, and abort
                _fail(f"cannot rename InnerProduct '{layer.name}' output to '{taken[0]}': the net "
                      "already has a blob of that name", path)
            for i, top in enumerate(layer.top):
                rename[top] = top + SUFFIX
            spatial.update(new_layer.top)
            source[new_layer.name] = layer.name
        else:
            source[new_layer.name] = layer.name
            if layer.name in frozen:
                kh, kw = bottoms_new[0][2], bottoms_new[0][3]
                pp = new_layer.pooling_param
                pp.ClearField("global_pooling")
                for f in ("kernel_size", "kernel_h", "kernel_w", "stride", "stride_h", "stride_w",
                          "pad", "pad_h", "pad_w"):
                    pp.ClearField(f)
                if kh == kw:
                    pp.kernel_size = kh
                else:
                    pp.kernel_h, pp.kernel_w = kh, kw
                pp.stride = 1
                what = ("global pooling" if layer.pooling_param.global_pooling
                        else f"pooling over its whole {kh}x{kw} input")
                conversions.append(Conversion("global_pooling", layer.name, layer.name, "Pooling",
                                              "Pooling", detail=f"{what} frozen to a {kh}x{kw} "
                                              "kernel, stride 1 (one window per cell)"))
            reads_spatial = [b for b in new_layer.bottom if b in spatial]
            if reads_spatial:
                _check_cellwise(layer, new_layer, info, reads_spatial[0], path)
            for i, top in enumerate(layer.top):
                if top in layer.bottom:
                    new_layer.top[i] = rename.get(top, top)
                else:
                    rename.pop(top, None)
                if reads_spatial:
                    spatial.add(new_layer.top[i])

        try:
            tops, params = layer_shapes(new_layer, bottoms_new)
        except ValueError as exc:
            raise ConversionError(f"converted layer '{new_layer.name}' is invalid: {exc}", path) from None
        for top, shape in zip(new_layer.top, tops):
            new_blobs[top] = shape
        new_layer_shapes.append(LayerShapes(new_layer.name, new_layer.type, bottoms_new, list(tops), params))
        if layer.type == "InnerProduct":
            conversions.append(Conversion(
                "inner_product", layer.name, new_layer.name, "InnerProduct", "Convolution",
                tuple(info.params), tuple(params), layer.inner_product_param.transpose,
                detail=f"{bottoms_new[0][2]}x{bottoms_new[0][3]} kernel over {bottoms_new[0][1]} channels"))

    new_shapes = NetShapes(dict(new_blobs), new_layer_shapes)
    blob_map = {b: rename.get(b, b) for b in orig_shapes.blobs}
    input_shape = _set_input_size(new, input_size, path)
    return Surgery(netdef, new, conversions, source, blob_map, orig_shapes, new_shapes, input_shape)


def keep_output_names(surgery: Surgery) -> Surgery:
    """The same conversion with the net's output blobs under their original names.

    By default a converted InnerProduct's output is renamed NAME-conv, as in
    Caffe's net-surgery example. Code that reads a net's heads by name
    (MTCNN's conv5-2, prob1) wants them where they were; inner blobs keep the
    reference naming, so that weights and layers still say what changed.
    """
    from ..caffe.geometry import output_blobs
    back = {surgery.blob_map[b]: b for b in output_blobs(surgery.original.param)
            if surgery.blob_map.get(b, b) != b}
    if not back:
        return surgery
    net = type(surgery.net)()
    net.CopyFrom(surgery.net)
    for layer in net.layer:
        for names in (layer.bottom, layer.top):
            for i, name in enumerate(names):
                names[i] = back.get(name, name)
    shapes = NetShapes({back.get(b, b): s for b, s in surgery.shapes.blobs.items()},
                       surgery.shapes.layers, surgery.shapes.unmodelled)
    blob_map = {b: back.get(n, n) for b, n in surgery.blob_map.items()}
    return replace(surgery, net=net, blob_map=blob_map, shapes=shapes)


def _to_convolution(layer, new_layer, info, bottoms_new: list[Shape], names: set[str],
                    path: Path | None) -> None:
    p = layer.inner_product_param
    old_in = info.bottoms[0]
    try:
        axis = canonical_axis(p.axis, len(old_in), "axis")
    except ValueError as exc:
        _fail(f"InnerProduct '{layer.name}': {exc}", path)
    if axis != 1:
        _fail(f"InnerProduct '{layer.name}' has axis {p.axis} on its {len(old_in)}-axis input "
              f"{old_in}: it applies one weight matrix separately at each index of axes "
              f"0..{axis - 1}, which a convolution over channels cannot reproduce", path)
    shape = bottoms_new[0]
    if len(shape) != 4:
        _fail(f"InnerProduct '{layer.name}' reads '{new_layer.bottom[0]}' of shape {shape}, which "
              "has no height and width to slide over; it cannot become a convolution", path)
    n, c, kh, kw = shape
    if c * kh * kw != count(old_in[1:]):
        _fail(f"InnerProduct '{layer.name}': its input {old_in} and the new input {shape} hold "
              "different numbers of values", path)
    new_name = layer.name + SUFFIX
    if new_name in names:
        _fail(f"cannot rename InnerProduct '{layer.name}' to '{new_name}': a layer of that name "
              "already exists", path)
    new_layer.ClearField("inner_product_param")
    new_layer.type = "Convolution"
    new_layer.name = new_name
    del new_layer.top[:]
    new_layer.top.extend(t + SUFFIX for t in layer.top)
    cp = new_layer.convolution_param
    cp.num_output = p.num_output
    if p.HasField("bias_term"):
        cp.bias_term = p.bias_term
    if kh == kw:
        cp.kernel_size.append(kh)
    else:
        cp.kernel_h, cp.kernel_w = kh, kw
    if p.HasField("weight_filler"):
        cp.weight_filler.CopyFrom(p.weight_filler)
    if p.HasField("bias_filler"):
        cp.bias_filler.CopyFrom(p.bias_filler)


def _check_cellwise(layer, new_layer, info, blob: str, path: Path | None) -> None:
    """A layer reading a converted blob must act on each cell alone, over axis 1."""
    if layer.type not in CELLWISE:
        _fail(f"layer '{layer.name}' ({layer.type}) reads '{blob}', which becomes a map of cells; "
              f"fcnify cannot keep a {layer.type} layer dense there", path)
    field_name = AXIS_PARAM.get(layer.type)
    if field_name:
        param = getattr(new_layer, field_name)
        old_axes = len(info.bottoms[0])
        legacy = layer.type == "Concat" and param.HasField("concat_dim")
        value = param.concat_dim if legacy else param.axis
        try:
            axis = canonical_axis(value, old_axes, "axis")
        except ValueError as exc:
            _fail(f"layer '{layer.name}': {exc}", path)
        if axis != 1:
            _fail(f"layer '{layer.name}' ({layer.type}) works along axis {value} of '{blob}'; after "
                  "conversion that axis would run across map cells, not classes", path)
        if legacy:
            param.ClearField("concat_dim")
        if value != 1:
            param.axis = 1


def _set_input_size(net, size: tuple[int, int] | None, path: Path | None) -> Shape:
    inputs = [l for l in net.layer if l.type == "Input"]
    if not inputs:
        raise NetDefinitionError("has no Input layer (a deploy net declares its input shape)", path)
    shape_msg = inputs[0].input_param.shape[0]
    if size is not None:
        if len(shape_msg.dim) != 4:
            raise ConversionError(f"--input-size needs a 4-axis input, the net declares {list(shape_msg.dim)}", path)
        shape_msg.dim[2], shape_msg.dim[3] = size
    return tuple(shape_msg.dim)


def needs_surgery(net, shapes: NetShapes) -> bool:
    """Whether the net has anything to convert: an InnerProduct, or a pooling that collapses the map."""
    return any(l.type == "InnerProduct" for l in net.layer) or bool(frozen_poolings(net, shapes))
