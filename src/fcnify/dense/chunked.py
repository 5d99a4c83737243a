"""Map an image into a chunked store: one tile per chunk of cells, written as it finishes.

For images whose map does not fit in memory (a whole-slide image's is tens of
GB): the tiles are planned on a fixed grid of cell chunks (tiling.plan_chunks)
sized by the memory budget, each tile's window is read from the file
(io.windows), run, reduced to what is kept (store.Keep) and written as one
chunk of each array. Nothing holds more than one tile's pixels and one
chunk's cells, whatever the image's size. `--resume` keeps the chunks a
previous run of the same command finished (checked by reading them back) and
runs only the others, so the store equals an uninterrupted run's.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..caffe.geometry import map_size
from ..caffe.planner import default_budget, format_bytes
from ..errors import InputError, OutputError, ResourceError
from ..io.store import Keep, MapStore, fingerprint, reduce_block
from ..io.windows import ArrayWindows, open_windows, windowed
from .dense import DenseModel, softmax
from .tiling import Tile, chunk_cells, plan_chunks

Progress = Callable[[int, int], None]


@dataclass
class StoreRun:
    """What a run into a store did: where, how many chunks there are, which ones this run computed."""

    path: Path
    cells: tuple[int, int]
    chunk: tuple[int, int]
    chunks: int
    ran: int  # chunks computed by this run
    kept: int  # chunks a previous run had finished, checked and kept (--resume)
    image_size: tuple[int, int]
    tile_size: tuple[int, int]
    seconds: dict[str, float] = field(default_factory=dict)
    arrays: tuple[str, ...] = ()

    def summary(self) -> str:
        rows, cols = self.cells
        resumed = f", {self.kept} kept from the previous run (checked)" if self.kept else ""
        return (f"map {rows}x{cols} cells in {self.chunks} chunks of {self.chunk[0]}x{self.chunk[1]} "
                f"cells (tiles up to {self.tile_size[0]}x{self.tile_size[1]} px): ran {self.ran}{resumed}; "
                f"store {self.path} ({', '.join(self.arrays)})")


def source_for(path: Path, level: int | None):
    """The windowed reader of a tiled TIFF, or an ordinary image decoded whole (as classify does)."""
    if windowed(path):
        return open_windows(path, level or 0)
    if level:
        raise InputError(f"--level {level}: only a tiled (pyramidal) TIFF has levels", path)
    from ..io.images import load_image
    return ArrayWindows(load_image(path), path)


def chunk_plan(model: DenseModel, size: tuple[int, int], budget: int, tile: int | None,
               reader, chunk: tuple[int, int] | None = None
               ) -> tuple[list[Tile], tuple[int, int], tuple[int, int]]:
    """(tiles, cells per chunk, largest tile) for a store: chunks whose tiles fit the budget.

    `chunk` is a resumed store's own grid: kept, and its largest tile checked against the budget.
    """
    if model.shifts > 1:
        raise InputError(f"--store zarr cannot take --stride {model.geometry.stride[0]}: the net allows it "
                         "only by shift-and-stitch, whose passes interleave cells across the store's "
                         "chunks; give a --stride the net reaches à trous, or leave --store out")
    net = model.netdef.param
    h, w = size[::-1] if model.transposed else size  # planned as the net sees the image
    rows, cols = map_size(net, h, w, model.score_blob)
    gy, gx = model.net_geometry.y, model.net_geometry.x
    if chunk is not None and model.transposed:
        chunk = chunk[::-1]
    if chunk is None:
        if tile is None:
            _, tile_size = model.plan(*size, budget, None, reader=reader)
            side = max(tile_size) if tile_size else max(h, w)
        else:
            side = tile
        chunk = (min(rows, chunk_cells(side, gy)), min(cols, chunk_cells(side, gx)))
    fy = lambda n: map_size(net, n, w, model.score_blob)[0]  # noqa: E731
    fx = lambda n: map_size(net, h, n, model.score_blob)[1]  # noqa: E731
    tiles = plan_chunks(h, w, rows, cols, chunk, gy, gx, fy, fx)
    largest = max((t.shape for t in tiles), key=lambda s: s[0] * s[1])
    need = model._memory(reader)(net, *largest).total
    if model.transposed:  # back to the image's orientation
        tiles, chunk, largest = [Tile(t.x, t.y) for t in tiles], chunk[::-1], largest[::-1]
    if tile is None and need > budget:
        raise ResourceError(f"the store's chunks of {chunk[0]}x{chunk[1]} cells need tiles of "
                            f"{largest[0]}x{largest[1]} px, about {format_bytes(need)} with the "
                            f"reader's buffers, over the memory budget of {format_bytes(budget)}; "
                            "raise --max-memory", getattr(reader, "path", None))
    return tiles, chunk, largest


@dataclass(frozen=True)
class StorePlan:
    """A store opened for a run: its chunk grid, every tile, the chunks still to compute.

    Plain data, so that one Dask worker can make it and the others run its tiles.
    """

    path: Path
    image: Path
    level: int | None
    keep: Keep
    size: tuple[int, int]
    cells: tuple[int, int]
    chunk: tuple[int, int]
    tiles: tuple[Tile, ...]
    todo: tuple[Tile, ...]
    kept: int
    largest: tuple[int, int]


def prepare(model: DenseModel, path: Path, out: Path, *, keep: Keep, level: int | None = None,
            budget: int | None = None, tile: int | None = None, resume: bool = False,
            force: bool = False, options: dict | None = None) -> StorePlan:
    """Open the image, plan the chunks, make the store (or check the one to resume): no tile runs yet.

    `options` are what else changes the cells (recorded in the fingerprint,
    so --resume refuses a store another run made).
    """
    budget = budget or default_budget()
    keep = replace(keep, heads=tuple(model.heads.items()))
    reader = source_for(Path(path), level)
    try:
        size = tuple(reader.shape)
        model.check_minimum(size, resized=False, path=Path(path))
        print_ = {"level": level or 0, "image": Path(path).name, "image_size": list(size),
                  "keep": _keep_dict(keep), **(options or {})}
        prints = fingerprint([model.card.model_def, model.card.weights], print_)
        store = MapStore.resume(out, prints) if resume and out.exists() else None
        tiles, chunk, largest = chunk_plan(model, size, budget, tile, reader,
                                           store.chunk if store is not None else None)
    finally:
        if hasattr(reader, "close"):
            reader.close()
    rows, cols = model.cells(*size)
    if store is None:
        store = MapStore.create(out, shape=(rows, cols), chunk=chunk, num_classes=model.num_classes,
                                keep=_checked(keep, model.num_classes), fingerprint=prints,
                                geometry=geometry(model, size, level), force=force)
    done = store.finished() if resume else set()
    todo = tuple(t for t in tiles if _chunk_of(t, chunk) not in done)
    return StorePlan(Path(out), Path(path), level, keep, size, (rows, cols), chunk, tuple(tiles), todo,
                     len(done), tuple(largest))


def run_chunks(model: DenseModel, plan: StorePlan, tiles: Sequence[Tile],
               progress: Progress | None = None) -> dict[str, float]:
    """Compute `tiles` of the plan and write each one's chunk as it finishes (on any process that
    sees the store: each reads its own windows). Returns the seconds spent, by step.

    A tile that fails (a corrupt file tile) leaves the chunks written so far marked done.
    """
    seconds = {"preprocess": 0.0, "forward": 0.0, "write": 0.0}
    store = MapStore.open(plan.path)
    reader = source_for(plan.image, plan.level)
    try:
        for n, t in enumerate(tiles):
            block, heads = _scores(model, reader, t, seconds)
            t1 = time.perf_counter()
            store.write(*_chunk_of(t, plan.chunk), reduce_block(block, plan.keep, heads))
            seconds["write"] += time.perf_counter() - t1
            if progress:
                progress(n + 1, len(tiles))
    finally:
        if hasattr(reader, "close"):
            reader.close()
    return seconds


def finish(plan: StorePlan, seconds: dict[str, float]) -> StoreRun:
    """Mark the store complete (every chunk must be marked done) and say what the run did."""
    store = MapStore.open(plan.path)
    missing = int((np.asarray(store.root["done"][...]) == 0).sum())
    if missing:
        raise OutputError(f"{missing} chunk(s) of the store were not written; run again with --resume",
                          plan.path)
    store.mark_complete(True, seconds={k: round(v, 3) for k, v in seconds.items()})
    return StoreRun(plan.path, plan.cells, plan.chunk, len(plan.tiles), len(plan.todo), plan.kept,
                    plan.size, plan.largest, seconds, tuple(store.names()))


def map_to_store(model: DenseModel, path: Path, out: Path, *, keep: Keep, level: int | None = None,
                 budget: int | None = None, tile: int | None = None, resume: bool = False,
                 force: bool = False, options: dict | None = None,
                 progress: Progress | None = None) -> StoreRun:
    """Map the image at `path` into the store `out`, chunk by chunk, in this process (prepare,
    run_chunks, finish; distributed.py spreads run_chunks over Dask workers)."""
    t0 = time.perf_counter()
    plan = prepare(model, path, out, keep=keep, level=level, budget=budget, tile=tile, resume=resume,
                   force=force, options=options)
    seconds = run_chunks(model, plan, plan.todo, progress)
    seconds["total"] = time.perf_counter() - t0
    return finish(plan, seconds)


def _scores(model: DenseModel, reader, t: Tile, seconds: dict[str, float]
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One tile's class block as the map holds it (probabilities unless --softmax off, or the net's
    own), and its other heads' blocks as the in-memory map's `heads`."""
    blob = model.output_blob if model.softmax.by == "net" else model.score_blob
    ((_, (block, heads)),) = model._forward_tiles(reader, [t], blob, seconds)
    block = np.ascontiguousarray(block, dtype=np.float32)
    return softmax(block) if model.softmax.by not in ("net", None) else block, heads


