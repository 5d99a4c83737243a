"""The command line as a whole: help, version, fetch through the CLI, info."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, call_fcnify, run_fcnify
from test_fetch import PAYLOAD, PAYLOAD_SHA1, server  # noqa: F401 (fixture)

COMMANDS = ["convert", "verify", "info", "classify-map", "export", "fetch", "doctor", "demo"]


def test_command_list_is_complete():
    """COMMANDS (whose --help is checked below) names every command the CLI has."""
    from fcnify.cli import cli
    assert sorted(COMMANDS) == sorted(cli.commands)


def test_version():
    """`fcnify --version` prints the package version."""
    import fcnify
    run = call_fcnify("--version")
    assert run.code == 0 and run.out.strip() == f"fcnify {fcnify.__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_text(command):
    """Every command's --help explains it (and, except doctor/demo, shows an example)."""
    run = call_fcnify(command, "--help")
    assert run.code == 0
    assert f"Usage: fcnify {command}" in run.out
    if command not in ("doctor", "demo"):
        assert "Example" in run.out


def test_classify_map_help_grouped():
    """classify-map's --help lists every option under a purpose heading, each with its help line."""
    import click
    from fcnify.cli import OPTION_GROUPS, cli
    command = cli.commands["classify-map"]
    run = call_fcnify("classify-map", "--help")
    assert run.code == 0
    headings = list(OPTION_GROUPS["classify-map"])
    positions = [run.out.index(f"\n{h}:\n") for h in headings]
    assert positions == sorted(positions)
    assert "Other options:" not in run.out
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{param.opts[0]} has no help line"
            assert param.opts[0] in run.out


def _fake_caffe_root(tmp_path, url: str, sha1: str):
    root = tmp_path / "caffe"
    readme = root / "models" / "bvlc_reference_caffenet" / "readme.md"
    readme.parent.mkdir(parents=True)
    readme.write_text(f"---\nname: test\ncaffemodel: bvlc_reference_caffenet.caffemodel\n"
                      f"caffemodel_url: {url}\nsha1: {sha1}\n---\n\ntext\n")
    return root


def test_fetch_command(tmp_path, server):  # noqa: F811
    """`fcnify fetch caffenet` downloads into the models folder and checks the SHA-1."""
    url, _ = server
    root = _fake_caffe_root(tmp_path, url, PAYLOAD_SHA1)
    models = tmp_path / "models"
    run = run_fcnify("fetch", "caffenet", env={"FCNIFY_CAFFE_SOURCE": str(root),
                                               "FCNIFY_MODELS": str(models)})
    assert run.code == 0, run.err
    target = models / "bvlc_reference_caffenet" / "bvlc_reference_caffenet.caffemodel"
    assert hashlib.sha1(target.read_bytes()).hexdigest() == PAYLOAD_SHA1
    assert "verified" in run.out


def test_fetch_command_bad_checksum(tmp_path, server):  # noqa: F811
    """A checksum mismatch is one line on stderr, exit 2, and no file in the models folder."""
    url, _ = server
    root = _fake_caffe_root(tmp_path, url, "1" * 40)
    models = tmp_path / "models"
    run = run_fcnify("fetch", "caffenet", env={"FCNIFY_CAFFE_SOURCE": str(root),
                                               "FCNIFY_MODELS": str(models)})
    assert run.code == 2
    assert len(run.err.strip().splitlines()) == 1 and "sha1" in run.err.lower()
    assert not list(models.rglob("*.caffemodel"))


def test_convert_without_weights_says_fetch(tmp_path, monkeypatch):
    """`fcnify convert` with no CaffeNet weights points at `fcnify fetch caffenet`."""
    monkeypatch.setenv("FCNIFY_MODELS", str(tmp_path / "empty"))
    run = call_fcnify("convert", "--out", tmp_path / "x")
    assert run.code == 2
    assert "fcnify fetch caffenet" in run.err and len(run.err.strip().splitlines()) == 1


def test_info_on_digits():
    """`fcnify info` on the shipped digits net reports its 4-px stride and 28-px window."""
    from fcnify.io.models import find_model
    run = call_fcnify("info", find_model("digits").model_def, "--input-size", "480x640")
    assert run.code == 0, run.err
    assert "stride:          4 px" in run.out and "window per cell: 28x28 px" in run.out
    assert "at 480x640: 114x154 cells" in run.out  # sizes height x width, as --input-size


