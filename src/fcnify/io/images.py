"""Reading photographs the way the nets need them: whole, upright, 8-bit RGB.

Everything a camera or an image editor can hand us (EXIF rotation, grey,
palette, alpha, CMYK, 16 bits per sample) is normalised here, so the rest of
fcnify sees only H x W x 3 uint8 arrays. Every file that cannot become one is
an ImageError naming the file, so a batch can report it and go on; an image
too large to decode safely is a ResourceError.

Pillow keeps two switches as module globals. LOAD_TRUNCATED_IMAGES is left
False, so a cut-off file fails instead of coming back half grey. The
decompression-bomb limit is replaced, only while a header is read and under a
lock, by fcnify's own explicit limit (MAX_PIXELS or the caller's).
"""
from __future__ import annotations

import glob
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError, InputError, ResourceError

MAX_PIXELS = 1_000_000_000
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
# EXIF orientations 5-8 turn the stored image by 90 degrees (or transpose it).
SWAPS_AXES = frozenset({5, 6, 7, 8})
TIFF_WIDTH, TIFF_HEIGHT = 256, 257
# What Pillow and its decoders raise for a file that is not a well-formed image.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
GLOB_CHARS = frozenset("*?[")

_pillow_limit_lock = threading.Lock()


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image at `path` as H x W x 3 uint8 RGB, upright as its EXIF says.

    The whole file is decoded here, so truncation or corruption is reported
    now, by name, rather than as grey pixels in a classification map.
    """
    path = Path(path)
    with _opened(path, max_pixels) as image:
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except DECODE_ERRORS as exc:
            raise ImageError(f"cannot decode image: {_reason(exc)}", path) from None
        return to_rgb8(upright, path)


def image_size(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of the upright image, from the header alone.

    Lets callers plan tiling and check memory before paying for a decode.
    """
    path = Path(path)
    with _opened(path, max_pixels) as image:
        width, height = _stored_size(image)
        orientation = _orientation(image, path)
    return (width, height) if orientation in SWAPS_AXES else (height, width)


def resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resample H x W x 3 uint8 to height x width with Pillow's bilinear filter.

    Pillow widens the filter when shrinking (it antialiases), so a downscale
    averages over the source pixels instead of sampling four of them.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageError(f"resize needs an H x W x 3 uint8 array, got {rgb.shape} {rgb.dtype}")
    if height < 1 or width < 1:
        raise ImageError(f"cannot resize an image to {height} x {width} pixels")
    resized = Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def side_scale(size: tuple[int, int], longer: int | None = None, shorter: int | None = None) -> float:
    """The factor that brings an image's longer (or shorter) side to a length, keeping its shape.

    What users of large photos ask for instead of a square --size: a 4000x3000
    photo with longer=1000 becomes 1000x750, not 1000x1000.
    """
    if (longer is None) == (shorter is None):
        raise InputError("give one of the longer or the shorter side")
    target = longer if longer is not None else shorter
    if target < 1:
        raise InputError(f"a side of {target} px is not positive")
    side = max(size) if longer is not None else min(size)
    return target / side


