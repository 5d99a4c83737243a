"""How the `digits` demo draws a digit: one renderer for training, the scene and the test.

The demo model must see at training time exactly the pixels that the scene
shows it, so paper, ink and placement live here and nowhere else. A digit
from scikit-learn's 8x8 set (values 0-16, ink high) is upscaled bilinearly to
24x24 and laid as dark ink on light grey paper; an 8-bit RGB image comes out,
because that is what fcnify's classify-map reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MODEL_DIR = Path(__file__).resolve().parents[2] / "prototxt" / "digits"
SPLIT_FILE = MODEL_DIR / "split.json"
PATCH = 28          # the net's field: one classification window
DIGIT = 24          # drawn digit size in pixels
MARGIN = (PATCH - DIGIT) // 2   # a centred digit's offset inside the patch
BACKGROUND = 10     # class index of "no centred digit here"
LABELS = [str(d) for d in range(10)] + ["background"]
PREPROCESS = {"channels": "gray", "raw_scale": 1.0, "mean": [1.0], "input_scale": -1.0}

# Paper and ink, in 8-bit grey levels. Ranges, not constants: each sheet or
# patch draws its own values, so the net never keys on one exact shade.
PAPER_LEVEL = (200.0, 235.0)
PAPER_NOISE = (2.0, 5.0)       # per-pixel Gaussian sigma
PAPER_SHADE = 6.0              # +- amplitude of the slow brightness variation
SHADE_CELL = 64                # wavelength of that variation, in pixels
INK_LEVEL = (15.0, 80.0)
# Seed of the held-out view (every held-out digit centred), shared by
# train_digits.py's report and tests/test_digits_model.py, so both see one number.
HELDOUT_SEED = 2024


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits as (N, 8, 8) float32 in 0-16, and their classes."""
    from sklearn.datasets import load_digits as sk_load_digits
    data = sk_load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def read_split() -> dict:
    """The train / held-out split written by train_digits.py (indices into load_digits)."""
    return json.loads(SPLIT_FILE.read_text())


def upscale(image: np.ndarray, size: int = DIGIT) -> np.ndarray:
    """8x8 digit (0-16) -> size x size ink coverage in [0, 1], bilinear, as Pillow does it.

    The net is trained on 24-px digits; other sizes are what it must call
    background (a window inside a larger digit, a smaller one) and what the
    two-size detection scene draws.
    """
    small = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32) / 16.0)
    big = np.asarray(small.resize((size, size), Image.BILINEAR), dtype=np.float32)
    return np.clip(big, 0.0, 1.0)


def paper(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A sheet of light grey paper (float grey levels), with grain and slow shading.

    A training patch is drawn as a random crop of such a sheet: the shading
    grid starts at a random phase, so a 28-px patch sees a gentle gradient,
    as a 28-px window of the scene does.
    """
    level = rng.uniform(*PAPER_LEVEL)
    sigma = rng.uniform(*PAPER_NOISE)
    oy, ox = rng.uniform(0, SHADE_CELL, size=2)
    ys = (np.arange(height) + oy) / SHADE_CELL
    xs = (np.arange(width) + ox) / SHADE_CELL
    grid = rng.uniform(-PAPER_SHADE, PAPER_SHADE, size=(int(ys[-1]) + 2, int(xs[-1]) + 2))
    rows = np.stack([np.interp(xs, np.arange(grid.shape[1]), g) for g in grid])
    shade = np.stack([np.interp(ys, np.arange(grid.shape[0]), c) for c in rows.T], axis=1)
    return (level + shade + rng.normal(0.0, sigma, size=(height, width))).astype(np.float32)


def lay_ink(canvas: np.ndarray, coverage: np.ndarray, x: int, y: int,
            rng: np.random.Generator) -> None:
    """Blend ink of coverage (h x w, 0-1) onto canvas with its top-left at (x, y), clipped."""
    ink = rng.uniform(*INK_LEVEL)
    h, w = coverage.shape
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, canvas.shape[1]), min(y + h, canvas.shape[0])
    if x0 >= x1 or y0 >= y1:
        return
    a = coverage[y0 - y:y1 - y, x0 - x:x1 - x]
    region = canvas[y0:y1, x0:x1]
    region[...] = region * (1.0 - a) + ink * a


def strokes(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """Coverage (size x size, 0-1) of a few anti-aliased pen strokes that are not digits."""
    scale = 4
    mask = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(count):
        width = int(rng.uniform(1.5, 4.0) * scale)
        pts = rng.uniform(-0.2 * size, 1.2 * size, size=(2, 2)) * scale
        if rng.random() < 0.5:
            draw.line([tuple(pts[0]), tuple(pts[1])], fill=255, width=width)
        else:
            box = sorted(pts[:, 0]), sorted(pts[:, 1])
            start = rng.uniform(0, 360)
            draw.arc([box[0][0], box[1][0], box[0][1] + scale, box[1][1] + scale],
                     start, start + rng.uniform(60, 300), fill=255, width=width)
    small = mask.resize((size, size), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255.0


def to_rgb(canvas: np.ndarray) -> np.ndarray:
    """Float grey canvas -> H x W x 3 uint8 RGB, the format fcnify reads."""
    grey = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def render_patch(rng: np.random.Generator, digits: list[tuple[np.ndarray, int, int]]) -> np.ndarray:
    """A 28x28 RGB patch of paper with each (coverage, dx, dy) digit drawn dx, dy off centre."""
    canvas = paper(rng, PATCH, PATCH)
    for coverage, dx, dy in digits:
        lay_ink(canvas, coverage, MARGIN + dx, MARGIN + dy, rng)
    return to_rgb(canvas)


def render_centred(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """The held-out evaluation view: one 8x8 digit drawn exactly centred in a patch."""
    return render_patch(rng, [(upscale(image), 0, 0)])


def heldout_view(images: np.ndarray, heldout: list[int]) -> list[np.ndarray]:
    """Every held-out digit drawn centred, seeded by HELDOUT_SEED, as RGB patches."""
    rng = np.random.default_rng(HELDOUT_SEED)
    return [render_centred(rng, images[i]) for i in heldout]