def test_info_smallest_input_and_exact_sizes_are_caffes(tmp_path):
    """info's "smallest input giving one cell" and "sizes that tile exactly", read off the CLI and
    checked in Caffe on the converted net: one cell at the smallest size and Caffe refuses one pixel
    less; at each exact size the last window ends on the image's edge (no cell hangs over it)."""
    from fcnify.convert import convert
    from fcnify.engines.caffe_engine import CaffeRunner
    from fcnify.errors import FcnifyError
    from fcnify.io.models import find_model
    digits = find_model("digits")
    run = call_fcnify("info", digits.model_def)
    assert run.code == 0, run.err
    smallest = re.search(r"smallest input giving one cell: (\d+)x(\d+) px", run.out)
    exact = re.search(r"sizes that tile exactly: ([\d, ]+), \.\.\. \((\d+) \+ (\d+)k\)", run.out)
    assert smallest and exact, run.out
    side = int(smallest.group(1))
    sizes = [int(v) for v in exact.group(1).split(", ")]
    window, stride = int(exact.group(2)), int(exact.group(3))
    assert (side, window, stride) == (25, 28, 4) and sizes == [28 + 4 * k for k in range(6)]
    files = convert(digits.model_def, digits.weights, tmp_path / "d", card=digits, check=False).outputs
    with CaffeRunner().load(files["prototxt"], files["caffemodel"]) as net:
        def cells(n: int) -> tuple[int, int]:
            return net.forward({"data": np.zeros((1, 1, n, n), np.float32)}, ["ip2-conv"])["ip2-conv"].shape[2:]
        assert cells(side) == (1, 1)
        with pytest.raises(FcnifyError):
            cells(side - 1)
    with CaffeRunner().load(files["prototxt"], files["caffemodel"]) as net:
        for n in sizes:
            rows, cols = net.forward({"data": np.zeros((1, 1, n, n), np.float32)}, ["ip2-conv"])["ip2-conv"].shape[2:]
            assert rows == cols and (rows - 1) * stride + window == n, (n, rows)


def test_caffe_logs_quiet_unless_verbose(tmp_path):
    """Caffe's glog lines stay off stderr by default and come back with --verbose."""
    quiet = run_fcnify("convert", "--model", "digits", "--out", tmp_path / "q")
    assert quiet.code == 0, quiet.err
    assert "net.cpp" not in quiet.err and quiet.err.strip() == ""
    loud = run_fcnify("--verbose", "convert", "--model", "digits", "--out", tmp_path / "v")
    assert loud.code == 0, loud.err
    assert "net.cpp" in loud.err  # glog's "Initializing net from parameters" lines


# ------------------------------------------------------------------ documented behaviour, through the CLI
# Each test reads the CLI's output and checks it against an independent reference:
# the library's map of the same image (same engine and shapes, so exactly equal),
# the scene's ground truth, or a rule restated here.

SCENE = REPO / "prototxt" / "digits" / "scene.png"
SCENE_TRUTH = REPO / "prototxt" / "digits" / "scene.json"
DIGIT_LABELS = [str(d) for d in range(10)] + ["background"]

