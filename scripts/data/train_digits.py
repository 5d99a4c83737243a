"""Train fcnify's demo model `digits`, a LeNet that says which digit is centred in 28 px.

The README's first command converts this net to a fully-convolutional one and
slides it over prototxt/digits/scene.png every 4 px. So the net must learn two
things: the 10 digits of scikit-learn's set, drawn 24 px and centred within
+-2 px, and that every other 28-px window (blank paper, digits 7 px or more
off centre, two half digits, stray strokes, a window inside a digit drawn
1.3-1.7x larger, a digit drawn 0.4-0.75x smaller) is class 10, "background".
The last two make it a detector over an image pyramid: with `--scales
1,0.667` a 36-px digit is found at 0.667 (where it is 24 px) and not at 1
(where a window sees only part of it), a 24-px one at 1 and not at 0.667
(where it is 16 px). A share of the digits is drawn 36 px and shrunk to 28 by
fcnify's own resize, so the net also knows a digit as the pyramid shows it.

Pixels go through fcnify's own Preprocess, so the model's JSON sidecar is the
truth about its input. Training uses Caffe's SGD solver from pycaffe, seeded.

    .venv/bin/python scripts/data/train_digits.py     # about 5 minutes on 2 CPU cores

Writes prototxt/digits/{deploy.prototxt, digits.caffemodel, labels.txt,
model.json, split.json}; exits 1 if held-out digit accuracy is below 95%.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402
from caffe import layers as L, params as P  # noqa: E402
from caffe.proto import caffe_pb2  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_common as dc  # noqa: E402
from fcnify.io.images import resize  # noqa: E402
from fcnify.io.preprocess import Preprocess  # noqa: E402

SEED = 1234
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.3
BATCH = 64
ITERATIONS = 6000
BACKGROUND_SHARE = 0.5
PYRAMID_SHARE = 0.25           # of the digits: drawn 1.5x, then resized by 2/3 as --scales does
LARGER = (1.3, 1.7)            # background: a window inside a digit this much larger
SMALLER = (0.4, 0.75)          # background: a digit this much smaller
MIN_ACCURACY = 0.95
BACKGROUND_EVAL = 2000
PREPROCESS = Preprocess.from_dict(dc.PREPROCESS)


# ---- the net ---------------------------------------------------------------

def lenet(batch: int, deploy: bool) -> caffe_pb2.NetParameter:
    """LeNet with an 11-way head: 28-px field, stride 4 once its InnerProducts are convolutions."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 1, dc.PATCH, dc.PATCH]))
    if not deploy:
        n.label = L.Input(shape=dict(dim=[batch]))
    weights = dict(weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
    lr = [dict(lr_mult=1), dict(lr_mult=2)]
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, param=lr, **weights)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, param=lr, **weights)
    n.pool2 = L.Pooling(n.conv2, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.ip1 = L.InnerProduct(n.pool2, num_output=256, param=lr, **weights)
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.ip1, num_output=len(dc.LABELS), param=lr, **weights)
    if deploy:
        n.prob = L.Softmax(n.ip2)
    else:
        n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    proto = n.to_proto()
    proto.name = "digits"
    return proto


def solver_proto(train_net: Path) -> caffe_pb2.SolverParameter:
    """Plain LeNet SGD schedule; random_seed fixes Caffe's weight fillers."""
    s = caffe_pb2.SolverParameter()
    s.train_net = str(train_net)
    s.base_lr = 0.01
    s.momentum = 0.9
    s.weight_decay = 5e-4
    s.lr_policy = "inv"
    s.gamma = 1e-4
    s.power = 0.75
    s.max_iter = ITERATIONS
    s.display = 0
    s.snapshot = 0
    s.snapshot_after_train = False
    s.random_seed = SEED
    s.solver_mode = caffe_pb2.SolverParameter.CPU
    return s


# ---- the data --------------------------------------------------------------

def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified train / held-out split of scikit-learn's digits."""
    from sklearn.model_selection import train_test_split
    train, heldout = train_test_split(np.arange(len(labels)), test_size=HELDOUT_FRACTION,
                                      stratify=labels, random_state=SPLIT_SEED)
    return np.sort(train), np.sort(heldout)


def off_centre(rng: np.random.Generator, low: int = 7, high: int = 25) -> tuple[int, int]:
    """An offset whose larger component is at least `low` px: no longer 'this digit'."""
    m = int(rng.integers(low, high + 1)) * (1 if rng.random() < 0.5 else -1)
    other = int(rng.integers(-abs(m), abs(m) + 1))
    return (m, other) if rng.random() < 0.5 else (other, m)


