#!/usr/bin/env python3
"""Real LeNet MNIST on scenes of MNIST test digits: --stride and --scales --detect, measured.

Not a test (it takes minutes on 2 cores): the figures quoted in docs/cli.md (--stride) and docs/detection.md.
  (1) 800x600 scene, digits placed anywhere: share of digits named by the map
      cell centred on them, at the net's stride 4 and at --stride 1;
  (2) a scene of 28-px and 42-px digits, --scales 1,0.667 --detect: share of
      digits of each size with a box of the right class at IoU >= 0.5, and the
      share of boxes that match no digit, for a few thresholds and NMS limits.
Writes JSON (default measure_digits.json). Usage:
  .venv/bin/python scripts/bench/measure_digits.py [--stride 2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from realdata import LENET_DEF, LENET_WEIGHTS, digit_scene, load_mnist, paste_digits  # noqa: E402

from fcnify.dense.dense import DenseModel  # noqa: E402
from fcnify.dense.detect import detect, iou  # noqa: E402
from fcnify.convert import card_for_model_def  # noqa: E402
from fcnify.io.preprocess import Preprocess  # noqa: E402
from fcnify.dense.pyramid import map_scales  # noqa: E402


def lenet_card():
    card = card_for_model_def(LENET_DEF, LENET_WEIGHTS)
    return replace(card, preprocess=Preprocess(channels="gray", raw_scale=255 / 256, mean=None))


def centred_accuracy(h: int, w: int) -> dict:
    scene, placed = digit_scene(h, w, 300, seed=14, gap=8)
    out = {"digits": len(placed)}
    for stride in (None, 1):
        model = DenseModel(lenet_card(), stride=stride)
        dm = model.classify(scene)
        s = model.geometry.stride[0]
        arg = dm.argmax()
        hits = sum(int(arg[min(round(p.box[1] / s), dm.shape[0] - 1),
                           min(round(p.box[0] / s), dm.shape[1] - 1)]) == p.label for p in placed)
        out[f"stride_{s}"] = hits / len(placed)
        model.close()
        print(f"(1) stride {s}: the cell centred on the digit names {hits}/{len(placed)} "
              f"({100 * hits / len(placed):.1f}%)")
    return out


def mixed_scene(h: int, w: int, count: int, seed: int, gap: int = 6):
    """MNIST test digits, alternately 28 px and 42 px (bilinear), at random places."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    images, labels = load_mnist()
    boxes, digits = [], []
    for n, idx in enumerate(rng.permutation(len(images))[:count * 3]):
        if len(digits) == count:
            break
        size = (28, 42)[n % 2]
        img = images[idx] if size == 28 else np.asarray(
            Image.fromarray(images[idx]).resize((size, size), Image.BILINEAR))
        for _ in range(200):
            x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
            if all(x0 + size + gap <= a or c + gap <= x0 or y0 + size + gap <= b or d + gap <= y0
                   for a, b, c, d in boxes):
                boxes.append((x0, y0, x0 + size, y0 + size))
                digits.append((img, int(labels[idx]), x0, y0))
                break
    return paste_digits(h, w, digits)


def detection(h: int, w: int, stride: int) -> list[dict]:
    scene, placed = mixed_scene(h, w, 400, seed=7)
    model = DenseModel(lenet_card(), stride=stride)
    maps = map_scales(model, scene, [1, 0.667])
    model.close()
    rows = []
    print(f"(2) {len(placed)} digits (28 and 42 px), --stride {stride} --scales 1,0.667 --detect")
    for threshold in (0.9, 0.99):
        for limit in (0.1, 0.3, 0.5):
            found = detect(maps, [1, 0.667], threshold, limit)
            boxes = np.array([d.box for d in found]).reshape(-1, 4)
            classes = np.array([d.cls for d in found])
            recall = {}
            for size in (28, 42):
                group = [p for p in placed if p.box[2] - p.box[0] == size]
                hit = sum(bool(((iou(np.array(p.box, float), boxes) >= 0.5) & (classes == p.label)).any())
                          for p in group)
                recall[size] = hit / len(group)
            false = sum(not any(iou(np.array(d.box), np.array([p.box], float))[0] >= 0.5 and
                                p.label == d.cls for p in placed) for d in found)
            rows.append({"threshold": threshold, "nms_iou": limit, "recall_28": recall[28],
                         "recall_42": recall[42], "boxes": len(found),
                         "false_share": false / max(1, len(found))})
            print(f"  threshold {threshold} nms-iou {limit}: recall 28 px {100 * recall[28]:.1f}%, "
                  f"42 px {100 * recall[42]:.1f}%; {len(found)} boxes, "
                  f"{100 * false / max(1, len(found)):.1f}% false")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="measure_digits.json")
    ap.add_argument("--stride", type=int, default=2, help="--stride for the detection part")
    ap.add_argument("--quick", action="store_true", help="smaller scenes")
    args = ap.parse_args()
    h, w = (300, 400) if args.quick else (600, 800)
    results = {"centred": centred_accuracy(h, w), "detection": detection(h, w, args.stride)}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