# Three classes over 3 channels, fully convolutional: zoo defaults apply (BGR, 0-255,
# ImageNet mean), no labels. conv2's 144 im2col rows per pixel make memory grow
# quickly enough with the image for --max-memory to matter at a few hundred px.
THREE = """
name: "three"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 16 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 } }
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "score" type: "Convolution" bottom: "pool" top: "score" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""


@pytest.fixture(scope="module")
def digits_model():
    from fcnify.dense.dense import DenseModel
    from fcnify.io.models import find_model
    model = DenseModel(find_model("digits"))
    yield model
    model.close()


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """The THREE net with seeded weights, a photo-like image for it, and the loaded model."""
    from PIL import Image
    from fcnify.dense.dense import DenseModel
    from fcnify.convert import card_for_model_def
    from conftest import write_model
    tmp = tmp_path_factory.mktemp("three")
    proto, weights = write_model(tmp, "three", THREE)
    rng = np.random.default_rng(3)
    small = rng.integers(40, 216, (12, 16, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((160, 120), Image.BILINEAR))
    Image.fromarray(img).save(tmp / "photo.png")
    model = DenseModel(card_for_model_def(proto, weights), engine="caffe")  # planner.estimate's engine
    yield {"proto": proto, "weights": weights, "image": tmp / "photo.png", "rgb": img, "model": model}
    model.close()


@pytest.fixture
def no_pictures(monkeypatch):
    """Skip drawing the two PNGs (seconds each; test_dense checks them): these tests read the scores."""
    from fcnify.io import outputs
    monkeypatch.setattr(outputs, "heatmap_png", lambda *args, **kwargs: b"")
    monkeypatch.setattr(outputs, "argmax_png", lambda *args, **kwargs: b"")


def _three_map(three, out, *options, image=None):
    """classify-map on the THREE net with --out; returns (run, scores.npy, map.json)."""
    image = image or three["image"]
    run = call_fcnify("classify-map", image, "--model-def", three["proto"], "--weights", three["weights"],
                      "--engine", "caffe", "--out", out, *options)
    assert run.code == 0, run.err
    stem = Path(image).stem
    return run, np.load(out / f"{stem}.scores.npy"), json.loads((out / f"{stem}.map.json").read_text())


def _section(text: str, header: str, lines: int) -> list[str]:
    rows = text.splitlines()
    start = rows.index(header) + 1
    return rows[start:start + lines]


def test_classify_map_text_grid_legend_top_classes(tmp_path, digits_model):
    """A small map prints its argmax grid, a legend of the classes in it and the top classes.

    The crop holds a 6, a 1 and an 8 (scene.json): the grid names each next to
    the cell whose 28-px field is centred on it; every number is checked against the map.
    """
    from PIL import Image
    crop = tmp_path / "crop.png"
    Image.open(SCENE).crop((250, 130, 370, 250)).save(crop)
    run = call_fcnify("classify-map", crop, "--model", "digits", "--top-k", "4")
    assert run.code == 0, run.err
    probs = digits_model.classify(crop).probs
    arg = probs.argmax(axis=0)
    assert arg.shape == (24, 24)  # (120 - 28) / 4 + 1
    lines = run.out.splitlines()
    assert lines[0].startswith(f"{crop}: 120x120 px") and "fed at" not in lines[0]
    assert "map 24x24 cells of 11 classes" in lines[1] and "28x28 px window every 4 px" in lines[1]
    grid = _section(run.out, "argmax class per cell (rows top to bottom):", 25)
    assert [[int(v) for v in row.split()] for row in grid[:24]] == arg.tolist()
    won = np.bincount(arg.ravel(), minlength=11)
    order = sorted(range(11), key=lambda c: (-won[c], -probs[c].max()))
    used = [c for c in order if won[c]]
    assert grid[24].strip() == "where " + ", ".join(f"{c}={DIGIT_LABELS[c]}" for c in used)
    for digit, (x, y) in ((6, (47, 37)), (1, (99, 43)), (8, (63, 95))):
        r, c = round((y - 14) / 4), round((x - 14) / 4)  # cell (r, c) is centred at (4c + 14, 4r + 14)
        assert digit in arg[r - 1:r + 2, c - 1:c + 2], (digit, arg[r - 1:r + 2, c - 1:c + 2])
    top = _section(run.out, "top classes over the map (cells won, peak probability):", 4)
    for line, c in zip(top, order[:4]):
        assert line.split() == [str(c), DIGIT_LABELS[c], str(won[c]), "cells", "peak", f"{probs[c].max():.3f}"]


def _char_map(probs: np.ndarray, background: int, block: int) -> list[str]:
    """The README's character map, restated: '.' for an all-background block, else the
    class of the block's most probable non-background cell."""
    arg, peak = probs.argmax(axis=0), probs.max(axis=0)
    rows = []
    for r0 in range(0, arg.shape[0], block):
        row = ""
        for c0 in range(0, arg.shape[1], block):
            a, p = arg[r0:r0 + block, c0:c0 + block], peak[r0:r0 + block, c0:c0 + block]
            row += "." if (a == background).all() else "0123456789"[a.ravel()[np.where(a != background, p, -1).argmax()]]
        rows.append(row)
    return rows


