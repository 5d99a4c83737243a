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
    monkeypatch.setenv("FCNIFY_ORT_SESSION_CACHE", "0")  # else the session entry spares the graph
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


def _entry(tmp_path):
    (entry,) = (tmp_path / "cache" / "onnx-sessions").iterdir()
    return entry


def _count_weight_reads(monkeypatch) -> list:
    """Calls of the caffemodel reader the onnx engine uses, recorded (and still made)."""
    from fcnify.engines import onnx_export
    calls, real = [], onnx_export.read_weights
    monkeypatch.setattr(onnx_export, "read_weights", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_a_cached_session_does_not_read_the_caffemodel(digits_fcn, tmp_path, monkeypatch):
    """The second load starts from the stored optimized session: the caffemodel is never read,
    and the scores are those of the first load bit for bit; no temporary entry is left."""
    monkeypatch.setenv("FCNIFY_CACHE", str(tmp_path / "cache"))
    x = np.random.default_rng(2).random((1, 1, 50, 70), dtype=np.float32)
    reads = _count_weight_reads(monkeypatch)
    built = _forward(digits_fcn, x)
    assert len(reads) == 1
    entry = _entry(tmp_path)
    assert not entry.name.startswith(".")
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "model.onnx", "weights.bin"]
    cached = _forward(digits_fcn, x)
    assert len(reads) == 1, "the caffemodel was read although the session was cached"
    assert np.array_equal(cached["prob"], built["prob"])


@pytest.mark.parametrize("damage", ["weights overwritten", "weights truncated", "graph overwritten",
                                    "meta missing"])
def test_a_damaged_session_is_rebuilt(digits_fcn, tmp_path, monkeypatch, damage):
    """A session entry whose files do not match its meta.json is not run: the net is built
    again from the caffemodel, with the scores of the first build, and the entry rewritten.
    The overwritten weights keep their size and mtime, so only the sampled digest finds them
    (run as they are, they would give other scores)."""
    monkeypatch.setenv("FCNIFY_CACHE", str(tmp_path / "cache"))
    x = np.random.default_rng(3).random((1, 1, 40, 60), dtype=np.float32)
    built = _forward(digits_fcn, x)
    entry = _entry(tmp_path)
    weights, graph = entry / "weights.bin", entry / "model.onnx"
    st = weights.stat()
    if damage == "weights overwritten":
        with open(weights, "r+b") as f:
            f.write(np.full(256, 7.0, np.float32).tobytes())
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif damage == "weights truncated":
        os.truncate(weights, st.st_size // 2)
    elif damage == "graph overwritten":
        graph.write_bytes(graph.read_bytes()[:-16] + b"\0" * 16)
    else:
        (entry / "meta.json").unlink()
    reads = _count_weight_reads(monkeypatch)
    again = _forward(digits_fcn, x)
    assert len(reads) == 1, "the damaged entry was trusted"
    assert np.array_equal(again["prob"], built["prob"])
    assert (_entry(tmp_path) / "meta.json").is_file()
    reads_after = _count_weight_reads(monkeypatch)
    assert np.array_equal(_forward(digits_fcn, x)["prob"], built["prob"])
    assert reads_after == [], "the rebuilt entry was not used"


def test_other_weights_are_another_session(digits_fcn, tmp_path, monkeypatch):
    """A caffemodel replaced at the same path (another size, mtime or inode) is not run from
    the old session: its own scores come back, as a run without the cache gives them."""
    import shutil
    from fcnify.caffe.netdef import read_netdef
    from fcnify.synthetic import write_random_caffemodel
    monkeypatch.setenv("FCNIFY_CACHE", str(tmp_path / "cache"))
    proto = tmp_path / "digits.prototxt"
    shutil.copy(digits_fcn.model_def, proto)
    model = tmp_path / "digits.caffemodel"
    shutil.copy(digits_fcn.weights, model)
    x = np.random.default_rng(4).random((1, 1, 40, 40), dtype=np.float32)
    first = OnnxRunner().load(proto, model).forward({"data": x}, ["prob"])["prob"]
    model.unlink()
    write_random_caffemodel(read_netdef(proto), model, seed=5)
    second = OnnxRunner().load(proto, model).forward({"data": x}, ["prob"])["prob"]
    monkeypatch.setenv("FCNIFY_ORT_SESSION_CACHE", "0")
    fresh = OnnxRunner().load(proto, model).forward({"data": x}, ["prob"])["prob"]
    assert not np.array_equal(second, first)
    assert np.array_equal(second, fresh)


def test_the_least_recently_used_sessions_go_first(digits_fcn, tmp_path, monkeypatch):
    """Beyond the cache's byte limit the entries last used longest ago are removed, the newest
    kept; an entry read again counts as used then."""
    import shutil
    from fcnify.engines import onnx_cache
    monkeypatch.setenv("FCNIFY_CACHE", str(tmp_path / "cache"))
    x = np.zeros((1, 1, 28, 28), np.float32)
    proto = tmp_path / "digits.prototxt"
    shutil.copy(digits_fcn.model_def, proto)
    models = []
    for i in range(3):  # three weights files: three entries
        models.append(tmp_path / f"w{i}.caffemodel")
        shutil.copy(digits_fcn.weights, models[-1])
    keys = []
    folder = tmp_path / "cache" / "onnx-sessions"
    for i, model in enumerate(models):
        OnnxRunner().load(proto, model).forward({"data": x}, ["prob"])
        keys.append(next(e.name for e in folder.iterdir() if e.name not in keys))
        os.utime(folder / keys[-1] / "meta.json", (1000 + i, 1000 + i))
    size = sum(f.stat().st_size for f in (folder / keys[0]).iterdir())
    OnnxRunner().load(proto, models[0]).forward({"data": x}, ["prob"])  # entry 0 used again: newest
    onnx_cache._evict(folder, keep=keys[2], limit=int(2.5 * size))
    assert sorted(e.name for e in folder.iterdir()) == sorted([keys[0], keys[2]])
    onnx_cache._evict(folder, keep=keys[2], limit=0)
    assert [e.name for e in folder.iterdir()] == [keys[2]]
