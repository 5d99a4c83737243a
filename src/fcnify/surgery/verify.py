"""Prove a converted net equals its original at the original input size.

Both nets run on the same inputs: seeded random images and, where Caffe's
source tree has it, examples/images/cat.jpg, each preprocessed as the model
expects. The scores before Softmax must agree element by element within the
float32 accumulation bound of bound.py (|ds| <= 2 * 6 * sqrt(N) * u * A); the
Softmax output within the bound the scores' bound implies. The top-1 class
and the top-5 set must agree wherever the neighbouring classes are further
apart than twice the bound (closer ones are near-ties, counted and excused).
Each input that gives a saturated Softmax (top probability > 0.999, where
the probabilities hide differences) gets a scaled-down copy, halved until
the probabilities spread, as an extra input. The converted net's parameters, read
back from the engine, must equal the transplanted arrays bit for bit, so no
layer kept its initial values. docs/verify.md explains the bound.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from .bound import LAMBDA, U, ScoreLayer, factor, probability_tolerance, score_layer, softmax, within
from ..caffe.caffemodel import digest  # noqa: F401 - verify.digest, as the engines report it
from ..errors import SetupError
from ..io.images import load_image, resize
from ..paths import caffe_source
from ..io.preprocess import Preprocess

__all__ = ["LAMBDA", "U", "SATURATED", "TOP_K", "ScoreLayer", "score_layer", "BlobComparison",
           "VerifyReport", "compare", "rank_agreement", "verify", "within", "factor",
           "probability_tolerance", "softmax"]

TOP_K = 5
SATURATED = 0.999   # a top probability above this hides score differences from the Softmax output
SPREAD = 0.9        # scaled-down inputs are halved until their top probability is at most this
MAX_HALVINGS = 40


@dataclass
class BlobComparison:
    """How one original blob and its converted counterpart compare, against the bound."""

    original: str
    converted: str
    kind: str                       # "scores" (before Softmax) or "probabilities"
    max_abs: float = 0.0            # largest |a - b|
    bound: float = 0.0              # the bound at that element
    fraction: float = 0.0           # largest |a - b| / bound over all elements (<= 1 passes)
    worst_input: str = ""
    worst_index: tuple[int, ...] = ()
    top1_agree: bool = True         # wherever the top-1 margin exceeds twice the bound
    topk_agree: bool = True         # the top-5 set, likewise at rank 5
    near_ties: int = 0              # ranks not required to agree (margin within twice the bound)
    near_ties_excused: int = 0      # ... of which the two nets really ordered differently
    classes: int = 0                # values ranked at each position (a box head's 4, a net's classes)

    @property
    def ok(self) -> bool:
        return self.fraction <= 1.0 and self.top1_agree and self.topk_agree


@dataclass
class VerifyReport:
    """Evidence of equivalence (or not) between a net and its conversion."""

    inputs: list[str]
    comparisons: list[BlobComparison]
    params_checked: int = 0
    params_mismatched: list[str] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    top_probability: list[float] = field(default_factory=list)   # per input, of the original
    added_for_saturation: list[str] = field(default_factory=list)  # scaled-down copies
    accumulation_length: int = 0

    @property
    def equivalent(self) -> bool:
        return bool(self.comparisons) and all(c.ok for c in self.comparisons) and not self.params_mismatched

    @property
    def saturated(self) -> bool:
        """Every input's top probability above SATURATED (the inputs added for it included)."""
        return bool(self.top_probability) and min(self.top_probability) > SATURATED

    def to_dict(self) -> dict:
        return {"equivalent": self.equivalent,
                "criterion": {"unit_roundoff": U, "lambda": LAMBDA,
                              "accumulation_length": self.accumulation_length,
                              "score_factor": factor(self.accumulation_length),
                              "rule": "|ds| <= 2 * lambda * sqrt(N) * u * (|W||x| + |b|) per score",
                              "saturated_above": SATURATED},
                "inputs": self.inputs, "input_shape": list(self.input_shape),
                "top_probability": self.top_probability, "saturated": self.saturated,
                "added_for_saturation": self.added_for_saturation,
                "params_checked": self.params_checked,
                "params_mismatched": self.params_mismatched,
                "comparisons": [asdict(c) | {"worst_index": list(c.worst_index), "ok": c.ok}
                                for c in self.comparisons]}


