"""`fcnify demo`: the whole idea, offline, on a model trained on real data.

1. Convert the shipped `digits` classifier (28x28 input, two InnerProducts)
   into a fully-convolutional net, with the equivalence check.
2. Slide it densely over a 640x480 scene of handwritten digits in one
   forward pass, and score the map against the scene's ground truth.
3. If the CaffeNet weights were fetched, do what Caffe's net-surgery example
   does: map Caffe's cat.jpg at 451x451 into an 8x8 grid of ImageNet classes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .convert import convert
from .dense.dense import DenseModel
from .errors import FcnifyError
from .io.models import find_model, read_card
from .io.outputs import text_summary
from .paths import caffe_source, prototxt_dir
from .surgery.report import conversion_report


def score_scene(dm, truth: dict, far: float = 20.0) -> dict:
    """How well a digits map matches the scene's ground truth.

    digits: for each drawn digit, is the class of the cell whose field centre
    is nearest the digit's centre right? background: of the cells whose centre
    is more than `far` px (Chebyshev) from every digit centre, how many say
    background?
    """
    import numpy as np
    arg = dm.argmax()
    rows, cols = arg.shape
    cy = np.array([dm.center(r, 0)[1] for r in range(rows)])
    cx = np.array([dm.center(0, c)[0] for c in range(cols)])
    hits = []
    for d in truth["digits"]:
        x, y = d["center"]
        r, c = int(np.abs(cy - y).argmin()), int(np.abs(cx - x).argmin())
        hits.append(int(arg[r, c]) == d["class"])
    near = np.zeros((rows, cols), dtype=bool)
    for d in truth["digits"]:
        x, y = d["center"]
        near |= (np.abs(cy - y)[:, None] <= far) & (np.abs(cx - x)[None, :] <= far)
    bg = dm.model.background_class
    far_cells = ~near
    background_ok = int(((arg == bg) & far_cells).sum())
    return {"digits": len(hits), "digits_right": int(sum(hits)),
            "far_cells": int(far_cells.sum()), "far_cells_background": background_ok}


def run_demo(out_dir: Path, echo: Callable[[str], None] = print, verbose: bool = False) -> bool:
    """Run the demo, writing into `out_dir`; returns True when every step worked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float]] = []
    ok = True

    def step(name: str, t0: float) -> None:
        timings.append((name, time.perf_counter() - t0))

    echo("== 1. convert the shipped 'digits' classifier into a fully-convolutional net")
    echo("   (a LeNet trained by scripts/data/train_digits.py on scikit-learn's handwritten digits:")
    echo("    28x28 grey input, classes 0-9 and 'background'; ip1 and ip2 are InnerProducts)")
    t0 = time.perf_counter()
    card = find_model("digits")
    result = convert(card.model_def, card.weights, out_dir / "digits", force=True, card=card)
    step("convert digits", t0)
    echo(conversion_report(result))

    echo("\n== 2. map a 640x480 scene of 24 held-out digits in one forward pass")
    echo("   every cell below is the converted net's verdict on one 28x28 window, every 4 px;")
    echo("   '.' means background, a digit means the net saw that digit centred in the window")
    scene = prototxt_dir() / "digits" / "scene.png"
    truth = json.loads((prototxt_dir() / "digits" / "scene.json").read_text())
    t0 = time.perf_counter()
    model = DenseModel(read_card(result.outputs["card"]), verbose=verbose)
    dm = model.classify(scene)
    files = dm.save(out_dir, "scene", force=True)
    model.close()
    step("map the scene", t0)
    echo(text_summary(dm))
    score = score_scene(dm, truth)
    echo(f"ground truth (scene.json): the cell nearest each digit's centre names the right digit for "
         f"{score['digits_right']}/{score['digits']} digits; "
         f"{score['far_cells_background']}/{score['far_cells']} cells farther than 20 px from any "
         f"digit say background")
    echo("pictures: " + ", ".join(str(p) for p in files if p.suffix == ".png"))

    try:
        caffenet = find_model("caffenet")
        have_weights = caffenet.weights is not None and Path(caffenet.weights).exists()
    except FcnifyError:
        have_weights = False
    if have_weights:
        echo("\n== 3. CaffeNet on Caffe's cat.jpg at 451x451, as in Caffe's net-surgery example")
        t0 = time.perf_counter()
        conv = convert(caffenet.model_def, caffenet.weights, out_dir / "caffenet", force=True,
                       card=caffenet, input_size=(451, 451))
        step("convert caffenet", t0)
        echo(conversion_report(conv))
        t0 = time.perf_counter()
        model = DenseModel(read_card(conv.outputs["card"]), verbose=verbose)
        cat = model.classify(caffe_source() / "examples" / "images" / "cat.jpg", size=(451, 451))
        cat.save(out_dir, "cat", force=True)
        model.close()
        step("map cat.jpg", t0)
        echo(text_summary(cat))
    else:
        echo("\n== 3. CaffeNet: skipped — its weights are not in the models folder "
             "(`fcnify fetch caffenet` downloads them, 233 MB)")

    echo("\n== time per step")
    for name, seconds in timings:
        echo(f"   {name:<20} {seconds:6.2f} s")
    echo(f"outputs in {out_dir.resolve()}")
    ok = ok and score["digits_right"] >= 0.9 * score["digits"]
    return ok
