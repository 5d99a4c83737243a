"""The onnx engine: Caffe nets exported to ONNX (onnx_export.py) and run by ONNX Runtime.

`OnnxRunner` follows the engine contract (engines.Engine): `load` reads the
prototxt and caffemodel with fcnify's own readers, builds the ONNX graph in
memory with free input height and width, and opens one ONNX Runtime session
on it; the session is rebuilt only when a caller asks for a blob that is not
yet a graph output. Runs on the CPU, or with --gpu on ONNX Runtime's CUDA
execution provider (TF32 off, so results match Caffe's to float rounding;
TensorRT when FCNIFY_ORT_TENSORRT=1, whose TF32 default does not).

Memory for the tile planner is this process's, as --max-memory means it:
what the process held before the first net (measured when the runner
starts), the weights and ONNX Runtime's reordered copies of them, and the
activations alive at the same time (its allocation planner frees a tensor
after its last reader), with factors measured against the process's peak RSS.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import NetHandle, ShapeCheckedHandle
from ..errors import DeviceError, FcnifyError, ResourceError, SetupError
from ..caffe.geometry import output_blobs, score_blob
from ..caffe.caffemodel import digest
from ..caffe.netdef import read_netdef
from .onnx_cache import (cached_graph, commit_session, drop_session, graph_key, read_session,
                         session_key, session_options, session_target)
from .onnx_export import EXPORTABLE, check_exportable, net_params, to_onnx
from ..caffe.planner import FLOAT, MemoryEstimate
from ..caffe.shapes import count, image_input, infer, input_shapes

try:
    import onnxruntime as ort
except ImportError:  # the optional extra (pip install 'fcnify[onnx]') is not installed
    ort = None

# Measured (scripts/bench/bench_dense.py, section (f), a fresh process per size, CaffeNet's
# 233 MB of weights): after loading, 2.3-2.4x the weights stay resident (fcnify's arrays,
# which ONNX Runtime reads in place, and its own reordered NCHWc/prepacked copies);
# loading peaks at 4.6-4.8x, which `total` models as held weights twice.
ORT_WEIGHT_COPIES = 2.4
# Peak RSS growth of one pass over the activations alive together (each freed after
# its last reader), a fresh process per net and size: 1.09-1.10 for 3x3 and 1x1
# convolutions (600-1400 px), 1.93-2.16 for GoogLeNet (its NCHWc reorders, LRN and
# concatenations; 600-1400 px), at most 1.67 for CaffeNet (2600 px). ONNX Runtime
# runs convolutions without Caffe's im2col buffer (the old model counted it, and
# over-estimated 3x3 nets 3x while under-estimating GoogLeNet and 1x1 nets 2x).
ORT_LIVE = 3.0


def process_rss() -> int:
    """This process's resident memory now, in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class OnnxRunner:
    """Runs Caffe nets in ONNX Runtime, on the CPU or CUDA device `gpu`."""

    name = "onnx"
    checks_weights = True  # load() reads the caffemodel once and checks it (net_params)
    batches = True  # one forward takes N images (the graph's batch axis is free): --batch

    def __init__(self, gpu: int | None = None, verbose: bool = False) -> None:
        if ort is None:
            raise SetupError("the onnx engine needs ONNX Runtime: pip install 'fcnify[onnx]'")
        self.gpu = gpu
        self.verbose = verbose
        self.providers = execution_providers(gpu)
        # ONNX Runtime runs in this process: what it held before any net counts against
        # the budget (Python, numpy, ONNX Runtime's libraries; about 80-100 MiB)
        self.base = process_rss()

    def load(self, model_def: str | Path, weights: str | Path | None = None) -> "OnnxNet":
        return OnnxNet(Path(model_def), Path(weights) if weights else None, self)

    def layer_types(self) -> frozenset[str]:
        return EXPORTABLE

    def memory(self, net, height: int, width: int) -> MemoryEstimate:
        return onnx_memory(net, height, width, base=self.base)

    def close(self) -> None:
        """Sessions belong to the nets, which close themselves."""


def execution_providers(gpu: int | None) -> list:
    """ONNX Runtime's providers for the CPU or CUDA device `gpu`, or DeviceError saying why not."""
    if gpu is None:
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise DeviceError(f"--gpu {gpu}: this ONNX Runtime ({ort.__version__}) has no CUDA execution "
                          f"provider (it has {', '.join(available)}); install onnxruntime-gpu, or leave "
                          "out --gpu to run on the CPU")
    chosen: list = []
    if os.environ.get("FCNIFY_ORT_TENSORRT") == "1" and "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", {"device_id": gpu}))
    chosen.append(("CUDAExecutionProvider", {"device_id": gpu, "use_tf32": 0}))
    chosen.append("CPUExecutionProvider")
    return chosen


