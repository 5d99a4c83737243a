"""The float32 bound the ONNX tests compare Caffe and ONNX Runtime with.

Two correct float32 evaluations differ by rounding only: a result that sums
N terms (in any order) is within LAMBDA * sqrt(N) * u * A of the exact value,
A being the sum of the terms' absolute values (Higham & Mary's probabilistic
bound, the rule of fcnify's verify criterion, issue 12); both engines err, so
twice that. An exported op whose semantics changed (a wrong divisor, a
window in the wrong place, a missing term) misses it by orders of magnitude.
"""
from __future__ import annotations

import math

import numpy as np

from fcnify.netdef import read_netdef
from fcnify.shapes import count, infer, pool_geometry

U = 2.0 ** -24
LAMBDA = 6.0


def factor(n: int) -> float:
    """2 * LAMBDA * sqrt(N) * u: the bound's multiple of A for a result of N terms."""
    return 2.0 * LAMBDA * math.sqrt(max(n, 1)) * U


def accumulation_length(net, blob: str, inputs=None) -> int:
    """N for `blob`: terms summed along the longest path from the input (fan-ins of the
    convolutions and InnerProducts, AVE and LRN windows, a few for each elementwise formula)."""
    shapes = infer(net, inputs)
    length: dict[str, int] = {}
    for layer, ls in zip(net.layer, shapes.layers):
        before = max((length.get(b, 1) for b in layer.bottom), default=1)
        terms = 4
        if ls.params and layer.type in ("Convolution", "InnerProduct"):
            terms = count(ls.params[0][1:]) + 1
        elif layer.type == "LRN":
            terms = layer.lrn_param.local_size ** (2 if layer.lrn_param.norm_region else 1) + 3
        elif layer.type == "Pooling":  # AVE sums its window; MAX is exact
            kernel = pool_geometry(layer.pooling_param, ls.bottoms[0])[0]
            terms = count(tuple(kernel)) + 1 if layer.pooling_param.pool == 1 else 0
        elif layer.type in ("ReLU", "Dropout", "Split", "Input", "Concat", "Flatten"):
            terms = 0
        for top in layer.top:
            length[top] = before + terms
    return length[blob]


def score_tolerance(model_def, weights_of_layer: list[np.ndarray], layer_name: str,
                    bottom: np.ndarray, score: str, inputs=None) -> np.ndarray:
    """Per-score bound for a 1x1-convolution score layer: factor(N) * (|W| |x| + |b|),
    x being the layer's input as Caffe computed it."""
    net = read_netdef(model_def).param
    w = np.abs(weights_of_layer[0].astype(np.float64)).reshape(weights_of_layer[0].shape[0], -1)
    x = np.abs(bottom.astype(np.float64))
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"'{layer_name}' is not a 1x1 convolution over {x.shape[1]} channels")
    n, c, h, wd = x.shape
    a = np.matmul(w, x.reshape(n, c, h * wd)).reshape(n, -1, h, wd)
    if len(weights_of_layer) > 1:
        a += np.abs(weights_of_layer[1].astype(np.float64)).reshape(1, -1, 1, 1)
    return factor(accumulation_length(net, score, inputs)) * a
