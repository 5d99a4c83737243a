"""Windowed input: tiled (pyramidal) TIFFs read a tile's window at a time, never decoded whole."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from fcnify.caffe.planner import HEADROOM
from fcnify.convert import card_for_model_def, convert
from fcnify.dense import dense as dense_module
from fcnify.dense.dense import DenseModel
from fcnify.errors import ImageError, InputError, ResourceError
from fcnify.io.windows import TiffWindows, windowed
from fcnify.surgery.bound import within

from bounds import map_bound
from conftest import call_fcnify, write_model
from test_tiling import STRIDE8, _image

TILE = 64  # the file's own tiles: small, so a window spans several


def write_pyramid(path: Path, rgb: np.ndarray, levels: int = 2, tile: int = TILE,
                  compression: str = "deflate") -> list[np.ndarray]:
    """A tiled pyramidal TIFF (SubIFDs, as whole-slide writers do); returns each level's pixels."""
    pyramid = [rgb]
    for _ in range(levels - 1):
        pyramid.append(np.ascontiguousarray(pyramid[-1][::2, ::2]))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(rgb, tile=(tile, tile), compression=compression, photometric="rgb",
                 subifds=levels - 1)
        for level in pyramid[1:]:
            tw.write(level, tile=(tile, tile), compression=compression, photometric="rgb",
                     subfiletype=1)
    return pyramid


