"""Detections: map cells above a probability threshold become boxes, merged by non-maximum suppression.

A cell's box is its field (the window the classifier saw) in original-image
pixels, clipped to the image, so cells from every scale of a pyramid land in
the same coordinates and compete in one suppression per class. The
suppression is the usual greedy one (highest score first, drop boxes that
overlap a kept one by more than the IoU limit), vectorised over the
remaining boxes at each step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


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


def cell_boxes(dm, threshold: float, classes: Sequence[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes N x 4, scores N, classes N) of the cells whose probability reaches `threshold`.

    The background class (if the card names one) never makes a box.
    """
    wanted = range(dm.num_classes) if classes is None else classes
    g = dm.geometry
    sy, sx = dm.scale
    h, w = dm.image_size
    boxes, scores, labels = [], [], []
    for c in wanted:
        if c == dm.model.background_class:
            continue
        rows, cols = np.nonzero(dm.probs[c] >= threshold)
        if not len(rows):
            continue
        x0 = (cols * g.x.stride + g.x.box_lo) / sx
        y0 = (rows * g.y.stride + g.y.box_lo) / sy
        b = np.stack([x0, y0, x0 + g.x.field / sx, y0 + g.y.field / sy], axis=1)
        np.clip(b, 0, [w, h, w, h], out=b)
        boxes.append(b)
        scores.append(dm.probs[c][rows, cols].astype(np.float64))
        labels.append(np.full(len(rows), c))
    if not boxes:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)


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
           classes: Sequence[int] | None = None) -> list[Detection]:
    """Boxes from the maps of one image (one per scale), suppressed per class across scales."""
    parts = [cell_boxes(dm, threshold, classes) for dm in maps]
    boxes = np.concatenate([p[0] for p in parts])
    scores = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2] for p in parts])
    origin = np.concatenate([np.full(len(p[1]), s, dtype=float) for p, s in zip(parts, scales)])
    keep = nms(boxes, scores, iou_limit, labels)
    dm = maps[0]
    return [Detection(int(labels[i]), dm.label(int(labels[i])), float(scores[i]),
                      tuple(float(v) for v in boxes[i]), float(origin[i])) for i in keep]
