"""Every bad input ends in one line on stderr and the right exit code, never a crash (issue #6).

Each test runs the CLI on one bad input and checks the contract: exit 2 for
bad input or usage (1 where the work itself failed), exactly one
`fcnify: error: PATH: problem` line on stderr naming the file and the
problem, no traceback, no death by a signal, and no partial output (nothing
under the output names and no hidden `.fcnify-tmp-` files). Cases where Caffe
runs, or would abort if fcnify's checks missed something, run `python -m
fcnify` in a subprocess; the rest call main() in this process (Caffe itself
always runs in fcnify's worker process). The net is the fuzz corpus's tiny
conv + pool + InnerProduct net with seeded weights.

Tests run as root, which ignores file permissions: unreadable files and
read-only folders are simulated by making os.access (what fcnify and click
ask) or open() say no, in this process.
"""
from __future__ import annotations

import builtins
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, Run, call_fcnify, run_fcnify, write_model
from fcnify.errors import EngineCrash
from fcnify.files import TMP_MARK
from fcnify.engines.caffe_engine import CaffeRunner
from fcnify.engines.sandbox import Sandbox

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
TINY = (CORPUS / "tiny.prototxt").read_text()
# The tiny net's map: a 16 px field, and tiles of at least 19 px (reach 18 px, stride 2).
FIELD, MIN_TILE = 16, 19


# ------------------------------------------------------------------ helpers


def assert_error(run: Run, code: int, *fragments: str) -> str:
    """One `fcnify: error:` line holding every fragment, exit `code`, no traceback, no signal."""
    detail = f"exit {run.code}\nstdout: {run.out}\nstderr: {run.err}"
    assert run.code >= 0, f"killed by signal {-run.code}\n{detail}"
    assert run.code == code, detail
    assert "Traceback" not in run.err + run.out, detail
    lines = run.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcnify: error: "), detail
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in the message\n{detail}"
    return lines[0]


