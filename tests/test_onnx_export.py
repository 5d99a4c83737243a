"""ONNX export keeps Caffe's arithmetic, op by op and net by net (onnx_export.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx extra: pip install 'fcnify[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="the onnx engine needs onnxruntime")

from fcnify.caffe.caffemodel import read_weights, write_weights  # noqa: E402
from fcnify.convert import convert  # noqa: E402
from fcnify.resolve import resolve_card  # noqa: E402
from fcnify.convert import card_for_model_def  # noqa: E402
from fcnify.io.models import find_model  # noqa: E402
from fcnify.caffe.netdef import parse_netdef, read_netdef  # noqa: E402
from fcnify.engines.onnx_engine import OnnxRunner  # noqa: E402
from fcnify.engines.onnx_export import Unexportable  # noqa: E402
from fcnify.errors import NotEquivalentError  # noqa: E402
from fcnify.export import export_onnx  # noqa: E402
from fcnify.engines.caffe_engine import CaffeRunner  # noqa: E402
from fcnify.caffe.shapes import pool_geometry  # noqa: E402
from fcnify.synthetic import random_blobs, write_random_caffemodel  # noqa: E402

from conftest import call_fcnify  # noqa: E402
from nets import POOL_EDGE_CASES, input_layer, layer_text, vgg16  # noqa: E402
from fcnify.surgery.bound import factor, score_layer, within  # noqa: E402
from realdata import LENET_DEF, LENET_WEIGHTS, mtcnn_net  # noqa: E402


def _models(tmp_path: Path, name: str, text: str, blobs_fix=None) -> tuple[Path, Path, Path]:
    """The prototxt, seeded weights, and the same weights made absolute (for the bound's A)."""
    proto = tmp_path / f"{name}.prototxt"
    proto.write_text(text)
    netdef = parse_netdef(text, proto)
    blobs = random_blobs(netdef, seed=3)
    if blobs_fix:
        blobs_fix(blobs)
    paths = []
    for suffix, bl in (("", blobs), ("_abs", {k: [np.abs(a) for a in v] for k, v in blobs.items()})):
        path = tmp_path / f"{name}{suffix}.caffemodel"
        with open(path, "wb") as f:
            write_weights(f, netdef.param, bl)
        paths.append(path)
    return proto, paths[0], paths[1]


def _run(runner, proto, weights, x, blobs):
    with runner.load(proto, weights) as net:
        return net.forward({"data": x}, blobs)


def _check(name: str, caffe: np.ndarray, onnx_out: np.ndarray, bound: np.ndarray | float) -> str | None:
    """None when every element is within its bound, else what failed."""
    if caffe.shape != onnx_out.shape:
        return f"{name}: shape {onnx_out.shape}, Caffe {caffe.shape}"
    diff = np.abs(caffe.astype(np.float64) - onnx_out.astype(np.float64))
    excess = diff - bound
    if (excess > 0).any() or not np.isfinite(onnx_out).all():
        i = np.unravel_index(int(np.argmax(excess)), diff.shape)
        return f"{name}: |diff| {diff[i]:.3g} over bound {np.broadcast_to(bound, diff.shape)[i]:.3g} at {i}"
    return None


# ------------------------------------------------------------------ pooling, exactly Caffe's

POOLS = {**POOL_EDGE_CASES,  # and stride-1 windows over padding
         "ave_stride1_pad": "pool: AVE kernel_size: 3 stride: 1 pad: 1",
         "max_stride1_pad": "pool: MAX kernel_size: 3 stride: 1 pad: 1"}


def test_pooling_matches_caffe_at_every_edge(tmp_path):
    """MAX pooling equals Caffe's bit for bit; AVE within the bound of its window's sum, at sizes
    where padding, ceil rounding and dropped last windows all occur, from one graph."""
    text = input_layer(1, 3, 5, 5) + "".join(
        layer_text(name, "Pooling", "data", name, f"pooling_param {{ {param} }}") for name, param in POOLS.items())
    text += layer_text("conv", "Convolution", "data", "conv",
                       "convolution_param { num_output: 2 kernel_size: 1 }")
    proto, weights, _ = _models(tmp_path, "pools", text)
    layers = {layer.name: layer for layer in read_netdef(proto).param.layer}
    failures = []
    with CaffeRunner().load(proto, weights) as caffe, OnnxRunner().load(proto, weights) as onx:
        for size in [(5, 5), (6, 7), (8, 9), (13, 11), (16, 16)]:  # one ONNX graph for all sizes
            x = np.random.default_rng(size[0]).normal(0, 1, (1, 3, *size)).astype(np.float32)
            a = caffe.forward({"data": x}, list(POOLS))
            b = onx.forward({"data": x}, list(POOLS))
            absolute = caffe.forward({"data": np.abs(x)}, list(POOLS))
            for name, param in POOLS.items():
                if name.startswith("max"):
                    bound = 0.0  # a maximum is exact
                else:  # AVE: a sum of at most kernel-size terms, then one division
                    kernel = pool_geometry(layers[name].pooling_param, x.shape)[0]
                    bound = factor(kernel[0] * kernel[1] + 1) * absolute[name]
                failures.append(_check(f"{name} at {size}", a[name], b[name], bound))
    assert not [f for f in failures if f], [f for f in failures if f]


def test_pooling_divisor_is_caffes_not_onnxs(tmp_path):
    """At an overhanging edge Caffe divides by the window clipped to the padded input, which is
    neither of ONNX's count_include_pad rules: the last column proves the export computes it."""
    text = input_layer(1, 1, 1, 6) + layer_text("pool", "Pooling", "data", "pool",
                                       "pooling_param { pool: AVE kernel_h: 1 kernel_w: 3 stride_w: 2 "
                                       "stride_h: 1 pad_w: 1 pad_h: 0 }")
    proto, weights, _ = _models(tmp_path, "divisor", text)
    x = np.ones((1, 1, 1, 6), np.float32)
    got = _run(OnnxRunner(), proto, weights, x, ["pool"])["pool"].ravel()
    # windows [-1,2) [1,4) [3,6) [5,8): the last is clipped to [5,7) by the padded bound: 1 of 2
    assert got.tolist() == _run(CaffeRunner(), proto, weights, x, ["pool"])["pool"].ravel().tolist()
    assert got.tolist() == np.array([2 / 3, 1, 1, 1 / 2], np.float32).tolist()


# ------------------------------------------------------------------ the other layers

def _bn_fix(blobs):
    blobs["bn"][1] = np.abs(blobs["bn"][1]) + 0.5  # a variance
    blobs["bn"][2] = np.array([4.0], np.float32)  # Caffe divides the stored stats by this


OPS = [  # (layer text reading "data", how the bound's A is found, N)
    ("conv_group_dilated", "Convolution", "convolution_param { num_output: 8 group: 2 kernel_h: 3 "
     "kernel_w: 5 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 2 dilation: 2 }", "abs", 3 * 3 * 5 + 1),
    ("conv_no_bias", "Convolution", "convolution_param { num_output: 4 kernel_size: 1 bias_term: false }",
     "abs", 7),
    ("deconv", "Deconvolution", "convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 }",
     "abs", 6 * 9 + 1),
    ("ip", "InnerProduct", "inner_product_param { num_output: 7 }", "abs", 6 * 11 * 13 + 1),
    ("lrn_across", "LRN", "lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 }", "value", 5 + 3),
    ("lrn_within", "LRN", "lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.7 beta: 0.8 }",
     "value", 9 + 3),
    ("relu", "ReLU", "", "exact", 0),
    ("leaky", "ReLU", "relu_param { negative_slope: 0.1 }", "exact", 0),
    ("prelu", "PReLU", "", "exact", 0),
    ("prelu_shared", "PReLU", "prelu_param { channel_shared: true }", "exact", 0),
    ("elu", "ELU", "elu_param { alpha: 0.7 }", "elu", 4),
    ("sigmoid", "Sigmoid", "", "value", 4),
    ("tanh", "TanH", "", "value", 4),
    ("absval", "AbsVal", "", "exact", 0),
    ("power", "Power", "power_param { power: 2 scale: 0.5 shift: 1 }", "value", 4),
    ("softmax", "Softmax", "", "value", 6 + 4),
    ("softmax_axis2", "Softmax", "softmax_param { axis: 2 }", "value", 11 + 4),
    ("softmax_neg", "Softmax", "softmax_param { axis: -1 }", "value", 13 + 4),
]


def test_layers_match_caffe(tmp_path):
    """Grouped dilated conv, deconv, InnerProduct, LRN both ways, (P)ReLU, ELU, Power, Softmax axes,
    Eltwise, Concat, Split, Dropout and BatchNorm+Scale: each within its float32 bound of Caffe."""
    text = input_layer(2, 6, 11, 13) + "".join(layer_text(n, t, "data", n, body) for n, t, body, _, _ in OPS)
    text += (layer_text("sum", "Eltwise", ["data", "relu"], "sum", "eltwise_param { operation: SUM coeff: 0.5 "
                                                               "coeff: -2 }")
             + layer_text("prod", "Eltwise", ["data", "absval"], "prod", "eltwise_param { operation: PROD }")
             + layer_text("max", "Eltwise", ["data", "absval", "relu"], "max",
                          "eltwise_param { operation: MAX }")
             + layer_text("cat", "Concat", ["data", "relu", "leaky"], "cat")
             + layer_text("cat_w", "Concat", ["data", "relu"], "cat_w", "concat_param { axis: 3 }")
             + layer_text("split", "Split", "cat", ["cat_a", "cat_b"])
             + layer_text("drop", "Dropout", "cat_a", "cat_a")
             + layer_text("bn", "BatchNorm", "data", "bn")
             + layer_text("sc", "Scale", "bn", "sc", "scale_param { bias_term: true }"))
    proto, weights, abs_weights = _models(tmp_path, "ops", text, _bn_fix)
    x = np.random.default_rng(7).normal(0, 1, (2, 6, 11, 13)).astype(np.float32)
    names = [n for n, *_ in OPS] + ["sum", "prod", "max", "cat", "cat_w", "cat_a", "cat_b", "bn", "sc"]
    a = _run(CaffeRunner(), proto, weights, x, names)
    b = _run(OnnxRunner(), proto, weights, x, names)
    absolute = _run(CaffeRunner(), proto, abs_weights, np.abs(x), names)
    bounds = {}
    for name, _, _, kind, n in OPS:
        bounds[name] = {"abs": lambda: factor(n) * absolute[name], "exact": lambda: 0.0,
                        # a formula of a few roundings per element, relative to its value (LRN's
                        # and Softmax's sums are of positive terms); 2: an input error scaled by
                        # at most 1 + beta < 2
                        "value": lambda: factor(n) * 2 * np.abs(a[name]),
                        # alpha * (exp(x) - 1): the terms are alpha * exp(x) and alpha
                        "elu": lambda: factor(n) * (np.abs(a[name]) + 0.7 * (1 + np.exp(np.minimum(x, 0))))
                        }[kind]()
    bounds["sum"] = factor(3) * (0.5 * np.abs(x) + 2 * np.abs(a["relu"]))
    # products of the same floats, maxima and copies of exact results are exact
    bounds.update({"prod": 0.0, "max": 0.0, "cat": 0.0, "cat_w": 0.0, "cat_a": 0.0, "cat_b": 0.0})
    p = read_weights(weights)
    mean, var = (np.asarray(p["bn"].blobs[i], np.float64).reshape(1, 6, 1, 1) / 4 for i in (0, 1))
    std = np.sqrt(var + 1e-5)
    bounds["bn"] = factor(4) * (np.abs(x) + np.abs(mean)) / std
    s, t = (np.abs(np.asarray(p["sc"].blobs[i], np.float64)).reshape(1, 6, 1, 1) for i in (0, 1))
    bounds["sc"] = s * bounds["bn"] + factor(3) * (s * np.abs(a["bn"]) + t)
    failures = [f for f in (_check(n, a[n], b[n], bounds[n]) for n in names) if f]
    assert not failures, failures


def test_unsupported_layer_refused_by_name(tmp_path):
    """A layer type without an exact ONNX form: one line naming it, exit 2, nothing written."""
    text = input_layer(1, 3, 8, 8) + layer_text("crop_me", "Crop", ["data", "data"], "crop")
    proto, weights, _ = _models(tmp_path, "crop", text)
    out = tmp_path / "crop.onnx"
    run = call_fcnify("export", proto, "--weights", weights, "--out", out)
    assert run.code == 2, run
    assert len(run.err.strip().splitlines()) == 1
    assert "layer 'crop_me'" in run.err and "'Crop'" in run.err and "no exact ONNX form" in run.err
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))


