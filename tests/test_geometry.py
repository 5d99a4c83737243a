"""Tests for fcnify.caffe.geometry: stride, field, reach and map sizes, by hand and in Caffe.

Expected numbers are worked out in the tests from the layers' kernels,
strides and pads, and the map sizes are also read off the blobs that pycaffe
builds for the converted nets at several input sizes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fcnify.surgery.bound import score_layer, within
from fcnify.convert import convert
from fcnify.errors import NetDefinitionError
from fcnify.caffe.geometry import (blob_geometry, map_geometry, map_size, output_blobs, score_blob,
                             smallest_input)
from fcnify.caffe.netdef import parse_netdef, read_netdef, to_text
from fcnify.surgery.surgery import convert_net

from nets import NIN, caffe_shapes, input_layer, layer_text, pycaffe, small_net, vgg16, zoo

# (kind, kernel, stride, pad) of each layer on the path from the image to the scores;
# the 1x1 fc7-conv and fc8-conv change nothing.
CAFFENET = [("conv", 11, 4, 0), ("pool", 3, 2, 0), ("conv", 5, 1, 2), ("pool", 3, 2, 0),
            ("conv", 3, 1, 1), ("conv", 3, 1, 1), ("conv", 3, 1, 1), ("pool", 3, 2, 0),
            ("conv", 6, 1, 0)]
VGG16 = ([("conv", 3, 1, 1)] * 2 + [("pool", 2, 2, 0)]) * 2 \
    + ([("conv", 3, 1, 1)] * 3 + [("pool", 2, 2, 0)]) * 3 + [("conv", 7, 1, 0)]


def cells(n: int, layers, exact: bool = False) -> int:
    """Caffe's output size by hand: convolutions round down, poolings up (0 if nothing fits).

    With `exact`, 0 also when some window does not fit its input exactly.
    """
    for kind, k, s, p in layers:
        assert kind == "conv" or p == 0  # no padded pooling here: no windows to drop
        if n + 2 * p < k:
            return 0
        if exact and (n + 2 * p - k) % s:
            return 0
        n = (n + 2 * p - k) // s + 1 if kind == "conv" else -(-(n + 2 * p - k) // s) + 1
    return n


@pytest.fixture(scope="module")
def caffenet_fcn(tmp_path_factory, caffe_root) -> tuple[object, Path]:
    """CaffeNet converted (no weights): the NetParameter and its prototxt file."""
    net = convert_net(read_netdef(zoo(caffe_root, "caffenet"))).net
    path = tmp_path_factory.mktemp("geometry") / "caffenet_fcn.prototxt"
    path.write_text(to_text(net))
    return net, path


@pytest.fixture(scope="module")
def vgg_fcn(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """VGG-16 converted, full size and 8x narrower (same geometry, Caffe builds it fast)."""
    folder = tmp_path_factory.mktemp("vgg")
    out = {}
    for name, width in (("full", 1), ("narrow", 8)):
        net = convert_net(parse_netdef(vgg16(width))).net
        path = folder / f"vgg_{name}_fcn.prototxt"
        path.write_text(to_text(net))
        out[name] = (net, path)
    return out


# ------------------------------------------------------------------ CaffeNet

def test_caffenet_stride_field_and_reach_by_hand(caffenet_fcn):
    """Stride 4*2*2*2 = 32, field 227 at offset 0, reach 355 px from -64 to +290."""
    geo = map_geometry(caffenet_fcn[0])
    assert geo.blob == "prob"
    assert geo.stride == (32, 32)
    # The field grows by (kernel - 1 - 2 pad) x input stride: conv1 10, pool1 2x4, pool2 2x8,
    # pool5 2x16, fc6 5x32 (conv2-5 are "same" convolutions): 1 + 10 + 8 + 16 + 32 + 160 = 227.
    assert geo.field == (227, 227)
    assert geo.offset == (0, 0)
    # Reach, top down, r -> (r - 1) x stride + kernel: fc6 6, pool5 13, conv5 15, conv4 17,
    # conv3 19, pool2 39, conv2 43, pool1 87, conv1 355. It starts pad x input stride earlier:
    # conv2 2 x 8 + conv3..5 3 x 16 = 64.
    assert (geo.x.reach, geo.x.reach_lo, geo.x.reach_hi) == (355, -64, 290)
    assert geo.y == geo.x


def test_caffenet_451_gives_8x8(caffenet_fcn):
    """451: conv1 (451-11)/4+1 = 111, pool1 55, pool2 27, pool5 13, fc6 13-6+1 = 8."""
    assert cells(451, CAFFENET) == 8
    assert map_size(caffenet_fcn[0], 451, 451) == (8, 8)


@pytest.mark.parametrize("size", [(227, 227), (259, 259), (451, 451), (500, 500), (300, 451), (199, 199)])
def test_caffenet_map_size_by_hand_and_in_caffe(size, caffenet_fcn):
    """map_size equals the hand-computed size and the fc8-conv blob Caffe builds."""
    net, path = caffenet_fcn
    expected = (cells(size[0], CAFFENET), cells(size[1], CAFFENET))
    assert map_size(net, *size) == expected
    blobs, _ = caffe_shapes(path, size)
    assert blobs["fc8-conv"][2:] == expected
    assert blobs["prob"][2:] == expected


def test_caffenet_sizes_227_plus_32k_tile_exactly(caffenet_fcn):
    """At 227 + 32k every window fits its input exactly and the map has k + 1 cells; between, not."""
    net = caffenet_fcn[0]
    geo = map_geometry(net)
    assert geo.exact_sizes(5) == [(227 + 32 * k, 227 + 32 * k) for k in range(5)]
    for k in range(5):
        n = 227 + 32 * k
        assert cells(n, CAFFENET, exact=True) == k + 1
        assert map_size(net, n, n) == (k + 1, k + 1)
        assert n == k * geo.stride[0] + geo.field[0]  # the last box ends at the edge
        assert all(cells(n + d, CAFFENET, exact=True) == 0 for d in range(1, 32))


def test_caffenet_smallest_input_by_hand(caffenet_fcn):
    """199 px is the least that leaves 6x6 at pool5: conv1 48, pool1 24, pool2 12, pool5 6."""
    by_hand = min(n for n in range(1, 300) if cells(n, CAFFENET) >= 1)
    assert by_hand == 199
    assert smallest_input(caffenet_fcn[0]) == (199, 199)


# ------------------------------------------------------------------ VGG-16

def test_vgg16_stride_field_and_reach_by_hand(vgg_fcn):
    """Stride 2^5 = 32; field 224; reach 404 px from -90 to +313; the same at any width."""
    geo = map_geometry(vgg_fcn["full"][0])
    assert geo.stride == (32, 32)
    # 3x3 pad-1 convolutions add nothing; each 2x2 pool adds its input stride (1+2+4+8+16 = 31);
    # fc6's 7x7 adds 6 x 32 = 192: 1 + 31 + 192 = 224.
    assert geo.field == (224, 224)
    assert geo.offset == (0, 0)
    # Reach, top down: fc6 7, pool5 14, conv5_x 16 18 20, pool4 40, conv4_x 46, pool3 92,
    # conv3_x 98, pool2 196, conv2_x 200, pool1 400, conv1_x 404. Pads x input strides:
    # 2 x 1 + 2 x 2 + 3 x 4 + 3 x 8 + 3 x 16 = 90.
    assert (geo.x.reach, geo.x.reach_lo, geo.x.reach_hi) == (404, -90, 313)
    assert map_geometry(vgg_fcn["narrow"][0]) == geo


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (384, 384), (500, 500), (300, 451)])
def test_vgg16_map_size_by_hand_and_in_caffe(size, vgg_fcn):
    """map_size equals the hand-computed size and the blob Caffe builds (narrow copy: same sizes)."""
    expected = (cells(size[0], VGG16), cells(size[1], VGG16))
    assert map_size(vgg_fcn["full"][0], *size) == expected
    net, path = vgg_fcn["narrow"]
    assert map_size(net, *size) == expected
    blobs, _ = caffe_shapes(path, size)
    assert blobs["fc8-conv"][2:] == expected


def test_vgg16_map_sizes(vgg_fcn):
    """224 -> 1; 384: five pools halve it to 12, fc6 leaves 6; 500: 250, 125, 63, 32, 16 -> 10."""
    assert [cells(n, VGG16) for n in (224, 384, 500)] == [1, 6, 10]
    assert [map_size(vgg_fcn["full"][0], n, n) for n in (224, 384, 500)] == [(1, 1), (6, 6), (10, 10)]


def test_vgg16_smallest_input(vgg_fcn):
    """Ceil-rounded pools let 193 = 6 x 32 + 1 px give 7x7 at pool5 (97, 49, 25, 13, 7)."""
    by_hand = min(n for n in range(1, 300) if cells(n, VGG16) >= 1)
    assert by_hand == 193
    assert smallest_input(vgg_fcn["full"][0]) == (193, 193)


# ------------------------------------------------------------------ other nets, in Caffe

@pytest.mark.parametrize("size", [(224, 224), (256, 320), (451, 451)])
def test_googlenet_map_size_agrees_with_caffe(size, caffe_root, tmp_path):
    """GoogLeNet (stride 2^5 = 32) gives Caffe's map size at several inputs."""
    net = convert_net(read_netdef(zoo(caffe_root, "googlenet"))).net
    path = tmp_path / "googlenet_fcn.prototxt"
    path.write_text(to_text(net))
    assert map_geometry(net).stride == (32, 32)
    blobs, _ = caffe_shapes(path, size)
    assert map_size(net, *size) == blobs["loss3/classifier-conv"][2:]


