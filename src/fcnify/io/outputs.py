"""What a person sees: the text summary, the JSON, the .npy and the two pictures.

The heatmap shows one class's probability over the image, the argmax
picture which class wins each cell; both are drawn by pictures.py (numpy and
Pillow, milliseconds each).
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputExists
from ..files import OutputSet
from ..caffe.geometry import hw
from .pictures import HEAT_RANGES, argmax_png, heat_range, heatmap_png, preview  # noqa: F401 (re-exported)


def cell_rows(dm, top_k: int):
    """The JSON entries of the map's cells, one list per row, computed a row at a time.

    Top-k per cell by a partition, not a full sort: each (probability, class)
    becomes one unsigned key whose order is "higher probability first, then
    lower class" (np.argsort(-p, kind="stable") order, ties included), so
    the k smallest keys are the top k exactly.
    """
    rows, cols = dm.shape
    k = min(top_k, dm.num_classes)
    g, (sy, sx) = dm.geometry, dm.scale
    h, w = dm.image_size
    x0 = [(c * g.x.stride + g.x.box_lo) / sx for c in range(cols)]
    x1 = [(c * g.x.stride + g.x.box_lo + g.x.window) / sx for c in range(cols)]
    idx = np.arange(dm.num_classes, dtype=np.uint64)[:, None]
    labels = [dm.label(c) for c in range(dm.num_classes)]
    for r in range(rows):
        y0, y1 = (r * g.y.stride + g.y.box_lo) / sy, (r * g.y.stride + g.y.box_lo + g.y.window) / sy
        p = np.ascontiguousarray(dm.probs[:, r, :], dtype=np.float32)
        keys = ((np.uint64(0xFFFFFFFF) - p.view(np.uint32).astype(np.uint64)) << np.uint64(32)) | idx
        top = np.sort(np.partition(keys, k - 1, axis=0)[:k], axis=0) & np.uint64(0xFFFFFFFF)
        top = top.astype(np.int64)
        probs = np.take_along_axis(p, top, axis=0).tolist()
        top = top.tolist()
        yf0, yf1 = max(0.0, y0), min(float(h), y1)
        yield [{"row": r, "col": c,
                "box": [round(max(0.0, x0[c]), 3), round(yf0, 3), round(min(float(w), x1[c]), 3),
                        round(yf1, 3)],
                "window": [round(x0[c], 3), round(y0, 3), round(x1[c], 3), round(y1, 3)],
                "top": [{"class": top[i][c], "label": labels[top[i][c]], "prob": round(probs[i][c], 6)}
                        for i in range(k)]}
               for c in range(cols)]


def write_map_json(dm, path: Path, top_k: int, command: str | None, extra: dict) -> None:
    """NAME.map.json written a row of cells at a time (the whole document never sits in memory)."""
    head = json.dumps({**dm.to_json(top_k, command, cells=False), **extra}, separators=(",", ":"))
    with open(path, "w") as f:
        f.write(head[:-1] + ',"cells":[')
        first = True
        for row in cell_rows(dm, top_k):
            if row:
                f.write(("" if first else ",") + json.dumps(row, separators=(",", ":"))[1:-1])
                first = False
        f.write("]}\n")


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write an array as .npy straight to a file (np.save on a name would append '.npy')."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    return buf.getvalue()


def head_file_name(blob: str) -> str:
    """The suffix of an output head's .npy (NAME.BLOB.npy), safe as a file name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in blob)
    return f"{safe}.npy"


def output_names(out_dir: Path, name: str, heads: tuple[str, ...] = ()) -> dict[str, Path]:
    """The files of one image; each other output head of the net adds NAME.BLOB.npy."""
    names = {"scores": out_dir / f"{name}.scores.npy", "json": out_dir / f"{name}.map.json",
             "heatmap": out_dir / f"{name}.heatmap.png", "argmax": out_dir / f"{name}.argmax.png"}
    for blob in heads:
        names[f"head:{blob}"] = out_dir / f"{name}.{head_file_name(blob)}"
    return names


