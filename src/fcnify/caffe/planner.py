"""Predict Caffe's memory for an input size, before running anything.

Caffe (CPU, TEST phase) holds every blob's data (diffs are never touched in
a forward pass, so never allocated), one im2col buffer per convolution that
is not 1x1/stride 1, the max-pooling index maps and LRN's scale blob. Blobs
never shrink when a net is reshaped, so the peak over several tile sizes is
the largest of them. The same shapes tell whether any blob would pass
Caffe's INT_MAX element limit, which aborts Caffe.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..errors import NetDefinitionError, ResourceError
from .shapes import INT_MAX, Shape, count, image_input, infer, conv_geometry

FLOAT = 4
# The worker process before any net: Python, numpy, pycaffe and what it imports
# (VmHWM after loading and running a 32 px net: 95.6 MiB with numpy 2 and the CPU
# build scripts/setup.sh makes; scripts/bench/bench_dense.py reports the model's error).
WORKER_BASE = 96 * 2**20
# Measured CaffeNet activations came to 0.89-0.97 of blobs + buffers + transfers
# (700-2000 px), so the sum is used as it is: a slight over-estimate.
SLACK = 1.0


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes for one input size."""

    blobs: int
    buffers: int  # im2col, pooling indices, LRN scale
    params: int
    largest_blob: int  # elements
    largest_blob_name: str
    io: int = 0  # the input and output arrays beside the blobs (the worker's shared regions)
    base: int = WORKER_BASE  # the engine's own memory before any net
    slack: float = SLACK  # measured activations / modelled ones
    largest_buffer: int = 0  # elements of the largest im2col buffer (a Blob too: INT_MAX applies)
    inputs: int = 0  # bytes of the input array (the caller's copy is counted by its caller)
    outputs: int = 0  # bytes of the output arrays

    @property
    def activations(self) -> int:
        return int((self.blobs + self.buffers) * self.slack) + self.io

    @property
    def total(self) -> int:
        """Engine peak: the larger of loading (parameters held twice) and running."""
        return self.base + self.params + max(self.params, self.activations)


def estimate(net, height: int, width: int, batch: int = 1) -> MemoryEstimate:
    """Memory of `net` (fully convolutional) at an input of height x width."""
    name, declared = image_input(net)
    shape = (batch, declared[1], height, width)
    try:
        shapes = infer(net, {name: shape})
    except NetDefinitionError as exc:
        if "INT_MAX" in exc.message:
            raise ResourceError(f"an input of {height}x{width} px (height x width) is too large for Caffe: "
                                f"{exc.message}") from None
        raise
    blobs = sum(count(s) for s in shapes.blobs.values()) * FLOAT
    largest = max(shapes.blobs.items(), key=lambda kv: count(kv[1]))
    buffers = largest_buffer = 0
    for layer, ls in zip((l for l in net.layer), shapes.layers):
        if ls.type == "Convolution" and ls.bottoms:
            p = layer.convolution_param
            kernel, stride, pad, dilation = conv_geometry(p, len(ls.bottoms[0]) - 2)
            if not (all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(pad)):
                # Caffe sizes the buffer kernel_dim * group rows: all input channels, even when grouped
                col = ls.bottoms[0][1] * count(tuple(kernel)) * count(ls.tops[0][2:])
                buffers += col * FLOAT
                largest_buffer = max(largest_buffer, col)
        elif ls.type == "Pooling" and layer.pooling_param.pool == layer.pooling_param.MAX and len(ls.tops) == 1:
            buffers += count(ls.tops[0]) * FLOAT  # max indices
        elif ls.type == "LRN":
            buffers += 2 * count(ls.bottoms[0]) * FLOAT  # scale_ and a padded square
    params = sum(count(p) for ls in shapes.layers for p in ls.params) * FLOAT
    outputs = [shapes.blobs[b] for b in _outputs(net)]
    # The worker maps the input's shared region (read into the data blob) and writes the outputs
    # into its own region (engines/worker.py): one copy of each beside the blobs.
    inputs, outs = count(shape) * FLOAT, sum(count(o) for o in outputs) * FLOAT
    return MemoryEstimate(blobs, buffers, params, count(largest[1]), largest[0], inputs + outs,
                          largest_buffer=largest_buffer, inputs=inputs, outputs=outs)


def _outputs(net) -> list[str]:
    from .geometry import output_blobs
    return output_blobs(net)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), or 4 GiB when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def default_budget() -> int:
    """Half of the memory available now: room for the image, outputs and the rest of the machine."""
    return available_memory() // 2


def parse_size(text: str) -> int:
    """'2GiB', '1500MB', '3G', '2147483648' -> bytes."""
    units = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": 2**20, "MB": 10**6,
             "MIB": 2**20, "G": 2**30, "GB": 10**9, "GIB": 2**30, "T": 2**40, "TB": 10**12, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    if unit not in units or not num:
        raise ValueError(f"cannot read memory size {text!r} (use e.g. 2GiB, 1500MB)")
    value = float(num) * units[unit]
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value)


# Plan to this share of the budget: glibc keeps some freed blocks when the net
# is reshaped between tile sizes (benchmark: 2.03 GiB measured for a 2.00 GiB plan).
HEADROOM = 0.95
# Activations of one forward pass above which fcnify tiles even with memory to
# spare: on the benchmark machine CaffeNet took 2.77 ms per map cell as one
# 3000-px pass (5.3 GiB) and 1.97 ms in 1731-px tiles; up to ~2.2 GiB, one pass
# was as fast per cell as any tiling.
SPEED_CAP = int(2.5 * 2**30)


Memory = Callable[..., MemoryEstimate]  # (net, height, width): an engine's memory()


def fits(net, height: int, width: int, budget: int, speed_cap: int | None = SPEED_CAP,
         memory: Memory | None = None) -> bool:
    """Whether one forward pass of height x width stays within the budget (and the speed cap),
    by the running engine's memory model (default: Caffe's).

    Caffe aborts when any Blob passes INT_MAX elements: the net's blobs (estimate
    raises for those) and each convolution's im2col buffer, which for a
    many-channel input is several times larger than any blob (CaffeNet's conv2
    buffer passes INT_MAX at about 7600 px, its largest blob at about 18900 px).
    """
    try:
        est = (memory or estimate)(net, height, width)
    except ResourceError:
        return False
    if speed_cap is not None and est.activations > speed_cap:
        return False
    return est.total <= budget * HEADROOM and max(est.largest_blob, est.largest_buffer) <= INT_MAX


def largest_square(net, budget: int, stride: int, start: int, limit: int,
                   speed_cap: int | None = SPEED_CAP, memory: Memory | None = None) -> int | None:
    """Largest side n = start + k*stride (<= limit) whose n x n input fits `budget`."""
    if not fits(net, start, start, budget, speed_cap, memory):
        return None
    lo, hi = 0, max(0, (limit - start) // stride)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        n = start + mid * stride
        if fits(net, n, n, budget, speed_cap, memory):
            lo = mid
        else:
            hi = mid - 1
    return start + lo * stride


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