def test_setting_without_onnx_form_refused(tmp_path):
    """BatchNorm on batch statistics has no ONNX form of Caffe's: refused naming the layer."""
    text = input_layer(1, 3, 8, 8) + layer_text("bn_batch", "BatchNorm", "data", "bn",
                                       "batch_norm_param { use_global_stats: false }")
    proto, weights, _ = _models(tmp_path, "bn", text)
    with pytest.raises(Unexportable, match="bn_batch.*use_global_stats"):
        OnnxRunner().load(proto, weights)


def test_unwritable_output_one_line(tmp_path):
    """An --out in a folder that cannot be written (or made), or an existing file: one line, exit 2."""
    for out in (Path("/proc/d.onnx"), Path("/proc/missing/d.onnx")):
        run = call_fcnify("export", "digits", "--out", out)
        assert run.code == 2 and len(run.err.strip().splitlines()) == 1, run
        assert not out.exists()
    existing = tmp_path / "d.onnx"
    existing.write_text("keep")
    run = call_fcnify("export", "digits", "--out", existing)
    assert run.code == 2 and "--force" in run.err
    assert existing.read_text() == "keep"


# ------------------------------------------------------------------ whole nets, checked against Caffe

def _export(tmp_path: Path, proto: Path, weights: Path, name: str):
    card = card_for_model_def(proto, weights)
    result = export_onnx(card, tmp_path / f"{name}.onnx", samples=1)  # one random image and cat.jpg
    assert result.report is not None and result.report.equivalent, result.report
    assert result.report.params_checked > 0 and not result.report.params_mismatched
    onnx.checker.check_model(str(result.path), full_check=True)
    return result


