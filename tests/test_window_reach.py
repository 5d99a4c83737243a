"""Window and reach, as users read them: probed pixel by pixel in Caffe, and as info reports them.

The window of a cell is the crop the original classifier would be given for
it; the reach is every pixel that can change it. Each probe changes one
pixel of an image and runs the converted net in Caffe: every cell that
changes must hold the pixel in its reported reach. Cells outside the reach
are computed from the same numbers, so they must stay bit for bit the same.
That alone passes a reach reported too large, so edge_lines pins it from both
sides: the lines of pixels just inside the middle cell's reach change it, those
just outside do not (CaffeNet, two padded nets, unpadded LeNet).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import call_fcnify, write_model
from fcnify.convert import convert
from fcnify.caffe.geometry import map_geometry, map_size, score_blob
from fcnify.caffe.netdef import read_netdef
from fcnify.caffe.shapes import input_shapes
from fcnify.engines.caffe_engine import CaffeRunner
from nets import input_layer, layer_text


def conv(name: str, bottom: str, n: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> str:
    dil = f" dilation: {d}" if d > 1 else ""
    return layer_text(name, "Convolution", bottom, name, f"convolution_param {{ num_output: {n} "
                      f"kernel_size: {k} stride: {s} pad: {p}{dil} }}")


def relu(blob: str) -> str:
    return layer_text(f"relu_{blob}", "ReLU", blob, blob)


# ResNet-style: 7x7/2 pad 3 stem, ceil-rounded 3x3/2 max pool, a residual block, a
# down-sampling block with a 1x1/2 projection, global average pooling, a classifier.
# Stride 8; classifies 64x64 images (one cell), while its layers alone imply a smaller box.
RESNETISH = ('name: "ResNetish"\n' + input_layer(1, 3, 64, 64)
             + conv("conv_1", "data", 8, 7, 2, 3) + relu("conv_1")
             + layer_text("pool_1", "Pooling", "conv_1", "pool_1",
                          "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
             + conv("a1", "pool_1", 8, 3, 1, 1) + relu("a1") + conv("a2", "a1", 8, 3, 1, 1)
             + layer_text("a_sum", "Eltwise", "pool_1", "a_sum", 'bottom: "a2"') + relu("a_sum")
             + conv("b1", "a_sum", 16, 3, 2, 1) + relu("b1") + conv("b2", "b1", 16, 3, 1, 1)
             + conv("b_proj", "a_sum", 16, 1, 2, 0)
             + layer_text("b_sum", "Eltwise", "b2", "b_sum", 'bottom: "b_proj"') + relu("b_sum")
             + layer_text("gpool", "Pooling", "b_sum", "gpool", "pooling_param { pool: AVE global_pooling: true }")
             + layer_text("fc", "InnerProduct", "gpool", "fc", "inner_product_param { num_output: 5 }"))

# Stride 8 with dilated convolutions (dilation 2 and 4, padded to keep the size).
DILATED = ('name: "dilated"\n' + input_layer(1, 3, 48, 48)
           + conv("c1", "data", 8, 3, 1, 1) + relu("c1")
           + layer_text("p1", "Pooling", "c1", "p1", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
           + conv("c2", "p1", 8, 3, 1, 2, 2) + relu("c2")
           + layer_text("p2", "Pooling", "c2", "p2", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
           + conv("c3", "p2", 8, 3, 1, 4, 4) + relu("c3")
           + layer_text("p3", "Pooling", "c3", "p3", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
           + layer_text("fc", "InnerProduct", "p3", "fc", "inner_product_param { num_output: 4 }"))


def converted(tmp_path: Path, name: str, proto: Path, weights: Path) -> tuple[Path, Path, str]:
    result = convert(proto, weights, tmp_path / name, check=False)
    fcn = read_netdef(result.outputs["prototxt"]).param
    return result.outputs["prototxt"], result.outputs["caffemodel"], score_blob(fcn)


def probe(proto: Path, weights: Path, blob: str, size: int, pixels: int, seed: int) -> list[str]:
    """Change `pixels` random pixels one at a time; return what broke the reach (empty: none)."""
    geo = map_geometry(read_netdef(proto).param, blob)
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 60, (1, 3, size, size)).astype(np.float32)
    net = CaffeRunner().load(proto, weights)
    problems, outside_window = [], 0
    try:
        base = net.forward({"data": image}, [blob])[blob][0]
        rows, cols = base.shape[1:]
        for _ in range(pixels):
            y, x = (int(v) for v in rng.integers(0, size, 2))
            poked = image.copy()
            poked[0, :, y, x] += 1000.0
            out = net.forward({"data": poked}, [blob])[blob][0]
            changed = np.argwhere((out != base).any(axis=0))
            assert len(changed), f"pixel ({y}, {x}) changed no cell"
            for r, c in changed:
                x0, y0, x1, y1 = geo.reach_box(int(r), int(c))
                if not (x0 <= x < x1 and y0 <= y < y1):
                    problems.append(f"pixel (y {y}, x {x}) changed cell ({r}, {c}) of reach "
                                    f"x [{x0}, {x1}) y [{y0}, {y1})")
                wx0, wy0, wx1, wy1 = geo.box(int(r), int(c))
                outside_window += not (wx0 <= x < wx1 and wy0 <= y < wy1)
        assert rows * cols > 1
    finally:
        net.close()
    return problems if problems else ([] if outside_window else ["no pixel outside a window changed it"])


def test_probe_caffenet(caffenet, tmp_path):
    """CaffeNet at 291 px (3x3 cells): pixels change only cells whose reach holds them."""
    proto, weights, blob = converted(tmp_path, "caffenet", *caffenet)
    assert probe(proto, weights, blob, 291, 4, seed=1) == []


@pytest.mark.parametrize("name,text,size", [("resnetish", RESNETISH, 120), ("dilated", DILATED, 96)])
def test_probe_padded_nets(tmp_path, name, text, size):
    """A ResNet-style net and a stride-8 dilated net: the same, over 12 random pixels each."""
    proto, weights = write_model(tmp_path, name, text, seed=4)
    fcn, fcn_weights, blob = converted(tmp_path, name, proto, weights)
    assert probe(fcn, fcn_weights, blob, size, 12, seed=2) == []


def edge_lines(proto: Path, weights: Path, blob: str, size: int, seed: int) -> list[str]:
    """The reach of the middle cell is exact: changing the line of pixels just inside each of its
    four edges changes the cell, the line just outside leaves it bit for bit the same.

    A line is the reach's span of one row or column (the whole image's, outside),
    set to noise of +-1000, so that ReLUs and max pooling cannot hide it. The
    cell's reach must lie inside the image with a pixel to spare on every side:
    a reach over-reported up to the whole image fails here, as one too small does.
    """
    net_param = read_netdef(proto).param
    geo = map_geometry(net_param, blob)
    channels = input_shapes(net_param)["data"][1]
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 60, (1, channels, size, size)).astype(np.float32)
    net = CaffeRunner().load(proto, weights)
    try:
        base = net.forward({"data": image}, [blob])[blob][0]
        r, c = base.shape[1] // 2, base.shape[2] // 2
        x0, y0, x1, y1 = geo.reach_box(r, c)
        assert 1 <= x0 < x1 <= size - 1 and 1 <= y0 < y1 <= size - 1, \
            f"cell ({r}, {c})'s reach x [{x0}, {x1}) y [{y0}, {y1}) does not fit inside {size} px"
        inside = {"left": (slice(y0, y1), x0), "right": (slice(y0, y1), x1 - 1),
                  "top": (y0, slice(x0, x1)), "bottom": (y1 - 1, slice(x0, x1))}
        outside = {"left": (slice(None), x0 - 1), "right": (slice(None), x1),
                   "top": (y0 - 1, slice(None)), "bottom": (y1, slice(None))}
        problems = []
        for where, lines, must_change in (("inside", inside, True), ("outside", outside, False)):
            for edge, (ys, xs) in lines.items():
                poked = image.copy()
                line = poked[0, :, ys, xs]
                poked[0, :, ys, xs] = line + rng.choice([-1000.0, 1000.0], line.shape)
                cell = net.forward({"data": poked}, [blob])[blob][0][:, r, c]
                if bool((cell != base[:, r, c]).any()) != must_change:
                    problems.append(f"the line just {where} the {edge} edge of cell ({r}, {c})'s reach "
                                    f"(x [{x0}, {x1}) y [{y0}, {y1})) {'left it' if must_change else 'changed it'}")
    finally:
        net.close()
    return problems


def test_caffenet_reach_is_exact(caffenet, tmp_path):
    """CaffeNet at 419 px (7x7 cells): the middle cell's reach is exactly 355 px, from -64 px."""
    proto, weights, blob = converted(tmp_path, "caffenet", *caffenet)
    assert map_geometry(read_netdef(proto).param, blob).reach == (355, 355)
    assert edge_lines(proto, weights, blob, 419, seed=3) == []


