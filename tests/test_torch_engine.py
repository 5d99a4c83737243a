"""The torch engine computes what Caffe computes, and runs where pycaffe is missing (torch_engine.py)."""
from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch engine needs PyTorch: pip install 'fcnify[torch]'")

from fcnify.surgery.bound import probability_tolerance, score_layer, within  # noqa: E402
from fcnify.caffe.caffemodel import read_weights, write_weights  # noqa: E402
from fcnify.convert import convert  # noqa: E402
from fcnify.dense.dense import DenseModel  # noqa: E402
from fcnify.errors import DeviceError, NetDefinitionError  # noqa: E402
from fcnify.io.images import load_image, resize  # noqa: E402
from fcnify.convert import card_for_model_def  # noqa: E402
from fcnify.io.models import find_model, read_card  # noqa: E402
from fcnify.caffe.netdef import parse_netdef, read_netdef  # noqa: E402
from fcnify.paths import caffe_descriptor  # noqa: E402
from nets import POOL_EDGE_CASES, input_layer, layer_text  # noqa: E402
from fcnify.engines.caffe_engine import CaffeRunner  # noqa: E402
from fcnify.synthetic import random_blobs, write_random_caffemodel  # noqa: E402
from fcnify.engines.torch_engine import TorchRunner  # noqa: E402

from bounds import blob_bounds  # noqa: E402
from conftest import REPO, run_fcnify  # noqa: E402

SCENE = REPO / "prototxt" / "digits" / "scene.png"


