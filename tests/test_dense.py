"""classify-map: dense maps, their geometry in image pixels, and their outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnify.surgery.bound import factor, score_layer, within
from fcnify.caffe.caffemodel import read_weights, write_weights
from fcnify.convert import convert
from fcnify.dense.dense import DenseModel
from fcnify.convert import card_for_model_def
from fcnify.io.models import find_model, read_card
from fcnify.caffe.netdef import parse_netdef, read_netdef

from conftest import call_fcnify, run_fcnify

# A net built to fire on one pattern: a red blob centred in its 32x32 window.
# conv1 (1x1) measures redness, pool1 halves the grid, conv2 (3x3, pad 1)
# passes it on, and fc holds a centred template: class 1 = "red blob here".
RED_DETECTOR = """
name: "red"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 1 kernel_size: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 1 kernel_size: 3 pad: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv2" top: "fc" inner_product_param { num_output: 2 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def _red_weights(path: Path) -> None:
    net = parse_netdef(RED_DETECTOR).param
    # modest gains: saturated probabilities would tie neighbouring cells at 1.0
    conv1 = np.array([1.0, -1.0, -1.0], np.float32).reshape(1, 3, 1, 1) / 255.0 * 0.6
    conv2 = np.zeros((1, 1, 3, 3), np.float32)
    conv2[0, 0, 1, 1] = 1.0
    yy, xx = np.mgrid[0:16, 0:16]
    d2 = (yy - 7.5) ** 2 + (xx - 7.5) ** 2
    template = np.where(d2 <= 4.5, 1.0, -0.25).astype(np.float32)  # a centred bump, penalised around
    fc = np.stack([np.zeros(256, np.float32), template.ravel()])
    blobs = {"conv1": [conv1, np.zeros(1, np.float32)], "conv2": [conv2, np.zeros(1, np.float32)],
             "fc": [fc, np.array([3.0, 0.0], np.float32)]}
    with open(path, "wb") as f:
        write_weights(f, net, blobs)


@pytest.fixture(scope="module")
def red_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("red")
    proto = tmp / "red.prototxt"
    proto.write_text(RED_DETECTOR)
    weights = tmp / "red.caffemodel"
    _red_weights(weights)
    card = card_for_model_def(proto, weights)
    from dataclasses import replace
    from fcnify.io.preprocess import Preprocess
    card = replace(card, preprocess=Preprocess(channels="RGB", raw_scale=255.0))
    model = DenseModel(card, engine="caffe")  # its worker is crashed on purpose
    yield model
    model.close()


