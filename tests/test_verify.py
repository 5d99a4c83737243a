"""The equivalence criterion (bound.py, verify.py): the bound's arithmetic, and negative controls.

Each negative control is a conversion mistake a surgery could make; the
check must call it NOT EQUIVALENT from the outputs themselves (the scores
use many times their bound), not only from the parameter digests.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fcnify.surgery.bound import (U, abs_products, accumulation_length, factor, probability_tolerance, score_layer,
                          softmax, within)
from fcnify.caffe.caffemodel import read_weights, write_weights
from fcnify.caffe.netdef import parse_netdef, read_netdef, to_text
from fcnify.caffe.proto import caffe_pb2
from fcnify.surgery.verify import rank_agreement

from conftest import call_fcnify, write_model
from nets import NIN, small_net


# ------------------------------------------------------------------ the bound's parts, in numpy

def _layer(text: str):
    """A LayerParameter from prototxt text."""
    from google.protobuf import text_format
    return text_format.Parse(text, caffe_pb2().LayerParameter())


def _ip(text: str):
    return _layer(f'name: "l" type: "InnerProduct" inner_product_param {{ {text} }}')


def _conv(text: str):
    return _layer(f'name: "l" type: "Convolution" convolution_param {{ {text} }}')


def test_abs_products_of_an_inner_product_are_the_sum_of_absolute_terms():
    """A[n, j] = sum_i |W[j, i]| |x[n, i]| + |b[j]|, written out term by term (transpose too)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 2, 2)).astype(np.float32)
    w = rng.normal(size=(5, 12)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    expected = np.array([[sum(abs(float(w[j, i]) * float(x[n].ravel()[i])) for i in range(12)) + abs(float(b[j]))
                          for j in range(5)] for n in range(2)])
    assert np.allclose(abs_products(_ip("num_output: 5"), [w, b], x), expected, rtol=1e-12, atol=0)
    transposed = abs_products(_ip("num_output: 5 transpose: true"), [np.ascontiguousarray(w.T), b], x)
    assert np.allclose(transposed, expected, rtol=1e-12, atol=0)


def test_abs_products_of_a_convolution_match_a_direct_loop():
    """Grouped, strided, padded, dilated convolution of |x| with |W|: every output cell by hand."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 7, 8))
    w = rng.normal(size=(6, 2, 3, 2))
    b = rng.normal(size=6)
    layer = _conv("num_output: 6 group: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 "
                  "pad_w: 2 dilation: 2")
    got = abs_products(layer, [w, b], x)
    padded = np.pad(np.abs(x), ((0, 0), (0, 0), (1, 1), (2, 2)))
    oh, ow = (7 + 2 - 5) // 2 + 1, (8 + 4 - 3) // 1 + 1
    assert got.shape == (1, 6, oh, ow)
    for m in range(6):
        g = m // 3
        for r in range(oh):
            for c in range(ow):
                patch = padded[0, 2 * g:2 * g + 2, 2 * r:2 * r + 5:2, c:c + 3:2]
                assert math.isclose(got[0, m, r, c], float((np.abs(w[m]) * patch).sum()) + abs(b[m]),
                                    rel_tol=1e-12)


def test_accumulation_length_counts_terms_along_the_longest_path():
    """small net: conv1 75+1, conv2 72+1, fc6 784+1, fc7 32+1 terms, MAX pooling and ReLU exact, input 1."""
    net = parse_netdef(small_net("plain")).param
    assert accumulation_length(net, "fc7") == 1 + 76 + 73 + 785 + 33
    assert accumulation_length(net, "conv2") == 1 + 76 + 73
    nin = parse_netdef(NIN).param  # AVE global pooling over 28x28 sums 784 terms
    assert accumulation_length(nin, "gpool") == 1 + 76 + 9 + 785


def test_score_layer_follows_pooling_back_to_the_convolution():
    """NIN's scores are a global average of a 1x1 convolution: A is the largest A in the window."""
    net = parse_netdef(NIN).param
    rng = np.random.default_rng(2)
    weights = {"cccp1": [rng.normal(size=(10, 8, 1, 1)).astype(np.float32),
                         rng.normal(size=10).astype(np.float32)]}
    layer = score_layer(net, "gpool", weights)
    assert layer.layer.name == "cccp1" and [l.name for l, _ in layer.after] == ["gpool"]
    x = rng.normal(size=(1, 8, 28, 28)).astype(np.float32)
    a = abs_products(layer.layer, list(layer.params), x)
    assert np.allclose(layer.tolerance(x), factor(layer.length) * a.max(axis=(2, 3), keepdims=True))


def test_score_layer_refuses_what_it_cannot_bound():
    """Scores computed by a layer the bound does not follow (here Sigmoid) are named, not guessed."""
    text = small_net("plain") + 'layer { name: "sig" type: "Sigmoid" bottom: "fc7" top: "sig" }\n'
    with pytest.raises(ValueError, match=r"layer 'sig' \(Sigmoid\)"):
        score_layer(parse_netdef(text).param, "sig", {})


def test_bound_covers_float32_against_an_exact_sum():
    """A float32 matrix product of 4096-term rows is within half the bound of the float64 product."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, np.sqrt(2 / 4096), (1000, 4096)).astype(np.float32)
    x = np.maximum(rng.normal(0, 50, (4, 4096)), 0).astype(np.float32)
    b = rng.normal(0, 0.1, 1000).astype(np.float32)
    f32 = x @ w.T + b
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + b
    half = factor(4097) / 2 * abs_products(_ip("num_output: 1000"), [w, b], x)
    ok, used = within(f32, exact, half)
    assert ok and used > 0, used


def test_probability_tolerance_covers_any_score_change_within_the_bound():
    """Scores moved by up to T each: every probability moves by less than its derived bound,
    and the bound is not loose by more than a factor 10 at the worst element."""
    rng = np.random.default_rng(4)
    s = rng.normal(0, 3, (1, 50))
    t = np.full_like(s, 0.05)
    worst = 0.0
    for _ in range(200):
        moved = s + rng.uniform(-1, 1, s.shape) * t
        pa, pb = softmax(s), softmax(moved)
        ok, used = within(pa, pb, probability_tolerance(pa, pb, t))
        assert ok, used
        worst = max(worst, used)
    assert worst > 0.1


def test_rank_agreement_excuses_only_near_ties():
    """Top-1 swapped inside twice the bound: excused and counted; outside it: a failure."""
    a = np.array([5.0, 4.99, 1.0, 0.5, 0.2, 0.1, 0.0])
    b = np.array([4.99, 5.0, 1.0, 0.5, 0.2, 0.1, 0.0])
    assert rank_agreement(a, b, np.full(7, 0.01)) == (True, True, 1, 1)
    assert rank_agreement(a, b, np.full(7, 0.001)) == (False, True, 0, 0)
    c = a.copy()
    c[5] = 0.3  # class 5 enters the top-5 (ranks 5 and 6 are 0.1 apart)
    assert rank_agreement(a, c, np.full(7, 0.01))[1] is False
    assert rank_agreement(a, c, np.full(7, 0.2))[1:] == (True, 2, 1)


def test_within_treats_nan_and_infinity_as_unbounded():
    """NaN or inf anywhere proves nothing: not within, infinitely far."""
    a = np.array([1.0, 2.0])
    assert within(a, np.array([1.0, np.nan]), np.ones(2)) == (False, math.inf)
    assert within(a, np.array([1.0, np.inf]), np.ones(2)) == (False, math.inf)
    assert within(a, a + 0.5, np.ones(2)) == (True, 0.5)
    assert factor(1) == 2 * 6 * U


# ------------------------------------------------------------------ negative controls

@pytest.fixture(scope="module")
def small_fcn(tmp_path_factory):
    """The small classifier with seeded weights, converted: (original, weights, fcn prototxt, fcn weights)."""
    tmp = tmp_path_factory.mktemp("verify_small")
    proto, weights = write_model(tmp, "small", small_net("plain"))
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp / "small",
                      "--format", "json")
    assert run.code == 0, run.err
    doc = json.loads(run.out)
    assert doc["equivalent"] is True and doc["verification"]["comparisons"][0]["fraction"] <= 1
    return proto, weights, tmp / "small_full_conv.prototxt", tmp / "small_full_conv.caffemodel"


def _blobs(path):
    return {n: [np.array(b) for b in lw.blobs] for n, lw in read_weights(path).layers.items()}


def _verify(small_fcn, tmp_path, blobs=None, net=None) -> tuple[int, dict]:
    """`fcnify verify --format json` of the small net against an FCN with changed weights or layers."""
    proto, weights, fcn, fcn_weights = small_fcn
    net = net or read_netdef(fcn).param
    changed_proto, changed_weights = tmp_path / "changed.prototxt", tmp_path / "changed.caffemodel"
    changed_proto.write_text(to_text(net))
    with open(changed_weights, "wb") as f:
        write_weights(f, net, blobs or _blobs(fcn_weights))
    run = call_fcnify("verify", proto, changed_proto, "--weights", weights, "--fcn-weights", changed_weights,
                      "--format", "json")
    return run.code, json.loads(run.out)


def _scores(doc: dict) -> dict:
    (scores,) = [c for c in doc["comparisons"] if c["kind"] == "scores"]
    return scores


def _flipped(blobs, layer, transform):
    blobs[layer][0] = np.ascontiguousarray(transform(blobs[layer][0]))
    return blobs


CONTROLS = {  # name -> (change to the converted weights, parameter the digests name or None)
    "transposed fc6 kernels": (lambda b: _flipped(b, "fc6-conv", lambda w: w.transpose(0, 1, 3, 2)), "fc6-conv[0]"),
    "swapped input channels (RGB for BGR)": (lambda b: _flipped(b, "conv1", lambda w: w[:, ::-1]), "conv1[0]"),
    "fc6 bias dropped": (lambda b: b | {"fc6-conv": [b["fc6-conv"][0], np.zeros_like(b["fc6-conv"][1])]},
                         "fc6-conv[1]"),
    "fc7 weights shuffled within the layer": (
        lambda b: _flipped(b, "fc7-conv", lambda w: np.random.default_rng(0).permutation(w.ravel()).reshape(w.shape)),
        "fc7-conv[0]"),
}


@pytest.mark.parametrize("name", list(CONTROLS))
def test_negative_control_is_not_equivalent(small_fcn, tmp_path, name):
    """A wrong transplant: exit 1, NOT EQUIVALENT, the scores far outside the bound, the parameter named."""
    change, param = CONTROLS[name]
    code, doc = _verify(small_fcn, tmp_path, blobs=change(_blobs(small_fcn[3])))
    assert code == 1 and doc["equivalent"] is False
    assert _scores(doc)["fraction"] > 10, _scores(doc)
    assert param in doc["params_mismatched"]


def test_pooling_size_off_by_one_is_not_equivalent(small_fcn, tmp_path):
    """pool2 with a 3x3 window instead of 2x2 (same output size, same weights): caught by the outputs alone."""
    net = read_netdef(small_fcn[2]).param
    pool = next(l for l in net.layer if l.name == "pool2")
    pool.pooling_param.kernel_size = 3
    code, doc = _verify(small_fcn, tmp_path, net=net)
    assert code == 1 and doc["equivalent"] is False
    assert doc["params_mismatched"] == [] and doc["params_checked"] == 8
    assert _scores(doc)["fraction"] > 10, _scores(doc)


def test_unchanged_weights_are_equivalent_through_the_same_path(small_fcn, tmp_path):
    """The controls' own path with nothing changed: EQUIVALENT, exit 0 (the controls fail for their change)."""
    code, doc = _verify(small_fcn, tmp_path)
    assert code == 0 and doc["equivalent"] is True and doc["params_mismatched"] == []
    assert 0 <= _scores(doc)["fraction"] <= 1


# ------------------------------------------------------------------ the report

def test_text_report_gives_the_bound_its_share_and_the_saturation(small_fcn):
    """The text report names N, the largest difference, the bound there, the share used, and the
    inputs' top probabilities; the same numbers as the JSON document."""
    proto, weights, fcn, fcn_weights = small_fcn
    text = call_fcnify("verify", proto, fcn, "--weights", weights)
    doc = json.loads(call_fcnify("verify", proto, fcn, "--weights", weights, "--format", "json").out)
    assert text.code == 0 and "\n  result: EQUIVALENT" in text.out
    assert "N = 968 terms" in text.out and doc["criterion"]["accumulation_length"] == 968
    scores = _scores(doc)
    assert (f"fc7 vs fc7-conv (scores): largest difference {scores['max_abs']:.3g}, bound there "
            f"{scores['bound']:.3g}: {scores['fraction']:.3g} of the bound") in text.out
    tops = doc["top_probability"]
    assert f"inputs' top probability: {min(tops):.4g} to {max(tops):.4g}" in text.out
    saturated = sum(p > 0.999 for p in tops[:len(tops) - len(doc["added_for_saturation"])])
    assert (f"{saturated} of 4 sample inputs saturated" in text.out) == (saturated > 0)
    assert len(doc["inputs"]) == 4 + len(doc["added_for_saturation"])


def test_convert_json_when_not_equivalent(small_fcn, tmp_path, monkeypatch):
    """convert --format json on a wrong transplant: the whole report as one JSON document, exit 1."""
    import importlib
    module = importlib.import_module("fcnify.convert")
    real = module.transplant

    def shuffled_fc7(surgery, weights, checked=None):
        blobs, provenance = real(surgery, weights, checked)
        w = blobs["fc7-conv"][0]
        blobs["fc7-conv"][0] = np.random.default_rng(1).permutation(w.ravel()).reshape(w.shape)
        return blobs, provenance

    monkeypatch.setattr(module, "transplant", shuffled_fc7)
    proto, weights, _, _ = small_fcn
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "bad",
                      "--format", "json")
    assert run.code == 1 and "does NOT reproduce" in run.err
    doc = json.loads(run.out)  # one document, nothing else on stdout
    assert doc["equivalent"] is False and doc["verification"]["equivalent"] is False
    assert _scores(doc["verification"])["fraction"] > 10
    assert [c["layer"] for c in doc["conversions"] if c["kind"] == "inner_product"] == ["fc6", "fc7"]
    assert sorted(doc["outputs"]) == ["caffemodel", "card", "prototxt"]