@pytest.fixture(scope="module")
def s8(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("windows-net")
    proto, weights = write_model(tmp, "stride8", STRIDE8, seed=3)
    result = convert(proto, weights, tmp / "s8", check=False)
    model = DenseModel(card_for_model_def(result.outputs["prototxt"], result.outputs["caffemodel"]),
                       engine="caffe")  # the tight-budget tests use Caffe's memory model
    yield model, result.outputs["prototxt"], result.outputs["caffemodel"]
    model.close()


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("windows") / "slide.tif"
    levels = write_pyramid(path, _image(301, 397, seed=5))
    return path, levels


def test_windows_equal_the_array_crops(slide):
    """Any window, at the edges too and spanning several file tiles, is the array's crop to the bit."""
    path, levels = slide
    rng = np.random.default_rng(0)
    with TiffWindows(path) as src:
        assert src.shape == levels[0].shape[:2]
        for _ in range(20):
            y0, x0 = int(rng.integers(0, 300)), int(rng.integers(0, 396))
            y1, x1 = int(rng.integers(y0 + 1, 302)), int(rng.integers(x0 + 1, 398))
            assert np.array_equal(src.read(y0, y1, x0, x1), levels[0][y0:y1, x0:x1])
    with TiffWindows(path, level=1) as src:
        assert np.array_equal(src.read(0, src.shape[0], 0, src.shape[1]), levels[1])


def test_grey_16_bit_becomes_rgb_scaled(tmp_path):
    """16-bit grey samples v become round(v * 255 / 65535) in all three channels."""
    grey = np.arange(200 * 150, dtype=np.uint16).reshape(200, 150) * 2
    tifffile.imwrite(tmp_path / "g.tif", grey, tile=(64, 64))
    with TiffWindows(tmp_path / "g.tif") as src:
        got = src.read(10, 150, 20, 140)
    want = np.rint(grey[10:150, 20:140] * 255.0 / 65535).astype(np.uint8)
    assert np.array_equal(got, np.repeat(want[:, :, None], 3, axis=2))


def test_only_tiled_tiffs_are_windowed(tmp_path, slide):
    """A stripped TIFF and a PNG go through Pillow as before; a tiled TIFF is read by window."""
    from PIL import Image
    tifffile.imwrite(tmp_path / "strips.tif", np.zeros((50, 60, 3), np.uint8), photometric="rgb")
    Image.new("RGB", (60, 50)).save(tmp_path / "p.png")
    assert windowed(slide[0])
    assert not windowed(tmp_path / "strips.tif")
    assert not windowed(tmp_path / "p.png")


def test_tiled_map_reads_windows_not_the_image(s8, slide, monkeypatch):
    """classify on the TIFF never decodes it whole, reads each tile's window, and equals the array's map."""
    model = s8[0]
    path, levels = slide
    reads = []
    real = TiffWindows.read

    def spy(self, y0, y1, x0, x1):
        reads.append((y1 - y0) * (x1 - x0))
        return real(self, y0, y1, x0, x1)

    monkeypatch.setattr(TiffWindows, "read", spy)
    monkeypatch.setattr(dense_module, "load_image", lambda *a, **k: pytest.fail("decoded whole"))
    dm = model.classify(path, tile=120, keep_image=False)
    tiles, _ = model.plan(*levels[0].shape[:2], tile=120)
    assert len(reads) == len(tiles) > 4
    assert max(reads) <= 120 * 120 < levels[0].shape[0] * levels[0].shape[1]
    monkeypatch.undo()
    want = model.classify(levels[0], tile=120)
    assert np.array_equal(dm.probs, want.probs)  # the same pixels through the same tiles
    assert dm.image_size == levels[0].shape[:2]


def test_tiled_scores_equal_the_whole_image(s8, slide):
    """The stitched windows' scores equal one whole-image pass within the float32 bound."""
    model = s8[0]
    path, levels = slide
    with TiffWindows(path, level=1) as src:
        tiled, info = model.run_scores(src, tile=96)
    whole, _ = model.run_scores(levels[1])
    assert info["tiles"] > 1
    ok, used = within(whole, tiled, map_bound(model, levels[1]))
    assert ok, f"windowed map differs by {used:.3g} of the bound"


def test_planner_counts_the_readers_buffers(s8, slide):
    """Under a tight budget, every tile's engine estimate plus the reader's buffers fits the budget."""
    model = s8[0]
    path, _ = slide
    budget = 150 * 2**20
    with TiffWindows(path) as src:
        tiles, size = model.plan(*src.shape, budget=budget, reader=src)
        plain, _ = model.plan(*src.shape, budget=budget)
        for t in {t.shape for t in tiles}:
            est = model.runner.memory(model.netdef.param, *t)
            held = src.buffer_bytes(*t) + 2 * t[0] * t[1] * 3 * 4  # reader, input and its copy
            assert est.total + held <= budget * HEADROOM
    assert len(tiles) >= len(plain)


def test_map_too_large_for_memory_is_refused_with_numbers(s8, slide):
    """The pixel limit is a memory question: a map over the budget is refused saying both sizes
    (33 x 45 cells x 5 classes x 4 bytes = 29,700 B)."""
    with pytest.raises(ResourceError, match=r"needs 29.00 KiB in memory, over the budget of 1000 B"):
        s8[0].classify(slide[0], budget=1000)


def test_level_past_the_pyramid(s8, slide):
    """--level past the pyramid: one line naming the levels there are, exit 2."""
    proto, weights = s8[1:]
    run = call_fcnify("classify-map", slide[0], "--model-def", proto, "--weights", weights,
                      "--level", "2")
    assert run.code == 2
    line = run.err.strip()
    assert "\n" not in line and "--level 2" in line and "0..1" in line and "slide.tif" in line


def test_level_maps_that_level(s8, slide):
    """--level 1 maps the half-size level: the map of that level's pixels."""
    model = s8[0]
    path, levels = slide
    dm = model.classify(path, level=1, keep_image=False)
    assert np.array_equal(dm.probs, model.classify(levels[1]).probs)
    with pytest.raises(InputError, match="only a tiled"):
        model.classify(_png(slide[0].parent), level=1)


def _png(folder: Path) -> Path:
    from PIL import Image
    Image.new("RGB", (64, 64)).save(folder / "plain.png")
    return folder / "plain.png"


def test_unsupported_compression(tmp_path, s8):
    """A compression tifffile cannot decode: one line naming the file and the compression."""
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.zeros((200, 200, 3), np.uint8), tile=(64, 64), compression="deflate",
                     photometric="rgb")
    with tifffile.TiffFile(path, mode="r+") as tf:
        tf.pages[0].tags["Compression"].overwrite(50123)
    with pytest.raises(ImageError, match="unsupported TIFF compression 50123"):
        TiffWindows(path)
    run = call_fcnify("classify-map", path, "--model-def", s8[1], "--weights", s8[2])
    assert run.code != 0 and "odd.tif" in run.err and len(run.err.strip().splitlines()) == 1


