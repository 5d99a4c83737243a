"""fcnify's shipped models and model cards."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fcnify.io.models import IMAGENET_MEAN_BGR, default_card, find_model, read_card, shipped_models
from fcnify.caffe.netdef import read_netdef
from fcnify.io.preprocess import Preprocess, load_mean

from float_bound import gamma


def test_shipped_models():
    """fcnify ships caffenet (definition only) and digits (trained weights)."""
    assert set(shipped_models()) == {"caffenet", "digits"}
    digits = find_model("digits")
    assert digits.weights.is_file() and digits.background_class == 10


def test_caffenet_definition_matches_caffe(caffe_root):
    """prototxt/caffenet/deploy.prototxt equals Caffe's reference deploy net layer for layer."""
    ours = read_netdef(find_model("caffenet").model_def).param
    theirs = read_netdef(caffe_root / "models" / "bvlc_reference_caffenet" / "deploy.prototxt").param
    assert [l.name for l in ours.layer] == [l.name for l in theirs.layer]
    for a, b in zip(ours.layer, theirs.layer):
        assert a == b, f"layer {a.name} differs"


def test_caffenet_card_mean_from_caffe(caffe_root):
    """The CaffeNet card's mean is the per-channel mean of Caffe's ilsvrc_2012_mean.npy (BGR)."""
    npy = caffe_root / "python" / "caffe" / "imagenet" / "ilsvrc_2012_mean.npy"
    arr = np.load(npy)
    expected = arr.reshape(3, -1).mean(axis=1)
    card = find_model("caffenet")
    assert card.preprocess.channels == "BGR" and card.preprocess.raw_scale == 255.0
    assert np.allclose(card.preprocess.mean, expected, atol=1e-6)
    assert np.allclose(IMAGENET_MEAN_BGR, expected, atol=1e-6)
    assert np.allclose(load_mean(npy, 3), expected)
    assert card.labels == "imagenet"


def test_caffenet_weights_location(monkeypatch, tmp_path):
    """CaffeNet's card looks for its weights where `fcnify fetch caffenet` puts them."""
    monkeypatch.setenv("FCNIFY_MODELS", str(tmp_path))
    card = find_model("caffenet")
    assert card.weights == tmp_path / "bvlc_reference_caffenet" / "bvlc_reference_caffenet.caffemodel"


def test_preprocess_matches_caffe_transformer(caffe_root):
    """Preprocess.apply equals pycaffe's Transformer with the same settings (CaffeNet's)."""
    import caffe
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (31, 17, 3), dtype=np.uint8)
    pre = find_model("caffenet").preprocess
    t = caffe.io.Transformer({"data": (1, 3, 31, 17)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.asarray(pre.mean))
    expected = t.preprocess("data", rgb.astype(np.float32) / 255.0)
    # each side rounds at most three times in float32 (/255, *255, - mean; fcnify: *1, - mean) values
    # of at most |pixel| + |mean|: each is within gamma(3) of that of the exact result (float_bound.py)
    bound = 2 * gamma(3) * (rgb.transpose(2, 0, 1)[::-1] + np.abs(np.asarray(pre.mean))[:, None, None])
    assert (np.abs(pre.apply(rgb).astype(np.float64) - expected) <= bound).all()


def test_gray_preprocess_and_scale():
    """Grey models get BT.601 luma, then mean and input_scale (digits: ink -> 1, paper -> 0)."""
    pre = Preprocess(channels="gray", raw_scale=1.0, mean=(1.0,), input_scale=-1.0)
    img = np.zeros((2, 2, 3), np.uint8)
    img[0, 0] = 255
    img[1, 1] = (255, 0, 0)
    out = pre.apply(img)
    assert out.shape == (1, 2, 2)
    assert out[0, 0, 0] == pytest.approx(0.0) and out[0, 0, 1] == pytest.approx(1.0)
    assert out[0, 1, 1] == pytest.approx(1.0 - 0.299, abs=1e-6)


def test_card_round_trip(tmp_path):
    """A card written with relative paths reads back to the same model."""
    proto = tmp_path / "net.prototxt"
    proto.write_text("x")
    card = default_card(proto, tmp_path / "net.caffemodel", 3, 1000)
    path = tmp_path / "net.json"
    path.write_text(json.dumps(card.to_dict(relative_to=tmp_path)))
    back = read_card(path)
    assert back.model_def == proto and back.weights == tmp_path / "net.caffemodel"
    assert back.preprocess == card.preprocess and back.labels == "imagenet"


def test_mean_file_wrong_shape(tmp_path):
    """A mean .npy of the wrong shape is refused with the file's name and the shapes."""
    from fcnify.errors import InputError
    bad = tmp_path / "mean.npy"
    np.save(bad, np.zeros((4, 5, 5), np.float32))
    with pytest.raises(InputError, match=r"mean.npy.*\(4, 5, 5\)"):
        load_mean(bad, 3)
