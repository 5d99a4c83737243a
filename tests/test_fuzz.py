"""Fuzzing: mutated prototxts and caffemodels end in one clean line, never a crash.

The seeds are tests/fuzz_corpus/ (a tiny conv + pool + InnerProduct net in
the current and the old V1 format, and seeded weights for it). Each case
mutates a seed (tokens, lines, bits, truncation, protobuf field numbers and
lengths, layer names) and runs `fcnify info` or `fcnify convert` through the
CLI's main() in this process; Caffe itself runs in fcnify's worker. Every case
must exit 0, 1 or 2, and a failure must be exactly one `fcnify: error:` line
from a named FcnifyError. A Caffe abort in the worker surfaces as EngineCrash,
which the contract allows, but each one is a check fcnify's validation
missed: they are counted, printed, and fail the test.

Hypothesis is derandomized (a fixed seed, no example database) and bounded;
each test asserts that it ran its full number of cases (2000 in all) and
prints how its cases ended. Run alone, this file runs the same cases every time; Hypothesis
also mixes in constants from the modules loaded at the time, so after other
tests in the same process a few of the cases differ. FCNIFY_FUZZ_SCALE=N runs
N times as many.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcnify import cli as cli_module
from fcnify.errors import FcnifyError
from fcnify.files import TMP_MARK
from fcnify.caffe.proto import caffe_pb2

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
PROTOTXTS = {p.name: p.read_text() for p in sorted(CORPUS.glob("*.prototxt"))}
CAFFEMODELS = {p.name: p.read_bytes() for p in sorted(CORPUS.glob("*.caffemodel"))}
CAFFEMODEL = CAFFEMODELS["tiny.caffemodel"]
# FCNIFY_FUZZ_SCALE=10 runs ten times as many cases (a longer hunt than CI's).
SCALE = float(os.environ.get("FCNIFY_FUZZ_SCALE", "1"))
FUZZ = dict(derandomize=True, database=None, deadline=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.filter_too_much])

# ------------------------------------------------------------------ running one case


@dataclass
class Case:
    """How one CLI run ended: exit code, output, and the exception main() turned into a line."""

    code: int
    out: str
    err: str
    error: BaseException | None
    seconds: float

    @property
    def outcome(self) -> str:
        if self.error is None:
            return f"exit {self.code}"
        return type(self.error).__name__


def run_main(*args: str) -> Case:
    """fcnify's main() in this process, noting which exception (if any) it reported."""
    seen: dict[str, BaseException] = {}
    group = cli_module.cli
    original = group.main

    def spy(*a, **k):
        try:
            return original(*a, **k)
        except BaseException as exc:
            seen["error"] = exc
            raise

    out, err = io.StringIO(), io.StringIO()
    group.main = spy
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = cli_module.main([str(a) for a in args])
    finally:
        del group.main
    # A warning would be one more line on a real run's stderr.
    shown = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
    return Case(code, out.getvalue(), err.getvalue() + shown, seen.get("error"),
                time.perf_counter() - t0)


def check_clean(case: Case, what: str) -> None:
    """The CLI contract for any input: a known exit code, one error line, no traceback."""
    detail = f"{what}\nexit {case.code}\nstdout: {case.out[-2000:]}\nstderr: {case.err[-2000:]}"
    assert case.code in (0, 1, 2), detail
    assert "Traceback" not in case.err and "Traceback" not in case.out, detail
    if case.code == 0:
        assert case.error is None and case.err == "", detail
        return
    assert isinstance(case.error, FcnifyError), f"not an FcnifyError: {case.error!r}\n{detail}"
    assert case.code == case.error.exit_code, detail
    lines = case.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcnify: error: "), detail


