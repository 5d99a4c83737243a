"""The two pictures of a map, drawn as arrays: a colour lookup table, an alpha blend, Pillow's text.

A batch writes two pictures per image, so they must cost milliseconds, not
the hundreds a plotting library's figure costs. Each picture is the photo
(scaled so its long side is 256-640 px) with the map's cells blended over
it, every cell a stride-sized square centred on its window, drawn in
original-image pixels whatever --size/--scale fed the net; one cell's window
(the crop the classifier would be given for it) and reach (every pixel that
can change it) outlined; a title that states the class and its peak; the
heatmap's colour bar, or the argmax picture's class legend.

The drawing is kept as data (`Picture`) before it becomes PNG bytes, so that
what a picture shows can be checked cell by cell.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

from ..caffe.geometry import hw

MIN_SIDE, MAX_SIDE = 256, 640  # the map area's long side, in picture pixels (as the old 800-px figures)
PREVIEW_PX = 2 * MAX_SIDE  # box-average a large photo to about this before the final resize
HEAT_ALPHA = 153  # 0.6 of 255: the heatmap over a photo
CLASS_ALPHA = 140  # 0.55: the argmax picture over a photo, when the net has no background class
FOREGROUND_ALPHA = 230  # 0.9: non-background cells, when background cells stay see-through
BACKGROUND_RGB = (217, 217, 217)  # the background class's colour (when drawn without a photo)
WINDOW_RGB, REACH_RGB = (0, 229, 255), (255, 43, 214)
PAPER, INK = (255, 255, 255), (0, 0, 0)
# tab10, then the lighter tab20 shades: 20 colours a reader can tell apart
PALETTE = tuple(tuple(int(h[i:i + 2], 16) for i in (0, 2, 4)) for h in (
    "1f77b4 ff7f0e 2ca02c d62728 9467bd 8c564b e377c2 7f7f7f bcbd22 17becf "
    "aec7e8 ffbb78 98df8a ff9896 c5b0d5 c49c94 f7b6d2 c7c7c7 dbdb8d 9edae5").split())
HEAT_RANGES = ("unit", "map")
FONT_PX = 13
LINE_PX = 17


@lru_cache(maxsize=1)
def inferno() -> np.ndarray:
    """The heatmap's 256 x 3 uint8 colour table (matplotlib's inferno, shipped as data)."""
    text = resources.files("fcnify").joinpath("data/inferno.txt").read_text()
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    return np.array([[int(r[i:i + 2], 16) for i in (0, 2, 4)] for r in rows], dtype=np.uint8)


@lru_cache(maxsize=1)
def _font():
    from PIL import ImageFont
    return ImageFont.load_default(size=FONT_PX)


def preview(image: np.ndarray, limit: int = PREVIEW_PX) -> np.ndarray:
    """The photo shrunk by an integer factor (box average) to at most `limit` px a side.

    A 10000x7000 photo resized whole in one go would cost a full-size float
    copy; bands of it cost a band's.
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


def heat_range(values: np.ndarray, how: str = "unit") -> tuple[float, float]:
    """The colour scale's ends: 0-1 ("unit", the default), or the map's own range ("map").

    On 0-1 a colour means the same probability in every picture; a class
    that peaks at 0.02 is dark, and the title says its peak. "map" stretches
    the colours over the class's own range to show where a faint class
    peaks; the picture then says so in its title.
    """
    if how == "unit":
        return 0.0, 1.0
    if how != "map":
        raise ValueError(f"heatmap range {how!r} is not one of {', '.join(HEAT_RANGES)}")
    lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (max(0.0, lo - 0.5), lo + 0.5)


