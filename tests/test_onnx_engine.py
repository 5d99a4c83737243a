"""--engine onnx: ONNX Runtime runs fcnify's maps, conversions and checks (onnx_engine.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx engine needs onnxruntime: pip install 'fcnify[onnx]'")

from fcnify.convert import convert  # noqa: E402
from fcnify.dense.dense import DenseModel  # noqa: E402
from fcnify.errors import DeviceError, NetDefinitionError  # noqa: E402
from fcnify.io.images import load_image  # noqa: E402
from fcnify.io.models import find_model  # noqa: E402
from fcnify.engines.onnx_engine import OnnxRunner, onnx_memory  # noqa: E402
from fcnify.caffe.planner import estimate  # noqa: E402
from fcnify.engines.caffe_engine import CaffeRunner  # noqa: E402

from conftest import REPO, call_fcnify, run_fcnify  # noqa: E402
from fcnify.surgery.bound import score_layer, within  # noqa: E402
from fcnify.caffe.caffemodel import read_weights  # noqa: E402
from fcnify.caffe.netdef import read_netdef  # noqa: E402

SCENE = REPO / "prototxt" / "digits" / "scene.png"


@pytest.fixture(scope="module")
def digits_fcn(tmp_path_factory):
    """The shipped digits model converted on the onnx engine (its check run by ONNX Runtime)."""
    card = find_model("digits")
    out = tmp_path_factory.mktemp("digits") / "digits"
    result = convert(card.model_def, card.weights, out, card=card, runner=OnnxRunner())
    assert result.report.equivalent and result.report.params_checked == 8
    return result.outputs


def _scores(engine: str, card, rgb, **run):
    model = DenseModel(card, engine=engine)
    try:
        scores, info = model.run_scores(rgb, **run)
        x = model.card.preprocess.apply(rgb)[None]
        score_layer = next(l for l in model.netdef.param.layer if model.score_blob in l.top)
        below = score_layer.bottom[0]  # what the score layer reads, as Caffe computed it
        bottom = model.net.forward({model.input_blob: x}, [below])[below] if engine == "caffe" else None
        return scores, info, bottom, model.card
    finally:
        model.close()


def test_dense_map_matches_caffe_engine(digits_fcn):
    """The digits scene mapped by ONNX Runtime equals the Caffe engine's map, score by score within
    the float32 bound of the 1x1 score layer (converted in memory by each engine)."""
    card = find_model("digits")
    rgb = load_image(SCENE)
    a, _, bottom, _ = _scores("caffe", card, rgb)
    b, info, _, _ = _scores("onnx", card, rgb)
    assert info["mode"] == "whole" and a.shape == b.shape == (11, 114, 154)
    scores = score_layer(read_netdef(digits_fcn["prototxt"]).param, "ip2-conv",
                         read_weights(digits_fcn["caffemodel"]))  # the same transplant
    ok, used = within(a, b, scores.tolerance(bottom)[0])
    assert ok, f"{used:.2f} of the bound"


def test_tiles_and_budget_use_onnx_memory(digits_fcn):
    """Under a small --max-memory the planner tiles by ONNX Runtime's own model, and the tiled map
    equals the whole one within the float32 bound of the score layer (tiles change the shapes, and
    with them ONNX Runtime's blocking of the sums)."""
    from fcnify.io.models import read_card
    card = read_card(digits_fcn["card"])
    rgb = load_image(SCENE)
    model = DenseModel(card, engine="onnx")
    try:
        whole, info = model.run_scores(rgb)
        est = onnx_memory(model.netdef.param, 480, 640)
        assert est.total < estimate(model.netdef.param, 480, 640).total  # frees what no layer reads
        base = model.runner.base  # the process before the net: ONNX Runtime runs in it
        assert model.runner.memory(model.netdef.param, 480, 640).total == base + est.total
        budget = int(base + est.total * 0.5)
        tiled, tinfo = model.run_scores(rgb, budget=budget)
        assert info["tiles"] == 1 and tinfo["tiles"] > 1
        side = max(tinfo["tile_size"])
        assert model.runner.memory(model.netdef.param, side, side).total <= budget
        assert whole.shape == tiled.shape
        below = next(l for l in model.netdef.param.layer if model.score_blob in l.top).bottom[0]
        x = card.preprocess.apply(rgb)[None]
        bottom = model.net.forward({model.input_blob: x}, [below])[below]
        scores = score_layer(model.netdef.param, model.score_blob, read_weights(card.weights))
        ok, used = within(whole, tiled, scores.tolerance(bottom)[0])
        assert ok, f"{used:.2f} of the bound"
    finally:
        model.close()


def _check_scores(doc: dict) -> dict:
    (scores,) = [c for c in doc["verification"]["comparisons"] if c["kind"] == "scores"]
    return scores


def test_cli_classify_map_verify_and_convert(digits_fcn, tmp_path):
    """classify-map, verify and convert take --engine onnx (the choices come from the registry): the
    map is ONNX Runtime's, verify says EQUIVALENT, convert's check ran on ONNX Runtime (its largest
    difference is not the Caffe engine's) and passed."""
    from fcnify.io.models import read_card
    run = call_fcnify("classify-map", SCENE, "--card", digits_fcn["card"], "--engine", "onnx",
                      "--out", tmp_path / "maps", "--quiet")
    assert run.code == 0, run
    with DenseModel(read_card(digits_fcn["card"]), engine="onnx") as model:
        assert np.array_equal(np.load(tmp_path / "maps" / "scene.scores.npy"), model.classify(SCENE).probs)
    card = find_model("digits")
    run = call_fcnify("verify", card.model_def, digits_fcn["prototxt"], "--weights", card.weights,
                      "--engine", "onnx")
    assert run.code == 0 and "\n  result: EQUIVALENT" in run.out, run
    docs = {}
    for engine in ("onnx", "caffe"):
        run = call_fcnify("convert", "--model", "digits", "--out", tmp_path / engine, "--engine", engine,
                          "--format", "json")
        assert run.code == 0, run
        docs[engine] = json.loads(run.out)
        assert docs[engine]["equivalent"] is True and docs[engine]["verification"]["params_checked"] == 8
        assert 0 <= _check_scores(docs[engine])["fraction"] <= 1
    assert _check_scores(docs["onnx"])["max_abs"] != _check_scores(docs["caffe"])["max_abs"]
    assert (tmp_path / "onnx_full_conv.json").is_file()


def test_dask_workers_run_onnx(digits_fcn, tmp_path):
    """--workers with --engine onnx: the workers' map is, bit for bit, ONNX Runtime's in one process,
    and not the Caffe engine's (the two differ in the last bits)."""
    from fcnify.io.models import read_card
    run = run_fcnify("classify-map", SCENE, "--card", digits_fcn["card"], "--engine", "onnx",
                     "--workers", "1", "--out", tmp_path / "maps", "--quiet", timeout=240)
    assert run.code == 0, run
    local = np.load(tmp_path / "maps" / "scene.scores.npy")
    assert local.shape == (11, 114, 154)
    ref = {}
    for engine in ("onnx", "caffe"):
        with DenseModel(read_card(digits_fcn["card"]), engine=engine) as model:
            ref[engine] = model.classify(SCENE).probs
    assert not np.array_equal(ref["onnx"], ref["caffe"])
    assert np.array_equal(local, ref["onnx"]), "the workers did not run ONNX Runtime"


def test_gpu_without_cuda_provider_is_one_line():
    """--gpu with an ONNX Runtime that has no CUDA provider: one line, exit 2."""
    run = call_fcnify("classify-map", SCENE, "--model", "digits", "--engine", "onnx", "--gpu", "0")
    assert run.code == 2 and len(run.err.strip().splitlines()) == 1, run
    assert "CUDA" in run.err
    with pytest.raises(DeviceError):
        OnnxRunner(0)


def test_unsupported_layer_refused_before_running(tmp_path, model_factory):
    """A net with a layer the exporter lacks: refused by name when loading, one line in the CLI."""
    proto, weights = model_factory("threshold", 'layer { name: "data" type: "Input" top: "data" input_param '
                                   '{ shape { dim: 1 dim: 3 dim: 40 dim: 40 } } }\n'
                                   'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                                   'convolution_param { num_output: 2 kernel_size: 3 } }\n'
                                   'layer { name: "cut" type: "Threshold" bottom: "c" top: "cut" }\n')
    with pytest.raises(NetDefinitionError, match="'cut'.*Threshold"):
        OnnxRunner().load(proto, weights)
    run = call_fcnify("classify-map", SCENE, "--model-def", proto, "--weights", weights, "--engine", "onnx")
    assert run.code == 2 and "Threshold" in run.err and len(run.err.strip().splitlines()) == 1, run


def test_params_are_the_caffemodels(digits_fcn):
    """The loaded net's initializers are the caffemodel's blobs, digest for digest, as Caffe's."""
    with CaffeRunner().load(digits_fcn["prototxt"], digits_fcn["caffemodel"]) as a, \
            OnnxRunner().load(digits_fcn["prototxt"], digits_fcn["caffemodel"]) as b:
        assert a.param_digests() == b.param_digests()
        assert b.blob_shapes()["ip2-conv"][1] == 11
    assert b.session is None  # closed by `with`