def sample_inputs(shape: tuple[int, ...], pre: Preprocess, count: int = 3, seed: int = 0,
                  with_cat: bool = True) -> list[tuple[str, np.ndarray]]:
    """Preprocessed test inputs of `shape` (C x H x W per item)."""
    _, c, h, w = shape
    if pre.transpose:  # the net's H x W is the image's W x H
        h, w = w, h
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


def rank_agreement(a: np.ndarray, b: np.ndarray, tol: np.ndarray, k: int = TOP_K) -> tuple[bool, bool, int, int]:
    """(top-1 agrees, top-k set agrees, near-ties, near-ties excused) for one item's class scores.

    A rank is only required to agree where `a`'s neighbouring classes there
    are further apart than their two bounds together: closer classes may
    swap between two correct computations.
    """
    k = min(k, a.size)
    order = np.argsort(-a, kind="stable")
    top1, topk, ties, excused = True, True, 0, 0
    for rank, same in ((1, int(np.argmax(b)) == int(order[0])),
                       (k, set(np.argsort(-b, kind="stable")[:k]) == set(order[:k]))):
        if rank >= a.size:
            continue  # every class is in the top-k: nothing to order
        i, j = order[rank - 1], order[rank]
        tie = a[i] - a[j] <= tol[i] + tol[j]
        ties += int(tie)
        excused += int(tie and not same)
        if not same and not tie:
            if rank == 1:
                top1 = False
            else:
                topk = False
    return top1, topk, ties, excused


def compare(original: str, converted: str, a_list: list[np.ndarray], b_list: list[np.ndarray],
            tol_list: list[np.ndarray], names: list[str], kind: str = "scores") -> BlobComparison:
    """Compare each pair of items element by element against its bound, and their ranks.

    Items are N x C (x H x W) arrays; ranks are compared along axis 1 at
    every position.
    """
    result = BlobComparison(original, converted, kind, classes=int(a_list[0].shape[1]) if a_list else 0)
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN outputs are reported, not warned about
        for name, a, b, tol in zip(names, a_list, b_list, tol_list):
            _compare_item(result, name, a, b, tol)
    return result


def _compare_item(result: BlobComparison, name: str, a: np.ndarray, b: np.ndarray, tol: np.ndarray) -> None:
    """Fold one input's arrays into `result` (worst element, rank agreement)."""
    b = np.asarray(b).reshape(a.shape)
    tol = np.broadcast_to(tol, a.shape)
    _, used = within(a, b, tol)
    if used >= result.fraction:
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        ratio = np.nan_to_num(diff / np.maximum(tol, np.finfo(np.float64).tiny), nan=np.inf)
        idx = np.unravel_index(int(ratio.argmax()), ratio.shape)
        result.fraction, result.worst_input = used, name
        result.max_abs, result.bound = float(diff[idx]), float(tol[idx])
        result.worst_index = tuple(int(i) for i in idx)
    rows = lambda t: np.moveaxis(t, 1, -1).reshape(-1, t.shape[1])  # noqa: E731 (one row per position)
    for ra, rb, rt in zip(rows(a.astype(np.float64)), rows(b.astype(np.float64)), rows(tol)):
        top1, topk, ties, excused = rank_agreement(ra, rb, rt)
        result.top1_agree &= top1
        result.topk_agree &= topk
        result.near_ties += ties
        result.near_ties_excused += excused


def _top_probability(scores: np.ndarray) -> float:
    return float(softmax(scores.reshape(scores.shape[0], scores.shape[1], -1)).max())


def _spread(name: str, x: np.ndarray, run) -> tuple[str, np.ndarray] | None:
    """`x` halved until the original's top probability is at most SPREAD (None if it never is)."""
    for k in range(1, MAX_HALVINGS + 1):
        scaled = (x * 0.5 ** k).astype(np.float32)
        if _top_probability(run(scaled)) <= SPREAD:
            return f"{name} scaled by 2^-{k}", scaled
    return None


