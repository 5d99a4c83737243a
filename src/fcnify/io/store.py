"""A map that never sits in memory whole: a chunked zarr store on disk, written a chunk at a time.

Every chunk of the store is the block of map cells one tile computes
(tiling.plan_chunks), so a finished tile is one write of each kept array
and one `done` mark, and the store can be read while the run goes on. What
is kept is chosen per run (`Keep`): the full class values, a subset of
classes, each cell's top k, or the argmax and its value. The store's
attributes carry the map's geometry and a fingerprint of the net and the
options, so `--resume` continues only a store made by the same run, and
re-runs only the chunks whose mark is missing or whose data does not read
back whole.

zarr is imported inside functions: it is needed only for maps written this way.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError, SetupError

NO_CLASS = -1  # fill of the integer arrays: a cell not computed yet


@dataclass(frozen=True)
class Keep:
    """What the store holds per cell: "scores" (all classes, or `classes`), "topk" (k), "argmax"."""

    scores: bool = True
    classes: tuple[int, ...] | None = None  # --classes: only these, in this order
    topk: int = 0  # 0: no top-k arrays
    argmax: bool = False
    heads: tuple[tuple[str, int], ...] = ()  # the net's other outputs (blob, channels): head_BLOB arrays

    def arrays(self, num_classes: int) -> dict[str, tuple[int | None, str]]:
        """{array name: (leading size or None for a plain rows x cols array, dtype)}."""
        out: dict[str, tuple[int | None, str]] = {}
        if self.scores:
            out["scores"] = (len(self.classes) if self.classes else num_classes, "float32")
        if self.topk:
            k = min(self.topk, num_classes)
            out["topk_classes"], out["topk_probs"] = (k, "int32"), (k, "float32")
        if self.argmax:
            out["argmax"], out["argmax_prob"] = (None, "int32"), (None, "float32")
        for name, channels in self.heads:
            out[f"head_{name}"] = (channels, "float32")
        return out


def reduce_block(block: np.ndarray, keep: Keep, heads: dict[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
    """A tile's classes x rows x cols block (and its other heads' blocks) as the arrays `keep` asks for.

    Top-k by one stable argsort of the negated values: best first, ties broken
    by the lower class, the order outputs.top_k_arrays gives the .npy maps;
    the argmax by one pass (the same class: the first of the largest).
    """
    out: dict[str, np.ndarray] = {}
    if keep.scores:
        out["scores"] = block[list(keep.classes)] if keep.classes else block
    if keep.topk:
        order = np.argsort(-block, axis=0, kind="stable")
        top = order[:min(keep.topk, block.shape[0])]
        out["topk_classes"] = top.astype(np.int32)
        out["topk_probs"] = np.take_along_axis(block, top, axis=0)
    if keep.argmax:  # one pass, no sort: argmax's first maximum is the stable sort's first
        best = block.argmax(axis=0)
        out["argmax"] = best.astype(np.int32)
        out["argmax_prob"] = np.take_along_axis(block, best[None], axis=0)[0]
    for name, _ in keep.heads:
        out[f"head_{name}"] = (heads or {})[name]
    return out


class MapStore:
    """NAME.zarr: the kept arrays (chunked as the tiles' cell blocks) and a `done` mark per chunk."""

    def __init__(self, path: Path, root) -> None:
        self.path, self.root = Path(path), root
        meta = dict(root.attrs["fcnify"])
        self.meta = meta
        self.chunk = tuple(meta["chunk_cells"])  # (rows, cols) of cells per chunk
        self.shape = tuple(meta["cells"])  # (rows, cols) of the whole map
        self.grid = tuple(meta["grid"])

    @classmethod
    def create(cls, path: Path, *, shape: tuple[int, int], chunk: tuple[int, int], num_classes: int,
               keep: Keep, fingerprint: dict, geometry: dict, force: bool = False) -> "MapStore":
        """A new, empty store; an existing one is refused (OutputExists) unless `force` replaces it."""
        zarr = zarr_module()
        path = Path(path)
        if path.exists():
            if not force:
                raise OutputError("map store already exists: continue it with --resume, or start over "
                                  "with --force", path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        grid = (-(-shape[0] // chunk[0]), -(-shape[1] // chunk[1]))
        root = zarr.open_group(str(path), mode="w")
        for name, (lead, dtype) in keep.arrays(num_classes).items():
            fill = np.nan if dtype == "float32" else NO_CLASS
            full = shape if lead is None else (lead, *shape)
            chunks = chunk if lead is None else (lead, *chunk)
            root.create_array(name, shape=full, chunks=chunks, dtype=dtype, fill_value=fill)
        root.create_array("done", shape=grid, chunks=(1, 1), dtype="uint8", fill_value=0)
        root.attrs["fcnify"] = {"cells": list(shape), "chunk_cells": list(chunk), "grid": list(grid),
                                "keep": asdict(keep), "fingerprint": fingerprint,
                                "geometry": geometry, "complete": False,
                                "note": "done[i, j] = 1 once chunk (i, j) of every array is written; "
                                        "complete is true once all are"}
        return cls(path, root)

    @classmethod
    def open(cls, path: Path) -> "MapStore":
        """A store this run made or resumed, opened again (by a Dask worker, or to finish it)."""
        return cls(Path(path), zarr_module().open_group(str(path), mode="r+"))

    @classmethod
    def resume(cls, path: Path, fingerprint: dict) -> "MapStore":
        """The store at `path`, refused in one line when another net or other options made it."""
        zarr = zarr_module()
        path = Path(path)
        try:
            root = zarr.open_group(str(path), mode="r+")
            theirs = dict(root.attrs["fcnify"])["fingerprint"]
        except Exception:
            raise InputError("--resume: not a map store fcnify wrote (no fcnify attributes)", path) from None
        differ = [k for k in sorted(set(theirs) | set(fingerprint)) if theirs.get(k) != fingerprint.get(k)]
        if differ:
            raise InputError(f"--resume: this store was made by another run (it differs in: "
                             f"{', '.join(differ)}); rerun without --resume and with --force to start over",
                             path)
        return cls(path, root)

    def names(self) -> list[str]:
        """The kept arrays (all but the done marks)."""
        return sorted(n for n in self.root.array_keys() if n != "done")

    def cells(self, i: int, j: int) -> tuple[slice, slice]:
        """The cell rows and columns of chunk (i, j)."""
        r, c = self.chunk
        return (slice(i * r, min(self.shape[0], (i + 1) * r)), slice(j * c, min(self.shape[1], (j + 1) * c)))

    def write(self, i: int, j: int, arrays: dict[str, np.ndarray]) -> None:
        """Chunk (i, j) of every array, then its done mark: a mark is never ahead of its data."""
        rows, cols = self.cells(i, j)
        for name, block in arrays.items():
            self.root[name][..., rows, cols] = block
        self.root["done"][i, j] = 1

    def finished(self) -> set[tuple[int, int]]:
        """Chunks marked done whose data reads back whole (no cell left at its fill value)."""
        done = np.asarray(self.root["done"][...])
        good = set()
        for i, j in zip(*np.nonzero(done)):
            if self.check(int(i), int(j)):
                good.add((int(i), int(j)))
        return good

    def check(self, i: int, j: int) -> bool:
        """Whether chunk (i, j) of every array decodes and holds no unwritten cell."""
        rows, cols = self.cells(i, j)
        try:
            for name in self.names():
                block = np.asarray(self.root[name][..., rows, cols])
                if block.dtype.kind == "f" and np.isnan(block).any():
                    return False
                if block.dtype.kind == "i" and (block == NO_CLASS).any():
                    return False
        except Exception:  # a chunk file cut short or garbled by a killed run
            return False
        return True

    def mark_complete(self, complete: bool = True, **extra) -> None:
        meta = dict(self.root.attrs["fcnify"])
        meta.update(complete=complete, **extra)
        self.root.attrs["fcnify"] = meta
        self.meta = meta


def fingerprint(model_files: list[Path | None], options: dict) -> dict:
    """What a store's cells depend on: the net's files (by content) and the options that change them."""
    digest = hashlib.sha256()
    for path in model_files:
        if path is not None:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return {"net": digest.hexdigest()[:16], **{k: json.loads(json.dumps(v)) for k, v in options.items()}}


def zarr_module():
    """zarr, or one line saying how to get it (imported only for maps written to a store)."""
    try:
        import zarr
    except ImportError:
        raise SetupError("--store zarr needs zarr 3 (Python 3.11 or later): pip install 'zarr>=3'") from None
    return zarr
