"""Tests for fcnify.caffe.shapes: every blob and parameter shape as Caffe itself builds it.

The expectations come from pycaffe (a TEST-phase net, reshaped to other input
sizes) or are worked out by hand in the test; never from fcnify.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from fcnify.errors import NetDefinitionError
from fcnify.caffe.netdef import parse_netdef, read_netdef, to_text
from fcnify.caffe.shapes import infer, input_shapes
from fcnify.surgery.surgery import convert_net

from nets import (HEADS, NIN, V1_NET, ZOO, caffe_shapes, input_layer, layer_text, small_net, vgg16,
                  zoo)

# Every net the surgery tests use.
NETS = [*ZOO, "vgg16", "vgg16_narrow", *(f"small_{h}" for h in HEADS), "nin", "v1"]
CONVERTIBLE = [n for n in NETS if n != "nin"]


@pytest.fixture(scope="session")
def net_files(tmp_path_factory, caffe_root) -> dict[str, Path]:
    """name -> prototxt of every net above (zoo nets straight from Caffe's tree)."""
    folder = tmp_path_factory.mktemp("nets")
    files = {name: zoo(caffe_root, name) for name in ZOO}
    texts = {"vgg16": vgg16(), "vgg16_narrow": vgg16(width=8), "nin": NIN, "v1": V1_NET}
    texts.update({f"small_{h}": small_net(h) for h in HEADS})
    for name, text in texts.items():
        files[name] = folder / f"{name}.prototxt"
        files[name].write_text(text)
    return files


def assert_agrees_with_caffe(net, prototxt: Path, size: tuple[int, int] | None = None) -> None:
    """infer(net) at `size` has Caffe's blob and parameter shapes for `prototxt`."""
    caffe_blobs, caffe_params = caffe_shapes(prototxt, size)
    inputs = None
    if size is not None:
        name, declared = next(iter(input_shapes(net).items()))
        inputs = {name: declared[:2] + size}
    ours = infer(net, inputs)
    for blob, shape in ours.blobs.items():
        assert caffe_blobs[blob] == shape, f"blob '{blob}': Caffe {caffe_blobs[blob]}, fcnify {shape}"
    # Caffe adds a Split layer (blob names *_split_N) where a blob feeds several layers.
    assert set(ours.blobs) == {b for b in caffe_blobs if "_split_" not in b}
    assert {n: [tuple(s) for s in p] for n, p in ours.params().items()} == caffe_params


@pytest.mark.parametrize("name", NETS)
def test_infer_agrees_with_caffe(name, net_files):
    """Blob and parameter shapes of each original net equal pycaffe's (TEST phase)."""
    assert_agrees_with_caffe(read_netdef(net_files[name]).param, net_files[name])


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_infer_agrees_with_caffe_on_the_converted_net_at_several_sizes(name, net_files, tmp_path):
    """The fully-convolutional net's shapes equal pycaffe's at the declared and two larger inputs."""
    surgery = convert_net(read_netdef(net_files[name]))
    converted = tmp_path / "fcn.prototxt"
    converted.write_text(to_text(surgery.net))
    h, w = next(iter(input_shapes(surgery.net).values()))[2:]
    for size in (None, (h + 64, w + 64), (h + 37, w + 100)):
        assert_agrees_with_caffe(surgery.net, converted, size)


# ------------------------------------------------------------------ pooling rules

def pool_net(size: int) -> str:
    return 'name: "pool"\n' + input_layer(1, 1, size, size) + layer_text(
        "pool", "Pooling", "data", "pool", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")


def test_pooling_rounds_up():
    """14 px under a 3/2 pooling gives ceil(11/2) + 1 = 7 cells, the last hanging over the edge."""
    assert infer(parse_netdef(pool_net(14)).param).blobs["pool"] == (1, 1, 7, 7)
    assert infer(parse_netdef(pool_net(13)).param).blobs["pool"] == (1, 1, 6, 6)


def test_pooling_drops_a_window_that_would_start_in_the_padding():
    """5 px, kernel 2, stride 2, pad 1: ceil(5/2) + 1 = 4 windows, but the 4th starts at 6 >= 5 + 1."""
    net = 'name: "p"\n' + input_layer(1, 1, 5, 5) + layer_text(
        "pool", "Pooling", "data", "pool", "pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }")
    assert infer(parse_netdef(net).param).blobs["pool"] == (1, 1, 3, 3)


def test_pooling_round_mode_floor():
    """round_mode: FLOOR takes floor(11/2) + 1 = 6 cells from 14 px, as Caffe does."""
    net = pool_net(14).replace("stride: 2 }", "stride: 2 round_mode: FLOOR }")
    assert infer(parse_netdef(net).param).blobs["pool"] == (1, 1, 6, 6)


def pooling_zoo() -> str:
    """One net with a pooling layer for each kernel, stride, pad, method and rounding."""
    text = 'name: "poolings"\n' + input_layer(1, 2, 9, 9)
    for k, s, pool, mode in itertools.product((2, 3), (1, 2, 3), ("MAX", "AVE"), ("CEIL", "FLOOR")):
        for p in range(k):  # Caffe requires pad < kernel
            name = f"p_k{k}_s{s}_p{p}_{pool}_{mode}"
            text += layer_text(name, "Pooling", "data", name, f"pooling_param {{ pool: {pool} kernel_size: {k} "
                           f"stride: {s} pad: {p} round_mode: {mode} }}")
    text += layer_text("p_rect", "Pooling", "data", "p_rect", "pooling_param { pool: MAX kernel_h: 3 "
                   "kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0 }")
    text += layer_text("p_global", "Pooling", "data", "p_global", "pooling_param { pool: AVE global_pooling: true }")
    return text


@pytest.mark.parametrize("size", [(5, 6), (7, 9), (13, 14), (16, 17)])
def test_pooling_rules_agree_with_caffe(size, tmp_path):
    """Every kernel/stride/pad/method/rounding combination gives Caffe's output size."""
    path = tmp_path / "pool.prototxt"
    path.write_text(pooling_zoo())
    assert_agrees_with_caffe(parse_netdef(path.read_text()).param, path, size)


# ------------------------------------------------------------------ convolution and other layers

def conv_zoo() -> str:
    """Convolutions over kernel, stride, pad, dilation, group and shape; a few deconvolutions."""
    text = 'name: "convs"\n' + input_layer(1, 4, 12, 12)
    for k, s, p, d in itertools.product((1, 3, 4), (1, 2, 3), (0, 1, 2), (1, 2)):
        name = f"c_k{k}_s{s}_p{p}_d{d}"
        text += layer_text(name, "Convolution", "data", name, f"convolution_param {{ num_output: 2 "
                       f"kernel_size: {k} stride: {s} pad: {p} dilation: {d} }}")
    text += layer_text("c_rect", "Convolution", "data", "c_rect", "convolution_param { num_output: 6 group: 2 "
                   "kernel_h: 3 kernel_w: 5 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 2 }")
    text += layer_text("c_nobias", "Convolution", "data", "c_nobias",
                   "convolution_param { num_output: 4 group: 4 kernel_size: 3 bias_term: false }")
    text += layer_text("deconv", "Deconvolution", "data", "deconv",
                   "convolution_param { num_output: 6 group: 2 kernel_size: 4 stride: 2 pad: 1 }")
    text += layer_text("deconv2", "Deconvolution", "data", "deconv2",
                   "convolution_param { num_output: 3 kernel_size: 3 stride: 3 }")
    return text


@pytest.mark.parametrize("size", [(12, 12), (13, 20), (31, 17)])
def test_convolution_shapes_agree_with_caffe(size, tmp_path):
    """Output and kernel shapes of convolutions and deconvolutions equal Caffe's."""
    path = tmp_path / "conv.prototxt"
    path.write_text(conv_zoo())
    assert_agrees_with_caffe(parse_netdef(path.read_text()).param, path, size)


MISC = 'name: "misc"\n' + input_layer(2, 6, 10, 12) + "".join([
    layer_text("cat1", "Concat", "data", "cat1", 'bottom: "data"'),
    layer_text("cat2", "Concat", "data", "cat2", 'bottom: "data" concat_param { axis: 2 }'),
    layer_text("cat3", "Concat", "data", "cat3", 'bottom: "data" concat_param { axis: -1 }'),
    'layer { name: "sl" type: "Slice" bottom: "data" top: "sl_a" top: "sl_b" top: "sl_c" '
    "slice_param { axis: 1 slice_point: 1 slice_point: 4 } }\n",
    'layer { name: "sl2" type: "Slice" bottom: "data" top: "sl2_a" top: "sl2_b" top: "sl2_c" '
    "slice_param { axis: 3 } }\n",
    layer_text("elt", "Eltwise", "data", "elt", 'bottom: "data" eltwise_param { operation: SUM coeff: 1 coeff: -1 }'),
    layer_text("crop", "Crop", "cat2", "crop", 'bottom: "data" crop_param { axis: 2 offset: 3 offset: 0 }'),
    layer_text("bn", "BatchNorm", "data", "bn"),
    layer_text("sc", "Scale", "data", "sc", "scale_param { bias_term: true }"),
    layer_text("sc2", "Scale", "data", "sc2", "scale_param { axis: 1 num_axes: 2 }"),
    layer_text("bias", "Bias", "data", "bias"),
    layer_text("prelu", "PReLU", "data", "prelu"),
    layer_text("prelu2", "PReLU", "data", "prelu2", "prelu_param { channel_shared: true }"),
    layer_text("fl", "Flatten", "data", "fl", "flatten_param { axis: 1 end_axis: 2 }"),
    layer_text("rs", "Reshape", "data", "rs", "reshape_param { shape { dim: 2 dim: -1 } axis: 1 num_axes: 1 }"),
    layer_text("rs2", "Reshape", "data", "rs2", "reshape_param { shape { dim: 0 dim: -1 } }"),
    layer_text("ip", "InnerProduct", "data", "ip", "inner_product_param { num_output: 5 axis: 2 }"),
    layer_text("ipt", "InnerProduct", "data", "ipt", "inner_product_param { num_output: 5 transpose: true }"),
])


def test_other_layer_shapes_agree_with_caffe(tmp_path):
    """Concat, Slice, Eltwise, Crop, BatchNorm, Scale, Bias, PReLU, Flatten, Reshape, InnerProduct."""
    path = tmp_path / "misc.prototxt"
    path.write_text(MISC)
    assert_agrees_with_caffe(parse_netdef(MISC).param, path)


# ------------------------------------------------------------------ refusals

def test_too_small_input_names_the_layer():
    """A 4 px input under CaffeNet-style 5x5 conv1 is refused, naming conv1, before Caffe runs."""
    net = parse_netdef(small_net("plain", size=4)).param
    with pytest.raises(NetDefinitionError, match=r"layer 'conv1' \(Convolution\).*too small"):
        infer(net)


def test_larger_input_overrides_the_declared_one():
    """inputs= reshapes the Input layer: 451 px through the 5x5 conv1 gives 451 - 5 + 1 = 447."""
    shapes = infer(parse_netdef(small_net("plain")).param, {"data": (1, 3, 451, 451)})
    assert shapes.blobs["conv1"] == (1, 8, 447, 447)
    assert shapes.blobs["pool2"] == (1, 16, 112, 112)  # pool1: ceil(444/2)+1 = 223; pool2: ceil(221/2)+1 = 112


def test_converted_net_refuses_an_input_smaller_than_its_fc6_kernel():
    """8 px leaves a 1x1 pool2 map, smaller than fc6-conv's 7x7 kernel: refused naming fc6-conv."""
    net = convert_net(parse_netdef(small_net("plain"))).net
    with pytest.raises(NetDefinitionError, match=r"layer 'fc6-conv' \(Convolution\).*too small"):
        infer(net, {"data": (1, 3, 8, 8)})
