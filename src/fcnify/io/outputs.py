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
from .saved import DEFAULT_SAVE, SAVE_ITEMS, parse_save  # noqa: F401 (re-exported)
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


def top_k_arrays(dm, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's top k classes and their probabilities: (k x rows x cols int32, the same float32).

    Best first, ties broken by the lower class (np.argsort(-p, kind="stable")
    order), computed a row at a time by the same partition as cell_rows.
    """
    rows, cols = dm.shape
    k = min(top_k, dm.num_classes)
    classes = np.empty((k, rows, cols), np.int32)
    probs = np.empty((k, rows, cols), np.float32)
    idx = np.arange(dm.num_classes, dtype=np.uint64)[:, None]
    for r in range(rows):
        p = np.ascontiguousarray(dm.probs[:, r, :], dtype=np.float32)
        keys = ((np.uint64(0xFFFFFFFF) - p.view(np.uint32).astype(np.uint64)) << np.uint64(32)) | idx
        top = (np.sort(np.partition(keys, k - 1, axis=0)[:k], axis=0) & np.uint64(0xFFFFFFFF)).astype(np.intp)
        classes[:, r] = top
        probs[:, r] = np.take_along_axis(p, top, axis=0)
    return classes, probs


def write_map_json(dm, path: Path, top_k: int, command: str | None, extra: dict,
                   cells: bool = False) -> None:
    """NAME.map.json: metadata and geometry (a few kB for any map); with `cells`, the per-cell list too,
    written a row of cells at a time (the whole document never sits in memory)."""
    head = json.dumps({**dm.to_json(top_k, command, cells=False), **extra}, separators=(",", ":"))
    with open(path, "w") as f:
        if not cells:
            f.write(head + "\n")
            return
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


def npy_bytes(array: np.ndarray, dtype=np.float32) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def head_file_name(blob: str) -> str:
    """The suffix of an output head's .npy (NAME.BLOB.npy), safe as a file name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in blob)
    return f"{safe}.npy"


def output_names(out_dir: Path, name: str, heads: tuple[str, ...] = (),
                 save: frozenset[str] = DEFAULT_SAVE) -> dict[str, Path]:
    """The files of one image that `save` (SAVE_ITEMS) asks for; "heads" adds NAME.BLOB.npy per head."""
    names: dict[str, Path] = {}
    if "scores" in save:
        names["scores"] = out_dir / f"{name}.scores.npy"
    if "topk" in save:
        names["topk_classes"] = out_dir / f"{name}.topk_classes.npy"
        names["topk_probs"] = out_dir / f"{name}.topk_probs.npy"
    if "argmax" in save:
        names["argmax_classes"] = out_dir / f"{name}.argmax.npy"
        names["argmax_probs"] = out_dir / f"{name}.argmax_prob.npy"
    if "json" in save or "cells" in save:
        names["json"] = out_dir / f"{name}.map.json"
    if "pictures" in save:
        names["heatmap"] = out_dir / f"{name}.heatmap.png"
        names["argmax"] = out_dir / f"{name}.argmax.png"
    if "heads" in save:
        for blob in heads:
            names[f"head:{blob}"] = out_dir / f"{name}.{head_file_name(blob)}"
    return names


def written_line(paths: Sequence[Path], name: str, scales: Sequence[str] = ()) -> str:
    """The files an image wrote, in one short line: 'wrote DIR/NAME.{scores.npy,map.json}'.

    `name` is the image's output name, `scales` the suffixes of a pyramid's
    per-scale names (NAME.x0.5 -> "x0.5"). Files written for every scale are
    named once, the scales in braces, so a 9-scale run's line stays short.
    """
    by_scale: dict[str, list[str]] = {}
    folders = {Path(p).parent for p in paths}
    longest_first = sorted(scales, key=len, reverse=True)
    for p in map(Path, paths):
        rest = p.name[len(name) + 1:] if p.name.startswith(name + ".") else p.name
        scale = next((s for s in longest_first if rest.startswith(s + ".")), "")
        by_scale.setdefault(scale, []).append(rest[len(scale) + 1:] if scale else rest)
    folder = str(next(iter(folders))) if len(folders) == 1 else ""
    prefix = os.path.join(folder, name) + "."
    parts = [prefix + _braced(by_scale.pop(""))] if "" in by_scale else []
    same: dict[tuple[str, ...], list[str]] = {}
    for scale, files in by_scale.items():
        same.setdefault(tuple(files), []).append(scale)
    for files, group in same.items():
        parts.append(prefix + _braced(group) + "." + _braced(list(files)))
    return "wrote " + ", ".join(parts)


def _braced(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{" + ",".join(items) + "}"


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


def save_outputs(dm, out_dir: Path, name: str | None, cls: int | None, top_k: int,
                 command: str | None, *, force: bool, heat_scale: str = "unit",
                 save: frozenset[str] = DEFAULT_SAVE) -> list[Path]:
    """The files `save` asks for, for one image, all put in place together or none."""
    name = name or (dm.image_path.stem if dm.image_path else "image")
    cls = dm.default_class() if cls is None else cls
    names = output_names(out_dir, name, tuple(dm.heads), save)
    out = OutputSet(force)
    for p in names.values():
        out.check(p)
    with out:
        for key, path in names.items():
            write_one(out, key, path, dm, cls, top_k, command, heat_scale, names, save)
    return list(names.values())


def write_one(out: OutputSet, key: str, path: Path, dm, cls: int, top_k: int, command: str | None,
              heat_scale: str, names: dict[str, Path], save: frozenset[str]) -> None:
    """Stage one of an image's files (output_names' `key`) in `out`."""
    if key == "scores":
        out.write_with(path, lambda p: save_npy(p, dm.probs))
    elif key == "topk_classes":
        classes, probs = top_k_arrays(dm, top_k)
        out.write_bytes(path, npy_bytes(classes, np.int32))
        out.write_bytes(names["topk_probs"], npy_bytes(probs))
    elif key == "argmax_classes":
        classes, probs = top_k_arrays(dm, 1)
        out.write_bytes(path, npy_bytes(classes[0], np.int32))
        out.write_bytes(names["argmax_probs"], npy_bytes(probs[0]))
    elif key == "json":
        files = {k: p.name for k, p in names.items() if k not in ("json",) and not k.startswith("head:")}
        extra = {"heatmap_class": {"class": cls, "label": dm.label(cls)}, "files": files,
                 "top_k": {"k": min(top_k, dm.num_classes),
                           "note": "NAME.topk_classes.npy (int32) and NAME.topk_probs.npy (float32), "
                                   "k x rows x cols, best first (ties: the lower class first)"}}
        out.write_with(path, lambda p: write_map_json(dm, p, top_k, command, extra, "cells" in save))
    elif key == "heatmap":
        out.write_bytes(path, heatmap_png(dm, cls, heat_scale))
    elif key == "argmax":
        out.write_bytes(path, argmax_png(dm))
    elif key.startswith("head:"):
        out.write_bytes(path, npy_bytes(dm.heads[key[5:]]))
    # "topk_probs" is written with "topk_classes", "argmax_probs" with "argmax_classes"


CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"


OTHER = "+"


def char_table(dm, background: int | None) -> dict[int, str]:
    """class -> its character: the class's own digit/letter when the net has few enough classes,
    else the most frequent classes' (by cells won), so a 1000-class map still prints."""
    if dm.num_classes <= len(CHARS):
        return {c: CHARS[c] for c in range(dm.num_classes)}
    won = [e["class"] for e in dm.top_classes(dm.num_classes) if e["cells"] > 0 and e["class"] != background]
    return {c: CHARS[i] for i, c in enumerate(won[:len(CHARS)])}


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
    chars = char_table(dm, bg)
    block = "cell" if f == 1 else f"{f}x{f} block of cells"
    out = [f"argmax map, one character per {block} ({f * dm.geometry.stride[1]} px), "
           f"'.' = {dm.short(bg) if bg is not None else 'none'}"
           + (f"; the {len(chars)} classes that win the most cells by character, '{OTHER}' = any other"
              if dm.num_classes > len(CHARS) else "") + ":"]
    for r0 in range(0, rows, f):
        line = []
        for c0 in range(0, cols, f):
            block = arg[r0:r0 + f, c0:c0 + f]
            score = np.where(block != bg, peak[r0:r0 + f, c0:c0 + f], -1.0)
            if bg is not None and (block == bg).all():
                line.append(".")
            else:
                i = np.unravel_index(int(score.argmax()), block.shape)
                line.append(chars.get(int(block[i]), OTHER))
        out.append("  " + "".join(line))
    legend = ", ".join(f"{ch}={dm.short(c)}" for c, ch in chars.items()
                       if c != bg and dm.short(c) != ch)
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
                                       if dm.mode == "tiled" else "")
             + (f", engine {dm.engine}" if dm.engine else "")
             + (f" in {dm.precision}" if dm.precision != "f32" else "")]
    if dm.output is not None:
        lines.append(f"class map: output '{dm.output}'"
                     + "".join(f"; also output '{b}' ({a.shape[0]} values per cell)"
                               for b, a in dm.heads.items()))
    lines.append(f"model card: {dm.model.preprocess.describe()}; {dm.model.describe()}")
    if dm.softmax is not None:
        lines.append(f"values: {dm.softmax.describe()}")
    arg = dm.argmax()
    used = dm.classes_present()
    if cols <= max_cols and rows <= 60:
        width = max(len(str(c)) for c in used) if used else 1
        lines.append("argmax class per cell (rows top to bottom):")
        for r in range(rows):
            lines.append("  " + " ".join(str(int(v)).rjust(width) for v in arg[r]))
        legend = ", ".join(f"{c}={dm.short(c)}" for c in used[:20])
        lines.append(f"  where {legend}" + (" ..." if len(used) > 20 else ""))
    else:
        lines += char_map(dm)
    what = "probability" if dm.softmax is None or dm.softmax.applied else "score"
    lines.append(f"top classes over the map (cells won, peak {what}):")
    for e in dm.top_classes(top_k):
        lines.append(f"  {e['class']:>5} {dm.short(e['class'])[:30]:<30} {e['cells']:>6} cells  "
                     f"peak {e['max_prob']:.3f}")
    return "\n".join(lines)