def test_classify_map_character_map_for_large_maps(digits_model):
    """A map too wide for a grid (114x154) prints one character per 2x2 block, '.' for background.

    Each of the scene's 24 digits shows as its own character at its block or a
    neighbouring one, and the character map is the map's, block by block.
    """
    run = call_fcnify("classify-map", SCENE, "--model", "digits")
    assert run.code == 0, run.err
    assert "argmax class per cell" not in run.out
    header = "argmax map, one character per 2x2 block of cells (8 px), '.' = background:"
    chars = [row.strip() for row in _section(run.out, header, 57)]
    probs = digits_model.classify(SCENE).probs
    assert chars == _char_map(probs, 10, 2)
    truth = json.loads(SCENE_TRUTH.read_text())["digits"]
    missed = []
    for d in truth:
        x, y = d["center"]
        r, c = min(round((y - 14) / 4), 113) // 2, min(round((x - 14) / 4), 153) // 2
        near = "".join(row[max(0, c - 1):c + 2] for row in chars[max(0, r - 1):r + 2])
        if str(d["class"]) not in near:
            missed.append((d["class"], d["center"], near))
    assert not missed, missed


def test_mean_file_replaces_the_mean_in_the_nets_channel_order(three, tmp_path, no_pictures):
    """--mean (C or CxHxW .npy, in the net's BGR order) is what is subtracted from the pixels.

    Subtracting (b, g, r) = (10, 20, 30) through --mean must give the map of an
    image whose pixels are already lower by that, mapped with a zero mean:
    exactly, as the net sees the same numbers.
    """
    from PIL import Image
    bgr_mean = np.array([10.0, 20.0, 30.0])
    np.save(tmp_path / "mean.npy", bgr_mean)
    np.save(tmp_path / "mean_chw.npy", bgr_mean[:, None, None] + np.array([[-1.0, 1.0], [2.0, -2.0]]))
    np.save(tmp_path / "zero.npy", np.zeros(3))
    shifted = tmp_path / "shifted" / "photo.png"
    shifted.parent.mkdir()
    Image.fromarray((three["rgb"] - bgr_mean[::-1].astype(np.uint8)).astype(np.uint8)).save(shifted)
    _, with_mean, doc = _three_map(three, tmp_path / "a", "--mean", tmp_path / "mean.npy")
    _, with_chw, _ = _three_map(three, tmp_path / "b", "--mean", tmp_path / "mean_chw.npy")
    _, reference, _ = _three_map(three, tmp_path / "c", "--mean", tmp_path / "zero.npy", image=shifted)
    _, default, _ = _three_map(three, tmp_path / "d")
    assert doc["model"]["preprocess"]["mean"] == [10.0, 20.0, 30.0]
    assert np.array_equal(with_mean, reference) and np.array_equal(with_chw, reference)
    assert not np.array_equal(default, reference)  # the zoo's ImageNet mean was replaced


def test_labels_file_names_classes_and_class_by_name(three, tmp_path, no_pictures):
    """--labels names the classes everywhere, and --class NAME draws that class."""
    labels = tmp_path / "labels.txt"
    labels.write_text("sky\nforest\nriver\n")
    run, scores, doc = _three_map(three, tmp_path / "out", "--labels", labels, "--class", "river")
    assert doc["heatmap_class"] == {"class": 2, "label": "river"}
    names = ["sky", "forest", "river"]
    cells = call_fcnify("classify-map", three["image"], "--model-def", three["proto"], "--weights",
                        three["weights"], "--labels", labels, "--out", tmp_path / "cells", "--save", "cells")
    assert cells.code == 0, cells.err
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["photo.map.json"]  # --save cells: only it
    cell = json.loads((tmp_path / "cells" / "photo.map.json").read_text())["cells"][0]
    assert [t["label"] for t in cell["top"]] == [names[t["class"]] for t in cell["top"]]
    assert [e["label"] for e in doc["top_classes"]] == [names[e["class"]] for e in doc["top_classes"]]
    top = _section(run.out, "top classes over the map (cells won, peak probability):", 3)
    won = np.bincount(scores.argmax(axis=0).ravel(), minlength=3)
    assert [line.split()[:3] for line in top if line.split()[2] != "0"] == \
        [[str(c), names[c], str(won[c])] for c in sorted(range(3), key=lambda c: -won[c]) if won[c]]
    by_index = _three_map(three, tmp_path / "idx", "--labels", labels, "--class", "1")[2]
    assert by_index["heatmap_class"] == {"class": 1, "label": "forest"}


