"""The pictures drawn as arrays: every cell's colour where the cell is, the scale and the names said."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fcnify.caffe.geometry import AxisGeometry, MapGeometry
from fcnify.dense.dense import DenseMap
from fcnify.io import pictures
from fcnify.io.labels import Labels
from fcnify.io.models import ModelCard
from fcnify.io.preprocess import Preprocess

PHOTO_RGB = np.array([10, 200, 30])


def _map(probs: np.ndarray, photo: bool = True, background: int | None = None,
         scale: float = 1.0, labels: list[str] | None = None) -> DenseMap:
    """A map whose cells are 8 px apart with 31-px windows, over a one-colour photo."""
    axis = AxisGeometry(stride=8, box_lo=-3, box_hi=28, reach_lo=-10, reach_hi=40)
    card = ModelCard("t", "t.prototxt", None, Preprocess(), background_class=background)
    rows, cols = probs.shape[1:]
    size = (rows * 8 + 40, cols * 8 + 40)
    fed = (round(size[0] * scale), round(size[1] * scale))
    image = np.broadcast_to(PHOTO_RGB.astype(np.uint8), (*size, 3)).copy() if photo else None
    return DenseMap(probs, MapGeometry("out", axis, axis), size, fed, card, image=image,
                    labels=Labels(labels, None) if labels else None)


def _probs(classes: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(classes, 0.3), size=(rows, cols)).transpose(2, 0, 1).astype(np.float32)


def _cell_pixels(pic, dm):
    """(row, col, pixel of the area under the cell's centre) for cells away from the outlines."""
    zy, zx = pic.area.shape[0] / dm.image_size[0], pic.area.shape[1] / dm.image_size[1]
    near = np.zeros(pic.area.shape[:2], bool)
    for x0, y0, x1, y1 in pic.marks.values():  # the outlines are 2 px wide, dashes included
        band = np.zeros_like(near)
        band[max(0, int(y0) - 3):max(0, int(y1) + 4), max(0, int(x0) - 3):max(0, int(x1) + 4)] = True
        band[max(0, int(y0) + 4):max(0, int(y1) - 3), max(0, int(x0) + 4):max(0, int(x1) - 3)] = False
        near |= band
    for r in range(dm.shape[0]):
        for c in range(dm.shape[1]):
            cx, cy = dm.center(r, c)
            py, px = int(cy * zy), int(cx * zx)
            if 0 <= py < pic.area.shape[0] and 0 <= px < pic.area.shape[1] and not near[py, px]:
                yield r, c, pic.area[py, px]


def _over_photo(colour, alpha: int) -> np.ndarray:
    """A colour blended over the photo at alpha/255, rounded to the nearest 8-bit value."""
    return np.rint((PHOTO_RGB * (255 - alpha) + np.asarray(colour, float) * alpha) / 255).astype(np.uint8)


def test_inferno_table_is_matplotlibs():
    """The shipped colour table is matplotlib's inferno, to 8 bits."""
    import matplotlib
    want = np.rint(matplotlib.colormaps["inferno"](np.arange(256))[:, :3] * 255).astype(np.uint8)
    assert np.array_equal(pictures.inferno(), want)


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (64, 97, 3)])
def test_png_encoding_round_trips(shape):
    """encode_png writes a PNG that Pillow reads back to the same pixels."""
    rgb = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    rgb[1:] = rgb[:1] // 3 + rgb[1:] // 2  # rows that differ by less than a byte, and that wrap
    with Image.open(io.BytesIO(pictures.encode_png(rgb))) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), rgb)


@pytest.mark.parametrize("photo", [False, True])
def test_heatmap_cells_take_the_colour_of_their_probability(photo):
    """On the default 0-1 scale, each cell shows inferno[p * 255] (blended at 0.6 over a photo)."""
    probs = _probs(4, 9, 11)
    probs[2, 4, 5] = 1.0
    dm = _map(probs, photo=photo)
    pic = pictures.heatmap_picture(dm, 2)
    lut = pictures.inferno()
    seen = 0
    for r, c, pixel in _cell_pixels(pic, dm):
        colour = lut[int(np.rint(float(probs[2, r, c]) * 255))]
        assert np.array_equal(pixel, _over_photo(colour, 153) if photo else colour), (r, c)
        seen += 1
    assert seen > 50
    assert pic.bar == (0.0, 1.0, 1.0)
    assert "max 1 at cell (4, 5)" in pic.title[0] and "0 to 1" in pic.title[1]
    if photo:  # outside every cell, the photo itself
        assert np.array_equal(pic.area[0, 0], PHOTO_RGB)


def test_stretched_heatmap_says_so_and_spans_the_table():
    """--heatmap-scale map: the faintest cell is the table's first colour, the peak its last, and the
    title says the colours are stretched and states the peak."""
    probs = _probs(3, 6, 7, seed=1)
    dm = _map(probs, photo=False, labels=["sky", "tabby", "river"])
    values = probs[1]
    pic = pictures.heatmap_picture(dm, 1, "map")
    lo, hi = float(values.min()), float(values.max())
    assert pic.bar == (lo, hi, hi)
    assert pic.title[0].startswith(f"P(tabby), class 1: max {hi:.3g}")
    assert "STRETCHED" in pic.title[1] and f"{lo:.3g} to {hi:.3g}" in pic.title[1]
    drawn = {(r, c): tuple(p) for r, c, p in _cell_pixels(pic, dm)}
    lut = pictures.inferno()
    rmin, cmin = np.unravel_index(values.argmin(), values.shape)
    rmax, cmax = np.unravel_index(values.argmax(), values.shape)
    if (rmin, cmin) in drawn:
        assert drawn[rmin, cmin] == tuple(lut[0])
    if (rmax, cmax) in drawn:
        assert drawn[rmax, cmax] == tuple(lut[255])
    for (r, c), p in drawn.items():
        assert p == tuple(lut[int(np.rint((float(values[r, c]) - lo) / (hi - lo) * 255))])


