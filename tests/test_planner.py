"""The memory planner's estimate against the Caffe worker's real peak memory (VmHWM).

Everything else in the suite compares estimate() with itself (tiles that fit
the budget by its own numbers); here the worker's peak resident memory, read
from /proc after a whole-image run in a fresh worker, is the reference.
"""
from __future__ import annotations

import numpy as np
import pytest

from fcnify.dense.dense import DenseModel
from fcnify.convert import card_for_model_def
from fcnify.caffe.planner import HEADROOM, estimate
from fcnify.engines.caffe_engine import CaffeRunner
from fcnify.engines.sandbox import Sandbox

from conftest import write_model

# Activations dominate at a few hundred px (conv2's im2col buffer is 288 rows
# per input pixel), so the estimate's per-pixel model is what is measured,
# not the worker's fixed start-up cost.
WIDE = """
name: "wide"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 32 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 32 kernel_size: 3 pad: 1 } }
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "score" type: "Convolution" bottom: "pool" top: "score"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""
SIZES = (300, 450, 600)  # about 240, 420 and 660 MiB of worker
# The band: the planner plans to HEADROOM of the budget, so an estimate down to
# HEADROOM x the real peak still keeps a run within its budget; above, an
# estimate more than 15% high would cut images into needlessly small tiles.
LOW, HIGH = HEADROOM, 1.15


def worker_peak(pid: int) -> int:
    """VmHWM (peak resident set) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """(size, estimated bytes, measured worker peak) for each size, each run in a fresh worker."""
    proto, weights = write_model(tmp_path_factory.mktemp("planner"), "wide", WIDE)
    card = card_for_model_def(proto, weights)
    rows = []
    for n in SIZES:
        box = Sandbox()
        model = DenseModel(card, runner=CaffeRunner(box=box))
        try:
            img = np.random.default_rng(n).integers(0, 256, (n, n, 3), dtype=np.uint8)
            _, info = model.run(img, budget=1 << 40)
            assert info["mode"] == "whole"
            rows.append((n, estimate(model.netdef.param, n, n).total, worker_peak(box.worker.proc.pid)))
        finally:
            model.close()
            box.close()
    return rows


def test_estimate_within_band_of_measured_peak(measured):
    """At each size the estimate is between HEADROOM and 1.15 times the worker's measured peak."""
    for n, est, peak in measured:
        assert LOW <= est / peak <= HIGH, f"{n} px: estimated {est / 2**20:.0f} MiB, measured {peak / 2**20:.0f} MiB"


def test_estimate_grows_like_measured_peak(measured):
    """From the smallest to the largest size, the estimate grows by what the worker's peak grows (+-5%).

    The difference cancels the worker's fixed start-up memory (WORKER_BASE), so
    this holds the per-pixel model (blobs, im2col, pooling indices, transfers).
    """
    (_, e0, m0), (_, e1, m1) = measured[0], measured[-1]
    assert 0.95 <= (e1 - e0) / (m1 - m0) <= 1.05, (e1 - e0, m1 - m0)
