"""Maps finer than the net's stride: à trous rewriting, then shift-and-stitch for the rest.

A net of stride N puts a window every N px. For a finer stride S (a divisor
of N) there are two ways to get the windows in between:

- **à trous** ("filter rarefaction", DeepLab/FCN): the last layer that
  strides (CaffeNet: pool5, stride 2) is set to stride 1 and every
  convolution after it is dilated (and its padding scaled) by the same
  factor g. One pass then gives stride N/g, and everything below that layer
  (conv1-conv5 for CaffeNet) is computed once, not once per offset. It needs
  only layers Caffe can dilate after the rewritten one: convolutions and
  channel-wise layers, no spatial pooling.
- **shift-and-stitch** (OverFeat): the (rewritten) net runs on the image
  shifted by each sub-stride offset (dy, dx), and the maps are interleaved.
  It works for any net but costs one pass per offset.

fcnify rewrites à trous as far as the net allows and shift-and-stitches the
remaining factor. Cell (r, c) of the stride-S map is the window at
(r*S, c*S) + offset, as in the stride-N map. The two differ only where the
padding of an intermediate layer reaches a cell: à trous sees the real
pixels above and left of a shifted window (as the stride-N map of the whole
image does for its cells), shift-and-stitch sees the zero padding at the
shifted image's edge. For a net without padding (LeNet) both equal the
original classifier on the crop at that place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError, NetDefinitionError
from ..caffe.geometry import AxisGeometry, MapGeometry
from ..caffe.layers import CHANNEL_WISE
from ..caffe.shapes import conv_geometry



@dataclass(frozen=True)
class StridePlan:
    """How a stride-S map is made from a stride-N net: g by à trous times `shifts` by stitching."""

    net_stride: int   # N, the converted net's own stride
    stride: int       # S, asked for
    atrous: int       # g: factor gained by rewriting `layer` (1: no rewrite)
    layer: str | None  # the layer whose stride was divided by g
    shifts: int       # offsets per axis that are run and interleaved (1: none)

    @property
    def method(self) -> str:
        """In words, for the run summary and the JSON."""
        if self.atrous > 1 and self.shifts > 1:
            return (f"à trous ({self.layer} stride / {self.atrous}, later convolutions dilated) "
                    f"+ shift-and-stitch ({self.shifts}x{self.shifts} offsets)")
        if self.atrous > 1:
            return f"à trous ({self.layer} stride / {self.atrous}, later convolutions dilated)"
        if self.shifts > 1:
            return f"shift-and-stitch ({self.shifts}x{self.shifts} offsets)"
        return "the net's own stride"

    def to_dict(self) -> dict:
        return {"net_stride": self.net_stride, "stride": self.stride, "method": self.method,
                "atrous_factor": self.atrous, "atrous_layer": self.layer,
                "shift_offsets_per_axis": self.shifts}


def _stride_of(layer) -> tuple[int, int] | None:
    """(sy, sx) of a convolution or pooling layer; None for any other layer."""
    if layer.type == "Convolution":
        _, stride, _, _ = conv_geometry(layer.convolution_param, 2)
        return stride[0], stride[1]
    if layer.type == "Pooling":
        p = layer.pooling_param
        if p.HasField("stride_h") or p.HasField("stride_w"):
            return p.stride_h or 1, p.stride_w or 1
        return p.stride, p.stride
    return None


def _dilatable(layer) -> bool:
    """Whether a layer after the rewritten one can follow it onto the finer grid exactly."""
    if layer.type == "LRN":  # across channels it is per position; within a channel it is not
        return layer.lrn_param.norm_region == layer.lrn_param.ACROSS_CHANNELS
    if layer.type == "MVN":  # normalises over the whole map
        return False
    if layer.type in CHANNEL_WISE:
        return True
    if layer.type == "Convolution":
        return _stride_of(layer) == (1, 1)
    if layer.type == "Pooling":  # Caffe cannot dilate pooling: only a 1x1 window follows
        p = layer.pooling_param
        k = (p.kernel_h, p.kernel_w) if p.HasField("kernel_h") else (p.kernel_size, p.kernel_size)
        return k == (1, 1) and not p.global_pooling and _stride_of(layer) == (1, 1)
    return False


def plan_stride(net, net_stride: tuple[int, int], stride: int, *, atrous: bool = True,
                path: Path | None = None) -> StridePlan:
    """How to make a stride-`stride` map; InputError when it does not divide the net's stride."""
    ny, nx = net_stride
    if ny != nx:
        raise InputError(f"--stride: the net strides {ny} px down and {nx} px across; "
                         "finer strides need a square stride", path)
    if stride < 1 or ny % stride:
        divisors = [d for d in range(1, ny + 1) if ny % d == 0]
        raise InputError(f"--stride {stride} does not divide the net's stride of {ny} px "
                         f"(choose one of {', '.join(map(str, divisors))})", path)
    factor = ny // stride
    g, name = 1, None
    if atrous and factor > 1:
        g, name = _atrous_factor(net, factor)
    return StridePlan(ny, stride, g, name, factor // g)


def check_stride(model_def: Path, stride: int) -> None:
    """Refuse a stride that cannot divide the net's before anything runs (even an unconverted net).

    The stride of the spatial blobs before any InnerProduct is the stride of
    the converted net: the converted layers are 1-stride convolutions.
    """
    from ..caffe.geometry import blob_geometry
    from ..caffe.netdef import read_netdef
    net = read_netdef(model_def).param
    strides = [g.stride for g in blob_geometry(net, path=model_def).values()]
    n = max(strides, default=(1, 1))
    plan_stride(net, n, stride, atrous=False, path=model_def)


def _atrous_factor(net, factor: int) -> tuple[int, str | None]:
    """The factor à trous can take off the last striding layer, and that layer's name."""
    layers = list(net.layer)
    for i in range(len(layers) - 1, -1, -1):
        s = _stride_of(layers[i])
        if s is None or s == (1, 1):
            continue
        if s[0] != s[1] or not all(_dilatable(later) for later in layers[i + 1:]):
            return 1, None
        g = math.gcd(s[0], factor)
        return (g, layers[i].name) if g > 1 else (1, None)
    return 1, None


def rewrite_atrous(net, plan: StridePlan):
    """A copy of the net with `plan.layer`'s stride divided by g and later convolutions dilated.

    Weights keep their shapes (dilation spreads a kernel, it adds no
    parameters), so the same .caffemodel loads into the rewritten net.
    """
    out = type(net)()
    out.CopyFrom(net)
    g = plan.atrous
    seen = False
    for layer in out.layer:
        if layer.name == plan.layer:
            seen = True
            sy, sx = _stride_of(layer)
            _set_stride(layer, sy // g, sx // g)
        elif seen and layer.type == "Convolution":
            p = layer.convolution_param
            _, _, pad, dilation = conv_geometry(p, 2)
            del p.dilation[:]
            p.dilation.extend([dilation[0] * g] if dilation[0] == dilation[1] else
                              [dilation[0] * g, dilation[1] * g])
            del p.pad[:]
            p.ClearField("pad_h")
            p.ClearField("pad_w")
            if pad[0] == pad[1]:
                p.pad.append(pad[0] * g)
            else:
                p.pad_h, p.pad_w = pad[0] * g, pad[1] * g
    return out


def fit_declared_input(net, blob: str) -> None:
    """Declare (in place) an input at least as large as the smallest one giving a cell of `blob`.

    A rewrite can need a larger input than the original declares: CIFAR-10
    quick's last pooling rounds up, so at 32x32 its last window hangs over
    the edge; at stride 1 it cannot, and the dilated classifier no longer fits
    in 32 px. Caffe loads the net at its declared size, so that must fit.
    """
    from ..caffe.geometry import smallest_input
    from ..caffe.shapes import infer
    dims = next(layer for layer in net.layer if layer.type == "Input").input_param.shape[0].dim
    declared = dims[2], dims[3]
    while dims[2] < 1 << 14:  # smallest_input searches each axis with the other as declared
        try:
            infer(net)
            break
        except NetDefinitionError:
            dims[2], dims[3] = 2 * dims[2], 2 * dims[3]
    need = smallest_input(net, blob)
    dims[2], dims[3] = max(declared[0], need[0]), max(declared[1], need[1])


def _set_stride(layer, sy: int, sx: int) -> None:
    if layer.type == "Pooling":
        p = layer.pooling_param
        p.ClearField("stride")
        p.ClearField("stride_h")
        p.ClearField("stride_w")
        if sy == sx:
            p.stride = sy
        else:
            p.stride_h, p.stride_w = sy, sx
    else:
        p = layer.convolution_param
        del p.stride[:]
        p.ClearField("stride_h")
        p.ClearField("stride_w")
        if sy == sx:
            p.stride.append(sy)
        else:
            p.stride_h, p.stride_w = sy, sx


def stitched_geometry(grid: MapGeometry, shifts: int) -> MapGeometry:
    """The grid net's geometry with its stride divided by the number of offsets per axis."""
    def axis(a: AxisGeometry) -> AxisGeometry:
        return replace(a, stride=a.stride // shifts)
    return MapGeometry(grid.blob, axis(grid.y), axis(grid.x))


def offsets(plan: StridePlan, grid_stride: int) -> list[int]:
    """Pixel offsets along one axis that shift-and-stitch runs: 0, S, 2S, ..."""
    step = grid_stride // plan.shifts
    return [i * step for i in range(plan.shifts)]


def stitched_cells(length: int, shifts: int, step: int, cells_for: Callable[[int], int]) -> int:
    """Cells along an axis of the stitched map: the first cell some offset's run lacks ends it.

    A shifted image too small for the net gives no cells (its run is skipped).
    """
    def count(n: int) -> int:
        try:
            return cells_for(n) if n > 0 else 0
        except NetDefinitionError:
            return 0
    counts = [count(length - i * step) for i in range(shifts)]
    n = 0
    while n // shifts < counts[n % shifts]:
        n += 1
    return n


def shift_and_stitch(run_grid, rgb: np.ndarray, shifts: int, step: int,
                     cells_for: Callable[[int, int], tuple[int, int]],
                     num_classes: int) -> tuple[np.ndarray, dict]:
    """Run `run_grid` on the image shifted by each (dy, dx) and interleave the maps.

    Cell (r, c) of the result is cell (r // f, c // f) of the run shifted by
    ((r % f) * step, (c % f) * step): the window at (r*step, c*step).
    """
    h, w = rgb.shape[:2]
    rows = stitched_cells(h, shifts, step, lambda n: cells_for(n, w)[0])
    cols = stitched_cells(w, shifts, step, lambda n: cells_for(h, n)[1])
    if rows == 0 or cols == 0:
        raise InputError(f"the image ({h}x{w} px, height x width) is too small for one cell "
                         "at a finer stride")
    out = np.empty((num_classes, rows, cols), dtype=np.float32)
    info: dict = {"preprocess": 0.0, "forward": 0.0, "tiles": 0, "mode": "whole", "tile_size": None,
                  "heads": {}}
    for i in range(shifts):
        for j in range(shifts):
            want_r, want_c = len(range(i, rows, shifts)), len(range(j, cols, shifts))
            if want_r == 0 or want_c == 0:  # this offset's image is too small for the net
                continue
            part, run = run_grid(rgb[i * step:, j * step:])
            out[:, i::shifts, j::shifts] = part[:, :want_r, :want_c]
            for name, head in run.get("heads", {}).items():  # the net's other outputs, stitched alike
                into = info["heads"].setdefault(name, np.empty((head.shape[0], rows, cols), np.float32))
                into[:, i::shifts, j::shifts] = head[:, :want_r, :want_c]
            for key in ("preprocess", "forward", "tiles"):
                info[key] += run[key]
            if run["mode"] == "tiled":
                info["mode"], info["tile_size"] = "tiled", run["tile_size"]
    return out, info