def test_caffenet_one_file_any_size(caffenet, tmp_path):
    """CaffeNet's export passes verify against Caffe; the one file maps 227, 451 and 355 x 611 px
    inputs as Caffe's converted net does, within the float32 bound of its fc8 scores
    (scripts/bench/bench_dense.py runs it up to 1795 px)."""
    proto, weights = caffenet
    result = _export(tmp_path, proto, weights, "caffenet")
    assert result.converted and result.inputs == {"data": ["N", 3, "H", "W"]}
    files = convert(proto, weights, tmp_path / "caffenet", check=False).outputs
    fcn_def, fcn_weights = files["prototxt"], files["caffemodel"]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    scores = score_layer(read_netdef(fcn_def).param, "fc8-conv", read_weights(fcn_weights))
    with CaffeRunner().load(fcn_def, fcn_weights) as caffe:
        for (h, w), cells in (((227, 227), (1, 1)), ((451, 451), (8, 8)), ((355, 611), (5, 13))):
            x = np.random.default_rng(h).normal(0, 60, (1, 3, h, w)).astype(np.float32)
            a = caffe.forward({"data": x}, ["fc8-conv", scores.bottom])
            (b,) = session.run(["fc8-conv"], {"data": x})
            assert b.shape == (1, 1000, *cells)
            ok, used = within(a["fc8-conv"], b, scores.tolerance(a[scores.bottom]))
            assert ok, f"fc8 at {h}x{w}: {used:.2f} of the bound"