@pytest.mark.parametrize("with_labels", [False, True])
def test_class_out_of_range(three, tmp_path, with_labels):
    """--class 3 on a 3-class net: one line naming the valid range, exit 2, nothing written."""
    labels = tmp_path / "labels.txt"
    labels.write_text("sky\nforest\nriver\n")
    extra = ["--labels", labels] if with_labels else []
    run = call_fcnify("classify-map", three["image"], "--model-def", three["proto"], "--weights",
                      three["weights"], "--out", tmp_path / "out", "--class", "3", *extra)
    assert run.code == 2 and len(run.err.strip().splitlines()) == 1, run.err
    assert re.search(r"0( to |\.\.)2\b", run.err) and "3" in run.err, run.err
    assert not list((tmp_path / "out").glob("*"))


def test_max_memory_tiles_within_the_budget(three, tmp_path, no_pictures, monkeypatch):
    """A valid --max-memory below the whole image's need tiles it as the planner says, and maps it
    as the library does with that budget; without it, the budget is half of the available memory."""
    from fcnify.caffe import planner
    model = three["model"]
    h, w = three["rgb"].shape[:2]
    need = planner.estimate(model.netdef.param, h, w)
    budget = need.total - need.activations // 2  # room for about half the image's activations
    tiles, tile_size = model.plan(h, w, budget)
    assert len(tiles) > 1
    expected = f"run: tiled, {len(tiles)} tiles of {tile_size[1]}x{tile_size[0]} px"
    run, scores, doc = _three_map(three, tmp_path / "given", "--max-memory", str(budget))
    assert expected in run.out and doc["run"]["tiles"] == len(tiles)
    assert np.array_equal(scores, model.classify(three["rgb"], budget=budget).probs)
    assert _three_map(three, tmp_path / "kib", "--max-memory", f"{budget / 1024:.3f}KiB")[2]["run"]["tiles"] == len(tiles)
    monkeypatch.setattr(planner, "available_memory", lambda: 2 * budget)  # the default: half of it
    run, scores, _ = _three_map(three, tmp_path / "default")
    assert expected in run.out
    monkeypatch.setattr(planner, "available_memory", lambda: 1 << 40)
    run, _, doc = _three_map(three, tmp_path / "plenty")
    assert "run: whole" in run.out and doc["run"]["tiles"] == 1


def test_scale_and_tile_through_the_cli(three, tmp_path, no_pictures):
    """--scale resizes before mapping (boxes stay in original pixels); --tile N forces N x N tiles."""
    model = three["model"]
    run, scores, doc = _three_map(three, tmp_path / "half", "--scale", "0.5")
    assert doc["input_size"] == {"height": 60, "width": 80} and doc["image_size"] == {"height": 120, "width": 160}
    assert np.array_equal(scores, model.classify(three["rgb"], scale=0.5).probs)
    assert "fed at 60x80" in run.out.splitlines()[0]  # height x width
    # a cell's window in the net's input, scaled back by 1/0.5 into the photo's pixels
    (sy, sx), (fy, fx), (oy, ox) = doc["map"]["stride_px"], doc["map"]["window_px"], doc["map"]["offset_px"]
    f = doc["map"]["cell_window_image_px"]
    x0, y0 = f["x_first"] + 5 * f["x_step"], f["y_first"] + 3 * f["y_step"]
    assert [x0, y0, x0 + f["width"], y0 + f["height"]] == \
        [2 * (5 * sx + ox), 2 * (3 * sy + oy), 2 * (5 * sx + ox + fx), 2 * (3 * sy + oy + fy)]
    tiles, _ = model.plan(120, 160, tile=48)
    run, scores, doc = _three_map(three, tmp_path / "tiles", "--tile", "48")
    assert f"run: tiled, {len(tiles)} tiles of 48x48 px" in run.out
    assert doc["run"]["tile_size"] == [48, 48] and doc["run"]["tiles"] == len(tiles) > 4
    assert np.array_equal(scores, model.classify(three["rgb"], tile=48).probs)


