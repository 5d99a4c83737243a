"""--detect and --scales: boxes from map cells, NMS, image pyramids, and their bad values."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from fcnify.caffe.geometry import AxisGeometry, MapGeometry
from fcnify.dense.dense import DenseMap, DenseModel
from fcnify.dense.detect import detect, iou, nms
from fcnify.errors import InputError
from fcnify.convert import card_for_model_def
from fcnify.io.preprocess import Preprocess
from fcnify.dense.pyramid import fuse, map_pyramid, parse_scales

from conftest import call_fcnify
from test_dense import RED_DETECTOR, _red_weights


def test_iou_values():
    """IoU of known boxes: identical 1, disjoint 0, a half overlap 1/3."""
    box = np.array([0.0, 0.0, 10.0, 10.0])
    others = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10]], float)
    assert iou(box, others) == pytest.approx([1.0, 0.0, 1 / 3])


def test_nms_keeps_best_and_spares_other_groups():
    """Greedy NMS: the best box suppresses its overlaps, boxes of another class are spared."""
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [5, 0, 15, 10], [40, 40, 50, 50],
                      [1, 1, 11, 11]], float)
    scores = np.array([0.9, 0.95, 0.5, 0.3, 0.8])
    groups = np.array([0, 0, 0, 0, 1])
    keep = nms(boxes, scores, 0.5, groups)
    # 1 (best) drops 0 (IoU 0.82); 2 overlaps 1 by 0.6/1.4 = 0.43 <= 0.5 and stays; 4 is another class
    assert list(keep) == [1, 4, 2, 3]
    assert list(nms(boxes, scores, 0.5)) == [1, 2, 3]  # one group: 4 overlaps 1 and goes


def test_detect_ranks_saturated_cells_by_log_odds(red_card):
    """Two overlapping cells whose float32 probability both rounded to 1.0: the one whose other
    classes are less likely (log-odds 27.6 against 20.7) is kept, though it comes second in the map."""
    axis = AxisGeometry(stride=8, box_lo=0, box_hi=31, reach_lo=0, reach_hi=31)
    probs = np.zeros((2, 1, 2), np.float32)
    probs[0, 0] = [1e-9, 1e-12]  # background: cell (0, 0) the less sure of the two
    probs[1, 0] = 1.0 - probs[0, 0]
    assert (probs[1, 0] == 1.0).all()  # the probabilities alone tie
    dm = DenseMap(probs, MapGeometry("prob", axis, axis), (32, 40), (32, 40), red_card)
    (kept,) = detect([dm], [1.0], threshold=0.5, iou_limit=0.3)  # the cells' IoU is 24/40
    assert (kept.cls, kept.box) == (1, (8.0, 0.0, 40.0, 32.0))


@pytest.fixture(scope="module")
def red_card(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("red_detect")
    proto = tmp / "red.prototxt"
    proto.write_text(RED_DETECTOR)
    _red_weights(tmp / "red.caffemodel")
    card = card_for_model_def(proto, tmp / "red.caffemodel")
    return replace(card, preprocess=Preprocess(channels="RGB", raw_scale=255.0), background_class=0)


def _blob_scene(h: int, w: int, count: int, seed: int):
    """Grey noise with red disks of radius 4 (32-px truth box) and 8 (64 px), apart from each other."""
    rng = np.random.default_rng(seed)
    img = np.clip(128 + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    truth: list[tuple[tuple[float, float, float, float], int]] = []
    for _ in range(count * 30):
        if len(truth) == count:
            break
        r = 4 if len(truth) % 2 == 0 else 8
        half = 4 * r
        cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
        if any(abs(cx - (b[0] + b[2]) / 2) < half + (b[2] - b[0]) / 2 and
               abs(cy - (b[1] + b[3]) / 2) < half + (b[3] - b[1]) / 2 for b, _ in truth):
            continue
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (220, 30, 30)
        truth.append(((cx - half, cy - half, cx + half, cy + half), r))
    return img, truth


def test_pyramid_detects_both_sizes(red_card):
    """Scales 1 and 0.5 with a net that has a background class: disks of both sizes get a box
    with IoU >= 0.5, and no box is false."""
    img, truth = _blob_scene(300, 400, 30, seed=1)
    model = DenseModel(red_card, stride=1)
    try:
        result = map_pyramid(model, img, [1, 0.5], detect={"threshold": 0.5, "iou": 0.3})
    finally:
        model.close()
    boxes = np.array([d.box for d in result.detections])
    for r in (4, 8):
        sized = [b for b, rr in truth if rr == r]
        found = sum(bool((iou(np.array(b), boxes) >= 0.5).any()) for b in sized)
        assert len(sized) >= 8 and found >= 0.9 * len(sized), (r, found, len(sized))
    false = sum(not any(iou(np.array(d.box), np.array([b]))[0] >= 0.5 for b, _ in truth)
                for d in result.detections)
    assert false < 0.05 * len(result.detections)
    assert {d.scale for d in result.detections} == {1.0, 0.5}


def test_fuse_is_the_maximum_over_scales_on_the_finest_grid(red_card):
    """Each fused cell is the max of the finest map's cell and the nearest cell of the other map."""
    img, _ = _blob_scene(120, 160, 4, seed=2)
    model = DenseModel(red_card)
    try:
        maps = map_pyramid(model, img, [1, 0.5]).maps
    finally:
        model.close()
    fused = fuse(maps)
    fine, coarse = maps
    assert fused.shape == fine.shape
    for r, c in [(0, 0), (10, 20), (fine.shape[0] - 1, fine.shape[1] - 1), (30, 5)]:
        x, y = fine.center(r, c)
        best = min(((rr, cc) for rr in range(coarse.shape[0]) for cc in range(coarse.shape[1])),
                   key=lambda rc: (coarse.center(*rc)[0] - x) ** 2 + (coarse.center(*rc)[1] - y) ** 2)
        expect = np.maximum(fine.probs[:, r, c], coarse.probs[:, best[0], best[1]])
        assert np.array_equal(fused.probs[:, r, c], expect)


