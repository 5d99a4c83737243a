"""Caffe's layer types, grouped once for every part of fcnify.

Each set names the layer types one part of fcnify treats alike; the sets are
built from each other here, so a new type is added in one place. (What each
engine can run is the engine's own: `Engine.layer_types()`.)
"""
from __future__ import annotations

# Types whose top has the bottom's shape and that carry no parameters.
ELEMENTWISE = {
    "ReLU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log", "Dropout",
    "ELU", "Threshold", "Clip", "Swish", "Softmax", "LRN", "MVN",
}
DATA_LAYERS = {"Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData"}
LOSS_LAYERS = {
    "SoftmaxWithLoss", "EuclideanLoss", "HingeLoss", "InfogainLoss",
    "MultinomialLogisticLoss", "SigmoidCrossEntropyLoss", "ContrastiveLoss", "Accuracy",
}

# Map geometry: layers that keep the spatial layout of their (first) bottom, and those that
# merge several bottoms cell by cell.
PASS_THROUGH = ELEMENTWISE | {"Split", "BatchNorm", "Scale", "Bias", "PReLU", "Silence"}
MERGE = {"Concat", "Eltwise"}

# Finer strides: layers that work per position (or across channels only): à trous leaves them alone.
CHANNEL_WISE = PASS_THROUGH | MERGE | {"Softmax", "Dropout"}

# Surgery: layers that may read a converted (now spatial) blob and stay correct cell by cell.
CELLWISE = ELEMENTWISE - {"LRN", "MVN"} | {"Split", "Eltwise", "Concat", "BatchNorm",
                                           "Scale", "Bias", "PReLU", "Silence", "InnerProduct"}
# ... whose axis parameter must then be made explicit: on the old 2-axis blob, -1 meant 1.
AXIS_PARAM = {"Softmax": "softmax_param", "Concat": "concat_param", "Scale": "scale_param",
              "Bias": "bias_param"}
# Layers a global pooling's output may pass through (one bottom) on its way to the classifier.
VIEWS = ("Flatten", "Reshape", "Dropout", "ReLU", "Split")

# The equivalence bound: layers that may sit between the score layer and the scores.
SCORE_PATH = ("ReLU", "Dropout", "Pooling", "Flatten", "Reshape", "Split")
