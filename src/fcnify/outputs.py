"""What a person sees: the text summary, the JSON, the .npy and the two pictures.

The heatmap shows one class's probability over the image (cells drawn at
their stride, centred on their fields), the argmax picture shows which class
wins each cell. Both are drawn in original-image pixels, so they line up
with the photo whatever --size/--scale was used.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from .files import OutputSet


def _cell_extent(dm) -> tuple[float, float, float, float]:
    """Image-pixel extent (left, right, bottom, top) of the map drawn as stride-sized tiles.

    Each cell is drawn as a stride x stride square centred on its field's centre.
    """
    rows, cols = dm.shape
    sy, sx = dm.scale
    (sty, stx) = dm.geometry.stride
    cx0, cy0 = dm.center(0, 0)
    half_x, half_y = stx / sx / 2, sty / sy / 2
    return (cx0 - half_x, cx0 - half_x + cols * stx / sx, cy0 - half_y + rows * sty / sy, cy0 - half_y)


def _figure(dm, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h, w = dm.image_size
    aspect = h / w
    fig, ax = plt.subplots(figsize=(8.0, max(3.0, 8.0 * aspect) + 0.6), dpi=100)
    if dm.image is not None:
        ax.imshow(dm.image, extent=(0, w, h, 0), interpolation="bilinear")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    return fig, ax, plt


def heatmap_png(dm, cls: int) -> bytes:
    """Probability of class `cls` over the image, with a colour bar."""
    fig, ax, plt = _figure(dm, f"P({dm.short(cls)}) — class {cls}, {dm.shape[0]}x{dm.shape[1]} map, "
                               f"stride {dm.geometry.stride[1]} px")
    im = ax.imshow(dm.probs[cls], extent=_cell_extent(dm), cmap="inferno", vmin=0.0, vmax=1.0,
                   alpha=0.6 if dm.image is not None else 1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=f"probability of '{dm.short(cls)}'")
    return _png(fig, plt)


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
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              title="class")
    return _png(fig, plt)


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    return buf.getvalue()


def output_names(out_dir: Path, name: str) -> dict[str, Path]:
    return {"scores": out_dir / f"{name}.scores.npy", "json": out_dir / f"{name}.map.json",
            "heatmap": out_dir / f"{name}.heatmap.png", "argmax": out_dir / f"{name}.argmax.png"}


def save_outputs(dm, out_dir: Path, name: str | None, cls: int | None, top_k: int,
                 command: str | None, force: bool) -> list[Path]:
    """The four files for one image, written all at once."""
    name = name or (dm.image_path.stem if dm.image_path else "image")
    cls = dm.default_class() if cls is None else cls
    names = output_names(out_dir, name)
    out = OutputSet(force)
    for p in names.values():
        out.check(p)
    with out:
        out.write_bytes(names["scores"], npy_bytes(dm.probs))
        data = dm.to_json(top_k, command)
        data["heatmap_class"] = {"class": cls, "label": dm.label(cls)}
        # compact: the C encoder is several times faster than indent= on maps of 10^4+ cells
        out.write_text(names["json"], json.dumps(data, separators=(",", ":")) + "\n")
        out.write_bytes(names["heatmap"], heatmap_png(dm, cls))
        out.write_bytes(names["argmax"], argmax_png(dm))
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
    lines = [f"{dm.image_path or 'image'}: {w}x{h} px"
             + (f" (fed at {dm.input_size[1]}x{dm.input_size[0]})" if dm.input_size != dm.image_size else ""),
             f"model {dm.model.name}: map {rows}x{cols} cells of {dm.num_classes} classes; each cell sees "
             f"a {g.field[1]}x{g.field[0]} px field every {g.stride[1]} px"
             + (f" (offset {g.offset[1]},{g.offset[0]})" if any(g.offset) else "")
             + f"; run: {dm.mode}" + (f", {dm.tiles} tiles of {dm.tile_size[1]}x{dm.tile_size[0]} px"
                                       if dm.mode == "tiled" else "")]
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
