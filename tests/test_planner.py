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


# ------------------------------------------------------------------ the onnx engine under --max-memory

# Activations dominate and ONNX Runtime's convolutions here need no im2col buffer:
# the net the old model (0.6 x activations + im2col, the process itself not counted)
# under-estimated by half.
POINTWISE = """
name: "pointwise"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 32 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 32 kernel_size: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
        convolution_param { num_output: 32 kernel_size: 1 } }
layer { name: "pool" type: "Pooling" bottom: "conv3" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "score" type: "Convolution" bottom: "pool" top: "score"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""
# Runs ARGS and prints the peak memory of its process tree: the sum of the
# processes' resident sets, sampled every 2 ms, or the largest process's own
# peak (VmHWM of each waited-for descendant), whichever is larger.
TREE_PEAK = r"""
import os, resource, subprocess, sys, time
def rss(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
def tree(pid):
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
peak = 0
while proc.poll() is None:
    peak = max(peak, sum(rss(p) for p in tree(proc.pid)))
    time.sleep(0.002)
peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
print(proc.returncode, peak)
"""


def test_onnx_engine_holds_max_memory(tmp_path):
    """--engine onnx --max-memory B at two budgets: the command's whole process tree stays within B
    (ONNX Runtime runs in fcnify's own process, so that process counts), tiling finer for the smaller."""
    pytest.importorskip("onnxruntime")
    import json
    import subprocess
    import sys
    from PIL import Image
    proto, weights = write_model(tmp_path, "pointwise", POINTWISE)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(image)
    runs = {}
    for budget in (250, 400):
        out = tmp_path / f"out{budget}"
        run = subprocess.run([sys.executable, "-c", TREE_PEAK, sys.executable, "-m", "fcnify",
                              "classify-map", str(image), "--model-def", str(proto), "--weights",
                              str(weights), "--engine", "onnx", "--max-memory", f"{budget}MiB",
                              "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
        code, peak = map(int, run.stdout.split())
        assert code == 0, run.stderr
        print(f"onnx engine, --max-memory {budget}MiB: process tree peak {peak / 2**20:.0f} MiB")
        assert peak <= budget * 2**20, f"{peak / 2**20:.0f} MiB at a budget of {budget} MiB"
        runs[budget] = json.loads((out / "photo.map.json").read_text())["run"]
    assert runs[250]["mode"] == "tiled" and runs[250]["tiles"] > runs[400]["tiles"], runs


def test_budget_message_states_consistent_numbers(tmp_path):
    """A budget just above what the smallest tile needs, but below the share a pass may use:
    the message's needed size is over the share it names, and the share is HEADROOM of the budget."""
    import re
    from fcnify.errors import ResourceError
    from fcnify.dense.tiling import min_tile
    from fcnify.caffe.planner import parse_size
    proto, weights = write_model(tmp_path, "wide", WIDE)
    model = DenseModel(card_for_model_def(proto, weights), engine="caffe")  # estimate() is Caffe's model
    try:
        smallest = max(min_tile(model.geometry.y), min_tile(model.geometry.x))
        need = estimate(model.netdef.param, smallest, smallest).total
        budget = int(need / (HEADROOM + 1) * 2)  # need < budget < need / HEADROOM
        assert need < budget < need / HEADROOM
        with pytest.raises(ResourceError) as caught:
            model.plan(2000, 2000, budget=budget)
    finally:
        model.close()
    sizes = re.findall(r"(\d+\.\d+ [KMG]iB)", caught.value.message)
    needed, share, stated = (parse_size(s.replace(" ", "")) for s in sizes)
    assert needed > share and abs(share - budget * HEADROOM) < 0.01 * 2**20 and abs(stated - budget) < 0.01 * 2**20
