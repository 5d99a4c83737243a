"""The one module that imports pycaffe.

It runs inside fcnify's worker process (see sandbox.py), never in the
process that the user's command or notebook lives in: Caffe aborts its whole
process on a failed CHECK, and that must not take the user's work with it.
Every function here takes and returns plain data (paths, numpy arrays).
"""
from __future__ import annotations

import os

import numpy as np

_caffe = None
_nets: dict[int, object] = {}
_next_id = 0


def caffe(verbose: bool = False):
    """Import caffe once, with glog quiet unless `verbose` (set before the first import)."""
    global _caffe
    if _caffe is None:
        os.environ.setdefault("GLOG_minloglevel", "0" if verbose else "2")
        import caffe as module  # noqa: PLC0415 - the only import of caffe in fcnify
        _caffe = module
    return _caffe


def info() -> dict:
    c = caffe()
    return {
        "version": getattr(c, "__version__", "unknown"),
        "file": c.__file__,
        "layer_types": sorted(str(t) for t in c.layer_type_list()),
    }


def gpu_probe(gpu: int) -> str | None:
    """Why GPU `gpu` cannot be used, asked of the CUDA runtime Caffe links; None if it can.

    Caffe's own set_device/set_mode_gpu abort the process on a machine
    without a GPU or driver (CUDA error 35 or 100); asking cudaGetDeviceCount
    first turns that into a sentence.
    """
    import ctypes
    caffe()
    with open("/proc/self/maps") as maps:  # the runtime Caffe loaded (or libcaffe, if static)
        loaded = dict.fromkeys(line.split()[-1] for line in maps
                               if "libcudart.so" in line or "libcaffe" in line)
    rt = next((lib for lib in map(ctypes.CDLL, sorted(loaded, key=lambda p: "libcudart" not in p))
               if hasattr(lib, "cudaGetDeviceCount")), None)
    if rt is None:
        return None  # cannot ask; set_mode will tell (its abort becomes an EngineCrash)
    rt.cudaGetErrorString.restype = ctypes.c_char_p
    count = ctypes.c_int(0)
    err = rt.cudaGetDeviceCount(ctypes.byref(count))
    if err != 0:
        text = rt.cudaGetErrorString(err).decode(errors="replace")
        hint = " (no NVIDIA GPU or driver on this machine?)" if err in (35, 100) else ""
        return f"the CUDA runtime reports '{text}' (error {err}){hint}"
    if not 0 <= gpu < count.value:
        return f"this machine has {count.value} CUDA device(s)" + (
            f" (0..{count.value - 1})" if count.value else "")
    return None


def set_mode(gpu: int | None) -> None:
    c = caffe()
    if gpu is None:
        c.set_mode_cpu()
    else:
        c.set_device(int(gpu))
        c.set_mode_gpu()


def load(model_def: str, weights: str | None = None) -> int:
    """Build a TEST-phase net; returns a handle for the other calls."""
    global _next_id
    c = caffe()
    if weights:
        net = c.Net(str(model_def), str(weights), c.TEST)
    else:
        net = c.Net(str(model_def), c.TEST)
    _next_id += 1
    _nets[_next_id] = net
    return _next_id


def release(handle: int) -> None:
    _nets.pop(handle, None)


def blob_shapes(handle: int) -> dict[str, tuple[int, ...]]:
    net = _nets[handle]
    return {name: tuple(blob.data.shape) for name, blob in net.blobs.items()}


def params(handle: int) -> dict[str, list[np.ndarray]]:
    net = _nets[handle]
    return {name: [p.data.copy() for p in blobs] for name, blobs in net.params.items()}


def param_digests(handle: int) -> dict[str, list[tuple[tuple[int, ...], str]]]:
    """(shape, BLAKE2b of the float32 bytes) of every parameter blob: checks without copying."""
    from ..caffe.caffemodel import digest
    net = _nets[handle]
    return {name: [(tuple(p.data.shape), digest(p.data)) for p in blobs] for name, blobs in net.params.items()}


def forward(handle: int, inputs: dict[str, np.ndarray], outputs: list[str],
            copy: bool = True) -> dict[str, np.ndarray]:
    """Reshape the inputs to the given arrays, run forward, return copies of `outputs` (views of
    Caffe's blobs with copy=False: the worker copies them straight into shared memory)."""
    net = _nets[handle]
    changed = False
    for name, array in inputs.items():
        blob = net.blobs[name]
        if tuple(blob.data.shape) != tuple(array.shape):
            blob.reshape(*array.shape)
            changed = True
    if changed:
        net.reshape()
    for name, array in inputs.items():
        net.blobs[name].data[...] = array
    net.forward()
    return {name: net.blobs[name].data.copy() if copy else net.blobs[name].data for name in outputs}


def timed_forward(handle: int, inputs: dict[str, np.ndarray], outputs: list[str],
                  repeats: int = 1) -> tuple[dict[str, np.ndarray], list[float]]:
    """forward() `repeats` times (after the reshape), timing each pass in this process."""
    import time
    out = forward(handle, inputs, outputs)
    net = _nets[handle]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        net.forward()
        times.append(time.perf_counter() - t0)
    return out, times


def max_rss() -> int:
    """Peak resident memory of this worker process, in bytes."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def ping() -> str:
    return "pong"


CALLS = {f.__name__: f for f in (info, gpu_probe, set_mode, load, release, blob_shapes, params, param_digests, forward,
                                 timed_forward, max_rss, ping)}


def dispatch(name: str, args: tuple, kwargs: dict):
    if name not in CALLS:
        raise ValueError(f"unknown engine call {name!r}")
    return CALLS[name](*args, **kwargs)


def crash_for_test(kind: str) -> None:
    """Let the tests make the worker die the way Caffe does."""
    if kind == "abort":
        os.abort()
    if kind == "check":
        import sys
        sys.stderr.write("F0101 00:00:00.000000 1 test.cpp:1] Check failed: 1 == 2 (1 vs. 2) test\n")
        sys.stderr.flush()
        os.abort()


CALLS["crash_for_test"] = crash_for_test


def raise_for_test(kind: str, message: str = "") -> None:
    """Let the tests make the worker raise (a MemoryError, a bug, one of fcnify's errors)."""
    from .. import errors
    import builtins
    raise (getattr(errors, kind, None) or getattr(builtins, kind))(message)


CALLS["raise_for_test"] = raise_for_test
