"""How far two float32 evaluations of the same scores may differ: the equivalence bound.

Two correct computations of a net's scores (Caffe's InnerProduct vs the
converted Convolution, one BLAS thread vs four, Caffe vs torch) add the same
products in different orders, so they differ in the last bits. How much is
set by float32 accumulation error, not by a constant picked by hand:

    |s_a[j] - s_b[j]| <= 2 * LAMBDA * sqrt(N) * u * A[j]

- u = 2^-24, float32's unit roundoff;
- A[j] = sum_i |W[j,i]| * |x[i]| + |b[j]|, the sum of absolute products of the
  score layer for output j (a second pass with |W|, |x| and |b|, in float64,
  on the score layer's actual input x);
- N, the accumulation length: along the longest path from the input to the
  scores, the number of terms each layer sums (fan-in of each convolution
  and InnerProduct, the window of AVE pooling, LRN's running sum, ...);
- LAMBDA = 6, the confidence factor of the probabilistic rounding-error
  bound (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019): a sum of n terms
  computed in any order is within LAMBDA * sqrt(n) * u * sum|terms| of the
  exact sum, except with probability at most 2n * exp(-LAMBDA^2 / 2);
- the factor 2: both computations carry such an error.

docs/verify.md derives it and says what it assumes (rounding errors that do
not conspire, layers that do not amplify an error more than their own sums).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..caffe.layers import SCORE_PATH
from ..caffe.shapes import conv_geometry, count, infer_partial, pool_geometry, pooled_size, rounds_up

U = 2.0 ** -24
LAMBDA = 6.0



def layer_terms(layer, bottoms: list[tuple[int, ...]], params: list[tuple[int, ...]]) -> int:
    """How many terms one output of `layer` sums (1 for a layer that rounds once, 0 if exact)."""
    t = layer.type
    if t in ("Convolution", "Deconvolution") and params:
        k = count(params[0][2:])
        group = layer.convolution_param.group or 1
        channels = params[0][1] if t == "Convolution" else params[0][0] // group
        return channels * k + 1  # + 1: the bias
    if t == "InnerProduct" and params:
        w = params[0]
        return (w[0] if layer.inner_product_param.transpose else count(w[1:])) + 1
    if t == "Pooling" and layer.pooling_param.pool == layer.pooling_param.AVE and len(bottoms[0]) == 4:
        kernel, _, _ = pool_geometry(layer.pooling_param, bottoms[0])
        return count(tuple(kernel)) + 1
    if t == "LRN":
        n = layer.lrn_param.local_size
        if layer.lrn_param.norm_region == layer.lrn_param.WITHIN_CHANNEL:
            return n * n + 3
        # Caffe slides its window sum over the channels (add the head, subtract the tail),
        # so the sum it divides by carries 2 roundings per channel on top of the window's n
        return n + 2 * bottoms[0][1] + 3
    if t == "Eltwise":
        return len(bottoms) + 1
    if t in ("ReLU", "Dropout", "Split", "Flatten", "Reshape", "Input", "Concat", "Silence") or \
            (t == "Pooling" and layer.pooling_param.pool != layer.pooling_param.AVE):
        return 0  # exact: copies, comparisons, sign tests
    return 4  # one elementwise formula: a few roundings (BatchNorm, Scale, Sigmoid, TanH, ...)


def accumulation_length(net, blob: str, inputs: dict[str, tuple[int, ...]] | None = None) -> int:
    """N for `blob`: the most terms summed along any path from the net's input to it.

    The input itself counts 1 (preprocessing rounds it once).
    """
    shapes = infer_partial(net, inputs)
    by_name = {ls.name: ls for ls in shapes.layers}
    length: dict[str, int] = {}
    for layer in net.layer:
        ls = by_name.get(layer.name)
        if ls is None:
            continue
        before = max((length.get(b, 1) for b in layer.bottom), default=1)
        after = before + layer_terms(layer, ls.bottoms, ls.params)
        for top in layer.top:
            length[top] = after
    if blob not in length:
        raise KeyError(f"no layer produces blob '{blob}'")
    return length[blob]


def factor(length: int) -> float:
    """The bound's multiplier of A: 2 * LAMBDA * sqrt(N) * u."""
    return 2.0 * LAMBDA * math.sqrt(max(length, 1)) * U