def test_frozen_global_pooling_slides_at_a_larger_input(tmp_path):
    """64 px: pool2 is 15x15 and the frozen 7x7 pooling gives 15 - 7 + 1 = 9 cells, as in Caffe."""
    net = convert_net(parse_netdef(small_net("global_pooling"))).net
    path = tmp_path / "gp.prototxt"
    path.write_text(to_text(net))
    assert map_size(net, 64, 64) == (9, 9)
    assert caffe_shapes(path, (64, 64))[0]["fc7-conv"][2:] == (9, 9)
    assert map_geometry(net).stride == (4, 4)


# A net without padding whose windows tile 32 + 4k px exactly: 32 -> conv 28 -> pool 14
# -> conv 12 -> pool 6 -> fc6 6x6. Stride 2 x 2 = 4; field 5 + 1 + 2x2 + 1x2 + 5x4 = 32.
NO_PAD = ('name: "nopad"\n' + input_layer(1, 3, 32, 32)
          + layer_text("conv1", "Convolution", "data", "conv1", "convolution_param { num_output: 8 kernel_size: 5 }")
          + layer_text("relu1", "ReLU", "conv1", "conv1")
          + layer_text("pool1", "Pooling", "conv1", "pool1", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
          + layer_text("conv2", "Convolution", "pool1", "conv2", "convolution_param { num_output: 16 kernel_size: 3 }")
          + layer_text("relu2", "ReLU", "conv2", "conv2")
          + layer_text("pool2", "Pooling", "conv2", "pool2", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
          + layer_text("fc6", "InnerProduct", "pool2", "fc6", "inner_product_param { num_output: 32 }")
          + layer_text("relu6", "ReLU", "fc6", "fc6")
          + layer_text("fc7", "InnerProduct", "fc6", "fc7", "inner_product_param { num_output: 10 }"))


def converted_with_weights(tmp_path: Path, name: str, text: str) -> tuple[object, object]:
    """(original, converted) pycaffe nets with seeded weights, converted by fcnify."""
    from conftest import write_model
    proto, weights = write_model(tmp_path, name, text, seed=5)
    result = convert(proto, weights, tmp_path / name, check=False)
    caffe = pycaffe()
    original = caffe.Net(str(proto), str(weights), caffe.TEST)
    fcn = caffe.Net(str(result.outputs["prototxt"]), str(result.outputs["caffemodel"]), caffe.TEST)
    return original, fcn


def forward(net, x: np.ndarray, blob: str) -> np.ndarray:
    net.blobs["data"].reshape(*x.shape)
    net.reshape()
    net.blobs["data"].data[...] = x
    net.forward()
    return net.blobs[blob].data.copy()


def test_each_cell_equals_classifying_its_box_without_padding(tmp_path):
    """Without padding, cell (r, c) of a 48 px map equals the original net on the crop box(r, c)."""
    net = convert_net(parse_netdef(NO_PAD)).net
    geo = map_geometry(net)
    assert (geo.stride, geo.field, geo.offset) == ((4, 4), (32, 32), (0, 0))
    assert map_size(net, 48, 48) == (5, 5)
    original, fcn = converted_with_weights(tmp_path, "nopad", NO_PAD)
    image = np.random.default_rng(0).normal(0, 50, (1, 3, 48, 48)).astype(np.float32)
    dense = forward(fcn, image, "fc7-conv")[0]
    crops = []
    for r in range(5):
        for c in range(5):
            x0, y0, x1, y1 = geo.box(r, c)
            assert (x1 - x0, y1 - y0) == (32, 32)
            crops.append(image[0, :, y0:y1, x0:x1])
    scores = forward(original, np.stack(crops), "fc7").reshape(5, 5, -1)
    assert np.abs(scores).max() > 1.0  # scores spread enough for a wrong box to show
    fc7 = score_layer(parse_netdef(NO_PAD).param, "fc7", {"fc7": [p.data for p in original.params["fc7"]]})
    bound = fc7.tolerance(original.blobs[fc7.bottom].data).reshape(5, 5, -1)
    ok, used = within(dense.transpose(1, 2, 0), scores, bound)  # InnerProduct vs convolution: float32 rounding
    assert ok, used


def test_reach_bounds_the_pixels_that_change_a_cell(tmp_path):
    """A pixel 2 px left of a cell's box changes it (conv2's padding), 3 px left does not."""
    text = small_net("plain")
    net = convert_net(parse_netdef(text)).net
    geo = map_geometry(net)
    # conv1 5; pool1 3/2 adds 2; conv2 3 pad 1 adds nothing to the box, 2 px to each side of
    # the reach; pool2 2/2 adds 2; fc6 7x7 adds 6 x 4: a 33 px box, reach -2 .. 34. The window
    # is the classifier's own 32 px input (one cell; ceil-rounded pool1 lets the box overhang it).
    assert (geo.window[1], geo.x.reach_lo, geo.x.reach_hi) == (32, -2, 34)
    _, fcn = converted_with_weights(tmp_path, "small", text)
    image = np.random.default_rng(1).normal(0, 50, (1, 3, 64, 64)).astype(np.float32)
    base = forward(fcn, image, "fc7-conv")[0, :, 4, 4]
    x0 = geo.box(4, 4)[0]  # 16

    def poked(col: int) -> float:
        x = image.copy()
        x[0, :, 32, col] += 500.0
        return float(np.abs(forward(fcn, x, "fc7-conv")[0, :, 4, 4] - base).max())

    # A pixel outside a cell's field takes no part in any sum that makes the cell, so the
    # cell is bit-for-bit the same (the kernels' summation order depends on shapes, not
    # values): outside, exactly zero change; inside, any change at all.
    assert poked(x0 - 2) > 0 and poked(x0 + 34) > 0
    assert poked(x0 - 3) == 0 and poked(x0 + 35) == 0


# ------------------------------------------------------------------ outputs and refusals

def test_outputs_and_score_blobs(caffenet_fcn, caffe_root):
    """CaffeNet outputs prob, scored by fc8 (fc8-conv once converted); NIN by its global pooling."""
    original = read_netdef(zoo(caffe_root, "caffenet")).param
    assert output_blobs(original) == ["prob"]
    assert score_blob(original) == "fc8"
    assert score_blob(caffenet_fcn[0]) == "fc8-conv"
    assert score_blob(parse_netdef(NIN).param) == "gpool"


def test_unconverted_net_has_no_map(caffe_root):
    """CaffeNet's prob is not a spatial map until its InnerProducts are converted."""
    with pytest.raises(NetDefinitionError, match="not a spatial map"):
        map_geometry(read_netdef(zoo(caffe_root, "caffenet")).param)


def test_merging_maps_of_different_strides_is_refused():
    """Concat of a stride-1 and a stride-2 map of equal size (8 px) is refused, naming the layer."""
    text = ('name: "merge"\n' + input_layer(1, 3, 8, 8)
            + layer_text("a", "Convolution", "data", "a", "convolution_param { num_output: 2 kernel_size: 5 }")
            + layer_text("b", "Pooling", "data", "b", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
            + layer_text("cat", "Concat", "a", "cat", 'bottom: "b"'))
    net = parse_netdef(text).param
    with pytest.raises(NetDefinitionError, match=r"'cat' merges maps of strides 1 and 2"):
        blob_geometry(net)
