"""Nets whose classifier sits after a global pooling (NIN, SqueezeNet), made dense.

The pooling is frozen to its kernel at the declared input size, stride 1,
whatever follows it; then each cell of a larger input's map is the original
net on the crop under the cell (the nets here have no padding, so crop and
cell compute the same sums, in different orders).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import call_fcnify, write_model
from fcnify.surgery.bound import factor
from float_bound import rounding_bound
from nets import input_layer, layer_text, pycaffe

TRUNK = (
    'name: "tiny_nin"\n' + input_layer(1, 3, 16, 16)
    + layer_text("conv1", "Convolution", "data", "conv1", "convolution_param { num_output: 8 kernel_size: 5 }")
    + layer_text("relu1", "ReLU", "conv1", "conv1")
    + layer_text("pool1", "Pooling", "conv1", "pool1", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
    + layer_text("conv2", "Convolution", "pool1", "conv2", "convolution_param { num_output: 16 kernel_size: 3 }")
    + layer_text("relu2", "ReLU", "conv2", "conv2")
    + layer_text("cccp", "Convolution", "conv2", "cccp", "convolution_param { num_output: 10 kernel_size: 1 }")
    + layer_text("gpool", "Pooling", "cccp", "gpool", "pooling_param { pool: AVE global_pooling: true }")
)
HEADS = {  # what follows the global pooling -> (prototxt, blob scored before Softmax)
    "softmax": (layer_text("prob", "Softmax", "gpool", "prob"), "gpool"),
    "convolution": (layer_text("cls", "Convolution", "gpool", "cls",
                               "convolution_param { num_output: 6 kernel_size: 1 }")
                    + layer_text("prob", "Softmax", "cls", "prob"), "cls"),
    "nothing": ("", "gpool"),
}


def bound_layers(net, head: str) -> list[tuple]:
    p = {k: [b.data.copy() for b in v] for k, v in net.params.items()}
    layers = [("conv", *p["conv1"]), ("relu",), ("max", 2, 2), ("conv", *p["conv2"]), ("relu",),
              ("conv", *p["cccp"]), ("ave", 4, 1)]
    return layers + ([("conv", *p["cls"])] if head == "convolution" else [])


@pytest.mark.parametrize("head", list(HEADS))
def test_global_pooling_head_made_dense(tmp_path, head):
    """convert freezes gpool (4x4, stride 1), verifies it, and each cell of a 40-px map = the net on its crop."""
    import fcnify
    text, score = HEADS[head]
    proto, weights = write_model(tmp_path, "nin", TRUNK + text, seed=4)
    info = call_fcnify("info", proto)
    assert info.code == 0, info.err
    assert "gpool: global pooling frozen to a 4x4 kernel, stride 1" in info.out
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "nin")
    assert run.code == 0, run.err
    assert "gpool: global pooling frozen to a 4x4 kernel, stride 1" in run.out
    assert "result: EQUIVALENT" in run.out and "stride:          2 px" in run.out
    card = fcnify.read_card(tmp_path / "nin_full_conv.json")
    rgb = np.random.default_rng(7).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    model = fcnify.DenseModel(card)
    try:
        scores, _ = model.run_scores(rgb)
    finally:
        model.close()
    assert scores.shape[1:] == (13, 13)  # 40 -> conv 36 -> pool 18 -> conv 16 -> 4x4 pool 13
    crops = np.stack([card.preprocess.apply(rgb[2 * r:2 * r + 16, 2 * c:2 * c + 16])
                      for r in range(13) for c in range(13)])
    caffe = pycaffe()
    net = caffe.Net(str(proto), str(weights), caffe.TEST)
    net.blobs["data"].reshape(*crops.shape)
    net.blobs["data"].data[...] = crops
    net.forward()
    original = net.blobs[score].data.reshape(len(crops), -1)
    layers = bound_layers(net, head)
    for i in range(len(crops)):
        r, c = divmod(i, 13)
        bound = 2 * rounding_bound(layers, crops[i]).ravel()
        diff = np.abs(scores[:, r, c].astype(np.float64) - original[i])
        assert (diff <= bound).all(), f"cell ({r}, {c}): diff {diff.max():.3g} over {bound.max():.3g}"
    assert np.ptp(scores, axis=(1, 2)).min() > 0  # the cells differ: the map is not one value repeated


def test_global_pooling_net_maps_in_memory(tmp_path):
    """classify-map on the unconverted net converts it in memory and gives the 13x13 map, not 1x1."""
    from PIL import Image
    text, _ = HEADS["softmax"]
    proto, weights = write_model(tmp_path, "nin", TRUNK + text, seed=4)
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
        tmp_path / "x.png")
    run = call_fcnify("classify-map", tmp_path / "x.png", "--model-def", proto, "--weights", weights,
                      "--format", "json")
    assert run.code == 0, run.err
    import json
    doc = json.loads(run.out)
    assert (doc["map"]["rows"], doc["map"]["cols"]) == (13, 13)


def _onnx_outputs(model: "Path", x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"data": x[None]})))


def test_softmax_setting_agrees_in_files_json_text_and_onnx(tmp_path):
    """A net ending in its global pooling (no Softmax, as SqueezeNet's pool_final): under
    --softmax on, off and auto (the card's), scores.npy, --format json, the text and the
    exported ONNX say and give the same thing, to the float32 bound of the scores."""
    import json
    from PIL import Image
    import fcnify
    pytest.importorskip("onnxruntime")
    proto, weights = write_model(tmp_path, "squeeze", TRUNK, seed=4)
    assert call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "sq",
                       "--no-verify").code == 0
    card_file = tmp_path / "sq_full_conv.json"
    card = fcnify.read_card(card_file)
    rgb = np.random.default_rng(7).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    x = card.preprocess.apply(rgb)
    caffe = pycaffe()
    bound = 2 * rounding_bound(bound_layers(caffe.Net(str(proto), str(weights), caffe.TEST), "nothing"), x)
    spread = bound.max(axis=0)  # per cell: the largest score error between the two runs
    for setting in ("on", "off"):
        out = tmp_path / setting
        run = call_fcnify("classify-map", tmp_path / "x.png", "--card", card_file, "--softmax", setting,
                          "--out", out, "--format", "json")
        assert run.code == 0, run.err
        doc = json.loads(run.out)
        applied = setting == "on"
        assert doc["map"]["softmax"] == {"applied": applied, "by": "fcnify" if applied else None,
                                         "layer": None, "scores": "gpool"}
        npy = np.load(out / "x.scores.npy").astype(np.float64)
        text = call_fcnify("classify-map", tmp_path / "x.png", "--card", card_file, "--softmax", setting)
        assert ("applied by fcnify (the net has none" if applied else "raw scores of 'gpool', no Softmax") \
            in text.out
        onnx_file = tmp_path / f"{setting}.onnx"
        assert call_fcnify("export", card_file, "--out", onnx_file, "--softmax", setting,
                           "--no-verify").code == 0
        import onnx
        meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
        assert json.loads(meta["fcnify.softmax"])["applied"] is applied
        outputs = _onnx_outputs(onnx_file, x)
        assert set(outputs) == ({"gpool", "gpool_softmax"} if applied else {"gpool"})
        got = outputs[meta["fcnify.class_output"]][0].astype(np.float64)
        assert got.shape == npy.shape == (10, 13, 13)
        if applied:
            # fcnify's float32 Softmax over 10 classes: an exp, a sum of 10, a division (bound.py)
            assert np.abs(npy.sum(axis=0) - 1).max() <= factor(10 + 2)
            # p = exp(s - lse(s)): score errors of at most `spread` move p by a factor exp(2 spread);
            # each Softmax adds a few float32 roundings of its own (exp, sum, divide: 16 u) and may
            # flush values under float32's smallest normal to 0
            tolerance = np.maximum(got, npy) * (np.expm1(2 * spread) + 16 * 2.0 ** -24) + 2.0 ** -126
            assert (np.abs(got - npy) <= tolerance).all()
        else:
            assert (np.abs(got - npy) <= bound).all()
    # auto follows the card; a card written with --softmax off maps raw scores
    assert call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "raw",
                       "--no-verify", "--softmax", "off").code == 0
    run = call_fcnify("classify-map", tmp_path / "x.png", "--card", tmp_path / "raw_full_conv.json",
                      "--format", "json")
    assert json.loads(run.out)["map"]["softmax"]["applied"] is False


def test_softmax_off_on_a_net_with_its_own_gives_its_scores(tmp_path):
    """--softmax off on a net ending in Softmax maps the scores before it (equal to run_scores),
    says so; --detect with it is refused in one line (it thresholds probabilities), exit 2."""
    import json
    from PIL import Image
    import fcnify
    text, _ = HEADS["convolution"]
    proto, weights = write_model(tmp_path, "nin", TRUNK + text, seed=4)
    assert call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "n",
                       "--no-verify").code == 0
    card = tmp_path / "n_full_conv.json"
    rgb = np.random.default_rng(7).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    run = call_fcnify("classify-map", tmp_path / "x.png", "--card", card, "--softmax", "off", "--out",
                      tmp_path / "o", "--format", "json")
    assert run.code == 0, run.err
    assert json.loads(run.out)["map"]["softmax"] == {"applied": False, "by": None, "layer": "prob",
                                                     "scores": "cls"}
    with fcnify.DenseModel(fcnify.read_card(card)) as model:
        scores, _ = model.run_scores(rgb)
    assert np.array_equal(np.load(tmp_path / "o" / "x.scores.npy"), scores)
    on = call_fcnify("classify-map", tmp_path / "x.png", "--card", card, "--format", "json")
    assert json.loads(on.out)["map"]["softmax"]["by"] == "net"
    refused = call_fcnify("classify-map", tmp_path / "x.png", "--card", card, "--softmax", "off", "--detect")
    assert refused.code == 2 and refused.err.count("\n") == 1 and "--softmax off" in refused.err


def test_one_step_export_makes_the_net_dense_and_writes_its_preprocessing(tmp_path):
    """export of the unconverted global-pooling net runs convert's surgery: the file maps a 40-px
    input to 13x13 (not 1x1), as its metadata's geometry says; preprocessing options given to
    export are in the metadata (LeNet's 1/256 scale would otherwise be lost)."""
    import json
    onnx = pytest.importorskip("onnx")
    proto, weights = write_model(tmp_path, "squeeze", TRUNK, seed=4)
    out = tmp_path / "sq.onnx"
    run = call_fcnify("export", proto, "--weights", weights, "--out", out, "--input-scale", "0.00390625",
                      "--channels", "rgb")
    assert run.code == 0, run.err
    assert "converted to fully convolutional" in run.out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    pre = json.loads(meta["fcnify.preprocess"])
    assert (pre["input_scale"], pre["channels"]) == (0.00390625, "RGB")
    assert json.loads(meta["fcnify.geometry"])["stride"] == [2, 2]
    x = np.random.default_rng(0).normal(0, 50, (3, 40, 40)).astype(np.float32)
    assert _onnx_outputs(out, x)["gpool"].shape == (1, 10, 13, 13)
