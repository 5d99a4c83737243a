"""Reading an image a window at a time: only the pixels a tile needs, never the whole image.

Whole-slide and remote-sensing images (tiled TIFF, BigTIFF, OME-TIFF,
pyramidal TIFF) are larger than memory. tifffile reads their layout (tile
grid, offsets, compression, pyramid levels) and decodes their tiles with its
own codecs; this module only asks it for the tiles a window overlaps and
cuts the window out of them, so a read costs the window plus at most one row
of file tiles around it (`buffer_bytes`). An in-memory array is a source
too (`ArrayWindows`), so the tiled path has one way to get a tile's pixels.

Every failure names the file; a tile that cannot be decoded also names its
position in the file's tile grid, so a corrupt slide can be located.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import CorruptTileError, ImageError, InputError, SetupError

# Files read by window when tifffile finds them tiled (or BigTIFF, or a pyramid);
# a plain stripped TIFF is decoded whole by Pillow, as any photograph.
WINDOWED_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".btf", ".tf8", ".ndpi", ".scn"})
OVERVIEW_PX = 2048  # longest side of the picture a huge image's outputs are drawn over
# Whole-slide formats tifffile does not read, read through OpenSlide (the optional `slide` extra:
# openslide-python with the openslide-bin library); SVS, NDPI and SCN are TIFFs tifffile reads.
OPENSLIDE_SUFFIXES = frozenset({".mrxs", ".vms", ".vmu", ".bif", ".svslide"})
SLIDE_CACHE = 16 * 2**20  # OpenSlide's decoded-tile cache per slide, counted in buffer_bytes


class Windows(Protocol):
    """A source of H x W x 3 uint8 RGB windows of one image."""

    path: Path | None
    shape: tuple[int, int]  # (height, width) of the whole image

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray: ...

    def buffer_bytes(self, height: int, width: int) -> int: ...

    def overview(self, limit: int = OVERVIEW_PX) -> np.ndarray: ...


class ArrayWindows:
    """An image already in memory, read by slicing (what a JPEG or PNG becomes)."""

    def __init__(self, rgb: np.ndarray, path: Path | None = None) -> None:
        self.rgb, self.path = rgb, path
        self.shape = (int(rgb.shape[0]), int(rgb.shape[1]))

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.rgb[y0:y1, x0:x1]

    def buffer_bytes(self, height: int, width: int) -> int:
        return 0  # a view: the pixels are already counted as the image

    def overview(self, limit: int = OVERVIEW_PX) -> np.ndarray:
        return self.rgb


class TiffWindows:
    """One level of a tiled TIFF / BigTIFF / OME-TIFF pyramid, read a file tile at a time.

    Level 0 is full resolution; each further level is the next one in the
    file's pyramid (tifffile's series levels: SubIFDs, OME or SVS pyramids).
    """

    def __init__(self, path: str | Path, level: int = 0) -> None:
        import tifffile
        self.path = Path(path)
        try:
            self._file = tifffile.TiffFile(self.path)
            series = self._file.series[0]
            self.levels = [lvl.shape for lvl in series.levels]
        except (OSError, ValueError, IndexError, KeyError, tifffile.TiffFileError) as exc:
            raise ImageError(f"cannot read TIFF: {_reason(exc)}", self.path) from None
        if not 0 <= level < len(self.levels):
            self.close()
            raise InputError(f"--level {level}: the image's pyramid has level(s) 0..{len(self.levels) - 1} "
                             f"({', '.join('x'.join(map(str, s[:2])) for s in self.levels)} px)", self.path)
        self.level = level
        self._series = series
        self._page = series.levels[level].keyframe
        self._check_layout(series.levels[level].axes)
        self.shape = (int(self._page.imagelength), int(self._page.imagewidth))
        self.segment = (int(self._page.chunks[0]), int(self._page.chunks[1]))  # file tile (h, w)
        self.grid = (-(-self.shape[0] // self.segment[0]), -(-self.shape[1] // self.segment[1]))

    def _check_layout(self, axes: str) -> None:
        """Refuse, before any work, what cannot become RGB windows: compression, planes, axes."""
        from tifffile import TIFF
        page = self._page
        if page.compression not in TIFF.DECOMPRESSORS:
            self.close()
            raise ImageError(f"unsupported TIFF compression {_compression(page.compression)} "
                             "(tifffile has no decoder for it)", self.path)
        if page.planarconfig != 1 and page.samplesperpixel > 1:
            self.close()
            raise ImageError("TIFF with separate colour planes is not supported; "
                             "rewrite it with interleaved samples", self.path)
        if axes not in ("YX", "YXS") or page.dtype not in (np.uint8, np.uint16):
            self.close()
            raise ImageError(f"TIFF of axes {axes} and {page.dtype} samples is not supported; "
                             "fcnify reads grey or RGB(A) images of 8 or 16 bits", self.path)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0, y1) x [x0, x1) as RGB uint8, decoding only the file tiles they overlap."""
        th, tw = self.segment
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for ty in range(y0 // th, -(-y1 // th)):
            for tx in range(x0 // tw, -(-x1 // tw)):
                tile = self._tile(ty, tx)
                ya, yb = max(y0, ty * th), min(y1, (ty + 1) * th)
                xa, xb = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                out[ya - y0:yb - y0, xa - x0:xb - x0] = tile[ya - ty * th:yb - ty * th,
                                                             xa - tx * tw:xb - tx * tw]
        return out

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        """File tile (ty, tx) decoded by tifffile, as RGB uint8; a bad one names its position."""
        page = self._page
        index = ty * self.grid[1] + tx
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        try:
            fh = self._file.filehandle
            fh.seek(offset)
            data = fh.read(count) if count else None
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:  # any codec's error: zlib, libdeflate, JPEG, LZW, ...
            th, tw = self.segment
            raise CorruptTileError(f"tile {index} at row {ty}, column {tx} of the file's tile grid (pixels "
                             f"y {ty * th}-{(ty + 1) * th}, x {tx * tw}-{(tx + 1) * tw}, level {self.level}) "
                             f"cannot be decoded: {_reason(exc)}", self.path) from None
        if segment is None:
            raise CorruptTileError(f"tile {index} at row {ty}, column {tx} has no data", self.path)
        return to_rgb(segment.reshape(segment.shape[-3:]), page.dtype)

    def buffer_bytes(self, height: int, width: int) -> int:
        """Bytes a read of height x width holds beside its result: one decoded file tile (twice,
        as decoded and as RGB), at most the compressed bytes of one, and the window itself."""
        th, tw = self.segment
        sample = np.dtype(self._page.dtype).itemsize * int(self._page.samplesperpixel)
        tile = th * tw * (sample * 2 + 3)
        return height * width * 3 + tile

    def overview(self, limit: int = OVERVIEW_PX) -> np.ndarray:
        """The image small enough to draw under the pictures: the pyramid's smallest level that is at
        least `limit` px long (or the smallest), shrunk by whole rows of windows."""
        fit = [i for i, s in enumerate(self.levels) if i >= self.level and max(s[:2]) >= limit]
        level = fit[-1] if fit else len(self.levels) - 1
        source = self if level == self.level else TiffWindows(self.path, level)
        try:
            return _shrunk(source, limit)
        finally:
            if source is not self:
                source.close()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TiffWindows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SlideWindows:
    """One level of a whole-slide image read through OpenSlide (read_region at that level).

    Level 0 is full resolution; OpenSlide's own levels follow, each
    `level_downsamples[level]` times smaller. Its tile cache is set to
    SLIDE_CACHE, so what a read holds beside its result is known. A level
    whose downsample is not a whole number (a side that did not halve
    evenly) is resampled by OpenSlide: its windows are interpolated, not the
    file's own pixels.
    """

    def __init__(self, path: str | Path, level: int = 0) -> None:
        openslide = openslide_module()
        self.path = Path(path)
        try:
            self.slide = openslide.OpenSlide(str(self.path))
            self.slide.set_cache(openslide.OpenSlideCache(SLIDE_CACHE))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise ImageError(f"OpenSlide cannot read this slide: {_reason(exc)}", self.path) from None
        dims = self.slide.level_dimensions
        self.levels = [(h, w) for w, h in dims]
        if not 0 <= level < len(dims):
            self.close()
            raise InputError(f"--level {level}: the image's pyramid has level(s) 0..{len(dims) - 1} "
                             f"({', '.join(f'{h}x{w}' for h, w in self.levels)} px)", self.path)
        self.level = level
        self.shape = self.levels[level]
        self.downsample = float(self.slide.level_downsamples[level])

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0, y1) x [x0, x1) of this level as RGB uint8 (alpha dropped)."""
        from openslide import OpenSlideError
        at = (round(x0 * self.downsample), round(y0 * self.downsample))
        try:
            region = self.slide.read_region(at, self.level, (x1 - x0, y1 - y0))
        except (OpenSlideError, OSError) as exc:
            raise CorruptTileError(f"pixels y {y0}-{y1}, x {x0}-{x1} of level {self.level} cannot be "
                                   f"read: {_reason(exc)}", self.path) from None
        return np.asarray(region)[:, :, :3].copy()

    def buffer_bytes(self, height: int, width: int) -> int:
        """The window as OpenSlide returns it (RGBA), its RGB copy, and OpenSlide's tile cache."""
        return height * width * (4 + 3) + SLIDE_CACHE

    def overview(self, limit: int = OVERVIEW_PX) -> np.ndarray:
        h, w = self.shape
        f = max(1.0, max(h, w) / limit)
        size = (max(1, int(w / f)), max(1, int(h / f)))
        return np.ascontiguousarray(np.asarray(self.slide.get_thumbnail(size).convert("RGB")))

    def close(self) -> None:
        self.slide.close()

    def __enter__(self) -> "SlideWindows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def openslide_module():
    """openslide, or one line saying how to get it (needed only for OpenSlide's formats)."""
    try:
        import openslide
    except ImportError:
        raise SetupError("whole-slide formats other than TIFF need OpenSlide: "
                         "pip install 'fcnify[slide]' (openslide-python and openslide-bin)") from None
    return openslide


def _shrunk(source: TiffWindows, limit: int) -> np.ndarray:
    """Every f-th pixel of `source` (f brings its long side to at most `limit`), a band at a time."""
    h, w = source.shape
    f = max(1, -(-max(h, w) // limit))
    step = f * -(-source.segment[0] // f)  # whole file-tile rows, a multiple of f
    rows = [source.read(y0, min(h, y0 + step), 0, w)[::f, ::f] for y0 in range(0, h, step)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def to_rgb(values: np.ndarray, dtype) -> np.ndarray:
    """A decoded H x W x S tile as RGB uint8: grey repeated, alpha dropped, 16 bits scaled by 255/65535."""
    if np.dtype(dtype) == np.uint16:
        values = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if values.shape[-1] == 1:
        return np.repeat(values, 3, axis=-1)
    if values.shape[-1] == 2:  # grey and alpha
        return np.repeat(values[..., :1], 3, axis=-1)
    return values[..., :3]


def windowed(path: str | Path) -> bool:
    """Whether `path` is read by window: a TIFF tifffile finds tiled, BigTIFF or pyramidal.

    Anything else (JPEG, PNG, a stripped TIFF) is decoded whole by images.py, as before;
    OpenSlide's own formats (OPENSLIDE_SUFFIXES) are always read by window.
    """
    path = Path(path)
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        return path.is_file()
    if path.suffix.lower() not in WINDOWED_SUFFIXES or not path.is_file():
        return False
    import tifffile
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            return bool(page.is_tiled or tf.is_bigtiff or len(tf.series[0].levels) > 1)
    except Exception:  # not a TIFF tifffile can read: let Pillow name the problem as it always has
        return False


def open_windows(path: str | Path, level: int = 0) -> TiffWindows | SlideWindows:
    """The windowed reader of `path` at pyramid `level` (0: full resolution): OpenSlide for its own
    formats, tifffile for TIFFs."""
    if Path(path).suffix.lower() in OPENSLIDE_SUFFIXES:
        return SlideWindows(path, level)
    return TiffWindows(path, level)


def _compression(value) -> str:
    name = getattr(value, "name", None)
    return f"{name} ({int(value)})" if name else str(int(value))


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
