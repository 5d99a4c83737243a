"""The equivalence bound (fcnify.surgery.bound) for the tests' own comparisons of score maps.

Two computations of the same map that may sum in different orders (whole
image vs tiles, Caffe vs torch, InnerProduct vs Convolution) are compared
against the float32 accumulation bound of docs/verify.md, never a constant.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from fcnify.surgery.bound import ScoreLayer, score_layer
from fcnify.caffe.caffemodel import read_weights
from fcnify.caffe.netdef import read_netdef


@lru_cache(maxsize=4)
def scores_of(model_def: Path, weights: Path, blob: str) -> ScoreLayer:
    """The score layer of a net on disk (weights read once per file)."""
    return score_layer(read_netdef(model_def).param, blob, read_weights(weights))


_MODEL_SCORES: dict[tuple[bytes, str, str], ScoreLayer] = {}


def model_scores(model) -> ScoreLayer:
    """The score layer a DenseModel runs (its own net: an à trous rewrite's for a finer --stride),
    with the card's weights (read once per net, weights and blob)."""
    key = (model.netdef.param.SerializeToString(), str(model.card.weights), model.score_blob)
    if key not in _MODEL_SCORES:
        _MODEL_SCORES[key] = score_layer(model.netdef.param, model.score_blob, read_weights(model.card.weights))
    return _MODEL_SCORES[key]


def map_bound(model, rgb: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Per-score bound (classes x rows x cols) for a DenseModel's map of `rgb`, from one whole-image pass.

    The score layer is the one the model runs (an à trous rewrite's, for a
    finer --stride). A shift-and-stitched model (model.shifts > 1) gets one
    pass per offset, interleaved as cell (r, c) is: the pass on the image
    shifted by ((r % f) * S, (c % f) * S), its cell (r // f, c // f); `shape`
    is then the stitched map's (classes, rows, cols).
    """
    scores = model_scores(model)

    def one_pass(part: np.ndarray) -> np.ndarray:
        x = model.card.preprocess.apply(part)[None]
        bottom = model.net.forward({model.input_blob: x}, [scores.bottom])[scores.bottom]
        return scores.tolerance(bottom)[0]

    f = model.shifts
    if f == 1:
        return one_pass(rgb)
    if shape is None:
        raise ValueError("a shift-and-stitched map's bound needs the map's shape")
    step = model.geometry.stride[0]
    out = np.empty(shape)
    for i in range(f):
        for j in range(f):
            want = out[:, i::f, j::f]
            want[...] = one_pass(rgb[i * step:, j * step:])[:, :want.shape[1], :want.shape[2]]
    return out


# ------------------------------------------------------------------ every blob of a net, Caffe vs torch

def _window_max(m: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Largest value within `size` neighbours along `axis` (centred, as LRN's window)."""
    pre = (size - 1) // 2
    out = m.copy()
    for shift in range(-pre, size - pre):
        if shift:
            rolled = np.roll(m, shift, axis=axis)
            idx = [slice(None)] * m.ndim
            idx[axis] = slice(0, shift) if shift > 0 else slice(shift, None)
            rolled[tuple(idx)] = 0  # no wrap-around
            np.maximum(out, rolled, out=out)
    return out


def _magnitude(layer, ms: list[np.ndarray], values: list[np.ndarray], params: list[np.ndarray]) -> list[np.ndarray]:
    """M of each top, from the bottoms' M (each >= |bottom|) and values: a bound on |top| and on how
    far an error of M * factor in the bottoms moves the top (the layer's gain times M)."""
    from fcnify.surgery.bound import _pool_max, abs_products
    from fcnify.caffe.shapes import canonical_axis
    t, m = layer.type, ms[0] if ms else None
    if t in ("InnerProduct", "Convolution"):
        return [abs_products(layer, params, values[0])]  # reset at each accumulating layer (docs/verify.md)
    if t in ("ReLU", "Dropout", "TanH"):
        return [m + (1.0 if t == "TanH" else 0.0)]  # gain <= 1; tanh rounds a value of at most 1
    if t == "Sigmoid":
        return [m / 4 + 1.0]
    if t == "PReLU":  # x or a * x: gain max(1, |a|) per channel
        slope = np.maximum(1.0, np.abs(params[0].astype(np.float64)))
        return [m * (slope.reshape(1, -1, *([1] * (m.ndim - 2))) if slope.size > 1 else float(slope.max()))]
    if t == "Split":
        return [m] * len(layer.top)
    if t in ("Flatten", "Reshape"):
        return [m]  # reshaped to the top's shape by blob_bounds
    if t == "Pooling":
        return [_pool_max(layer.pooling_param, m)]
    if t == "LRN":
        p = layer.lrn_param
        if p.norm_region == 0:
            window = _window_max(m, 1, p.local_size)
        else:
            window = _window_max(_window_max(m, 2, p.local_size), 3, p.local_size)
        k = p.k if p.norm_region == 0 else 1.0
        return [window * k ** -p.beta * (1 + 2 * p.beta)]
    if t == "Concat":
        p = layer.concat_param
        axis = p.concat_dim if p.HasField("concat_dim") else p.axis
        return [np.concatenate(ms, axis=canonical_axis(axis, ms[0].ndim, "axis"))]
    if t == "Eltwise":
        op, coeffs = layer.eltwise_param.operation, list(layer.eltwise_param.coeff) or [1.0] * len(ms)
        if op == 1:  # SUM
            return [sum(abs(c) * mi for c, mi in zip(coeffs, ms))]
        if op == 2:  # MAX
            return [np.maximum.reduce(ms)]
        return [sum(np.prod([mj for j, mj in enumerate(ms) if j != i], axis=0) * mi for i, mi in enumerate(ms))]
    if t == "BatchNorm":
        x = values[0].astype(np.float64)
        v = x.reshape(x.shape[0], x.shape[1], -1)
        p = layer.batch_norm_param
        if p.use_global_stats if p.HasField("use_global_stats") else True:
            s = float(params[2].reshape(-1)[0])
            s = 0.0 if s == 0 else 1.0 / s
            mean, var = params[0].reshape(1, -1, 1) * s, params[1].reshape(1, -1, 1) * s
            extra = 0.0
        else:
            mean, var = v.mean(axis=(0, 2), keepdims=True), v.var(axis=(0, 2), keepdims=True)
            extra = np.sqrt((v * v).mean(axis=(0, 2), keepdims=True))  # the statistics' own rounding
        out = (m.reshape(v.shape) + np.abs(mean) + extra) / np.sqrt(var + p.eps)
        return [out.reshape(m.shape)]
    if t == "Scale":
        p = layer.scale_param
        if len(ms) > 1:
            scale, bias, m_scale = values[1], (params[0] if p.bias_term else None), ms[1]
        else:
            scale, bias, m_scale = params[0], (params[1] if p.bias_term else None), None
        axis = 0 if scale.ndim == 0 else canonical_axis(p.axis, m.ndim, "axis")
        view = (1,) * axis + tuple(scale.shape) + (1,) * (m.ndim - axis - scale.ndim)
        out = m * np.abs(scale).reshape(view)
        if m_scale is not None:
            out = out + np.abs(values[0]) * m_scale.reshape(view)
        if bias is not None:
            out = out + np.abs(bias).reshape(view)
        return [out]
    raise ValueError(f"no magnitude rule for layer type {t}")


def blob_bounds(net, caffe: dict[str, np.ndarray], other: dict[str, np.ndarray],
                params: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-element bound on |caffe[blob] - other[blob]| for every blob of `net`.

    The rule of docs/verify.md applied to every blob: factor(N) * M, N the
    blob's accumulation length, M its magnitude: the sum of absolute products
    at each InnerProduct/Convolution (on Caffe's input to it), carried through
    the other layers by their gain (_magnitude). Softmax outputs get the
    probability bound implied by their input's bound.
    """
    from fcnify.surgery.bound import accumulation_length, factor, probability_tolerance
    from fcnify.caffe.shapes import canonical_axis
    m: dict[str, np.ndarray] = {}
    bounds: dict[str, np.ndarray] = {}
    for layer in net.layer:
        if layer.type == "Input":
            for top in layer.top:
                m[top] = np.abs(caffe[top].astype(np.float64))
                bounds[top] = np.zeros_like(m[top])  # the same input on both sides
            continue
        if layer.type == "Softmax":
            axis = canonical_axis(layer.softmax_param.axis, caffe[layer.top[0]].ndim, "softmax axis")
            top, bottom = layer.top[0], layer.bottom[0]
            bounds[top] = probability_tolerance(caffe[top], other[top], bounds[bottom], axis)
            m[top] = np.ones_like(bounds[top])
            continue
        tops = _magnitude(layer, [m[b] for b in layer.bottom], [caffe[b] for b in layer.bottom],
                          params.get(layer.name, []))
        for top, mt in zip(layer.top, tops):
            m[top] = mt = mt.reshape(caffe[top].shape)
            bounds[top] = factor(accumulation_length(net, top)) * mt
    return bounds


# ------------------------------------------------------------------ a map against pycaffe on the crops

def assert_map_matches_pycaffe(probs: np.ndarray, model_def: Path, weights: Path, preprocess,
                               rgb: np.ndarray, *, stride: int, window: int, score_blob: str,
                               prob_blob: str, cells: int = 24, seed: int = 0) -> None:
    """Cells of a probability map (classes x rows x cols, as NAME.scores.npy holds it) equal the
    original classifier, run by pycaffe itself on the crop under each cell (window at (r*stride,
    c*stride), no offset), within the probability bound implied by the scores' float32 bound.

    `cells` cells are drawn at random among those whose window lies inside the image.
    """
    from fcnify.surgery.bound import probability_tolerance, within
    from nets import pycaffe
    rows, cols = probs.shape[1:]
    h, w = rgb.shape[:2]
    full_r, full_c = min(rows, (h - window) // stride + 1), min(cols, (w - window) // stride + 1)
    rng = np.random.default_rng(seed)
    picked = [(int(rng.integers(full_r)), int(rng.integers(full_c))) for _ in range(cells)]
    crops = np.stack([preprocess.apply(rgb[r * stride:r * stride + window, c * stride:c * stride + window])
                      for r, c in picked])
    caffe = pycaffe()
    net = caffe.Net(str(model_def), str(weights), caffe.TEST)
    data = net.inputs[0]
    net.blobs[data].reshape(*crops.shape)
    net.blobs[data].data[...] = crops
    net.forward()
    scores = scores_of(Path(model_def), Path(weights), score_blob)
    score_tol = scores.tolerance(net.blobs[scores.bottom].data.copy())
    want = net.blobs[prob_blob].data.copy().reshape(len(picked), -1)
    got = np.stack([probs[:, r, c] for r, c in picked])
    ok, used = within(got, want, probability_tolerance(got, want, score_tol.reshape(len(picked), -1), axis=1))
    assert ok, f"the map's probabilities differ from pycaffe's on the crops by {used:.3g} of their bound"