def assert_nothing_written(folder: Path) -> None:
    """The output folder holds no outputs and no staged temporary files."""
    left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert left == [], f"left in {folder}: {left}"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny net and seeded weights for it."""
    return write_model(tmp_path_factory.mktemp("tiny"), "tiny", TINY, seed=0)


@pytest.fixture
def out(tmp_path) -> Path:
    """An empty output folder; convert writes PREFIX `out/net`."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Good and bad image files."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {name: folder / name for name in
             ("ok.png", "ok.jpg", "small.png", "truncated.jpg", "truncated.png", "corrupt.png",
              "text.jpg", "empty.png", "bomb.png")}
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(paths["ok.png"])
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(paths["ok.jpg"])
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(paths["small.png"])
    jpg, png = paths["ok.jpg"].read_bytes(), paths["ok.png"].read_bytes()
    paths["truncated.jpg"].write_bytes(jpg[:len(jpg) // 2])
    paths["truncated.png"].write_bytes(png[:300])
    paths["corrupt.png"].write_bytes(png[:200] + bytes(60) + png[260:])
    paths["text.jpg"].write_text("hello, I am not a picture\n")
    paths["empty.png"].write_bytes(b"")
    paths["bomb.png"].write_bytes(png_header(100_000, 100_000))
    return paths


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels (and holds almost none)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00"))
            + chunk(b"IEND", b""))


def model_args(tiny) -> list[str]:
    proto, weights = tiny
    return ["--model-def", str(proto), "--weights", str(weights)]


@pytest.fixture
def deny(monkeypatch):
    """deny(path, mode): os.access answers no for `path` and `mode` (R_OK or W_OK)."""
    real = os.access
    denied: dict[str, int] = {}

    def access(path, mode, *args, **kwargs):
        key = os.path.abspath(os.fspath(path))
        if key in denied and mode & denied[key]:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return lambda path, mode: denied.__setitem__(os.path.abspath(path), mode)


# ------------------------------------------------------------------ 1. files that are not there


@pytest.mark.parametrize("problem", ["missing", "directory", "empty"])
def test_bad_prototxt_file(tiny, out, tmp_path, problem):
    """A missing, directory or empty prototxt is named with what is wrong with it."""
    path = tmp_path / "net.prototxt"
    if problem == "directory":
        path.mkdir()
    elif problem == "empty":
        path.write_bytes(b"")
    run = call_fcnify("convert", "--model-def", path, "--weights", tiny[1], "--out", out / "net")
    words = {"missing": "net definition (prototxt) not found",
             "directory": "is a directory, expected net definition (prototxt)",
             "empty": "is empty (0 bytes), expected net definition (prototxt)"}[problem]
    assert_error(run, 2, f"{path}: {words}")
    assert_nothing_written(out)


@pytest.mark.parametrize("problem", ["missing", "directory", "empty"])
def test_bad_caffemodel_file(tiny, out, tmp_path, problem):
    """A missing, directory or empty caffemodel is named with what is wrong with it."""
    path = tmp_path / "net.caffemodel"
    if problem == "directory":
        path.mkdir()
    elif problem == "empty":
        path.write_bytes(b"")
    run = call_fcnify("convert", "--model-def", tiny[0], "--weights", path, "--out", out / "net")
    words = {"missing": "not found", "directory": "is a directory, expected weights (caffemodel)",
             "empty": "is empty (0 bytes), expected weights (caffemodel)"}[problem]
    assert_error(run, 2, f"{path}: ", words)
    assert_nothing_written(out)


def test_info_on_missing_prototxt(tmp_path):
    """`fcnify info` on a path that does not exist says so."""
    assert_error(call_fcnify("info", tmp_path / "nope.prototxt"), 2,
                 f"{tmp_path / 'nope.prototxt'}: net definition (prototxt) not found")


@pytest.mark.parametrize("which", ["prototxt", "caffemodel"])
def test_unreadable_model_file(tiny, out, deny, which):
    """An unreadable prototxt or caffemodel: fcnify's line, not click's usage block.

    click checks readability itself with os.access and would print four lines
    of usage; fcnify turns that check off and words it in one line.
    """
    path = tiny[0] if which == "prototxt" else tiny[1]
    deny(path, os.R_OK)
    run = call_fcnify("convert", *model_args(tiny), "--out", out / "net")
    what = "net definition (prototxt)" if which == "prototxt" else "weights (caffemodel)"
    assert_error(run, 2, f"{path}: permission denied reading {what}")
    assert_nothing_written(out)


@pytest.mark.parametrize("name, words", [
    ("missing.png", "no such file or directory"),
    ("empty.png", "image file is empty (0 bytes)"),
])
def test_bad_image_file(tiny, images, name, words):
    """A missing or empty image is named with what is wrong with it."""
    path = images["ok.png"].parent / name
    assert_error(call_fcnify("classify-map", path, *model_args(tiny)), 2, f"{path}: {words}")


def test_image_folder_without_images(tiny, tmp_path):
    """A folder given as the image, holding no image, is an error rather than a silent no-op."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a picture")
    run = call_fcnify("classify-map", folder, *model_args(tiny))
    assert_error(run, 2, f"{folder}: folder has no image files")


def test_unreadable_image(tiny, images, monkeypatch):
    """An image that cannot be opened for reading is one line naming it."""
    path = images["ok.png"]
    real_open = builtins.open

    def refuse(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    run = call_fcnify("classify-map", path, *model_args(tiny))
    assert_error(run, 2, f"{path}: cannot read image: permission denied")


# ------------------------------------------------------------------ 2. files that are not what they claim


def test_truncated_caffemodel(tiny, out, tmp_path):
    """A cut-off caffemodel is reported with the byte offset, before Caffe sees it."""
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(tiny[1].read_bytes()[:3000])
    run = run_fcnify("convert", "--model-def", tiny[0], "--weights", path, "--out", out / "net")
    assert_error(run, 2, f"{path}: truncated", "(file is 3000 bytes)")
    assert_nothing_written(out)


@pytest.mark.parametrize("kind", ["jpeg", "prototxt"])
def test_wrong_file_as_caffemodel(tiny, out, images, caffe_root, kind):
    """A JPEG or a prototxt given as the caffemodel is recognised for what it is."""
    path = caffe_root / "examples" / "images" / "cat.jpg" if kind == "jpeg" else tiny[0]
    run = run_fcnify("convert", "--model-def", tiny[0], "--weights", path, "--out", out / "net")
    words = "this is a JPEG image, not a caffemodel" if kind == "jpeg" else \
        "this is a text file (a prototxt?), not a binary caffemodel"
    assert_error(run, 2, f"{path}: {words}")
    assert_nothing_written(out)


def test_caffemodel_as_prototxt(tiny, out):
    """A caffemodel given as the prototxt says it is binary and where it belongs."""
    run = call_fcnify("convert", "--model-def", tiny[1], "--weights", tiny[1], "--out", out / "net")
    assert_error(run, 2, f"{tiny[1]}: not a text prototxt", "pass it with --weights")
    assert_nothing_written(out)


# ------------------------------------------------------------------ 3. net definitions that are wrong


def test_prototxt_syntax_error_names_the_line(tmp_path):
    """A syntax error gives the line (and column) of the mistake."""
    path = tmp_path / "net.prototxt"
    path.write_text(TINY.replace("num_output: 4 kernel_size", "num_output: 4 kernel_size::"))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "::" in text)
    assert_error(call_fcnify("info", path), 2, f"{path}: syntax error at line {line}, column")


def test_prototxt_unknown_field(tmp_path):
    """A misspelt field is named, with its line."""
    path = tmp_path / "net.prototxt"
    path.write_text(TINY.replace("num_output: 4", "num_outptu: 4"))
    assert_error(call_fcnify("info", path), 2, f"{path}: syntax error at line",
                 'has no field named "num_outptu"')


def test_prototxt_unknown_layer_type(tmp_path, out, tiny):
    """A layer type Caffe does not register is named, with the closest one it does."""
    path = tmp_path / "net.prototxt"
    path.write_text(TINY.replace('"ReLU"', '"ReLu"'))
    run = call_fcnify("convert", "--model-def", path, "--weights", tiny[1], "--out", out / "net")
    assert_error(run, 2, f"{path}: layer 'relu1': unknown layer type 'ReLu'", "did you mean 'ReLU'?")
    assert_nothing_written(out)


def test_prototxt_bottom_nobody_produces(tmp_path):
    """A bottom that no earlier layer produces is named, with the layer that reads it."""
    path = tmp_path / "net.prototxt"
    path.write_text(TINY.replace('bottom: "pool1"', 'bottom: "pool9"'))
    assert_error(call_fcnify("info", path), 2,
                 f"{path}: layer 'fc1' reads bottom 'pool9', which no earlier layer produces")


# ------------------------------------------------------------------ 4. weights that do not fit


def _weights_for(tmp_path: Path, text: str) -> Path:
    return write_model(tmp_path, "other", text, seed=3)[1]


@pytest.mark.parametrize("change, words", [
    (("dim: 16 dim: 16", "dim: 18 dim: 18"),
     "layer 'fc1' weights: the net definition needs (5, 256), other.caffemodel has (5, 324)"),
    (("num_output: 5 }", "num_output: 5 bias_term: false }"),
     "layer 'fc1' expects 2 parameter blob(s) (weights and bias), other.caffemodel has 1"),
    (("num_output: 5 }", "num_output: 7 }"),
     "layer 'fc1' weights: the net definition needs (5, 256), other.caffemodel has (7, 256) "
     "(a different num_output: fine-tuned for other classes?)"),
    (("num_output: 4 kernel_size: 3 stride: 1 pad: 1", "num_output: 8 kernel_size: 5 stride: 1 pad: 2"),
     "layer 'conv1' weights: the net definition needs (4, 3, 3, 3), other.caffemodel has (8, 3, 5, 5) "
     "(another kernel size or input channel count: weights of a different net?)"),
], ids=["fc-shape", "no-bias", "fine-tuned", "other-net"])
def test_weights_that_do_not_fit(tiny, out, tmp_path, change, words):
    """Weights saved for another net: the layer, both shapes and a hint, before Caffe runs."""
    weights = _weights_for(tmp_path, TINY.replace(*change))
    run = call_fcnify("convert", "--model-def", tiny[0], "--weights", weights, "--out", out / "net")
    assert_error(run, 2, f"{weights}: {words}")
    assert_nothing_written(out)


def test_weights_whose_layer_names_match_nothing(tiny, out, tmp_path):
    """Renamed layers: the message lists which layers get no weights and what the file has."""
    weights = _weights_for(tmp_path, TINY.replace('"conv1"', '"convA"').replace('"fc1"', '"fcA"'))
    run = call_fcnify("convert", "--model-def", tiny[0], "--weights", weights, "--out", out / "net")
    assert_error(run, 2, f"{weights}: 2 layer(s) of tiny.prototxt get no weights from it",
                 "'conv1' expects (4, 3, 3, 3), (4,)", "'fc1' expects (5, 256), (5,)",
                 "Its layers with weights: convA, fcA")
    assert_nothing_written(out)


def test_weights_for_a_layer_without_parameters(tiny, out, tmp_path):
    """Blobs stored under a parameterless layer's name (Caffe aborts on that) are refused."""
    from fcnify.caffe.proto import caffe_pb2
    net = caffe_pb2().NetParameter.FromString(tiny[1].read_bytes())
    extra = net.layer.add()
    extra.CopyFrom(next(l for l in net.layer if l.name == "conv1"))
    extra.name = "relu1"
    weights = tmp_path / "extra.caffemodel"
    weights.write_bytes(net.SerializeToString())
    run = run_fcnify("convert", "--model-def", tiny[0], "--weights", weights, "--out", out / "net")
    assert_error(run, 2, f"{weights}: carries parameter blobs for layer(s) of tiny.prototxt that "
                         "take none: 'relu1' (Convolution, 2 blob(s))")
    assert_nothing_written(out)


def test_weights_with_nan(tiny, out, tmp_path):
    """NaN in the weights is refused (the check would compare NaN with NaN and prove nothing)."""
    from fcnify.caffe.caffemodel import read_weights, write_weights
    from fcnify.caffe.netdef import parse_netdef
    blobs = {name: list(lw.blobs) for name, lw in read_weights(tiny[1]).layers.items()}
    blobs["fc1"][0] = blobs["fc1"][0].copy()
    blobs["fc1"][0][0, :3] = np.nan
    weights = tmp_path / "nan.caffemodel"
    with open(weights, "wb") as f:
        write_weights(f, parse_netdef(TINY).param, blobs)
    run = call_fcnify("convert", "--model-def", tiny[0], "--weights", weights, "--out", out / "net")
    assert_error(run, 2, f"{weights}: layer 'fc1' weights: 3 of its 1280 values", "NaN or infinite")
    assert_nothing_written(out)


def test_weights_whose_outputs_overflow(tiny, out, tmp_path):
    """Finite weights whose outputs overflow to inf/NaN prove nothing: NOT EQUIVALENT, exit 1
    (the check used to find no difference between two NaNs and call them equivalent)."""
    from fcnify.caffe.proto import caffe_pb2
    net = caffe_pb2().NetParameter.FromString(tiny[1].read_bytes())
    blob = next(l for l in net.layer if l.name == "fc1").blobs[0]
    values = [3e38] * len(blob.data)
    del blob.data[:]
    blob.data.extend(values)
    weights = tmp_path / "huge.caffemodel"
    weights.write_bytes(net.SerializeToString())
    run = call_fcnify("convert", "--model-def", tiny[0], "--weights", weights, "--out", out / "net")
    assert_error(run, 1, "the converted net does NOT reproduce the original's outputs")
    assert ": inf of the bound" in run.out and "result: NOT EQUIVALENT" in run.out
    assert sorted(p.name for p in out.iterdir()) == [  # kept for inspection, as documented
        "net_full_conv.caffemodel", "net_full_conv.json", "net_full_conv.prototxt"]


def test_fully_convolutional_net_with_wrong_weights(tiny, images, tmp_path):
    """classify-map on an already-FCN net checks its weights too (Caffe used to abort here)."""
    text = TINY.replace('type: "InnerProduct"', 'type: "Convolution"').replace(
        "inner_product_param { num_output: 5 }", "convolution_param { num_output: 5 kernel_size: 8 }")
    proto, _ = write_model(tmp_path, "fcn", text)
    run = run_fcnify("classify-map", images["ok.png"], "--model-def", proto, "--weights", tiny[1])
    assert_error(run, 2, f"{tiny[1]}: layer 'fc1' weights: the net definition needs (5, 4, 8, 8), "
                         "tiny.caffemodel has (5, 256)")


# ------------------------------------------------------------------ 5. nets that do not convert


def test_net_without_inner_product(tmp_path, out):
    """No InnerProduct: exit 0, says there is nothing to convert, writes only the card, which points
    at the net's own prototxt and caffemodel (docs/errors.md)."""
    text = TINY.replace('type: "InnerProduct"', 'type: "Convolution"').replace(
        "inner_product_param { num_output: 5 }", "convolution_param { num_output: 5 kernel_size: 8 }")
    proto, weights = write_model(tmp_path, "fcn", text)
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", out / "net")
    assert run.code == 0 and run.err == "", run
    assert run.out.startswith(f"nothing to convert in {proto}"), run.out
    assert sorted(p.name for p in out.iterdir()) == ["net_full_conv.json"]
    card = json.loads((out / "net_full_conv.json").read_text())
    assert (Path(card["model_def"]).resolve(), Path(card["weights"]).resolve()) == (proto.resolve(), weights.resolve())


def test_inner_product_that_cannot_become_a_convolution(tmp_path, out):
    """An InnerProduct over axis 2 applies per row: the message says why it cannot convert."""
    text = TINY.replace("num_output: 5 }", "num_output: 5 axis: 2 }").replace(
        'type: "Softmax"', 'type: "ReLU"')
    proto, weights = write_model(tmp_path, "axis", text)
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", out / "net")
    assert_error(run, 2, f"{proto}: InnerProduct 'fc1' has axis 2", "cannot reproduce")
    assert_nothing_written(out)


# ------------------------------------------------------------------ 6. images that cannot be mapped


def test_image_smaller_than_the_field(tiny, images, out):
    """An image smaller than one window: the message states the minimum size (height x width)."""
    run = call_fcnify("classify-map", images["small.png"], *model_args(tiny), "--out", out)
    assert_error(run, 2, f"{images['small.png']}: image is 10x12 px (height x width), smaller than "
                         f"one window: tiny needs at least {FIELD}x{FIELD} px")
    assert_nothing_written(out)


@pytest.mark.parametrize("name, words", [
    ("truncated.jpg", "cannot decode image: image file is truncated"),
    ("truncated.png", "cannot decode image"),
    ("corrupt.png", "cannot decode image"),
    ("text.jpg", "not an image file (Pillow cannot identify its format)"),
])
def test_image_that_does_not_decode(tiny, images, out, name, words):
    """Truncated, corrupt and non-image files are named, and nothing is written."""
    run = call_fcnify("classify-map", images[name], *model_args(tiny), "--out", out)
    assert_error(run, 2, f"{images[name]}: {words}")
    assert_nothing_written(out)


def test_caffemodel_as_image(tiny):
    """A caffemodel given as the image is not an image file."""
    run = run_fcnify("classify-map", tiny[1], *model_args(tiny))
    assert_error(run, 2, f"{tiny[1]}: not an image file")


def test_image_header_claims_too_many_pixels(tiny, images):
    """A 100000 x 100000 px header is refused before decoding, stating the pixel limit."""
    run = call_fcnify("classify-map", images["bomb.png"], *model_args(tiny))
    assert_error(run, 2, f"{images['bomb.png']}: image is larger than the limit of "
                         "1,000,000,000 pixels")


def test_memory_budget_too_small_for_one_tile(tiny, images, out):
    """--max-memory below what the smallest exact tile needs: the line states both sizes."""
    run = call_fcnify("classify-map", images["ok.png"], *model_args(tiny), "--max-memory", "1MB",
                      "--engine", "caffe", "--out", out)  # Caffe's memory model
    assert_error(run, 2, f"even the smallest exact tile ({MIN_TILE} px) needs about",
                 "that a memory budget of 976.56 KiB lets a pass use (95%")
    assert_nothing_written(out)


def test_forced_tile_below_the_minimum(tiny, images, out):
    """--tile below the net's minimum exact tile is refused, stating the minimum."""
    run = call_fcnify("classify-map", images["ok.png"], *model_args(tiny), "--tile", "5", "--out", out)
    assert_error(run, 2, f"--tile 5 is too small: tiles must be at least {MIN_TILE} px")
    assert_nothing_written(out)


@pytest.mark.parametrize("batch", ["0", "-3"])
def test_batch_below_one(tiny, images, out, batch):
    """--batch 0 or negative: one line naming the option and value, exit 2, nothing written."""
    run = call_fcnify("classify-map", images["ok.png"], *model_args(tiny), "--batch", batch, "--out", out)
    assert_error(run, 2, f"--batch {batch}: not a number of images (1 or more)")
    assert_nothing_written(out)


# ------------------------------------------------------------------ 7. preprocessing files


def test_mean_of_the_wrong_shape(tiny, images, tmp_path):
    """A 4-channel mean for a 3-channel net states both shapes."""
    mean = tmp_path / "mean.npy"
    np.save(mean, np.zeros((4, 8, 8), np.float32))
    run = call_fcnify("classify-map", images["ok.png"], *model_args(tiny), "--mean", mean)
    assert_error(run, 2, f"{mean}: mean has shape (4, 8, 8); expected (3,) or (3, H, W)")


def test_labels_with_the_wrong_number_of_lines(tiny, images, tmp_path):
    """Three labels for five classes: both counts, before any image is mapped."""
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    run = call_fcnify("classify-map", images["ok.png"], *model_args(tiny), "--labels", labels)
    assert_error(run, 2, f"{labels}: labels file has 3 lines, the net has 5 classes")


# ------------------------------------------------------------------ 8. a GPU this build does not have


@pytest.mark.parametrize("command", ["convert", "classify-map"])
def test_gpu_on_a_cpu_only_build(tiny, images, out, command):
    """--gpu 0 on a CPU_ONLY Caffe: one line, exit 2, before any work (nothing written)."""
    from fcnify.engines.caffe_engine import caffe_build
    if caffe_build().cuda:
        pytest.skip("this Caffe build has CUDA")
    args = ["--out", out / "net"] if command == "convert" else [images["ok.png"], "--engine", "caffe", "--out", out]
    t0 = time.perf_counter()
    run = run_fcnify(command, *model_args(tiny), "--engine", "caffe", "--gpu", "0", *args)
    assert_error(run, 2, "--gpu 0: this Caffe", "was built CPU_ONLY")
    assert time.perf_counter() - t0 < 30
    assert_nothing_written(out)


def test_verify_gpu_on_a_cpu_only_build(tiny):
    """verify --gpu 0 on a CPU_ONLY Caffe: the same one line, exit 2 (README: classify-map, convert
    and verify take --gpu)."""
    from fcnify.engines.caffe_engine import caffe_build
    if caffe_build().cuda:
        pytest.skip("this Caffe build has CUDA")
    proto, weights = tiny
    run = run_fcnify("verify", proto, proto, "--weights", weights, "--fcn-weights", weights,
                     "--engine", "caffe", "--gpu", "0")
    assert_error(run, 2, "--gpu 0: this Caffe", "was built CPU_ONLY")


# ------------------------------------------------------------------ 9. outputs that cannot be written


def test_output_folder_missing_is_made(tiny, tmp_path):
    """convert --out into a folder that does not exist makes it, as classify-map --out does."""
    run = call_fcnify("convert", *model_args(tiny), "--out", tmp_path / "nowhere" / "net")
    assert run.code == 0, run.err
    assert (tmp_path / "nowhere" / "net_full_conv.caffemodel").is_file()


def test_output_folder_not_made_for_failed_work(tiny, tmp_path):
    """A convert that fails before writing leaves no new folder behind."""
    (tmp_path / "in_the_way").write_text("a file where a folder would go")
    run = call_fcnify("convert", *model_args(tiny), "--out", tmp_path / "in_the_way" / "sub" / "net")
    assert_error(run, 2, f"{tmp_path / 'in_the_way'}: cannot make the output folder: a file is in the way")


def test_output_folder_read_only(tiny, out, deny):
    """convert --out into a folder it may not write names the folder (os.access says no)."""
    deny(out, os.W_OK)
    run = call_fcnify("convert", *model_args(tiny), "--out", out / "net")
    assert_error(run, 2, f"{out}: output folder is not writable")
    assert_nothing_written(out)


def test_output_folder_immutable(tiny, out):
    """The same, for real, with a folder even root cannot write into (chattr +i), if possible."""
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (covered by test_output_folder_read_only)")
    try:
        run = run_fcnify("convert", *model_args(tiny), "--out", out / "net")
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert_error(run, 2, f"{out}: output folder is not writable")
    assert_nothing_written(out)


def test_classify_map_output_folder_read_only(tiny, images, out, deny):
    """classify-map --out into a folder it may not write names the folder."""
    deny(out, os.W_OK)
    run = call_fcnify("classify-map", images["ok.png"], *model_args(tiny), "--out", out)
    assert_error(run, 2, f"{out}: --out folder is not writable")
    assert_nothing_written(out)


def test_classify_map_output_is_a_file(tiny, images):
    """classify-map --out naming a file, not a folder, is refused before any work."""
    run = call_fcnify("classify-map", images["ok.png"], *model_args(tiny), "--out", images["ok.jpg"])
    assert_error(run, 2, f"{images['ok.jpg']}: --out exists and is not a folder")


def test_existing_output_is_kept_without_force(tiny, out):
    """An existing output is refused without --force and left exactly as it was."""
    existing = out / "net_full_conv.caffemodel"
    existing.write_bytes(b"precious")
    run = call_fcnify("convert", *model_args(tiny), "--out", out / "net")
    assert_error(run, 2, f"{existing}: already exists (use --force to overwrite)")
    assert existing.read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["net_full_conv.caffemodel"]


# ------------------------------------------------------------------ interruption and Caffe aborts


def test_sigterm_during_convert_leaves_nothing(caffenet, tmp_path):
    """SIGTERM while CaffeNet's outputs are staged: exit 130, no outputs, no temporary
    files, and the input files unchanged."""
    proto, weights = caffenet
    before = {p: digest(p) for p in (proto, weights)}
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "fcnify", "convert", "--model-def", str(proto),
                             "--weights", str(weights), "--out", str(out / "caffenet")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(TMP_MARK in p.name for p in out.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"convert ended before it staged any output: {proc.communicate()}"
    time.sleep(0.5)  # well into writing 233 MB or verifying
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip() == "fcnify: interrupted" and "Traceback" not in err
    assert_nothing_written(out)
    assert {p: digest(p) for p in (proto, weights)} == before


def test_caffe_abort_in_the_worker_becomes_engine_crash(tmp_path):
    """A net Caffe aborts on (engine CUDNN, built without it) kills only the worker: the
    caller gets a one-line EngineCrash with Caffe's message and goes on with a new worker."""
    proto = tmp_path / "cudnn.prototxt"
    proto.write_text(TINY.replace("pool: MAX", "pool: MAX engine: CUDNN"))
    box = Sandbox()
    try:
        runner = CaffeRunner(box=box)
        with pytest.raises(EngineCrash) as info:
            runner.load(proto)  # straight to Caffe: no fcnify validation on this path
        message = str(info.value)
        assert message.startswith(f"{proto}: Caffe aborted (killed by SIGABRT): ")
        assert "Layer pool1 has unknown engine" in message and "\n" not in message
        assert box.crashes == 1
        assert box.call("ping") == "pong"  # a fresh worker
    finally:
        box.close()


def test_engine_crash_through_the_cli_is_one_line(tiny, out):
    """A Caffe abort during convert's check: one line, exit 2, and the staged files removed."""
    inject = ("import sys; from fcnify import cli; from fcnify.engines import caffe_engine as runner\n"
              "def load(self, model_def, weights=None):\n"
              "    self.box.call('crash_for_test', 'check', context='loading ' + str(model_def),"
              " path=model_def)\n"
              "runner.CaffeRunner.load = load\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", inject, "convert", *model_args(tiny), "--out",
                           str(out / "net")], capture_output=True, text=True, timeout=300, cwd=REPO)
    line = assert_error(Run(proc.returncode, proc.stdout, proc.stderr), 2,
                        "Caffe aborted (killed by SIGABRT): test.cpp:1: Check failed: 1 == 2")
    assert "(while loading" in line
    assert_nothing_written(out)


# ------------------------------------------------------------------ checks the fuzz tests asked for
#
# Each of these nets or weights made Caffe abort in the worker before fcnify
# checked for it (found by tests/test_fuzz.py, or by reading the Caffe CHECK
# next to the one it found). Each test shows that Caffe does abort on it, and
# that fcnify now refuses it first, in one line.

TINY_FCN_BLOB = TINY.replace('top: "prob"', 'top: "fc1-conv"')
NET_CASES = {
    "too many param specs": (
        ("num_output: 4 kernel_size", "num_output: 4 kernel_size"),
        ('top: "conv1"\n  convolution_param', 'top: "conv1"\n  param {} param {} param {}\n  convolution_param'),
        "layer 'conv1' (Convolution): 3 param specs for 2 parameter blob(s)"),
    "param spec on a layer without parameters": (
        ('bottom: "conv1"\n  top: "conv1"', 'bottom: "conv1"\n  top: "conv1"\n  param { lr_mult: 1 }'),
        None, "layer 'relu1' (ReLU): 1 param specs for 0 parameter blob(s)"),
    "shared param of another shape": (
        ('top: "conv1"\n  convolution_param', 'top: "conv1"\n  param { name: "w" }\n  convolution_param'),
        ('top: "fc1"\n', 'top: "fc1"\n  param { name: "w" }\n'),
        "layer 'fc1' (InnerProduct): shares param 'w' of shape (5, 256) with layer 'conv1'"),
    "include and exclude": (
        ('name: "relu1"', 'name: "relu1"\n  include { phase: TEST }\n  exclude { phase: TRAIN }'),
        None, "layer 'relu1' has both include and exclude rules"),
    "propagate_down count": (
        ('top: "pool1"\n', 'top: "pool1"\n  propagate_down: true propagate_down: false\n'),
        None, "layer 'pool1' gives 2 propagate_down value(s) for 1 bottom(s)"),
    "top produced twice": (
        ('bottom: "conv1"\n  top: "conv1"', 'bottom: "conv1"\n  top: "data"'), None,
        "layer 'relu1' writes top 'data', which an earlier layer already produces"),
    "in place with a second reader": (
        ('layer {\n  name: "relu1"', 'layer {\n  name: "peek"\n  type: "Silence"\n'
                                     '  bottom: "conv1"\n}\nlayer {\n  name: "relu1"'), None,
        "layer 'relu1' writes top 'conv1', which an earlier layer already produces"),
    "convolution with two bottoms, one top": (
        ('bottom: "data"\n  top: "conv1"', 'bottom: "data"\n  bottom: "data"\n  top: "conv1"'),
        None, "layer 'conv1' (Convolution): needs one top per bottom"),
    "ReLU without a top": (
        ('bottom: "conv1"\n  top: "conv1"', 'bottom: "conv1"'), None,
        "layer 'relu1' (ReLU): takes 1 top(s), has 0"),
    "Flatten in place": (
        ('layer {\n  name: "fc1"', 'layer {\n  name: "flat"\n  type: "Flatten"\n  bottom: "pool1"\n'
                                   '  top: "pool1"\n}\nlayer {\n  name: "fc1"'), None,
        "layer 'flat' (Flatten): cannot work in place"),
    "group 0": (
        ("kernel_size: 3 stride: 1 pad: 1", "kernel_size: 3 stride: 1 pad: 1 group: 0"), None,
        "layer 'conv1' (Convolution): group must be positive, is 0"),
    "convolution stride_h alone": (
        ("kernel_size: 3 stride: 1 pad: 1", "kernel_size: 3 stride_h: 1 pad: 1"), None,
        "layer 'conv1' (Convolution): stride must be positive, is [1, 0]"),
    "pooling pad_h alone": (
        ("kernel_size: 2 stride: 2", "kernel_size: 2 stride: 2 pad_h: 1"), None,
        "layer 'pool1' (Pooling): give either pad or both pad_h and pad_w"),
    "pooling stride with stride_h and stride_w": (
        ("kernel_size: 2 stride: 2", "kernel_size: 2 stride: 1 stride_h: 2 stride_w: 2"), None,
        "layer 'pool1' (Pooling): give either stride or both stride_h and stride_w"),
    "stochastic pooling": (
        ("pool: MAX", "pool: STOCHASTIC"), None,
        "layer 'pool1' (Pooling): STOCHASTIC pooling has no CPU implementation in Caffe"),
    "cuDNN engine": (
        ("pool: MAX", "pool: MAX engine: CUDNN"), None,
        "layer 'pool1' asks for engine CUDNN, and this Caffe build has no cuDNN"),
    "parameter blobs in the prototxt": (
        ('top: "conv1"\n  convolution_param', 'top: "conv1"\n  blobs { shape { dim: 2 } data: 1 data: 2 }'
                                              '\n  convolution_param'), None,
        "layer 'conv1' carries 1 parameter blob(s) in the net definition"),
}


def _edited(text: str, *changes) -> str:
    for change in changes:
        if change is not None:
            assert change[0] in text, change
            text = text.replace(*change)
    return text


@pytest.fixture(scope="module")
def caffe(tmp_path_factory):
    """A CaffeRunner on its own sandbox, to show what Caffe itself does with an input."""
    box = Sandbox()
    yield CaffeRunner(box=box)
    box.close()


def caffe_aborts(runner: CaffeRunner, proto: Path, weights: Path | None = None) -> str:
    """Caffe's own last words on a net (loaded, then run once): the test fails if it copes."""
    try:
        net = runner.load(proto, weights)
        net.forward({"data": np.zeros((1, 3, 16, 16), np.float32)}, ["prob"])
    except EngineCrash as exc:
        assert runner.box.call("ping") == "pong"
        return exc.message
    pytest.fail(f"Caffe accepts {proto.name}: the check is not needed")


@pytest.mark.parametrize("case", sorted(NET_CASES))
def test_net_caffe_aborts_on_is_refused_first(case, tiny, out, tmp_path, caffe):
    """A net Caffe aborts on (loading or running it) is refused before Caffe, in one line."""
    first, second, words = NET_CASES[case]
    proto = tmp_path / "net.prototxt"
    proto.write_text(_edited(TINY, first, second))
    message = caffe_aborts(caffe, proto)
    assert "Caffe aborted" in message or "killed by" in message, message
    run = call_fcnify("convert", "--model-def", proto, "--weights", tiny[1], "--out", out / "net")
    assert_error(run, 2, f"{proto}: {words}")
    assert_nothing_written(out)


def test_inner_product_output_name_taken(tmp_path, out):
    """Renaming fc1's output to fc1-conv would clash with a blob of that name (Caffe aborted
    on the converted net): the conversion is refused, and nothing is written."""
    proto, weights = write_model(tmp_path, "clash", TINY_FCN_BLOB)
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", out / "net")
    assert_error(run, 2, f"{proto}: cannot rename InnerProduct 'fc1' output to 'fc1-conv': the "
                         "net already has a blob of that name")
    assert_nothing_written(out)


def _weights_edit(tiny, tmp_path: Path, edit) -> Path:
    from fcnify.caffe.proto import caffe_pb2
    net = caffe_pb2().NetParameter.FromString(tiny[1].read_bytes())
    data = edit(net)
    path = tmp_path / "edited.caffemodel"
    path.write_bytes(data if isinstance(data, bytes) else net.SerializeToString())
    return path


def _bias(net):
    return next(l for l in net.layer if l.name == "conv1").blobs[1]


WEIGHTS_CASES = {
    "header that does not decode": (
        lambda net: b"\x32" + net.SerializeToString()[1:],  # the net's name becomes a NetState
        "not a caffemodel: its net header does not decode"),
    "old and new layers together": (
        lambda net: net.layers.add(name="old", type=4),
        "mixes old 'layers' and new 'layer' definitions"),
    "double data of another size": (
        lambda net: _bias(net).double_data.extend([1.0, 2.0]),
        "layer 'conv1' blob 1: shape (4,) needs 4 values but the file has 2"),
    "diff of another size": (
        lambda net: _bias(net).diff.extend([0.0]),
        "layer 'conv1' blob 1: shape (4,) needs 4 values but the file has 1 gradient (diff) values"),
    "legacy dims beat shape": (
        lambda net: setattr(_bias(net), "num", 2),
        "layer 'conv1' blob 1: shape (2, 0, 0, 0) needs 0 values but the file has 4"),
}


@pytest.mark.parametrize("case", sorted(WEIGHTS_CASES))
def test_weights_caffe_aborts_on_are_refused_first(case, tiny, out, tmp_path, caffe):
    """A caffemodel Caffe aborts on is refused before Caffe, in one line naming the file."""
    edit, words = WEIGHTS_CASES[case]
    weights = _weights_edit(tiny, tmp_path, edit)
    message = caffe_aborts(caffe, tiny[0], weights)
    assert "Caffe aborted" in message, message
    run = call_fcnify("convert", "--model-def", tiny[0], "--weights", weights, "--out", out / "net")
    assert_error(run, 2, f"{weights}: {words}")
    assert_nothing_written(out)
