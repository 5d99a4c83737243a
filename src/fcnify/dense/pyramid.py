"""Image pyramids: one map per scale, all read back in original-image pixels, and their fusion.

A net sees objects at one size (LeNet: 28 px). Feeding the image shrunk by
each factor in --scales lets the same windows cover larger objects; every
DenseMap already turns its cells into original-image boxes through its own
scale, so detections from all scales can be compared directly. For the
pictures, the maps are fused per class (maximum over scales) on the grid of
the finest map, each cell taking the cell of the other map whose window
centre is nearest its own.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError


def parse_scales(text: str) -> list[float]:
    """'1,0.75,0.5' -> [1.0, 0.75, 0.5]; InputError on a value that is not a positive number."""
    scales = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"--scales {text}: {part.strip()!r} is not a number") from None
        if not value > 0 or value == float("inf"):
            raise InputError(f"--scales {text}: every scale must be a positive number, not {part.strip()}")
        scales.append(value)
    if len(set(scales)) != len(scales):
        raise InputError(f"--scales {text}: a scale is given twice")
    return scales


def check_scales(scales: Sequence[float], image_size: tuple[int, int], minimum: tuple[int, int],
                 path: Path | None = None) -> None:
    """Fail before any work when a scale makes the image smaller than one window."""
    h, w = image_size
    for s in scales:
        fh, fw = max(1, round(h * s)), max(1, round(w * s))
        if fh < minimum[0] or fw < minimum[1]:
            raise InputError(f"--scales {s:g}: the image becomes {fh}x{fw} px (height x width), "
                             f"smaller than one window of {minimum[0]}x{minimum[1]} px", path)


def map_scales(model, image, scales: Sequence[float], budget: int | None = None,
               tile: int | None = None, progress=None) -> list:
    """One DenseMap per scale (scale 1 is the image as it is), the pixels loaded once."""
    from ..io.images import load_image
    path = None
    if isinstance(image, (str, Path)):
        path = Path(image)
        image = load_image(path)
    check_scales(scales, image.shape[:2], model.minimum, path)
    maps = []
    for s in scales:
        dm = model.classify(image, None, None if s == 1 else s, budget, tile, progress)
        dm.image_path = path
        maps.append(dm)
    return maps


def _nearest(dm, centres: np.ndarray, axis: int) -> np.ndarray:
    """Index along `axis` (0 rows, 1 cols) of dm's cell whose window centre is nearest each centre."""
    g = dm.geometry.y if axis == 0 else dm.geometry.x
    s = dm.scale[axis]
    idx = np.rint((centres * s - g.box_lo - g.window / 2) / g.stride).astype(int)
    return np.clip(idx, 0, dm.shape[axis] - 1)


def fuse(maps: Sequence):
    """A DenseMap on the finest grid whose probabilities are the per-class maximum over the scales."""
    finest = max(maps, key=lambda dm: dm.shape[0] * dm.shape[1])
    rows, cols = finest.shape
    g, (sy, sx) = finest.geometry, finest.scale
    cy = (np.arange(rows) * g.y.stride + g.y.box_lo + g.y.window / 2) / sy
    cx = (np.arange(cols) * g.x.stride + g.x.box_lo + g.x.window / 2) / sx
    probs = finest.probs.copy()
    for dm in maps:
        if dm is finest:
            continue
        r, c = _nearest(dm, cy, 0), _nearest(dm, cx, 1)
        np.maximum(probs, dm.probs[:, r[:, None], c[None, :]], out=probs)
    return replace(finest, probs=probs)


@dataclass
class PyramidResult:
    """One image mapped at several scales: the maps, their fusion, and the boxes if asked for."""

    scales: list[float]
    maps: list  # one DenseMap per scale
    fused: object  # DenseMap: per-class maximum over scales on the finest grid
    detections: list | None = None  # detect.Detection, when detection was asked for
    detect_params: dict | None = None

    def save(self, out_dir: str | Path, name: str | None = None, cls: int | None = None,
             top_k: int = 5, command: str | None = None, *, force: bool = False,
             heat_scale: str = "unit", save=None) -> list[Path]:
        """NAME.* for the fused map, NAME.detections.*, and with "scales" in `save` (several
        scales) NAME.xSCALE.* per scale: the items of `save` (outputs.SAVE_ITEMS) each time."""
        from ..io.outputs import DEFAULT_SAVE
        from .detect import save_detections
        out_dir = Path(out_dir)
        save = DEFAULT_SAVE if save is None else frozenset(save)
        name = name or (self.fused.image_path.stem if self.fused.image_path else "image")
        written = self.fused.save(out_dir, name, cls, top_k, command, force=force, heat_scale=heat_scale,
                                  save=save)
        if len(self.maps) > 1 and "scales" in save:
            for s, dm in zip(self.scales, self.maps):
                written += dm.save(out_dir, scale_name(name, s), cls, top_k, command, force=force,
                                   heat_scale=heat_scale, save=save)
        if self.detections is not None:
            written += save_detections(self.fused, self.detections, out_dir, name,
                                       self.detect_params or {}, command, force=force)
        return written


def scale_name(name: str, scale: float) -> str:
    return f"{name}.x{scale:g}"


def map_pyramid(model, image, scales: Sequence[float], budget: int | None = None,
                tile: int | None = None, detect: dict | None = None, progress=None) -> PyramidResult:
    """Map an image at each scale, fuse the maps, and find boxes when `detect` (threshold, iou,
    classes) is given."""
    from .detect import box_head_blob, detect as find
    if detect is not None:  # a card's bad box_head fails before the work
        box_head_blob(model.card, model.heads)
    maps = map_scales(model, image, scales, budget, tile, progress)
    fused = fuse(maps) if len(maps) > 1 else maps[0]
    found = None
    if detect is not None:
        found = find(maps, scales, detect["threshold"], detect["iou"], detect.get("classes"))
    return PyramidResult(list(scales), maps, fused, found, detect)
