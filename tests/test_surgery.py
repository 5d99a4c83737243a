"""Tests for fcnify.surgery.surgery: which layers become what, and which nets are refused and why.

The reference for CaffeNet is Caffe's own hand-written
examples/net_surgery/bvlc_caffenet_full_conv.prototxt; kernel shapes are
checked against the blob shapes pycaffe gives the original nets.
"""
from __future__ import annotations

import pytest

from fcnify.errors import ConversionError
from fcnify.caffe.netdef import parse_netdef, read_netdef, to_text
from fcnify.surgery.surgery import convert_net

from nets import (NIN, NIN_DENSE, PLAIN, V1_NET, ZOO, caffe_shapes, input_layer, layer_text, small_net, vgg16,
                  zoo)


def layers_by_name(net) -> dict:
    return {layer.name: layer for layer in net.layer}


def without_input_shape(layer):
    copy = type(layer)()
    copy.CopyFrom(layer)
    copy.input_param.ClearField("shape")
    return copy


def test_caffenet_matches_caffes_hand_written_full_conv(caffe_root):
    """Converted CaffeNet equals examples/net_surgery/bvlc_caffenet_full_conv.prototxt but for the input shape."""
    surgery = convert_net(read_netdef(zoo(caffe_root, "caffenet")))
    written = parse_netdef(to_text(surgery.net)).param  # what convert writes, read back
    reference = read_netdef(caffe_root / "examples" / "net_surgery" / "bvlc_caffenet_full_conv.prototxt").param
    assert [l.name for l in written.layer] == [l.name for l in reference.layer]
    for ours, theirs in zip(written.layer, reference.layer):
        if theirs.type == "Input":
            assert without_input_shape(ours) == without_input_shape(theirs)
            assert list(ours.input_param.shape[0].dim) == [10, 3, 227, 227]  # CaffeNet's own input
            assert list(theirs.input_param.shape[0].dim) == [1, 3, 451, 451]
        else:
            assert ours == theirs, f"layer {ours.name} differs:\n{ours}\nvs Caffe's\n{theirs}"


def test_input_size_is_written_into_the_new_net(caffe_root):
    """input_size (451, 451) makes the Input layer Caffe's example's 451x451 (batch kept)."""
    surgery = convert_net(read_netdef(zoo(caffe_root, "caffenet")), (451, 451))
    assert surgery.input_shape == (10, 3, 451, 451)
    assert list(layers_by_name(surgery.net)["data"].input_param.shape[0].dim) == [10, 3, 451, 451]
    assert surgery.shapes.blobs["data"] == (10, 3, 227, 227)  # shapes stay at the original size


def test_caffenet_conversions_and_maps(caffe_root):
    """fc6 (4096x9216) becomes 4096x256x6x6; fc7 and fc8 1x1; blobs and weights map to their sources."""
    surgery = convert_net(read_netdef(zoo(caffe_root, "caffenet")))
    got = {c.layer: (c.new_layer, c.old_params, c.new_params) for c in surgery.converted()}
    assert got == {
        "fc6": ("fc6-conv", ((4096, 9216), (4096,)), ((4096, 256, 6, 6), (4096,))),
        "fc7": ("fc7-conv", ((4096, 4096), (4096,)), ((4096, 4096, 1, 1), (4096,))),
        "fc8": ("fc8-conv", ((1000, 4096), (1000,)), ((1000, 4096, 1, 1), (1000,))),
    }
    assert surgery.source_layer["fc6-conv"] == "fc6" and surgery.source_layer["conv1"] == "conv1"
    assert surgery.blob_map["fc8"] == "fc8-conv" and surgery.blob_map["prob"] == "prob"
    assert [l.type for l in surgery.net.layer].count("InnerProduct") == 0


