"""Dense inference: a fully-convolutional net over a whole image, at its own resolution.

`DenseModel` holds a loaded net with its card and geometry and maps any
number of images; `classify_map` is the one-call version. Whole-image and
tiled runs share one code path (the whole image is a single tile), so both
give the same map; the planner picks the tile size from the memory budget.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..caffe.caffemodel import read_weights
from ..errors import ImageError, InputError, ResourceError
from ..files import ScratchDir
from ..caffe.geometry import (MapGeometry, SoftmaxPlan, hw, map_geometry, map_size, output_blobs,
                              score_blob, softmax_plan)
from ..io.images import load_image, resize
from ..io.windows import open_windows, windowed
from ..io.labels import Labels
from ..engines import DEFAULT_ENGINE, check_layer_types, make_engine
from ..io.models import ModelCard
from ..io.outputs import head_file_name
from ..caffe.netdef import read_netdef
from ..caffe.planner import HEADROOM, SPEED_CAP, default_budget, fits, format_bytes, largest_square
from ..io.preprocess import Preprocess
from ..resolve import resolve_card
from ..caffe.shapes import image_input, infer, infer_partial
from .tiling import Tile, min_tile, overlap_warning, plan
from ..surgery.transplant import check_weights

Progress = Callable[[int, int], None]
TileBlocks = tuple[np.ndarray, dict[str, np.ndarray]]  # a tile's class block, {other head: its block}


@dataclass
class DenseMap:
    """A classification map over one image, and how to read it."""

    probs: np.ndarray  # classes x rows x cols, float32: probabilities, or raw scores (see softmax)
    geometry: MapGeometry
    image_size: tuple[int, int]  # original image (height, width)
    input_size: tuple[int, int]  # what the net saw, after --size/--scale
    model: ModelCard
    labels: Labels | None = None
    image_path: Path | None = None
    mode: str = "whole"
    tiles: int = 1
    tile_size: tuple[int, int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    image: np.ndarray | None = None  # original pixels, kept for the pictures
    source: ModelCard | None = None  # the unconverted model, when converted in memory
    output: str | None = None  # the output blob that is the class map
    heads: dict[str, np.ndarray] = field(default_factory=dict)  # other outputs: blob -> C x rows x cols
    stride_plan: dict | None = None  # how a --stride finer than the net's was made (stride.py)
    softmax: SoftmaxPlan | None = None  # whether `probs` are probabilities, and who made them
    engine: str | None = None  # the engine that ran it (`auto` already resolved)
    precision: str = "f32"  # the engine's arithmetic: f32, or bf16 (--precision; not "equal")
    batch: int = 1  # images in the forward pass that mapped it (--batch; `forward` is its share)

    @property
    def shape(self) -> tuple[int, int]:
        return self.probs.shape[1], self.probs.shape[2]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[0]

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): net-input pixels per original pixel."""
        return (self.input_size[0] / self.image_size[0], self.input_size[1] / self.image_size[1])

    def box(self, row: int, col: int, clip: bool = True) -> tuple[float, float, float, float]:
        """Cell's window -> (x0, y0, x1, y1) in original-image pixels (x1, y1 exclusive)."""
        return self._in_image(self.geometry.box(row, col), clip=clip)

    def reach(self, row: int, col: int, clip: bool = True) -> tuple[float, float, float, float]:
        """Cell's reach, every pixel that can change it -> (x0, y0, x1, y1) in original-image pixels."""
        return self._in_image(self.geometry.reach_box(row, col), clip=clip)

    def _in_image(self, net_box: tuple[int, int, int, int], *,
                  clip: bool) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = net_box
        sy, sx = self.scale
        box = (x0 / sx, y0 / sy, x1 / sx, y1 / sy)
        if clip:
            h, w = self.image_size
            box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
        return box

    def center(self, row: int, col: int) -> tuple[float, float]:
        """Cell centre (x, y) in original-image pixels (of the unclipped field)."""
        x0, y0, x1, y1 = self.box(row, col, clip=False)
        return (x0 + x1) / 2, (y0 + y1) / 2

    def argmax(self) -> np.ndarray:
        """Winning class per cell, a row at a time: numpy's argmax over axis 0 copies the whole map."""
        out = np.empty(self.shape, dtype=np.intp)
        for r in range(self.shape[0]):
            out[r] = self.probs[:, r, :].argmax(axis=0)
        return out

    def label(self, cls: int) -> str:
        return self.labels.names[cls] if self.labels else str(cls)

    def short(self, cls: int) -> str:
        return self.labels.short(cls) if self.labels else str(cls)

    def top_k(self, row: int, col: int, k: int = 5) -> list[tuple[int, float]]:
        p = self.probs[:, row, col]
        order = np.argsort(-p, kind="stable")[:k]
        return [(int(c), float(p[c])) for c in order]

    def class_ranking(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(classes in rank order, cells won per class, peak probability per class).

        Ranked by cells won, then by peak probability, then by class index;
        whole-map reductions, one numpy call each: a batch asks for this
        several times per image (text, JSON, both pictures).
        """
        flat = self.probs.reshape(self.num_classes, -1)
        won = np.bincount(self.argmax().ravel(), minlength=self.num_classes)
        peak = flat.max(axis=1)
        return np.lexsort((np.arange(self.num_classes), -peak, -won)), won, peak

    def top_classes(self, k: int = 5) -> list[dict]:
        """The k classes that win the most cells (then by peak), with their cells, peak and mean."""
        order, won, peak = self.class_ranking()
        order = order[:k]
        mean = self.probs.reshape(self.num_classes, -1)[order].mean(axis=1)
        return [{"class": int(c), "label": self.label(int(c)), "cells": int(won[c]),
                 "max_prob": float(peak[c]), "mean_prob": float(m)} for c, m in zip(order, mean)]

    def classes_present(self) -> list[int]:
        """The classes that win at least one cell, in rank order (class_ranking)."""
        order, won, _ = self.class_ranking()
        return [int(c) for c in order if won[c] > 0]

    def default_class(self) -> int:
        """The class to draw when none is asked for: the top one that is not background."""
        order, _, _ = self.class_ranking()
        return next((int(c) for c in order if c != self.model.background_class), 0)

    def to_json(self, top_k: int = 5, command: str | None = None, cells: bool = False) -> dict:
        """The map's metadata and geometry as a JSON document; with `cells`, the per-cell list too.

        Without it the document is a few kB for any map: every cell's window
        follows from `map.cell_window_image_px`, its top-k are in .npy files.
        """
        from ..io.outputs import cell_rows
        rows, cols = self.shape
        g = self.geometry
        shown = self.source or self.model  # the user's files, not a temporary conversion
        return {
            "image": str(self.image_path) if self.image_path else None,
            "image_size": {"height": self.image_size[0], "width": self.image_size[1]},
            "input_size": {"height": self.input_size[0], "width": self.input_size[1]},
            "scale": {"y": self.scale[0], "x": self.scale[1]},
            "command": command,
            "model": {**self.model.summary(), "name": shown.name, "model_def": str(shown.model_def),
                      "weights": str(shown.weights) if shown.weights else None,
                      "converted_in_memory": self.source is not None},
            "map": {"rows": rows, "cols": cols, "classes": self.num_classes,
                    "stride_px": list(g.stride), "window_px": list(g.window),
                    "field_px": list(g.window),  # the window's old name
                    "offset_px": list(g.offset),
                    "reach_px": list(g.reach),
                    "reach_offset_px": [g.y.reach_lo, g.x.reach_lo],
                    "output": self.output,
                    "softmax": self.softmax.to_dict() if self.softmax else None,
                    "cell_window_image_px": self.window_formula(),
                    "note": "all (y, x) in net-input pixels. The window of cell (row, col) is the "
                            "crop the original classifier would be given for it: x in "
                            "[col*stride_x + offset_x, +window_x), y likewise; "
                            "cell_window_image_px gives it in original-image pixels (clip it to "
                            "the image for the part inside). The reach is every pixel that can change the cell (padding "
                            "included, so pixels outside the window can): x in "
                            "[col*stride_x + reach_offset_x, +reach_x), y likewise."},
            "heads": {name: {"file": head_file_name(name), "channels": int(a.shape[0]),
                             "rows": int(a.shape[1]), "cols": int(a.shape[2]),
                             "geometry": "the class map's: same cells, windows and stride"}
                      for name, a in self.heads.items()},
            "run": {"mode": self.mode, "tiles": self.tiles, "engine": self.engine,
                    "precision": self.precision, "batch": self.batch,
                    "tile_size": list(self.tile_size) if self.tile_size else None,
                    "seconds": {k: round(v, 4) for k, v in self.timings.items()}},
            "top_classes": self.top_classes(top_k),
            **({"cells": [cell for row in cell_rows(self, top_k) for cell in row]} if cells else {}),
            **({"stride": self.stride_plan} if self.stride_plan else {}),
        }

    def window_formula(self) -> dict:
        """Cell (row, col)'s window in original-image pixels, as numbers: x0 = x_first + col * x_step,
        x1 = x0 + width (exclusive), y likewise; the per-cell list's 'window', without the list."""
        g, (sy, sx) = self.geometry, self.scale
        return {"x_first": g.x.box_lo / sx, "x_step": g.x.stride / sx, "width": g.x.window / sx,
                "y_first": g.y.box_lo / sy, "y_step": g.y.stride / sy, "height": g.y.window / sy}

    def save(self, out_dir: str | Path, name: str | None = None, cls: int | None = None,
             top_k: int = 5, command: str | None = None, *, force: bool = False,
             heat_scale: str = "unit", save=None) -> list[Path]:
        """Write the files `save` names (outputs.SAVE_ITEMS; default outputs.DEFAULT_SAVE): NAME.scores.npy,
        NAME.topk_classes.npy, NAME.topk_probs.npy, NAME.map.json, NAME.heatmap.png, NAME.argmax.png.

        The heatmap's colours span 0-1 ("unit"), or the class's own range ("map", said in its title).
        """
        from ..io.outputs import DEFAULT_SAVE, save_outputs
        return save_outputs(self, Path(out_dir), name, cls, top_k, command, force=force,
                            heat_scale=heat_scale, save=DEFAULT_SAVE if save is None else frozenset(save))


def softmax(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    z = scores - scores.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


class DenseModel:
    """A fully-convolutional net loaded once and reshaped per image or tile.

    `card` is a ModelCard (resolve.resolve_card's, for explicit settings over
    the card's), or a shipped model's name or a card's path, resolved as is.
    """

    def __init__(self, card: ModelCard | str | Path, *, runner=None, engine: str = DEFAULT_ENGINE,
                 gpu: int | None = None, verbose: bool = False, check: bool = True,
                 output: str | None = None, stride: int | None = None, atrous: bool = True,
                 softmax: bool | None = None, precision: str = "f32") -> None:
        if not isinstance(card, ModelCard):
            card = resolve_card(card)
        self.runner = runner if runner is not None else make_engine(engine, gpu, verbose=verbose,
                                                                    precision=precision)
        # called with a sentence about a costly choice before the work (the CLI prints it)
        self.warn: Callable[[str], None] | None = None
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}  # _map_size's
        self._estimates: dict[tuple[int, int], object] = {}  # _estimate's
        self._workdir: ScratchDir | None = None  # an in-memory conversion's files
        self._strided: ScratchDir | None = None  # an à trous rewrite's prototxt
        converted = not card.fully_convolutional  # then fcnify wrote (and checked) the weights
        if stride is not None:  # before any conversion runs Caffe
            from .stride import check_stride
            check_stride(card.model_def, stride)
        if converted:
            self.source: ModelCard | None = card
            card = self._convert(card, self.runner, check=check)
        else:
            self.source = None
        self.card = card
        self.netdef = read_netdef(card.model_def)
        net = self.netdef.param
        self.input_blob, declared = image_input(net, card.model_def)
        self.channels = declared[1]
        if self.channels != card.preprocess.num_channels:
            raise InputError(f"the net takes {self.channels} channel(s), its preprocessing gives "
                             f"{card.preprocess.num_channels}", card.model_def)
        self.output_blob = pick_output(net, output, (self.source or card).model_def)
        self.score_blob = score_blob(net, self.output_blob)
        # softmax: None keeps the card's setting (--softmax auto)
        self.softmax = softmax_plan(net, self.output_blob, card.softmax if softmax is None else softmax)
        self.transposed = card.preprocess.transpose
        self.net_geometry = map_geometry(net, self.score_blob, path=card.model_def,
                                         classifier_input=classifier_input(card))
        g = self.net_geometry  # in the net's orientation; self.geometry in the image's
        self.geometry = MapGeometry(g.blob, g.x, g.y) if self.transposed else g
        self.stride_plan = None
        self.grid_geometry = self.geometry  # one pass of the net; differs when shift-and-stitched
        if stride is not None:  # a finer map: see stride.py
            card, net = self._finer(card, net, stride, atrous=atrous)
        shapes = infer(net, path=card.model_def)
        self.heads, self.unmapped_heads = other_heads(net, self.output_blob, card.model_def)
        if not converted:  # fcnify did not write this net and its weights: check what Caffe would
            check_layer_types(net, self.runner.layer_types(), card.model_def, self.runner.name)
            # an engine that checks the weights as it reads them spares a second read (233 MB for CaffeNet)
            if card.weights is not None and not getattr(self.runner, "checks_weights", False):
                check_weights(shapes, read_weights(card.weights), card.model_def)
        self.num_classes = shapes.blobs[self.score_blob][1]
        self.labels = card.load_labels(self.num_classes)
        self.minimum = self._minimum(declared if stride is None else image_input(net)[1])
        t0 = time.perf_counter()
        self.net = self.runner.load(card.model_def, card.weights)
        self.load_seconds = time.perf_counter() - t0

    def _convert(self, card: ModelCard, runner, *, check: bool) -> ModelCard:
        """Convert an unconverted net in memory, checked on the engine that will run it.

        The converted files live in a temporary folder removed by close() (or
        when the model is garbage-collected, or by the next run if this
        process is killed: files.ScratchDir): CaffeNet's weights are 233 MB.
        """
        from ..convert import convert_in_memory
        self._workdir = ScratchDir("convert")
        if getattr(runner, "precision", "f32") != "f32":  # equivalence is a float32 question
            runner = make_engine(runner.name, getattr(runner, "gpu", None))
        result, proto, model = convert_in_memory(card.model_def, card.weights, card=card, runner=runner,
                                                 check=check, workdir=Path(self._workdir.name))
        return replace(card, model_def=proto, weights=model, fully_convolutional=True)

    def _finer(self, card: ModelCard, net, stride: int, *, atrous: bool):
        """Rewrite the net à trous as far as it allows; shift-and-stitch does the rest in run()."""
        from ..caffe.geometry import blob_geometry, with_window
        from ..caffe.netdef import NetDef, to_text
        from .stride import fit_declared_input, plan_stride, rewrite_atrous, stitched_geometry
        shown = (self.source or card).model_def  # errors name the user's file, never a temporary one
        self.stride_plan = plan = plan_stride(net, self.geometry.stride, stride, atrous=atrous,
                                              path=shown)
        if plan.atrous > 1:
            net = rewrite_atrous(net, plan)
            fit_declared_input(net, self.score_blob)
            self._strided = ScratchDir("stride")
            path = Path(self._strided.name) / f"{Path(card.model_def).stem}_stride{stride}.prototxt"
            path.write_text(to_text(net))
            card = replace(card, model_def=path)
            self.netdef = NetDef(net, Path(shown))
        # à trous keeps every window (dilation spreads the later kernels over the finer grid)
        g = self.net_geometry = with_window(blob_geometry(net, path=shown)[self.score_blob],
                                            self.net_geometry.window)
        self.grid_geometry = MapGeometry(g.blob, g.x, g.y) if self.transposed else g
        self.geometry = stitched_geometry(self.grid_geometry, plan.shifts)
        return card, net

    @property
    def shifts(self) -> int:
        return self.stride_plan.shifts if self.stride_plan else 1

    def _minimum(self, declared) -> tuple[int, int]:
        """Smallest image: one window, or the net's declared input if that is smaller.

        An à trous rewrite declares the smallest input it needs (stride.fit_declared_input),
        which can exceed a window: that one is the minimum.
        """
        fy, fx = self.net_geometry.window
        h, w = min(fy, declared[2]), min(fx, declared[3])
        if self.stride_plan is not None and self.stride_plan.atrous > 1:
            h, w = declared[2], declared[3]
        return (w, h) if self.transposed else (h, w)

    def cells(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the map of a height x width image, in the image's orientation."""
        if self.transposed:
            cols, rows = self._map_size(width, height)
            return rows, cols
        return self._map_size(height, width)

    def _map_size(self, height: int, width: int) -> tuple[int, int]:
        """map_size of the net's input height x width, remembered: a batch of same-sized images
        would otherwise infer every layer's shape several times per image."""
        key = (height, width)
        if key not in self._sizes:
            self._sizes[key] = map_size(self.netdef.param, height, width, self.score_blob)
        return self._sizes[key]

    def map_cells(self, height: int, width: int) -> tuple[int, int]:
        if self.shifts == 1:
            return self.cells(height, width)
        from .stride import stitched_cells
        step = self.geometry.stride[0]
        return (stitched_cells(height, self.shifts, step, lambda n: self.cells(n, width)[0]),
                stitched_cells(width, self.shifts, step, lambda n: self.cells(height, n)[1]))

    def plan(self, height: int, width: int, budget: int | None = None,
             tile: int | None = None, reader=None) -> tuple[list[Tile], tuple[int, int] | None]:
        """Tiles for an image (in its own orientation): one whole-image tile when it fits the budget.

        With a windowed `reader` (io.windows), each tile's budget also holds the reader's buffers.
        """
        if not self.transposed:
            return self._plan_net(height, width, budget, tile, reader)
        tiles, size = self._plan_net(width, height, budget, tile, reader)
        return ([Tile(t.x, t.y) for t in tiles], None if size is None else (size[1], size[0]))

    def _plan_net(self, height: int, width: int, budget: int | None = None,
                  tile: int | None = None, reader=None) -> tuple[list[Tile], tuple[int, int] | None]:
        """Tiles for an input as the net sees it."""
        net = self.netdef.param
        memory = self._memory(reader)
        rows, cols = self._map_size(height, width)
        gy, gx = self.net_geometry.y, self.net_geometry.x
        fy = lambda n: map_size(net, n, width, self.score_blob)[0]  # noqa: E731
        fx = lambda n: map_size(net, height, n, self.score_blob)[1]  # noqa: E731
        if tile is None:
            budget = budget or default_budget()
            if fits(net, height, width, budget, memory=memory):
                return plan(height, width, rows, cols, (height, width), gy, gx, fy, fx), None
            smallest = max(min_tile(gy), min_tile(gx))
            step, limit = max(gy.stride, gx.stride), max(height, width)
            side = largest_square(net, budget, step, smallest, limit, memory=memory)
            if side is None:  # a net too big per pixel for the speed cap: the budget alone
                side = largest_square(net, budget, step, smallest, limit, speed_cap=None,
                                      memory=memory)
            if side is None:
                need = memory(net, smallest, smallest).total
                raise ResourceError(f"even the smallest exact tile ({smallest} px) needs about "
                                    f"{format_bytes(need)}, over the {format_bytes(int(budget * HEADROOM))} "
                                    f"that a memory budget of {format_bytes(budget)} lets a pass use "
                                    f"({HEADROOM:.0%}: the rest is room for what the allocator keeps); "
                                    "raise --max-memory")
            tile = side
        else:
            smallest = max(min_tile(gy), min_tile(gx))
            if tile < smallest:
                raise InputError(f"--tile {tile} is too small: tiles must be at least {smallest} px "
                                 f"for this net (reach {gy.reach} px, stride {gy.stride})")
        size = (min(tile, height), min(tile, width))
        tiles = plan(height, width, rows, cols, size, gy, gx, fy, fx)
        warning = overlap_warning(tiles, height, width, tile)
        if warning and self.warn is not None:
            self.warn(warning)
        return tiles, (size if len(tiles) > 1 else None)

    def run(self, rgb: np.ndarray, budget: int | None = None, tile: int | None = None,
            progress: Progress | None = None) -> tuple[np.ndarray, dict]:
        """Probabilities (classes x rows x cols) for an 8-bit RGB image; preprocessing per tile.

        A finer --stride than the (rewritten) net's runs it once per offset and
        interleaves the maps.
        """
        return self._run(rgb, budget, tile, progress, self.run_tiles)

    def run_scores(self, rgb: np.ndarray, budget: int | None = None, tile: int | None = None,
                   progress: Progress | None = None) -> tuple[np.ndarray, dict]:
        """The raw scores before Softmax, as run() maps probabilities.

        What tests compare: probabilities saturate and can hide differences.
        """
        return self._run(rgb, budget, tile, progress, self.score_tiles)

    def _run(self, rgb: np.ndarray, budget: int | None, tile: int | None, progress: Progress | None,
             blocks: Callable) -> tuple[np.ndarray, dict]:
        if self.shifts > 1:
            from .stride import shift_and_stitch
            return shift_and_stitch(lambda part: self._run_grid(part, budget, tile, progress, blocks),
                                    rgb, self.shifts, self.geometry.stride[0], self.cells,
                                    self.num_classes)
        return self._run_grid(rgb, budget, tile, progress, blocks)

    def _estimate(self, net, height: int, width: int):
        """The engine's memory model at height x width, remembered per size (as _map_size)."""
        if net is not self.netdef.param:  # another net (a shifted pass): not remembered
            return self.runner.memory(net, height, width)
        key = (height, width)
        if key not in self._estimates:
            self._estimates[key] = self.runner.memory(net, height, width)
        return self._estimates[key]

    def _memory(self, reader) -> Callable:
        """The engine's memory model, plus what this process holds for a tile read from `reader`:
        the reader's buffers, the preprocessed input (written once, into the engine's input: the
        Caffe worker's shared region, mapped here too) and the outputs (the worker's region mapped
        here, and the copy taken out of it).

        An image decoded whole is counted apart (today's bar: budget + image + map); a
        windowed one is not, so its tiles' whole cost must fit the budget.
        """
        if reader is None or isinstance(reader, np.ndarray):
            return self._estimate

        def memory(net, height: int, width: int):
            est = self._estimate(net, height, width)
            inputs = est.inputs or height * width * self.channels * 4
            held = reader.buffer_bytes(height, width) + inputs + 2 * est.outputs
            return replace(est, io=est.io + held)
        return memory

    def _run_grid(self, rgb: np.ndarray, budget: int | None, tile: int | None,
                  progress: Progress | None, blocks: Callable) -> tuple[np.ndarray, dict]:
        """One pass of the net over the image's tiles (`rgb`: an array or an io.windows reader);
        `blocks` is run_tiles or score_tiles."""
        h, w = rgb.shape[:2]
        tiles, tile_size = self.plan(h, w, budget, tile, reader=rgb)
        rows, cols = self.cells(h, w)
        probs = np.empty((self.num_classes, rows, cols), dtype=np.float32)
        heads = {name: np.empty((c, rows, cols), dtype=np.float32) for name, c in self.heads.items()}
        seconds = {"preprocess": 0.0, "forward": 0.0}
        for i, (t, part) in enumerate(blocks(rgb, tiles, seconds=seconds)):
            probs[t.cells] = part[0]
            for name, block in part[1].items():
                heads[name][t.cells] = block
            if progress:
                progress(i + 1, len(tiles))
        info = {"mode": "tiled" if len(tiles) > 1 else "whole", "tiles": len(tiles),
                "tile_size": tile_size, "heads": heads, **seconds}
        return probs, info

    def run_tiles(self, rgb: np.ndarray, tiles: Sequence[Tile], *,
                  seconds: dict[str, float] | None = None) -> Iterator[tuple[Tile, TileBlocks]]:
        """Each tile of a plan with the map cells it contributes: (class probabilities, {head: block}).

        Blocks are classes (or a head's channels) x rows x cols and belong at
        [:, y.first:y.last + 1, x.first:x.last + 1] of the whole map; the net's
        other heads (DenseModel.heads) come from the same forward pass. Tiles
        are independent, so one plan (which depends on the machine's memory
        budget, so it is made once) can be split over processes and stitched:
        run() does it in one loop, fcnify.dense.distributed over a cluster.
        `seconds` accumulates 'preprocess' and 'forward' times. Tiles and
        blocks are in the image's orientation, also for a transposed net.
        """
        if self.softmax.by == "net":  # the net's own Softmax output
            yield from self._forward_tiles(rgb, tiles, self.output_blob, seconds)
            return
        if self.softmax.by is None:  # --softmax off: the raw scores
            yield from self._forward_tiles(rgb, tiles, self.score_blob, seconds)
            return
        for t, (part, heads) in self._forward_tiles(rgb, tiles, self.score_blob, seconds):
            yield t, (softmax(part.astype(np.float32)), heads)

    def score_tiles(self, rgb: np.ndarray, tiles: Sequence[Tile], *,
                    seconds: dict[str, float] | None = None) -> Iterator[tuple[Tile, TileBlocks]]:
        """run_tiles with the raw scores before Softmax as the class block."""
        return self._forward_tiles(rgb, tiles, self.score_blob, seconds)

    def _forward_tiles(self, rgb: np.ndarray, tiles: Sequence[Tile], blob: str,
                       seconds: dict[str, float] | None) -> Iterator[tuple[Tile, TileBlocks]]:
        """Each tile's block of `blob` and of the other heads, cut to the cells the tile owns."""
        pre = self.card.preprocess
        wanted = [blob] + list(self.heads)
        seconds = {} if seconds is None else seconds
        shared = getattr(self.net, "input_array", None)
        for t in tiles:
            t0 = time.perf_counter()
            pixels = window(rgb, t)
            h, w = pixels.shape[:2]
            shape = (1, self.channels, w, h) if pre.transpose else (1, self.channels, h, w)
            x = pre.apply(pixels, out=shared(self.input_blob, shape)[0])[None] if shared else pre.apply(pixels)[None]
            del pixels
            t1 = time.perf_counter()
            outs = self.net.forward({self.input_blob: x}, wanted)
            seconds["forward"] = seconds.get("forward", 0.0) + time.perf_counter() - t1
            seconds["preprocess"] = seconds.get("preprocess", 0.0) + t1 - t0
            yield t, self._cut(outs, 0, t, blob, wanted)

    def _cut(self, outs: dict[str, np.ndarray], i: int, t: Tile, blob: str,
             wanted: list[str]) -> TileBlocks:
        """Image i's blocks of the forward's outputs `outs`, cut to the cells tile `t` owns."""
        ys = slice(t.y.first - t.y.offset, t.y.last - t.y.offset + 1)
        xs = slice(t.x.first - t.x.offset, t.x.last - t.x.offset + 1)
        blocks = {}
        for name in wanted:
            out = outs[name][i]
            if self.transposed:  # the net's rows are the image's columns
                out = out.transpose(0, 2, 1)
            blocks[name] = out[:, ys, xs]
        return blocks.pop(blob), blocks

    # -- several images in one forward pass (--batch)

    def batch_size(self, fed: tuple[int, int], wanted: int, budget: int | None = None) -> int:
        """How many images of the fed size (height, width) one forward pass takes, at most
        `wanted`: the engine's memory for one pass with its activations, input and outputs
        `k` times over (the weights once) within the budget, as the tile planner counts a
        pass. 1 when the engine runs one image at a time, a finer --stride stitches several
        passes, or one image alone needs tiles."""
        if wanted <= 1 or not getattr(self.runner, "batches", False) or self.shifts > 1:
            return 1
        h, w = (fed[1], fed[0]) if self.transposed else fed
        net = self.netdef.param
        room = (budget or default_budget()) * HEADROOM
        try:
            est = self._estimate(net, h, w)
        except ResourceError:
            return 1
        for k in range(wanted, 1, -1):
            active = k * est.activations
            if active <= SPEED_CAP and est.base + est.params + max(est.params, active) <= room:
                return k
        return 1

    def classify_batch(self, images: Sequence[np.ndarray], paths: Sequence[Path | None],
                       feeds: Sequence[tuple[tuple[int, int] | None, float | None]] | None = None,
                       budget: int | None = None,
                       load_seconds: Sequence[float] | None = None) -> list[DenseMap]:
        """Map images that are fed at one size in one forward pass (an N x C x H x W input):
        each map is classify()'s of that image alone, to the engine's float32 rounding
        (tests/test_pipeline.py). The caller sizes the batch (batch_size); images that need
        tiles, or another fed size, are refused. `feeds` is each image's (size, scale), as
        classify() takes them (None: each as it is)."""
        t0 = time.perf_counter()
        rgbs = [np.asarray(im) for im in images]
        feeds = feeds or [(None, None)] * len(rgbs)
        feds = [resized(rgb, size, scale) for rgb, (size, scale) in zip(rgbs, feeds)]
        shapes = {f.shape[:2] for f in feds}
        if len(shapes) != 1:
            raise InputError(f"a batch is fed at one size; these are fed at {sorted(shapes)}")
        fed = feds[0].shape[:2]
        for f, rgb, path in zip(feds, rgbs, paths):
            self.check_minimum(f.shape[:2], resized=f is not rgb, path=path)
        tiles, _ = self.plan(*fed, budget, None, reader=feds[0])
        if len(tiles) != 1:
            raise ResourceError(f"images of {hw(*fed)} px need tiles: map them one at a time", paths[0])
        t1 = time.perf_counter()
        pre = self.card.preprocess
        x = np.stack([pre.apply(f) for f in feds])
        t2 = time.perf_counter()
        blob = {"net": self.output_blob, None: self.score_blob}.get(self.softmax.by, self.score_blob)
        wanted = [blob] + list(self.heads)
        outs = self.net.forward({self.input_blob: x}, wanted)
        t3 = time.perf_counter()
        n = len(feds)
        maps = []
        for i, (rgb, path) in enumerate(zip(rgbs, paths)):
            part, heads = self._cut(outs, i, tiles[0], blob, wanted)
            probs = np.ascontiguousarray(part, dtype=np.float32)
            if self.softmax.by not in ("net", None):
                probs = softmax(probs)
            info = {"mode": "whole", "tiles": 1, "tile_size": None,
                    "heads": {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in heads.items()}}
            timings = {"load_image": (t1 - t0) / n + (load_seconds[i] if load_seconds else 0.0),
                       "preprocess": (t2 - t1) / n, "forward": (t3 - t2) / n}
            dm = self.dense_map(probs, info, image=rgb, fed=fed, path=path, timings=timings)
            dm.batch = n
            maps.append(dm)
        return maps

    def classify(self, image: str | Path | np.ndarray, size: tuple[int, int] | None = None,
                 scale: float | None = None, budget: int | None = None, tile: int | None = None,
                 progress: Progress | None = None, keep_image: bool = True,
                 path: str | Path | None = None, level: int | None = None) -> DenseMap:
        """Map one image (a path or an H x W x 3 uint8 RGB array; `path` names where an array
        was read from, in errors and in the map, when a batch decoded it ahead).

        A tiled TIFF (io.windows.windowed) is read a tile's window at a time,
        at pyramid `level`, and never decoded whole.
        """
        t0 = time.perf_counter()
        path = Path(path) if path is not None else None
        if isinstance(image, (str, Path)):
            path = Path(image)
            if windowed(path):
                return self._classify_windows(path, level or 0, size, scale, budget, tile, progress,
                                              keep_image)
            rgb = load_image(path)
        else:
            rgb = np.asarray(image)
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise ImageError(f"expected an H x W x 3 uint8 RGB array, got {rgb.dtype} {rgb.shape}")
        if level:
            raise InputError(f"--level {level}: only a tiled (pyramidal) TIFF has levels", path)
        fed = resized(rgb, size, scale)
        t_load = time.perf_counter() - t0
        self.check_minimum(fed.shape[:2], resized=fed is not rgb, path=path)
        probs, info = self.run(fed, budget, tile, progress)
        timings = {"load_image": t_load, "preprocess": info["preprocess"], "forward": info["forward"]}
        return self.dense_map(probs, info, image=rgb, fed=fed.shape[:2], path=path, timings=timings,
                              keep_image=keep_image)

    def _classify_windows(self, path: Path, level: int, size, scale, budget: int | None,
                          tile: int | None, progress: Progress | None, keep_image: bool) -> DenseMap:
        """classify() of a tiled TIFF: each tile's window read from the file, the map held in memory
        (it must fit the budget; a map that does not goes to a chunked store, store.py)."""
        if size is not None or scale is not None:
            raise InputError("a tiled TIFF is mapped at a pyramid level: give --level N, "
                             "not --size/--scale/--long-side/--short-side", path)
        if self.shifts > 1:
            raise InputError("--stride finer than the net's is not supported on a tiled TIFF yet", path)
        t0 = time.perf_counter()
        with open_windows(path, level) as source:
            self.check_minimum(source.shape, resized=False, path=path)
            self.check_map_fits(source.shape, budget, path)
            t_open = time.perf_counter() - t0
            room = (budget or default_budget()) - self.map_bytes(source.shape)  # the tiles' share
            probs, info = self.run(source, room, tile, progress)
            t1 = time.perf_counter()
            overview = source.overview() if keep_image else None
            t_load = t_open + time.perf_counter() - t1
        timings = {"load_image": t_load, "preprocess": info["preprocess"], "forward": info["forward"]}
        return self.dense_map(probs, info, image=overview, fed=source.shape, path=path,
                              timings=timings, image_size=source.shape)

    def map_bytes(self, fed: tuple[int, int]) -> int:
        """Bytes of the whole map of a `fed`-sized input held in memory: classes and heads, float32."""
        rows, cols = self.map_cells(*fed)
        return (self.num_classes + sum(self.heads.values())) * rows * cols * 4

    def check_map_fits(self, fed: tuple[int, int], budget: int | None, path: Path | None) -> None:
        """Refuse, with the numbers, a map too large for memory beside the tiles' budget."""
        from ..caffe.planner import available_memory
        need, room = self.map_bytes(fed), budget or available_memory() // 2
        if need > room:
            rows, cols = self.map_cells(*fed)
            raise ResourceError(f"its map ({rows}x{cols} cells x {self.num_classes} classes) needs "
                                f"{format_bytes(need)} in memory, over the budget of {format_bytes(room)}: "
                                "write it to a chunked store instead (--store zarr)", path)

    def check_minimum(self, fed: tuple[int, int], *, resized: bool, path: Path | None = None) -> None:
        """Refuse an input smaller than one window before any work: its map would have no cell."""
        mh, mw = self.minimum
        if fed[0] < mh or fed[1] < mw:
            what = f"{hw(*fed)} px" + (" after resizing" if resized else "")
            raise ImageError(f"image is {what} (height x width), smaller than one window: "
                             f"{self.card.name} needs at least {hw(mh, mw)} px"
                             + (f" at stride {self.stride_plan.stride}" if self.stride_plan else ""), path)

    def dense_map(self, probs: np.ndarray, info: dict, *, image: np.ndarray | None, fed: tuple[int, int],
                  path: Path | None, timings: dict[str, float], keep_image: bool = True,
                  image_size: tuple[int, int] | None = None) -> DenseMap:
        """The DenseMap of stitched cells, for one process's run and for Dask's stitch alike.

        `info` is run()'s: mode, tiles, tile_size and the other heads' cells.
        `image_size` is the image's when `image` is only its overview (a tiled TIFF).
        """
        return DenseMap(probs=probs, geometry=self.geometry,
                        image_size=tuple(image_size) if image_size else image.shape[:2],
                        input_size=tuple(fed), model=self.card, labels=self.labels, image_path=path,
                        mode=info["mode"], tiles=info["tiles"], tile_size=info["tile_size"],
                        timings=timings, image=image if keep_image else None, source=self.source,
                        output=self.output_blob, heads=info.get("heads") or {},
                        stride_plan=self.stride_plan.to_dict() if self.stride_plan else None,
                        softmax=self.softmax, engine=self.runner.name,
                        precision=getattr(self.runner, "precision", "f32"))

    def __enter__(self) -> "DenseModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.net.close()
        if self._strided is not None:
            self._strided.cleanup()
            self._strided = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None


def window(source, t: Tile) -> np.ndarray:
    """The pixels of tile `t`: a slice of an array, or a read of a windowed file (io.windows)."""
    if isinstance(source, np.ndarray):
        return source[t.y.start:t.y.stop, t.x.start:t.x.stop]
    return source.read(t.y.start, t.y.stop, t.x.start, t.x.stop)


def fed_size(original: tuple[int, int], size: tuple[int, int] | None = None,
             scale: float | None = None) -> tuple[int, int]:
    """(height, width) the net is fed for an image of `original` size under --size or --scale."""
    if size is not None:
        return tuple(size)
    if scale is not None:
        return max(1, round(original[0] * scale)), max(1, round(original[1] * scale))
    return tuple(original)


def resized(rgb: np.ndarray, size: tuple[int, int] | None = None,
            scale: float | None = None) -> np.ndarray:
    """The pixels the net is fed: `rgb` itself, or resized when --size or --scale is given."""
    if size is None and scale is None:
        return rgb
    return resize(rgb, *fed_size(rgb.shape[:2], size, scale))


def classifier_input(card: ModelCard) -> tuple[int, int] | None:
    """(height, width) of the original classifier's input, from a card `convert` wrote.

    A net converted with --input-size declares that size, not the
    classifier's; the card keeps the original, so the window stays the crop
    the classifier was made for.
    """
    if card.card_path is None:
        return None
    try:
        shape = json.loads(Path(card.card_path).read_text()).get("original_input_shape")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(d, int) for d in shape):
        return None
    return shape[2], shape[3]


def pick_output(net, wanted: str | None, path: Path | None = None) -> str:
    """The output blob that is the class map: `wanted`, else the net's last output.

    A name given as in the original net finds its converted blob (conv5-2 ->
    conv5-2-conv), so users can name heads as their net's documentation does.
    """
    from ..surgery.surgery import named_blob
    outs = output_blobs(net)
    if wanted is None:
        return outs[-1]
    found = named_blob(wanted, outs)
    if found is not None:
        return found
    raise InputError(f"output {wanted!r} is not an output of the net; its outputs are "
                     f"{', '.join(outs)}", path)


def other_heads(net, output: str, path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """The net's other outputs that line up cell for cell with the class map.

    Returns {blob: channels} of those mapped beside the class map, and the
    names of outputs whose cells do not line up (another stride or window) or
    that are not spatial: those cannot share the class map's tiles.
    """
    from ..caffe.geometry import blob_geometry
    geos = blob_geometry(net, path=path)
    shapes = infer_partial(net, path=path).blobs
    geometry = geos[output]
    mapped, unmapped = {}, []
    for blob in output_blobs(net):
        if blob == output:
            continue
        g, shape = geos.get(blob), shapes.get(blob)
        if g is not None and shape is not None and len(shape) == 4 \
                and (g.y, g.x) == (geometry.y, geometry.x):
            mapped[blob] = shape[1]
        else:
            unmapped.append(blob)
    return mapped, unmapped


def classify_map(image: str | Path | np.ndarray, model: str | Path | ModelCard | None = None, *,
                 model_def: str | Path | None = None, weights: str | Path | None = None,
                 card: str | Path | ModelCard | None = None,
                 size: tuple[int, int] | None = None, scale: float | None = None,
                 gpu: int | None = None, engine: str = DEFAULT_ENGINE, budget: int | None = None,
                 tile: int | None = None, preprocess: Preprocess | None = None,
                 labels: str | Path | None = None, output: str | None = None,
                 softmax: bool | None = None, precision: str = "f32") -> DenseMap:
    """Dense classification map of one image (converting the net in memory if needed).

    The model is resolved as everywhere (resolve.resolve_card): `model` (a
    name, a card's path or a ModelCard), `card` or `model_def` with
    `weights`; `weights`, `preprocess` and `labels` given beside it replace
    its card's. `output` names the class-map head, and the net's other heads
    come back in DenseMap.heads. `softmax` (None: the card's) says whether
    the map is probabilities; DenseMap.softmax says what was applied.
    `precision="bf16"` (engines/cpu.py) is close to, not equal to, the float32 map; the map
    records it.
    """
    the_card = resolve_card(model, model_def=model_def, weights=weights, card=card,
                            preprocess=preprocess, labels=labels)
    dm = DenseModel(the_card, engine=engine, gpu=gpu, output=output, softmax=softmax,
                    precision=precision)
    try:
        return dm.classify(image, size, scale, budget, tile)
    finally:
        dm.close()
