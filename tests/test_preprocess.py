"""Preprocessing: Caffe's terms as options, resolved over the card, and bad values refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import call_fcnify
from fcnify.errors import InputError
from fcnify.io.preprocess import (Preprocess, default_preprocess, load_binaryproto_mean, load_mean,
                               parse_mean, resolve_preprocess)
from realdata import LENET_DEF, LENET_WEIGHTS


def write_binaryproto(path, array: np.ndarray, legacy: bool = False) -> None:
    """A Caffe mean file (BlobProto) written with fcnify's own protobuf messages."""
    from fcnify.caffe.proto import caffe_pb2
    blob = caffe_pb2().BlobProto()
    if legacy:
        blob.num, blob.channels, blob.height, blob.width = array.shape
    else:
        blob.shape.dim.extend(array.shape)
    blob.data.extend(array.ravel().tolist())
    path.write_bytes(blob.SerializeToString())


def test_explicit_options_win_over_the_card():
    """Each option given replaces the card's value; those not given keep it."""
    card = Preprocess(channels="BGR", raw_scale=255.0, mean=(1.0, 2.0, 3.0), input_scale=2.0)
    pre = resolve_preprocess(card, channels="rgb", input_scale=0.5)
    assert pre == Preprocess(channels="RGB", raw_scale=255.0, mean=(1.0, 2.0, 3.0), input_scale=0.5)
    assert resolve_preprocess(card) == card
    assert resolve_preprocess(card, mean="7", transpose=True).mean == (7.0,)


def test_defaults_follow_the_channel_count():
    """Without a card: grey 0-255 for 1 channel, BGR minus the ImageNet mean for 3."""
    assert default_preprocess(1) == Preprocess(channels="gray", raw_scale=255.0)
    assert default_preprocess(3).channels == "BGR" and len(default_preprocess(3).mean) == 3


def test_mtcnn_formula_and_transpose():
    """RGB, (x - 127.5) * 0.0078125 and transposed: blob[c, j, i] = f(image[i, j, c])."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    pre = resolve_preprocess(default_preprocess(3), channels="rgb", mean="127.5",
                             input_scale=0.0078125, transpose=True)
    x = pre.apply(img)
    assert x.shape == (3, 7, 5)
    expected = (img.astype(np.float64) - 127.5) * 0.0078125
    assert np.array_equal(x, expected.transpose(2, 1, 0).astype(np.float32))


def test_lenet_scale():
    """LeNet's 1/256: grey 0-255 times 0.00390625 (white R=G=B pixels keep their value)."""
    img = np.full((2, 2, 3), 128, np.uint8)
    pre = resolve_preprocess(default_preprocess(1), input_scale=0.00390625)
    assert pre.apply(img) == pytest.approx(np.full((1, 2, 2), 0.5), abs=1e-6)


def test_mean_numbers_npy_and_binaryproto_agree(tmp_path):
    """104,117,123 as numbers, a (3,) .npy, a 3xHxW .npy and a binaryproto (new and legacy shape)."""
    image = np.stack([np.full((4, 6), v, np.float32) for v in (104.0, 117.0, 123.0)])
    image[0, 0, 0] += 24.0  # one pixel moves channel 0's mean by 1
    np.save(tmp_path / "vec.npy", np.array([105.0, 117.0, 123.0]))
    np.save(tmp_path / "img.npy", image)
    write_binaryproto(tmp_path / "mean.binaryproto", image[None])
    write_binaryproto(tmp_path / "legacy.binaryproto", image[None], legacy=True)
    expected = (105.0, 117.0, 123.0)
    assert parse_mean("105,117,123")[0] == expected
    for name in ("vec.npy", "img.npy", "mean.binaryproto", "legacy.binaryproto"):
        values, source = parse_mean(str(tmp_path / name))
        assert values == pytest.approx(expected, abs=1e-4) and source == tmp_path / name


def test_one_mean_value_for_all_channels(tmp_path):
    """A (1,) .npy (like the card's [127.5]) is one mean for every channel (issue 16, item 15)."""
    np.save(tmp_path / "one.npy", np.array([127.5]))
    assert load_mean(tmp_path / "one.npy", 3) == (127.5,)
    pre = resolve_preprocess(default_preprocess(3), mean=str(tmp_path / "one.npy"))
    x = pre.apply(np.full((1, 1, 3), 128, np.uint8))
    assert np.array_equal(x.ravel(), np.full(3, 0.5, np.float32))


