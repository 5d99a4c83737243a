"""How a model wants its pixels: one frozen description per model.

An image arrives as 8-bit RGB (H x W x 3, 0-255). The net receives
    x = (pixels / 255 * raw_scale, in `channels` order) - mean) * input_scale
as float32 C x H x W, which is what pycaffe's Transformer does with
raw_scale, channel_swap, mean and input_scale. The description travels with
the model (a JSON sidecar), so `classify-map` gets it right without flags.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .errors import InputError

CHANNEL_ORDERS = ("BGR", "RGB", "gray")
# ITU-R BT.601 luma, as Pillow's convert("L") computes it.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Preprocess:
    """Pixel transform for one model (see the module docstring for the formula)."""

    channels: str = "BGR"
    raw_scale: float = 255.0
    mean: tuple[float, ...] | None = None
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.channels not in CHANNEL_ORDERS:
            raise ValueError(f"channels must be one of {CHANNEL_ORDERS}, not {self.channels!r}")
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            if len(self.mean) not in (1, self.num_channels):
                raise ValueError(f"mean has {len(self.mean)} values for {self.num_channels} channel(s)")

    @property
    def num_channels(self) -> int:
        return 1 if self.channels == "gray" else 3

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 RGB -> C x H x W float32, ready for the net's data blob."""
        x = rgb.astype(np.float32)
        if self.channels == "gray":
            x = (x @ LUMA)[None]
        else:
            order = [2, 1, 0] if self.channels == "BGR" else [0, 1, 2]
            x = np.ascontiguousarray(x[:, :, order].transpose(2, 0, 1))
        x *= np.float32(self.raw_scale / 255.0)
        if self.mean is not None:
            x -= np.asarray(self.mean, dtype=np.float32)[:, None, None]
        if self.input_scale != 1.0:
            x *= np.float32(self.input_scale)
        return x

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = None if self.mean is None else list(self.mean)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str | Path | None = None) -> "Preprocess":
        known = {"channels", "raw_scale", "mean", "input_scale"}
        unknown = set(d) - known
        try:
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)}")
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise InputError(f"bad preprocessing description: {exc}", source) from exc

    def with_mean_file(self, path: str | Path) -> "Preprocess":
        """Use the per-channel mean of a Caffe mean .npy (C x H x W) or a C-vector."""
        return replace(self, mean=load_mean(path, self.num_channels))


def load_mean(path: str | Path, channels: int) -> tuple[float, ...]:
    """Per-channel mean from a .npy of shape (C,), (C, H, W) or (1, C, H, W)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"not a readable .npy mean file ({exc})", path) from exc
    shape = arr.shape
    if arr.ndim == 4 and shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        arr = arr.reshape(arr.shape[0], -1).mean(axis=1)
    if arr.ndim != 1 or arr.shape[0] != channels or not np.all(np.isfinite(arr)):
        raise InputError(f"mean has shape {shape}; expected ({channels},) or ({channels}, H, W) "
                         "with finite values", path)
    return tuple(float(v) for v in arr)


def read_preprocess(path: str | Path) -> Preprocess:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read preprocessing JSON ({exc})", path) from exc
    if isinstance(data, dict) and "preprocess" in data:
        data = data["preprocess"]
    if not isinstance(data, dict):
        raise InputError("preprocessing JSON must be an object", path)
    return Preprocess.from_dict(data, path)
