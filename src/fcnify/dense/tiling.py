"""Cut a large image into tiles whose stitched maps equal the whole-image map exactly.

A map cell depends on the input pixels within its reach (receptive field with
padding, see geometry.py). Computed inside a tile, a cell is exact when its
reach lies inside the tile, or when the part outside is also outside the
image (the tile edge is the image edge, so zero padding and pooling's edge
rounding happen the same way). Tile origins lie on the map's stride grid, so
every intermediate layer's grid lines up with the whole image's. Each tile
then contributes the cells it computes exactly, and neighbouring tiles
overlap by the reach's margin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..caffe.geometry import AxisGeometry


@dataclass(frozen=True)
class Span:
    """One tile along one axis: input pixels [start, stop) give map cells [first, last]."""

    start: int
    stop: int
    first: int  # first kept cell, whole-map index
    last: int   # last kept cell, whole-map index (inclusive)
    offset: int  # whole-map index of the tile's own cell 0

    @property
    def size(self) -> int:
        return self.stop - self.start


OVERLAP_WARNING = 2.0  # forced tiles that compute this many times the image's pixels are worth a word


def overlap_cost(tiles: "list[Tile]", height: int, width: int) -> float:
    """Pixels the tiles run through the net, per pixel of the image (1.0: no overlap).

    Tiles overlap by each cell's reach; when tiles are little larger than the
    reach, most of every tile is overlap, and the run's time grows with this.
    """
    return sum(t.shape[0] * t.shape[1] for t in tiles) / float(height * width)


def overlap_warning(tiles: "list[Tile]", height: int, width: int, tile: int) -> str | None:
    """A sentence for forced tiles so small that their overlap dominates, else None."""
    cost = overlap_cost(tiles, height, width)
    if len(tiles) < 2 or cost < OVERLAP_WARNING:
        return None
    return (f"--tile {tile} cuts this {height}x{width} px input into {len(tiles)} tiles that "
            f"overlap so much they compute {cost:.1f}x its pixels: expect roughly {cost:.0f}x "
            "the time of larger tiles; leave --tile out to let fcnify choose")


@dataclass(frozen=True)
class Tile:
    """A rectangle of the image and the block of map cells it contributes."""

    y: Span
    x: Span

    @property
    def shape(self) -> tuple[int, int]:
        return self.y.size, self.x.size

    @property
    def cells(self) -> tuple[slice, slice, slice]:
        """Where the tile's block goes in the whole map (channels x rows x cols): the one stitch."""
        return slice(None), slice(self.y.first, self.y.last + 1), slice(self.x.first, self.x.last + 1)


def plan_axis(length: int, cells: int, tile: int, axis: AxisGeometry, cells_for) -> list[Span]:
    """Spans covering `cells` map cells of an axis of `length` px with tiles of `tile` px.

    `cells_for(n)` is the number of map cells an n-px input gives (Caffe's rounding).
    """
    s = axis.stride
    if tile >= length:
        return [Span(0, length, 0, cells - 1, 0)]
    lead = math.ceil(max(0, -axis.reach_lo) / s)  # cells lost at a tile's inner start
    spans: list[Span] = []
    nxt = 0
    while nxt < cells:
        start = max(0, (nxt - lead) * s)
        stop = min(length, start + tile)
        offset = start // s
        local = cells_for(stop - start)
        if stop == length:
            last = cells - 1
        else:
            # last local cell whose reach ends inside the tile
            k = (stop - start - 1 - axis.reach_hi) // s
            last = offset + min(k, local - 1)
        if last < nxt:
            raise ValueError(f"tiles of {tile} px are too small for a reach of {axis.reach} px "
                             f"at stride {s}")
        spans.append(Span(start, stop, nxt, last, offset))
        nxt = last + 1
    return spans


def min_tile(axis: AxisGeometry) -> int:
    """Smallest tile that still yields at least one exact cell away from the image edges."""
    lead = math.ceil(max(0, -axis.reach_lo) / axis.stride)
    return lead * axis.stride + axis.reach_hi + 1


def plan(height: int, width: int, rows: int, cols: int, tile: tuple[int, int],
         gy: AxisGeometry, gx: AxisGeometry, cells_for_y, cells_for_x) -> list[Tile]:
    """All tiles, grouped by shape so the net is reshaped once per distinct tile size."""
    ys = plan_axis(height, rows, tile[0], gy, cells_for_y)
    xs = plan_axis(width, cols, tile[1], gx, cells_for_x)
    tiles = [Tile(y, x) for y in ys for x in xs]
    return sorted(tiles, key=lambda t: (t.shape, t.y.start, t.x.start))


def chunk_axis(length: int, cells: int, chunk: int, axis: AxisGeometry, cells_for) -> list[Span]:
    """Spans whose kept cells are the fixed blocks [k*chunk, (k+1)*chunk): a chunked store's chunks.

    Each span starts on the stride grid `lead` cells before its block (the
    cells a tile loses at its inner start) and stops where the block's last
    cell's reach ends, or at the image's edge, so every kept cell is exact
    as in plan_axis.
    """
    s = axis.stride
    lead = math.ceil(max(0, -axis.reach_lo) / s)
    spans = []
    for first in range(0, cells, chunk):
        last = min(cells, first + chunk) - 1
        start = max(0, (first - lead) * s)
        offset = start // s
        stop = min(length, start + (last - offset) * s + axis.reach_hi + 1)
        while stop < length and cells_for(stop - start) - 1 < last - offset:  # Caffe's rounding
            stop = min(length, stop + s)
        spans.append(Span(start, stop, first, last, offset))
    return spans


def chunk_cells(tile: int, axis: AxisGeometry) -> int:
    """Cells per chunk along an axis so that a chunk's tile is at most `tile` px (at least one)."""
    lead = math.ceil(max(0, -axis.reach_lo) / axis.stride)
    return max(1, (tile - axis.reach_hi - 1) // axis.stride - lead + 1)


def plan_chunks(height: int, width: int, rows: int, cols: int, chunk: tuple[int, int],
                gy: AxisGeometry, gx: AxisGeometry, cells_for_y, cells_for_x) -> list[Tile]:
    """Tiles, one per chunk of chunk[0] x chunk[1] cells, in row-major chunk order."""
    ys = chunk_axis(height, rows, chunk[0], gy, cells_for_y)
    xs = chunk_axis(width, cols, chunk[1], gx, cells_for_x)
    return [Tile(y, x) for y in ys for x in xs]