class Tally:
    """Outcomes of one fuzz test, printed as a small table at its end."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.outcomes: Counter[str] = Counter()
        self.crashes: list[str] = []
        self.seconds = 0.0

    def add(self, case: Case, what: str) -> None:
        self.outcomes[case.outcome] += 1
        self.seconds += case.seconds
        if case.outcome == "EngineCrash":
            self.crashes.append(f"{case.err.strip()}\n--- input ---\n{what}")

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def show(self, capsys) -> None:
        with capsys.disabled():
            print(f"\n{self.title}: {self.total} cases in {self.seconds:.1f} s")
            for outcome, n in self.outcomes.most_common():
                print(f"  {outcome:<22} {n:>5}")
            for crash in self.crashes[:5]:
                print("  Caffe crash (validation missed it):\n    "
                      + crash.replace("\n", "\n    ")[:3000])


RESULTS: dict[str, Tally] = {}

# ------------------------------------------------------------------ prototxt mutations

NUMBER = re.compile(r"(?<![\w.\-])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")
STRING = re.compile(r'"[^"\n]*"')
ENUM = re.compile(r"(?<=: )[A-Z][A-Z_0-9]+\b")
FIELD = re.compile(r"\b[a-z][a-z_0-9]*(?=\s*[:{])")
INTS = ("0", "-1", "1", "2", "3", "4", "5", "8", "15", "16", "17", "33", "0.5", "1e9",
        "2147483647", "2147483648", "4294967297", "9223372036854775807",
        "99999999999999999999")
NAMES = ("data", "conv1", "relu1", "pool1", "fc1", "prob", "input", "fc1-conv", "", "x")
TYPES = ("Convolution", "Pooling", "InnerProduct", "ReLU", "Softmax", "Input", "Flatten",
         "Reshape", "Concat", "Eltwise", "Split", "Dropout", "LRN", "BatchNorm", "Scale",
         "Bias", "Crop", "Deconvolution", "Slice", "Silence", "PReLU", "Sigmoid", "Data",
         "SoftmaxWithLoss", "Accuracy", "Python", "NoSuchLayer", "relu")
ENUMS = ("MAX", "AVE", "STOCHASTIC", "CEIL", "FLOOR", "SUM", "PROD", "TEST", "TRAIN",
         "CAFFE", "CUDNN", "CONVOLUTION", "POOLING", "INNER_PRODUCT", "RELU", "SOFTMAX",
         "SPLIT", "FLATTEN", "DATA", "NONE")
FIELDS = ("name", "type", "bottom", "top", "num_output", "kernel_size", "stride", "pad",
          "dilation", "group", "axis", "bias_term", "transpose", "pool", "global_pooling",
          "round_mode", "dim", "shape", "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h",
          "pad_w", "input_dim", "input", "layers", "layer", "param", "blobs_lr", "loss_weight",
          "propagate_down", "engine", "include", "exclude", "phase")
SNIPPETS = (
    "bias_term: false", "axis: 2", "axis: -1", "axis: 0", "global_pooling: true", "group: 2",
    "group: 0", "pad: 9", "pad: 1", "stride: 0", "stride: 3", "dilation: 2", "transpose: true",
    "kernel_h: 2", "kernel_w: 3", "kernel_size: 2", "kernel_size: 40", "num_output: 0",
    "engine: CUDNN", 'top: "conv1"', 'top: "data"', 'bottom: "data"', 'bottom: "fc1"',
    "include { phase: TRAIN }", "exclude { phase: TEST }", "include { phase: TEST }",
    'include { stage: "deploy" }', "include { min_level: 1 }", "shape { dim: 1 dim: 3 }",
    "local_size: 4", "dropout_ratio: 1.5", "pool: STOCHASTIC", "pool: AVE", "pad_h: 1",
    "pad_w: 1", "stride_h: 2", "stride_w: 2", "stride_h: 0", "round_mode: FLOOR",
    "slice_point: 1", "operation: PROD", "num_axes: 2", "dim: 0", "dim: -1", "dim: 1",
    "propagate_down: true", "loss_weight: 1", "param { lr_mult: 1 }", 'param { name: "w" }',
    "blobs { shape { dim: 2 } data: 1 data: 2 }", "blobs_lr: 1", 'param: "w"',
    "inner_product_param { num_output: 5 }", "convolution_param { num_output: 4 kernel_size: 1 }",
    "pooling_param { pool: MAX kernel_size: 2 }", "}", "{", "layer {", '"', ":", "#",
    "\x00", "\ufffd", "\u00e9",
)
TEXT_OPS = ("number", "number", "number", "string", "string", "enum", "field", "snippet",
            "snippet", "snippet", "delete_line", "duplicate_line", "swap_lines", "delete_span",
            "char")


def _replace_match(draw, text: str, pattern: re.Pattern, choices) -> str:
    spans = [m.span() for m in pattern.finditer(text)]
    if not spans:
        return text
    i, j = draw(st.sampled_from(spans))
    return text[:i] + draw(st.sampled_from(choices)) + text[j:]


def mutate_text(draw, text: str) -> str:
    """One random edit of prototxt text, mostly at the level of its tokens."""
    op = draw(st.sampled_from(TEXT_OPS))
    lines = text.split("\n")
    if op == "number":
        return _replace_match(draw, text, NUMBER, INTS)
    if op == "string":
        quoted = tuple(f'"{s}"' for s in NAMES + TYPES)
        return _replace_match(draw, text, STRING, quoted)
    if op == "enum":
        return _replace_match(draw, text, ENUM, ENUMS)
    if op == "field":
        return _replace_match(draw, text, FIELD, FIELDS)
    if op == "snippet":
        opens = [m.end() for m in re.finditer(r"\{", text)] or [len(text)]
        at = draw(st.sampled_from(opens))
        return text[:at] + " " + draw(st.sampled_from(SNIPPETS)) + " " + text[at:]
    if op in ("delete_line", "duplicate_line", "swap_lines"):
        k = draw(st.integers(0, len(lines) - 1))
        if op == "delete_line":
            del lines[k]
        elif op == "duplicate_line":
            lines.insert(k, lines[k])
        elif k + 1 < len(lines):
            lines[k], lines[k + 1] = lines[k + 1], lines[k]
        return "\n".join(lines)
    if op == "delete_span":
        i = draw(st.integers(0, max(0, len(text) - 1)))
        return text[:i] + text[i + draw(st.integers(1, 40)):]
    i = draw(st.integers(0, max(0, len(text) - 1)))
    return text[:i] + draw(st.characters(codec="utf-8")) + text[i + 1:]


@st.composite
def mutated_prototxt(draw) -> tuple[str, str]:
    name = draw(st.sampled_from(sorted(PROTOTXTS)))
    text = PROTOTXTS[name]
    for _ in range(draw(st.integers(1, 3))):
        text = mutate_text(draw, text)
    return name, text


# ------------------------------------------------------------------ caffemodel mutations

# Fields that hold messages, by the field that holds them (None: the file itself), so that
# key/length edits reach inside layers (100; V1: 2), blobs (7; V1: 6) and their shapes.
MESSAGE_FIELDS = {None: {100, 2}, 100: {7, 6, 143, 106, 117, 121}, 2: {6, 10, 17, 19},
                  7: {7}, 6: {7}}
KEY_NUMBERS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 100, 101, 143, 536870911)
SPECIAL_FLOATS = (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff",
                  b"\xff\xff\x7f\x7f", b"\x01\x00\x00\x00", b"\x00\x00\x00\x80")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def wire_fields(buf: bytes, start: int = 0, end: int | None = None, parent: int | None = None,
                out: list | None = None) -> list[tuple]:
    """(number, wire, key_start, length_start, payload_start, payload_end) of every field,
    recursing into the messages a caffemodel nests (layers, blobs, shapes, parameters)."""
    out = [] if out is None else out
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        length_start = pos
        if wire == 0:
            _, pos = _varint(buf, pos)
            payload = (length_start, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            payload = (pos, pos + size)
            pos += size
        else:
            size = {1: 8, 5: 4}[wire]
            payload = (pos, pos + size)
            pos += size
        out.append((number, wire, key_start, length_start) + payload)
        if wire == 2 and number in MESSAGE_FIELDS.get(parent, ()):
            wire_fields(buf, payload[0], payload[1], number, out)
    return out


BYTE_OPS = ("bitflip", "bitflip", "truncate", "insert", "delete", "key", "key", "length",
            "length", "float", "rename", "blob_count", "blob_shape")


def _structural(draw, data: bytes, op: str) -> bytes:
    """Edits that keep the file well-formed protobuf but change what it says."""
    pb = caffe_pb2()
    net = pb.NetParameter.FromString(data)
    layers = list(net.layer) or list(net.layers)  # current or V1 format
    with_blobs = [l for l in layers if len(l.blobs)]
    layer = draw(st.sampled_from(with_blobs or layers))
    if op == "rename":
        layer.name = draw(st.sampled_from(NAMES))
    elif op == "blob_count" and len(layer.blobs):
        if draw(st.booleans()):
            del layer.blobs[draw(st.integers(0, len(layer.blobs) - 1))]
        else:
            layer.blobs.add().CopyFrom(layer.blobs[-1])
    elif len(layer.blobs):
        blob = layer.blobs[draw(st.integers(0, len(layer.blobs) - 1))]
        legacy = ("num", "channels", "height", "width")
        if blob.HasField("num") and draw(st.booleans()):  # a V1 blob's num/channels/height/width
            value = draw(st.sampled_from((0, 1, 2, -1, 5, 2**31 - 1)))
            setattr(blob, draw(st.sampled_from(legacy)), value)
        else:
            dims = list(blob.shape.dim)
            k = draw(st.integers(0, len(dims)))
            choice = draw(st.sampled_from(("set", "drop", "add")))
            if choice == "set" and k < len(dims):
                dims[k] = draw(st.sampled_from((0, 1, 2, -1, 5, 256, 2**31, 2**62)))
            elif choice == "drop" and dims:
                dims.pop(min(k, len(dims) - 1))
            else:
                dims.insert(k, 1)
            del blob.shape.dim[:]
            blob.shape.dim.extend(dims)
    return net.SerializeToString()


def mutate_bytes(draw, data: bytes) -> bytes:
    """One random edit of caffemodel bytes: raw, wire-level, or structural."""
    op = draw(st.sampled_from(BYTE_OPS))
    n = len(data)
    if n == 0:
        return data
    if op == "bitflip":
        i = draw(st.integers(0, n - 1))
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    if op == "truncate":
        return data[:draw(st.integers(0, n - 1))]
    if op == "insert":
        i = draw(st.integers(0, n))
        return data[:i] + draw(st.binary(min_size=1, max_size=12)) + data[i:]
    if op == "delete":
        i = draw(st.integers(0, n - 1))
        return data[:i] + data[i + draw(st.integers(1, 16)):]
    if op in ("rename", "blob_count", "blob_shape"):
        try:
            return _structural(draw, data, op)
        except Exception:  # an earlier edit broke the message; fall back to a raw edit
            return data[:draw(st.integers(0, n - 1))]
    try:
        fields = wire_fields(data)
    except (IndexError, KeyError):
        fields = []
    if not fields:
        return data[:draw(st.integers(0, n - 1))]
    number, wire, key_start, length_start, p0, p1 = draw(st.sampled_from(fields))
    if op == "key":
        key = (draw(st.sampled_from(KEY_NUMBERS)) << 3) | draw(st.integers(0, 7))
        return data[:key_start] + _encode_varint(key) + data[length_start:]
    if op == "length":
        if wire != 2:
            return data[:draw(st.integers(0, n - 1))]
        size = max(0, p1 - p0 + draw(st.sampled_from((-5, -4, -1, 1, 4, 2**20, 2**31, 2**40))))
        return data[:length_start] + _encode_varint(size) + data[p0:]
    # "float": a NaN, an infinity, the largest float, a denormal or -0 in the weights
    floats = [f for f in fields if f[0] == 5 and f[1] == 2 and f[5] - f[4] >= 4]
    if not floats:
        return data
    *_, f0, f1 = draw(st.sampled_from(floats))
    i = f0 + 4 * draw(st.integers(0, (f1 - f0) // 4 - 1))
    return data[:i] + draw(st.sampled_from(SPECIAL_FLOATS)) + data[i + 4:]


@st.composite
def mutated_caffemodel(draw) -> bytes:
    data = CAFFEMODELS[draw(st.sampled_from(sorted(CAFFEMODELS)))]
    for _ in range(draw(st.integers(1, 2))):
        data = mutate_bytes(draw, data)
    return data


# ------------------------------------------------------------------ the tests

def _convert_case(tally: Tally, prototxt: str, weights: bytes, what: str) -> None:
    """Run `fcnify convert` on the two files; check the contract and what was written."""
    with tempfile.TemporaryDirectory(prefix="fcnify-fuzz-") as tmp:
        tmp = Path(tmp)
        proto, model, out = tmp / "net.prototxt", tmp / "net.caffemodel", tmp / "out"
        proto.write_bytes(prototxt.encode("utf-8", "surrogatepass"))
        model.write_bytes(weights)
        out.mkdir()
        case = run_main("convert", "--model-def", proto, "--weights", model, "--out", out / "net")
        tally.add(case, what)
        check_clean(case, what)
        left = sorted(p.name for p in out.iterdir())
        assert not [n for n in left if TMP_MARK in n], f"temporary files left: {left}\n{what}"
        if case.code == 2:
            assert left == [], f"exit 2 but files written: {left}\n{what}"
        assert case.outcome != "EngineCrash", f"Caffe aborted; validation missed it:\n{case.err}\n{what}"


def test_fuzz_info_on_mutated_prototxt(capsys):
    """`fcnify info` (no Caffe) on 1000 mutated prototxts: exit 0 or one clean error line."""
    tally = RESULTS.setdefault("info", Tally("fcnify info, mutated prototxt"))
    sizes = (None, "64", "15", "1", "100000", "7x300")

    @settings(max_examples=int(1000 * SCALE), **FUZZ)
    @given(mutated_prototxt(), st.sampled_from(sizes))
    def case(seed_and_text, size):
        seed, text = seed_and_text
        with tempfile.TemporaryDirectory(prefix="fcnify-fuzz-") as tmp:
            path = Path(tmp) / seed
            path.write_bytes(text.encode("utf-8", "surrogatepass"))
            args = ["info", path] + (["--input-size", size] if size else [])
            result = run_main(*args)
        what = f"{seed} with --input-size {size}:\n{text}"
        tally.add(result, what)
        check_clean(result, what)

    try:
        case()
    finally:
        tally.show(capsys)
    assert tally.total >= int(1000 * SCALE)


def test_fuzz_convert_on_mutated_prototxt(capsys):
    """`fcnify convert` on 500 mutated prototxts with the seed weights: no Caffe crash."""
    tally = RESULTS.setdefault("convert-prototxt", Tally("fcnify convert, mutated prototxt"))

    @settings(max_examples=int(500 * SCALE), **FUZZ)
    @given(mutated_prototxt())
    def case(seed_and_text):
        seed, text = seed_and_text
        _convert_case(tally, text, CAFFEMODEL, f"{seed}:\n{text}")

    try:
        case()
    finally:
        tally.show(capsys)
    assert tally.total >= int(500 * SCALE)


def test_fuzz_convert_on_mutated_caffemodel(capsys):
    """`fcnify convert` on 500 mutated caffemodels (current and V1 seeds): no Caffe crash."""
    tally = RESULTS.setdefault("convert-caffemodel", Tally("fcnify convert, mutated caffemodel"))
    text = PROTOTXTS["tiny.prototxt"]

    @settings(max_examples=int(500 * SCALE), **FUZZ)
    @given(mutated_caffemodel())
    def case(weights):
        _convert_case(tally, text, weights, f"caffemodel of {len(weights)} bytes: {weights!r}"[:6000])

    try:
        case()
    finally:
        tally.show(capsys)
    assert tally.total >= int(500 * SCALE)