def heat_index(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Each value's row of the colour table: lo -> 0, hi -> 255, linear between, clipped."""
    t = (np.asarray(values, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(t), 0, 255).astype(np.uint8)


@dataclass
class Picture:
    """A picture before it is encoded: the map area's pixels and what the text around it says."""

    area: np.ndarray  # H x W x 3 uint8: photo, cells blended over it, the cell's outlines
    zoom: float  # picture pixels per original-image pixel
    title: list[str]
    legend: list[tuple[tuple[int, ...] | None, str]]  # (swatch colour or None, text), beside the map
    notes: list[tuple[tuple[int, ...], str]]  # (line colour, text) under the map: window, reach
    bar: tuple[float, float, float] | None = None  # heatmap: (lo, hi, the map's peak) of the colour bar
    marks: dict = field(default_factory=dict)  # "window"/"reach" -> (x0, y0, x1, y1) in area pixels


def zoom_for(image_size: tuple[int, int]) -> float:
    """Picture pixels per image pixel: the long side brought into [MIN_SIDE, MAX_SIDE]."""
    long = max(image_size)
    return MIN_SIDE / long if long < MIN_SIDE else min(1.0, MAX_SIDE / long)


def area_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the map area for an image of `image_size`."""
    z = zoom_for(image_size)
    return max(1, round(image_size[0] * z)), max(1, round(image_size[1] * z))


def backdrop(dm) -> np.ndarray:
    """The photo at the map area's size (white paper when the map has no photo)."""
    from PIL import Image
    h, w = area_size(dm.image_size)
    if dm.image is None:
        return np.full((h, w, 3), PAPER, np.uint8)
    small = Image.fromarray(np.ascontiguousarray(preview(dm.image)[..., :3]))
    if small.mode != "RGB":
        small = small.convert("RGB")
    return np.asarray(small.resize((w, h), Image.BILINEAR))


def cell_of_pixel(n_px: int, zoom: float, first: float, step: float, cells: int) -> np.ndarray:
    """The cell under each picture pixel along one axis; `cells` (one past the last) where none is.

    Cell i is drawn over image coordinates [first + i*step, first + (i+1)*step):
    a stride-sized square centred on its window's centre. A pixel belongs to
    the cell under its centre.
    """
    x = (np.arange(n_px) + 0.5) / zoom
    i = np.floor((x - first) / step).astype(np.intp)
    return np.where((i >= 0) & (i < cells), i, cells)


def cell_grid(dm) -> tuple[float, float, float, float]:
    """(first_x, step_x, first_y, step_y): where the cells are drawn, in original-image pixels."""
    sy, sx = dm.scale
    st_y, st_x = dm.geometry.stride
    cx0, cy0 = dm.center(0, 0)
    return cx0 - st_x / sx / 2, st_x / sx, cy0 - st_y / sy / 2, st_y / sy


def blend(base: np.ndarray, dm, rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`base` with each cell's colour `rgb[r, c]` blended over it at `alpha[r, c]` (0-255).

    out = (base * (255 - a) + colour * a) / 255, rounded: exact integers, so
    a test can predict every pixel.
    """
    h, w = base.shape[:2]
    rows, cols = dm.shape
    zoom = h / dm.image_size[0], w / dm.image_size[1]
    fx, sx, fy, sy = cell_grid(dm)
    ri = cell_of_pixel(h, zoom[0], fy, sy, rows)
    ci = cell_of_pixel(w, zoom[1], fx, sx, cols)
    # one extra row and column stand for "no cell": nothing blended there
    keep = np.full((rows + 1, cols + 1, 1), 255, np.uint16)
    keep[:rows, :cols, 0] = 255 - np.asarray(alpha, np.uint16)
    add = np.full((rows + 1, cols + 1, 3), 127, np.uint16)  # 127: round the division, not floor it
    add[:rows, :cols] += np.asarray(rgb, np.uint16) * (255 - keep[:rows, :cols])
    x = base.astype(np.uint16)
    x *= keep[ri][:, ci]
    x += add[ri][:, ci]
    x += 1 + (x >> 8)  # then x >> 8 is x // 255 exactly for x <= 255 * 255 + 127
    x >>= 8
    return x.astype(np.uint8)


def _outline(draw, box, colour, width: int, dash: int | None) -> None:
    """A rectangle's outline, solid or dashed (Pillow draws no dashed lines)."""
    x0, y0, x1, y1 = box
    if dash is None:
        draw.rectangle(box, outline=colour, width=width)
        return
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)),
                               ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // (2 * dash)) + 1)
        for i in range(steps):
            t0, t1 = i * 2 * dash / max(length, 1), min(1.0, (i * 2 + 1) * dash / max(length, 1))
            if t0 >= 1:
                break
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=colour, width=width)


