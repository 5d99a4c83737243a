"""The engine contract and the one table of engines, looked up by name.

An engine runs Caffe nets: `caffe` (pycaffe in fcnify's worker process,
caffe_engine.py), `torch` (PyTorch, torch_engine.py) and `onnx` (the net exported
to ONNX and run by ONNX Runtime, onnx_engine.py). Every caller (the CLI's
--engine choices, DenseModel, convert, verify, Dask workers) picks one from
`ENGINES` by name, so adding an engine is one module plus one row here.

`auto` (DEFAULT_ENGINE: classify-map, DenseModel, classify_map, Dask) is not an
engine but a choice: the first of AUTO_ORDER whose package is installed, the
fastest engine that is exact to float32 rounding. `convert` and `verify` run
PROOF_ENGINE, Caffe itself, so that equivalence is proven against the
framework the net was trained in.

The table names each engine's module and class as text and imports it on
first use: the optional engines' packages (torch, onnxruntime) are only
needed by whoever chooses them.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..caffe.netdef import ENGINE_PARAMS
from ..errors import FcnifyError, InputError, NetDefinitionError, SetupError
from ..caffe.planner import MemoryEstimate
from ..caffe.shapes import infer

ParamDigests = dict[str, list[tuple[tuple[int, ...], str]]]


@runtime_checkable
class LoadedNet(Protocol):
    """One net loaded by an engine, with its weights; close() frees it (also as `with`)."""

    def forward(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Run on `inputs` (blob name -> N x C x H x W float32, any size the net takes);
        copies of the named blobs."""

    def timed_forward(self, inputs: dict[str, np.ndarray], outputs: list[str],
                      repeats: int = 1) -> tuple[dict[str, np.ndarray], list[float]]:
        """forward(), then `repeats` more passes timed inside the engine (benchmarks)."""

    def params(self) -> dict[str, list[np.ndarray]]:
        """Every parameterised layer's blobs as the engine holds them."""

    def param_digests(self) -> ParamDigests:
        """(shape, caffemodel.digest) of every parameter blob: checked without copying them out."""

    def blob_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of every blob at the last input size."""

    def close(self) -> None:
        """Free the net (memory, worker handles); the handle is unusable afterwards."""

    def __enter__(self) -> "LoadedNet": ...

    def __exit__(self, *exc) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """What fcnify needs of an engine (see the module docstring)."""

    name: str

    def load(self, model_def: str | Path, weights: str | Path | None = None) -> LoadedNet:
        """Load a net definition with its caffemodel (None: a net without parameters)."""

    def layer_types(self) -> frozenset[str]:
        """Caffe layer types this engine runs; others are refused before loading."""

    def memory(self, net, height: int, width: int) -> MemoryEstimate:
        """Predicted memory for one forward pass of the (fully-convolutional) NetParameter
        `net` on a height x width input: what the tile planner budgets with."""

    def close(self) -> None:
        """Release what the engine itself holds (not the nets it loaded)."""


class NetHandle:
    """Mixin: a LoadedNet's `with` support, closing it on every path."""

    def input_array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array to write input `name` into before forward (an engine whose inputs
        cross to another process gives its shared memory)."""
        return np.empty(shape, np.float32)

    def close(self) -> None:  # pragma: no cover - every handle defines its own
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def timed_forward(self, inputs: dict[str, np.ndarray], outputs: list[str],
                      repeats: int = 1) -> tuple[dict[str, np.ndarray], list[float]]:
        """forward(), then `repeats` more passes timed from the call to the outputs in hand."""
        out = self.forward(inputs, outputs)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.forward(inputs, outputs)
            times.append(time.perf_counter() - t0)
        return out, times


class ShapeCheckedHandle(NetHandle):
    """Mixin for engines that run a parsed net without Caffe: Caffe's input and Reshape checks.

    Needs `net`, `model_def`, `inputs` (the input blob names), `_shapes_key` (None at first)
    and `_blob_shapes`; the shapes are inferred again only when the input shapes change.
    """

    def _check_inputs(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> None:
        unknown = [n for n in inputs if n not in self.inputs]
        missing = [n for n in self.inputs if n not in inputs]
        if unknown or missing:
            raise InputError(f"{self.model_def.name} takes input blob(s) {', '.join(self.inputs)}; "
                             + (f"got unknown {', '.join(unknown)}" if unknown else
                                f"missing {', '.join(missing)}"))
        key = tuple((n, tuple(np.shape(inputs[n]))) for n in self.inputs)
        if key != self._shapes_key:  # Caffe's Reshape checks, with the layer's name on failure
            self._blob_shapes = infer(self.net, dict(key), path=self.model_def).blobs
            self._shapes_key = key
        absent = [n for n in outputs if n not in self._blob_shapes]
        if absent:
            raise InputError(f"{self.model_def.name} has no blob named {', '.join(map(repr, absent))}")


@dataclass(frozen=True)
class EngineEntry:
    """One row of the table: where the engine lives and what it needs."""

    name: str
    module: str
    cls: str
    summary: str
    needs: str | None = None  # the module the engine imports (None: always tried)
    bf16: str = ""  # how it computes --precision bf16 ("": float32 only)

    def installed(self) -> bool:
        """Whether the engine's package can be imported (looked up, not imported: cheap)."""
        import importlib.util
        return self.needs is None or importlib.util.find_spec(self.needs) is not None

    def create(self, gpu: int | None = None, *, verbose: bool = False, precision: str = "f32") -> Engine:
        """The engine, on the CPU or CUDA device `gpu` (SetupError if its package is missing)."""
        factory = getattr(importlib.import_module(self.module), self.cls)
        if precision != "f32":  # only engines with a bf16 way take the argument
            return factory(gpu=gpu, verbose=verbose, precision=precision)
        return factory(gpu=gpu, verbose=verbose)