@pytest.mark.parametrize("kwargs, message", [
    ({"mean": "1,2"}, "mean has 2 values for 3 channel"),
    ({"raw_scale": 0.0}, "raw_scale must be a finite number other than 0"),
    ({"input_scale": 0.0}, "input_scale must be a finite number other than 0"),
    ({"input_scale": float("nan")}, "input_scale must be a finite number"),
    ({"channels": "hsv"}, "give rgb, bgr or gray"),
    ({"mean": "nosuchfile.npy"}, "no such file"),
])
def test_bad_values_are_refused(kwargs, message):
    """Wrong channel count, a zero scale, an unknown order, a missing file: InputError."""
    with pytest.raises(InputError, match=message):
        resolve_preprocess(default_preprocess(3), **kwargs)


def test_corrupt_binaryproto_is_refused(tmp_path):
    """Bytes that are no BlobProto, and a BlobProto whose shape and data disagree, name the file."""
    bad = tmp_path / "bad.binaryproto"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\x0f garbage")
    with pytest.raises(InputError, match="not a Caffe mean .binaryproto"):
        load_binaryproto_mean(bad)
    short = tmp_path / "short.binaryproto"
    from fcnify.caffe.proto import caffe_pb2
    blob = caffe_pb2().BlobProto()
    blob.shape.dim.extend([1, 3, 2, 2])
    blob.data.extend([1.0] * 5)
    short.write_bytes(blob.SerializeToString())
    with pytest.raises(InputError, match=r"shape \[1, 3, 2, 2\] holds 12 values, the file 5"):
        load_binaryproto_mean(short)


def test_card_round_trip_keeps_transpose():
    """transpose travels in the card; a card without it means False."""
    pre = Preprocess(channels="RGB", mean=(127.5,), input_scale=0.0078125, transpose=True)
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert Preprocess.from_dict({"channels": "RGB"}).transpose is False


@pytest.mark.parametrize("args, message", [
    (["--mean", "104,117,123"], "mean has 3 values for 1 channel"),
    (["--raw-scale", "0"], "raw_scale must be a finite number other than 0"),
    (["--channels", "rgb"], "the net takes 1 channel(s)"),
])
def test_convert_bad_values_one_line_exit_2(tmp_path, args, message):
    """convert with a bad preprocessing value: exit 2, one line, nothing written."""
    run = call_fcnify("convert", "--model-def", LENET_DEF, "--weights", LENET_WEIGHTS,
                      "--out", tmp_path / "lenet", *args)
    assert run.code == 2
    assert run.err.count("\n") == 1 and run.err.startswith("fcnify: error:") and message in run.err
    assert list(tmp_path.iterdir()) == []


def test_classify_map_corrupt_binaryproto_one_line(tmp_path):
    """classify-map --mean with a corrupt binaryproto: exit 2, one line naming the file."""
    bad = tmp_path / "mean.binaryproto"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\x0f garbage")
    img = tmp_path / "x.png"
    from PIL import Image
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    run = call_fcnify("classify-map", img, "--model-def", LENET_DEF, "--weights", LENET_WEIGHTS,
                      "--mean", bad, "--out", tmp_path / "maps")
    assert run.code == 2
    assert run.err.count("\n") == 1 and "mean.binaryproto" in run.err and "binaryproto" in run.err
    assert not (tmp_path / "maps").exists() or not any((tmp_path / "maps").iterdir())


def test_channel_order_against_a_kept_mean_says_whose_mean():
    """--channels gray over a 3-value mean: the message does not claim a card when there is none."""
    from fcnify.errors import InputError
    from fcnify.io.preprocess import default_preprocess, resolve_preprocess
    with pytest.raises(InputError) as caught:
        resolve_preprocess(default_preprocess(3), channels="gray")
    assert "3-value mean it would keep (the card's, or without a card Caffe's default)" in str(caught.value)
    assert "give --mean as well" in str(caught.value)