def list_images(inputs: Sequence[str]) -> list[Path]:
    """The files a command should read, in the order given, each once.

    A directory contributes its image files (by extension, not recursively,
    sorted); a glob contributes what it matches, as a shell would expand it. A
    file named explicitly is kept whatever its extension, so that it fails
    loudly in load_image instead of being skipped silently.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        for path in _expand(item):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(path)
    return found


def to_rgb8(image: Image.Image, path: str | Path | None = None) -> np.ndarray:
    """Any decoded Pillow image as H x W x 3 uint8 RGB (alpha dropped, not blended).

    16-bit grey is scaled by 255/65535; Pillow's own convert("L") would
    clip every value above 255 to white instead.
    """
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        return _grey_to_rgb(_scale_16bit(np.asarray(image), mode))
    if mode == "F":
        return _grey_to_rgb(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8))
    if mode in ("1", "L", "LA", "La"):
        return _grey_to_rgb(np.asarray(image.convert("L"), dtype=np.uint8))
    if mode in ("P", "PA"):
        # Via RGBA, so palette transparency is read and then dropped like any alpha.
        return np.ascontiguousarray(np.asarray(image.convert("RGBA"), dtype=np.uint8)[:, :, :3])
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ValueError:
        raise ImageError(f"unsupported colour mode {mode}", path) from None


def _scale_16bit(values: np.ndarray, mode: str) -> np.ndarray:
    """0-65535 samples to 0-255 as round(v / 65535 * 255).

    Mode "I" (32-bit) holds 8-bit data too, so it is scaled only when a value
    exceeds 255; I;16 modes are 16-bit by construction and always scaled.
    """
    wide = np.clip(values.astype(np.int64), 0, 65535)
    if mode == "I" and wide.max(initial=0) <= 255:
        return wide.astype(np.uint8)
    # v * 255 / 65535 is v / 257, never exactly k + 0.5, so adding half rounds.
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


@contextmanager
def _opened(path: Path, max_pixels: int) -> Iterator[Image.Image]:
    """Open `path` (header only), turning every failure into a named error."""
    _check_file(path)
    try:
        with _pixel_limit(max_pixels):
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ResourceError(f"image is larger than the limit of {max_pixels:,} pixels "
                            "(raise max_pixels to read it)", path) from None
    except PermissionError:
        raise ImageError("cannot read image: permission denied", path) from None
    except UnidentifiedImageError:
        raise ImageError("not an image file (Pillow cannot identify its format)", path) from None
    except DECODE_ERRORS as exc:
        raise ImageError(f"cannot read image header: {_reason(exc)}", path) from None
    with image:
        yield image


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make Pillow's bomb check use `max_pixels`, and fail instead of warning.

    Pillow warns above MAX_IMAGE_PIXELS and raises only above twice that; a
    warning would let the decode go ahead, so it is turned into an exception.
    """
    with _pillow_limit_lock, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_file(path: Path) -> None:
    """Name the common problems plainly before Pillow words them its own way."""
    try:
        if path.is_dir():
            raise ImageError("is a directory, not an image file", path)
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError("image file does not exist", path) from None
    except OSError as exc:
        raise ImageError(f"cannot read image: {exc.strerror or exc}", path) from None
    if size == 0:
        raise ImageError("image file is empty (0 bytes)", path)


def _stored_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the pixels lie in the file, before any EXIF turn.

    Pillow's TIFF reader reports `size` already turned by the orientation tag
    (and turns the pixels itself on load); other readers report the stored size.
    """
    tags = getattr(image, "tag_v2", None)
    if tags is not None and TIFF_WIDTH in tags and TIFF_HEIGHT in tags:
        return int(tags[TIFF_WIDTH]), int(tags[TIFF_HEIGHT])
    return image.size


def _orientation(image: Image.Image, path: Path) -> int:
    """The EXIF orientation (1 when absent), read without decoding pixels.

    PngImageFile.getexif decodes the whole image to look for an eXIf chunk
    after the pixel data; the base method reads only what the header gave.
    """
    try:
        exif = Image.Image.getexif(image)
        return int(exif.get(ExifTags.Base.Orientation, 1))
    except DECODE_ERRORS as exc:
        raise ImageError(f"cannot read EXIF orientation: {_reason(exc)}", path) from None


def _expand(item: str) -> list[Path]:
    path = Path(item)
    if path.exists():
        found = _files_in(path)
        if not found:  # a folder named on purpose that holds nothing to map
            raise InputError("folder has no image files ("
                             + ", ".join(sorted(IMAGE_SUFFIXES)) + ")", item)
        return found
    if GLOB_CHARS & set(item):
        matches = sorted(glob.glob(item))
        if not matches:
            raise InputError("no files match this pattern", item)
        return [found for match in matches for found in _files_in(Path(match))]
    raise InputError("no such file or directory", item)


def _files_in(path: Path) -> list[Path]:
    """A file stands for itself; a directory for its image files, sorted."""
    if path.is_dir():
        return sorted(p for p in path.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [path]


def _reason(exc: BaseException) -> str:
    """One line from an exception, for messages that must fit on one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
