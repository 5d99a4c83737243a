"""How a model wants its pixels: one frozen description per model.

An image arrives as 8-bit RGB (H x W x 3, 0-255). The net receives
    x = (pixels / 255 * raw_scale, in `channels` order) - mean) * input_scale
as float32 C x H x W (C x W x H with `transpose`, for nets trained on
transposed images, as MATLAB-trained ones are), which is what pycaffe's
Transformer does with raw_scale, channel_swap, mean and input_scale. The mean
is per channel, in the net's channel order; one value serves every channel.
The description travels with the model (a JSON sidecar), so `classify-map`
gets it right without flags; `PreprocessOverrides.apply` is the one place where
the terms given by the user win over the card, and the card over defaults.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import InputError

CHANNEL_ORDERS = ("BGR", "RGB", "gray")
# The per-channel (B, G, R) mean of Caffe's python/caffe/imagenet/ilsvrc_2012_mean.npy,
# used for 3-channel nets that do not say otherwise (Caffe's model zoo convention).
# tests/test_models.py recomputes it from that file.
IMAGENET_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
# ITU-R BT.601 luma, as Pillow's convert("L") computes it.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Preprocess:
    """Pixel transform for one model (see the module docstring for the formula)."""

    channels: str = "BGR"
    raw_scale: float = 255.0
    mean: tuple[float, ...] | None = None
    input_scale: float = 1.0
    transpose: bool = False  # the net sees the image with height and width swapped

    def __post_init__(self) -> None:
        if self.channels not in CHANNEL_ORDERS:
            raise ValueError(f"channels must be one of {CHANNEL_ORDERS}, not {self.channels!r}")
        for name in ("raw_scale", "input_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, not {value!r}")
            if not math.isfinite(value) or value == 0:
                raise ValueError(f"{name} must be a finite number other than 0, not {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.transpose, bool):
            raise ValueError(f"transpose must be true or false, not {self.transpose!r}")
        if self.mean is not None:
            try:
                mean = tuple(float(m) for m in self.mean)
            except (TypeError, ValueError):
                raise ValueError(f"mean must be a list of numbers, not {self.mean!r}") from None
            object.__setattr__(self, "mean", mean)
            if not all(math.isfinite(m) for m in mean):
                raise ValueError(f"mean must be finite, not {mean}")
            if len(mean) not in (1, self.num_channels):
                give = "one" if self.num_channels == 1 else f"{self.num_channels} or one for all"
                raise ValueError(f"mean has {len(mean)} values for {self.num_channels} channel(s) "
                                 f"({self.channels}); give {give}")

    @property
    def num_channels(self) -> int:
        return 1 if self.channels == "gray" else 3

    def apply(self, rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """H x W x 3 uint8 RGB -> C x H x W float32 (W x H with `transpose`), ready for the net's data blob.

        Colour is done a channel at a time, into `out` when given (an engine's
        shared input): no full-size float temporaries, the same float32 steps
        (and so the same bits) as a whole-array pass.
        """
        if self.channels == "gray":
            x = (rgb.astype(np.float32) @ LUMA)[None]
            self._scale(x)
            if self.transpose:
                x = x.transpose(0, 2, 1)
            if out is None:
                return np.ascontiguousarray(x)
            np.copyto(out, x)
            return out
        h, w = rgb.shape[:2]
        shape = (3, w, h) if self.transpose else (3, h, w)
        if out is None:
            out = np.empty(shape, np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"preprocess output is {out.dtype} {out.shape}, needs float32 {shape}")
        order = [2, 1, 0] if self.channels == "BGR" else [0, 1, 2]
        mean = None if self.mean is None else np.asarray(self.mean, dtype=np.float32)
        for c, src in enumerate(order):
            plane = rgb[:, :, src].T if self.transpose else rgb[:, :, src]
            np.copyto(out[c], plane, casting="unsafe")
            self._scale(out[c], None if mean is None else mean[c if len(mean) > 1 else 0])
        return out

    def _scale(self, x: np.ndarray, mean=None) -> None:
        """raw_scale, mean, input_scale applied in place, in that order (mean: per channel if not given)."""
        x *= np.float32(self.raw_scale / 255.0)
        if mean is not None:
            x -= mean
        elif self.mean is not None:
            x -= np.asarray(self.mean, dtype=np.float32)[:, None, None]
        if self.input_scale != 1.0:
            x *= np.float32(self.input_scale)

    def describe(self) -> str:
        """One line a user can check against how the net was trained."""
        mean = "no mean" if self.mean is None else "mean " + ",".join(f"{m:g}" for m in self.mean)
        text = (f"{self.channels} pixels 0-255 scaled to 0-{self.raw_scale:g}, {mean}, "
                f"then times {self.input_scale:g}")
        return text + ("; image transposed (the net sees width x height)" if self.transpose else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = None if self.mean is None else list(self.mean)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str | Path | None = None) -> "Preprocess":
        known = {"channels", "raw_scale", "mean", "input_scale", "transpose"}
        unknown = set(d) - known
        try:
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)}")
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise InputError(f"bad preprocessing description: {exc}", source) from exc

def default_preprocess(channels: int) -> Preprocess:
    """Caffe's model-zoo conventions, for a net that came without a card.

    3 channels: BGR, 0-255, the ImageNet per-channel mean; 1 channel: grey, 0-255, no mean.
    """
    if channels == 1:
        return Preprocess(channels="gray", raw_scale=255.0)
    return Preprocess(channels="BGR", raw_scale=255.0, mean=IMAGENET_MEAN_BGR)


def channel_order(text: str) -> str:
    """'rgb', 'BGR', 'grey' ... -> the card's spelling (RGB, BGR, gray)."""
    key = text.strip().lower()
    found = {"rgb": "RGB", "bgr": "BGR", "gray": "gray", "grey": "gray"}.get(key)
    if found is None:
        raise InputError(f"channel order {text!r}: give rgb, bgr or gray")
    return found