def _chunk_of(t: Tile, chunk: tuple[int, int]) -> tuple[int, int]:
    return t.y.first // chunk[0], t.x.first // chunk[1]


def _keep_dict(keep: Keep) -> dict:
    return {"scores": keep.scores, "classes": list(keep.classes) if keep.classes else None,
            "topk": keep.topk, "argmax": keep.argmax, "heads": [list(h) for h in keep.heads]}


def _checked(keep: Keep, num_classes: int) -> Keep:
    bad = [c for c in keep.classes or () if not 0 <= c < num_classes]
    if bad:
        raise InputError(f"--classes {bad[0]}: the net has classes 0..{num_classes - 1}")
    if not (keep.scores or keep.topk or keep.argmax):
        raise InputError("--store zarr: nothing to keep (--save needs scores, topk or argmax)")
    return keep


def geometry(model: DenseModel, size: tuple[int, int], level: int | None) -> dict:
    """The map's geometry as map.json states it, in the mapped level's pixels."""
    g = model.geometry
    rows, cols = model.cells(*size)
    return {"image_size": list(size), "level": level or 0, "rows": rows, "cols": cols,
            "classes": model.num_classes, "stride_px": list(g.stride), "window_px": list(g.window),
            "offset_px": list(g.offset), "reach_px": list(g.reach),
            "reach_offset_px": [g.y.reach_lo, g.x.reach_lo], "output": model.output_blob,
            "softmax": model.softmax.to_dict(),
            "cell_window_px": {"x_first": g.x.box_lo, "x_step": g.x.stride, "width": g.x.window,
                               "y_first": g.y.box_lo, "y_step": g.y.stride, "height": g.y.window},
            "labels": model.labels.names if model.labels else None}


