"""verify refuses two nets that do not correspond, before Caffe runs either (correspond.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import call_fcnify
from fcnify.surgery.correspond import check_correspondence
from fcnify.errors import NetDefinitionError
from fcnify.caffe.netdef import parse_netdef, to_text
from fcnify.surgery.surgery import convert_net
from nets import small_net
from realdata import mtcnn_net


def _check(original_text: str, fcn_text: str) -> None:
    original = parse_netdef(original_text, Path("orig.prototxt"))
    check_correspondence(original, parse_netdef(fcn_text, Path("fcn.prototxt")), convert_net(original))


def _fcn(text: str) -> str:
    return to_text(convert_net(parse_netdef(text)).net)


def test_own_conversion_corresponds():
    """fcnify's conversion of a net corresponds to it."""
    _check(small_net(), _fcn(small_net()))


def test_hand_named_fcn_corresponds():
    """A hand-made FCN whose converted layers have other names still corresponds (shapes in order)."""
    _check(small_net(), _fcn(small_net()).replace("fc6-conv", "conv6").replace("fc7-conv", "conv7"))


def test_other_widths_are_named():
    """An FCN of another net (other widths): the first layer that differs is named, with both shapes."""
    other = small_net().replace("num_output: 8 kernel_size: 5", "num_output: 6 kernel_size: 5")
    with pytest.raises(NetDefinitionError, match=r"fcn.prototxt: does not correspond to orig.prototxt: "
                                                 r"layer 'conv1' has parameters 8x3x5x5, 8, its "
                                                 r"counterpart 'conv1' here has 6x3x5x5, 6"):
        _check(small_net(), _fcn(other))


def test_other_input_channels_are_named():
    """An FCN that takes 1 channel where the original takes 3 is refused on its input."""
    grey = _fcn(small_net()).replace("dim: 3", "dim: 1", 1)
    with pytest.raises(NetDefinitionError, match=r"input 'data' has 1 channel\(s\), the original's has 3"):
        _check(small_net(), grey)


def test_other_class_count_is_named():
    """An FCN with 12 classes for a 10-class original is refused on its parameters."""
    twelve = _fcn(small_net().replace("num_output: 10 }", "num_output: 12 }"))
    with pytest.raises(NetDefinitionError, match=r"layer 'fc7' has parameters 10x32x1x1, 10 \(as converted\)"):
        _check(small_net(), twelve)


def test_verify_of_unrelated_mtcnn_nets_is_one_line(tmp_path):
    """verify det2 det3_full_conv (the issue's case) names the mismatch instead of a Caffe abort."""
    det2, det2_weights = mtcnn_net(2)
    det3, det3_weights = mtcnn_net(3)
    made = call_fcnify("convert", "--model-def", det3, "--weights", det3_weights,
                       "--out", tmp_path / "det3", "--no-verify")
    assert made.code == 0, made.err
    run = call_fcnify("verify", det2, tmp_path / "det3_full_conv.prototxt", "--weights", det2_weights)
    assert run.code == 2, run.err
    assert run.out == "" and len(run.err.strip().splitlines()) == 1
    assert "aborted" not in run.err and "does not correspond to" in run.err
    assert f"{det2}" in run.err and "layer 'conv1' has parameters 28x3x3x3" in run.err
