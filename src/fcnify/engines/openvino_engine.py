"""The openvino engine: the net exported to ONNX (onnx_export.py) and run by OpenVINO.

`OpenvinoRunner` follows the engine contract (engines.Engine) as the onnx
engine does: `load` reads the prototxt and caffemodel with fcnify's own
readers, builds the ONNX graph in memory (free input height and width) and
reads it into OpenVINO; the graph is rebuilt only when a caller asks for a
blob that is not yet an output. It is compiled once, with height and width
left dynamic: every image and tile size runs on one compiled net (compiling
per static shape ran no faster on CaffeNet and held a repacked copy of the
weights, about 250 MB, per shape).

Precision is stated, never implied: OpenVINO's CPU plugin computes in bf16
by default on CPUs with AMX, so fcnify always sets INFERENCE_PRECISION_HINT,
to f32 (within the float32 bound of Caffe, like the other engines) unless
`precision="bf16"` (--precision bf16, cpu.py's check) asks for bf16.

Runs on the CPU, or with --gpu ID on OpenVINO's Intel GPU plugin (GPU.ID).

`import openvino` would start the package's usage telemetry (openvino_telemetry:
a client id written under ~/intel and an event sent to Google Analytics unless
the user opted out); fcnify imports it with that package blocked, so OpenVINO
falls back to its own no-op stub. docs/engines.md says more.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from . import bf16_engines
from ..caffe.planner import MemoryEstimate
from ..caffe.shapes import image_input, infer
from ..errors import DeviceError, FcnifyError, ResourceError, SetupError
from .cpu import check_precision
from .onnx_engine import ExportedNet, _first_line, onnx_memory, process_rss
from .onnx_export import EXPORTABLE, require_onnx, to_onnx

# Measured peak RSS of a fresh process (loading and one whole pass, over the RSS before
# loading): CaffeNet's FCN at 451-1795 px (scripts/bench/bench_batch.py --only memory, 233 MB of
# weights W; docs/benchmarks.md) and tests/test_planner.py's activation-heavy WIDE net at
# 300-900 px (tests/test_openvino_engine.py checks it). OpenVINO's CPU plugin costs about
# 64 MiB on first use; loading peaks at 4.9 W beyond it (fcnify's arrays, the serialized
# ONNX model, OpenVINO's constants), modelled as the weights held twice; the first pass
# repacks the weights (0.71 W, at any size). Per byte of onnx_memory()'s live blobs a pass
# adds 1.24 (WIDE) to 1.95 (CaffeNet) bytes, and nothing for im2col buffers (OpenVINO's
# convolutions need none): the larger factor is used, so the planner never plans above
# what was measured, and over-estimates WIDE-like nets by up to 1.95 / 1.24.
OV_BASE = 64 << 20
OV_WEIGHT_COPIES = 2.43
OV_FIRST_PASS = 0.71  # x W, counted with the activations (io)
OV_BLOBS = 1.95
OV_BLOB_SPREAD = 1.95 / 1.24  # the measured factors' spread: how far over a net may be planned


def _import_openvino():
    """The openvino module without its telemetry (module docstring), or None when not installed."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    blocked = "openvino_telemetry" not in sys.modules
    if blocked:
        sys.modules["openvino_telemetry"] = None  # `import openvino_telemetry` raises ImportError
    try:
        import openvino
    except ImportError:
        return None
    finally:
        if blocked:
            sys.modules.pop("openvino_telemetry", None)
    return openvino


ov = _import_openvino()
_core = None


def core():
    """One OpenVINO Core per process (it owns the plugins and their thread pools)."""
    global _core
    if _core is None:
        _core = ov.Core()
    return _core


class OpenvinoRunner:
    """Runs Caffe nets in OpenVINO on the CPU (or Intel GPU `gpu`), in f32 unless asked for bf16."""

    name = "openvino"
    batches = True  # one forward takes N images (the graph's batch axis is free): --batch

    def __init__(self, gpu: int | None = None, verbose: bool = False, precision: str = "f32") -> None:
        if ov is None:
            raise SetupError("the openvino engine needs OpenVINO: pip install 'fcnify[openvino]'")
        require_onnx()
        self.gpu, self.verbose = gpu, verbose
        self.device = device_name(gpu)
        check_precision(precision, self.name, bf16_engines(), ov_capabilities(self.device))
        self.precision = precision
        self.base = process_rss()  # OpenVINO runs in this process: what it holds counts (onnx_engine)

    def load(self, model_def: str | Path, weights: str | Path | None = None) -> "OpenvinoNet":
        return OpenvinoNet(Path(model_def), Path(weights) if weights else None, self)

    def layer_types(self) -> frozenset[str]:
        return EXPORTABLE

    def memory(self, net, height: int, width: int) -> MemoryEstimate:
        return openvino_memory(net, height, width, base=self.base)

    def close(self) -> None:
        """Compiled nets belong to the nets, which close themselves."""

    def config(self) -> dict[str, str]:
        """compile_model's settings: the precision said explicitly (module docstring)."""
        return {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}


