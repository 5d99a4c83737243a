"""Detections: map cells above a probability threshold become boxes, merged by non-maximum suppression.

A cell's box is its window (the crop the classifier saw) in original-image
pixels, clipped to the image, so cells from every scale of a pyramid land in
the same coordinates and compete in one suppression per class. When the
model card names a box-regression output (`box_head`, 4 values per cell:
the offsets of x0, y0, x1, y1 as fractions of the window's width and
height, as MTCNN's nets give them), each window is moved by its cell's
offsets first. The
suppression is the usual greedy one (highest score first, drop boxes that
overlap a kept one by more than the IoU limit), vectorised over the
remaining boxes at each step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Detection:
    """One box: class, its probability, (x0, y0, x1, y1) in original-image pixels, the scale it came from."""

    cls: int
    label: str
    score: float
    box: tuple[float, float, float, float]
    scale: float

    def to_dict(self) -> dict:
        return {"class": self.cls, "label": self.label, "score": round(self.score, 6),
                "box": [round(v, 3) for v in self.box], "scale": self.scale}


def box_head_blob(card, heads: dict[str, int], path=None) -> str | None:
    """The output that regresses the boxes, as the engine names it, or None when the card names none.

    The card may use the original net's name (conv5-2 for conv5-2-conv). The
    head must be mapped beside the class map (same cells) with 4 values per
    cell; `heads` is {blob: values per cell}, as DenseModel.heads.
    """
    from ..surgery.surgery import named_blob
    wanted = card.box_head
    if wanted is None:
        return None
    name = named_blob(wanted, heads)
    if name is None:
        beside = ", ".join(heads) or "none"
        raise InputError(f"box_head {wanted!r} is not an output mapped beside the class map "
                         f"(outputs beside it: {beside})", card.card_path or path)
    channels = heads[name]
    if channels != 4:
        raise InputError(f"box_head {wanted!r} has {channels} values per cell; a box "
                         "regression has 4 (x0, y0, x1, y1 offsets)", card.card_path or path)
    return name


def cell_boxes(dm, threshold: float, classes: Sequence[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(boxes N x 4, probabilities N, log-odds N, classes N) of the cells whose probability
    reaches `threshold`.

    A box is the cell's window, moved by the card's box-regression head when
    it names one (offsets times the window's size, in the scaled image's
    pixels, before scaling back), then clipped to the image. The background
    class (if the card names one) never makes a box. Boxes
    are ranked by log-odds, log p - log(sum of the other classes' p): it
    orders like p, but keeps ordering confident cells whose float32 p has
    rounded to 1.0 (a margin of 17 or more in the scores), where the
    others' small probabilities still differ.
    """
    wanted = range(dm.num_classes) if classes is None else classes
    g = dm.geometry
    sy, sx = dm.scale
    h, w = dm.image_size
    head = box_head_blob(dm.model, {blob: m.shape[0] for blob, m in dm.heads.items()}, dm.image_path)
    size = np.array([g.x.window, g.y.window, g.x.window, g.y.window], dtype=np.float64)
    boxes, scores, odds, labels = [], [], [], []
    for c in wanted:
        if c == dm.model.background_class:
            continue
        rows, cols = np.nonzero(dm.probs[c] >= threshold)
        if not len(rows):
            continue
        x0 = cols * g.x.stride + g.x.box_lo
        y0 = rows * g.y.stride + g.y.box_lo
        b = np.stack([x0, y0, x0 + g.x.window, y0 + g.y.window], axis=1).astype(np.float64)
        if head is not None:
            b += dm.heads[head][:, rows, cols].T.astype(np.float64) * size
        b /= [sx, sy, sx, sy]
        np.clip(b, 0, [w, h, w, h], out=b)
        boxes.append(b)
        p = dm.probs[:, rows, cols].astype(np.float64)
        rest = p.sum(axis=0) - p[c]
        scores.append(p[c])
        odds.append(np.log(np.maximum(p[c], 1e-300)) - np.log(np.maximum(rest, 1e-300)))
        labels.append(np.full(len(rows), c))
    if not boxes:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.zeros(0, int)
    return (np.concatenate(boxes), np.concatenate(scores), np.concatenate(odds),
            np.concatenate(labels))


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box with each of `boxes` (x0, y0, x1, y1)."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_limit: float,
        groups: np.ndarray | None = None) -> np.ndarray:
    """Indices of the boxes kept by greedy NMS, best first; boxes of different groups never compete."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        rest = order[1:]
        drop = iou(boxes[i], boxes[rest]) > iou_limit
        if groups is not None:
            drop &= groups[rest] == groups[i]
        order = rest[~drop]
    return np.asarray(keep, dtype=int)


def detect(maps: Sequence, scales: Sequence[float], threshold: float, iou_limit: float,
           classes: Sequence[int] | None = None, across_classes: bool = False) -> list[Detection]:
    """Boxes from the maps of one image (one per scale), suppressed per class across scales
    (or all classes together, `across_classes`)."""
    parts = [cell_boxes(dm, threshold, classes) for dm in maps]
    boxes, scores, odds, labels = (np.concatenate([p[i] for p in parts]) for i in range(4))
    origin = np.concatenate([np.full(len(p[1]), s, dtype=float) for p, s in zip(parts, scales)])
    keep = nms(boxes, odds, iou_limit, None if across_classes else labels)
    dm = maps[0]
    return [Detection(int(labels[i]), dm.label(int(labels[i])), float(scores[i]),
                      tuple(float(v) for v in boxes[i]), float(origin[i])) for i in keep]


def detections_json(dm, detections: Sequence[Detection], params: dict, command: str | None) -> dict:
    """NAME.detections.json: the boxes, best first, and how they were found."""
    h, w = dm.image_size
    return {"image": str(dm.image_path) if dm.image_path else None,
            "image_size": {"height": h, "width": w},
            "command": command,
            "model": dm.model.name,
            "threshold": params.get("threshold"), "nms_iou": params.get("iou"),
            "scales": params.get("scales"),
            "box_head": dm.model.box_head,
            "note": ("box = the cell's window (the crop the classifier saw)"
                     + (" moved by the box_head output's offsets (times the window's width and height)"
                        if dm.model.box_head else "")
                     + " in original-image pixels, x1/y1 exclusive, clipped to the image; per class, "
                       "boxes overlapping a better one by more than nms_iou were dropped"),
            "detections": [d.to_dict() for d in detections]}


def detections_png(dm, detections: Sequence[Detection]) -> bytes:
    """The boxes drawn on the (downsampled) image, each with its label and score."""
    import io
    from PIL import Image, ImageDraw
    from ..io.pictures import preview
    h, w = dm.image_size
    base = preview(dm.image) if dm.image is not None else np.zeros((min(h, 1024), min(w, 1024), 3), np.uint8)
    f = w / base.shape[1]
    img = Image.fromarray(base).convert("RGB")
    if img.width < 600:  # small images: enlarge so the labels stay readable
        f /= 600 // img.width + 1
        img = img.resize((img.width * (600 // img.width + 1), img.height * (600 // img.width + 1)),
                         Image.NEAREST)
    draw = ImageDraw.Draw(img)
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
               (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)]
    for d in detections:
        x0, y0, x1, y1 = (v / f for v in d.box)
        colour = palette[d.cls % len(palette)]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=2)
        draw.text((x0 + 2, y0 + 1), f"{dm.short(d.cls)} {d.score:.2f}", fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_detections(dm, detections: Sequence[Detection], out_dir, name: str, params: dict,
                    command: str | None, *, force: bool) -> list:
    """Write NAME.detections.json and NAME.detections.png together."""
    import json
    from pathlib import Path
    from ..files import OutputSet
    out_dir = Path(out_dir)
    names = [out_dir / f"{name}.detections.json", out_dir / f"{name}.detections.png"]
    out = OutputSet(force)
    for p in names:
        out.check(p)
    with out:
        out.write_text(names[0], json.dumps(detections_json(dm, detections, params, command),
                                            separators=(",", ":")) + "\n")
        out.write_bytes(names[1], detections_png(dm, detections))
    return names


def summary(detections: Sequence[Detection], dm, limit: int = 20) -> str:
    """The terminal view of the boxes: how many, then the best ones."""
    lines = [f"detections: {len(detections)} box(es)"]
    for d in detections[:limit]:
        x0, y0, x1, y1 = d.box
        lines.append(f"  {d.cls:>5} {dm.short(d.cls)[:24]:<24} p {d.score:.3f}  "
                     f"box x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f}  (scale {d.scale:g})")
    if len(detections) > limit:
        lines.append(f"  ... {len(detections) - limit} more in NAME.detections.json (--out)")
    return "\n".join(lines)
