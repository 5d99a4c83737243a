"""Where each cell of a dense map looks in the input image, derived from the layers.

Each convolution or pooling layer with kernel extent e (dilation included),
stride s and padding p maps output cell j to input cells [j*s - p, j*s - p + e - 1].
Composing those along the net gives, per spatial axis, the map's stride S and
two boxes per cell, which fcnify always names this way:

- the *window* W: the crop the original classifier would be given for this
  cell, [j*S + offset, j*S + offset + W). It is the classifier's own input
  size (CaffeNet 227 px, ResNet-50 224 px) when that input gives one cell;
  otherwise the smallest box that grows by (e - 1 - 2p) * S_in per layer, so
  padded "same" convolutions do not widen it.
- the *reach*: every input pixel that can change the cell, padding included
  (CaffeNet: 355 px, from -64 to +290 around the window's start). It is
  larger than the window in padded nets: zero padding at a crop's edges
  becomes real pixels in a large image, so pixels outside the window change
  the cell. Exact tiling needs this margin.

Pooling's ceil rounding changes only how many cells there are, not where
they look; input sizes W + k*S are those at which every window fits exactly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import NetDefinitionError
from .layers import MERGE, PASS_THROUGH
from .shapes import (conv_geometry, image_input, infer, infer_any_size, infer_partial, input_shapes,
                     pool_geometry)

def hw(height: int | float, width: int | float) -> str:
    """A size as fcnify writes every size: height x width, the order of --size and of numpy."""
    if isinstance(height, float) or isinstance(width, float):  # image pixels: a tenth is plenty
        return f"{round(height, 1):g}x{round(width, 1):g}"
    return f"{height}x{width}"




@dataclass(frozen=True)
class AxisGeometry:
    """One spatial axis: cell j's window is [j*stride + box_lo, j*stride + box_hi] and its
    reach [j*stride + reach_lo, j*stride + reach_hi] (both inclusive)."""

    stride: int
    box_lo: int
    box_hi: int
    reach_lo: int
    reach_hi: int

    @property
    def window(self) -> int:
        return self.box_hi - self.box_lo + 1

    @property
    def field(self) -> int:
        """The window's old name, kept for callers written before it was renamed."""
        return self.window

    @property
    def reach(self) -> int:
        return self.reach_hi - self.reach_lo + 1

    def after(self, extent: int, stride: int, pad: int) -> "AxisGeometry":
        s = self.stride
        return AxisGeometry(
            stride=s * stride,
            box_lo=self.box_lo,
            box_hi=self.box_hi + (extent - 1 - 2 * pad) * s,
            reach_lo=self.reach_lo - pad * s,
            reach_hi=self.reach_hi + (extent - 1 - pad) * s,
        )


IDENTITY = AxisGeometry(1, 0, 0, 0, 0)


