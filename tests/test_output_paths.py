"""Every output path carries the same truth about a model and its map.

One process's text and --format json, the Dask run's text and JSON, the
Python API's return values, `info --format json`, `convert --format json`
and the exported ONNX file's metadata: each test below fails when its path
drops a field that the others carry. The fields are listed here, by hand,
from what a user needs to run the net again or to read its map.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import call_fcnify

# what every path says about the model (the card's truth)
MODEL_FIELDS = ("name", "preprocess", "labels", "background_class", "box_head", "softmax")
# what every path that maps an image says about its map
MAP_FIELDS = ("rows", "cols", "classes", "stride_px", "window_px", "reach_px", "offset_px", "output",
              "softmax")
DETECTION_FIELDS = ("class", "label", "score", "box", "scale")
SCENE = Path(__file__).resolve().parent.parent / "prototxt" / "digits" / "scene.png"
RUN = ("--model", "digits", "--scales", "1,0.667", "--detect", "--quiet")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """One process's --format json line for the digits scene, with boxes."""
    out = tmp_path_factory.mktemp("single")
    run = call_fcnify("classify-map", SCENE, *RUN, "--out", out, "--format", "json")
    assert run.code == 0, run.err
    return json.loads(run.out)


def _assert_fields(doc: dict, where: str) -> None:
    missing = [f for f in MODEL_FIELDS if f not in doc["model"]] + [
        f"map.{f}" for f in MAP_FIELDS if f not in doc["map"]]
    assert not missing, f"{where} lacks {missing}"


def test_json_line_carries_model_map_and_detections(single):
    """--format json: the card's fields, the map's, and the boxes the text lists."""
    _assert_fields(single, "--format json")
    assert single["model"]["background_class"] == 10 and single["model"]["softmax"] is True
    assert single["detections"], "no boxes in the JSON line"
    assert all(set(DETECTION_FIELDS) <= set(d) for d in single["detections"])


def test_text_says_what_the_json_says(single, tmp_path):
    """The text run names the model's preprocessing, labels, background class, box head and
    softmax, the map's size, window and stride, and every box the JSON has."""
    run = call_fcnify("classify-map", SCENE, *RUN, "--out", tmp_path)
    assert run.code == 0, run.err
    m, g = single["model"], single["map"]
    text = run.out
    for said in (m["name"], "background class 10", "box head none", "labels", "gray pixels",
                 f"map {g['rows']}x{g['cols']} cells of {g['classes']} classes",
                 f"{g['window_px'][0]}x{g['window_px'][1]} px window every {g['stride_px'][1]} px",
                 "probabilities from the net's own Softmax",
                 f"detections: {len(single['detections'])} box(es)"):
        assert said in text, f"text lacks {said!r}"


def test_dask_says_what_one_process_says(tmp_path, monkeypatch):
    """--workers: the JSON line has every field of one process's, the same boxes; the text is the
    one-process summary (model, map, boxes), not a line without classes."""
    import os
    pytest.importorskip("distributed")
    # Dask's nanny gives its workers one BLAS thread unless the environment sets a number; the
    # one-process reference runs with the same, so that both sum in the same order
    from fcnify.engines import sandbox
    for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, os.environ.get(key) or "1")
    fresh: dict = {}
    monkeypatch.setattr(sandbox, "_shared", fresh)  # a Caffe process started with those settings
    try:
        run = call_fcnify("classify-map", SCENE, *RUN, "--out", tmp_path / "s", "--format", "json")
    finally:
        for box in fresh.values():
            box.close()
    assert run.code == 0, run.err
    single = json.loads(run.out)
    run = call_fcnify("classify-map", SCENE, *RUN, "--out", tmp_path / "j", "--format", "json",
                      "--workers", "1")
    assert run.code == 0, run.err
    doc = json.loads(run.out.splitlines()[0])
    _assert_fields(doc, "--workers --format json")
    assert set(single) <= set(doc), set(single) - set(doc)
    assert doc["model"] == single["model"] and doc["detections"] == single["detections"]
    text = call_fcnify("classify-map", SCENE, *RUN, "--out", tmp_path / "t", "--workers", "1")
    assert text.code == 0, text.err
    one = call_fcnify("classify-map", SCENE, *RUN, "--out", tmp_path / "o")
    for line in one.out.splitlines():
        if line.startswith(("model", "class map", "values", "detections", "top classes")):
            assert line in text.out.splitlines(), f"--workers text lacks {line!r}"


def test_python_api_returns_what_the_json_says(single):
    """map_paths' results: the map's document has the card's and the map's fields, and the boxes."""
    import fcnify
    from fcnify.dense.pipeline import MapJob, ModelSpec, map_paths
    job = MapJob(scales=(1.0, 0.667), detect=True)
    with ModelSpec(card=fcnify.find_model("digits")).load() as model:
        (result,) = map_paths(model, [SCENE], job.for_model(model))
    doc = result.document(job)
    _assert_fields(doc, "the API's MapResult.document")
    assert doc["model"] == single["model"] and doc["detections"] == single["detections"]
    _assert_fields(result.map.to_json(), "DenseMap.to_json")


def test_info_json_carries_the_card_and_geometry(single):
    """info --format json: the card beside the net (the same fields) and the map's geometry."""
    run = call_fcnify("info", SCENE.parent / "deploy.prototxt", "--format", "json")
    assert run.code == 0, run.err
    doc = json.loads(run.out)
    missing = [f for f in MODEL_FIELDS if f not in doc["model"]]
    assert not missing, f"info --format json lacks {missing}"
    assert {k: doc["model"][k] for k in MODEL_FIELDS if k != "labels"} == \
        {k: single["model"][k] for k in MODEL_FIELDS if k != "labels"}
    assert doc["map"]["stride_px"] == single["map"]["stride_px"]
    assert doc["map"]["window_px"] == single["map"]["window_px"]
    assert doc["layers"] and all({"name", "type", "top", "shape"} <= set(l) for l in doc["layers"])


def test_convert_json_carries_the_card(tmp_path, single):
    """convert --format json: the card it wrote (preprocessing, labels, detector fields, softmax)."""
    run = call_fcnify("convert", "--model", "digits", "--out", tmp_path / "d", "--format", "json",
                      "--no-verify")
    assert run.code == 0, run.err
    doc = json.loads(run.out)
    missing = [f for f in MODEL_FIELDS if f not in doc["card"]]
    assert not missing, f"convert --format json lacks {missing}"
    assert doc["card"]["preprocess"] == single["model"]["preprocess"]


def test_onnx_metadata_carries_the_card(tmp_path, single):
    """The exported file's metadata: every card field, and the geometry of the net written."""
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "digits.onnx"
    run = call_fcnify("export", "digits", "--out", out, "--no-verify")
    assert run.code == 0, run.err
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    missing = [f for f in MODEL_FIELDS if f"fcnify.{f}" not in meta]
    assert not missing, f"ONNX metadata lacks {missing}"
    assert json.loads(meta["fcnify.preprocess"]) == single["model"]["preprocess"]
    assert json.loads(meta["fcnify.box_head"]) is None
    assert json.loads(meta["fcnify.softmax"])["applied"] is True
    assert json.loads(meta["fcnify.geometry"])["stride"] == single["map"]["stride_px"]
