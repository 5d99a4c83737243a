"""A float32 rounding bound for small sequential nets, for tests that compare two runs.

Two float32 evaluations of the same net on the same input (a dense cell and
the original net on the crop under it, summed in different orders by BLAS)
each differ from the exact result by at most E, so from each other by 2E.
E is propagated layer by layer (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., section 3.1): a dot product of K terms in any order,
FMA or not, errs by at most gamma_K * sum |w||x|, gamma_K = K u / (1 - K u),
u = 2^-24; an error already in x grows by |W| (max pooling and ReLU do not
grow it; PReLU by at most max(1, |slope|)). M tracks an upper bound of |x|.
Layers are given as tuples with the net's own parameters (from pycaffe).
"""
from __future__ import annotations

import numpy as np

U = 2.0 ** -24


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


def _conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Valid convolution (stride 1) of C x H x W by O x C x kh x kw, in float64."""
    o, c, kh, kw = w.shape
    _, h, wd = x.shape
    cols = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # C x H' x W' x kh x kw
    return np.einsum("chwij,ocij->ohw", cols, w)


def _pool(x: np.ndarray, k: int, s: int, mode: str) -> np.ndarray:
    """Caffe's pooling without padding: ceil-rounded output, edge windows clipped."""
    c, h, w = x.shape
    oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
    out = np.empty((c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = x[:, i * s:min(i * s + k, h), j * s:min(j * s + k, w)]
            out[:, i, j] = win.max(axis=(1, 2)) if mode == "max" else win.sum(axis=(1, 2)) / (k * k)
    return out


def rounding_bound(layers: list[tuple], x: np.ndarray) -> np.ndarray:
    """Bound E on |float32 result - exact result| for each output value of the net on x (C x H x W).

    layers: ("conv", W, b), ("ip", W, b) (reads the flattened input), ("max", k, s),
    ("ave", k, s), ("relu",), ("prelu", slopes).
    """
    m = np.abs(np.asarray(x, np.float64))
    e = np.zeros_like(m)
    for layer in layers:
        kind = layer[0]
        if kind in ("conv", "ip"):
            w, b = np.abs(np.asarray(layer[1], np.float64)), np.abs(np.asarray(layer[2], np.float64))
            if kind == "ip":
                w = w.reshape(w.shape[0], *m.shape)
            k = w[0].size + 1
            wm, we = _conv(m, w), _conv(e, w)
            m_new = wm + b[:, None, None]
            e = we + gamma(k) * m_new
            m = m_new
        elif kind in ("max", "ave"):
            k, s = layer[1], layer[2]
            m_new = _pool(m, k, s, kind)
            e = _pool(e, k, s, kind) + (gamma(k * k + 1) * m_new if kind == "ave" else 0.0)
            m = m_new
        elif kind == "relu":
            pass
        elif kind == "prelu":
            f = np.maximum(1.0, np.abs(np.asarray(layer[1], np.float64)))[:, None, None]
            m, e = m * f, e * f
        else:
            raise ValueError(f"unknown layer kind {kind}")
    return e
