"""The equivalence bound (fcnify.bound) for the tests' own comparisons of score maps.

Two computations of the same map that may sum in different orders (whole
image vs tiles, Caffe vs torch, InnerProduct vs Convolution) are compared
against the float32 accumulation bound of docs/verify.md, never a constant.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from fcnify.bound import ScoreLayer, score_layer
from fcnify.caffemodel import read_weights
from fcnify.netdef import read_netdef


@lru_cache(maxsize=4)
def scores_of(model_def: Path, weights: Path, blob: str) -> ScoreLayer:
    """The score layer of a net on disk (weights read once per file)."""
    return score_layer(read_netdef(model_def).param, blob, read_weights(weights))


def map_bound(model, rgb: np.ndarray) -> np.ndarray:
    """Per-score bound (classes x rows x cols) for a DenseModel's map of `rgb`, from one whole-image pass."""
    scores = scores_of(Path(model.card.model_def), Path(model.card.weights), model.score_blob)
    x = model.card.preprocess.apply(rgb)[None]
    bottom = model.net.forward({model.input_blob: x}, [scores.bottom])[scores.bottom]
    return scores.tolerance(bottom)[0]
