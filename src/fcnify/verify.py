"""Prove a converted net equals its original at the original input size.

Both nets run in Caffe on the same inputs: seeded random images and, where
Caffe's source tree has it, examples/images/cat.jpg, each preprocessed as the
model expects. The scores before Softmax and the Softmax output must agree to
float rounding (relative difference <= 1e-4) with the same top-5 classes.
The converted net's parameters, read back from Caffe, must equal the
transplanted arrays bit for bit, so no layer kept its initial values.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .images import load_image, resize
from .paths import caffe_source
from .preprocess import Preprocess
from .errors import SetupError

REL_TOLERANCE = 1e-4
TOP_K = 5


@dataclass
class BlobComparison:
    """Worst difference between one original blob and its converted counterpart."""

    original: str
    converted: str
    max_abs: float
    max_rel: float
    worst_input: str
    worst_index: tuple[int, ...]
    top5_agree: bool = True

    @property
    def ok(self) -> bool:
        return self.max_rel <= REL_TOLERANCE and self.top5_agree


@dataclass
class VerifyReport:
    """Evidence of equivalence (or not) between a net and its conversion."""

    inputs: list[str]
    comparisons: list[BlobComparison]
    params_checked: int = 0
    params_mismatched: list[str] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()

    @property
    def equivalent(self) -> bool:
        return all(c.ok for c in self.comparisons) and not self.params_mismatched

    def to_dict(self) -> dict:
        return {"equivalent": self.equivalent, "tolerance_rel": REL_TOLERANCE,
                "inputs": self.inputs, "input_shape": list(self.input_shape),
                "params_checked": self.params_checked,
                "params_mismatched": self.params_mismatched,
                "comparisons": [asdict(c) | {"ok": c.ok} for c in self.comparisons]}


def digest(array: np.ndarray) -> str:
    """The digest the engine computes for a parameter blob (BLAKE2b-128 of float32 bytes)."""
    data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def sample_inputs(shape: tuple[int, ...], pre: Preprocess, count: int = 3, seed: int = 0,
                  with_cat: bool = True) -> list[tuple[str, np.ndarray]]:
    """Preprocessed test inputs of `shape` (C x H x W per item)."""
    _, c, h, w = shape
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        # smooth random images: noise upsampled, so conv filters see structure, not just grain
        small = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        img = resize(small, h, w)
        img = np.clip(img.astype(np.int16) + rng.integers(-20, 21, size=img.shape), 0, 255).astype(np.uint8)
        out.append((f"random image #{i} (seed {seed})", pre.apply(img)))
    if with_cat:
        try:
            cat = caffe_source() / "examples" / "images" / "cat.jpg"
        except SetupError:
            cat = None
        if cat is not None and cat.is_file():
            out.append(("examples/images/cat.jpg", pre.apply(resize(load_image(cat), h, w))))
    for name, x in out:
        if x.shape[0] != c:
            raise ValueError(f"preprocessing gives {x.shape[0]} channels, the net takes {c}")
    return out


def compare(original: str, converted: str, a_list: list[np.ndarray], b_list: list[np.ndarray],
            names: list[str], topk: bool) -> BlobComparison:
    worst = BlobComparison(original, converted, 0.0, 0.0, "", ())
    agree = True
    for name, a, b in zip(names, a_list, b_list):
        b = b.reshape(a.shape)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        scale = max(float(np.abs(a).max()), np.finfo(np.float32).tiny)
        # NaN or infinity in an output proves nothing (and a NaN would never count as
        # worse below): it is an unbounded difference.
        finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
        rel = float(diff.max()) / scale if finite else float("inf")
        if rel >= worst.max_rel:
            idx = np.unravel_index(int(diff.argmax()), diff.shape)
            worst = BlobComparison(original, converted, float(diff.max()), rel, name,
                                   tuple(int(i) for i in idx))
        if topk:
            for row_a, row_b in zip(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)):
                k = min(TOP_K, row_a.size)
                if list(np.argsort(-row_a, kind="stable")[:k]) != list(np.argsort(-row_b, kind="stable")[:k]):
                    agree = False
    worst.top5_agree = agree
    return worst


def verify(original_net, converted_net, input_blob: str, input_shape: tuple[int, ...],
           blob_pairs: list[tuple[str, str]], pre: Preprocess, transplanted: dict | None = None,
           samples: int = 3, seed: int = 0) -> VerifyReport:
    """Run both loaded nets on the same inputs and compare `blob_pairs` (original, converted)."""
    inputs = sample_inputs(input_shape, pre, samples, seed)
    names = [n for n, _ in inputs]
    outs_a: dict[str, list] = {a: [] for a, _ in blob_pairs}
    outs_b: dict[str, list] = {b: [] for _, b in blob_pairs}
    for _, x in inputs:
        batch = np.broadcast_to(x, (input_shape[0],) + x.shape).copy()
        ra = original_net.forward({input_blob: batch}, [a for a, _ in blob_pairs])
        rb = converted_net.forward({input_blob: batch}, [b for _, b in blob_pairs])
        for a, b in blob_pairs:
            outs_a[a].append(ra[a][:1])
            outs_b[b].append(rb[b][:1])
    comparisons = [compare(a, b, outs_a[a], outs_b[b], names, topk=True) for a, b in blob_pairs]
    report = VerifyReport(names, comparisons, input_shape=tuple(input_shape))
    if transplanted is not None:
        loaded = converted_net.param_digests()
        for layer, arrays in transplanted.items():
            got = loaded.get(layer, [])
            for i, arr in enumerate(arrays):
                report.params_checked += 1
                if i >= len(got) or tuple(got[i][0]) != arr.shape or got[i][1] != digest(arr):
                    report.params_mismatched.append(f"{layer}[{i}]")
        for layer in loaded:
            if layer not in transplanted:
                report.params_mismatched.append(f"{layer} (not transplanted)")
    return report
