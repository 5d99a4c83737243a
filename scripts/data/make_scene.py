"""Compose the `digits` demo scene: held-out digits on a sheet of paper, at known places.

The README's first command slides the converted `digits` net over this image;
scene.json says where each digit really is, so a reader (and a test) can check
the dense map against the truth. Only held-out digits are drawn (see
split.json), with the very renderer the net was trained on.

    .venv/bin/python scripts/data/make_scene.py

Writes prototxt/digits/scene.png (640x480 RGB) and prototxt/digits/scene.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_common as dc  # noqa: E402

SEED = 7
WIDTH, HEIGHT = 640, 480     # (size - 28) divisible by 4: the last window ends at the border
COUNT = 24
GAP = 12                     # least distance between two digits' boxes
EDGE = 4                     # "near an edge": within this many px of it


def apart(box: tuple[int, int], boxes: list[tuple[int, int]]) -> bool:
    """True if a 24-px box at (x, y) keeps GAP px clear of every other box."""
    reach = dc.DIGIT + GAP
    return all(abs(box[0] - x) >= reach or abs(box[1] - y) >= reach for x, y in boxes)


def places(rng: np.random.Generator) -> list[tuple[int, int]]:
    """COUNT top-left corners: one in a corner, one hugging each edge, the rest anywhere."""
    hi_x, hi_y = WIDTH - dc.DIGIT, HEIGHT - dc.DIGIT
    wanted = [lambda: (hi_x, hi_y),
              lambda: (int(rng.integers(0, EDGE + 1)), int(rng.integers(0, hi_y + 1))),
              lambda: (int(rng.integers(hi_x - EDGE, hi_x + 1)), int(rng.integers(0, hi_y + 1))),
              lambda: (int(rng.integers(0, hi_x + 1)), int(rng.integers(0, EDGE + 1))),
              lambda: (int(rng.integers(0, hi_x + 1)), int(rng.integers(hi_y - EDGE, hi_y + 1)))]
    wanted += [lambda: (int(rng.integers(0, hi_x + 1)), int(rng.integers(0, hi_y + 1)))] * (COUNT - 5)
    boxes: list[tuple[int, int]] = []
    for draw in wanted:
        for _ in range(10000):
            box = draw()
            if apart(box, boxes):
                boxes.append(box)
                break
        else:
            raise SystemExit(f"could not place {COUNT} digits {GAP} px apart on {WIDTH}x{HEIGHT}")
    return boxes


def pick_digits(rng: np.random.Generator, labels: np.ndarray, heldout: list[int]) -> list[int]:
    """COUNT distinct held-out digits, every class at least twice."""
    classes = rng.permutation(np.arange(COUNT) % 10)
    pool = {c: list(rng.permutation([i for i in heldout if labels[i] == c])) for c in range(10)}
    return [int(pool[int(c)].pop()) for c in classes]


def scene_json(doc: dict) -> str:
    """scene.json with one digit per line, so a diff shows which digit moved."""
    rows = ",\n".join("  " + json.dumps(d) for d in doc["digits"])
    head = json.dumps({k: v for k, v in doc.items() if k != "digits"})[:-1]
    return f'{head}, "digits": [\n{rows}\n]}}\n'


def main() -> int:
    rng = np.random.default_rng(SEED)
    images, labels = dc.load_digits()
    heldout = dc.read_split()["heldout"]
    canvas = dc.paper(rng, HEIGHT, WIDTH)
    digits = []
    for (x, y), i in zip(places(rng), pick_digits(rng, labels, heldout)):
        dc.lay_ink(canvas, dc.upscale(images[i]), x, y, rng)
        half = dc.DIGIT // 2
        digits.append({"class": int(labels[i]), "x": x, "y": y, "size": dc.DIGIT,
                       "center": [x + half, y + half], "source_index": i})
    Image.fromarray(dc.to_rgb(canvas)).save(dc.MODEL_DIR / "scene.png")
    doc = {"image": "scene.png", "width": WIDTH, "height": HEIGHT, "digits": digits}
    (dc.MODEL_DIR / "scene.json").write_text(scene_json(doc))
    print(f"{len(digits)} held-out digits on {WIDTH}x{HEIGHT} -> {dc.MODEL_DIR / 'scene.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
