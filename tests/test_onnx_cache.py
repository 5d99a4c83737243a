"""engines/onnx_cache.py: the onnx engine's graph kept between runs, the same net without onnx."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from fcnify.convert import convert  # noqa: E402
from fcnify.engines.onnx_engine import OnnxRunner  # noqa: E402
from fcnify.io.models import find_model, read_card  # noqa: E402


@pytest.fixture(scope="module")
def digits_fcn(tmp_path_factory):
    card = find_model("digits")
    result = convert(card.model_def, card.weights, tmp_path_factory.mktemp("digits") / "digits", card=card,
                     check=False)
    return read_card(result.outputs["card"])


def _forward(card, x: np.ndarray) -> dict[str, np.ndarray]:
    net = OnnxRunner().load(card.model_def, card.weights)
    return net.forward({"data": x}, ["prob"])


def test_cached_graph_maps_as_the_built_one(digits_fcn, tmp_path, monkeypatch):
    """The first load stores the graph; the second reads it without building (to_onnx not called)
    and gives the same scores bit for bit."""
    monkeypatch.setenv("FCNIFY_CACHE", str(tmp_path / "cache"))
    x = np.random.default_rng(0).random((1, 1, 60, 80), dtype=np.float32)
    built = _forward(digits_fcn, x)
    stored = sorted(p.suffix for p in (tmp_path / "cache" / "onnx-graphs").iterdir())
    assert stored == [".json", ".onnx"]

    def no_build(*args, **kwargs):
        raise AssertionError("the graph was built again")
    monkeypatch.setattr("fcnify.engines.onnx_engine.to_onnx", no_build)
    cached = _forward(digits_fcn, x)
    assert np.array_equal(cached["prob"], built["prob"])


def test_key_follows_the_net_and_the_outputs(digits_fcn):
    """Another output list, or another net definition, is another graph."""
    from fcnify.caffe.netdef import read_netdef
    from fcnify.engines.onnx_cache import graph_key
    net = read_netdef(digits_fcn.model_def).param
    key = graph_key(net, ("prob",))
    assert graph_key(net, ("prob",)) == key
    assert graph_key(net, ("prob", "ip2-conv")) != key
    net.layer[1].name = net.layer[1].name + "_renamed"
    assert graph_key(net, ("prob",)) != key


def test_a_broken_cache_is_rebuilt(digits_fcn, tmp_path, monkeypatch):
    """A cache file that does not parse is replaced by a fresh build, with the same scores."""
    monkeypatch.setenv("FCNIFY_CACHE", str(tmp_path / "cache"))
    x = np.random.default_rng(1).random((1, 1, 40, 40), dtype=np.float32)
    built = _forward(digits_fcn, x)
    (names,) = (tmp_path / "cache" / "onnx-graphs").glob("*.json")
    names.write_text("{not json")
    assert np.array_equal(_forward(digits_fcn, x)["prob"], built["prob"])
    assert names.read_text().startswith("[")


def test_a_cached_load_never_imports_onnx(digits_fcn, tmp_path):
    """With the graph cached, loading and running the net leaves the onnx package unimported
    (importing it costs ~0.7 s of CPU)."""
    env = {**os.environ, "FCNIFY_CACHE": str(tmp_path / "cache")}
    code = ("import sys, numpy as np\n"
            "from fcnify.engines.onnx_engine import OnnxRunner\n"
            f"net = OnnxRunner().load({str(digits_fcn.model_def)!r}, {str(digits_fcn.weights)!r})\n"
            "net.forward({'data': np.zeros((1, 1, 28, 28), np.float32)}, ['prob'])\n"
            "print('onnx' in sys.modules)\n")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert [r.stdout.strip() for r in runs] == ["True", "False"]  # built (and stored), then read