def blob_differences(proto: Path, weights: Path, inputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Run every blob of a net in Caffe and in torch on the same inputs: per blob, the largest
    share of its float32 bound (tests/bounds.py, docs/verify.md) the difference uses."""
    caffe_net = CaffeRunner().load(proto, weights)
    torch_net = TorchRunner().load(proto, weights)
    try:
        names = list(torch_net.blob_shapes())
        a = caffe_net.forward(inputs, names)
        b = torch_net.forward(inputs, names)
        # Caffe adds its own Split layers (blobs NAME_LAYER_I_split_J) for blobs read twice
        theirs = {n: s for n, s in caffe_net.blob_shapes().items() if not re.search(r"_split_\d+$", n)}
        assert theirs == torch_net.blob_shapes()
        bounds = blob_bounds(read_netdef(proto).param, a, b, caffe_net.params())
        return {name: within(a[name], b[name], bounds[name])[1] for name in names}
    finally:
        caffe_net.close()
        torch_net.close()


def assert_close(used: dict[str, float]) -> None:
    """Every blob within its bound (share <= 1)."""
    worst = max(used, key=used.get)
    assert used[worst] <= 1.0, f"blob '{worst}' uses {used[worst]:.3g} of its bound (all: {used})"


def maps(card, image: Path, size: int | None = None) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """(Caffe's map, torch's map, share of the bound used by the map, and by the scores before
    softmax, the map's bound).

    The bound (bound.py) comes from Caffe's run: its score layer's |W||x| + |b|
    per score; the map's from the scores' bound through Softmax.
    """
    rgb = load_image(image)
    if size:
        rgb = resize(rgb, size, size)
    out = []
    for runner in (CaffeRunner(), TorchRunner()):
        model = DenseModel(card, runner=runner)
        try:
            probs = model.classify(rgb).probs
            x = model.card.preprocess.apply(rgb)[None]
            scores = score_layer(model.netdef.param, model.score_blob, read_weights(model.card.weights))
            blobs = model.net.forward({model.input_blob: x}, [model.score_blob, scores.bottom])
        finally:
            model.close()
        out.append((probs, blobs[model.score_blob], scores.tolerance(blobs[scores.bottom])))
    (pa, sa, tol), (pb, sb, _) = out
    _, used_scores = within(sa, sb, tol)
    map_tol = probability_tolerance(pa[None], pb[None], tol)[0]
    _, used_map = within(pa, pb, map_tol)
    return pa, pb, used_map, used_scores, map_tol


@pytest.fixture(scope="module")
def caffenet_fcn(caffenet, tmp_path_factory) -> Path:
    """CaffeNet with seeded weights, converted (and verified) by Caffe: the card's path."""
    proto, weights = caffenet
    out = tmp_path_factory.mktemp("caffenet_fcn") / "caffenet"
    result = convert(proto, weights, out, runner=CaffeRunner())
    return result.outputs["card"]


# ------------------------------------------------------------------ whole nets

def test_caffenet_map_matches_caffe(caffenet_fcn, caffe_root):
    """CaffeNet (converted, seeded weights) maps cat.jpg at 451 px as Caffe does."""
    pa, pb, used_map, used_scores, _ = maps(read_card(caffenet_fcn),
                                       caffe_root / "examples" / "images" / "cat.jpg", 451)
    assert pa.shape == (1000, 8, 8)
    assert used_map <= 1 and used_scores <= 1, (used_map, used_scores)
    assert (pa.argmax(0) == pb.argmax(0)).all()


def test_caffenet_every_blob_matches_caffe(caffenet):
    """Every blob of the original CaffeNet (LRN, ceil pooling, fc layers) matches Caffe's."""
    proto, weights = caffenet
    x = np.random.default_rng(3).normal(0, 60, (2, 3, 227, 227)).astype(np.float32)
    assert_close(blob_differences(proto, weights, {"data": x}))


def test_googlenet_map_matches_caffe(caffe_root, tmp_path):
    """GoogLeNet (converted, seeded weights) maps cat.jpg at 451 px as Caffe does."""
    proto = caffe_root / "models" / "bvlc_googlenet" / "deploy.prototxt"
    weights = write_random_caffemodel(read_netdef(proto), tmp_path / "googlenet.caffemodel", seed=2)
    card = convert(proto, weights, tmp_path / "googlenet", runner=CaffeRunner()).outputs["card"]
    pa, pb, used_map, used_scores, _ = maps(read_card(card), caffe_root / "examples" / "images" / "cat.jpg", 451)
    assert pa.shape[1:] == (8, 8)
    assert used_map <= 1 and used_scores <= 1, (used_map, used_scores)


def test_digits_map_matches_caffe():
    """The shipped digits model, converted in memory by each engine, maps the scene alike."""
    card = find_model("digits")
    assert not card.fully_convolutional and card.weights.is_file()
    pa, pb, used_map, used_scores, _ = maps(card, SCENE)
    assert used_map <= 1 and used_scores <= 1, (used_map, used_scores)
    assert (pa.argmax(0) == pb.argmax(0)).all()


# ------------------------------------------------------------------ layers, in small nets

POOLS = POOL_EDGE_CASES


@pytest.mark.parametrize("size", [(5, 5), (6, 7), (8, 9), (13, 11), (16, 16)])
def test_pooling_edge_cases_match_caffe(model_factory, size):
    """MAX/AVE pooling with padding, ceil/floor rounding, dropped last windows, global, rectangular."""
    text = input_layer(1, 3, *size) + "".join(
        layer_text(name, "Pooling", "data", name, f"pooling_param {{ {param} }}") for name, param in POOLS.items())
    text += layer_text("conv", "Convolution", "data", "conv",
                       "convolution_param { num_output: 2 kernel_size: 1 }")
    proto, weights = model_factory(f"pools_{size[0]}x{size[1]}", text)
    x = np.random.default_rng(size[0]).normal(0, 1, (1, 3, *size)).astype(np.float32)
    diffs = blob_differences(proto, weights, {"data": x})
    assert set(POOLS) <= set(diffs)
    assert_close(diffs)


def test_batchnorm_and_scale_match_caffe(model_factory, tmp_path):
    """BatchNorm (stored stats / factor blob, batch stats) and Scale (bias, axis, num_axes, 2 bottoms), in place."""
    text = (input_layer(2, 4, 9, 9)
            + layer_text("conv1", "Convolution", "data", "conv1",
                         "convolution_param { num_output: 6 kernel_size: 3 pad: 1 }")
            + layer_text("bn1", "BatchNorm", "conv1", "conv1")
            + layer_text("sc1", "Scale", "conv1", "conv1", "scale_param { bias_term: true }")
            + layer_text("relu1", "ReLU", "conv1", "conv1")
            + layer_text("bn2", "BatchNorm", "conv1", "bn2",
                         "batch_norm_param { use_global_stats: false eps: 0.001 }")
            + layer_text("sc2", "Scale", "bn2", "sc2", "scale_param { axis: 1 num_axes: 2 bias_term: true }")
            + layer_text("sc3", "Scale", "sc2", "sc3", "scale_param { axis: 2 num_axes: -1 }")
            + layer_text("gap", "Pooling", "sc3", "gap", "pooling_param { pool: AVE global_pooling: true }")
            + layer_text("flat", "Flatten", "gap", "flat")
            + layer_text("sc4", "Scale", ["sc3", "flat"], "sc4", "scale_param { axis: 0 bias_term: true }"))
    netdef = parse_netdef(text, tmp_path / "bn.prototxt")
    blobs = random_blobs(netdef, seed=5)
    blobs["bn1"][2] = np.array([4.0], dtype=np.float32)  # Caffe divides the stored stats by this
    proto = tmp_path / "bn.prototxt"
    proto.write_text(text)
    weights = tmp_path / "bn.caffemodel"
    with open(weights, "wb") as f:
        write_weights(f, netdef.param, blobs)
    x = np.random.default_rng(5).normal(0, 2, (2, 4, 9, 9)).astype(np.float32)
    assert_close(blob_differences(proto, weights, {"data": x}))


def test_other_layers_match_caffe(model_factory):
    """Grouped dilated rectangular conv, LRN both regions, leaky ReLU, Eltwise, Concat, IP axis/transpose, ..."""
    text = (input_layer(2, 6, 11, 13)
            + layer_text("cg", "Convolution", "data", "cg",
                         "convolution_param { num_output: 8 group: 2 kernel_h: 3 kernel_w: 5 stride_h: 2 "
                         "stride_w: 1 pad_h: 1 pad_w: 2 dilation: 2 }")
            + layer_text("c_nobias", "Convolution", "data", "c_nobias",
                         "convolution_param { num_output: 4 kernel_size: 1 bias_term: false }")
            + layer_text("leaky", "ReLU", "cg", "cg", "relu_param { negative_slope: 0.1 }")
            + layer_text("lrn_across", "LRN", "cg", "lrn_a",
                         "lrn_param { local_size: 3 alpha: 0.5 beta: 0.6 k: 2 }")
            + layer_text("lrn_within", "LRN", "cg", "lrn_w",
                         "lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.7 beta: 0.8 }")
            + layer_text("sig", "Sigmoid", "lrn_a", "sig")
            + layer_text("tanh", "TanH", "lrn_w", "tanh")
            + layer_text("sum", "Eltwise", ["sig", "tanh"], "sum",
                         "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 }")
            + layer_text("prod", "Eltwise", ["sig", "tanh"], "prod", "eltwise_param { operation: PROD }")
            + layer_text("max", "Eltwise", ["sig", "tanh"], "max", "eltwise_param { operation: MAX }")
            + layer_text("cat", "Concat", ["sum", "prod", "max"], "cat")
            + layer_text("split", "Split", "cat", ["cat_a", "cat_b"])
            + layer_text("drop", "Dropout", "cat_a", "cat_a")
            + layer_text("ip_axis2", "InnerProduct", "cat_b", "ip_axis2",
                         "inner_product_param { num_output: 5 axis: 2 }")
            + layer_text("ip_t", "InnerProduct", "cat_a", "ip_t",
                         "inner_product_param { num_output: 7 transpose: true bias_term: false }")
            + layer_text("sm2", "Softmax", "ip_axis2", "sm2", "softmax_param { axis: 2 }")
            + layer_text("sm_neg", "Softmax", "ip_axis2", "sm_neg", "softmax_param { axis: -2 }")
            + layer_text("sm_t", "Softmax", "ip_t", "sm_t")
            + layer_text("flat", "Flatten", "c_nobias", "flat", "flatten_param { axis: 2 }")
            + layer_text("resh", "Reshape", "flat", "resh", "reshape_param { shape { dim: 0 dim: -1 dim: 11 } }"))
    proto, weights = model_factory("ops", text)
    x = np.random.default_rng(7).normal(0, 1, (2, 6, 11, 13)).astype(np.float32)
    assert_close(blob_differences(proto, weights, {"data": x}))


def test_reshaped_input_matches_caffe(caffenet_fcn):
    """One loaded FCN, run at several input sizes in turn, gives Caffe's blobs at each."""
    card = read_card(caffenet_fcn)
    scores = score_layer(read_netdef(card.model_def).param, "fc8-conv", read_weights(card.weights))
    caffe_net = CaffeRunner().load(card.model_def, card.weights)
    torch_net = TorchRunner().load(card.model_def, card.weights)
    try:
        for i, (h, w) in enumerate([(227, 227), (259, 323), (227, 227)]):
            x = np.random.default_rng(i).normal(0, 50, (1, 3, h, w)).astype(np.float32)
            a = caffe_net.forward({"data": x}, ["fc8-conv", "prob", scores.bottom])
            b = torch_net.forward({"data": x}, ["fc8-conv", "prob"])
            assert within(a["fc8-conv"], b["fc8-conv"], scores.tolerance(a[scores.bottom]))[0]
            assert torch_net.blob_shapes() == caffe_net.blob_shapes()
        assert torch_net.param_digests() == caffe_net.param_digests()
        theirs, ours = caffe_net.params(), torch_net.params()
        assert list(ours) == list(theirs)
        assert all(np.array_equal(a, b) for layer in ours for a, b in zip(theirs[layer], ours[layer]))
    finally:
        caffe_net.close()
        torch_net.close()


# ------------------------------------------------------------------ without pycaffe

NO_CAFFE = '''
import sys

class _NoCaffe:
    """Make `import caffe` fail, as on a machine where pycaffe was never built."""
    def find_spec(self, name, path=None, target=None):
        if name == "caffe" or name.startswith("caffe."):
            raise ImportError("pycaffe is hidden by the test's sitecustomize")
        return None

sys.meta_path.insert(0, _NoCaffe())
'''


def test_runs_without_pycaffe(caffenet_fcn, caffe_root, tmp_path):
    """With `import caffe` failing and only a copied caffe.desc, --engine torch gives Caffe's maps."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(textwrap.dedent(NO_CAFFE))
    desc = tmp_path / "caffe.desc"
    shutil.copy(caffe_descriptor(), desc)
    env = {"PYTHONPATH": f"{hide}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FCNIFY_SETUP_RECORD": str(tmp_path / "no-setup-record.json"),
           "FCNIFY_CAFFE_DESCRIPTOR": str(desc)}
    probe = run_fcnify("--version", env=env)  # the environment itself works ...
    assert probe.code == 0, probe.err
    import subprocess
    blocked = subprocess.run([sys.executable, "-c", "import caffe"], capture_output=True, text=True,
                             env=dict(os.environ, **env))
    assert blocked.returncode != 0 and "hidden" in blocked.stderr  # ... and pycaffe is really gone

    cat = caffe_root / "examples" / "images" / "cat.jpg"
    card = read_card(caffenet_fcn)
    run = run_fcnify("classify-map", cat, "--model-def", card.model_def, "--weights", card.weights,
                     "--engine", "torch", "--size", "451", "--out", tmp_path / "caffenet", env=env)
    assert run.code == 0, run.err
    pa, *_, map_tol = maps(card, cat, 451)
    assert within(pa, np.load(tmp_path / "caffenet" / "cat.scores.npy"), map_tol)[0]

    # an unconverted net: converted in memory and verified on torch, still without Caffe
    run = run_fcnify("classify-map", SCENE, "--model", "digits", "--engine", "torch",
                     "--out", tmp_path / "digits", env=env)
    assert run.code == 0, run.err
    pa, *_, map_tol = maps(find_model("digits"), SCENE)
    assert within(pa, np.load(tmp_path / "digits" / "scene.scores.npy"), map_tol)[0]


# ------------------------------------------------------------------ failures

def test_unsupported_layer_type_is_refused(model_factory):
    """A layer type the torch engine does not run is named, with its layer, before anything runs."""
    text = (input_layer(1, 3, 8, 8)
            + layer_text("conv", "Convolution", "data", "conv",
                         "convolution_param { num_output: 2 kernel_size: 3 }")
            + layer_text("absval", "AbsVal", "conv", "abs"))
    proto, weights = model_factory("absval", text)
    with pytest.raises(NetDefinitionError, match=r"layer 'absval': layer type 'AbsVal' is not supported "
                                                 r"by the torch engine"):
        TorchRunner().load(proto, weights)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_matches_caffe(model_factory, shared):
    """PReLU, per channel and channel-shared, gives Caffe's numbers bit for bit on the CPU."""
    text = input_layer(1, 4, 9, 9) + layer_text("prelu", "PReLU", "data", "out",
                                       "prelu_param { channel_shared: true }" if shared else "")
    proto, weights = model_factory("prelu", text)
    x = np.random.default_rng(3).normal(0, 50, (1, 4, 9, 9)).astype(np.float32)
    assert (x < 0).any() and (x > 0).any()
    diffs = blob_differences(proto, weights, {"data": x})
    assert diffs["out"] == 0.0, diffs


def test_mtcnn_runs_on_torch_as_on_caffe():
    """MTCNN's P-Net (PReLU throughout) maps a photo on torch as Caffe does, within the float32 bound."""
    from realdata import MTCNN_PHOTOS, mtcnn_net
    proto, weights = mtcnn_net(1)
    card = replace(card_for_model_def(proto, weights), fully_convolutional=True)
    pa, pb, used_map, used_scores, _ = maps(card, MTCNN_PHOTOS[0], 120)
    assert pa.shape == (2, 55, 55)
    assert used_map <= 1 and used_scores <= 1, (used_map, used_scores)


def test_unsupported_layer_type_cli_one_line(model_factory):
    """classify-map --engine torch on an unconverted net with an unsupported type: one line, exit 2."""
    text = (input_layer(1, 3, 12, 12)
            + layer_text("conv", "Convolution", "data", "conv",
                         "convolution_param { num_output: 2 kernel_size: 3 }")
            + layer_text("absval", "AbsVal", "conv", "abs")
            + layer_text("fc", "InnerProduct", "abs", "fc", "inner_product_param { num_output: 3 }"))
    proto, weights = model_factory("absval", text)
    run = run_fcnify("classify-map", SCENE, "--model-def", proto, "--weights", weights, "--engine", "torch")
    assert run.code == 2, run.err
    assert run.err.count("\n") == 1, run.err
    assert "layer 'absval': layer type 'AbsVal' is not supported by the torch engine" in run.err


def test_gpu_without_cuda_is_one_line_exit_2(tmp_path):
    """--gpu 0 --engine torch where PyTorch sees no CUDA GPU: one line on stderr, exit 2, nothing written.

    CUDA_VISIBLE_DEVICES="" hides any GPU, so this runs the same on machines
    with one (where scripts/gpu_check.py tests the GPU path itself).
    """
    run = run_fcnify("classify-map", SCENE, "--model", "digits", "--engine", "torch", "--gpu", "0",
                     "--out", tmp_path / "maps", env={"CUDA_VISIBLE_DEVICES": ""})
    assert run.code == 2, run.err
    assert not (tmp_path / "maps").exists() or not any((tmp_path / "maps").iterdir())
    assert run.err.count("\n") == 1, run.err
    assert run.err.startswith("fcnify: error: --gpu 0: PyTorch") and "sees no CUDA GPU" in run.err


def test_gpu_number_out_of_range():
    """A GPU number PyTorch does not have is a DeviceError, not a crash."""
    with pytest.raises(DeviceError, match="--gpu 99"):
        TorchRunner(99)