def _digits_files(prefix: Path) -> list[Path]:
    return [Path(f"{prefix}_full_conv.{ext}") for ext in ("prototxt", "caffemodel", "json")]


def test_convert_no_verify_and_default_prefix(tmp_path, monkeypatch):
    """Without --out the files go to ./NAME_full_conv.*; --no-verify writes the same net, unchecked."""
    monkeypatch.chdir(tmp_path)
    run = call_fcnify("convert", "--model", "digits", "--no-verify")
    assert run.code == 0, run.err
    assert "equivalence check" not in run.out and "EQUIVALENT" not in run.out
    unchecked = _digits_files(tmp_path / "digits")
    assert all(p.is_file() for p in unchecked)
    assert json.loads(unchecked[2].read_text())["verification"] is None
    checked = _digits_files(tmp_path / "checked")
    run = call_fcnify("convert", "--model", "digits", "--out", tmp_path / "checked")
    assert run.code == 0 and re.search(r"^\s*result: EQUIVALENT\b", run.out, re.M), run.out
    assert json.loads(checked[2].read_text())["verification"]["equivalent"] is True
    assert unchecked[1].read_bytes() == checked[1].read_bytes()
    from fcnify.io.models import find_model
    mine = tmp_path / "nets" / "mynet.prototxt"
    mine.parent.mkdir()
    mine.write_text(find_model("digits").model_def.read_text())
    run = call_fcnify("convert", "--model-def", mine, "--weights", find_model("digits").weights, "--no-verify")
    assert run.code == 0, run.err
    assert all(p.is_file() for p in _digits_files(tmp_path / "mynet"))  # in ., named after the prototxt


def test_convert_weights_without_model_def_is_caffenet(caffenet, tmp_path):
    """--weights alone converts CaffeNet's definition with those weights (fc6 becomes a 6x6 conv)."""
    from fcnify.caffe.caffemodel import read_weights
    _, weights = caffenet
    run = call_fcnify("convert", "--weights", weights, "--out", tmp_path / "cn", "--no-verify")
    assert run.code == 0, run.err
    assert "fc6 InnerProduct [4096x9216, 4096] -> fc6-conv Convolution [4096x256x6x6, 4096]" in run.out
    given = read_weights(weights)
    written = read_weights(tmp_path / "cn_full_conv.caffemodel")
    assert np.array_equal(written["fc6-conv"].blobs[0].reshape(4096, 9216),
                          given["fc6"].blobs[0].reshape(4096, 9216))
    assert np.array_equal(written["conv1"].blobs[0], given["conv1"].blobs[0])


@pytest.mark.parametrize("samples", [1, 5])
def test_verify_samples(tmp_path, samples):
    """verify --samples N checks N seeded random images (plus cat.jpg) and says so."""
    from fcnify.io.models import find_model
    card = find_model("digits")
    assert call_fcnify("convert", "--model", "digits", "--out", tmp_path / "d", "--no-verify").code == 0
    run = call_fcnify("verify", card.model_def, tmp_path / "d_full_conv.prototxt", "--weights", card.weights,
                      "--samples", str(samples))
    assert run.code == 0, run.err
    assert re.search(r"^\s*result: EQUIVALENT\b", run.out, re.M), run.out
    shown = set(re.findall(r"random image #(\d+)", run.out))
    assert shown == {str(i) for i in range(samples)}, run.out


def test_fetch_dest(tmp_path, server):  # noqa: F811
    """`fetch --dest DIR` puts the checked file in DIR, not in the models folder."""
    url, _ = server
    root = _fake_caffe_root(tmp_path, url, PAYLOAD_SHA1)
    models, dest = tmp_path / "models", tmp_path / "elsewhere"
    run = run_fcnify("fetch", "caffenet", "--dest", dest,
                     env={"FCNIFY_CAFFE_SOURCE": str(root), "FCNIFY_MODELS": str(models)})
    assert run.code == 0, run.err
    target = dest / "bvlc_reference_caffenet.caffemodel"
    assert hashlib.sha1(target.read_bytes()).hexdigest() == PAYLOAD_SHA1
    assert str(target) in run.out and not models.exists()


