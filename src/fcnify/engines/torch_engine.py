"""The torch engine: Caffe nets run by PyTorch, on the CPU or one CUDA GPU, without pycaffe.

`TorchRunner` offers what `caffe_engine.CaffeRunner` offers (load -> handle with
forward, params, param_digests, blob_shapes, close), so every fcnify command
can run on either engine. The net is read with fcnify's own prototxt and
caffemodel readers; each layer becomes the torch ops that compute what
Caffe's Forward_cpu computes, edge rules included:

- Pooling keeps Caffe's output size (ceil rounding by default, and with
  padding the last window is dropped when it would start in the padding).
  MAX pads with -inf; AVE sums the window clipped to the image and divides by
  the window clipped to the *padded* bounds, as pooling_layer.cpp does —
  neither of torch's count_include_pad settings does that at the edges.
- LRN ACROSS_CHANNELS: x / (k + alpha/n * sum of x^2 over n channels)^beta;
  WITHIN_CHANNEL: x / (1 + alpha/n^2 * sum of x^2 over n x n pixels)^beta.
- BatchNorm divides its stored mean and variance by blob 2 (the moving-average
  scale factor), as Caffe does; Dropout is the identity at test time.

Everything runs in float32; on a GPU, TF32 is switched off during forward
passes so that results match Caffe's to float rounding. Only this module and
the scripts import torch; it never imports caffe.
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from ..caffe.caffemodel import digest, read_weights
from . import ShapeCheckedHandle
from ..errors import ArgumentError, DeviceError, FcnifyError, NetDefinitionError, ResourceError, SetupError, \
    WeightsError
from ..caffe.netdef import read_netdef
from ..caffe.planner import MemoryEstimate, estimate
from ..caffe.shapes import Shape, canonical_axis, conv_geometry, count, infer, input_shapes, layer_shapes, \
    pool_geometry, pooled_size, rounds_up
from ..surgery.transplant import check_weights

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the optional extra (pip install 'fcnify[torch]') is not installed
    torch = F = None

SUPPORTED = frozenset({
    "Input", "Convolution", "Pooling", "LRN", "ReLU", "Sigmoid", "TanH", "Dropout",
    "InnerProduct", "Softmax", "Concat", "Eltwise", "BatchNorm", "Scale", "Flatten",
    "Reshape", "Split", "PReLU",
})

Op = Callable[[list], list]


class TorchRunner:
    """Loads Caffe nets into PyTorch, on the CPU or on CUDA device `gpu`."""

    name = "torch"

    def __init__(self, gpu: int | None = None, verbose: bool = False, precision: str = "f32") -> None:
        if torch is None:
            raise SetupError("the torch engine needs PyTorch: pip install 'fcnify[torch]'")
        from . import bf16_engines
        from .cpu import check_precision
        if gpu is None:
            check_precision(precision, self.name, bf16_engines())
        elif precision != "f32":
            raise ArgumentError(f"--precision {precision}: the torch engine's bf16 is for the CPU "
                                "(AMX / AVX512-BF16); leave out --gpu")
        self.gpu, self.precision = gpu, precision
        self.device = torch.device("cpu") if gpu is None else cuda_device(gpu)

    def load(self, model_def: str | Path, weights: str | Path | None = None) -> "TorchNet":
        return TorchNet(Path(model_def), Path(weights) if weights else None, self.device,
                        bf16=self.precision == "bf16")

    def layer_types(self) -> frozenset[str]:
        return SUPPORTED

    def memory(self, net, height: int, width: int) -> MemoryEstimate:
        """Caffe's memory model (planner.py): an over-estimate here, as layers free what
        no later layer reads."""
        return estimate(net, height, width)

    def close(self) -> None:
        """Nothing held beyond the nets, which close themselves."""


def cuda_device(gpu: int) -> "torch.device":
    """torch.device for GPU `gpu`, or DeviceError saying in one line why there is none."""
    with warnings.catch_warnings():  # a CUDA build without a driver warns on stderr
        warnings.simplefilter("ignore")
        available = torch.cuda.is_available()
        n = torch.cuda.device_count() if available else 0
    if not available:
        build = (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                 else "a CPU-only build")
        raise DeviceError(f"--gpu {gpu}: PyTorch {torch.__version__} ({build}) sees no CUDA GPU "
                          "on this machine; leave out --gpu to run on the CPU")
    if not 0 <= gpu < n:
        raise DeviceError(f"--gpu {gpu}: PyTorch sees {n} CUDA GPU(s), numbered 0..{n - 1}")
    return torch.device(f"cuda:{gpu}")


@contextmanager
def exact_float32(device: "torch.device"):
    """Plain float32 matmul/convolution on a GPU (no TF32), restored afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class TorchNet(ShapeCheckedHandle):
    """One loaded net: its layers as torch ops, its parameters on the device."""

    def __init__(self, model_def: Path, weights: Path | None, device: "torch.device", *,
                 bf16: bool = False) -> None:
        self.model_def, self.device, self.bf16 = model_def, device, bf16
        self.net = read_netdef(model_def).param
        for layer in self.net.layer:
            if layer.type not in SUPPORTED:
                raise NetDefinitionError(f"layer '{layer.name}': layer type '{layer.type}' is not "
                                         "supported by the torch engine (it runs "
                                         f"{', '.join(sorted(SUPPORTED))})", model_def)
        self.inputs = input_shapes(self.net)
        shapes = infer(self.net, path=model_def)
        self._params = {name: [torch.from_numpy(a).to(device) for a in arrays]
                        for name, arrays in load_params(shapes, weights, model_def).items()}
        self.ops = [compile_layer(layer, self._params.get(layer.name, [])) for layer in self.net.layer]
        self._shapes_key: tuple | None = None
        self._blob_shapes = shapes.blobs

    # -- the handle interface shared with caffe_engine's handle

    def forward(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Run the net on `inputs` (any size the net accepts) and return copies of `outputs`."""
        blobs = self._run(inputs, outputs)
        return {name: blobs[name].float().cpu().numpy().copy() for name in outputs}

    def timed_forward(self, inputs: dict[str, np.ndarray], outputs: list[str],
                      repeats: int = 1) -> tuple[dict[str, np.ndarray], list[float]]:
        """forward(), then `repeats` more passes, each timed from copying the inputs to the
        device until the device is done (outputs stay there)."""
        out = self.forward(inputs, outputs)
        times = []
        for _ in range(repeats):
            self._sync()
            t0 = time.perf_counter()
            blobs = self._run(inputs, outputs)
            self._sync()
            times.append(time.perf_counter() - t0)
            del blobs
        return out, times

    def params(self) -> dict[str, list[np.ndarray]]:
        return {name: [t.cpu().numpy().copy() for t in ts] for name, ts in self._params.items()}

    def param_digests(self) -> dict[str, list[tuple[tuple[int, ...], str]]]:
        """(shape, BLAKE2b-128) of every parameter as held on the device (caffemodel.digest)."""
        return {name: [(tuple(t.shape), digest(t.cpu().numpy())) for t in ts]
                for name, ts in self._params.items()}

    def blob_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._blob_shapes)

    def close(self) -> None:
        self._params, self.ops = {}, []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- running


    def _run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, "torch.Tensor"]:
        self._check_inputs(inputs, outputs)
        keep = set(outputs)
        last = {}
        for i, layer in enumerate(self.net.layer):
            for name in (*layer.bottom, *layer.top):
                last[name] = i
        blobs: dict[str, torch.Tensor] = {}
        with torch.inference_mode(), exact_float32(self.device), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            for i, (layer, op) in enumerate(zip(self.net.layer, self.ops)):
                if layer.type == "Input":
                    tops = [_tensor(inputs[t], self.device) for t in layer.top]
                else:
                    try:
                        tops = op([blobs[b] for b in layer.bottom])
                    except torch.cuda.OutOfMemoryError:
                        raise ResourceError(f"{self.device} ran out of memory in layer '{layer.name}' "
                                            "(torch engine); map in tiles with --tile N, or use a smaller "
                                            "--max-memory", self.model_def) from None
                    except (RuntimeError, ValueError) as exc:
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        raise FcnifyError(f"torch engine, layer '{layer.name}' ({layer.type}): {first}",
                                          self.model_def) from None
                for name, t in zip(layer.top, tops):
                    blobs[name] = t
                for name in {*layer.bottom, *layer.top}:  # free what no later layer reads
                    if last[name] == i and name not in keep:
                        blobs.pop(name, None)
        return blobs

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _tensor(array: np.ndarray, device: "torch.device") -> "torch.Tensor":
    """A float32 tensor on `device` (numpy's read-only views are copied first)."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    return torch.from_numpy(a if a.flags.writeable else a.copy()).to(device)


def load_params(shapes, weights: Path | None, model_def: Path) -> dict[str, list[np.ndarray]]:
    """Each parameterised layer's blobs from the caffemodel, checked and in their declared shapes."""
    expected = shapes.params()
    if not expected:
        return {}
    if weights is None:
        raise WeightsError("the torch engine needs the net's weights (a .caffemodel): it has "
                           f"{len(expected)} layer(s) with parameters", model_def)
    w = read_weights(weights)
    check_weights(shapes, w, model_def)
    out = {}
    for name, want in expected.items():
        out[name] = [np.array(blob, dtype=np.float32).reshape(shape)  # a writable copy
                     for blob, shape in zip(w[name].blobs, want)]
    return out


# ---------------------------------------------------------------- layers

def compile_layer(layer, params: list) -> Op:
    """The torch function of one layer: list of bottom tensors -> list of top tensors."""
    t = layer.type
    if t == "Input":
        return lambda xs: []
    if t in ("Dropout", "Split"):  # Dropout is the identity at test time
        return lambda xs: [xs[0]] * len(layer.top)
    if t == "ReLU":
        slope = layer.relu_param.negative_slope
        return lambda xs: [F.leaky_relu(xs[0], slope) if slope else F.relu(xs[0])]
    if t == "Sigmoid":
        return lambda xs: [torch.sigmoid(xs[0])]
    if t == "TanH":
        return lambda xs: [torch.tanh(xs[0])]
    if t == "Softmax":
        return lambda xs: [torch.softmax(xs[0], dim=canonical_axis(layer.softmax_param.axis,
                                                                   xs[0].ndim, "softmax axis"))]
    if t in ("Flatten", "Reshape"):
        return lambda xs: [xs[0].reshape(_tops(layer, xs)[0])]
    return _BUILDERS[t](layer, params)


def _tops(layer, xs) -> list[Shape]:
    """Top shapes as Caffe's Reshape computes them (shapes.py), for the given bottoms."""
    return layer_shapes(layer, [tuple(x.shape) for x in xs])[0]


def _convolution(layer, params) -> Op:
    p = layer.convolution_param
    weight = params[0]
    bias = params[1] if p.bias_term else None
    n = weight.ndim - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(n)
    if conv is None:
        raise NetDefinitionError(f"layer '{layer.name}': the torch engine runs 1-3 spatial axes, "
                                 f"not {n}")
    kernel, stride, pad, dilation = conv_geometry(p, n)
    group = p.group or 1

    def run(xs):
        if canonical_axis(p.axis, xs[0].ndim, "axis") != 1 or xs[0].ndim != n + 2:
            raise ValueError(f"input {tuple(xs[0].shape)} does not have channels on axis 1 "
                             f"and {n} spatial axes")
        return [conv(x, weight, bias, stride, pad, dilation, group) for x in xs]
    return run


def _pooling(layer, params) -> Op:
    p = layer.pooling_param
    if p.pool not in (p.MAX, p.AVE):
        raise NetDefinitionError(f"layer '{layer.name}': the torch engine runs MAX and AVE pooling, "
                                 "not STOCHASTIC (which Caffe itself does not run on the CPU)")
    if len(layer.top) > 1:
        raise NetDefinitionError(f"layer '{layer.name}': the torch engine does not produce MAX "
                                 "pooling's second (mask) top")
    ceil = rounds_up(p)

    def run(xs):
        x = xs[0]
        if x.ndim != 4:
            raise ValueError(f"needs a 4-axis input, got {tuple(x.shape)}")
        return [caffe_pool(x, *pool_geometry(p, tuple(x.shape)), is_max=p.pool == p.MAX, ceil=ceil)]
    return run


def caffe_pool(x, kernel, stride, pad, *, is_max: bool, ceil: bool = True):
    """MAX or AVE pooling of an N x C x H x W tensor exactly as Caffe's PoolingLayer."""
    sizes = x.shape[2:]
    out = [pooled_size(sizes[i], kernel[i], stride[i], pad[i], ceil=ceil, padded=any(pad)) for i in (0, 1)]
    # pad so that every window lies inside: pad before, and after up to the last window's end
    # (negative when floor rounding leaves rows unused: F.pad then crops them)
    after = [(out[i] - 1) * stride[i] + kernel[i] - sizes[i] - pad[i] for i in (0, 1)]
    spec = (pad[1], after[1], pad[0], after[0])
    if is_max:
        padded = F.pad(x, spec, value=float("-inf")) if any(spec) else x
        return F.max_pool2d(padded, kernel, stride)
    padded = F.pad(x, spec, value=0.0) if any(spec) else x
    sums = F.avg_pool2d(padded, kernel, stride, divisor_override=1)
    return sums / _window_sizes(out, sizes, kernel, stride, pad, x)


def _window_sizes(out, sizes, kernel, stride, pad, like):
    """Caffe's AVE divisor per output cell: the window clipped to [-pad, size + pad)."""
    counts = []
    for i in (0, 1):
        start = torch.arange(out[i], device=like.device) * stride[i] - pad[i]
        end = torch.clamp(start + kernel[i], max=sizes[i] + pad[i])
        counts.append((end - start).to(like.dtype))
    return counts[0][:, None] * counts[1][None, :]


def _lrn(layer, params) -> Op:
    p = layer.lrn_param
    size, alpha, beta, k = p.local_size, p.alpha, p.beta, p.k
    pre = (size - 1) // 2
    if p.norm_region == p.ACROSS_CHANNELS:
        def run(xs):
            x = xs[0]
            sums = F.avg_pool3d((x * x).unsqueeze(1), (size, 1, 1), stride=1, padding=(pre, 0, 0),
                                divisor_override=1).squeeze(1)
            return [x * (k + (alpha / size) * sums).pow(-beta)]
        return run

    def run_within(xs):
        x = xs[0]
        # Caffe: AVE pooling (n x n, pad (n-1)/2: always a full n*n divisor) then Power(1 + alpha*avg)^-beta
        avg = F.avg_pool2d(x * x, size, stride=1, padding=pre, count_include_pad=True)
        return [x * (1 + alpha * avg).pow(-beta)]
    return run_within


def _inner_product(layer, params) -> Op:
    p = layer.inner_product_param
    weight = params[0]
    bias = params[1] if p.bias_term else None
    k = weight.shape[0] if p.transpose else weight.shape[1]

    def run(xs):
        x = xs[0]
        axis = canonical_axis(p.axis, x.ndim, "axis")
        flat = x.reshape(count(tuple(x.shape[:axis])), -1)
        if flat.shape[1] != k:
            raise ValueError(f"input {tuple(x.shape)} gives {flat.shape[1]} values per item from axis "
                             f"{axis}; the weights take {k}")
        y = flat @ weight if p.transpose else flat @ weight.t()
        if bias is not None:
            y = y + bias
        return [y.reshape(*x.shape[:axis], -1)]
    return run


def _concat(layer, params) -> Op:
    p = layer.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    return lambda xs: [torch.cat(xs, dim=canonical_axis(axis, xs[0].ndim, "axis"))]


def _eltwise(layer, params) -> Op:
    p = layer.eltwise_param
    op = p.operation
    coeffs = list(p.coeff)

    def run(xs):
        if op == p.PROD:
            out = xs[0]
            for x in xs[1:]:
                out = out * x
        elif op == p.MAX:
            out = xs[0]
            for x in xs[1:]:
                out = torch.maximum(out, x)
        else:
            c = coeffs or [1.0] * len(xs)
            out = xs[0] * c[0] if c[0] != 1 else xs[0]
            for ci, x in zip(c[1:], xs[1:]):
                out = out + (x * ci if ci != 1 else x)
        return [out]
    return run


def _batch_norm(layer, params) -> Op:
    p = layer.batch_norm_param
    global_stats = p.use_global_stats if p.HasField("use_global_stats") else True  # TEST phase
    eps = p.eps
    mean, var, factor = params
    scale = 0.0 if float(factor.reshape(-1)[0]) == 0 else 1.0 / float(factor.reshape(-1)[0])

    def run(xs):
        x = xs[0]
        n = x.shape[0]
        c = x.shape[1] if x.ndim > 1 else 1
        v = x.reshape(n, c, -1)
        if global_stats:
            m, s2 = (mean * scale).reshape(1, c, 1), (var * scale).reshape(1, c, 1)
        else:  # batch statistics, as Caffe computes them when use_global_stats is false
            m = v.mean(dim=(0, 2), keepdim=True)
            s2 = ((v - m) ** 2).mean(dim=(0, 2), keepdim=True)
        return [((v - m) / torch.sqrt(s2 + eps)).reshape(x.shape)]
    return run


def _scale(layer, params) -> Op:
    p = layer.scale_param

    def run(xs):
        x = xs[0]
        if len(xs) > 1:
            scale, bias = xs[1], (params[0] if p.bias_term else None)
        else:
            scale, bias = params[0], (params[1] if p.bias_term else None)
        axis = 0 if scale.ndim == 0 else canonical_axis(p.axis, x.ndim, "axis")
        if tuple(x.shape[axis:axis + scale.ndim]) != tuple(scale.shape):
            raise ValueError(f"scale {tuple(scale.shape)} does not match input {tuple(x.shape)} "
                             f"from axis {axis}")
        view = (1,) * axis + tuple(scale.shape) + (1,) * (x.ndim - axis - scale.ndim)
        out = x * scale.reshape(view)
        if bias is not None:
            out = out + bias.reshape(view)
        return [out]
    return run


def _prelu(layer, params) -> Op:
    """Caffe's PReLU: max(x, 0) + slope * min(x, 0), a slope per channel or one shared.

    The same two float operations per value as Caffe's PReLULayer, so CPU
    results match it bit for bit.
    """
    slope = params[0]
    shared = layer.prelu_param.channel_shared

    def run(xs):
        x = xs[0]
        s = slope.reshape(()) if shared else slope.reshape((1, -1) + (1,) * (x.ndim - 2))
        return [torch.clamp(x, min=0) + s * torch.clamp(x, max=0)]
    return run


_BUILDERS = {
    "Convolution": _convolution,
    "Pooling": _pooling,
    "LRN": _lrn,
    "InnerProduct": _inner_product,
    "Concat": _concat,
    "Eltwise": _eltwise,
    "BatchNorm": _batch_norm,
    "Scale": _scale,
    "PReLU": _prelu,
}