def dust(rng: np.random.Generator) -> np.ndarray:
    """Coverage of a few specks and smudges, the size of pen dots, not strokes."""
    yy, xx = np.mgrid[0:dc.PATCH, 0:dc.PATCH]
    cover = np.zeros((dc.PATCH, dc.PATCH), np.float32)
    for _ in range(int(rng.integers(1, 7))):
        cy, cx = rng.uniform(0, dc.PATCH, size=2)
        r = rng.uniform(0.6, 2.5)
        cover = np.maximum(cover, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    return cover * rng.uniform(0.3, 1.0)


def resized_digit(rng: np.random.Generator, image: np.ndarray, factor: tuple[float, float],
                  reach: int) -> np.ndarray:
    """A patch with one digit drawn `factor` times 24 px, its centre within `reach` px of the patch's."""
    size = int(round(dc.DIGIT * rng.uniform(*factor)))
    dx, dy = (int(v) for v in rng.integers(-reach, reach + 1, size=2))
    shift = (size - dc.DIGIT) // 2      # render_patch places a 24-px digit; centre this one instead
    return dc.render_patch(rng, [(dc.upscale(image, size), dx - shift, dy - shift)])


def background_patch(rng: np.random.Generator, covers: list[np.ndarray],
                     images: np.ndarray) -> np.ndarray:
    """One 28-px window that must read as background in a scene of digits on paper.

    `covers` are the training digits at 24 px, `images` the same digits as 8x8
    arrays, for the kinds drawn at other sizes.
    """
    pick = lambda: covers[int(rng.integers(len(covers)))]  # noqa: E731
    image = lambda: images[int(rng.integers(len(images)))]  # noqa: E731
    kind = rng.random()
    if kind < 0.10:                                    # blank paper
        return dc.render_patch(rng, [])
    if kind < 0.16:                                    # paper with specks
        canvas = dc.paper(rng, dc.PATCH, dc.PATCH)
        dc.lay_ink(canvas, dust(rng), 0, 0, rng)
        return dc.to_rgb(canvas)
    if kind < 0.36:                                    # inside a larger digit, anywhere on it
        return resized_digit(rng, image(), LARGER, reach=10)
    if kind < 0.46:                                    # a smaller digit, about centred
        return resized_digit(rng, image(), SMALLER, reach=4)
    if kind < 0.66:                                    # one digit, off centre
        return dc.render_patch(rng, [(pick(), *off_centre(rng))])
    if kind < 0.80:                                    # two half digits either side
        gap = int(rng.integers(dc.DIGIT + 12, dc.DIGIT + 30))
        a = int(rng.integers(-25, -6))
        b = max(a + gap, 7)
        s1, s2 = (int(v) for v in rng.integers(-10, 11, size=2))
        pair = [(a, s1), (b, s2)] if rng.random() < 0.5 else [(s1, a), (s2, b)]
        return dc.render_patch(rng, [(pick(), dx, dy) for dx, dy in pair])
    if kind < 0.90:                                    # two or three digits anywhere off centre
        return dc.render_patch(rng, [(pick(), *off_centre(rng))
                                     for _ in range(int(rng.integers(2, 4)))])
    canvas = dc.paper(rng, dc.PATCH, dc.PATCH)         # stray pen strokes
    dc.lay_ink(canvas, dc.strokes(rng, dc.PATCH, int(rng.integers(1, 4))), 0, 0, rng)
    return dc.to_rgb(canvas)


def digit_patch(rng: np.random.Generator, cover: np.ndarray) -> np.ndarray:
    """A digit centred within +-2 px: the slack of a 4-px stride's nearest window."""
    dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
    return dc.render_patch(rng, [(cover, dx, dy)])


def pyramid_digit_patch(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A digit drawn 36 px in a 42-px patch, within +-3 px of centre, shrunk to 28 px by
    fcnify's resize: what `--scales 0.667` shows the net of a digit 1.5x its size."""
    big = dc.PATCH * 3 // 2
    size = dc.DIGIT * 3 // 2
    canvas = dc.paper(rng, big, big)
    dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
    dc.lay_ink(canvas, dc.upscale(image, size), (big - size) // 2 + dx, (big - size) // 2 + dy, rng)
    return resize(dc.to_rgb(canvas), dc.PATCH, dc.PATCH)


def batch(rng: np.random.Generator, covers: list[np.ndarray], images: np.ndarray,
          labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A training batch, already through Preprocess, and its class indices."""
    x = np.empty((size, 1, dc.PATCH, dc.PATCH), np.float32)
    y = np.empty(size, np.float32)
    for k in range(size):
        if rng.random() < BACKGROUND_SHARE:
            x[k], y[k] = PREPROCESS.apply(background_patch(rng, covers, images)), dc.BACKGROUND
            continue
        i = int(rng.integers(len(covers)))
        patch = (pyramid_digit_patch(rng, images[i]) if rng.random() < PYRAMID_SHARE
                 else digit_patch(rng, covers[i]))
        x[k], y[k] = PREPROCESS.apply(patch), labels[i]
    return x, y


def heldout_digits(images: np.ndarray, labels: np.ndarray, heldout: list[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Every held-out digit drawn exactly centred, seeded: the accuracy test's view."""
    x = np.stack([PREPROCESS.apply(rgb) for rgb in dc.heldout_view(images, heldout)])
    return x, labels[heldout]


def classify(net: caffe.Net, x: np.ndarray) -> np.ndarray:
    """Argmax classes of a deploy net over a stack of preprocessed patches."""
    net.blobs["data"].reshape(*x.shape)
    net.reshape()
    net.blobs["data"].data[...] = x
    return net.forward()["prob"].argmax(axis=1)


# ---- main ------------------------------------------------------------------

def write_sidecars(out: Path, train: np.ndarray, heldout: np.ndarray) -> None:
    """labels.txt, model.json and split.json: what fcnify and the scene need besides weights."""
    (out / "labels.txt").write_text("\n".join(dc.LABELS) + "\n")
    model = {"name": "digits",
             "description": "LeNet on scikit-learn's 8x8 digits drawn 24 px dark on light "
                            "paper; class 10 is background. Trained by scripts/data/train_digits.py.",
             "model_def": "deploy.prototxt",
             "preprocess": PREPROCESS.to_dict(), "labels": "labels.txt",
             "weights": "digits.caffemodel", "background_class": dc.BACKGROUND}
    (out / "model.json").write_text(json.dumps(model, indent=2) + "\n")
    split_doc = {"source": "sklearn.datasets.load_digits", "seed": SPLIT_SEED,
                 "heldout_fraction": HELDOUT_FRACTION, "stratified": True,
                 "train": [int(i) for i in train], "heldout": [int(i) for i in heldout]}
    (out / "split.json").write_text(json.dumps(split_doc) + "\n")


def main() -> int:
    np.random.seed(SEED)
    rng = np.random.default_rng(SEED)
    caffe.set_mode_cpu()
    out = dc.MODEL_DIR
    out.mkdir(parents=True, exist_ok=True)

    images, labels = dc.load_digits()
    train, heldout = split(labels)
    write_sidecars(out, train, heldout)
    (out / "deploy.prototxt").write_text(str(lenet(1, deploy=True)))
    covers = [dc.upscale(images[i]) for i in train]

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        train_net = Path(tmp) / "train.prototxt"
        train_net.write_text(str(lenet(BATCH, deploy=False)))
        solver_file = Path(tmp) / "solver.prototxt"
        solver_file.write_text(str(solver_proto(train_net)))
        solver = caffe.SGDSolver(str(solver_file))
        running = None
        for it in range(1, ITERATIONS + 1):
            x, y = batch(rng, covers, images[train], labels[train], BATCH)
            solver.net.blobs["data"].data[...] = x
            solver.net.blobs["label"].data[...] = y
            solver.step(1)
            loss = float(solver.net.blobs["loss"].data)
            running = loss if running is None else 0.98 * running + 0.02 * loss
            if it % 500 == 0:
                print(f"iter {it:5d}  loss {running:.4f}  ({time.time() - start:.0f} s)", flush=True)
        solver.net.save(str(out / "digits.caffemodel"))
    print(f"training took {time.time() - start:.0f} s")

    net = caffe.Net(str(out / "deploy.prototxt"), str(out / "digits.caffemodel"), caffe.TEST)
    x, y = heldout_digits(images, labels, [int(i) for i in heldout])
    digit_acc = float((classify(net, x) == y).mean())
    bg_rng = np.random.default_rng(dc.HELDOUT_SEED + 1)
    held_covers = [dc.upscale(images[i]) for i in heldout]
    xb = np.stack([PREPROCESS.apply(background_patch(bg_rng, held_covers, images[heldout]))
                   for _ in range(BACKGROUND_EVAL)])
    bg_acc = float((classify(net, xb) == dc.BACKGROUND).mean())
    size_kb = (out / "digits.caffemodel").stat().st_size / 1024
    print(f"held-out digits (centred): {digit_acc:.2%} of {len(y)}")
    print(f"held-out-style background: {bg_acc:.2%} of {BACKGROUND_EVAL}")
    print(f"weights: {out / 'digits.caffemodel'} ({size_kb:.0f} KiB)")
    if digit_acc < MIN_ACCURACY:
        print(f"FAIL: held-out accuracy {digit_acc:.2%} < {MIN_ACCURACY:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