def test_googlenet_and_vgg16_match_caffe(caffe_root, tmp_path):
    """GoogLeNet (Caffe's prototxt: inception Concat, stride-1 padded pooling, LRN, AVE pool) and
    VGG-16 (channels / 8, 64 px), seeded weights, exported and checked against Caffe."""
    proto = caffe_root / "models" / "bvlc_googlenet" / "deploy.prototxt"
    weights = write_random_caffemodel(read_netdef(proto), tmp_path / "googlenet.caffemodel", seed=2)
    assert _export(tmp_path, proto, weights, "googlenet").converted
    vgg = tmp_path / "vgg16.prototxt"
    vgg.write_text(vgg16(width=8, size=64))
    vgg_weights = write_random_caffemodel(read_netdef(vgg), tmp_path / "vgg16.caffemodel", seed=4)
    assert _export(tmp_path, vgg, vgg_weights, "vgg16").converted


EDGES_NET = (  # AVE pooling hanging over the edge, LRN WITHIN_CHANNEL, dilation, then a classifier
    input_layer(1, 3, 37, 37)
    + layer_text("conv1", "Convolution", "data", "conv1",
                 "convolution_param { num_output: 8 kernel_size: 3 dilation: 2 }")
    + layer_text("relu1", "ReLU", "conv1", "conv1")
    + layer_text("norm1", "LRN", "conv1", "norm1",
                 "lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.5 beta: 0.75 }")
    + layer_text("pool1", "Pooling", "norm1", "pool1", "pooling_param { pool: AVE kernel_size: 3 stride: 2 }")
    + layer_text("pool2", "Pooling", "pool1", "pool2",
                 "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }")
    + layer_text("fc", "InnerProduct", "pool2", "fc", "inner_product_param { num_output: 10 }")
    + layer_text("prob", "Softmax", "fc", "prob"))