_CAFFE = EngineEntry("caffe", "fcnify.engines.caffe_engine", "CaffeRunner",
                     "pycaffe, in fcnify's worker process")
ENGINES: dict[str, EngineEntry] = {e.name: e for e in (
    _CAFFE,
    EngineEntry("torch", "fcnify.engines.torch_engine", "TorchRunner",
                "PyTorch, without pycaffe (pip install 'fcnify[torch]')", needs="torch",
                bf16="torch.autocast(bfloat16): convolutions and matrix products in bf16"),
    EngineEntry("onnx", "fcnify.engines.onnx_engine", "OnnxRunner",
                "the net exported to ONNX, run by ONNX Runtime (pip install 'fcnify[onnx]')",
                needs="onnxruntime"),
    EngineEntry("openvino", "fcnify.engines.openvino_engine", "OpenvinoRunner",
                "the net exported to ONNX, run by OpenVINO (pip install 'fcnify[openvino]')",
                needs="openvino", bf16="OpenVINO's inference precision hint bf16 (AMX / AVX512-BF16)"),
)}

CAFFE = _CAFFE.name  # Caffe itself: the engine the others are checked against
AUTO = "auto"
AUTO_ORDER = ("onnx", CAFFE)  # fastest first; each exact to float32 rounding
AUTO_ORDER_BF16 = ("openvino", "torch")  # auto with --precision bf16
DEFAULT_ENGINE = AUTO  # classify-map, DenseModel, classify_map and the Dask workers
PROOF_ENGINE = CAFFE  # convert and verify: equivalence proven by Caffe itself


def engine_names() -> list[str]:
    """The names --engine accepts: auto, then the table's order."""
    return [AUTO, *ENGINES]


def engine_help() -> str:
    """classify-map's --engine help, from the table's summaries: a new row is listed by itself."""
    rows = "; ".join(f"{entry.name}: {entry.summary}" for entry in ENGINES.values())
    return (f"{rows}; auto: the first installed of {', '.join(AUTO_ORDER)} (the choice is in the "
            "summary and map.json).")


def resolve_engine(name: str = DEFAULT_ENGINE, precision: str = "f32") -> str:
    """`auto` as the engine it picks (the first of AUTO_ORDER, or of AUTO_ORDER_BF16 for bf16,
    that is installed); other names as given."""
    if name != AUTO:
        return name
    order = AUTO_ORDER_BF16 if precision == "bf16" else AUTO_ORDER
    return next((n for n in order if ENGINES[n].installed()), order[-1])


def bf16_engines() -> list[str]:
    """The engines that compute --precision bf16, in the table's order."""
    return [name for name, entry in ENGINES.items() if entry.bf16]


def check_choice(name: str = DEFAULT_ENGINE, precision: str = "f32") -> str:
    """The engine `name` resolves to, refused in one line (exit 2) before any work or output
    when its package is missing or it cannot compute `precision` here."""
    from .cpu import check_precision
    resolved = resolve_engine(name, precision)
    entry = ENGINES.get(resolved)
    if entry is None:
        raise InputError(f"unknown engine '{name}' (one of: {', '.join(engine_names())})")
    if not entry.installed():
        extra = resolved if resolved in ("torch", "onnx", "openvino") else None
        raise SetupError(f"--engine {resolved}: its package ({entry.needs}) is not installed"
                         + (f": pip install 'fcnify[{extra}]'" if extra else ""))
    check_precision(precision, resolved, bf16_engines())
    return resolved


def make_engine(name: str = DEFAULT_ENGINE, gpu: int | None = None, *, verbose: bool = False,
                precision: str = "f32") -> Engine:
    """The engine called `name` from ENGINES (`auto`: resolve_engine's pick), computing in
    `precision` (cpu.check_precision refuses what the engine or the CPU cannot run)."""
    from .cpu import check_precision
    name = resolve_engine(name, precision)
    entry = ENGINES.get(name)
    if entry is None:
        raise InputError(f"unknown engine '{name}' (one of: {', '.join(engine_names())})")
    check_precision(precision, name, bf16_engines())
    return entry.create(gpu, verbose=verbose, precision=precision)


def _caffe_has_cudnn() -> bool:
    """Whether the installed pycaffe links cuDNN (read from its libraries, without importing it)."""
    from .caffe_engine import caffe_build
    try:
        return any("cudnn" in lib for lib in caffe_build().libraries)
    except FcnifyError:
        return False


def check_layer_types(net, registered: frozenset[str] | set[str], path: Path | None,
                      engine: str = CAFFE) -> None:
    """Refuse layer types the engine cannot run (this Caffe build would abort on them).

    Caffe also aborts on `engine: CUDNN` when it was built without cuDNN.
    """
    import difflib
    for layer in net.layer:
        param = getattr(layer, ENGINE_PARAMS[layer.type]) if layer.type in ENGINE_PARAMS else None
        if (engine == CAFFE and param is not None and param.engine == param.CUDNN
                and not _caffe_has_cudnn()):
            raise NetDefinitionError(f"layer '{layer.name}' asks for engine CUDNN, and this Caffe "
                                     "build has no cuDNN; remove the engine setting", path)
        if layer.type not in registered and engine != CAFFE:
            raise NetDefinitionError(f"layer '{layer.name}': layer type '{layer.type}' is not "
                                     f"supported by the {engine} engine", path)
        if layer.type not in registered:
            close = difflib.get_close_matches(layer.type, sorted(registered), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise NetDefinitionError(f"layer '{layer.name}': unknown layer type '{layer.type}'"
                                     f"{hint}; this Caffe build does not register it", path)