@pytest.mark.parametrize("name,text,size", [("resnetish", RESNETISH, 160), ("dilated", DILATED, 160)])
def test_padded_nets_reach_is_exact(tmp_path, name, text, size):
    """A ResNet-style net and a stride-8 dilated net (both padded): reach exact on all four edges."""
    proto, weights = write_model(tmp_path, name, text, seed=4)
    fcn, fcn_weights, blob = converted(tmp_path, name, proto, weights)
    assert edge_lines(fcn, fcn_weights, blob, size, seed=5) == []


def test_unpadded_lenet_reach_is_its_window(tmp_path):
    """LeNet (trained, no padding): its reach is its 28 px window, exactly."""
    from realdata import LENET_DEF, LENET_WEIGHTS
    proto, weights, blob = converted(tmp_path, "lenet", LENET_DEF, LENET_WEIGHTS)
    geo = map_geometry(read_netdef(proto).param, blob)
    assert geo.reach == geo.window == (28, 28)
    assert edge_lines(proto, weights, blob, 60, seed=6) == []


def test_window_is_the_classifiers_input(tmp_path):
    """The ResNet-style net classifies 64 px images: its window is 64 px, not its layers' smaller box,
    so the last window of a 64 + 8k px image ends at the image's edge."""
    proto, weights = write_model(tmp_path, "resnetish", RESNETISH, seed=4)
    fcn, _, blob = converted(tmp_path, "resnetish", proto, weights)
    geo = map_geometry(read_netdef(fcn).param, blob)
    assert geo.window == (64, 64) and geo.stride == (8, 8)
    rows, cols = map_size(read_netdef(fcn).param, 64 + 8 * 7, 64 + 8 * 7, blob)
    assert geo.box(rows - 1, cols - 1)[2:] == (120, 120)


