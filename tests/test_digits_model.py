"""The shipped demo model `digits` still reads held-out digits (prototxt/digits/)."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402

from fcnify.io.preprocess import Preprocess  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _digits_common():
    """scripts/digits_common.py, the one renderer shared by training, the scene and this test."""
    spec = importlib.util.spec_from_file_location("digits_common", SCRIPTS / "digits_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heldout_accuracy_at_least_95_percent():
    """Held-out digits, drawn centred as in training, are classified >= 95% right."""
    dc = _digits_common()
    folder = dc.MODEL_DIR
    meta = json.loads((folder / "model.json").read_text())
    preprocess = Preprocess.from_dict(meta["preprocess"])
    images, labels = dc.load_digits()
    heldout = dc.read_split()["heldout"]
    x = np.stack([preprocess.apply(rgb) for rgb in dc.heldout_view(images, heldout)])

    caffe.set_mode_cpu()
    net = caffe.Net(str(folder / "deploy.prototxt"), str(folder / meta["weights"]), caffe.TEST)
    net.blobs["data"].reshape(*x.shape)
    net.reshape()
    net.blobs["data"].data[...] = x
    predicted = net.forward()["prob"].argmax(axis=1)

    accuracy = float((predicted == labels[heldout]).mean())
    assert len(heldout) >= 500, f"split.json holds only {len(heldout)} held-out digits"
    assert accuracy >= 0.95, f"held-out accuracy {accuracy:.2%} < 95%"
