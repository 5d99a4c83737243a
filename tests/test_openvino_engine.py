"""--engine openvino: OpenVINO runs fcnify's maps within the float32 bound of Caffe (openvino_engine.py),
and --precision bf16 is refused where the CPU lacks it, and measured against float32 where it has it."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino engine needs OpenVINO: pip install 'fcnify[openvino]'")

from fcnify.caffe.caffemodel import read_weights  # noqa: E402
from fcnify.caffe.netdef import read_netdef  # noqa: E402
from fcnify.convert import card_for_model_def, convert  # noqa: E402
from fcnify.dense.dense import DenseModel  # noqa: E402
from fcnify.engines.caffe_engine import CaffeRunner  # noqa: E402
from fcnify.engines.cpu import bf16_flags  # noqa: E402
from fcnify.engines.openvino_engine import OpenvinoRunner  # noqa: E402
from fcnify.errors import ArgumentError, NetDefinitionError  # noqa: E402
from fcnify.io.images import load_image, resize  # noqa: E402
from fcnify.io.models import read_card  # noqa: E402
from fcnify.surgery.bound import probability_tolerance, score_layer, within  # noqa: E402
from fcnify.synthetic import write_random_caffemodel  # noqa: E402

from conftest import REPO, call_fcnify  # noqa: E402
from realdata import LENET_DEF, LENET_WEIGHTS, MTCNN_PHOTOS, digit_scene, mtcnn_net  # noqa: E402

SCENE = REPO / "prototxt" / "digits" / "scene.png"
U_F32, U_BF16 = 2.0 ** -24, 2.0 ** -8  # unit roundoffs (docs/verify.md, "bf16")


def engine_scores(card, rgb, engine: str, precision: str = "f32", **run):
    """(scores, run info, the float32 bound per score from this engine's score-layer input, the
    model's card), the bound in the image's orientation as the scores are."""
    model = DenseModel(card, engine=engine, precision=precision)
    try:
        scores, info = model.run_scores(rgb, **run)
        x = model.card.preprocess.apply(rgb)[None]
        layer = score_layer(model.netdef.param, model.score_blob, read_weights(model.card.weights))
        bottom = model.net.forward({model.input_blob: x}, [layer.bottom])[layer.bottom]
        tol = layer.tolerance(bottom)[0]
        return scores, info, tol.transpose(0, 2, 1) if model.transposed else tol, model.card
    finally:
        model.close()


def against_caffe(card, rgb, **run) -> tuple[float, float, dict]:
    """OpenVINO's map (with `run`: tile=, budget=) against Caffe's whole map: (share of the score
    bound used, share of the probability bound used, OpenVINO's run info)."""
    a, _, tol, fcn_card = engine_scores(card, rgb, "caffe")
    b, info, _, _ = engine_scores(fcn_card, rgb, "openvino", **run)
    assert a.shape == b.shape
    _, used = within(a, b, tol)
    pa, pb = softmax(a), softmax(b)
    _, used_p = within(pa, pb, probability_tolerance(pa[None], pb[None], tol[None])[0])
    return used, used_p, info


def softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s.astype(np.float64) - s.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


@pytest.fixture(scope="module")
def caffenet_card(caffenet, tmp_path_factory) -> Path:
    """CaffeNet with seeded weights, converted (and verified) by Caffe."""
    proto, weights = caffenet
    return convert(proto, weights, tmp_path_factory.mktemp("cn") / "caffenet", runner=CaffeRunner()).outputs["card"]


@pytest.fixture(scope="module")
def lenet_card(tmp_path_factory):
    """The real LeNet MNIST (Caffe's example weights) with its preprocessing, converted by Caffe."""
    from fcnify.io.preprocess import Preprocess
    card = card_for_model_def(LENET_DEF, LENET_WEIGHTS)
    card = replace(card, preprocess=Preprocess(channels="gray", raw_scale=255.0, input_scale=0.00390625))
    out = tmp_path_factory.mktemp("lenet") / "lenet"
    return read_card(convert(LENET_DEF, LENET_WEIGHTS, out, card=card, runner=CaffeRunner()).outputs["card"])


@pytest.fixture(scope="module")
def rnet_card(tmp_path_factory):
    """MTCNN R-Net (real weights): RGB, (x - 127.5) * 0.0078125, transposed; converted by Caffe."""
    from fcnify.io.preprocess import Preprocess
    proto, weights = mtcnn_net(2)
    card = replace(card_for_model_def(proto, weights),
                   preprocess=Preprocess(channels="RGB", mean=(127.5,), input_scale=0.0078125, transpose=True))
    out = tmp_path_factory.mktemp("rnet") / "det2"
    return read_card(convert(proto, weights, out, card=card, runner=CaffeRunner()).outputs["card"])


def lenet_scene() -> np.ndarray:
    rgb, placed = digit_scene(280, 360, 12, seed=7)
    assert len(placed) == 12
    return rgb


# ------------------------------------------------------------------ float32: Caffe's numbers

@pytest.mark.parametrize("tile", [None, 387])  # 387: 355 (the smallest exact tile) + a stride
def test_caffenet_map_within_bound_of_caffe(caffenet_card, caffe_root, tile):
    """CaffeNet (seeded) maps cat.jpg at 451 px in OpenVINO f32 as Caffe does, whole and in tiles."""
    rgb = resize(load_image(caffe_root / "examples" / "images" / "cat.jpg"), 451, 451)
    used, used_p, info = against_caffe(read_card(caffenet_card), rgb, **({"tile": tile} if tile else {}))
    assert info["mode"] == ("tiled" if tile else "whole") and (info["tiles"] > 1) == bool(tile)
    assert used <= 1 and used_p <= 1, (used, used_p)


def test_googlenet_map_within_bound_of_caffe(caffe_root, tmp_path):
    """GoogLeNet (Inception: Concat, AVE pooling, LRN; seeded weights) at 1000 px, whole and in
    tiles of 932 px (its smallest exact tile; 2 x 2 tiles)."""
    proto = caffe_root / "models" / "bvlc_googlenet" / "deploy.prototxt"
    weights = write_random_caffemodel(read_netdef(proto), tmp_path / "googlenet.caffemodel", seed=2)
    card = read_card(convert(proto, weights, tmp_path / "googlenet", runner=CaffeRunner()).outputs["card"])
    rgb = resize(load_image(caffe_root / "examples" / "images" / "cat.jpg"), 1000, 1000)
    for run in ({}, {"tile": 932}):
        used, used_p, info = against_caffe(card, rgb, **run)
        assert info["mode"] == ("tiled" if run else "whole")
        assert used <= 1 and used_p <= 1, (run, used, used_p)


def test_lenet_mnist_map_within_bound_of_caffe(lenet_card):
    """The real LeNet on a scene of MNIST test digits, whole and in tiles."""
    rgb = lenet_scene()
    for run in ({}, {"tile": 100}):
        used, used_p, info = against_caffe(lenet_card, rgb, **run)
        assert info["mode"] == ("tiled" if run else "whole")
        assert used <= 1 and used_p <= 1, (run, used, used_p)


def test_mtcnn_rnet_map_within_bound_of_caffe(rnet_card):
    """The real MTCNN R-Net (PReLU, transposed input) on the authors' photo, whole and in tiles."""
    rgb = load_image(MTCNN_PHOTOS[0])
    rgb = resize(rgb, int(rgb.shape[0] * 0.35), int(rgb.shape[1] * 0.35))
    for run in ({}, {"tile": 60}):
        used, used_p, info = against_caffe(rnet_card, rgb, **run)
        assert info["mode"] == ("tiled" if run else "whole")
        assert used <= 1 and used_p <= 1, (run, used, used_p)


def test_precision_is_set_to_f32(caffenet_card):
    """OpenVINO's CPU default is bf16 on AMX machines: fcnify compiles with f32 said explicitly."""
    runner = OpenvinoRunner()
    assert runner.config()["INFERENCE_PRECISION_HINT"] == "f32"
    with runner.load(read_card(caffenet_card).model_def, read_card(caffenet_card).weights) as net:
        net.forward({"data": np.zeros((1, 3, 227, 227), np.float32)}, ["fc8-conv"])
        assert str(net.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")


def test_params_are_the_caffemodels(caffenet_card):
    """The weights OpenVINO was handed are the caffemodel's blobs, digest for digest, as Caffe's."""
    card = read_card(caffenet_card)
    with CaffeRunner().load(card.model_def, card.weights) as a, OpenvinoRunner().load(card.model_def, card.weights) as b:
        assert a.param_digests() == b.param_digests()
    assert b.model is None  # closed by `with`


def test_unsupported_layer_refused_before_running(model_factory):
    """A layer type the exporter lacks: refused by name when loading, one line in the CLI."""
    proto, weights = model_factory("threshold", 'layer { name: "data" type: "Input" top: "data" input_param '
                                   '{ shape { dim: 1 dim: 3 dim: 40 dim: 40 } } }\n'
                                   'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                                   'convolution_param { num_output: 2 kernel_size: 3 } }\n'
                                   'layer { name: "cut" type: "Threshold" bottom: "c" top: "cut" }\n')
    with pytest.raises(NetDefinitionError, match="'cut'.*Threshold"):
        OpenvinoRunner().load(proto, weights)
    run = call_fcnify("classify-map", SCENE, "--model-def", proto, "--weights", weights, "--engine", "openvino")
    assert run.code == 2 and "Threshold" in run.err and len(run.err.strip().splitlines()) == 1, run


def test_cli_maps_with_openvino(tmp_path):
    """classify-map --engine openvino writes the map and records the engine and precision."""
    run = call_fcnify("classify-map", SCENE, "--model", "digits", "--engine", "openvino",
                      "--out", tmp_path / "m", "--quiet")
    assert run.code == 0, run
    assert "engine openvino" in run.out
    doc = json.loads((tmp_path / "m" / "scene.map.json").read_text())
    assert doc["run"]["engine"] == "openvino" and doc["run"]["precision"] == "f32"


def test_without_the_package_is_one_line(monkeypatch, tmp_path):
    """--engine openvino where OpenVINO is not installed: one line, exit 2, --out not even made."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    out = tmp_path / "never"
    run = call_fcnify("classify-map", SCENE, "--model", "digits", "--engine", "openvino", "--out", out)
    assert run.code == 2 and len(run.err.strip().splitlines()) == 1, run
    assert "openvino" in run.err and "pip install 'fcnify[openvino]'" in run.err
    assert not out.exists()


def test_import_sends_no_telemetry(tmp_path):
    """Importing fcnify's openvino engine leaves no OpenVINO telemetry id under $HOME (a plain
    `import openvino` writes ~/intel/openvino_ga_cid and queues an event)."""
    import subprocess
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    code = ("import fcnify.engines.openvino_engine as e, sys; assert e.ov is not None; "
            "import openvino.tools.ovc.telemetry_utils as t; print(t.tm.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "openvino.tools.ovc.telemetry_stub"
    assert not (tmp_path / "intel").exists(), list(tmp_path.rglob("*"))


# ------------------------------------------------------------------ --precision bf16

@pytest.mark.parametrize("engine", ["openvino", "torch", "auto"])
def test_bf16_refused_on_a_cpu_without_it(monkeypatch, tmp_path, engine):
    """FCNIFY_CPU_FLAGS stands in for /proc/cpuinfo: a CPU without AVX512-BF16 / AMX-BF16 gets one
    line, exit 2, and nothing written, on every engine that has bf16."""
    monkeypatch.setenv("FCNIFY_CPU_FLAGS", "fpu sse2 avx2 avx512f")
    out = tmp_path / "never"
    run = call_fcnify("classify-map", SCENE, "--model", "digits", "--engine", engine, "--precision", "bf16",
                      "--out", out)
    assert run.code == 2 and len(run.err.strip().splitlines()) == 1, run
    assert "AVX512-BF16" in run.err and not out.exists()
    with pytest.raises(ArgumentError):
        OpenvinoRunner(precision="bf16")


@pytest.mark.parametrize("engine", ["caffe", "onnx"])
def test_bf16_refused_on_float32_engines(tmp_path, engine):
    """caffe and onnx compute float32 only: --precision bf16 names the engines that have it."""
    run = call_fcnify("classify-map", SCENE, "--model", "digits", "--engine", engine, "--precision", "bf16",
                      "--out", tmp_path / "never")
    assert run.code == 2 and len(run.err.strip().splitlines()) == 1, run
    assert "float32 only" in run.err and "openvino" in run.err and not (tmp_path / "never").exists()


needs_bf16 = pytest.mark.skipif(not bf16_flags(), reason="this CPU has neither AVX512-BF16 nor AMX-BF16")


def bf16_against_f32(card, rgb, engine: str = "openvino") -> dict:
    """OpenVINO bf16's map against its f32 map on the same input: argmax agreement, the largest
    score difference, the share of the bf16 bound (u = 2^-8) it used, and the differing cells'
    f32 top-2 gaps against that bound (a gap inside it is a near-tie)."""
    a, _, tol, fcn_card = engine_scores(card, rgb, engine)
    b, info, _, _ = engine_scores(fcn_card, rgb, engine, precision="bf16")
    tol = tol * (U_BF16 + U_F32) / (2 * U_F32)  # the f32 bound has 2 u_f32; one side is bf16 here
    ok, used = within(a, b, tol)
    agree = a.argmax(0) == b.argmax(0)
    top2 = np.sort(a, axis=0)[-2:]
    gap = top2[1] - top2[0]
    cells = [(int(r), int(c), float(gap[r, c]), float(tol[:, r, c].max()))
             for r, c in zip(*np.nonzero(~agree))]
    return {"agreement": float(agree.mean()), "cells": int(agree.size), "differing": cells,
            "max_abs": float(np.abs(a - b).max()), "score_scale": float(np.abs(a).max()),
            "used": used, "within": ok, "precision": info}


@needs_bf16
def test_bf16_lenet_mnist_agrees_with_f32(lenet_card, tmp_path):
    """bf16 (AMX) on the real LeNet MNIST scene: within the bf16 bound, argmax on >= 98% of cells,
    every differing cell a near-tie; map.json says bf16."""
    got = bf16_against_f32(lenet_card, lenet_scene())
    print("lenet bf16 vs f32:", {k: v for k, v in got.items() if k != "precision"})
    assert got["within"] and got["agreement"] >= 0.98, got
    assert all(g <= 2 * t for _, _, g, t in got["differing"]), got["differing"]
    run = call_fcnify("classify-map", SCENE, "--model", "digits", "--engine", "openvino", "--precision", "bf16",
                      "--out", tmp_path / "m", "--quiet")
    assert run.code == 0 and "in bf16" in run.out, run
    assert json.loads((tmp_path / "m" / "scene.map.json").read_text())["run"]["precision"] == "bf16"


@needs_bf16
def test_bf16_mtcnn_rnet_agrees_with_f32(rnet_card):
    """bf16 on MTCNN R-Net over the authors' photo: within the bf16 bound, argmax on >= 98% of cells."""
    rgb = load_image(MTCNN_PHOTOS[0])
    rgb = resize(rgb, int(rgb.shape[0] * 0.35), int(rgb.shape[1] * 0.35))
    got = bf16_against_f32(rnet_card, rgb)
    print("rnet bf16 vs f32:", {k: v for k, v in got.items() if k != "precision"})
    assert got["within"] and got["agreement"] >= 0.98, got
    assert all(g <= 2 * t for _, _, g, t in got["differing"]), got["differing"]


@needs_bf16
def test_bf16_on_torch_is_autocast(lenet_card):
    """--engine torch --precision bf16 (autocast) on the LeNet scene: the same criterion against torch f32."""
    pytest.importorskip("torch")
    got = bf16_against_f32(lenet_card, lenet_scene(), engine="torch")
    print("lenet torch bf16 vs f32:", {k: v for k, v in got.items() if k != "precision"})
    assert got["within"] and got["agreement"] >= 0.98, got
    assert got["max_abs"] > 0  # bf16 arithmetic did run: float32 would give the same bits


# ------------------------------------------------------------------ memory for the planner

PROBE = """
import json, sys
import numpy as np
import fcnify.engines.openvino_engine  # imports are not the net's memory
from fcnify.convert import card_for_model_def
from fcnify.dense.dense import DenseModel

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

n = int(sys.argv[3])
before = rss()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
from pathlib import Path
model = DenseModel(card_for_model_def(Path(sys.argv[1]), Path(sys.argv[2])), engine="openvino")
img = np.random.default_rng(n).integers(0, 256, (n, n, 3), dtype=np.uint8)
_, info = model.run(img, budget=1 << 40)
assert info["mode"] == "whole"
print(json.dumps(peak() - before))
"""


def test_memory_estimate_within_band_of_measured_peak(tmp_path):
    """openvino_memory() against the measured peak RSS of a fresh process per size (loading and one
    whole pass, over the RSS before loading, OpenVINO's plugin included), on test_planner's
    activation-heavy net: never below HEADROOM of the peak (the planner's margin), and above it by
    at most the spread of the per-blob factors measured on this net and CaffeNet (OV_BLOB_SPREAD)."""
    import subprocess
    from fcnify.caffe.planner import HEADROOM
    from fcnify.engines.openvino_engine import OV_BLOB_SPREAD, openvino_memory
    from conftest import write_model
    from test_planner import WIDE
    proto, weights = write_model(tmp_path, "wide", WIDE)
    net = read_netdef(proto).param
    for n in (300, 600, 900):
        proc = subprocess.run([sys.executable, "-c", PROBE, str(proto), str(weights), str(n)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        est = openvino_memory(net, n, n)
        ratio = est.total / measured  # the plugin's own memory (est.base) is in the measured peak
        print(f"{n} px: estimated {est.total / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB ({ratio:.2f})")
        assert HEADROOM <= ratio <= OV_BLOB_SPREAD, (n, est.total, measured)