@pytest.mark.parametrize("name", list(ZOO))
def test_each_inner_product_becomes_a_kernel_over_its_input_map(name, caffe_root):
    """Every InnerProduct becomes a Convolution whose kernel is its input's C x H x W in Caffe (K x 1 x 1)."""
    path = zoo(caffe_root, name)
    original = read_netdef(path).param
    blobs, params = caffe_shapes(path)
    surgery = convert_net(read_netdef(path))
    new = layers_by_name(surgery.net)
    ips = [l for l in original.layer if l.type == "InnerProduct"]
    assert ips and [c.layer for c in surgery.converted()] == [l.name for l in ips]
    for conv in surgery.converted():
        ip = layers_by_name(original)[conv.layer]
        c, h, w = (blobs[ip.bottom[0]][1:] + (1, 1))[:3]  # an (N, K) input becomes K x 1 x 1
        num_output = params[ip.name][0][0]
        assert conv.new_params[0] == (num_output, c, h, w)
        layer = new[conv.new_layer]
        assert layer.type == "Convolution"
        kernel = list(layer.convolution_param.kernel_size) or [layer.convolution_param.kernel_h]
        assert kernel == [h] and h == w
    assert all(l.type != "InnerProduct" for l in surgery.net.layer)


def test_full_size_vgg16_fc6_becomes_7x7_over_512_channels():
    """Full VGG-16: fc6 (4096x25088) becomes 4096x512x7x7, fc7 and fc8 become 1x1."""
    surgery = convert_net(parse_netdef(vgg16()))
    got = {c.layer: (c.old_params[0], c.new_params[0]) for c in surgery.converted()}
    assert got == {"fc6": ((4096, 512 * 7 * 7), (4096, 512, 7, 7)),
                   "fc7": ((4096, 4096), (4096, 4096, 1, 1)),
                   "fc8": ((1000, 4096), (1000, 4096, 1, 1))}
    assert surgery.shapes.blobs["prob"] == (1, 1000, 1, 1)


@pytest.mark.parametrize("head", ["flatten", "reshape"])
def test_flatten_or_reshape_feeding_an_inner_product_is_removed(head):
    """The Flatten/Reshape goes; fc6-conv reads pool2 directly, as a 7x7 kernel over 16 channels."""
    surgery = convert_net(parse_netdef(small_net(head)))
    new = layers_by_name(surgery.net)
    assert "flat" not in new
    assert list(new["fc6-conv"].bottom) == ["pool2"]
    assert surgery.converted()[0].new_params[0] == (32, 16, 7, 7)
    removed = [c for c in surgery.conversions if c.kind == "removed"]
    assert [(c.layer, c.old_type) for c in removed] == [("flat", "Flatten" if head == "flatten" else "Reshape")]
    assert surgery.blob_map["flat"] == "pool2"


def test_flatten_that_feeds_another_layer_is_kept_and_refused():
    """A Flatten also read by a non-InnerProduct stays, so fc6 reads a 2-axis blob: refused."""
    head = (layer_text("flat", "Flatten", "pool2", "flat") + PLAIN.replace('bottom: "pool2"', 'bottom: "flat"')
            + layer_text("keep", "Silence", "flat", "unused").replace(' top: "unused"', ""))
    with pytest.raises(ConversionError, match=r"'fc6' reads 'flat' of shape \(1, 784\).*cannot become a convolution"):
        convert_net(parse_netdef(small_net(head)))


def test_global_pooling_is_frozen_to_its_declared_kernel():
    """Global pooling over 7x7 before fc6 becomes a 7x7 stride-1 pooling, so it slides."""
    surgery = convert_net(parse_netdef(small_net("global_pooling")))
    p = layers_by_name(surgery.net)["gpool"].pooling_param
    assert (p.global_pooling, p.kernel_size, p.stride, p.pool) == (False, 7, 1, 1)  # 1 = AVE
    assert [c.layer for c in surgery.conversions if c.kind == "global_pooling"] == ["gpool"]
    assert surgery.converted()[0].new_params[0] == (32, 16, 1, 1)