def abs_products(layer, params: list[np.ndarray], bottom: np.ndarray) -> np.ndarray:
    """A = |W| * |x| + |b| per output of an InnerProduct or Convolution layer, in float64.

    `params` are the layer's blobs in their declared shapes, `bottom` its
    input as the engine computed it; the result has the layer's output shape.
    """
    x = np.abs(np.asarray(bottom, dtype=np.float64))
    w = np.abs(np.asarray(params[0], dtype=np.float64))
    bias = np.abs(np.asarray(params[1], dtype=np.float64)).reshape(-1) if len(params) > 1 else None
    if layer.type == "InnerProduct":
        p = layer.inner_product_param
        axis = p.axis % x.ndim if p.axis < 0 else p.axis
        flat = x.reshape(count(x.shape[:axis]), -1)
        out = flat @ (w if p.transpose else w.reshape(w.shape[0], -1).T)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:axis], -1)
    if layer.type == "Convolution" and x.ndim == 4:
        return _abs_conv(layer.convolution_param, w, bias, x)
    raise ValueError(f"layer '{layer.name}' ({layer.type}): the bound needs an InnerProduct or a "
                     "2-D Convolution as the score layer")


def _abs_conv(p, w: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """A 2-D convolution of non-negative arrays, kernel position by kernel position."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv_geometry(p, 2)
    group = p.group or 1
    n, c, h, wd = x.shape
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    m, cg = w.shape[0], c // group
    out = np.zeros((n, m, oh, ow))
    for g in range(group):
        wg = w[g * (m // group):(g + 1) * (m // group)]
        xg = padded[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                window = xg[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out[:, g * (m // group):(g + 1) * (m // group)] += np.einsum("mc,nchw->nmhw", wg[:, :, i, j], window)
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out




def _pool_max(p, a: np.ndarray) -> np.ndarray:
    """Window maximum of non-negative A with Caffe's pooled sizes (bounds MAX and AVE pooling:
    the error of a maximum or of an average is at most the largest error in the window)."""
    kernel, stride, pad = pool_geometry(p, a.shape)
    ceil = rounds_up(p)
    out = [pooled_size(a.shape[2 + i], kernel[i], stride[i], pad[i], ceil=ceil, padded=any(pad))
           for i in (0, 1)]
    after = [max(0, (out[i] - 1) * stride[i] + kernel[i] - a.shape[2 + i] - pad[i]) for i in (0, 1)]
    padded = np.pad(a, ((0, 0), (0, 0), (pad[0], after[0]), (pad[1], after[1])))
    result = np.zeros(a.shape[:2] + tuple(out))
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            window = padded[:, :, i:i + stride[0] * (out[0] - 1) + 1:stride[0],
                            j:j + stride[1] * (out[1] - 1) + 1:stride[1]]
            np.maximum(result, window, out=result)
    return result


def _pass_through(layer, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A after a layer that adds no products: an error passes ReLU/Dropout at most unchanged."""
    if layer.type == "Pooling":
        return _pool_max(layer.pooling_param, a)
    if layer.type in ("Flatten", "Reshape"):
        return a.reshape(shape)
    return a


@dataclass(frozen=True)
class ScoreLayer:
    """The layer that computes a net's scores, with what its bound needs.

    Build it once per net (`score_layer`); `tolerance(bottom)` then gives the
    per-output bound for one input, from the score layer's input as computed.
    `after` are the layers between it and the score blob that add no
    products (ReLU, Dropout, pooling, Flatten/Reshape): NIN's scores are a
    global average of its last convolution, for instance.
    """

    layer: object            # caffe_pb2.LayerParameter
    params: tuple            # its blobs, declared shapes
    length: int              # N, accumulation length up to the scores
    after: tuple = ()        # (LayerParameter, top shape at the declared input) pairs

    @property
    def bottom(self) -> str:
        return self.layer.bottom[0]

    def products(self, bottom: np.ndarray) -> np.ndarray:
        """A per score, from the score layer's input `bottom` (float64)."""
        a = abs_products(self.layer, list(self.params), bottom)
        for layer, shape in self.after:
            a = _pass_through(layer, a, (a.shape[0],) + tuple(shape[1:]) if layer.type != "Pooling" else ())
        return a

    def tolerance(self, bottom: np.ndarray) -> np.ndarray:
        """Per-score bound on |s_a - s_b| for scores computed from `bottom` (float64)."""
        return factor(self.length) * self.products(bottom)