def device_name(gpu: int | None) -> str:
    """OpenVINO's device for the CPU or Intel GPU `gpu`, or DeviceError saying why not."""
    if gpu is None:
        return "CPU"
    devices = core().available_devices
    name = f"GPU.{gpu}" if f"GPU.{gpu}" in devices else ("GPU" if gpu == 0 and "GPU" in devices else None)
    if name is None:
        raise DeviceError(f"--gpu {gpu}: OpenVINO ({ov.__version__}) sees no Intel GPU {gpu} (devices: "
                          f"{', '.join(devices)}); leave out --gpu to run on the CPU")
    return name


def ov_capabilities(device: str) -> frozenset[str]:
    """The device's OPTIMIZATION_CAPABILITIES (BF16, FP16, ...) as OpenVINO reports them."""
    try:
        return frozenset(str(c) for c in core().get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # an old plugin without the property: nothing claimed
        return frozenset()


class OpenvinoNet(ExportedNet):
    """One net in OpenVINO: its model, compiled per input shape, and the Caffe blobs it returns."""

    def __init__(self, model_def: Path, weights: Path | None, runner: OpenvinoRunner) -> None:
        self.model = self.compiled = self.request = None
        super().__init__(model_def, weights, runner)

    def _open(self, outputs: tuple[str, ...]) -> None:
        """(Re)build the graph with `outputs` and read it into OpenVINO (compiled on first use)."""
        model = to_onnx(self.net, self._params, list(outputs), self.model_def)
        data = model.SerializeToString()
        del model
        self.model = self.compiled = self.request = None  # the old net's memory goes first
        try:
            self.model = core().read_model(data, b"")
        except Exception as exc:  # OpenVINO raises its own exception types
            raise FcnifyError(f"OpenVINO could not read the exported net: {_first_line(exc)}",
                              self.model_def) from None
        del data
        try:
            self.compiled = core().compile_model(self.model, self.runner.device, self.runner.config())
        except Exception as exc:
            text = _first_line(exc)
            kind = ResourceError if "alloc" in text.lower() or "memory" in text.lower() else FcnifyError
            raise kind(f"OpenVINO could not compile {self.model_def.name}: {text}", self.model_def) from None
        self.request = self.compiled.create_infer_request()
        self._outputs = outputs

    # -- the engine contract (engines.LoadedNet)

    def forward(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Run on `inputs` (any size the net accepts) and return copies of the blobs `outputs`."""
        feeds = self._prepare(inputs, outputs)
        request = self.request
        try:
            request.infer(feeds)
        except MemoryError:
            raise ResourceError("OpenVINO ran out of memory; map in tiles with --tile N, or use a "
                                "smaller --max-memory", self.model_def) from None
        except Exception as exc:
            raise FcnifyError(f"OpenVINO failed running {self.model_def.name}: {_first_line(exc)}",
                              self.model_def) from None
        return {o: np.array(request.get_tensor(o).data, dtype=np.float32) for o in outputs}

    def close(self) -> None:
        self.model = self.compiled = self.request = None
        self._params = {}


def openvino_memory(net, height: int, width: int, base: int = 0) -> MemoryEstimate:
    """This process's memory for one OpenVINO pass of height x width: `base` (what it held
    before the net) and OpenVINO's plugin, onnx_memory's live activations, and the weights,
    with OpenVINO's measured factors (the constants above)."""
    from dataclasses import replace
    from ..caffe.planner import FLOAT
    from ..caffe.shapes import count
    est = onnx_memory(net, height, width)
    name, declared = image_input(net)
    shapes = infer(net, {name: (1, declared[1], height, width)})
    weights = sum(count(p) for ls in shapes.layers for p in ls.params) * FLOAT
    return replace(est, blobs=int(est.blobs * OV_BLOBS), buffers=0, slack=1.0,
                   params=int(weights * OV_WEIGHT_COPIES), io=int(weights * OV_FIRST_PASS),
                   base=base + OV_BASE)
