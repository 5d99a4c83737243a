"""Real trained nets nobody here designed, run densely from the command line.

LeNet MNIST (Caffe's example weights) on scenes of MNIST test digits, MTCNN's
R-Net on the authors' photos, with the preprocessing each was trained with
given as convert/classify-map options. The originals, run by pycaffe on the
crops under the cells, are the reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bounds import assert_map_matches_pycaffe
from conftest import call_fcnify
from fcnify.surgery.bound import factor
from float_bound import rounding_bound
from nets import pycaffe
from realdata import LENET_DEF, LENET_WEIGHTS, MTCNN_PHOTOS, digit_scene, mtcnn_net

LENET_OPTIONS = ("--channels", "gray", "--raw-scale", "255", "--input-scale", "0.00390625")
MTCNN_OPTIONS = ("--channels", "rgb", "--mean", "127.5", "--input-scale", "0.0078125", "--transpose")
# Faces in the authors' photos (x0, y0, x1, y1), drawn by hand around each head.
FACES = {"mtcnn_test1": [(80, 5, 165, 110), (285, 65, 375, 170)],
         "mtcnn_test2": [(170, 35, 385, 280)]}
# R-Net takes 24-px faces; these scales bring the photos' faces near that size.
SCALES = {"mtcnn_test1": 0.35, "mtcnn_test2": 0.15}


@pytest.fixture(scope="module")
def lenet_card(tmp_path_factory) -> Path:
    """LeNet converted with its preprocessing given on the command line."""
    out = tmp_path_factory.mktemp("lenet") / "lenet"
    run = call_fcnify("convert", "--model-def", LENET_DEF, "--weights", LENET_WEIGHTS,
                      "--out", out, *LENET_OPTIONS)
    assert run.code == 0, run.err
    assert "preprocessing (written into the card): gray" in run.out and "0.00390625" in run.out
    return Path(f"{out}_full_conv.json")


@pytest.fixture(scope="module")
def rnet_card(tmp_path_factory) -> Path:
    """MTCNN R-Net converted with RGB, (x - 127.5) * 0.0078125 and transposition."""
    proto, weights = mtcnn_net(2)
    out = tmp_path_factory.mktemp("rnet") / "det2"
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", out,
                      *MTCNN_OPTIONS)
    assert run.code == 0, run.err
    assert "result: EQUIVALENT" in run.out and "image transposed" in run.out
    return Path(f"{out}_full_conv.json")


def lenet_layers():
    """LeNet's layers with its trained parameters, for the rounding bound."""
    caffe = pycaffe()
    net = caffe.Net(str(LENET_DEF), str(LENET_WEIGHTS), caffe.TEST)
    p = {k: [b.data.copy() for b in v] for k, v in net.params.items()}
    return [("conv", *p["conv1"]), ("max", 2, 2), ("conv", *p["conv2"]), ("max", 2, 2),
            ("ip", *p["ip1"]), ("relu",), ("ip", *p["ip2"])]


