"""Net definitions shared by the surgery, shapes, geometry and convert tests.

Caffe's zoo nets come from its source tree (the `caffe_root` fixture); the
rest are written here as prototxt text so that each test can see its net:
VGG-16 built in a loop, and a small classifier whose head each variant
replaces (transpose, bias_term: false, Flatten, global pooling, ...).
"""
from __future__ import annotations

import os
from pathlib import Path

ZOO = {  # name -> folder under Caffe's models/
    "caffenet": "bvlc_reference_caffenet",
    "alexnet": "bvlc_alexnet",
    "rcnn": "bvlc_reference_rcnn_ilsvrc13",
    "flickr": "finetune_flickr_style",
    "googlenet": "bvlc_googlenet",
}

# VGG-16 (configuration D): blocks of (3x3 pad-1 convolutions, channels), each ending
# in a 2x2 stride-2 max pooling.
VGG_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def zoo(caffe_root: Path, name: str) -> Path:
    return caffe_root / "models" / ZOO[name] / "deploy.prototxt"


def layer_text(name: str, type_: str, bottom: str | list[str] | None, top: str | list[str],
               body: str = "") -> str:
    """One layer in prototxt text; `bottom` and `top` are a blob name or a list of them."""
    bottoms = [bottom] if isinstance(bottom, str) else bottom or []
    tops = [top] if isinstance(top, str) else top
    links = "".join(f' bottom: "{b}"' for b in bottoms) + "".join(f' top: "{t}"' for t in tops)
    return f'layer {{ name: "{name}" type: "{type_}"{links} {body} }}\n'


def input_layer(*dims: int) -> str:
    shape = " ".join(f"dim: {d}" for d in dims)
    return layer_text("data", "Input", None, "data", f"input_param {{ shape {{ {shape} }} }}")