@dataclass(frozen=True)
class MapGeometry:
    """Geometry of one output blob relative to the input blob, for (y, x)."""

    blob: str
    y: AxisGeometry
    x: AxisGeometry

    @property
    def stride(self) -> tuple[int, int]:
        return self.y.stride, self.x.stride

    @property
    def window(self) -> tuple[int, int]:
        """(height, width) of the crop the original classifier sees for one cell."""
        return self.y.window, self.x.window

    @property
    def field(self) -> tuple[int, int]:
        """The window's old name, kept for callers written before it was renamed."""
        return self.window

    @property
    def reach(self) -> tuple[int, int]:
        """(height, width) of the pixels that can change one cell."""
        return self.y.reach, self.x.reach

    @property
    def offset(self) -> tuple[int, int]:
        return self.y.box_lo, self.x.box_lo

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Cell (row, col)'s window -> (x0, y0, x1, y1) in input pixels, x1/y1 exclusive."""
        x0 = col * self.x.stride + self.x.box_lo
        y0 = row * self.y.stride + self.y.box_lo
        return x0, y0, x0 + self.x.window, y0 + self.y.window

    def reach_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Cell (row, col)'s reach -> (x0, y0, x1, y1) in input pixels, x1/y1 exclusive.

        It may start before 0 and end past the image: padding stands in there.
        """
        x0 = col * self.x.stride + self.x.reach_lo
        y0 = row * self.y.stride + self.y.reach_lo
        return x0, y0, x0 + self.x.reach, y0 + self.y.reach

    def exact_sizes(self, count: int = 5) -> list[tuple[int, int]]:
        """Input sizes whose windows tile exactly: field + k * stride."""
        return [(self.y.field + k * self.y.stride, self.x.field + k * self.x.stride)
                for k in range(count)]

    def to_dict(self) -> dict:
        return {"blob": self.blob, "stride": list(self.stride), "window": list(self.window),
                "field": list(self.window),  # the window's old name
                "offset": list(self.offset),
                "reach": [self.y.reach, self.x.reach],
                "reach_offset": [self.y.reach_lo, self.x.reach_lo],
                "y": asdict(self.y), "x": asdict(self.x)}


def _union(a: AxisGeometry, b: AxisGeometry, layer: str, path) -> AxisGeometry:
    if a.stride != b.stride:
        raise NetDefinitionError(f"layer '{layer}' merges maps of strides {a.stride} and "
                                 f"{b.stride}; their cells do not line up", path)
    return AxisGeometry(a.stride, min(a.box_lo, b.box_lo), max(a.box_hi, b.box_hi),
                        min(a.reach_lo, b.reach_lo), max(a.reach_hi, b.reach_hi))


def blob_geometry(net, input_blob: str | None = None, path: Path | None = None) -> dict[str, MapGeometry]:
    """Geometry of every spatial blob reachable from the input through conv/pool layers.

    Blobs past a layer that destroys the spatial layout (InnerProduct, Flatten,
    Reshape, ...) are left out.
    """
    declared = input_shapes(net)
    if input_blob is None:
        if not declared:
            raise NetDefinitionError("has no Input layer to measure geometry from", path)
        input_blob = next(iter(declared))
    shapes = infer_partial(net, path=path).blobs
    geo: dict[str, tuple[AxisGeometry, AxisGeometry]] = {input_blob: (IDENTITY, IDENTITY)}
    for layer in net.layer:
        if layer.type == "Input":
            continue
        srcs = [geo[b] for b in layer.bottom if b in geo]
        if not srcs or len(srcs) != len(layer.bottom) and layer.type in MERGE:
            for top in layer.top:
                if top not in layer.bottom:
                    geo.pop(top, None)
            continue
        t = layer.type
        if t in PASS_THROUGH:
            out = srcs[0]
        elif t in MERGE:
            gy, gx = srcs[0]
            for sy, sx in srcs[1:]:
                gy, gx = _union(gy, sy, layer.name, path), _union(gx, sx, layer.name, path)
            out = (gy, gx)
        elif t in ("Convolution", "Pooling"):
            bshape = shapes.get(layer.bottom[0])
            if bshape is None or len(bshape) != 4:
                continue
            if t == "Convolution":
                p = layer.convolution_param
                if p.axis != 1:
                    continue
                kernel, stride, pad, dilation = conv_geometry(p, 2)
                ext = [dilation[i] * (kernel[i] - 1) + 1 for i in range(2)]
            else:
                kernel, stride, pad = pool_geometry(layer.pooling_param, bshape)
                ext = list(kernel)
            gy, gx = srcs[0]
            out = (gy.after(ext[0], stride[0], pad[0]), gx.after(ext[1], stride[1], pad[1]))
        else:
            for top in layer.top:
                geo.pop(top, None)
            continue
        for top in layer.top:
            geo[top] = out
    return {name: MapGeometry(name, gy, gx) for name, (gy, gx) in geo.items()}


def output_blobs(net) -> list[str]:
    """Blobs no later layer reads: the net's outputs, as Caffe defines them."""
    produced: dict[str, int] = {}
    consumed: set[tuple[str, int]] = set()
    for i, layer in enumerate(net.layer):
        for b in layer.bottom:
            if b in produced:
                consumed.add((b, produced[b]))
        for t in layer.top:
            produced[t] = i
    outs = []
    for t, i in produced.items():
        # in-place layers re-produce a blob; it is an output if its last producer's version is unread
        if (t, i) not in consumed and net.layer[i].type not in ("Silence",):
            outs.append(t)
    return outs


def score_blob(net, output: str | None = None) -> str:
    """The input of the Softmax that makes `output` (default: the last output), else `output`."""
    outs = output_blobs(net)
    if not outs:
        raise NetDefinitionError("has no output blob")
    out = output or outs[-1]
    for layer in reversed(net.layer):
        if out in layer.top and out not in layer.bottom:
            if layer.type == "Softmax":
                return layer.bottom[0]
            break
    return out