def test_global_pooling_before_the_scores_is_frozen():
    """NIN's final global pooling (no InnerProduct anywhere) becomes a 28x28 stride-1 pooling."""
    surgery = convert_net(parse_netdef(NIN))
    assert surgery.changed and not surgery.converted()
    p = layers_by_name(surgery.net)["gpool"].pooling_param
    assert (p.global_pooling, p.kernel_size, p.stride, p.pool) == (False, 28, 1, 1)
    assert [c.detail for c in surgery.conversions] == [
        "global pooling frozen to a 28x28 kernel, stride 1 (one window per cell)"]


@pytest.mark.parametrize("pooling, frozen", [
    ("kernel_size: 28 stride: 1", False),   # ResNet's 7x7 stride-1 pool: already dense
    ("kernel_size: 28 stride: 28", True),   # covers its input, but would jump 28 cells
    ("kernel_size: 29 stride: 2", True),    # larger than its input
    ("kernel_size: 27 stride: 1", False),   # a 2x2 map at the declared size: not collapsing
])
def test_pooling_covering_its_input(pooling, frozen):
    """A pooling that takes its whole input to one cell is frozen, unless it is kernel = input, stride 1."""
    surgery = convert_net(parse_netdef(NIN.replace("global_pooling: true", pooling)))
    assert surgery.changed == frozen
    p = layers_by_name(surgery.net)["gpool"].pooling_param
    if frozen:
        assert (p.kernel_size, p.stride) == (28, 1)


def test_global_pooling_that_rescales_the_map_stays_global():
    """A squeeze-and-excitation branch (global pool -> 1x1 conv -> Scale of the map) is left global."""
    from fcnify.surgery.surgery import frozen_poolings
    from fcnify.caffe.shapes import infer
    text = ('name: "se"\n' + input_layer(1, 3, 16, 16)
            + layer_text("conv1", "Convolution", "data", "conv1", "convolution_param { num_output: 4 kernel_size: 3 }")
            + layer_text("squeeze", "Pooling", "conv1", "squeeze", "pooling_param { pool: AVE global_pooling: true }")
            + layer_text("excite", "Convolution", "squeeze", "excite", "convolution_param { num_output: 4 kernel_size: 1 }")
            + layer_text("scale", "Scale", "conv1", "scaled", "scale_param { axis: 0 }").replace(
                'bottom: "conv1"', 'bottom: "conv1" bottom: "excite"')
            + layer_text("head", "Convolution", "scaled", "head", "convolution_param { num_output: 2 kernel_size: 14 }"))
    net = parse_netdef(text).param
    assert frozen_poolings(net, infer(net)) == set()


def test_transposed_inner_product():
    """transpose: true stores K x N weights: the conversion is flagged, the convolution is plain."""
    surgery = convert_net(parse_netdef(small_net("transpose")))
    fc6 = surgery.converted()[0]
    assert (fc6.layer, fc6.transpose, fc6.old_params[0], fc6.new_params[0]) == \
        ("fc6", True, (784, 32), (32, 16, 7, 7))
    assert not surgery.converted()[1].transpose
    assert "transpose" not in to_text(surgery.net)


def test_bias_term_false_is_kept():
    """An InnerProduct without bias becomes a convolution without bias, with one parameter blob."""
    surgery = convert_net(parse_netdef(small_net("no_bias")))
    new = layers_by_name(surgery.net)
    assert new["fc6-conv"].convolution_param.bias_term is False
    assert [c.new_params for c in surgery.converted()] == [((32, 16, 7, 7),), ((10, 32, 1, 1),)]


def test_axis_minus_one_on_a_two_axis_input_converts():
    """fc7 and Softmax with axis -1 on (1, 32)/(1, 10) mean axis 1: converted, axis made explicit."""
    surgery = convert_net(parse_netdef(small_net("axis_minus_one")))
    new = layers_by_name(surgery.net)
    assert new["fc7-conv"].type == "Convolution"
    assert new["prob"].softmax_param.axis == 1
    assert surgery.shapes.blobs["prob"] == (1, 10, 1, 1)