def test_edge_net_matches_caffe(tmp_path):
    """A net whose AVE pools overhang the edge (33 -> 16 -> 8 px, ceil), with LRN WITHIN_CHANNEL and
    dilation, exported and checked against Caffe."""
    proto, weights, _ = _models(tmp_path, "edges", EDGES_NET)
    _export(tmp_path, proto, weights, "edges")


def test_real_nets_match_caffe(tmp_path):
    """LeNet (trained on MNIST) and MTCNN's three nets (PReLU; P-Net already fully convolutional)."""
    assert _export(tmp_path, LENET_DEF, LENET_WEIGHTS, "lenet").converted
    for n in (1, 2, 3):
        result = _export(tmp_path, *mtcnn_net(n), f"det{n}")
        assert result.converted == (n != 1)


def test_metadata_carries_the_card(tmp_path):
    """The card's preprocessing and labels, and the map's geometry, are in the ONNX metadata."""
    card = find_model("digits")
    out = tmp_path / "digits.onnx"
    run = call_fcnify("export", "digits", "--out", out)
    assert run.code == 0, run
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["fcnify.preprocess"]) == card.preprocess.to_dict()
    labels = card.load_labels(11)
    assert json.loads(meta["fcnify.labels"]) == list(labels.names)
    assert json.loads(meta["fcnify.geometry"])["stride"] == [4, 4]
    assert meta["fcnify.score_blob"] == "ip2-conv" and meta["fcnify.input_blob"] == "data"
    # the converted card exports to the same model
    fcn = convert(card.model_def, card.weights, tmp_path / "digits", card=card).outputs["card"]
    again = tmp_path / "again.onnx"
    assert call_fcnify("export", fcn, "--out", again).code == 0
    x = np.random.default_rng(0).normal(0, 1, (1, 1, 60, 50)).astype(np.float32)
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["ip2-conv"], {"data": x})
            for p in (out, again)]
    assert np.array_equal(runs[0][0], runs[1][0])


def test_convert_labels_reach_the_card_and_the_onnx_metadata(tmp_path):
    """convert --labels (quoted synset lines) writes them into the card; export of that card puts
    them, ids and names without quotes, into fcnify.labels and fcnify.label_ids."""
    from conftest import write_model
    from nets import small_net
    proto, weights = write_model(tmp_path, "small", small_net("plain"), seed=3)
    names = [f"class {i}" for i in range(10)]
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"'n{i:08d} {n}',\n" for i, n in enumerate(names)))
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "s",
                      "--labels", labels, "--no-verify")
    assert run.code == 0, run.err
    card = tmp_path / "s_full_conv.json"
    assert (tmp_path / json.loads(card.read_text())["labels"]).resolve() == labels.resolve()
    out = tmp_path / "s.onnx"
    assert call_fcnify("export", card, "--out", out, "--no-verify").code == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["fcnify.labels"]) == names
    assert json.loads(meta["fcnify.label_ids"]) == [f"n{i:08d}" for i in range(10)]