def test_lenet_names_mnist_digits_in_a_scene(lenet_card, tmp_path):
    """The cell whose window is centred on each digit names it for >= 97% of 200 digits."""
    scene, placed = digit_scene(960, 1280, 200, seed=13, grid=4)
    assert len(placed) == 200
    Image.fromarray(scene).save(tmp_path / "scene.png")
    run = call_fcnify("classify-map", tmp_path / "scene.png", "--card", lenet_card,
                      "--out", tmp_path / "maps", "--quiet")
    assert run.code == 0, run.err
    probs = np.load(tmp_path / "maps" / "scene.scores.npy")
    meta = json.loads((tmp_path / "maps" / "scene.map.json").read_text())
    assert meta["map"]["stride_px"] == [4, 4] and meta["map"]["window_px"] == [28, 28]
    named = [int(probs[:, d.box[1] // 4, d.box[0] // 4].argmax()) == d.label for d in placed]
    accuracy = sum(named) / len(named)
    print(f"LeNet MNIST scene: {sum(named)}/{len(named)} digits named = {accuracy:.1%}")
    assert accuracy >= 0.97


def test_classify_map_options_override_the_card(lenet_card, tmp_path):
    """A card without LeNet's scale, run with --input-scale, gives the card-with-scale's map."""
    plain = tmp_path / "plain"
    run = call_fcnify("convert", "--model-def", LENET_DEF, "--weights", LENET_WEIGHTS, "--out", plain)
    assert run.code == 0, run.err
    scene, _ = digit_scene(120, 160, 6, seed=2, grid=4)
    Image.fromarray(scene).save(tmp_path / "s.png")
    maps = {}
    for name, args in (("card", ["--card", lenet_card]),
                       ("option", ["--card", f"{plain}_full_conv.json", "--input-scale", "0.00390625"]),
                       ("plain", ["--card", f"{plain}_full_conv.json"])):
        run = call_fcnify("classify-map", tmp_path / "s.png", *args, "--out", tmp_path / name, "--quiet")
        assert run.code == 0, run.err
        maps[name] = np.load(tmp_path / name / "s.scores.npy")
    assert np.array_equal(maps["card"], maps["option"])
    # and each is LeNet, run by pycaffe on the crops, with its card's preprocessing
    import fcnify
    for name, card in (("card", lenet_card), ("plain", f"{plain}_full_conv.json")):
        assert_map_matches_pycaffe(maps[name], LENET_DEF, LENET_WEIGHTS, fcnify.read_card(card).preprocess, scene,
                                   stride=4, window=28, score_blob="ip2", prob_blob="prob")
    assert fcnify.read_card(f"{plain}_full_conv.json").preprocess.input_scale == 1.0


def test_lenet_dense_cell_equals_lenet_on_the_crop(lenet_card):
    """Scores before Softmax: cell (r, c) = LeNet on the 28x28 crop at (4c, 4r), within float32 rounding.

    LeNet has no padding and its pools tile 28 px exactly, so the cell and the
    crop compute the same sums, in different orders: the bound is 2E (float_bound).
    """
    import fcnify
    scene, placed = digit_scene(200, 240, 12, seed=5, grid=4)
    model = fcnify.DenseModel(fcnify.read_card(lenet_card))
    try:
        scores, _ = model.run_scores(scene)
    finally:
        model.close()
    pre = fcnify.read_card(lenet_card).preprocess
    rng = np.random.default_rng(0)
    cells = [(d.box[1] // 4, d.box[0] // 4) for d in placed]
    cells += [tuple(int(v) for v in rng.integers(0, scores.shape[1:])) for _ in range(12)]
    crops = np.stack([pre.apply(scene[4 * r:4 * r + 28, 4 * c:4 * c + 28]) for r, c in cells])
    caffe = pycaffe()
    net = caffe.Net(str(LENET_DEF), str(LENET_WEIGHTS), caffe.TEST)
    net.blobs["data"].reshape(*crops.shape)
    net.blobs["data"].data[...] = crops
    net.forward()
    original = net.blobs["ip2"].data
    layers = lenet_layers()
    for i, (r, c) in enumerate(cells):
        bound = 2 * rounding_bound(layers, crops[i]).ravel()
        diff = np.abs(scores[:, r, c].astype(np.float64) - original[i])
        assert (diff <= bound).all(), f"cell ({r}, {c}): diff {diff.max():.3g} over bound {bound.max():.3g}"


# ------------------------------------------------------------------ MTCNN R-Net


def rnet(size: int = 24):
    """The original R-Net in pycaffe, its input reshaped to size x size."""
    caffe = pycaffe()
    proto, weights = mtcnn_net(2)
    return caffe.Net(str(proto), str(weights), caffe.TEST)


def rnet_input(crops: list[np.ndarray]) -> np.ndarray:
    """MTCNN's own preprocessing, written out: RGB, (x - 127.5) * 0.0078125, W and H swapped."""
    x = (np.stack(crops).astype(np.float32) - np.float32(127.5)) * np.float32(0.0078125)
    return np.ascontiguousarray(x.transpose(0, 3, 2, 1))  # N x H x W x C -> N x C x W x H


def run_rnet(net, crops: list[np.ndarray]) -> dict[str, np.ndarray]:
    x = rnet_input(crops)
    net.blobs["data"].reshape(*x.shape)
    net.blobs["data"].data[...] = x
    net.forward()
    return {k: net.blobs[k].data.copy() for k in ("prob1", "conv5-2")}


def far_from(box: tuple[float, float, float, float], faces, margin: float) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + margin < fx0 or fx1 + margin < x0 or y1 + margin < fy0 or fy1 + margin < y0
               for fx0, fy0, fx1, fy1 in faces)


def rnet_map(card: Path, photo: Path, scale: float, out: Path):
    """classify-map at `scale`: (face probabilities, map.json, the fed image, the bbox map)."""
    from fcnify.io.images import load_image, resize
    run = call_fcnify("classify-map", photo, "--card", card, "--scale", str(scale),
                      "--output", "prob1", "--out", out, "--quiet")
    assert run.code == 0, run.err
    assert "class map: output 'prob1'; also output 'conv5-2-conv' (4 values per cell)" in run.out
    probs = np.load(out / f"{photo.stem}.scores.npy")
    meta = json.loads((out / f"{photo.stem}.map.json").read_text())
    fed = resize(load_image(photo), meta["input_size"]["height"], meta["input_size"]["width"])
    return probs[1], meta, fed, np.load(out / f"{photo.stem}.conv5-2-conv.npy")


def image_window(meta, r: int, c: int) -> list[float]:
    """Cell (r, c)'s window in original-image pixels, from map.json's formula (x0, y0, x1, y1)."""
    f = meta["map"]["cell_window_image_px"]
    x0, y0 = f["x_first"] + c * f["x_step"], f["y_first"] + r * f["y_step"]
    return [x0, y0, x0 + f["width"], y0 + f["height"]]


def window(meta, fed, r: int, c: int, size: int = 24) -> np.ndarray | None:
    """The size x size crop of the fed image at cell (r, c), None where it leaves the image."""
    (sy, sx), (oy, ox) = meta["map"]["stride_px"], meta["map"]["offset_px"]
    y, x = r * sy + oy, c * sx + ox
    if y < 0 or x < 0 or y + size > fed.shape[0] or x + size > fed.shape[1]:
        return None
    return fed[y:y + size, x:x + size]


@pytest.mark.parametrize("photo", MTCNN_PHOTOS, ids=lambda p: p.stem)
def test_rnet_face_cells_lie_on_faces(rnet_card, tmp_path, photo):
    """Cells above 0.9 are on the faces, every face has some, and R-Net on their 24x24 crops agrees."""
    name = photo.stem
    face, meta, fed, bbox = rnet_map(rnet_card, photo, SCALES[name], tmp_path)
    assert meta["heads"]["conv5-2-conv"]["file"] == "conv5-2-conv.npy"
    assert bbox.shape == (4,) + face.shape
    boxes = {tuple(rc): image_window(meta, *rc) for rc in np.ndindex(face.shape)}
    hot = [tuple(int(v) for v in rc) for rc in np.argwhere(face > 0.9)]
    print(f"R-Net {name} at scale {SCALES[name]}: {len(hot)} of {face.size} cells above 0.9")

    def on_face(rc, faces=FACES[name]):
        x0, y0, x1, y1 = boxes[rc]
        return [f for f in faces if f[0] <= (x0 + x1) / 2 <= f[2] and f[1] <= (y0 + y1) / 2 <= f[3]]
    assert hot and all(on_face(rc) for rc in hot)
    assert all(any(face_box in on_face(rc) for rc in hot) for face_box in FACES[name])
    crops = [window(meta, fed, r, c) for r, c in hot]
    assert all(crop is not None for crop in crops)
    on_faces = run_rnet(rnet(), crops)["prob1"][:, 1]
    assert (on_faces > 0.5).all(), on_faces


@pytest.mark.parametrize("photo", MTCNN_PHOTOS, ids=lambda p: p.stem)
def test_rnet_crops_far_from_faces_are_no_faces(rnet_card, tmp_path, photo):
    """At scale 0.35, cells whose window is 10 px clear of every face: R-Net on the crop and the cell say no."""
    face, meta, fed, _ = rnet_map(rnet_card, photo, 0.35, tmp_path)
    far = [rc for rc in np.ndindex(face.shape)
           if far_from(image_window(meta, *rc), FACES[photo.stem], 10)
           and window(meta, fed, *rc) is not None]
    assert len(far) >= 30
    far = [far[i] for i in np.random.default_rng(1).choice(len(far), min(80, len(far)), replace=False)]
    off_faces = run_rnet(rnet(), [window(meta, fed, r, c) for r, c in far])["prob1"][:, 1]
    assert (off_faces < 0.9).all() and all(face[rc] < 0.9 for rc in far)


def rnet_layers(net) -> list[tuple]:
    p = {k: [b.data.copy() for b in v] for k, v in net.params.items()}
    return [("conv", *p["conv1"]), ("prelu", p["prelu1"][0]), ("max", 3, 2),
            ("conv", *p["conv2"]), ("prelu", p["prelu2"][0]), ("max", 3, 2),
            ("conv", *p["conv3"]), ("prelu", p["prelu3"][0]),
            ("ip", *p["conv4"]), ("prelu", p["prelu4"][0]), ("ip", *p["conv5-2"])]


def test_rnet_bbox_head_equals_rnet_on_the_cell_window(rnet_card, tmp_path):
    """The saved conv5-2 map equals R-Net's conv5-2 on each cell's 25-px reach, within rounding.

    A cell's reach is 25 px (Caffe's ceil-rounded pooling reaches one pixel
    past its 24-px window) and R-Net also accepts 25 px, where every pooling
    window fits: the same sums as the cell's. The part of the photo is not square, so a map
    that came back with rows and columns swapped would show.
    """
    from fcnify.io.images import load_image
    photo = MTCNN_PHOTOS[0]
    rgb = load_image(photo)[:90, :130]  # not square: a swapped axis would show
    Image.fromarray(rgb).save(tmp_path / "part.png")
    run = call_fcnify("classify-map", tmp_path / "part.png", "--card", rnet_card, "--out", tmp_path,
                      "--quiet")
    assert run.code == 0, run.err
    bbox = np.load(tmp_path / "part.conv5-2-conv.npy")
    assert bbox.shape == (4,) + np.load(tmp_path / "part.scores.npy").shape[1:]
    assert bbox.shape[1] < bbox.shape[2]  # 90 rows of pixels, 130 columns
    net = rnet()
    layers = rnet_layers(net)
    rng = np.random.default_rng(2)
    cells = [tuple(int(v) for v in rng.integers(0, (16, 26))) for _ in range(20)]
    crops = [rgb[4 * r:4 * r + 25, 4 * c:4 * c + 25] for r, c in cells]
    got = run_rnet(net, crops)["conv5-2"]
    x = rnet_input(crops)
    for i, (r, c) in enumerate(cells):
        bound = 2 * rounding_bound(layers, x[i]).ravel()
        diff = np.abs(bbox[:, r, c].astype(np.float64) - got[i])
        assert (diff <= bound).all(), f"cell ({r}, {c}): diff {diff.max():.3g} over {bound.max():.3g}"


def test_output_picks_the_class_map_head(rnet_card, tmp_path):
    """--output conv5-2 (the original name) makes the bbox head the map and saves prob1 beside it;
    a blob that is no output is one line, exit 2."""
    photo = MTCNN_PHOTOS[0]
    run = call_fcnify("classify-map", photo, "--card", rnet_card, "--scale", "0.2", "--output", "conv5-2",
                      "--out", tmp_path, "--quiet")
    assert run.code == 0, run.err
    assert "class map: output 'conv5-2-conv'; also output 'prob1' (2 values per cell)" in run.out
    probs = np.load(tmp_path / f"{photo.stem}.prob1.npy")
    # R-Net's own Softmax in float32: an exp, a sum of 2, a division per probability (bound.py)
    assert probs.shape[0] == 2 and np.abs(probs.sum(axis=0, dtype=np.float64) - 1).max() <= factor(2 + 2)
    bad = call_fcnify("classify-map", photo, "--card", rnet_card, "--output", "conv4",
                      "--out", tmp_path / "bad")
    assert bad.code == 2 and bad.err.count("\n") == 1
    assert "output 'conv4' is not an output of the net; its outputs are conv5-2-conv, prob1" in bad.err


def test_transposed_net_tiled_equals_whole(rnet_card):
    """R-Net in forced tiles (planned in the net's orientation) = the whole-image map, heads included."""
    import fcnify
    from fcnify.io.images import load_image
    rgb = load_image(MTCNN_PHOTOS[1])[:150, :110]
    model = fcnify.DenseModel(fcnify.read_card(rnet_card))
    try:
        whole, info = model.run_scores(rgb)
        tiled, tiled_info = model.run_scores(rgb, tile=60)
    finally:
        model.close()
    assert info["mode"] == "whole" and tiled_info["mode"] == "tiled" and tiled_info["tiles"] > 1
    assert whole.shape == tiled.shape and whole.shape[1] > whole.shape[2]  # image rows, then columns
    net = rnet()
    bbox_layers = rnet_layers(net)  # ends in conv5-2; the class scores end in conv5-1
    p = {k: [b.data.copy() for b in v] for k, v in net.params.items()}
    score_layers = bbox_layers[:-1] + [("ip", *p["conv5-1"])]
    cells = [(r, c) for r in range(0, 31, 5) for c in range(0, 21, 5)]
    x = rnet_input([rgb[4 * r:4 * r + 25, 4 * c:4 * c + 25] for r, c in cells])
    for i, (r, c) in enumerate(cells):
        for a, b, layers in ((whole, tiled, score_layers),
                             (info["heads"]["conv5-2-conv"], tiled_info["heads"]["conv5-2-conv"],
                              bbox_layers)):
            bound = 2 * rounding_bound(layers, x[i]).ravel()
            assert (np.abs(a[:, r, c].astype(np.float64) - b[:, r, c]) <= bound).all(), (r, c)


# ------------------------------------------------------------------ R-Net's box head in --detect

PYRAMID = (0.5, 0.42, 0.35, 0.3, 0.25, 0.2, 0.16, 0.13, 0.1)


def rnet_detector(rnet_card, box_head: str | None):
    """R-Net's card as a detector: class 0 (no face) is the background; `box_head` moves the boxes."""
    from dataclasses import replace
    import fcnify
    card = replace(fcnify.read_card(rnet_card), background_class=0, box_head=box_head)
    return fcnify.DenseModel(card, output="prob1")


def face_cells(model, photo) -> tuple[np.ndarray, np.ndarray]:
    """(boxes, probabilities) of every cell above 0.9 at every scale of PYRAMID, before suppression."""
    from fcnify.dense.detect import cell_boxes
    from fcnify.dense.pyramid import map_scales
    from fcnify.io.images import load_image
    rgb = load_image(photo)
    scales = [s for s in PYRAMID if min(rgb.shape[:2]) * s >= 24]
    parts = [cell_boxes(dm, 0.9) for dm in map_scales(model, rgb, scales)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_rnet_box_head_moves_cell_boxes_onto_the_faces(rnet_card):
    """With the card's box_head (conv5-2: x0, y0, x1, y1 offsets in window widths), the boxes of the
    face cells fit the hand-drawn faces better than the bare windows do, on both photos.

    Measured: mean IoU with the nearest face 0.44 -> 0.51 on each photo. The offsets read
    in the wrong order (y before x, as the transposed blob might suggest) give 0.44: no gain.
    """
    from fcnify.dense.detect import iou
    for photo in MTCNN_PHOTOS:
        faces = np.array(FACES[photo.stem], float)
        fit = {}
        for head in (None, "conv5-2"):
            model = rnet_detector(rnet_card, head)
            try:
                boxes, probs = face_cells(model, photo)
            finally:
                model.close()
            assert len(boxes) >= 20 and (probs >= 0.9).all()
            fit[head] = float(np.mean([max(iou(f, boxes[i:i + 1])[0] for f in faces)
                                       for i in range(len(boxes))]))
        print(f"{photo.stem}: mean IoU with the nearest face {fit[None]:.3f} -> {fit['conv5-2']:.3f}")
        assert fit["conv5-2"] > fit[None] + 0.03, fit


def test_rnet_detect_one_box_per_face(tmp_path):
    """convert --background-class 0 --box-head conv5-2 writes both into the card; classify-map
    --scales (9 scales) --detect with it: one box per face, inside the hand-drawn face, and no
    other box, on both photos."""
    proto, weights = mtcnn_net(2)
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "det2",
                      *MTCNN_OPTIONS, "--background-class", "0", "--box-head", "conv5-2")
    assert run.code == 0, run.err
    detector = tmp_path / "det2_full_conv.json"
    card = json.loads(detector.read_text())
    assert (card["background_class"], card["box_head"]) == (0, "conv5-2")
    for photo in MTCNN_PHOTOS:
        out = tmp_path / photo.stem
        run = call_fcnify("classify-map", photo, "--card", detector, "--output", "prob1",
                          "--scales", ",".join(map(str, PYRAMID)), "--detect", "--out", out, "--quiet")
        assert run.code == 0, run.err
        doc = json.loads((out / f"{photo.stem}.detections.json").read_text())
        assert doc["box_head"] == "conv5-2"
        found = [d["box"] for d in doc["detections"]]
        faces = FACES[photo.stem]
        assert len(found) == len(faces), found
        for face in faces:
            inside = [b for b in found if face[0] - 2 <= b[0] and face[1] - 2 <= b[1]
                      and b[2] <= face[2] + 2 and b[3] <= face[3] + 2]
            assert len(inside) == 1, (face, found)
            area = (inside[0][2] - inside[0][0]) * (inside[0][3] - inside[0][1])
            assert area >= 0.3 * (face[2] - face[0]) * (face[3] - face[1]), (face, inside)


def test_two_class_comparisons_say_top_1_only(rnet_card):
    """R-Net's 2 classes (and its 4-value box head) have no top-5: the report says 'top-1 same'."""
    proto, _ = mtcnn_net(2)
    run = call_fcnify("verify", proto, rnet_card.with_suffix(".prototxt"))
    assert run.code == 0, run.err
    lines = [l for l in run.out.splitlines() if " vs " in l]
    assert len(lines) == 3 and all("; top-1 same (" in l for l in lines), lines
    assert "top-5" not in run.out


def test_verify_reports_what_converts_check_reported(tmp_path):
    """verify on the pair convert wrote (R-Net) checks the same inputs with the same preprocessing
    (the FCN's card) and gives the same numbers, box head conv5-2 included with its own bound;
    without a card, the preprocessing options give the same report."""
    proto, weights = mtcnn_net(2)
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "det2",
                      *MTCNN_OPTIONS, "--format", "json")
    assert run.code == 0, run.err
    converted = json.loads(run.out)["verification"]
    fcn = tmp_path / "det2_full_conv.prototxt"
    reports = {}
    for how, extra in (("card", ()), ("options", ("--weights", weights, *MTCNN_OPTIONS))):
        if how == "options":
            (tmp_path / "det2_full_conv.json").unlink()
        run = call_fcnify("verify", proto, fcn, *extra, "--format", "json")
        assert run.code == 0, run.err
        reports[how] = json.loads(run.out)
    for report in reports.values():
        for key in ("inputs", "top_probability", "added_for_saturation", "params_checked", "comparisons"):
            assert report[key] == converted[key], key
    compared = [(c["original"], c["converted"], c["kind"]) for c in converted["comparisons"]]
    assert compared == [("conv5-1", "conv5-1-conv", "scores"), ("prob1", "prob1", "probabilities"),
                        ("conv5-2", "conv5-2-conv", "scores")]
    bounds = {c["original"]: c["bound"] for c in converted["comparisons"]}
    assert bounds["conv5-2"] != bounds["conv5-1"]  # its own layer's bound, not the class scores'
    assert not converted["saturated"] and min(converted["top_probability"]) < 0.999


@pytest.mark.parametrize("args,message", [
    (["--box-head", "conv4"], "box head 'conv4' is not an output of the net; its outputs are "
                              "conv5-2-conv, prob1"),
    (["--box-head", "prob1"], "box head 'prob1' has 2 values per cell; a box regression has 4"),
    (["--background-class", "2"], "background class 2 is not one of the net's 2 classes"),
])
def test_convert_refuses_a_bad_detector(tmp_path, args, message):
    """convert checks --box-head and --background-class against the net: one line, exit 2, nothing written."""
    proto, weights = mtcnn_net(2)
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "det2",
                      *MTCNN_OPTIONS, *args)
    assert run.code == 2 and run.err.count("\n") == 1, run.err
    assert message in run.err and "det2.prototxt" in run.err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("head,message", [
    ("conv4", "box_head 'conv4' is not an output mapped beside the class map "
              "(outputs beside it: conv5-2-conv)"),
    ("prob1", "box_head 'prob1' is not an output mapped beside the class map"),
])
def test_bad_box_head_is_one_line(rnet_card, tmp_path, head, message):
    """A card whose box_head is no 4-value output beside the class map: one line naming the card, exit 2,
    before any map is written."""
    card = json.loads(rnet_card.read_text())
    card["box_head"] = head
    for key in ("model_def", "weights"):
        card[key] = str((rnet_card.parent / card[key]).resolve())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(card))
    out = tmp_path / "out"
    run = call_fcnify("classify-map", MTCNN_PHOTOS[0], "--card", bad, "--output", "prob1",
                      "--scales", "0.3,0.2", "--detect", "--out", out)
    assert run.code == 2 and run.err.count("\n") == 1, run.err
    assert message in run.err and "bad.json" in run.err
    assert not out.exists() or not any(out.iterdir())


PNET = ("--output", "prob1", *MTCNN_OPTIONS, "--background-class", "0", "--box-head", "conv4-2")


def test_pnet_detect_with_options_finds_every_face(tmp_path):
    """P-Net (already fully convolutional, no card): --background-class/--box-head given on the
    command line; every face gets a box inside it. (P-Net proposes: other boxes are allowed.)"""
    proto, weights = mtcnn_net(1)
    for photo in MTCNN_PHOTOS:
        out = tmp_path / photo.stem
        run = call_fcnify("classify-map", photo, "--model-def", proto, "--weights", weights, *PNET,
                          "--scales", "0.3,0.2,0.13", "--detect", "--out", out, "--quiet")
        assert run.code == 0, run.err
        doc = json.loads((out / f"{photo.stem}.detections.json").read_text())
        assert doc["box_head"] == "conv4-2"
        assert all(d["class"] == 1 for d in doc["detections"])  # class 0 is the background
        for face in FACES[photo.stem]:
            assert any(face[0] - 2 <= b[0] and face[1] - 2 <= b[1] and b[2] <= face[2] + 2
                       and b[3] <= face[3] + 2 for b in (d["box"] for d in doc["detections"])), face


def test_pnet_runs_from_its_card_alone(tmp_path):
    """convert on P-Net (nothing to convert) writes only its card, pointing at det1's own files,
    with the preprocessing, labels, background class and box head; classify-map --card with
    nothing else gives the boxes that all the options give."""
    proto, weights = mtcnn_net(1)
    labels = tmp_path / "faces.txt"
    labels.write_text("no face\nface\n")
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", f"{tmp_path}/cards/",
                      *MTCNN_OPTIONS, "--labels", labels, "--background-class", "0", "--box-head", "conv4-2")
    assert run.code == 0, run.err
    assert sorted(p.name for p in (tmp_path / "cards").iterdir()) == ["det1_full_conv.json"]
    card_file = tmp_path / "cards" / "det1_full_conv.json"
    card = json.loads(card_file.read_text())
    assert Path(card["model_def"]) == proto.resolve() and Path(card["weights"]) == weights.resolve()
    assert card["preprocess"] == {"channels": "RGB", "raw_scale": 255.0, "mean": [127.5],
                                  "input_scale": 0.0078125, "transpose": True}
    assert (card["background_class"], card["box_head"], card["converted"]) == (0, "conv4-2", False)
    photo = MTCNN_PHOTOS[0]
    found = {}
    for how, args in (("card", ("--card", card_file)),
                      ("options", ("--model-def", proto, "--weights", weights, *PNET, "--labels", labels))):
        run = call_fcnify("classify-map", photo, *args, "--scales", "0.3,0.2,0.13", "--detect",
                          "--out", tmp_path / how, "--quiet")
        assert run.code == 0, run.err
        found[how] = json.loads((tmp_path / how / f"{photo.stem}.detections.json").read_text())["detections"]
    assert found["card"] == found["options"] and found["card"]
    assert {d["label"] for d in found["card"]} == {"face"}


@pytest.mark.parametrize("args,message", [
    (["--box-head", "prob1"], "box_head 'prob1' is not an output mapped beside the class map "
                              "(outputs beside it: conv4-2)"),
    (["--background-class", "2"], "background class 2 is not one of the net's 2 classes"),
])
def test_classify_map_refuses_a_bad_detector(tmp_path, args, message):
    """A background class the net lacks, or a box head that is no 4-value output: one line, exit 2,
    nothing written."""
    proto, weights = mtcnn_net(1)
    out = tmp_path / "out"
    run = call_fcnify("classify-map", MTCNN_PHOTOS[0], "--model-def", proto, "--weights", weights,
                      *PNET, *args, "--scales", "0.3,0.2", "--detect", "--out", out)
    assert run.code == 2 and run.err.count("\n") == 1, run.err
    assert message in run.err
    assert not out.exists() or not any(out.iterdir())