def test_faint_class_on_the_unit_scale_is_dark_and_its_peak_is_stated():
    """A class peaking at 0.02 is drawn in the table's darkest colours by default, with its peak stated."""
    probs = np.full((2, 5, 5), 0.99, np.float32)
    probs[1] = np.linspace(0.0, 0.02, 25, dtype=np.float32).reshape(5, 5)
    probs[0] = 1 - probs[1]
    pic = pictures.heatmap_picture(_map(probs, photo=False), 1)
    assert "max 0.02 " in pic.title[0] + " "
    lut = pictures.inferno()
    for _, _, p in _cell_pixels(pic, _map(probs, photo=False)):
        assert any(np.array_equal(p, lut[i]) for i in range(0, 6))


@pytest.mark.parametrize("background", [None, 3])
def test_argmax_cells_take_their_classes_legend_colour(background):
    """Each cell shows its winning class's legend colour; background cells stay the photo."""
    probs = _probs(5, 8, 10, seed=2)
    names = ["ant", "bee", "cat", "bg", "dog"]
    dm = _map(probs, background=background, labels=names)
    pic = pictures.argmax_picture(dm)
    arg = probs.argmax(axis=0)
    won = np.bincount(arg.ravel(), minlength=5)
    present = sorted((c for c in range(5) if won[c]), key=lambda c: (-won[c], -probs[c].max()))
    assert [text.split(" (")[0] for _, text in pic.legend] == [f"{c}: {names[c]}" for c in present]
    assert all(f"({won[c]} cells" in text for c, (_, text) in zip(present, pic.legend))
    colours = {c: tuple(swatch) for c, (swatch, _) in zip(present, pic.legend)}
    assert len(set(colours.values())) == len(colours)
    for r, c, pixel in _cell_pixels(pic, dm):
        k = int(arg[r, c])
        if k == background:
            assert np.array_equal(pixel, PHOTO_RGB), (r, c)
        else:
            alpha = 140 if background is None else 230
            assert np.array_equal(pixel, _over_photo(colours[k], alpha)), (r, c)


def test_argmax_legend_is_cut_at_twelve_classes_and_says_how_many_more():
    probs = np.eye(20, dtype=np.float32)[np.arange(20) % 20].T.reshape(20, 4, 5)
    pic = pictures.argmax_picture(_map(probs, photo=False))
    assert len(pic.legend) == 13 and pic.legend[-1] == (None, "... 8 more classes")


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_window_and_reach_outlines_where_the_cell_is_in_the_photo(scale):
    """The outlined window and reach are the cell's, in picture pixels, whatever --scale fed the net;
    the notes under the picture name them and their sizes."""
    probs = _probs(3, 6, 7, seed=4)
    dm = _map(probs, scale=scale)
    pic = pictures.heatmap_picture(dm, 0)
    r, c = np.unravel_index(probs[0].argmax(), probs[0].shape)
    zy, zx = pic.area.shape[0] / dm.image_size[0], pic.area.shape[1] / dm.image_size[1]
    for kind, box in (("window", dm.box(r, c, clip=False)), ("reach", dm.reach(r, c, clip=False))):
        x0, y0, x1, y1 = box
        assert pic.marks[kind] == pytest.approx((x0 * zx, y0 * zy, x1 * zx - 1, y1 * zy - 1))
    window, reach = (f"{round(n / scale)}x{round(n / scale)}" for n in (dm.geometry.window[0], dm.geometry.reach[0]))
    assert f"window of cell ({r}, {c}), {window} px" in pic.notes[0][1]
    assert f"reach of cell ({r}, {c}), {reach} px" in pic.notes[1][1]


def test_picture_file_is_the_drawing(tmp_path):
    """heatmap_png is the rendered picture, its map area where area_origin says."""
    probs = _probs(3, 6, 7, seed=5)
    dm = _map(probs)
    pic = pictures.heatmap_picture(dm, 1)
    with Image.open(io.BytesIO(pictures.heatmap_png(dm, 1))) as im:
        got = np.asarray(im)
    x0, y0 = pictures.area_origin(pic)
    h, w = pic.area.shape[:2]
    assert np.array_equal(got[y0:y0 + h, x0:x0 + w], pic.area)
    assert max(h, w) == pictures.MIN_SIDE  # a small image is enlarged to be readable


def test_area_size_keeps_the_long_side_within_bounds():
    """Small photos are enlarged to 256 px, large ones shrunk to 640 (the old figures' map area);
    in between they are drawn pixel for pixel."""
    assert pictures.area_size((28, 28)) == (256, 256)
    assert pictures.area_size((256, 200)) == (256, 200)
    assert pictures.area_size((4000, 6000)) == (427, 640)
    assert pictures.area_size((600, 800)) == (480, 640)