def test_convert_refuses_labels_of_another_length(tmp_path):
    """11 labels for a 10-class net: one line naming the file and both counts, exit 2, nothing written."""
    from conftest import write_model
    from nets import small_net
    proto, weights = write_model(tmp_path, "small", small_net("plain"), seed=3)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"c{i}\n" for i in range(11)))
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "s",
                      "--labels", labels, "--no-verify")
    assert run.code == 2 and run.err.count("\n") == 1
    assert "labels.txt" in run.err and "11 lines, the net has 10 classes" in run.err
    assert not list(tmp_path.glob("s_full_conv*"))


def test_pnet_card_exports_its_whole_truth(tmp_path):
    """P-Net's card (convert on a net with nothing to convert) exports with RGB, mean 127.5, scale
    0.0078125, transposed, its labels, background class and box head in the metadata."""
    proto, weights = mtcnn_net(1)
    labels = tmp_path / "faces.txt"
    labels.write_text("no face\nface\n")
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "det1",
                      "--channels", "rgb", "--mean", "127.5", "--input-scale", "0.0078125", "--transpose",
                      "--labels", labels, "--background-class", "0", "--box-head", "conv4-2")
    assert run.code == 0, run.err
    out = tmp_path / "det1.onnx"
    run = call_fcnify("export", tmp_path / "det1_full_conv.json", "--out", out)
    assert run.code == 0, run.err
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["fcnify.preprocess"]) == {"channels": "RGB", "raw_scale": 255.0, "mean": [127.5],
                                                      "input_scale": 0.0078125, "transpose": True}
    assert json.loads(meta["fcnify.labels"]) == ["no face", "face"]
    assert json.loads(meta["fcnify.box_head"]) == "conv4-2"
    assert json.loads(meta["fcnify.background_class"]) == 0


def test_card_options_resolve(tmp_path):
    """NET as a prototxt needs --weights (usage error, exit 2)."""
    run = call_fcnify("export", LENET_DEF, "--out", tmp_path / "l.onnx")
    assert run.code == 2 and "--weights" in run.err
    assert resolve_card(card=find_model("digits").card_path).name == "digits"


# ------------------------------------------------------------------ the check against Caffe

@pytest.fixture
def relu_as_abs(monkeypatch):
    """The exporter translating ReLU as Abs: a valid ONNX model (onnx.checker passes, every
    initializer the caffemodel's) that computes other scores than Caffe."""
    import fcnify.export as module
    real = module.to_onnx

    def wrong(*args, **kwargs):
        model = real(*args, **kwargs)
        relus = [n for n in model.graph.node if n.op_type == "Relu"]
        assert relus, "the digits net has a ReLU"
        relus[0].op_type = "Abs"
        return model
    monkeypatch.setattr(module, "to_onnx", wrong)


def test_export_that_differs_from_caffe_writes_nothing(relu_as_abs, tmp_path):
    """A translation that does not reproduce Caffe: exit 1, one line saying so, no file, nothing staged."""
    out = tmp_path / "digits.onnx"
    run = call_fcnify("export", "digits", "--out", out)
    assert run.code == 1, run
    assert "does NOT reproduce Caffe's outputs" in run.err and len(run.err.strip().splitlines()) == 1, run.err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotEquivalentError):  # the API the same
        export_onnx(find_model("digits"), out)
    assert list(tmp_path.iterdir()) == []


def test_no_verify_writes_unchecked_and_says_so(relu_as_abs, tmp_path):
    """--no-verify skips the check against Caffe (the wrong translation goes through) and the
    summary says it was not checked; onnx.checker still ran."""
    out = tmp_path / "digits.onnx"
    run = call_fcnify("export", "digits", "--out", out, "--no-verify")
    assert run.code == 0, run
    assert "NOT checked against Caffe" in run.out and "matches Caffe" not in run.out, run.out
    assert "passed onnx.checker" in run.out
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("Abs") == 1


def test_export_is_opset_17_and_checked(tmp_path):
    """The file declares ONNX opset 17 (README) in the default domain, and the summary says it
    matched Caffe on its sample inputs."""
    out = tmp_path / "digits.onnx"
    run = call_fcnify("export", "digits", "--out", out)
    assert run.code == 0, run
    model = onnx.load(str(out))
    assert {o.domain: o.version for o in model.opset_import} == {"": 17}
    assert "ONNX opset 17" in run.out
    assert re.search(r"matches Caffe on \d+ inputs, 8 parameter blobs identical", run.out), run.out
