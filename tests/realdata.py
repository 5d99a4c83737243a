"""The real trained models copied into tests/data/real_models, and MNIST scenes.

Paths to the copied files (see tests/data/real_models/README.md for their
sources, licences and the pixels each net wants), the MNIST test set as
arrays, and a scene composer that pastes MNIST digits into a black image at
known places, so a dense map can be scored against ground truth.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data" / "real_models"
LENET_DEF = DATA / "lenet_mnist" / "deploy.prototxt"
LENET_WEIGHTS = DATA / "lenet_mnist" / "lenet_iter_10000.caffemodel"
MTCNN = DATA / "mtcnn"
MTCNN_PHOTOS = (MTCNN / "mtcnn_test1.jpg", MTCNN / "mtcnn_test2.jpg")
MNIST_IMAGES = DATA / "mnist_t10k" / "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = DATA / "mnist_t10k" / "t10k-labels-idx1-ubyte.gz"


def mtcnn_net(n: int) -> tuple[Path, Path]:
    """MTCNN's detN.prototxt and detN.caffemodel (1 = P-Net, 2 = R-Net, 3 = O-Net)."""
    return MTCNN / f"det{n}.prototxt", MTCNN / f"det{n}.caffemodel"


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test digits (N x 28 x 28 uint8, white on black) and labels (N,)."""
    with gzip.open(MNIST_IMAGES, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != 2051:
        raise ValueError(f"{MNIST_IMAGES}: not an idx3 image file")
    n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    images = np.frombuffer(raw, np.uint8, n * rows * cols, 16).reshape(n, rows, cols)
    with gzip.open(MNIST_LABELS, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != 2049:
        raise ValueError(f"{MNIST_LABELS}: not an idx1 label file")
    labels = np.frombuffer(raw, np.uint8, int.from_bytes(raw[4:8], "big"), 8)
    return images, labels


@dataclass(frozen=True)
class Placed:
    """One digit in a scene: its label and its box (x0, y0, x1, y1), end exclusive."""

    label: int
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def paste_digits(height: int, width: int, digits: list[tuple[np.ndarray, int, int, int]]
                 ) -> tuple[np.ndarray, list[Placed]]:
    """A black uint8 H x W x 3 scene with each (digit image, label, x0, y0) pasted (max blend)."""
    scene = np.zeros((height, width), np.uint8)
    placed = []
    for img, label, x0, y0 in digits:
        h, w = img.shape
        if x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height:
            raise ValueError(f"digit at ({x0}, {y0}) size {w}x{h} leaves the {width}x{height} scene")
        np.maximum(scene[y0:y0 + h, x0:x0 + w], img, out=scene[y0:y0 + h, x0:x0 + w])
        placed.append(Placed(int(label), (x0, y0, x0 + w, y0 + h)))
    return np.repeat(scene[:, :, None], 3, axis=2), placed


def digit_scene(height: int, width: int, count: int, *, seed: int, gap: int = 28,
                grid: int | None = None, size: int = 28
                ) -> tuple[np.ndarray, list[Placed]]:
    """A scene of `count` MNIST test digits at random non-overlapping places.

    Digits are `size` px (resized from 28 with Pillow when different), at least
    `gap` px apart (edge to edge). With `grid`, every top-left corner is a
    multiple of `grid` (digits "on the stride grid"); without, anywhere.
    Returns fewer than `count` digits only if the scene is too full.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = load_mnist()
    order = rng.permutation(len(images))
    boxes: list[tuple[int, int, int, int]] = []
    digits = []
    step = grid or 1
    tries = 0
    for idx in order:
        if len(digits) == count or tries > 200 * count:
            break
        img = images[idx]
        if size != 28:
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
        while tries <= 200 * count:
            tries += 1
            x0 = int(rng.integers(0, (width - size) // step + 1)) * step
            y0 = int(rng.integers(0, (height - size) // step + 1)) * step
            if all(x0 + size + gap <= bx0 or bx1 + gap <= x0 or y0 + size + gap <= by0
                   or by1 + gap <= y0 for bx0, by0, bx1, by1 in boxes):
                boxes.append((x0, y0, x0 + size, y0 + size))
                digits.append((img, int(labels[idx]), x0, y0))
                break
    return paste_digits(height, width, digits)