def test_corrupt_tile_names_its_position(tmp_path, s8):
    """Garbage in a middle tile: the error names the file, the tile's grid position and pixels."""
    path = tmp_path / "bad.tif"
    write_pyramid(path, _image(200, 200, seed=1), levels=1)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offset = page.dataoffsets[5]  # row 1, column 1 of a 4 x 4 grid
    with open(path, "r+b") as f:
        f.seek(offset + 2)
        f.write(b"\xff" * 64)
    with TiffWindows(path) as src:
        assert src.read(0, 60, 0, 200).shape == (60, 200, 3)  # the first row of tiles is fine
        with pytest.raises(ImageError, match=r"tile 5 at row 1, column 1 .*y 64-128, x 64-128"):
            src.read(0, 200, 0, 200)
    run = call_fcnify("classify-map", path, "--model-def", s8[1], "--weights", s8[2])
    assert run.code == 1 and "bad.tif" in run.err and "row 1, column 1" in run.err
    assert len(run.err.strip().splitlines()) == 1


def write_slide_pyramid(path: Path, rgb: np.ndarray, levels: int = 3, tile: int = 64) -> list[np.ndarray]:
    """A tiled pyramidal TIFF with its levels as successive pages (OpenSlide's generic TIFF layout)."""
    pyramid = [rgb]
    for _ in range(levels - 1):
        pyramid.append(np.ascontiguousarray(pyramid[-1][::2, ::2]))
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(pyramid):
            tw.write(level, tile=(tile, tile), compression="deflate", photometric="rgb",
                     **({"subfiletype": 1} if i else {}))
    return pyramid


def test_openslide_reads_the_windows_tifffile_reads(tmp_path):
    """Through OpenSlide (the `slide` extra), every level's windows, off the tile grid, equal
    tifffile's and the level's own pixels; a level past the pyramid is one line naming the levels."""
    pytest.importorskip("openslide")
    from fcnify.io.windows import SlideWindows
    path = tmp_path / "slide.tif"
    # sides divisible by 4: each level exactly 2x the next (an uneven side gives OpenSlide a
    # fractional downsample, and it interpolates; SlideWindows' docstring)
    pyramid = write_slide_pyramid(path, _image(336, 408, seed=5))
    for level, pixels in enumerate(pyramid):
        with SlideWindows(path, level) as slide, TiffWindows(path, level) as tiff:
            assert slide.shape == tiff.shape == pixels.shape[:2]
            h, w = slide.shape
            for y0, y1, x0, x1 in ((0, h, 0, w), (5, min(h, 70), 13, min(w, 140)), (h - 9, h, w - 30, w)):
                got = slide.read(y0, y1, x0, x1)
                assert got.dtype == np.uint8 and np.array_equal(got, tiff.read(y0, y1, x0, x1))
                assert np.array_equal(got, pixels[y0:y1, x0:x1])
            assert slide.overview(64).shape[2] == 3 and max(slide.overview(64).shape[:2]) <= 64
    with pytest.raises(InputError) as caught:
        SlideWindows(path, 3)
    assert "--level 3" in caught.value.message and "0..2" in caught.value.message


def test_openslide_formats_are_read_by_window(tmp_path):
    """A MIRAX-named file goes to OpenSlide, and a file it cannot read is one line naming it."""
    pytest.importorskip("openslide")
    from fcnify.io.windows import open_windows, windowed
    bad = tmp_path / "case.mrxs"
    bad.write_bytes(b"not a slide")
    assert windowed(bad)
    with pytest.raises(ImageError) as caught:
        open_windows(bad)
    assert caught.value.path == str(bad) and "OpenSlide" in caught.value.message


def test_a_slide_read_by_openslide_maps_as_by_tifffile(s8, tmp_path):
    """The same pyramid named as an OpenSlide format (OpenSlide finds it by content) is mapped into
    a store at level 1 cell for cell as the TIFF is: both readers give the same pixels."""
    pytest.importorskip("openslide")
    import shutil
    import zarr
    from fcnify.dense.chunked import map_to_store
    from fcnify.io.store import Keep
    model = s8[0]
    tif = tmp_path / "slide.tif"
    write_slide_pyramid(tif, _image(672, 816, seed=6))
    other = tmp_path / "slide.mrxs"
    shutil.copy(tif, other)
    for path in (tif, other):
        map_to_store(model, path, tmp_path / f"{path.suffix[1:]}.zarr", keep=Keep(argmax=True), level=1, tile=90)
    a, b = (zarr.open_group(str(tmp_path / f"{s}.zarr"), mode="r") for s in ("tif", "mrxs"))
    assert a["scores"].shape[1:] == model.cells(336, 408)
    assert np.array_equal(a["scores"][...], b["scores"][...]) and np.array_equal(a["argmax"][...], b["argmax"][...])