def test_inner_product_over_spatial_axes_only_is_refused():
    """axis 2 applies one matrix per channel, which no convolution over channels reproduces."""
    text = small_net(PLAIN.replace("num_output: 32 }", "num_output: 32 axis: 2 }"))
    with pytest.raises(ConversionError, match=r"InnerProduct 'fc6' has axis 2 .*\(1, 16, 7, 7\).*cannot reproduce"):
        convert_net(parse_netdef(text))


def test_softmax_across_a_non_class_axis_after_conversion_is_refused():
    """A Softmax over axis 0 (the batch) of fc7's output would run across map cells: refused."""
    text = small_net(PLAIN.replace('top: "prob" ', 'top: "prob" softmax_param { axis: 0 } '))
    with pytest.raises(ConversionError, match=r"'prob' \(Softmax\) works along axis 0"):
        convert_net(parse_netdef(text))


def test_inner_product_on_a_vector_input_is_refused():
    """An InnerProduct reading a 2-axis Input has no map to slide over: refused with the reason."""
    text = ('name: "vec"\n' + input_layer(1, 64)
            + layer_text("fc1", "InnerProduct", "data", "fc1", "inner_product_param { num_output: 5 }"))
    with pytest.raises(ConversionError, match=r"'fc1' reads 'data' of shape \(1, 64\), which has no height"):
        convert_net(parse_netdef(text))


def test_layer_that_cannot_stay_dense_after_fc_is_refused():
    """A Reshape of fc6's output (to 2x4x4) cannot act cell by cell: refused naming it."""
    head = (layer_text("fc6", "InnerProduct", "pool2", "fc6", "inner_product_param { num_output: 32 }")
            + layer_text("r", "Reshape", "fc6", "r", "reshape_param { shape { dim: 0 dim: 2 dim: 4 dim: 4 } }"))
    with pytest.raises(ConversionError, match=r"layer 'r' \(Reshape\) reads 'fc6-conv'.*cannot keep a Reshape"):
        convert_net(parse_netdef(small_net(head)))


def test_name_clash_with_the_new_layer_name_is_refused():
    """A net that already has a layer called fc6-conv cannot get a second one."""
    head = layer_text("fc6-conv", "ReLU", "pool2", "pool2") + PLAIN  # in place, before fc6
    with pytest.raises(ConversionError, match="cannot rename InnerProduct 'fc6' to 'fc6-conv'"):
        convert_net(parse_netdef(small_net(head)))


def test_v1_net_is_upgraded_and_converted():
    """A V1 (`layers`, CONVOLUTION) net converts like its current-format twin."""
    v1 = convert_net(parse_netdef(V1_NET))
    current = convert_net(parse_netdef(small_net("plain")))
    assert v1.original.upgraded_from == "V1"
    assert [(c.layer, c.new_params) for c in v1.converted()] == \
        [(c.layer, c.new_params) for c in current.converted()]
    # the upgraded `input:` header becomes an Input layer named "input", as Caffe names it
    assert [(l.name, l.type) for l in v1.net.layer][1:] == [(l.name, l.type) for l in current.net.layer][1:]
    assert v1.net.layer[0].type == "Input" and list(v1.net.layer[0].top) == ["data"]


def test_no_inner_product_means_no_change():
    """A NIN-like net whose last pool already slides has nothing to convert: the same layers."""
    netdef = parse_netdef(NIN_DENSE)
    surgery = convert_net(netdef)
    assert not surgery.changed and surgery.conversions == []
    assert list(surgery.net.layer) == list(netdef.param.layer)


def test_the_original_net_is_not_modified(caffe_root):
    """convert_net leaves its input NetParameter as it was."""
    netdef = read_netdef(zoo(caffe_root, "caffenet"))
    before = netdef.param.SerializeToString()
    convert_net(netdef, (451, 451))
    assert netdef.param.SerializeToString() == before