def keep_for(items: frozenset[str], top_k: int, classes: tuple[int, ...] | None) -> Keep:
    """What a store keeps, from --save's items ("scores", "topk", "argmax") and --classes."""
    return Keep(scores="scores" in items, classes=classes, topk=top_k if "topk" in items else 0,
                argmax="argmax" in items)


def store_outputs(out_dir: Path, name: str, items: frozenset[str]) -> dict[str, Path]:
    """The files beside a store: NAME.zarr always, NAME.map.json ("json"), NAME.overview.png ("pictures")."""
    names = {"store": Path(out_dir) / f"{name}.zarr"}
    if "json" in items:
        names["json"] = Path(out_dir) / f"{name}.map.json"
    if "pictures" in items:
        names["overview"] = Path(out_dir) / f"{name}.overview.png"
    return names


def store_options(model: DenseModel) -> dict:
    """The model's settings that change a store's cells, for its fingerprint (whoever runs it)."""
    return {"output": model.output_blob, "softmax": model.softmax.to_dict(),
            "preprocess": model.card.preprocess.to_dict(), "stride": list(model.geometry.stride)}


def prepare_job(model: DenseModel, path: Path, out_dir: Path, name: str, job,
                budget: int | None = None) -> StorePlan:
    """prepare() as a MapJob (`job`) asks, the store named NAME.zarr in `out_dir`."""
    return prepare(model, path, store_outputs(out_dir, name, job.items)["store"],
                   keep=keep_for(job.items, job.top_k, job.classes), level=job.level,
                   budget=budget or job.budget, tile=job.tile, resume=job.resume, force=job.force,
                   options=store_options(model))