def mark_cell(area: np.ndarray, dm, row: int, col: int) -> tuple[np.ndarray, dict, list]:
    """Outline cell (row, col)'s window (solid) and reach (dashed) on the area; the notes explaining them."""
    from PIL import Image, ImageDraw
    img = Image.fromarray(area)
    draw = ImageDraw.Draw(img)
    zy, zx = area.shape[0] / dm.image_size[0], area.shape[1] / dm.image_size[1]
    marks, notes = {}, []
    for kind, box, colour, width, dash in (
            ("window", dm.box(row, col, clip=False), WINDOW_RGB, 2, None),
            ("reach", dm.reach(row, col, clip=False), REACH_RGB, 2, 6)):
        x0, y0, x1, y1 = box
        at = (x0 * zx, y0 * zy, x1 * zx - 1, y1 * zy - 1)
        _outline(draw, at, colour, width, dash)
        marks[kind] = at
        what = ("the crop the classifier would be given for this cell" if kind == "window"
                else "every pixel that can change this cell")
        notes.append((colour, f"{'solid' if dash is None else 'dashed'}: {kind} of cell ({row}, {col}), "
                              f"{hw(y1 - y0, x1 - x0)} px: {what}"))
    return np.asarray(img), marks, notes


def heatmap_picture(dm, cls: int, scale: str = "unit") -> Picture:
    """Probability of class `cls` over the image, on 0-1 unless `scale` is "map" (heat_range)."""
    values = dm.probs[cls]
    lo, hi = heat_range(values, scale)
    peak = float(values.max())
    row, col = (int(v) for v in np.unravel_index(int(values.argmax()), dm.shape))
    rgb = inferno()[heat_index(values, lo, hi)]
    alpha = HEAT_ALPHA if dm.image is not None else 255
    area = blend(backdrop(dm), dm, rgb, np.full(dm.shape, alpha, np.uint8))
    area, marks, notes = mark_cell(area, dm, row, col)
    colours = ("colours: probability 0 to 1" if scale == "unit"
               else f"colours STRETCHED over this map's range {lo:.3g} to {hi:.3g} (not 0 to 1)")
    title = [f"P({dm.short(cls)}), class {cls}: max {peak:.3g} at cell ({row}, {col})",
             f"{dm.shape[0]}x{dm.shape[1]} map, stride {dm.geometry.stride[1]} px; {colours}"]
    return Picture(area, area.shape[1] / dm.image_size[1], title, [], notes, (lo, hi, peak), marks)