def _strict_json(text: str) -> dict:
    """json.loads that refuses Infinity and NaN, as strict JSON readers (jq, JavaScript) do."""
    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_json_writes_infinite_and_nan_differences_as_strings(small_fcn, tmp_path):
    """fc7 weights scaled by 1e38 (finite, so the weights pass their check) overflow the FCN's
    scores to infinity: verify --format json is still strict JSON (exit 1), with the scores' largest
    difference and its fraction of the bound as strings."""
    proto, weights, fcn, fcn_weights = small_fcn
    blobs = _blobs(fcn_weights)
    blobs["fc7-conv"][0] = (blobs["fc7-conv"][0].astype(np.float64) * 1e38).astype(np.float32)
    assert np.isfinite(blobs["fc7-conv"][0]).all()
    net = read_netdef(fcn).param
    changed_proto, changed_weights = tmp_path / "inf.prototxt", tmp_path / "inf.caffemodel"
    changed_proto.write_text(to_text(net))
    with open(changed_weights, "wb") as f:
        write_weights(f, net, blobs)
    run = call_fcnify("verify", proto, changed_proto, "--weights", weights, "--fcn-weights", changed_weights,
                      "--format", "json")
    assert run.code == 1, run.err
    doc = _strict_json(run.out)
    assert doc["equivalent"] is False
    scores = _scores(doc)
    assert scores["max_abs"] in ("inf", "nan") and scores["fraction"] in ("inf", "nan"), scores