def map_into_store(model: DenseModel, path: Path, out_dir: Path, name: str, job,
                   progress: Progress | None = None) -> tuple[StoreRun, list[Path]]:
    """`classify-map --store zarr`: the store, then its map.json and overview picture (`job`: a MapJob)."""
    t0 = time.perf_counter()
    plan = prepare_job(model, path, out_dir, name, job)
    seconds = run_chunks(model, plan, plan.todo, progress)
    seconds["total"] = time.perf_counter() - t0
    run = finish(plan, seconds)
    return run, write_beside(model, run, path, out_dir, name, job)


def write_beside(model: DenseModel, run: StoreRun, path: Path, out_dir: Path, name: str, job) -> list[Path]:
    """NAME.map.json ("json") and NAME.overview.png ("pictures") of a finished store; every file's path."""
    from ..files import OutputSet
    names = store_outputs(out_dir, name, job.items)
    side = OutputSet(True)  # checked before the run (pipeline.check_outputs); a resumed run rewrites its own
    with side:
        if "json" in names:
            doc = store_document(model, run, path, job.command, job.level)
            side.write_bytes(names["json"], (json.dumps(doc, separators=(",", ":")) + "\n").encode())
        if "overview" in names:
            side.write_bytes(names["overview"], overview_png(run.path, Path(path), job.level))
    return list(names.values())


def store_document(model: DenseModel, run: StoreRun, path: Path, command: str | None,
                   level: int | None) -> dict:
    """NAME.map.json of a store: geometry and metadata only (the cells are in the store)."""
    shown = model.source or model.card
    return {"image": str(path), "command": command,
            "model": {"name": shown.name, "model_def": str(shown.model_def),
                      "weights": str(shown.weights) if shown.weights else None},
            "map": geometry(model, run.image_size, level),
            "store": {"path": run.path.name, "arrays": list(run.arrays), "chunk_cells": list(run.chunk),
                      "chunks": run.chunks, "ran": run.ran, "kept": run.kept,
                      "note": "zarr v3 group; scores/topk arrays are values x rows x cols, argmax "
                              "rows x cols; done[i, j] marks chunk (i, j) written"},
            "run": {"mode": "store", "tile_size": list(run.tile_size),
                    "seconds": {k: round(v, 3) for k, v in run.seconds.items()}}}


def overview_png(store_dir: Path, image: Path, level: int | None, limit: int = 1024) -> bytes:
    """A small picture of a huge map: each shown cell's winning class coloured over the image's overview.

    Every f-th cell only (f brings the map's long side to `limit`), read from
    the store's argmax, its top-1 or its scores, never a full-size picture.
    """
    from PIL import Image
    from ..io.pictures import PALETTE, encode_png
    from ..io.store import zarr_module
    root = zarr_module().open_group(str(store_dir), mode="r")
    rows, cols = dict(root.attrs["fcnify"])["cells"]
    f = max(1, -(-max(rows, cols) // limit))
    if "argmax" in root:
        win = np.asarray(root["argmax"][::f, ::f])
    elif "topk_classes" in root:
        win = np.asarray(root["topk_classes"][0, ::f, ::f])
    else:
        win = np.asarray(root["scores"][:, ::f, ::f]).argmax(axis=0)
        classes = dict(root.attrs["fcnify"])["keep"]["classes"]
        if classes:
            win = np.asarray(classes)[win]
    colours = np.asarray(PALETTE, np.uint8)[np.clip(win, 0, None) % len(PALETTE)]
    reader = source_for(image, level)
    try:
        photo = reader.overview(max(win.shape) * 2)
    finally:
        if hasattr(reader, "close"):
            reader.close()
    h, w = win.shape
    back = np.asarray(Image.fromarray(np.ascontiguousarray(photo)).resize((w, h), Image.BILINEAR))
    return encode_png(((back.astype(np.uint16) + colours.astype(np.uint16)) // 2).astype(np.uint8))
