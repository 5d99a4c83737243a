"""The embedded demo: the shipped digits model finds the digits of the shipped scene."""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest

from fcnify.caffe.caffemodel import read_weights, write_weights
from fcnify.convert import convert
from fcnify.demo import score_scene
from fcnify.dense.dense import DenseModel
from fcnify.io.models import find_model, read_card
from fcnify.caffe.netdef import read_netdef

from conftest import run_fcnify


@pytest.fixture(scope="module")
def scene():
    card = find_model("digits")
    truth = json.loads((card.model_def.parent / "scene.json").read_text())
    return card.model_def.parent / "scene.png", truth


def _scene_score(card, scene_png, truth, tmp):
    result = convert(card.model_def, card.weights, tmp / "digits", card=card)
    model = DenseModel(read_card(result.outputs["card"]))
    try:
        return score_scene(model.classify(scene_png), truth)
    finally:
        model.close()


def test_scene_digits_found(scene, tmp_path):
    """The converted digits net names >= 90% of the scene's digits and calls far cells background."""
    png, truth = scene
    s = _scene_score(find_model("digits"), png, truth, tmp_path)
    assert s["digits"] == len(truth["digits"]) >= 20
    assert s["digits_right"] >= 0.9 * s["digits"]
    assert s["far_cells"] > 10000 and s["far_cells_background"] >= 0.9 * s["far_cells"]


def test_shuffled_weights_fail_the_scene(scene, tmp_path):
    """The same scoring with each weight blob shuffled (seeded) falls far below the bar."""
    png, truth = scene
    card = find_model("digits")
    w = read_weights(card.weights)
    rng = np.random.default_rng(0)
    shuffled = {name: [rng.permutation(b.ravel()).reshape(b.shape) for b in lw.blobs]
                for name, lw in w.layers.items()}
    bad = tmp_path / "shuffled.caffemodel"
    with open(bad, "wb") as f:
        write_weights(f, read_netdef(card.model_def).param, shuffled)
    s = _scene_score(replace(card, weights=bad), png, truth, tmp_path)
    passes = (s["digits_right"] >= 0.9 * s["digits"]
              and s["far_cells_background"] >= 0.9 * s["far_cells"])
    assert not passes, s


def test_scene_score_detects_a_shifted_map(scene, tmp_path):
    """Reading the map one field off (a geometry bug) fails the digit criterion."""
    png, truth = scene
    card = find_model("digits")
    result = convert(card.model_def, card.weights, tmp_path / "d", card=card)
    model = DenseModel(read_card(result.outputs["card"]))
    try:
        dm = model.classify(png)
    finally:
        model.close()
    dm.probs = np.roll(dm.probs, 7, axis=2)  # 7 cells = 28 px: every digit's cell now looks elsewhere
    s = score_scene(dm, truth)
    assert s["digits_right"] < 0.5 * s["digits"]


def _step_times(out: str) -> dict[str, float]:
    """The demo's "== time per step" section: {step: seconds} (README: it prints how long each step took)."""
    lines = out.split("== time per step\n", 1)[1].splitlines()
    steps = {}
    for line in lines:
        found = re.fullmatch(r"   (\S.*?)\s+(\d+\.\d\d) s", line)
        if not found:
            break
        steps[found.group(1)] = float(found.group(2))
    return steps


def test_demo_command(tmp_path):
    """`fcnify demo` runs end to end, explains itself and writes the pictures."""
    t0 = time.perf_counter()
    run = run_fcnify("demo", "--out", tmp_path / "demo", env={"FCNIFY_MODELS": str(tmp_path / "none")})
    wall = time.perf_counter() - t0
    assert run.code == 0, run.err
    steps = _step_times(run.out)
    assert list(steps) == ["convert digits", "map the scene"], run.out
    assert all(t > 0 for t in steps.values()) and sum(steps.values()) < wall
    # "EQUIVALENT" alone would also match "NOT EQUIVALENT"
    assert re.search(r"^\s*result: EQUIVALENT\b", run.out, re.M), run.out
    assert "NOT EQUIVALENT" not in run.out and "ground truth" in run.out
    assert "CaffeNet: skipped" in run.out and "fcnify fetch caffenet" in run.out
    for name in ("scene.heatmap.png", "scene.argmax.png", "scene.scores.npy", "digits_full_conv.caffemodel"):
        assert (tmp_path / "demo" / name).is_file()


def test_demo_with_caffenet_weights(tmp_path, caffenet):
    """With CaffeNet weights in the models folder, the demo maps cat.jpg at 451x451 into 8x8 cells."""
    _, weights = caffenet
    models = tmp_path / "models" / "bvlc_reference_caffenet"
    models.mkdir(parents=True)
    shutil.copy(weights, models / "bvlc_reference_caffenet.caffemodel")
    run = run_fcnify("demo", "--out", tmp_path / "demo", env={"FCNIFY_MODELS": str(tmp_path / "models")})
    assert run.code == 0, run.err
    assert list(_step_times(run.out)) == ["convert digits", "map the scene", "convert caffenet", "map cat.jpg"]
    assert "cat.jpg" in run.out and "map 8x8 cells of 1000 classes" in run.out
    assert (tmp_path / "demo" / "cat.heatmap.png").is_file()
