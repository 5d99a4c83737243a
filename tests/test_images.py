"""Tests for fcnify.io.images: every format and mode to 8-bit RGB, every bad file to a named error."""
from __future__ import annotations

import builtins
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fcnify.errors import ImageError, InputError, ResourceError
from fcnify.io.images import image_size, list_images, load_image, resize, to_rgb8

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
# 16-bit samples chosen so that rounding, truncation (v >> 8) and clipping disagree.
SAMPLES_16 = np.array([[0, 128, 257, 386], [1000, 32768, 40000, 65535]], dtype=np.uint16)


def expected_8bit(values: np.ndarray) -> np.ndarray:
    """The documented 16-to-8-bit rule, written independently of the code under test."""
    return np.array([round(int(v) / 65535 * 255) for v in values.ravel()],
                    dtype=np.uint8).reshape(values.shape)


def quadrants(height: int, width: int) -> np.ndarray:
    """RGB image whose quadrants are red, green (top) / blue, white (bottom)."""
    rgb = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    rgb[:h, :w], rgb[:h, w:], rgb[h:, :w], rgb[h:, w:] = RED, GREEN, BLUE, WHITE
    return rgb


def noise(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written by hand, for what Pillow cannot write (16-bit RGB, huge headers)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def png16(path: Path, samples: np.ndarray) -> Path:
    """Write 16-bit grey (H x W) or RGB (H x W x 3) samples as a PNG."""
    big_endian = samples.astype(">u2")
    colour_type = 0 if samples.ndim == 2 else 2
    raw = b"".join(b"\x00" + row.tobytes() for row in big_endian)
    path.write_bytes(png_bytes(samples.shape[1], samples.shape[0], 16, colour_type, raw))
    return path


def save(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


def with_orientation(image: Image.Image, path: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(path, image, exif=exif)


# --- formats and colour modes ------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_lossless_formats_round_trip(tmp_path, suffix):
    """PNG, TIFF and BMP come back as exactly the RGB pixels written."""
    rgb = noise()
    path = save(tmp_path / f"noise{suffix}", Image.fromarray(rgb))
    got = load_image(path)
    assert got.dtype == np.uint8 and got.shape == rgb.shape
    np.testing.assert_array_equal(got, rgb)


def test_jpeg_loads_close_to_original(tmp_path):
    """A high-quality JPEG decodes to H x W x 3 uint8 within JPEG's error."""
    rgb = quadrants(32, 48)
    got = load_image(save(tmp_path / "q.jpg", Image.fromarray(rgb), quality=95))
    assert got.shape == (32, 48, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - rgb).mean() < 4


def test_exif_orientation_6_rotates_jpeg(tmp_path):
    """Orientation 6 (turn 90 degrees clockwise) swaps the axes; bottom-left goes to top-left."""
    stored = quadrants(32, 64)   # 64 wide, 32 high as stored
    path = with_orientation(Image.fromarray(stored), tmp_path / "rotated.jpg", 6)
    got = load_image(path)
    assert got.shape == (64, 32, 3)
    assert np.abs(got[2, 2].astype(int) - BLUE).max() < 30     # stored bottom-left
    assert np.abs(got[2, -3].astype(int) - RED).max() < 30     # stored top-left
    assert np.abs(got[-3, -3].astype(int) - GREEN).max() < 30  # stored top-right


# What each EXIF orientation asks the viewer to do, written with numpy alone.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a.transpose(1, 0, 2), 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_exactly(tmp_path, suffix, orientation):
    """Each orientation 1-8 gives the upright pixels exactly, and image_size agrees."""
    # Pillow's TIFF reader turns TIFFs itself; they must not be turned twice.
    stored = noise(6, 10, seed=orientation)
    path = tmp_path / f"o{orientation}{suffix}"
    with_orientation(Image.fromarray(stored), path, orientation)
    got = load_image(path)
    np.testing.assert_array_equal(got, UPRIGHT[orientation](stored))
    assert image_size(path) == got.shape[:2]


def test_image_size_matches_jpeg_with_orientation(tmp_path):
    """image_size reads the upright (height, width) of a JPEG from its header."""
    path = with_orientation(Image.fromarray(quadrants(20, 50)), tmp_path / "o.jpg", 6)
    assert image_size(path) == (50, 20) == load_image(path).shape[:2]
    plain = save(tmp_path / "plain.jpg", Image.fromarray(quadrants(20, 50)))
    assert image_size(plain) == (20, 50) == load_image(plain).shape[:2]


def test_image_size_does_not_decode(tmp_path):
    """A header promising 20000 x 12000 pixels is sized without allocating them."""
    # 240 M pixels is also above Pillow's default limit (2 x 89 M) that MAX_PIXELS replaces.
    path = tmp_path / "huge.png"
    path.write_bytes(png_bytes(20000, 12000, 8, 0, b"\x00"))
    assert image_size(path) == (12000, 20000)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    """16-bit grey maps v to round(v / 65535 * 255); Pillow's convert('L') would clip to 255."""
    got = load_image(png16(tmp_path / "grey16.png", SAMPLES_16))
    assert got.shape == (2, 4, 3)
    np.testing.assert_array_equal(got[:, :, 0], expected_8bit(SAMPLES_16))
    np.testing.assert_array_equal(got[:, :, 0], got[:, :, 2])


def test_16bit_grey_tiff_is_scaled(tmp_path):
    """A 16-bit grey TIFF (Pillow mode I;16) follows the same scaling as PNG."""
    path = save(tmp_path / "grey16.tif", Image.fromarray(SAMPLES_16))
    assert Image.open(path).mode == "I;16"
    np.testing.assert_array_equal(load_image(path)[:, :, 1], expected_8bit(SAMPLES_16))


def test_16bit_rgb_png_within_one_level(tmp_path):
    """16-bit RGB PNGs load; Pillow hands over only the high byte, at most 1 from exact scaling."""
    samples = np.stack([SAMPLES_16, 65535 - SAMPLES_16, SAMPLES_16[::-1]], axis=2)
    got = load_image(png16(tmp_path / "rgb16.png", samples)).astype(int)
    assert got.shape == (2, 4, 3)
    assert np.abs(got - expected_8bit(samples)).max() <= 1


def test_32bit_integer_mode_scaled_only_above_255():
    """Mode I holding 8-bit values is taken as is; holding larger values it is scaled as 16-bit."""
    small = np.array([[0, 17, 255]], dtype=np.int32)
    np.testing.assert_array_equal(to_rgb8(Image.fromarray(small))[:, :, 0], [[0, 17, 255]])
    large = SAMPLES_16.astype(np.int32)
    assert Image.fromarray(large).mode == "I"
    got = to_rgb8(Image.fromarray(large))
    np.testing.assert_array_equal(got[:, :, 0], expected_8bit(SAMPLES_16))


def test_float_mode_is_taken_as_0_to_255():
    """Mode F is read on the 0-255 scale, rounded and clipped, as Pillow's convert('L') does."""
    values = np.array([[-5.0, 0.4, 127.6, 300.0]], dtype=np.float32)
    got = to_rgb8(Image.fromarray(values))
    np.testing.assert_array_equal(got[:, :, 0], [[0, 0, 128, 255]])


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_expands_to_three_equal_channels(tmp_path, mode):
    """Grey and bilevel images become three identical channels."""
    grey = Image.fromarray(noise()[:, :, 0]).convert(mode)
    got = load_image(save(tmp_path / f"grey_{mode}.png", grey))
    assert got.shape == (24, 32, 3)
    np.testing.assert_array_equal(got[:, :, 0], np.asarray(grey.convert("L")))
    np.testing.assert_array_equal(got[:, :, 0], got[:, :, 2])


def test_rgba_drops_alpha(tmp_path):
    """Alpha is discarded, not blended: a transparent pixel keeps its colour."""
    rgba = np.dstack([noise(), np.zeros((24, 32), np.uint8)])
    got = load_image(save(tmp_path / "rgba.png", Image.fromarray(rgba)))
    np.testing.assert_array_equal(got, rgba[:, :, :3])


def test_grey_alpha_drops_alpha(tmp_path):
    """LA images keep their grey level and lose the alpha."""
    la = Image.fromarray(np.dstack([noise()[:, :, 0], np.zeros((24, 32), np.uint8)]), "LA")
    got = load_image(save(tmp_path / "la.png", la))
    np.testing.assert_array_equal(got[:, :, 1], noise()[:, :, 0])


def test_palette_with_transparency(tmp_path):
    """A palette image (with a transparent index) maps through its palette to RGB."""
    index = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette([*RED, *GREEN, *BLUE] + [0] * (3 * 253))
    path = save(tmp_path / "palette.png", image, transparency=0)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(load_image(path), [[RED, GREEN], [BLUE, RED]])


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    """A CMYK JPEG decodes to RGB (pure cyan -> (0, 255, 255) within JPEG's error)."""
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    got = load_image(save(tmp_path / "cmyk.jpg", cmyk, quality=95))
    assert got.shape == (16, 16, 3)
    assert np.abs(got[8, 8].astype(int) - (0, 255, 255)).max() < 8


# --- errors --------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    """A missing file is an ImageError naming it."""
    with pytest.raises(ImageError, match="gone.jpg: .*does not exist"):
        load_image(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="gone.jpg"):
        image_size(tmp_path / "gone.jpg")


def test_directory(tmp_path):
    """A directory is an ImageError, not IsADirectoryError."""
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    """A file the process may not open is an ImageError saying so."""
    # open() is denied by hand: chmod proves nothing when the tests run as root.
    path = save(tmp_path / "secret.png", Image.fromarray(noise()))
    real_open = builtins.open

    def denying_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying_open)
    with pytest.raises(ImageError, match="secret.png: .*permission denied"):
        load_image(path)


def test_zero_byte_file(tmp_path):
    """An empty file is reported as empty, not as an unknown format."""
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageError, match=r"empty.jpg: .*empty \(0 bytes\)"):
        load_image(path)


def test_text_file_is_not_an_image(tmp_path):
    """A text file with an image extension is an ImageError from both readers."""
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture\n")
    for reader in (load_image, image_size):
        with pytest.raises(ImageError, match="notes.jpg: not an image file"):
            reader(path)


@pytest.mark.parametrize("suffix,keep", [(".jpg", 0.5), (".jpg", -2), (".png", 0.5)])
def test_truncated_file(tmp_path, suffix, keep):
    """A cut-off JPEG (even one missing only its end marker) or PNG fails, not half grey."""
    whole = save(tmp_path / f"whole{suffix}", Image.fromarray(noise(64, 64)), **(
        {"quality": 90} if suffix == ".jpg" else {})).read_bytes()
    cut = int(len(whole) * keep) if isinstance(keep, float) else len(whole) + keep
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(whole[:cut])
    with pytest.raises(ImageError, match=f"cut{suffix}: cannot decode image: .*truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_data(tmp_path):
    """Flipped bytes inside the compressed pixels are an ImageError on one line."""
    data = bytearray(save(tmp_path / "ok.png", Image.fromarray(noise(64, 64))).read_bytes())
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt.png") as caught:
        load_image(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("max_pixels", [500, 600])
def test_decompression_bomb_limit(tmp_path, max_pixels):
    """Above the limit is a ResourceError stating it: where Pillow warns (600) or raises (500)."""
    path = save(tmp_path / "big.png", Image.fromarray(noise(30, 40)))   # 1200 pixels
    for reader in (load_image, image_size):
        with pytest.raises(ResourceError, match=f"big.png: .*limit of {max_pixels:,} pixels"):
            reader(path, max_pixels=max_pixels)
    assert load_image(path, max_pixels=1200).shape == (30, 40, 3)
    assert Image.MAX_IMAGE_PIXELS != max_pixels


def test_default_limit_refuses_giant_header(tmp_path):
    """A header claiming 40000 x 40000 (1.6 G pixels) exceeds MAX_PIXELS before any decoding."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(40000, 40000, 8, 0, b"\x00"))
    with pytest.raises(ResourceError, match="1,000,000,000"):
        load_image(path)


# --- resize ------------------------------------------------------------------------------

def test_resize_shape_and_constant_image():
    """Resizing keeps uint8 RGB, gives height x width, and leaves a flat colour unchanged."""
    flat = np.full((10, 20, 3), (10, 200, 30), np.uint8)
    got = resize(flat, 7, 33)
    assert got.shape == (7, 33, 3) and got.dtype == np.uint8
    assert (got == (10, 200, 30)).all()


def test_resize_rejects_bad_sizes():
    """A zero size or a non-RGB array is an ImageError."""
    with pytest.raises(ImageError, match="0 x 5"):
        resize(noise(), 0, 5)
    with pytest.raises(ImageError, match="H x W x 3 uint8"):
        resize(noise()[:, :, 0], 5, 5)


# --- list_images -------------------------------------------------------------------------

def make_tree(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ["b.JPG", "a.png", "c.tiff", "notes.txt", "sub/deep.jpg"]:
        (photos / name).write_bytes(b"x")
    (tmp_path / "x1.bmp").write_bytes(b"x")
    (tmp_path / "x2.bmp").write_bytes(b"x")
    return photos


def test_list_images_directory_glob_and_file(tmp_path, monkeypatch):
    """Dirs give sorted image files, globs expand, named files stay, order kept, no repeats."""
    make_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    got = list_images(["x2.bmp", "photos", "x*.bmp", "photos/notes.txt", "./photos/a.png"])
    assert Path("photos/sub/deep.jpg") not in got, "a folder's sub-folders are not searched"
    assert got == [Path("x2.bmp"), Path("photos/a.png"), Path("photos/b.JPG"),
                   Path("photos/c.tiff"), Path("x1.bmp"), Path("photos/notes.txt")]


def test_list_images_missing_input(tmp_path):
    """A missing path and a glob matching nothing are InputErrors naming the input."""
    with pytest.raises(InputError, match="nothere.jpg: no such file"):
        list_images([str(tmp_path / "nothere.jpg")])
    with pytest.raises(InputError, match=r"\*.webp: no files match"):
        list_images([str(tmp_path / "*.webp")])
