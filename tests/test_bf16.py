"""surgery/bf16.py: `verify --precision bf16` gives bf16's own criterion, never EQUIVALENT, and
is refused in one line on a CPU without bf16 (FCNIFY_CPU_FLAGS stands in for /proc/cpuinfo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from fcnify.convert import convert  # noqa: E402
from fcnify.io.models import find_model  # noqa: E402
from fcnify.surgery.bf16 import U_BF16  # noqa: E402
from fcnify.surgery.bound import U  # noqa: E402

WITH_BF16 = "avx2 fma avx512f avx512_bf16"  # a CPU that has bf16 (torch autocast runs it on any)
WITHOUT_BF16 = "avx2 fma"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    card = find_model("digits")
    result = convert(card.model_def, card.weights, tmp_path_factory.mktemp("bf16") / "digits", card=card,
                     check=False)
    return card.model_def, result.outputs["prototxt"]


def _verify(digits, flags: str, *options: str) -> subprocess.CompletedProcess:
    original, fcn = digits
    return subprocess.run([sys.executable, "-m", "fcnify", "verify", str(original), str(fcn),
                           "--precision", "bf16", *options], capture_output=True, text=True,
                          env={**os.environ, "FCNIFY_CPU_FLAGS": flags})


@pytest.mark.parametrize("engine", [[], ["--engine", "torch"], ["--engine", "openvino"]])
def test_refused_on_a_cpu_without_bf16(digits, engine):
    """Without AVX512-BF16 or AMX-BF16, on every bf16 engine: one line naming the CPU, exit 2,
    no report."""
    run = _verify(digits, WITHOUT_BF16, *engine)
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and "--precision bf16: this CPU has neither AVX512-BF16 nor AMX-BF16" in lines[0]


def test_refused_on_a_float32_engine(digits):
    """The onnx engine computes float32 only: the line names the engines that have bf16."""
    run = _verify(digits, WITH_BF16, "--engine", "onnx")
    assert run.returncode == 2 and run.stdout == ""
    assert "the onnx engine computes in float32 only; bf16 runs on --engine" in run.stderr


def test_torch_bf16_has_its_own_criterion(digits):
    """torch autocast bf16 (run here with bf16 flags claimed): the report gives the argmax
    agreement, the largest score error and the share of the bf16 bound, says bf16 and never
    EQUIVALENT. Its error is more than the float32 bound allows, so bf16 arithmetic ran (a
    float32 run would be within it), and within the bf16 bound."""
    run = _verify(digits, WITH_BF16, "--engine", "torch", "--format", "json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["equivalent"] is False and doc["precision"] == "bf16"
    assert doc["criterion"]["unit_roundoff_bf16"] == 2.0 ** -8
    assert doc["within_bf16_bound"] is True and 0 < doc["fraction"] <= 1
    assert doc["fraction"] * (U_BF16 + U) / (2 * U) > 1, "no more than float32 rounding: not bf16"
    assert doc["cells"] == len(doc["inputs"]) and 0 <= doc["argmax_agreement"] <= 1
    assert doc["argmax_agreement"] == doc["argmax_agree"] / doc["cells"]
    assert 0 < doc["max_abs"] < doc["largest_score"]
    text = _verify(digits, WITH_BF16, "--engine", "torch")
    assert text.returncode == 0, text.stderr
    assert "WITHIN THE BF16 BOUND (not equivalence)" in text.stdout
    assert "EQUIVALENT" not in text.stdout.replace("(not equivalence)", "")


def test_a_gross_error_is_outside_the_bf16_bound(digits):
    """A converted net whose scores are off by more than bf16 rounding could make (here: ten
    times its scores; doubled ones stay within the bound, which is loose: docs/verify.md) is
    reported outside the bf16 bound."""
    from fcnify.caffe.netdef import read_netdef
    from fcnify.convert import check_bf16
    from fcnify.caffe.caffemodel import read_weights
    from fcnify.engines import make_engine
    from fcnify.io.preprocess import Preprocess
    original, fcn = digits
    card = find_model("digits")
    runner = make_engine("torch")
    with runner.load(original, card.weights) as a, runner.load(fcn, fcn.with_suffix(".caffemodel")) as b:
        forward = b.forward

        def wrong(inputs, outputs):
            return {k: 10 * v for k, v in forward(inputs, outputs).items()}
        b.forward = wrong
        report = check_bf16(a, b, read_netdef(original).param, read_netdef(fcn).param,
                            read_weights(card.weights), card.preprocess or Preprocess(), {})
    assert not report.within_bound and report.fraction > 1
    assert report.equivalent is False
