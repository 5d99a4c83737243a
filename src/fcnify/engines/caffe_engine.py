"""Nets running in Caffe, seen from the caller's process.

`CaffeRunner` is the `caffe` engine of engines.ENGINES: it loads nets in
fcnify's worker process (sandbox.py) and hands back handles that follow
engines.LoadedNet (forward, parameters, blob shapes, close).
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import CAFFE, LoadedNet, NetHandle  # noqa: F401 - LoadedNet: the contract, re-exported
from ..errors import DeviceError, EngineCrash, SetupError
from ..paths import setup_record
from ..caffe.planner import MemoryEstimate, estimate
from .sandbox import Sandbox, shared

PYCAFFE = "caffe"  # the Python package pycaffe installs (`import caffe`), not the engine's name


@dataclass(frozen=True)
class CaffeBuild:
    """What kind of pycaffe is installed, found without importing it."""

    pycaffe: Path
    cuda: bool
    blas: str
    libraries: tuple[str, ...]


@lru_cache(maxsize=1)
def caffe_build() -> CaffeBuild:
    """Locate pycaffe's extension and read its linked libraries (ldd)."""
    try:
        spec = importlib.util.find_spec(PYCAFFE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SetupError("pycaffe is not installed (`import caffe` finds nothing): run scripts/setup.sh")
    pkg = Path(list(spec.submodule_search_locations)[0])
    ext = pkg / "_caffe.so"
    if not ext.exists():
        raise SetupError(f"pycaffe at {pkg} has no _caffe.so: its build is incomplete; "
                         "run scripts/setup.sh")
    libs: tuple[str, ...] = ()
    if shutil.which("ldd"):
        out = subprocess.run(["ldd", str(ext)], capture_output=True, text=True).stdout
        libs = tuple(sorted({m.group(1) for m in re.finditer(r"^\s*(\S+\.so[.\d]*)", out, re.M)}))
    cuda = any("cudart" in lib or "cublas" in lib for lib in libs)
    blas = next((name for key, name in (("openblas", "OpenBLAS"), ("mkl", "MKL"),
                                        ("atlas", "ATLAS"), ("libblas", "reference BLAS"))
                 if any(key in lib for lib in libs)), "unknown")
    return CaffeBuild(pkg, cuda, blas, libs)


class CaffeNetHandle(NetHandle):
    """A net living in the worker process.

    If the worker died since the net was loaded (a Caffe abort on an earlier
    input), the net is loaded again in the new worker before the next call,
    so one bad image does not fail every image after it.
    """

    def __init__(self, runner: "CaffeRunner", model_def: Path, weights: Path | None) -> None:
        self.runner, self.model_def, self.weights = runner, model_def, weights
        self.handle, self.generation = self._load()

    def _load(self) -> tuple[int, int]:
        what = f"loading {self.model_def.name}" + (f" with {self.weights.name}" if self.weights else "")
        handle = self.runner.box.call("load", str(self.model_def),
                                      str(self.weights) if self.weights else None,
                                      context=what, path=self.model_def)
        return handle, self.runner.box.generation

    def _call(self, name: str, *args, context: str):
        if self.runner.box.generation != self.generation or not self.runner.box.running:
            self.runner.restore_mode()
            self.handle, self.generation = self._load()
        return self.runner.box.call(name, self.handle, *args, context=context, path=self.model_def)

    def forward(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Inputs and outputs cross to the worker in shared memory (worker.Region), not the pipe."""
        return self._call("forward_shared", inputs, outputs, context=f"running {self.model_def.name}")

    def input_array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Where to write input `name` (float32, `shape`) for the next forward: the worker's shared
        memory, so preprocessing's result is the only copy this process makes."""
        return self.runner.box.worker.input_array(name, shape)

    def timed_forward(self, inputs, outputs, repeats: int = 1):
        return self._call("timed_forward", inputs, outputs, repeats,
                          context=f"running {self.model_def.name}")

    def params(self) -> dict[str, list[np.ndarray]]:
        return self._call("params", context="reading parameters")

    def param_digests(self) -> dict[str, list[tuple[tuple[int, ...], str]]]:
        return self._call("param_digests", context="reading parameters")

    def blob_shapes(self) -> dict[str, tuple[int, ...]]:
        return self._call("blob_shapes", context="reading blob shapes")

    def close(self) -> None:
        box = self.runner.box
        if box.running and box.generation == self.generation:
            box.call("release", self.handle)


class CaffeRunner:
    """Loads nets into a sandboxed Caffe, in CPU mode or on one GPU."""

    name = CAFFE

    def __init__(self, gpu: int | None = None, verbose: bool = False, box: Sandbox | None = None) -> None:
        self.box = box or shared(verbose=verbose)
        self.gpu = gpu
        self.restore_mode()

    def restore_mode(self) -> None:
        """Put the (possibly new) worker in this runner's CPU/GPU mode."""
        gpu = self.gpu
        if gpu is not None:
            build = caffe_build()
            if not build.cuda:
                raise DeviceError(f"--gpu {gpu}: this Caffe ({build.pycaffe}) was built CPU_ONLY; "
                                  "rebuild it with FCNIFY_CUDA=1 scripts/setup.sh, or use "
                                  "--engine torch")
            problem = self.box.call("gpu_probe", gpu, context=f"probing GPU {gpu}")
            if problem:
                raise DeviceError(f"--gpu {gpu}: GPU {gpu} is not usable: {problem}")
            try:
                self.box.call("set_mode", gpu, context=f"selecting GPU {gpu}")
            except EngineCrash as exc:
                raise DeviceError(f"GPU {gpu} is not usable: {exc.message}") from None
        else:
            self.box.call("set_mode", None, context="selecting CPU mode")

    def load(self, model_def: str | Path, weights: str | Path | None = None) -> CaffeNetHandle:
        return CaffeNetHandle(self, Path(model_def), Path(weights) if weights else None)

    def max_rss(self) -> int:
        return self.box.call("max_rss")

    def layer_types(self) -> frozenset[str]:
        return registered_layer_types()

    def memory(self, net, height: int, width: int) -> MemoryEstimate:
        """Caffe's own memory, modelled from the blob shapes (planner.py)."""
        return estimate(net, height, width)

    def close(self) -> None:
        """Nothing to free: the worker is shared by the process and closed at exit."""


@lru_cache(maxsize=1)
def registered_layer_types() -> frozenset[str]:
    """Layer types this Caffe build registers (from set-up's record, else asked of Caffe)."""
    recorded = setup_record().get("layer_types")
    if recorded:
        return frozenset(recorded)
    return frozenset(shared().call("info", context="listing Caffe's layer types")["layer_types"])