def test_debug_shows_the_traceback(tmp_path):
    """--debug adds the traceback to the one-line error (same exit code); without it, one line only."""
    args = ("convert", "--model-def", tmp_path / "missing.prototxt", "--weights", tmp_path / "x.caffemodel")
    plain = call_fcnify(*args)
    debug = call_fcnify("--debug", *args)
    assert plain.code == debug.code == 2
    assert len(plain.err.strip().splitlines()) == 1 and "Traceback" not in plain.err
    assert debug.err.startswith("Traceback (most recent call last):") and "fcnify.errors" in debug.err
    assert debug.err.strip().splitlines()[-1] == plain.err.strip()


def test_force_overwrites_outputs(tmp_path):
    """Existing outputs are refused (exit 2, untouched) and replaced with --force, for convert and classify-map."""
    prefix = tmp_path / "d"
    assert call_fcnify("convert", "--model", "digits", "--out", prefix, "--no-verify").code == 0
    card = Path(f"{prefix}_full_conv.json")
    card.write_text("stale")
    again = call_fcnify("convert", "--model", "digits", "--out", prefix, "--no-verify")
    assert again.code == 2 and "already exists" in again.err and card.read_text() == "stale"
    forced = call_fcnify("convert", "--model", "digits", "--out", prefix, "--no-verify", "--force")
    assert forced.code == 0, forced.err
    assert json.loads(card.read_text())["name"] == "digits"
    from PIL import Image
    crop = tmp_path / "crop.png"
    Image.open(SCENE).crop((0, 0, 100, 80)).save(crop)
    out = tmp_path / "maps"
    out.mkdir()
    (out / "crop.scores.npy").write_bytes(b"stale")
    refused = call_fcnify("classify-map", crop, "--model", "digits", "--out", out)
    assert refused.code == 2 and (out / "crop.scores.npy").read_bytes() == b"stale"
    forced = call_fcnify("classify-map", crop, "--model", "digits", "--out", out, "--force")
    assert forced.code == 0, forced.err
    assert np.load(out / "crop.scores.npy").shape == (11, 14, 19)


def test_model_closed_when_an_image_fails(three, tmp_path, monkeypatch):
    """The model is closed on every way out of classify-map: a bug mid-batch (exit 3), a lone bad image."""
    from fcnify.dense.dense import DenseModel
    from fcnify.io import outputs
    closed = []
    close = DenseModel.close
    monkeypatch.setattr(DenseModel, "close", lambda self: (closed.append(self), close(self))[1])
    summary = outputs.text_summary
    calls = []

    def broken_second(dm, *args, **kwargs):
        calls.append(dm.image_path)
        if len(calls) == 2:
            raise RuntimeError("a bug while printing the second image")
        return summary(dm, *args, **kwargs)
    monkeypatch.setattr(outputs, "text_summary", broken_second)
    model = ("--model-def", three["proto"], "--weights", three["weights"])
    images = [tmp_path / f"photo{i}.png" for i in range(3)]
    for image in images:
        image.write_bytes(three["image"].read_bytes())
    run = call_fcnify("classify-map", *images, *model)
    assert run.code == 3 and "a bug while printing the second image" in run.err, run.err
    assert len(calls) == 2 and len(closed) == 1
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a nonsense")
    run = call_fcnify("classify-map", bad, *model)
    assert run.code == 2 and "bad.png" in run.err and len(closed) == 2, run.err


