"""Caffe's worker: forward's arrays in shared memory (worker.Region), equal to the pipe's, no descriptor left open."""
from __future__ import annotations

import os

import numpy as np
import pytest

from fcnify.engines.caffe_engine import CaffeRunner
from fcnify.engines.sandbox import Sandbox
from fcnify.errors import EngineCrash

from conftest import write_model
from test_planner import WIDE


def open_fds() -> set[str]:
    """What this process's descriptors point at (memfd regions show as /memfd:fcnify-region)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


@pytest.fixture
def wide(tmp_path):
    return write_model(tmp_path, "wide", WIDE)


def test_shared_forward_equals_the_pickled_one(wide):
    """Inputs written into input_array, copied in, and pickled through the pipe give the same bits,
    at a size and then a larger one (the region grows) and a smaller one."""
    box = Sandbox()
    try:
        net = CaffeRunner(box=box).load(*wide)
        rng = np.random.default_rng(1)
        for n in (40, 90, 33):
            x = rng.standard_normal((1, 3, n, n)).astype(np.float32)
            piped = box.call("forward", net.handle, {"data": x}, ["prob", "score"])
            copied = net.forward({"data": x}, ["prob", "score"])
            target = net.input_array("data", x.shape)
            target[...] = x
            in_place = net.forward({"data": target}, ["prob", "score"])
            for name in ("prob", "score"):
                side = -(-(n - 2) // 2)  # conv 3x3, then Caffe's pooling rounds up
                assert piped[name].shape == (1, 4, side, side)
                assert np.array_equal(piped[name], copied[name]) and np.array_equal(piped[name], in_place[name])
            target[...] = 0  # the returned arrays are this process's own: the next input cannot change them
            assert np.array_equal(piped["prob"], in_place["prob"])
        net.close()
    finally:
        box.close()


def test_no_descriptor_or_region_left_open(wide):
    """After forwards that grow the regions, a worker killed by Caffe's abort and a close, this
    process holds no more descriptors than before (no memfd region, socket or pipe)."""
    before = open_fds()
    box = Sandbox()
    net = CaffeRunner(box=box).load(*wide)
    for n in (40, 80, 120):
        net.forward({"data": np.ones((1, 3, n, n), np.float32)}, ["prob"])
    assert any("memfd:fcnify-region" in fd for fd in open_fds() - before)
    with pytest.raises(EngineCrash):
        box.call("crash_for_test", "abort", context="testing")
    out = net.forward({"data": np.ones((1, 3, 40, 40), np.float32)}, ["prob"])  # a fresh worker
    assert out["prob"].shape == (1, 4, 19, 19)
    net.close()
    box.close()
    assert open_fds() == before
