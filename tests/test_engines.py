"""The engine contract and table (engines.py): every engine is looked up by name in one place."""
from __future__ import annotations

import pytest

from fcnify.cli import cli
import json

from fcnify.engines import (AUTO, DEFAULT_ENGINE, ENGINES, PROOF_ENGINE, Engine, EngineEntry, LoadedNet,
                            make_engine, resolve_engine)
from fcnify.errors import InputError
from fcnify.io.models import find_model

from conftest import REPO, call_fcnify
from fake_engine import FakeRunner

SCENE = REPO / "prototxt" / "digits" / "scene.png"
NET = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 9 dim: 9 } } }\n'
       'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
       'convolution_param { num_output: 2 kernel_size: 3 } }\n')


def test_cli_choices_are_the_table():
    """--engine on classify-map, convert and verify offers auto and exactly the table's names;
    classify-map defaults to auto, convert and verify to Caffe (the engine that proves equivalence)."""
    defaults = {}
    for command in ("classify-map", "convert", "verify"):
        option = next(p for p in cli.commands[command].params if p.name == "engine")
        assert list(option.type.choices) == ["auto", *ENGINES]
        defaults[command] = option.default
    assert list(ENGINES)[:3] == ["caffe", "torch", "onnx"]
    assert defaults == {"classify-map": "auto", "convert": "caffe", "verify": "caffe"}
    assert DEFAULT_ENGINE == AUTO and PROOF_ENGINE == "caffe"


def test_unknown_engine_is_one_line():
    with pytest.raises(InputError, match="unknown engine 'nope'.*auto, caffe, torch, onnx"):
        make_engine("nope")


def test_auto_is_onnx_runtime_when_installed_else_caffe(monkeypatch):
    """auto picks the onnx engine when onnxruntime can be imported, Caffe when it cannot;
    any other name is taken as given."""
    import importlib.util
    have_ort = importlib.util.find_spec("onnxruntime") is not None
    assert resolve_engine("auto") == ("onnx" if have_ort else "caffe")
    assert make_engine("auto").name == resolve_engine("auto")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert resolve_engine("auto") == "caffe" and resolve_engine("torch") == "torch"
    assert make_engine().name == "caffe"


def test_auto_choice_is_in_the_summary_and_map_json(tmp_path):
    """classify-map without --engine says which engine auto chose, in the text summary and in
    map.json's run block; --engine caffe is recorded as caffe."""
    chosen = resolve_engine("auto")
    run = call_fcnify("classify-map", SCENE, "--model", "digits", "--out", tmp_path / "a", "--quiet")
    assert run.code == 0, run
    assert f"engine {chosen}" in run.out
    doc = json.loads((tmp_path / "a" / "scene.map.json").read_text())
    assert doc["run"]["engine"] == chosen and doc["run"]["precision"] == "f32"
    run = call_fcnify("classify-map", SCENE, "--model", "digits", "--engine", "caffe", "--format", "json")
    assert run.code == 0 and json.loads(run.out)["run"]["engine"] == "caffe", run


@pytest.mark.parametrize("name", list(ENGINES))
def test_every_engine_keeps_the_contract(name, model_factory):
    """Each engine is an Engine; its nets are LoadedNets that `with` closes."""
    engine = make_engine(name)
    assert isinstance(engine, Engine) and engine.name == name
    assert {"Convolution", "Pooling", "ReLU"} <= engine.layer_types()
    proto, weights = model_factory("tiny", NET)
    from fcnify.caffe.netdef import read_netdef
    assert engine.memory(read_netdef(proto).param, 20, 20).total > 0
    closed = []
    with engine.load(proto, weights) as net:
        assert isinstance(net, LoadedNet)
        real_close = net.close
        net.close = lambda: (closed.append(True), real_close())
        import numpy as np
        out = net.forward({"data": np.ones((1, 3, 11, 12), np.float32)}, ["c"])["c"]
        assert out.shape == (1, 2, 9, 10)
    assert closed == [True]
    engine.close()


def test_a_new_engine_is_one_row(monkeypatch, tmp_path):
    """An engine added as one row (a module outside fcnify) runs classify-map, verify and convert."""
    monkeypatch.setitem(ENGINES, "fake", EngineEntry("fake", "fake_engine", "FakeRunner", "tests only"))
    FakeRunner.loads = 0
    run = call_fcnify("classify-map", SCENE, "--model", "digits", "--engine", "fake", "--quiet")
    assert run.code == 0, run
    assert FakeRunner.loads == 3  # the original and its conversion (the check), then the map's net
    run = call_fcnify("convert", "--model", "digits", "--out", tmp_path / "d", "--engine", "fake")
    assert run.code == 0 and FakeRunner.loads == 5, run
    card = find_model("digits")
    run = call_fcnify("verify", card.model_def, tmp_path / "d_full_conv.prototxt", "--weights", card.weights,
                      "--engine", "fake")
    assert run.code == 0 and FakeRunner.loads == 7, run