@pytest.mark.parametrize("args,message", [
    (["--size", "0"], "--size '0' is not N or HxW with positive numbers"),
    (["--size", "4x5x6"], "--size '4x5x6' is not N or HxW"),
    (["--max-memory", "lots"], "--max-memory:"),
    (["--top-k", "0"], "--top-k 0: must be at least 1"),
    (["--tile", "0"], "--tile 0: must be positive"),
    (["--scale", "-1"], "--scale -1: must be positive"),
    (["--workers", "0"], "--workers 0: need at least one worker"),
])
def test_bad_option_values_one_line(three, tmp_path, args, message):
    """Option values click's types refuse: one line naming the option and value, exit 2, nothing written."""
    out = tmp_path / "out"
    run = call_fcnify("classify-map", three["image"], "--model-def", three["proto"], "--weights",
                      three["weights"], "--out", out, *args)
    assert run.code == 2 and message in run.err and len(run.err.strip().splitlines()) == 1, run.err
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["classify-map", "x.png", "--foo"], "No such option '--foo'"),
    (["bogus"], "No such command 'bogus'"),
    (["classify-map", "x.png", "--workers", "2"], "--scheduler/--workers write each map's files"),
    (["classify-map", "x.png", "--workers", "2", "--scheduler", "tcp://h:1", "--out", "o"],
     "give either --scheduler or --workers"),
])
def test_usage_errors_take_one_line(args, message):
    """A usage error reads as every other error: one line on stderr, exit 2, no usage block."""
    run = call_fcnify(*args)
    assert run.code == 2 and run.out == ""
    assert run.err.startswith(f"fcnify: error: {message}") and len(run.err.splitlines()) == 1, run.err
    assert "--help" in run.err


# Three outputs: `prob` (the class map, stride 2), `box` on its grid, `side` on conv1's (stride 1).
UNALIGNED = """
name: "unaligned"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "score" type: "Convolution" bottom: "pool" top: "score" convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
layer { name: "box" type: "Convolution" bottom: "pool" top: "box" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "side" type: "Convolution" bottom: "conv1" top: "side" convolution_param { num_output: 2 kernel_size: 1 } }
"""


def test_unaligned_head_is_not_saved_and_said(tmp_path):
    """A head on another grid than the class map's is not saved, and stderr says so in one line;
    the head on the class map's grid is saved beside it (README: heads that do not line up)."""
    from PIL import Image
    from conftest import write_model
    proto, weights = write_model(tmp_path, "unaligned", UNALIGNED, seed=2)
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    out = tmp_path / "maps"
    run = call_fcnify("classify-map", tmp_path / "p.png", "--model-def", proto, "--weights", weights,
                      "--output", "prob", "--out", out, "--quiet")
    assert run.code == 0, run.err
    assert run.err.strip().splitlines() == [
        "fcnify: not saved: output(s) side (their cells do not line up with the class map's)"], run.err
    names = sorted(p.name for p in out.iterdir())
    assert "p.box.npy" in names and not [n for n in names if "side" in n], names
    doc = json.loads((out / "p.map.json").read_text())
    assert list(doc["heads"]) == ["box"]


def test_character_map_of_a_1000_class_map(digits_model):
    """A map of more classes than characters (1000, as SqueezeNet's 58x81) still prints a character
    map: the most frequent classes get characters, the rest '+', each cell its argmax's."""
    from dataclasses import replace
    from fcnify.io.outputs import text_summary
    dm = digits_model.classify(SCENE)
    rng = np.random.default_rng(0)
    probs = rng.random((1000, 58, 81)).astype(np.float32)
    probs[7, :29] += 2  # class 7 wins the top half, class 900 the bottom
    probs[900, 29:] += 2
    big = replace(dm, probs=probs, labels=None)
    text = text_summary(big)
    assert "argmax grid not printed" not in text
    header = ("argmax map, one character per cell (4 px), '.' = 10; the 2 classes that win the most cells "
              "by character, '+' = any other:")
    rows = [row.strip() for row in _section(text, header, 58)]
    assert rows[:29] == [rows[0]] * 29 and set(rows[0]) == {rows[0][0]} and len(rows[0]) == 81
    assert set(rows[-1]) == {rows[-1][0]} and rows[0][0] != rows[-1][0]
    assert f"where {rows[0][0]}=7, {rows[-1][0]}=900" in text or f"where {rows[-1][0]}=900, {rows[0][0]}=7" in text


def test_sizes_in_legends_are_rounded():
    """Image-pixel sizes print to a tenth (68.8x68.4), not 68.8x68.3544."""
    from fcnify.caffe.geometry import hw
    assert hw(68.8, 68.3544) == "68.8x68.4" and hw(24, 24) == "24x24"
