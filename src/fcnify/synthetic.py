"""Seeded stand-in weights, for tests and benchmarks where real weights are absent.

The scale matters: with tiny weights (std 0.01) every class gets the same
probability and a wrong conversion can look right. He-scaled weights keep
activations at the input's magnitude through ReLU layers, so scores spread
over several units and differences show.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .caffe.netdef import NetDef
from .caffe.shapes import count, infer


def random_blobs(netdef: NetDef, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """He-normal weights and small random biases for every parameterised layer."""
    rng = np.random.default_rng(seed)
    shapes = infer(netdef.param, path=netdef.path)
    out: dict[str, list[np.ndarray]] = {}
    for ls in shapes.layers:
        arrays = []
        for i, shape in enumerate(ls.params):
            if ls.type == "BatchNorm":
                arr = [rng.normal(0, 0.1, shape), rng.uniform(0.5, 1.5, shape), np.ones(shape)][i]
            elif i == 0 and ls.type in ("Convolution", "InnerProduct", "Deconvolution"):
                weight_shape = shape
                if ls.type == "InnerProduct" and netdef.layer(ls.name).inner_product_param.transpose:
                    fan_in = shape[0]
                else:
                    fan_in = count(weight_shape[1:])
                arr = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
            elif ls.type in ("Scale", "PReLU") and i == 0:
                arr = rng.uniform(0.5, 1.5, shape)
            else:
                arr = rng.normal(0.0, 0.1, shape)
            arrays.append(np.asarray(arr, dtype=np.float32))
        if arrays:
            out[ls.name] = arrays
    return out


def write_random_caffemodel(netdef: NetDef, path: str | Path, seed: int = 0) -> Path:
    """A caffemodel for `netdef` filled with random_blobs(seed)."""
    from .caffe.caffemodel import write_weights
    path = Path(path)
    with open(path, "wb") as f:
        write_weights(f, netdef.param, random_blobs(netdef, seed))
    return path