def test_info_reports_window_and_reach_per_layer(tmp_path):
    """info: the stem's column shows its 7-px reach (not 1), and the map's window and reach are named."""
    proto, _ = write_model(tmp_path, "resnetish", RESNETISH, seed=4)
    run = call_fcnify("info", proto)
    assert run.code == 0, run.err
    stem = next(line for line in run.out.splitlines() if line.strip().startswith("conv_1 "))
    assert stem.endswith("stride 2, reach 7"), stem
    assert "window per cell: 64x64 px" in run.out
    assert "reach per cell:" in run.out and "every pixel that can change the cell" in run.out


def test_window_kept_when_converted_for_large_inputs(tmp_path):
    """Converted with --input-size 120, the net declares 120 px, yet its window stays the
    classifier's 64 px (from the card), in classify-map's map.json too."""
    proto, weights = write_model(tmp_path, "resnetish", RESNETISH, seed=4)
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "big",
                      "--input-size", "120", "--no-verify")
    assert run.code == 0, run.err
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(image)
    run = call_fcnify("classify-map", image, "--card", tmp_path / "big_full_conv.json", "--out", tmp_path / "m")
    assert run.code == 0, run.err
    data = json.loads((tmp_path / "m" / "photo.map.json").read_text())
    assert data["map"]["window_px"] == [64, 64]
    f, (rows, cols) = data["map"]["cell_window_image_px"], (data["map"]["rows"], data["map"]["cols"])
    last = (f["x_first"] + (cols - 1) * f["x_step"] + f["width"], f["y_first"] + (rows - 1) * f["y_step"] + f["height"])
    assert last == (120, 120)  # the last window ends at the image's edge


def test_convert_report_window_for_large_inputs(tmp_path):
    """convert --input-size 120 reports (and records in its card) the classifier's 64 px window."""
    proto, weights = write_model(tmp_path, "resnetish", RESNETISH, seed=4)
    run = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "big",
                      "--input-size", "120", "--no-verify")
    assert run.code == 0, run.err
    assert "window per cell: 64x64 px" in run.out
    card = json.loads((tmp_path / "big_full_conv.json").read_text())
    assert card["geometry"]["window"] == [64, 64]


def test_map_json_reports_the_reach(tmp_path):
    """classify-map's map.json gives the ResNet-style net's reach: 107 px from -23 px around the window's
    start (conv_1 pad 3, two padded 3x3 at stride 4, two at stride 8: -3 - 4 - 4 - 4 - 8; the
    global pool's 8 cells at stride 8 on the right), the reach pinned by test_padded_nets_reach_is_exact."""
    proto, weights = write_model(tmp_path, "resnetish", RESNETISH, seed=4)
    result = convert(proto, weights, tmp_path / "resnetish", check=False)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(image)
    run = call_fcnify("classify-map", image, "--card", result.outputs["card"], "--engine", "caffe",
                      "--out", tmp_path / "m", "--quiet")
    assert run.code == 0, run.err
    geometry = json.loads((tmp_path / "m" / "photo.map.json").read_text())["map"]
    assert geometry["reach_px"] == [107, 107] and geometry["reach_offset_px"] == [-23, -23]
    assert geometry["window_px"] == [64, 64] and geometry["stride_px"] == [8, 8]
    fcn = read_netdef(result.outputs["prototxt"]).param
    geo = map_geometry(fcn, score_blob(fcn))
    assert (geo.reach, geo.y.reach_lo, geo.x.reach_lo) == ((107, 107), -23, -23)  # what the probe pinned