@dataclass(frozen=True, kw_only=True)
class PreprocessOverrides:
    """The preprocessing terms given explicitly (--channels, --raw-scale, --input-scale, --mean,
    --transpose, or their keywords); None: not given, the card's stands.

    One object from the command line to resolve.resolve_card, as timm's resolve_data_config
    takes one mapping of overrides, instead of five loose arguments along the way.
    """

    channels: str | None = None
    raw_scale: float | None = None
    input_scale: float | None = None
    mean: str | Path | tuple[float, ...] | None = None
    transpose: bool | None = None

    def apply(self, card: Preprocess) -> Preprocess:
        """`card` with each term given here over its own (resolve_preprocess)."""
        return resolve_preprocess(card, **asdict(self))


def resolve_preprocess(card: Preprocess, *, channels: str | None = None,
                       raw_scale: float | None = None, input_scale: float | None = None,
                       mean: str | Path | tuple[float, ...] | None = None,
                       transpose: bool | None = None) -> Preprocess:
    """The preprocessing to use: each term given (not None) over the card's own.

    `card` is the model card's description, or default_preprocess() for a net
    without one, so the order is: explicit terms, then the card, then Caffe's
    defaults. `mean` may be numbers ("104,117,123", "127.5" or a tuple), a .npy
    or a Caffe .binaryproto. Bad values raise InputError naming what is wrong.
    """
    changes: dict = {}
    if channels is not None:
        changes["channels"] = channel_order(channels)
    if raw_scale is not None:
        changes["raw_scale"] = raw_scale
    if input_scale is not None:
        changes["input_scale"] = input_scale
    if transpose is not None:
        changes["transpose"] = transpose
    source = None
    if channels is not None and mean is None and card.mean is not None \
            and len(card.mean) not in (1, 1 if changes["channels"] == "gray" else 3):
        raise InputError(f"bad preprocessing: channel order {changes['channels']} does not fit the "
                         f"{len(card.mean)}-value mean it would keep (the card's, or without a card "
                         "Caffe's default); give --mean as well")
    if mean is not None:
        order = changes.get("channels", card.channels)
        changes["mean"], source = parse_mean(mean, 1 if order == "gray" else 3)
    try:
        return replace(card, **changes)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad preprocessing: {exc}", source) from None


def parse_mean(value: str | Path | tuple[float, ...], channels: int | None = None
               ) -> tuple[tuple[float, ...], Path | None]:
    """Mean values from numbers, a .npy or a .binaryproto; and the file they came from.

    A file's shape is checked against `channels` (when given), so its error names the shape.
    """
    if isinstance(value, (tuple, list)):
        return tuple(value), None
    text = str(value)
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError:
        numbers = None
    if numbers and not isinstance(value, Path):
        return numbers, None
    path = Path(text)
    if not path.is_file():
        raise InputError("mean: no such file; give numbers (104,117,123 or 127.5), "
                         "a .npy or a Caffe .binaryproto", path)
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        return load_mean(path, channels), path
    return load_binaryproto_mean(path, channels), path


def _per_channel(arr: np.ndarray, channels: int | None, path: Path | str) -> tuple[float, ...]:
    """(C,), (C, H, W) or (1, C, H, W) -> one mean per channel, in the file's channel order."""
    shape = arr.shape
    if arr.ndim == 4 and shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        arr = arr.reshape(arr.shape[0], -1).astype(np.float64).mean(axis=1)
    allowed = (1, channels) if channels else None
    if arr.ndim != 1 or arr.size == 0 or (allowed and arr.shape[0] not in allowed) \
            or not np.all(np.isfinite(arr)):
        want = (f"({channels},) or ({channels}, H, W), or one value (1,)," if channels
                else "(C,) or (C, H, W)")
        raise InputError(f"mean has shape {shape}; expected {want} with finite values", path)
    return tuple(float(v) for v in arr)


def load_mean(path: str | Path, channels: int | None = None) -> tuple[float, ...]:
    """Per-channel mean from a .npy of shape (C,), (C, H, W) or (1, C, H, W).

    One value, (1,), is one mean for every channel (as a card's [127.5] is).
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"not a readable .npy mean file ({exc})", path) from exc
    return _per_channel(np.asarray(arr), channels, path)


def load_binaryproto_mean(path: str | Path, channels: int | None = None) -> tuple[float, ...]:
    """Per-channel mean of Caffe's mean.binaryproto (a BlobProto, 1 x C x H x W).

    A dense map is computed on images of any size, so the mean image is
    reduced to one value per channel, as pycaffe's classify.py users do with
    mean.mean(1).mean(1). Read with fcnify's own protobuf messages.
    """
    from google.protobuf.message import DecodeError
    from ..caffe.proto import caffe_pb2
    data = Path(path).read_bytes()
    try:
        blob = caffe_pb2().BlobProto.FromString(data)
    except (DecodeError, ValueError) as exc:
        raise InputError(f"not a Caffe mean .binaryproto (BlobProto): {exc}", path) from None
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = tuple(int(getattr(blob, k)) for k in ("num", "channels", "height", "width"))
    values = np.asarray(blob.double_data if len(blob.double_data) else blob.data, dtype=np.float64)
    if not values.size or not shape or int(np.prod(shape)) != values.size:
        raise InputError(f"not a Caffe mean .binaryproto: shape {list(shape)} holds "
                         f"{int(np.prod(shape)) if shape else 0} values, the file {values.size}", path)
    return _per_channel(values.reshape(shape), channels, path)
