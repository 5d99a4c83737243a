"""bf16's own criterion (`verify --precision bf16`): close to float32, measured, never "equivalent".

A net computed with bfloat16 inputs to its products (unit roundoff 2^-8) is not
equal to the float32 net to float32 rounding, so the equivalence check of
verify.py does not apply. The converted net runs in bf16 and the original in
float32, on the same engine and the same inputs as verify's, and the report
states (docs/verify.md, "bf16"):

1. the float32 bound of bound.py with u = 2^-8 on the bf16 side,
   |s_f32 - s_bf16| <= LAMBDA * sqrt(N) * (2^-8 + 2^-24) * A, and the share of
   it the largest difference used (it only catches gross errors);
2. the share of cells whose winning class is float32's, the largest score
   difference against the largest score, and each differing cell's float32
   top-2 gap (a near-tie when within twice the bf16 bound there).

The result is "within the bf16 bound" or not; it is never reported as EQUIVALENT.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .bound import LAMBDA, U, ScoreLayer
from .verify import sample_inputs
from ..io.preprocess import Preprocess

U_BF16 = 2.0 ** -8


@dataclass
class Bf16Report:
    """How the bf16 converted net's scores compare with the float32 original's."""

    inputs: list[str]
    input_shape: tuple[int, ...]
    accumulation_length: int
    cells: int = 0                    # map cells over all inputs (one per input at the original's size)
    argmax_agree: int = 0             # cells whose winning class is float32's
    max_abs: float = 0.0              # largest |s_f32 - s_bf16|
    largest_score: float = 0.0        # largest |s_f32|
    fraction: float = 0.0             # largest |s_f32 - s_bf16| / bf16 bound over all scores
    worst_input: str = ""
    differing: list[dict] = field(default_factory=list)  # {input, cell, f32, bf16, gap, near_tie}

    @property
    def within_bound(self) -> bool:
        return self.cells > 0 and self.fraction <= 1.0

    equivalent = False  # bf16 is never float32's equal: verify exits by within_bound

    @property
    def agreement(self) -> float:
        return self.argmax_agree / self.cells if self.cells else 0.0

    def to_dict(self) -> dict:
        return {"equivalent": False, "precision": "bf16", "within_bf16_bound": self.within_bound,
                "criterion": {"unit_roundoff_bf16": U_BF16, "unit_roundoff_f32": U, "lambda": LAMBDA,
                              "accumulation_length": self.accumulation_length,
                              "rule": "|ds| <= lambda * sqrt(N) * (u_bf16 + u_f32) * (|W||x| + |b|) per score"},
                "argmax_agreement": self.agreement, **asdict(self) | {"input_shape": list(self.input_shape)}}


def bf16_tolerance(scores: ScoreLayer, bottom: np.ndarray) -> np.ndarray:
    """The per-score bf16 bound: the float32 bound (2 u_f32) with one side's u = 2^-8."""
    return scores.tolerance(bottom) * (U_BF16 + U) / (2 * U)


def verify_bf16(original_net, converted_net, input_blob: str, input_shape: tuple[int, ...],
                score_pair: tuple[str, str], pre: Preprocess, scores: ScoreLayer,
                samples: int = 3, seed: int = 0) -> Bf16Report:
    """Run the float32 original and the bf16 converted net on verify's inputs and measure
    (module docstring). `score_pair` is (original's scores, converted's scores), before Softmax."""
    score_a, score_b = score_pair
    report = Bf16Report([], tuple(input_shape), scores.length)
    for name, x in sample_inputs(input_shape, pre, samples, seed):
        ra = original_net.forward({input_blob: x[None]}, list(dict.fromkeys([score_a, scores.bottom])))
        b = converted_net.forward({input_blob: x[None]}, [score_b])[score_b]
        a = ra[score_a].astype(np.float64)
        classes = a.shape[1]
        a, b = a.reshape(classes, -1), b.astype(np.float64).reshape(classes, -1)
        tol = bf16_tolerance(scores, ra[scores.bottom]).reshape(classes, -1)
        report.inputs.append(name)
        diff = np.abs(a - b)
        share = float((diff / np.maximum(tol, np.finfo(np.float64).tiny)).max())
        if share >= report.fraction:
            report.fraction, report.worst_input = share, name
        report.max_abs = max(report.max_abs, float(diff.max()))
        report.largest_score = max(report.largest_score, float(np.abs(a).max()))
        top_a, top_b = a.argmax(axis=0), b.argmax(axis=0)
        report.cells += a.shape[1]
        report.argmax_agree += int((top_a == top_b).sum())
        for cell in np.flatnonzero(top_a != top_b):
            ranked = np.sort(a[:, cell])
            gap = float(ranked[-1] - ranked[-2]) if classes > 1 else 0.0
            report.differing.append({"input": name, "cell": int(cell), "f32": int(top_a[cell]),
                                     "bf16": int(top_b[cell]), "gap": gap,
                                     "near_tie": gap <= 2 * float(tol[:, cell].max())})
    return report


def bf16_report(report: Bf16Report) -> str:
    """The text verify prints for --precision bf16."""
    far = [d for d in report.differing if not d["near_tie"]]
    lines = [f"bf16 check at input {'x'.join(map(str, report.input_shape))} on {len(report.inputs)} inputs "
             f"({'; '.join(report.inputs)}): the converted net in bf16 against the original in float32",
             f"  argmax as float32: {report.argmax_agree}/{report.cells} cells ({100 * report.agreement:.1f}%)"
             + (f"; {len(report.differing)} differ, {len(far)} of them not near-ties" if report.differing else ""),
             f"  largest score difference {report.max_abs:.3g} (largest score {report.largest_score:.3g}): "
             f"{report.fraction:.3g} of the bf16 bound [{report.worst_input}]",
             f"  bf16 bound: |ds| <= {LAMBDA:g}*sqrt(N)*(2^-8 + 2^-24)*(|W||x|+|b|) per score, N = "
             f"{report.accumulation_length} terms (docs/verify.md, bf16); bf16 is not float32's equal",
             "  result: " + ("WITHIN THE BF16 BOUND (not equivalence)" if report.within_bound
                             else "OUTSIDE THE BF16 BOUND")]
    return "\n".join(lines)
