"""Errors keep their kind from Caffe's worker to the exit status, and a bug has its own (errors.py, sandbox.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, call_fcnify, write_model
from fcnify import doctor
from fcnify.errors import FcnifyError, InternalError, NetDefinitionError, NotEquivalentError, ResourceError
from fcnify.engines.sandbox import Sandbox

TINY = (REPO / "tests" / "fuzz_corpus" / "tiny.prototxt").read_text()


@pytest.fixture(scope="module")
def box():
    sandbox = Sandbox()
    yield sandbox
    sandbox.close()


@pytest.mark.parametrize("kind, error, code", [
    ("MemoryError", ResourceError, 2),
    ("ValueError", InternalError, 3),
    ("RuntimeError", InternalError, 3),
    ("NetDefinitionError", NetDefinitionError, 2),
])
def test_a_worker_exception_keeps_its_kind(box, kind, error, code):
    """Out of memory in the worker is a ResourceError, fcnify's own errors keep their class,
    anything else is a bug; the worker's traceback comes along, and the worker lives on."""
    with pytest.raises(FcnifyError) as info:
        box.call("raise_for_test", kind, "what went wrong", context="testing", path="net.prototxt")
    assert type(info.value) is error and info.value.exit_code == code
    assert str(info.value) == f"net.prototxt: Caffe failed while testing: {kind}: what went wrong"
    assert info.value.worker_traceback.rstrip().splitlines()[-1].split(".")[-1].startswith(f"{kind}: what")
    assert "raise_for_test" in info.value.worker_traceback
    assert box.crashes == 0 and box.call("ping") == "pong"


def test_errors_declare_what_they_carry():
    """Every error has a worker traceback slot (None unless the worker raised it); a failed
    equivalence carries its result."""
    assert NetDefinitionError("bad").worker_traceback is None
    assert NotEquivalentError("differs").result is None
    marker = object()
    assert NotEquivalentError("differs", "net.prototxt", result=marker).result is marker


def test_a_bug_in_fcnify_exits_3_with_one_line(monkeypatch):
    """An exception fcnify did not expect is a bug: one line, exit 3 (not 2, bad input)."""
    def broken(*args, **kwargs):
        raise TypeError("an unexpected argument")

    monkeypatch.setattr(doctor, "diagnose", broken)
    run = call_fcnify("doctor")
    assert run.code == 3
    lines = run.err.strip().splitlines()
    assert lines == ["fcnify: internal error (a bug in fcnify; --debug shows where): TypeError: an unexpected argument"]


INJECT = ("import sys; from fcnify import cli; from fcnify.engines import caffe_engine\n"
          "def load(self, model_def, weights=None):\n"
          "    self.box.call('raise_for_test', 'ValueError', 'boom', context='loading x', path=model_def)\n"
          "caffe_engine.CaffeRunner.load = load\n"
          "sys.exit(cli.main(sys.argv[1:]))\n")


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("tiny"), "tiny", TINY)


@pytest.mark.parametrize("debug", [False, True])
def test_the_worker_traceback_is_printed_under_debug(tiny_net, tmp_path, debug):
    """A bug in the worker: exit 3 and one line; --debug adds the worker's own traceback."""
    proto, weights = tiny_net
    args = [*(["--debug"] if debug else []), "convert", "--model-def", str(proto), "--weights", str(weights),
            "--out", str(tmp_path / "net")]
    proc = subprocess.run([sys.executable, "-c", INJECT, *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"fcnify: error: {proto}: Caffe failed while loading x: ValueError: boom"
    assert ("Caffe's worker process raised it:" in proc.stderr) is debug
    assert ("in raise_for_test" in proc.stderr) is debug
    assert not list(tmp_path.glob("net*"))