def _grey(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(128 + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("x_net,y_net,scale", [(40, 30, None), (150, 97, None), (13, 120, None),
                                               (90, 60, 0.5), (124, 96, 2.0)])
def test_hot_cell_box_contains_pattern(red_model, x_net, y_net, scale):
    """The most confident 'red' cell's box, mapped to original pixels, contains the pasted pattern.

    Positions are given where the net sees them (a 200x160 input); with --scale
    the original image is 1/scale times larger or smaller, and so is the pattern.
    """
    f = 1.0 if scale is None else 1.0 / scale
    side, x, y = int(round(8 * f)), int(round(x_net * f)), int(round(y_net * f))
    h, w = int(round(160 * f)), int(round(200 * f))
    img = _grey(h, w)
    img[y:y + side, x:x + side] = (230, 20, 20)
    dm = red_model.classify(img, scale=scale)
    r, c = np.unravel_index(int(dm.probs[1].argmax()), dm.shape)
    assert dm.probs[1, r, c] > 0.8
    x0, y0, x1, y1 = dm.box(r, c)
    assert x0 <= x and x + side <= x1 and y0 <= y and y + side <= y1
    cx, cy = dm.center(r, c)
    tolerance = 1.5 * 2 / (scale or 1.0)  # pooling quantises the detector to one stride
    assert abs(cx - (x + side / 2)) <= tolerance and abs(cy - (y + side / 2)) <= tolerance


def test_hot_cell_centre_unbiased(red_model):
    """Over a sweep of sub-stride shifts the hot cell's centre is on the pattern on average.

    A constant offset in the geometry (padding counted twice, a field off by
    one layer) shows here even when it is smaller than the box.
    """
    errors = []
    for shift in range(8):
        x, y = 60 + shift, 50 + (3 * shift) % 8
        img = _grey(160, 200, seed=shift)
        img[y:y + 8, x:x + 8] = (230, 20, 20)
        dm = red_model.classify(img)
        r, c = np.unravel_index(int(dm.probs[1].argmax()), dm.shape)
        cx, cy = dm.center(r, c)
        errors.append((cx - (x + 4), cy - (y + 4)))
    mean = np.mean(errors, axis=0)
    assert abs(mean[0]) <= 1.0 and abs(mean[1]) <= 1.0, errors


def test_pattern_absent_is_quiet(red_model):
    """Without the pattern no cell fires: the detector is not trivially hot everywhere."""
    dm = red_model.classify(_grey(160, 200))
    assert dm.probs[1].max() < 0.1


def test_original_size_map_equals_classifier(caffenet, tmp_path):
    """At CaffeNet's own 227x227 input the map is 1x1 and equals the unconverted net's output."""
    proto, weights = caffenet
    result = convert(proto, weights, tmp_path / "cn", check=False)
    model = DenseModel(read_card(result.outputs["card"]))
    try:
        rng = np.random.default_rng(5)
        img = rng.integers(0, 256, (227, 227, 3), dtype=np.uint8)
        scores, _ = model.run_scores(img)
        assert scores.shape == (1000, 1, 1)
        original = model.runner.load(proto, weights)
        x = model.card.preprocess.apply(img)[None]
        fc8 = score_layer(read_netdef(proto).param, "fc8", read_weights(weights))
        out = original.forward({"data": x}, ["fc8", fc8.bottom])
        original.close()
        ref = out["fc8"][0]
        assert within(ref, scores[:, 0, 0], fc8.tolerance(out[fc8.bottom])[0])[0]  # InnerProduct vs 1x1 conv
        assert list(np.argsort(-ref)[:5]) == list(np.argsort(-scores[:, 0, 0])[:5])
    finally:
        model.close()


def test_caffenet_451_boxes(caffenet, tmp_path):
    """CaffeNet at 451x451: an 8x8 map, cell (r, c) covering [32c, 32c+227) x [32r, 32r+227)."""
    proto, weights = caffenet
    result = convert(proto, weights, tmp_path / "cn", check=False)
    model = DenseModel(read_card(result.outputs["card"]))
    try:
        img = np.full((451, 451, 3), 100, np.uint8)
        dm = model.classify(img)
        assert dm.shape == (8, 8)
        for r in range(8):
            for c in range(8):
                assert dm.box(r, c) == (32 * c, 32 * r, 32 * c + 227, 32 * r + 227)
        # the same map reached by --scale from a 902x902 image, boxes in original pixels
        big = np.full((902, 902, 3), 100, np.uint8)
        dm2 = model.classify(big, scale=0.5)
        assert dm2.shape == (8, 8) and dm2.input_size == (451, 451)
        assert dm2.box(7, 3) == (64 * 3, 64 * 7, 64 * 3 + 454, 64 * 7 + 454)
        # --size with a different aspect: x and y scale separately
        dm3 = model.classify(np.full((300, 600, 3), 100, np.uint8), size=(451, 451))
        x0, y0, x1, y1 = dm3.box(1, 2, clip=False)
        assert (x0, y0, x1, y1) == pytest.approx((64 * 600 / 451, 32 * 300 / 451,
                                                   (64 + 227) * 600 / 451, (32 + 227) * 300 / 451))
    finally:
        model.close()


def test_image_smaller_than_field(red_model):
    """An image below one field is refused with the minimum size in the message."""
    from fcnify.errors import ImageError
    with pytest.raises(ImageError, match="at least 32x32"):
        red_model.classify(_grey(31, 100))


@pytest.fixture(scope="module")
def digits_fcn(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    card = find_model("digits")
    result = convert(card.model_def, card.weights, tmp / "digits", card=card)
    return result.outputs["card"]


def test_outputs_files(digits_fcn, tmp_path):
    """--out writes the map's scores, its JSON, and pictures of the top class and of the argmax.

    The scores equal the library's map of the same image; the JSON's cells list
    those scores' top classes; the heatmap draws the top non-background class's
    probabilities (or --class's); the argmax picture draws each cell's winner,
    with a legend naming the classes that win cells (tests/test_pictures.py
    checks what the drawings show, cell by cell).
    """
    from fcnify.io import pictures
    scene = find_model("digits").model_def.parent / "scene.png"
    run = call_fcnify("classify-map", scene, "--card", digits_fcn, "--out", tmp_path, "--top-k", "3")
    assert run.code == 0, run.err
    scores = np.load(tmp_path / "scene.scores.npy")
    assert scores.dtype == np.float32 and scores.shape == (11, 114, 154)
    # each probability carries Softmax's rounding (an exp, a sum of 11, a division), the sum numpy's
    assert np.abs(scores.sum(axis=0, dtype=np.float64) - 1.0).max() <= factor(11 + 2)
    model = DenseModel(read_card(digits_fcn))
    try:
        dm = model.classify(scene)
        assert np.array_equal(scores, dm.probs)  # same engine, same shapes: exact
    finally:
        model.close()
    data = json.loads((tmp_path / "scene.map.json").read_text())
    assert data["map"]["rows"] == 114 and data["map"]["cols"] == 154
    assert data["map"]["stride_px"] == [4, 4] and data["map"]["field_px"] == [28, 28]
    assert data["image_size"] == {"height": 480, "width": 640}
    assert "cells" not in data and data["top_k"]["k"] == 3  # per-cell top-k: in the .npy files
    f = data["map"]["cell_window_image_px"]
    assert (f["x_first"] + 2 * f["x_step"], f["y_first"] + 1 * f["y_step"], f["width"], f["height"]) == (8, 4, 28, 28)
    labels = [str(d) for d in range(10)] + ["background"]
    top_classes, top_probs = (np.load(tmp_path / f"scene.topk_{k}.npy") for k in ("classes", "probs"))
    assert top_classes.shape == top_probs.shape == (3, 114, 154)
    for r, c in list(np.ndindex(114, 154))[::97]:
        p = scores[:, r, c]
        want = np.argsort(-p, kind="stable")[:3]
        assert list(top_classes[:, r, c]) == list(want)
        assert np.array_equal(top_probs[:, r, c], p[want])  # the scores' own float32 values
    assert data["files"]["topk_classes"] == "scene.topk_classes.npy"
    assert data["command"].startswith("fcnify classify-map")
    assert data["model"]["preprocess"]["channels"] == "gray"

    won = np.bincount(scores.argmax(axis=0).ravel(), minlength=11)
    won[10] = -1  # background is never the default heatmap class
    top = int(won.argmax())
    assert data["heatmap_class"] == {"class": top, "label": str(top)}
    heat, arg = pictures.heatmap_picture(dm, top), pictures.argmax_picture(dm)
    assert heat.title[0].startswith(f"P({top}), class {top}: max {scores[top].max():.3g} at cell")
    assert heat.bar == (0.0, 1.0, float(scores[top].max()))  # probability 0-1 by default
    present = [int(text.split(":")[0]) for _, text in arg.legend]
    assert set(present) == set(np.unique(scores.argmax(axis=0)).tolist())
    assert all(text.startswith(f"{c}: {labels[c]} (") for c, (_, text) in zip(present, arg.legend))
    for name, pic in (("heatmap", heat), ("argmax", arg)):
        assert (tmp_path / f"scene.{name}.png").read_bytes() == pictures.png_bytes(pic)  # the files are these
        with Image.open(tmp_path / f"scene.{name}.png") as im:
            im.load()
            assert im.format == "PNG"
            assert im.width >= 600 and 0.5 < im.height / im.width < 1.0  # a 4:3 photo, plus legend

    crop = tmp_path / "crop.png"
    Image.open(scene).crop((0, 0, 200, 160)).save(crop)
    run = call_fcnify("classify-map", crop, "--card", digits_fcn, "--out", tmp_path, "--class", "3")
    assert run.code == 0, run.err
    assert json.loads((tmp_path / "crop.map.json").read_text())["heatmap_class"] == {"class": 3, "label": "3"}
    with DenseModel(read_card(digits_fcn)) as model:
        crop_map = model.classify(crop)
    assert np.array_equal(np.load(tmp_path / "crop.scores.npy"), crop_map.probs)
    assert (tmp_path / "crop.heatmap.png").read_bytes() == pictures.heatmap_png(crop_map, 3)


def test_json_format_stdout(digits_fcn):
    """--format json prints one parseable JSON document per image on stdout."""
    scene = find_model("digits").model_def.parent / "scene.png"
    run = call_fcnify("classify-map", scene, "--card", digits_fcn, "--format", "json")
    assert run.code == 0, run.err
    doc = json.loads(run.out)
    assert doc["map"]["classes"] == 11 and doc["top_classes"][0]["label"] == "background"


def test_directory_with_a_corrupt_file(digits_fcn, tmp_path):
    """Two good images and a corrupt one: both results written, the bad one reported, exit 1."""
    scene = find_model("digits").model_def.parent / "scene.png"
    src = tmp_path / "in"
    src.mkdir()
    img = Image.open(scene)
    img.crop((0, 0, 200, 160)).save(src / "a.png")
    img.crop((300, 200, 520, 400)).save(src / "b.jpg", quality=95)
    (src / "c.png").write_bytes(scene.read_bytes()[:3000])
    out = tmp_path / "out"
    run = run_fcnify("classify-map", src, "--card", digits_fcn, "--out", out)
    assert run.code == 1
    assert "c.png" in run.err and "Traceback" not in run.err
    assert sorted(p.name for p in out.glob("*.scores.npy")) == ["a.scores.npy", "b.scores.npy"]
    assert not list(out.glob("c.*"))


def test_unconverted_net_is_converted_in_memory(tmp_path):
    """classify-map on the unconverted digits net gives the same map as on its conversion."""
    card = find_model("digits")
    scene = card.model_def.parent / "scene.png"
    a = DenseModel(card)
    res = convert(card.model_def, card.weights, tmp_path / "d", card=card)
    b = DenseModel(read_card(res.outputs["card"]))
    try:
        pa, pb = a.classify(scene).probs, b.classify(scene).probs
        assert a.card.fully_convolutional and pa.shape == pb.shape
        assert np.array_equal(pa, pb)  # the same net, weights, engine and shapes: the same bits
    finally:
        a.close()
        b.close()


def test_model_survives_a_worker_crash(red_model):
    """After Caffe dies in the worker, the next image reloads the net and maps normally."""
    from fcnify.errors import EngineCrash
    img = _grey(160, 200)
    img[40:48, 50:58] = (230, 20, 20)
    before = red_model.classify(img).probs
    with pytest.raises(EngineCrash, match="Check failed"):
        red_model.runner.box.call("crash_for_test", "check", context="testing")
    after = red_model.classify(img).probs
    assert np.array_equal(before, after)


def test_existing_output_refused_before_work(digits_fcn, tmp_path):
    """An image whose outputs exist is refused without --force before it is mapped."""
    scene = find_model("digits").model_def.parent / "scene.png"
    (tmp_path / "scene.map.json").write_text("keep me")
    run = call_fcnify("classify-map", scene, "--card", digits_fcn, "--out", tmp_path)
    assert run.code == 2 and "already exists" in run.err
    assert run.out == ""  # nothing was mapped or printed
    assert (tmp_path / "scene.map.json").read_text() == "keep me"