def verify(original_net, converted_net, input_blob: str, input_shape: tuple[int, ...],
           blob_pairs: list[tuple[str, str]], pre: Preprocess, transplanted: dict | None = None,
           samples: int = 3, seed: int = 0, scores: ScoreLayer | None = None,
           heads: Sequence[tuple[str, str, ScoreLayer]] = ()) -> VerifyReport:
    """Run both loaded nets on the same inputs and compare `blob_pairs` (original, converted).

    The first pair is the scores before Softmax, the second (if any) the
    Softmax output; `scores` is the original's score layer (bound.score_layer),
    which sets the bound. `heads` are the other outputs both nets have (a box
    regression such as MTCNN's conv5-2), each (original, converted, its own
    score layer), compared against their own bound.
    """
    if scores is None:
        raise ValueError("verify needs the original's score layer (bound.score_layer) for its bound")
    score_a, score_b = blob_pairs[0]
    wanted_a = list(dict.fromkeys([a for a, _ in blob_pairs] + [scores.bottom]
                                  + [h for h, _, _ in heads] + [layer.bottom for _, _, layer in heads]))
    wanted_b = list(dict.fromkeys([b for _, b in blob_pairs] + [b for _, b, _ in heads]))

    def batch(x: np.ndarray) -> np.ndarray:
        return np.broadcast_to(x, (input_shape[0],) + x.shape).copy()

    def run_original(x: np.ndarray) -> np.ndarray:
        return original_net.forward({input_blob: batch(x)}, [score_a])[score_a][:1]

    inputs = sample_inputs(input_shape, pre, samples, seed)
    tops = [_top_probability(run_original(x)) for _, x in inputs]
    added = []
    for (name, x), top in list(zip(inputs, tops)):
        extra = _spread(name, x, run_original) if top > SATURATED else None
        if extra is not None:
            inputs.append(extra)
            tops.append(_top_probability(run_original(extra[1])))
            added.append(extra[0])
    names = [n for n, _ in inputs]
    outs_a: dict[str, list] = {a: [] for a, _ in blob_pairs}
    outs_b: dict[str, list] = {b: [] for _, b in blob_pairs}
    score_tols = []
    head_runs = {a: ([], [], []) for a, _, _ in heads}  # original's, converted's, bounds
    for _, x in inputs:
        ra = original_net.forward({input_blob: batch(x)}, wanted_a)
        rb = converted_net.forward({input_blob: batch(x)}, wanted_b)
        for a, b in blob_pairs:
            outs_a[a].append(ra[a][:1])
            outs_b[b].append(rb[b][:1])
        score_tols.append(scores.tolerance(ra[scores.bottom][:1]).reshape(ra[score_a][:1].shape))
        for a, b, layer in heads:
            head_runs[a][0].append(ra[a][:1])
            head_runs[a][1].append(rb[b][:1])
            head_runs[a][2].append(layer.tolerance(ra[layer.bottom][:1]).reshape(ra[a][:1].shape))
    comparisons = [compare(score_a, score_b, outs_a[score_a], outs_b[score_b], score_tols, names)]
    for a, b in blob_pairs[1:]:
        ptols = [probability_tolerance(pa, pb.reshape(pa.shape), t.reshape(pa.shape))
                 for pa, pb, t in zip(outs_a[a], outs_b[b], score_tols)]
        comparisons.append(compare(a, b, outs_a[a], outs_b[b], ptols, names, "probabilities"))
    for a, b, _ in heads:
        comparisons.append(compare(a, b, *head_runs[a], names))
    report = VerifyReport(names, comparisons, input_shape=tuple(input_shape), top_probability=tops,
                          added_for_saturation=added, accumulation_length=scores.length)
    if transplanted is not None:
        check_params(report, converted_net, transplanted)
    return report


def check_params(report: VerifyReport, net, transplanted: dict) -> None:
    """Every parameter blob as the engine holds it equals the transplanted array, bit for bit."""
    loaded = net.param_digests()
    for layer, arrays in transplanted.items():
        got = loaded.get(layer, [])
        for i, arr in enumerate(arrays):
            report.params_checked += 1
            if i >= len(got) or tuple(got[i][0]) != arr.shape or got[i][1] != digest(arr):
                report.params_mismatched.append(f"{layer}[{i}]")
    for layer in loaded:
        if layer not in transplanted:
            report.params_mismatched.append(f"{layer} (not transplanted)")