@dataclass(frozen=True)
class SoftmaxPlan:
    """Whether a class map is probabilities, and who made them: the one answer that the map
    files, the JSON, the text and the ONNX metadata all give (a net ending in a pooling, as
    SqueezeNet does, has no Softmax of its own)."""

    applied: bool
    by: str | None      # "net" (its own Softmax layer), "fcnify" (added over the classes), None
    layer: str | None   # the net's own Softmax layer, when it has one
    scores: str         # the blob before any Softmax

    def to_dict(self) -> dict:
        return {"applied": self.applied, "by": self.by, "layer": self.layer, "scores": self.scores}

    def describe(self) -> str:
        if self.by == "net":
            return f"probabilities from the net's own Softmax '{self.layer}' over '{self.scores}'"
        if self.by == "fcnify":
            return (f"probabilities: Softmax over the classes of '{self.scores}' applied by fcnify (the "
                    "net has none; --softmax off gives the raw scores)")
        return (f"raw scores of '{self.scores}', no Softmax (--softmax off)"
                + (f"; the net's own Softmax '{self.layer}' not applied" if self.layer else ""))


def softmax_plan(net, output: str | None = None, apply: bool = True) -> SoftmaxPlan:
    """How the class map of `output` (default: the net's last output) is made under --softmax."""
    scores = score_blob(net, output)
    out = output or output_blobs(net)[-1]
    layer = None
    if scores != out:
        layer = next(l.name for l in reversed(net.layer) if out in l.top and l.type == "Softmax")
    if not apply:
        return SoftmaxPlan(False, None, layer, scores)
    return SoftmaxPlan(True, "net" if layer else "fcnify", layer, scores)


def map_geometry(net, blob: str | None = None, path: Path | None = None,
                 classifier_input: tuple[int, int] | None = None) -> MapGeometry:
    """Geometry of `blob` (default: the net's final output) of a fully-convolutional net.

    The window is the classifier's own input size (`classifier_input`, else
    the size the net declares) where that input gives a single cell (see
    classifier_window).
    """
    blob = blob or output_blobs(net)[-1]
    geos = blob_geometry(net, path=path)
    if blob not in geos:
        raise NetDefinitionError(f"output '{blob}' is not a spatial map (a layer before it "
                                 "flattens the input); convert the net first", path)
    return with_window(geos[blob], classifier_window(net, blob, classifier_input))


def classifier_window(net, blob: str, size: tuple[int, int] | None = None) -> tuple[int | None, int | None]:
    """(height, width) the classifier is fed, per axis where that input gives exactly one cell.

    That is the crop a cell stands for. It can exceed the box the layers
    alone imply: ResNet-50's padding and ceil-rounded pooling give a 197-px
    box, but it classifies 224-px images, and a 224-px image is one cell.
    None on an axis where the declared input gives several cells (an FCN
    written for large images): the layers' box is used there.
    """
    declared = input_shapes(net)
    if not declared:
        return None, None
    shape = next(iter(declared.values()))
    if len(shape) != 4:
        return None, None
    h, w = size or shape[2:]
    try:
        rows, cols = map_size(net, h, w, blob)
    except (NetDefinitionError, KeyError):
        return None, None
    return (h if rows == 1 else None), (w if cols == 1 else None)


def with_window(geo: MapGeometry, window: tuple[int | None, int | None]) -> MapGeometry:
    """`geo` with the windows set to (height, width) where given, starting where they did."""
    def axis(a: AxisGeometry, size: int | None) -> AxisGeometry:
        return a if size is None else replace(a, box_hi=a.box_lo + size - 1)
    return MapGeometry(geo.blob, axis(geo.y, window[0]), axis(geo.x, window[1]))


def smallest_input(net, blob: str | None = None, limit: int = 1 << 14) -> tuple[int, int]:
    """Smallest (H, W) that Caffe accepts and that yields at least one cell of `blob`.

    With ceil-rounded pooling this can be below the field: the last windows
    then hang over the image edge.
    """
    name, base = image_input(net)
    blob = blob or output_blobs(net)[-1]

    def ok(h: int, w: int) -> bool:
        try:
            shape = infer(net, {name: base[:-2] + (h, w)}).blobs[blob]
        except NetDefinitionError:
            return False
        return len(shape) == 4 and shape[2] >= 1 and shape[3] >= 1

    result = []
    for axis in (0, 1):
        lo, hi = 1, limit
        other = base[-1] if axis == 0 else base[-2]
        probe = (lambda n: ok(n, other)) if axis == 0 else (lambda n: ok(other, n))
        if not probe(hi):
            raise NetDefinitionError(f"no input up to {limit} px yields a map")
        while lo < hi:
            mid = (lo + hi) // 2
            if probe(mid):
                hi = mid
            else:
                lo = mid + 1
        result.append(lo)
    return result[0], result[1]


def map_size(net, height: int, width: int, blob: str | None = None) -> tuple[int, int]:
    """(rows, cols) of the map for an input of height x width."""
    name, declared = image_input(net)
    blob = blob or output_blobs(net)[-1]
    shape = infer_any_size(net, {name: declared[:-2] + (height, width)}).blobs[blob]
    return shape[-2], shape[-1]
