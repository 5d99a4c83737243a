"""What a person sees: the text summary, the JSON, the .npy and the two pictures.

The heatmap shows one class's probability over the image (cells drawn at
their stride, centred on their windows), the argmax picture shows which class
wins each cell. Both outline one cell's window (the crop the classifier would
be given for it) and its reach (every pixel that can change it), and say so
in their legend. Both are drawn in original-image pixels, so they line up
with the photo whatever --size/--scale was used.
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


def _cell_extent(dm) -> tuple[float, float, float, float]:
    """Image-pixel extent (left, right, bottom, top) of the map drawn as stride-sized tiles.

    Each cell is drawn as a stride x stride square centred on its window's centre.
    """
    rows, cols = dm.shape
    sy, sx = dm.scale
    (sty, stx) = dm.geometry.stride
    cx0, cy0 = dm.center(0, 0)
    half_x, half_y = stx / sx / 2, sty / sy / 2
    return (cx0 - half_x, cx0 - half_x + cols * stx / sx, cy0 - half_y + rows * sty / sy, cy0 - half_y)


PREVIEW_PX = 1600  # the pictures are 800 px wide: twice that is plenty for their anti-aliasing


def preview(image: np.ndarray, limit: int = PREVIEW_PX) -> np.ndarray:
    """The photo shrunk by an integer factor (box average) to at most `limit` px a side.

    matplotlib converts what it draws to floating-point RGBA: a 10000x7000
    photo drawn whole costs gigabytes for an 800-px picture.
    """
    f = -(-max(image.shape[:2]) // limit)
    if f <= 1:
        return image
    h, w = image.shape[0] // f * f, image.shape[1] // f * f
    out = np.empty((h // f, w // f, image.shape[2]), np.uint8)
    for r0 in range(0, h // f, 64):  # a band at a time: no full-size float copy
        band = image[r0 * f:min(h, (r0 + 64) * f), :w].astype(np.float32)
        band = band.reshape(band.shape[0] // f, f, w // f, f, -1).mean(axis=(1, 3))
        out[r0:r0 + band.shape[0]] = np.rint(band).astype(np.uint8)
    return out


def _figure(dm, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h, w = dm.image_size
    aspect = h / w
    fig, ax = plt.subplots(figsize=(8.0, max(3.0, 8.0 * aspect) + 0.6), dpi=100)
    if dm.image is not None:
        ax.imshow(preview(dm.image), extent=(0, w, h, 0), interpolation="bilinear")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    return fig, ax, plt


HEAT_RANGES = ("map", "unit")


def heat_range(values: np.ndarray, how: str = "map") -> tuple[float, float]:
    """The colour scale's ends: the map's own range ("map"), or 0-1 ("unit").

    A class that peaks at 0.08 would be a uniformly dark picture on 0-1; on its
    own range its peaks show, and the colour bar says what the colours mean.
    """
    if how == "unit":
        return 0.0, 1.0
    if how != "map":
        raise ValueError(f"heatmap range {how!r} is not one of {', '.join(HEAT_RANGES)}")
    lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (max(0.0, lo - 0.5), lo + 0.5)


def heatmap_png(dm, cls: int, scale: str = "map") -> bytes:
    """Probability of class `cls` over the image, with a colour bar over `scale` (heat_range)."""
    fig, ax, plt = _figure(dm, f"P({dm.short(cls)}) — class {cls}, {dm.shape[0]}x{dm.shape[1]} map, "
                               f"stride {dm.geometry.stride[1]} px")
    vmin, vmax = heat_range(dm.probs[cls], scale)
    im = ax.imshow(dm.probs[cls], extent=_cell_extent(dm), cmap="inferno", vmin=vmin, vmax=vmax,
                   alpha=0.6 if dm.image is not None else 1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=f"probability of '{dm.short(cls)}'")
    row, col = np.unravel_index(int(dm.probs[cls].argmax()), dm.shape)
    _geometry_legend(fig, ax, dm, int(row), int(col))
    return _png(fig, plt)


def geometry_marks(ax, dm, row: int, col: int) -> list:
    """Outline cell (row, col)'s window and reach on `ax`; the legend entries that explain them."""
    from matplotlib.patches import Rectangle
    marks = []
    for kind, box, style in (("window", dm.box(row, col, clip=False), dict(ec="#00e5ff", ls="-", lw=2.0)),
                             ("reach", dm.reach(row, col, clip=False), dict(ec="#ff2bd6", ls="--", lw=1.5))):
        x0, y0, x1, y1 = box
        what = ("the crop the classifier would be given for this cell" if kind == "window"
                else "every pixel that can change this cell")
        label = f"{kind} of cell ({row}, {col}), {hw(y1 - y0, x1 - x0)} px: {what}"
        marks.append(ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, label=label,
                                            **style)))
    return marks


def _geometry_legend(fig, ax, dm, row: int, col: int) -> None:
    """One cell's window and reach, outlined, and explained in a legend under the picture."""
    fig.legend(handles=geometry_marks(ax, dm, row, col), loc="upper center", ncol=1, fontsize=8,
               bbox_to_anchor=(0.5, 0.0), frameon=False)


def argmax_png(dm, max_legend: int = 12) -> bytes:
    """Winning class per cell, with a legend of the classes that win cells."""
    import matplotlib.colors as mcolors
    from matplotlib.patches import Patch
    arg = dm.argmax()
    present = [e["class"] for e in dm.top_classes(dm.num_classes) if e["cells"] > 0]
    index = {c: i for i, c in enumerate(present)}
    compact = np.vectorize(index.get)(arg)
    base = [mcolors.to_rgba(c) for c in
            (list(mcolors.TABLEAU_COLORS.values()) + list(mcolors.CSS4_COLORS.values())[10::7])]
    colors = [base[i % len(base)] for i in range(len(present))]
    if dm.model.background_class in index:
        colors[index[dm.model.background_class]] = (0.85, 0.85, 0.85, 1.0)
    cmap = mcolors.ListedColormap(colors) if colors else "tab20"
    fig, ax, plt = _figure(dm, f"Winning class per cell — {dm.shape[0]}x{dm.shape[1]} map")
    alpha = np.full(arg.shape, 0.55 if dm.image is not None else 1.0)
    if dm.image is not None and dm.model.background_class is not None:
        # background cells stay see-through, so the detections stand out on the photo
        alpha[arg == dm.model.background_class] = 0.0
        alpha[arg != dm.model.background_class] = 0.9
    ax.imshow(compact, extent=_cell_extent(dm), cmap=cmap, vmin=-0.5, vmax=len(present) - 0.5,
              alpha=alpha, interpolation="nearest")
    shown = present[:max_legend]
    handles = [Patch(color=colors[index[c]], label=f"{c}: {dm.short(c)}") for c in shown]
    if len(present) > max_legend:
        handles.append(Patch(color="white", label=f"... {len(present) - max_legend} more"))
    rows, cols = dm.shape
    _geometry_legend(fig, ax, dm, rows // 2, cols // 2)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              title="class")
    return _png(fig, plt)


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


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
                 command: str | None, *, force: bool, heat_scale: str = "map") -> list[Path]:
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
    lines.append("top classes over the map (cells won, peak probability):")
    for e in dm.top_classes(top_k):
        lines.append(f"  {e['class']:>5} {dm.short(e['class'])[:30]:<30} {e['cells']:>6} cells  "
                     f"peak {e['max_prob']:.3f}")
    return "\n".join(lines)