def _producer_chain(net, blob: str) -> tuple[object, list]:
    """The last InnerProduct/Convolution before `blob`, and the pass-through layers after it."""
    chain, want = [], blob
    for layer in reversed(list(net.layer)):
        if want not in layer.top:
            continue
        if layer.type in ("InnerProduct", "Convolution"):
            return layer, chain[::-1]
        if layer.type not in SCORE_PATH or len(layer.bottom) != 1:
            raise ValueError(f"the scores '{blob}' come from layer '{layer.name}' ({layer.type}); "
                             "the equivalence bound follows only "
                             f"{', '.join(SCORE_PATH)} back to an InnerProduct or Convolution")
        chain.append(layer)
        want = layer.bottom[0]
    raise ValueError(f"no InnerProduct or Convolution computes the scores '{blob}'")


def score_layer(net, blob: str, weights) -> ScoreLayer:
    """The score layer of `net` (a NetParameter) for the score blob `blob`.

    `weights` maps layer names to blob lists (or caffemodel LayerWeights), as
    read_weights, transplant and the engines' params() give them.
    """
    producer, chain = _producer_chain(net, blob)
    shapes = infer_partial(net)
    by_name = {ls.name: ls for ls in shapes.layers}
    declared = by_name[producer.name].params if producer.name in by_name else []
    raw = weights[producer.name]
    blobs = getattr(raw, "blobs", raw)
    if len(blobs) < 1:
        raise ValueError(f"layer '{producer.name}' has no weights")
    params = tuple(np.asarray(b, dtype=np.float32).reshape(shape)
                   for b, shape in zip(blobs, declared or [np.shape(b) for b in blobs]))
    after = tuple((layer, by_name[layer.name].tops[0] if layer.name in by_name else ())
                  for layer in chain)
    return ScoreLayer(producer, params, accumulation_length(net, blob), after)


FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # 2^-126: below it a float32 probability may be flushed to 0


def softmax(scores: np.ndarray, axis: int = 1) -> np.ndarray:
    """float64 Softmax (for saturation and for nets whose output is the scores)."""
    s = np.asarray(scores, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN scores give NaN, not a warning
        e = np.exp(s - s.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)


def probability_tolerance(pa: np.ndarray, pb: np.ndarray, score_tol: np.ndarray, axis: int = 1) -> np.ndarray:
    """Per-element bound on |p_a - p_b| implied by the scores' bound.

    If every score moves by at most T (the largest bound among one item's
    classes), each probability moves by at most a factor exp(+-2T), so
    |p_a - p_b| <= min(p_a, p_b) * (exp(2T) - 1). Softmax's own float32
    rounding (an exp, a sum over C classes, a division) adds
    2 * LAMBDA * sqrt(C + 2) * u * max(p_a, p_b). Below float32's smallest
    normal number (2^-126) there is no relative accuracy left: one engine's
    exp returns a subnormal where another's flushes to zero (FTZ/DAZ, the
    vectorised exp of ONNX Runtime's AVX2 kernels), so that much is added
    as an absolute term.
    """
    t = np.max(score_tol, axis=axis, keepdims=True)
    a, b = np.asarray(pa, dtype=np.float64), np.asarray(pb, dtype=np.float64)
    classes = a.shape[axis]
    with np.errstate(over="ignore", invalid="ignore"):  # an infinite score bound: an infinite one here
        return (np.minimum(a, b) * np.expm1(2.0 * t) + factor(classes + 2) * np.maximum(a, b)
                + FLOAT32_TINY)


def within(a: np.ndarray, b: np.ndarray, tol: np.ndarray) -> tuple[bool, float]:
    """(every |a - b| <= tol, the largest |a - b| / tol): the check and how much of the bound it used.

    NaN or infinity anywhere is an unbounded difference.
    """
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64).reshape(np.shape(a))
    if not (np.isfinite(a64).all() and np.isfinite(b64).all()):
        return False, math.inf
    with np.errstate(invalid="ignore", over="ignore"):
        used = np.abs(a64 - b64) / np.maximum(tol, np.finfo(np.float64).tiny)
    worst = float(used.max()) if used.size else 0.0
    return worst <= 1.0, worst