def vgg16(width: int = 1, size: int = 224) -> str:
    """VGG-16 deploy prototxt; every channel count but the 1000 classes divided by `width`."""
    text = 'name: "VGG_ILSVRC_16_layers"\n' + input_layer(1, 3, size, size)
    bottom = "data"
    for block, (n, channels) in enumerate(VGG_BLOCKS, 1):
        for i in range(1, n + 1):
            name = f"conv{block}_{i}"
            text += layer_text(name, "Convolution", bottom, name, "convolution_param { num_output: "
                           f"{channels // width} pad: 1 kernel_size: 3 }}")
            text += layer_text(f"relu{block}_{i}", "ReLU", name, name)
            bottom = name
        text += layer_text(f"pool{block}", "Pooling", bottom, f"pool{block}",
                       "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
        bottom = f"pool{block}"
    for fc, outputs in (("fc6", 4096 // width), ("fc7", 4096 // width)):
        text += layer_text(fc, "InnerProduct", bottom, fc, f"inner_product_param {{ num_output: {outputs} }}")
        text += layer_text(f"relu{fc[2:]}", "ReLU", fc, fc)
        text += layer_text(f"drop{fc[2:]}", "Dropout", fc, fc, "dropout_param { dropout_ratio: 0.5 }")
        bottom = fc
    text += layer_text("fc8", "InnerProduct", bottom, "fc8", "inner_product_param { num_output: 1000 }")
    text += layer_text("prob", "Softmax", "fc8", "prob")
    return text


# A small classifier: 32 -> conv1 (5x5) 28 -> pool1 (3/2, ceil) 14 -> conv2 (3x3 pad 1) 14
# -> pool2 (2/2) 7, so fc6 reads 16 x 7 x 7 = 784 values.
TRUNK = (
    input_layer(1, 3, 32, 32)
    + layer_text("conv1", "Convolution", "data", "conv1", "convolution_param { num_output: 8 kernel_size: 5 }")
    + layer_text("relu1", "ReLU", "conv1", "conv1")
    + layer_text("pool1", "Pooling", "conv1", "pool1", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
    + layer_text("conv2", "Convolution", "pool1", "conv2",
             "convolution_param { num_output: 16 pad: 1 kernel_size: 3 }")
    + layer_text("relu2", "ReLU", "conv2", "conv2")
    + layer_text("pool2", "Pooling", "conv2", "pool2", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
)

# Heads reading "pool2". fc6 has 32 outputs, fc7 10 classes.
PLAIN = (
    layer_text("fc6", "InnerProduct", "pool2", "fc6", "inner_product_param { num_output: 32 }")
    + layer_text("relu6", "ReLU", "fc6", "fc6")
    + layer_text("fc7", "InnerProduct", "fc6", "fc7", "inner_product_param { num_output: 10 }")
    + layer_text("prob", "Softmax", "fc7", "prob")
)
HEADS = {
    "plain": PLAIN,
    "transpose": PLAIN.replace("num_output: 32 }", "num_output: 32 transpose: true }"),
    "no_bias": PLAIN.replace("num_output: 32 }", "num_output: 32 bias_term: false }")
                    .replace("num_output: 10 }", "num_output: 10 bias_term: false }"),
    "flatten": layer_text("flat", "Flatten", "pool2", "flat") + PLAIN.replace('bottom: "pool2"', 'bottom: "flat"'),
    "reshape": layer_text("flat", "Reshape", "pool2", "flat", "reshape_param { shape { dim: 0 dim: -1 } }")
               + PLAIN.replace('bottom: "pool2"', 'bottom: "flat"'),
    "global_pooling": layer_text("gpool", "Pooling", "pool2", "gpool",
                             "pooling_param { pool: AVE global_pooling: true }")
                      + PLAIN.replace('bottom: "pool2"', 'bottom: "gpool"'),
    "axis_minus_one": PLAIN.replace("num_output: 10 }", "num_output: 10 axis: -1 }")
                           .replace('top: "prob" ', 'top: "prob" softmax_param { axis: -1 } '),
}


def small_net(head: str = "plain", size: int = 32, name: str = "small") -> str:
    """The small classifier with one of HEADS (or a head given as text), at size x size."""
    text = HEADS.get(head, head)
    return f'name: "{name}"\n' + TRUNK.replace("dim: 32 dim: 32", f"dim: {size} dim: {size}") + text


# A NIN-like net: no InnerProduct, a 1x1 convolution and global pooling give the scores.
NIN = (
    'name: "nin"\n' + input_layer(1, 3, 32, 32)
    + layer_text("conv1", "Convolution", "data", "conv1", "convolution_param { num_output: 8 kernel_size: 5 }")
    + layer_text("relu1", "ReLU", "conv1", "conv1")
    + layer_text("cccp1", "Convolution", "conv1", "cccp1", "convolution_param { num_output: 10 kernel_size: 1 }")
    + layer_text("gpool", "Pooling", "cccp1", "gpool", "pooling_param { pool: AVE global_pooling: true }")
    + layer_text("prob", "Softmax", "gpool", "prob")
)

# NIN with its global pooling written as ResNet writes its last pool: a kernel equal to its
# 28x28 input, stride 1. That is already dense (it slides on a larger input); nothing converts.
NIN_DENSE = NIN.replace("global_pooling: true", "kernel_size: 28 stride: 1")

# The small classifier in Caffe's V1 format (`layers`, enum types, `input_dim` header).
V1_NET = """name: "v1net"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 32 input_dim: 32
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
         blobs_lr: 1 blobs_lr: 2 convolution_param { num_output: 8 kernel_size: 5 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
         pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layers { name: "conv2" type: CONVOLUTION bottom: "pool1" top: "conv2"
         convolution_param { num_output: 16 pad: 1 kernel_size: 3 } }
layers { name: "relu2" type: RELU bottom: "conv2" top: "conv2" }
layers { name: "pool2" type: POOLING bottom: "conv2" top: "pool2"
         pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "fc6" type: INNER_PRODUCT bottom: "pool2" top: "fc6" inner_product_param { num_output: 32 } }
layers { name: "relu6" type: RELU bottom: "fc6" top: "fc6" }
layers { name: "fc7" type: INNER_PRODUCT bottom: "fc6" top: "fc7" inner_product_param { num_output: 10 } }
layers { name: "prob" type: SOFTMAX bottom: "fc7" top: "prob" }
"""


def pycaffe():
    """pycaffe, imported with glog quiet (tests may import it directly)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe
    caffe.set_mode_cpu()
    return caffe


def caffe_shapes(prototxt: Path, size: tuple[int, int] | None = None, weights: Path | None = None):
    """(blob shapes, parameter shapes) of a net as Caffe builds it (TEST phase), optionally reshaped."""
    caffe = pycaffe()
    net = caffe.Net(str(prototxt), caffe.TEST) if weights is None else \
        caffe.Net(str(prototxt), str(weights), caffe.TEST)
    if size is not None:
        data = net.blobs[net.inputs[0]]
        data.reshape(*data.data.shape[:2], *size)
        net.reshape()
    blobs = {name: tuple(b.data.shape) for name, b in net.blobs.items()}
    params = {name: [tuple(p.data.shape) for p in ps] for name, ps in net.params.items()}
    return blobs, params

# Caffe's pooling edge rules, one case each (name -> pooling_param): padding, ceil rounding,
# dropped last windows, overhang, floor rounding, rectangles, global; the torch and onnx
# engines are both held to Caffe on these.
POOL_EDGE_CASES = {
    "max_pad": "pool: MAX kernel_size: 3 stride: 2 pad: 1",
    "ave_pad": "pool: AVE kernel_size: 3 stride: 2 pad: 1",
    "max_drop_last": "pool: MAX kernel_size: 2 stride: 2 pad: 1",  # last window starts in the padding
    "ave_drop_last": "pool: AVE kernel_size: 2 stride: 2 pad: 1",
    "ave_ceil_overhang": "pool: AVE kernel_size: 3 stride: 2",  # last window hangs past the edge
    "max_ceil_overhang": "pool: MAX kernel_size: 3 stride: 2",
    "ave_big_pad": "pool: AVE kernel_size: 5 stride: 3 pad: 2",
    "max_rect": "pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1",
    "ave_rect": "pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1",
    # padded along x only: Caffe still drops a last row window that starts past the image
    "max_pad_w_only": "pool: MAX kernel_h: 1 kernel_w: 3 stride_h: 2 stride_w: 2 pad_h: 0 pad_w: 1",
    "ave_pad_w_only": "pool: AVE kernel_h: 1 kernel_w: 3 stride_h: 2 stride_w: 2 pad_h: 0 pad_w: 1",
    "ave_floor": "pool: AVE kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR",
    "max_floor": "pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR",
    "ave_global": "pool: AVE global_pooling: true",
    "max_global": "pool: MAX global_pooling: true",
}


# Two outputs on one grid: `prob` (3 classes) and `box` (4 values per cell), for --output.
TWO_HEADS = """
name: "two_heads"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "score" type: "Convolution" bottom: "pool" top: "score" convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
layer { name: "box" type: "Convolution" bottom: "pool" top: "box" convolution_param { num_output: 4 kernel_size: 3 } }
"""