def _name_levels(path: Path, root: Path) -> tuple[str, ...]:
    """Ever longer names for one image: its stem, its file name, its path below `root`."""
    relative = path.resolve().relative_to(root)
    return path.stem, path.name, "__".join(relative.parts)


def unique_names(paths: Sequence[Path]) -> dict[Path, str]:
    """An output name for every image, never the same for two of them.

    Outputs are named after the image's stem (x.png -> x.*). Images whose
    names clash (a/x.png, a/x.jpg, b/x.png) keep their extension, then their
    folder below the images' common folder (x.jpg.*, a__x.png.*, b__x.png.*),
    so that no map overwrites another. Names are compared case-folded, as a
    case-insensitive file system would. Images that still clash are refused,
    with both named, before any work is done.
    """
    paths = list(paths)
    if not paths:
        return {}
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([r.parent for r in resolved]))
    levels = {p: _name_levels(p, root) for p in paths}
    level = dict.fromkeys(paths, 0)
    while True:
        groups: dict[str, list[Path]] = {}
        for p in paths:
            groups.setdefault(levels[p][level[p]].casefold(), []).append(p)
        clashes = [group for group in groups.values() if len(group) > 1]
        if not clashes:
            return {p: levels[p][level[p]] for p in paths}
        for group in clashes:
            stuck = [p for p in group if level[p] == len(levels[p]) - 1]
            if len(stuck) > 1:
                a, b = stuck[:2]
                raise InputError(f"{a} and {b} would write the same outputs "
                                 f"({levels[a][level[a]]}.*); rename one of them")
            for p in group:
                if p not in stuck:
                    level[p] += 1


def renamed_note(names: dict[Path, str]) -> list[str]:
    """One line per image whose outputs are not named after its stem, saying so."""
    return [f"{p}: outputs named {name}.* (another image is also called {p.stem})"
            for p, name in names.items() if name != p.stem]


def map_document(doc: dict, written: Sequence[Path] = ()) -> dict:
    """One image's line of --format json: its map document, marked ok, with the files written.

    Every mode (one process, Dask workers) and every outcome prints this one
    schema; failure_document is the same for an image that failed.
    """
    return {"image": doc.get("image"), "ok": True, "error": None, "exit_code": 0,
            "outputs": [str(p) for p in written], **doc}


def failure_document(image: str | Path, exc) -> dict:
    """The --format json line of an image that failed: why, and the exit code it stands for."""
    return {"image": str(image), "ok": False, "error": str(exc),
            "exit_code": getattr(exc, "exit_code", 1), "outputs": []}


def check_outputs(out_dir: Path, name: str, force: bool, image: Path | None = None,
                  heads: tuple[str, ...] = ()) -> None:
    """Refuse an image's outputs before its work, naming the image and the file in the way."""
    checker = OutputSet(force)
    for final in output_names(Path(out_dir), name, heads).values():
        try:
            checker.check(final)
        except OutputExists as exc:
            raise OutputExists(exc.final, image) from None


def save_outputs(dm, out_dir: Path, name: str | None, cls: int | None, top_k: int,
                 command: str | None, *, force: bool, heat_scale: str = "unit") -> list[Path]:
    """The four files for one image (and one .npy per other output head), written all at once."""
    name = name or (dm.image_path.stem if dm.image_path else "image")
    cls = dm.default_class() if cls is None else cls
    names = output_names(out_dir, name, tuple(dm.heads))
    out = OutputSet(force)
    for p in names.values():
        out.check(p)
    with out:
        out.write_with(names["scores"], lambda p: save_npy(p, dm.probs))
        # compact and streamed: a map of 10^5 cells would otherwise be a document of gigabytes in memory
        out.write_with(names["json"], lambda p: write_map_json(
            dm, p, top_k, command, {"heatmap_class": {"class": cls, "label": dm.label(cls)}}))
        out.write_bytes(names["heatmap"], heatmap_png(dm, cls, heat_scale))
        out.write_bytes(names["argmax"], argmax_png(dm))
        for blob, values in dm.heads.items():
            out.write_bytes(names[f"head:{blob}"], npy_bytes(values))
    return list(names.values())


CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"


def char_map(dm, width: int = 100) -> list[str]:
    """The argmax map as one character per block of cells ('.' = background).

    A block shows its most probable non-background class when it has one, so
    a detection a few cells wide survives the downsampling.
    """
    rows, cols = dm.shape
    f = max(1, -(-cols // width))
    arg = dm.argmax()
    bg = dm.model.background_class
    peak = dm.probs.max(axis=0)
    out = [f"argmax map, one character per {f}x{f} cells ({f * dm.geometry.stride[1]} px), "
           f"'.' = {dm.short(bg) if bg is not None else 'none'}:"]
    for r0 in range(0, rows, f):
        line = []
        for c0 in range(0, cols, f):
            block = arg[r0:r0 + f, c0:c0 + f]
            score = np.where(block != bg, peak[r0:r0 + f, c0:c0 + f], -1.0)
            if bg is not None and (block == bg).all():
                line.append(".")
            else:
                i = np.unravel_index(int(score.argmax()), block.shape)
                line.append(CHARS[int(block[i])])
        out.append("  " + "".join(line))
    legend = ", ".join(f"{CHARS[c]}={dm.short(c)}" for c in range(dm.num_classes)
                       if c != bg and dm.short(c) != CHARS[c])
    if legend:
        out.append(f"  where {legend}")
    return out


def text_summary(dm, top_k: int = 5, max_cols: int = 40) -> str:
    """The terminal view: geometry, the argmax grid with short labels, the top classes."""
    rows, cols = dm.shape
    g = dm.geometry
    h, w = dm.image_size
    lines = [f"{dm.image_path or 'image'}: {hw(h, w)} px (sizes are height x width)"
             + (f", fed at {hw(*dm.input_size)}" if dm.input_size != dm.image_size else ""),
             f"model {dm.model.name}: map {rows}x{cols} cells of {dm.num_classes} classes; one "
             f"{hw(*g.window)} px window every {g.stride[1]} px"
             + (f" (offset {g.offset[1]},{g.offset[0]})" if any(g.offset) else "")
             + f", each changed by pixels within its {hw(*g.reach)} px reach"
             + f"; run: {dm.mode}" + (f", {dm.tiles} tiles of {hw(*dm.tile_size)} px"
                                       if dm.mode == "tiled" else "")]
    if dm.output is not None:
        lines.append(f"class map: output '{dm.output}'"
                     + "".join(f"; also output '{b}' ({a.shape[0]} values per cell)"
                               for b, a in dm.heads.items()))
    if dm.softmax is not None:
        lines.append(f"values: {dm.softmax.describe()}")
    arg = dm.argmax()
    used = [e["class"] for e in dm.top_classes(dm.num_classes) if e["cells"] > 0]
    if cols <= max_cols and rows <= 60:
        width = max(len(str(c)) for c in used) if used else 1
        lines.append("argmax class per cell (rows top to bottom):")
        for r in range(rows):
            lines.append("  " + " ".join(str(int(v)).rjust(width) for v in arg[r]))
        legend = ", ".join(f"{c}={dm.short(c)}" for c in used[:20])
        lines.append(f"  where {legend}" + (" ..." if len(used) > 20 else ""))
    elif dm.num_classes <= len(CHARS):
        lines += char_map(dm)
    else:
        lines.append(f"argmax grid not printed ({rows}x{cols} cells); see --out for the pictures")
    what = "probability" if dm.softmax is None or dm.softmax.applied else "score"
    lines.append(f"top classes over the map (cells won, peak {what}):")
    for e in dm.top_classes(top_k):
        lines.append(f"  {e['class']:>5} {dm.short(e['class'])[:30]:<30} {e['cells']:>6} cells  "
                     f"peak {e['max_prob']:.3f}")
    return "\n".join(lines)