def argmax_picture(dm, max_legend: int = 12) -> Picture:
    """Winning class per cell, with a legend of the classes that win cells (most cells first)."""
    arg = dm.argmax()
    won = np.bincount(arg.ravel(), minlength=dm.num_classes)
    present = dm.classes_present()
    bg = dm.model.background_class
    colour = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(present)}
    if bg in colour:
        colour[bg] = BACKGROUND_RGB
    table = np.zeros((dm.num_classes, 3), np.uint8)
    for c, rgb in colour.items():
        table[c] = rgb
    if dm.image is None:
        alpha = np.full(arg.shape, 255, np.uint8)
    elif bg is not None:  # background cells stay see-through, so the detections stand out on the photo
        alpha = np.where(arg == bg, 0, FOREGROUND_ALPHA).astype(np.uint8)
    else:
        alpha = np.full(arg.shape, CLASS_ALPHA, np.uint8)
    area = blend(backdrop(dm), dm, table[arg], alpha)
    rows, cols = dm.shape
    area, marks, notes = mark_cell(area, dm, rows // 2, cols // 2)
    legend = [(colour[c], f"{c}: {dm.short(c)} ({won[c]} cells)"
               + (", see-through" if c == bg and dm.image is not None else "")) for c in present[:max_legend]]
    if len(present) > max_legend:
        legend.append((None, f"... {len(present) - max_legend} more classes"))
    title = [f"Winning class per cell: {rows}x{cols} map, stride {dm.geometry.stride[1]} px",
             f"{len(present)} class(es) win cells"]
    return Picture(area, area.shape[1] / dm.image_size[1], title, legend, notes, None, marks)


def _colour_bar(canvas, draw, x: int, y: int, height: int, bar: tuple[float, float, float]) -> None:
    """A vertical colour bar from lo (bottom) to hi (top), with ticks and the map's peak marked."""
    from PIL import Image
    lo, hi, peak = bar
    font = _font()
    rows = inferno()[np.linspace(255, 0, height).round().astype(np.intp)]
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(rows[:, None], 16, axis=1))), (x, y))
    draw.rectangle([x, y, x + 15, y + height - 1], outline=INK)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        ty = y + round((1 - t) * (height - 1))
        draw.line([(x + 16, ty), (x + 20, ty)], fill=INK)
        draw.text((x + 22, ty - FONT_PX // 2), f"{lo + t * (hi - lo):.3g}", fill=INK, font=font)
    py = y + round((1 - min(1.0, max(0.0, (peak - lo) / (hi - lo)))) * (height - 1))
    draw.polygon([(x - 7, py - 4), (x - 1, py), (x - 7, py + 4)], fill=INK)
    ly = y + height + 12 + FONT_PX // 2  # the same arrow again, explained under the bar
    draw.polygon([(x - 7, ly - 4), (x - 1, ly), (x - 7, ly + 4)], fill=INK)
    draw.text((x + 2, y + height + 12), f"max {peak:.3g}", fill=INK, font=font)


MARGIN = 10  # paper around the map area, in picture pixels


def area_origin(pic: Picture) -> tuple[int, int]:
    """(x, y) of the map area's top-left pixel in the rendered picture: below the title."""
    return MARGIN, 8 + LINE_PX * len(pic.title) + 6


def render(pic: Picture):
    """The picture as a Pillow image: title above, map area, colour bar or legend beside, notes under."""
    from PIL import Image, ImageDraw
    font = _font()
    h, w = pic.area.shape[:2]
    x0, top = area_origin(pic)
    right = x0 + w + 12  # where the colour bar or the legend starts
    side = 90 if pic.bar is not None else (
        30 + max(int(font.getlength(text)) for _, text in pic.legend) if pic.legend else 0)
    texts = pic.title + [t for _, t in pic.notes]
    width = max(right + side, x0 + max(int(font.getlength(t)) for t in texts) + 34)
    body = max(h, LINE_PX * len(pic.legend) + 8, 240 if pic.bar else 0)
    height = top + body + 8 + LINE_PX * len(pic.notes) + 8
    canvas = Image.new("RGB", (width, height), PAPER)
    canvas.paste(Image.fromarray(pic.area), (x0, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(pic.title):
        draw.text((x0, 8 + i * LINE_PX), line, fill=INK, font=font)
    if pic.bar is not None:
        _colour_bar(canvas, draw, right + 8, top, max(200, h - 2 * LINE_PX - 8), pic.bar)
    for i, (swatch, text) in enumerate(pic.legend):
        y = top + i * LINE_PX
        if swatch is not None:
            draw.rectangle([right, y + 2, right + 12, y + 14], fill=tuple(swatch), outline=INK)
        draw.text((right + 18, y), text, fill=INK, font=font)
    y = top + body + 8
    for i, (colour, text) in enumerate(pic.notes):
        ly = y + i * LINE_PX + LINE_PX // 2
        draw.line([(x0, ly), (x0 + 18, ly)], fill=tuple(colour), width=3)
        draw.text((x0 + 24, y + i * LINE_PX), text, fill=INK, font=font)
    return canvas


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """An RGB array as PNG bytes: every row "Up"-filtered (PNG filter 2) by numpy, then zlib.

    Pillow's encoder tries five filters per row and costs 4-5x more for the
    same file size (48 ms against 10 ms for a 512x512 photo); zlib at level 1
    gives files within 5% of level 6's for photos, in a seventh of the time.
    """
    h, w, c = rgb.shape
    flat = np.ascontiguousarray(rgb, dtype=np.uint8).reshape(h, w * c)
    raw = np.empty((h, 1 + w * c), np.uint8)
    raw[0, 0], raw[0, 1:] = 0, flat[0]  # the first row has no row above: unfiltered
    raw[1:, 0] = 2
    np.subtract(flat[1:], flat[:-1], out=raw[1:, 1:])  # modulo 256, as the filter is defined

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + chunk(b"IEND", b""))


def png_bytes(pic: Picture) -> bytes:
    """The picture as PNG."""
    return encode_png(np.asarray(render(pic)))


def heatmap_png(dm, cls: int, scale: str = "unit") -> bytes:
    return png_bytes(heatmap_picture(dm, cls, scale))


def argmax_png(dm, max_legend: int = 12) -> bytes:
    return png_bytes(argmax_picture(dm, max_legend))