class ExportedNet(ShapeCheckedHandle):
    """A Caffe net exported to ONNX (onnx_export.py) in a runtime that reads the graph: what the
    onnx and openvino handles share. A subclass's `_open(outputs)` (re)builds its runtime's
    graph with those Caffe blobs as outputs and sets `_outputs`."""

    def __init__(self, model_def: Path, weights: Path | None, runner) -> None:
        self.model_def, self.runner = model_def, runner
        self.net = read_netdef(model_def).param
        check_exportable(self.net, model_def)
        self.inputs = input_shapes(self.net)
        self._blob_shapes = infer(self.net, path=model_def).blobs
        self._shapes_key: tuple | None = None
        self.weights = weights
        self._arrays: dict[str, list[np.ndarray]] | None = None  # read on first use (_params)
        self._outputs: tuple[str, ...] = ()
        self._open(tuple(dict.fromkeys([*output_blobs(self.net), score_blob(self.net)])))

    @property
    def _params(self) -> dict[str, list[np.ndarray]]:
        """The caffemodel's arrays, read and checked (net_params) the first time they are needed:
        a session read from the cache (onnx_cache.py) holds its own copy and never needs them."""
        if self._arrays is None:
            self._arrays = net_params(self.net, self.weights, self.model_def)
        return self._arrays

    @_params.setter
    def _params(self, value: dict[str, list[np.ndarray]]) -> None:
        self._arrays = value

    def _open(self, outputs: tuple[str, ...]) -> None:  # pragma: no cover - each runtime has its own
        raise NotImplementedError

    def _prepare(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Check `inputs`, make `outputs` graph outputs if they are not yet, and return the feeds."""
        self._check_inputs(inputs, outputs)
        missing = [o for o in outputs if o not in self._outputs]
        if missing:
            self._open(tuple(dict.fromkeys([*self._outputs, *missing])))
        return {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in inputs.items()}

    def params(self) -> dict[str, list[np.ndarray]]:
        return {name: [a.copy() for a in arrays] for name, arrays in self._params.items()}

    def param_digests(self) -> dict[str, list[tuple[tuple[int, ...], str]]]:
        """(shape, BLAKE2b-128) of each parameter array that the runtime was handed."""
        return {name: [(tuple(a.shape), digest(a)) for a in arrays] for name, arrays in self._params.items()}

    def blob_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._blob_shapes)


class OnnxNet(ExportedNet):
    """One net in ONNX Runtime: its session, the Caffe blobs it returns, its weights' digests."""

    def __init__(self, model_def: Path, weights: Path | None, runner: OnnxRunner) -> None:
        self._values: list = []
        self.session = None
        super().__init__(model_def, weights, runner)

    def _open(self, outputs: tuple[str, ...]) -> None:
        """(Re)build the graph with `outputs` and start a session on it.

        On the CPU the optimized session is kept between runs (onnx_cache.py): a later
        run reads it with graph optimization off and never reads the caffemodel. Otherwise
        the weights reach ONNX Runtime as this object's own arrays (external initializers),
        not through protobuf: no copies of them while loading.
        """
        self.session = None  # the old session's memory goes before the new one's arrives
        key = self._session_key(outputs)
        if key is not None and self._cached_session(key):
            self._outputs = outputs
            return
        data, names = cached_graph(self.net, outputs, lambda: self._build(outputs))
        values = []
        for name in names:
            layer, _, index = name.rpartition("/")
            values.append(ort.OrtValue.ortvalue_from_numpy(self._params[layer][int(index)]))
        options = self._options()
        options.add_external_initializers(names, values)
        target = session_target(key) if key is not None else None
        if target is not None:
            session_options(options, target)
        try:
            self.session = ort.InferenceSession(data, options, providers=self.runner.providers)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            if target is not None:
                import shutil
                shutil.rmtree(target, ignore_errors=True)
            raise FcnifyError(f"ONNX Runtime could not load the exported net: {_first_line(exc)}",
                              self.model_def) from None
        if target is not None:
            commit_session(key, target)
        self._values = values  # ONNX Runtime reads these arrays: they live as long as the session
        if self.runner.gpu is not None and "CUDAExecutionProvider" not in self.session.get_providers():
            raise DeviceError(f"--gpu {self.runner.gpu}: ONNX Runtime's CUDA execution provider did "
                              "not start (no NVIDIA GPU or driver, or no such device?)")
        self._outputs = outputs

    def _options(self, optimize: bool = True):
        options = ort.SessionOptions()
        options.log_severity_level = 0 if self.runner.verbose else 3
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return options

    def _session_key(self, outputs: tuple[str, ...]) -> str | None:
        """The cache key of the optimized session (None: not kept, on a GPU or without a cache)."""
        if self.runner.gpu is not None or os.environ.get("FCNIFY_ORT_SESSION_CACHE") == "0":
            return None
        try:
            return session_key(graph_key(self.net, outputs), self.weights, ort.__version__,
                               {"providers": [str(p) for p in self.runner.providers],
                                "graph_optimization_level": str(self._options().graph_optimization_level)})
        except OSError:  # weights that cannot be stat'ed: net_params says why, below
            return None

    def _cached_session(self, key: str) -> bool:
        """Start the session from the stored optimized model; False when there is none (or it is
        damaged, or ONNX Runtime refuses it: then it is removed and built again)."""
        model = read_session(key)
        if model is None:
            return False
        try:
            self.session = ort.InferenceSession(str(model), self._options(optimize=False),
                                                providers=self.runner.providers)
        except Exception:
            drop_session(key)
            return False
        self._values = []
        return True

    def _build(self, outputs: tuple[str, ...]) -> tuple[bytes, list[str]]:
        """The serialized graph with `outputs`, and the names of its external initializers (LAYER/INDEX)."""
        model = to_onnx(self.net, self._params, list(outputs), self.model_def, external=True)
        names = [init.name for init in model.graph.initializer
                 if init.data_location == init.EXTERNAL and init.name.rpartition("/")[0] in self._params]
        return model.SerializeToString(), names

    # -- the engine contract (engines.LoadedNet)

    def forward(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Run on `inputs` (any size the net accepts) and return the blobs `outputs`."""
        feeds = self._prepare(inputs, outputs)
        try:
            got = self.session.run(list(outputs), feeds)
        except MemoryError:
            raise ResourceError("ONNX Runtime ran out of memory; map in tiles with --tile N, or use "
                                "a smaller --max-memory", self.model_def) from None
        except Exception as exc:
            text = _first_line(exc)
            kind = ResourceError if "alloc" in text.lower() else FcnifyError
            raise kind(f"ONNX Runtime failed running {self.model_def.name}: {text}",
                       self.model_def) from None
        return dict(zip(outputs, got))

    def close(self) -> None:
        self.session = None
        self._params, self._values = {}, []

    # -- checks



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def onnx_memory(net, height: int, width: int, base: int = 0) -> MemoryEstimate:
    """This process's memory for one ONNX Runtime pass of height x width: `base` (what it
    held before the net), the weights, the activations alive together (each freed after
    its last reader) and the input and outputs on their way in and out."""
    name, declared = image_input(net)
    shape = (1, declared[1], height, width)
    try:
        shapes = infer(net, {name: shape})
    except FcnifyError as exc:
        raise ResourceError(f"an input of {width}x{height} px cannot be run: {exc.message}") from None
    size: dict[tuple[str, int], int] = {}  # (blob, layer that wrote it) -> bytes
    end: dict[tuple[str, int], int] = {}  # -> index of the last layer that reads it
    current: dict[str, tuple[str, int]] = {}
    for i, (layer, ls) in enumerate(zip(net.layer, shapes.layers)):
        for b in layer.bottom:
            end[current[b]] = i
        for top, top_shape in zip(layer.top, ls.tops):
            current[top] = (top, i)
            size[(top, i)], end[(top, i)] = count(top_shape) * FLOAT, i
    outputs = output_blobs(net)
    for blob in outputs:  # returned to the caller: alive to the end
        end[current[blob]] = len(net.layer)
    peak = max((sum(n for v, n in size.items() if v[1] <= i <= end[v]) for i in range(len(net.layer))),
               default=0)
    params = int(sum(count(p) for ls in shapes.layers for p in ls.params) * FLOAT * ORT_WEIGHT_COPIES)
    io = 2 * (count(shape) + sum(count(shapes.blobs[b]) for b in outputs)) * FLOAT
    largest = max(shapes.blobs.items(), key=lambda kv: count(kv[1]))
    return MemoryEstimate(blobs=peak, buffers=0, params=params, largest_blob=count(largest[1]),
                          largest_blob_name=largest[0], io=io, base=base, slack=ORT_LIVE)


class OnnxFileNet(NetHandle):
    """An exported .onnx file in ONNX Runtime, as a LoadedNet: what `fcnify export` checks
    against Caffe before the file is put in place."""

    def __init__(self, path: Path, providers: list | None = None) -> None:
        if ort is None:
            raise SetupError("the onnx engine needs ONNX Runtime: pip install 'fcnify[onnx]'")
        import onnx
        from onnx import numpy_helper
        self.path = Path(path)
        model = onnx.load(str(self.path))
        self._params: dict[str, list[tuple[int, np.ndarray]]] = {}
        for init in model.graph.initializer:
            layer, _, index = init.name.rpartition("/")
            if layer and index.isdigit() and not layer.startswith("const"):
                self._params.setdefault(layer, []).append((int(index), numpy_helper.to_array(init)))
        del model
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise FcnifyError(f"ONNX Runtime cannot load it: {_first_line(exc)}", self.path) from None
        self.outputs = [o.name for o in self.session.get_outputs()]

    def forward(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        feeds = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in inputs.items()}
        try:
            return dict(zip(outputs, self.session.run(list(outputs), feeds)))
        except Exception as exc:
            raise FcnifyError(f"ONNX Runtime failed running it: {_first_line(exc)}", self.path) from None

    def params(self) -> dict[str, list[np.ndarray]]:
        return {k: [a for _, a in sorted(v, key=lambda t: t[0])] for k, v in self._params.items()}

    def param_digests(self) -> dict[str, list[tuple[tuple[int, ...], str]]]:
        """(shape, BLAKE2b-128) of each of the file's initializers named LAYER/INDEX."""
        return {k: [(tuple(a.shape), digest(a)) for a in arrays] for k, arrays in self.params().items()}

    def blob_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def close(self) -> None:
        self.session = None
        self._params = {}