def test_parse_scales_refuses_bad_values():
    assert parse_scales("1,0.75,0.5") == [1.0, 0.75, 0.5]
    for bad in ("1,0", "-1", "1,x", "nan", "1,1"):
        with pytest.raises(InputError):
            parse_scales(bad)


def test_cli_detect_writes_boxes(red_card, tmp_path):
    """--scales --detect --out: the fused map and NAME.detections.json and .png; each scale's own
    files only with --save ...,scales, and the 'wrote' line names them once (issue 24 item 6)."""
    from PIL import Image
    img, truth = _blob_scene(160, 200, 6, seed=3)
    Image.fromarray(img).save(tmp_path / "blobs.png")
    out = tmp_path / "out"
    run = call_fcnify("classify-map", tmp_path / "blobs.png", "--model-def", red_card.model_def,
                      "--weights", red_card.weights, "--scales", "1,0.5", "--detect",
                      "--threshold", "0.5", "--out", out)
    assert run.code == 0, run.err
    doc = json.loads((out / "blobs.detections.json").read_text())
    assert doc["threshold"] == 0.5 and doc["scales"] == [1.0, 0.5]
    assert len(doc["detections"]) >= 1
    for d in doc["detections"]:
        assert set(d) == {"class", "label", "score", "box", "scale"} and d["score"] >= 0.5
    assert (out / "blobs.detections.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "blobs.map.json").exists() and not list(out.glob("blobs.x*"))
    assert "detections:" in run.out
    (wrote,) = [line for line in run.out.splitlines() if line.startswith("wrote ")]
    assert wrote == f"wrote {out / 'blobs'}.{{scores.npy,topk_classes.npy,topk_probs.npy,map.json," \
                    "heatmap.png,argmax.png,detections.json,detections.png}"
    out = tmp_path / "scales"
    run = call_fcnify("classify-map", tmp_path / "blobs.png", "--model-def", red_card.model_def,
                      "--weights", red_card.weights, "--scales", "1,0.5", "--detect",
                      "--threshold", "0.5", "--out", out, "--save", "scores,json,scales")
    assert run.code == 0, run.err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"blobs.{kind}" for kind in ("scores.npy", "map.json", "x1.scores.npy", "x1.map.json", "x0.5.scores.npy",
                                     "x0.5.map.json", "detections.json", "detections.png"))
    (wrote,) = [line for line in run.out.splitlines() if line.startswith("wrote ")]
    assert wrote == f"wrote {out / 'blobs'}.{{scores.npy,map.json,detections.json,detections.png}}, " \
                    f"{out / 'blobs'}.{{x1,x0.5}}.{{scores.npy,map.json}}"


@pytest.mark.parametrize("args,message", [
    (["--stride", "3"], "--stride 3 does not divide the net's stride of 2 px"),
    (["--stride", "0"], "--stride 0"),
    (["--threshold", "1.5"], "--threshold 1.5: not a probability in [0, 1]"),
    (["--nms-iou", "0"], "--nms-iou 0: not an overlap in (0, 1]"),
    (["--scales", "1,-0.5"], "every scale must be a positive number"),
    (["--scales", "0.05"], "smaller than one window of 32x32 px"),
])
def test_cli_bad_values_one_line(red_card, tmp_path, args, message):
    """Bad --stride/--scales/--threshold/--nms-iou: one line naming the problem, exit 2, no files."""
    from PIL import Image
    Image.fromarray(np.full((100, 120, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    out = tmp_path / "out"
    run = call_fcnify("classify-map", tmp_path / "grey.png", "--model-def", red_card.model_def,
                      "--weights", red_card.weights, "--out", out, *args)
    assert run.code == 2
    assert message in run.err and len(run.err.strip().splitlines()) == 1, run.err
    assert not out.exists() or not any(out.iterdir())


def test_detection_measure_counts_recall_false_boxes_and_iou():
    """scripts/bench/measure_detection.py's scoring: a box finds a digit of its class at IoU >= 0.5 once;
    a second box on it, a box of another class or a box beside it is false."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench" / "measure_detection.py"
    spec = importlib.util.spec_from_file_location("measure_detection", path)
    md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(md)
    truth = [{"class": 3, "window": 28, "box": [0, 0, 28, 28]},
             {"class": 5, "window": 42, "box": [100, 100, 142, 142]}]
    boxes = [{"class": 3, "score": 0.99, "box": [0, 0, 28, 28]},        # finds the 3 (IoU 1)
             {"class": 3, "score": 0.95, "box": [2, 0, 30, 28]},        # the 3 again: false
             {"class": 7, "score": 0.98, "box": [100, 100, 142, 142]},  # wrong class: false
             {"class": 5, "score": 0.97, "box": [107, 100, 149, 142]}]  # finds the 5, IoU 35/49
    got = md.score(boxes, truth)
    assert (got["recall_28px"], got["recall_42px"], got["false_boxes"], got["boxes"]) == (1.0, 1.0, 2, 4)
    assert got["mean_iou"] == pytest.approx((1 + 35 * 42 / (2 * 42 * 42 - 35 * 42)) / 2)
