"""Shared test helpers: Caffe's source tree, running the CLI, seeded models."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fcnify.caffe.netdef import parse_netdef
from fcnify.paths import caffe_source
from fcnify.synthetic import write_random_caffemodel

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def killed_by_signal(self) -> bool:
        return self.code < 0


@pytest.fixture(scope="session")
def caffe_root() -> Path:
    """Caffe's source tree as fetched by set-up (reference prototxts, images, mean)."""
    return caffe_source()


def run_fcnify(*args: str, cwd: Path | None = None, timeout: float = 300,
               env: dict | None = None) -> Run:
    """`python -m fcnify ARGS` in a fresh process: exit code (negative = signal), stdout, stderr."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "fcnify", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def call_fcnify(*args: str) -> Run:
    """The CLI in this process (faster; Caffe itself still runs in fcnify's worker)."""
    from fcnify.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return Run(code, out.getvalue(), err.getvalue())


def write_model(tmp_path: Path, name: str, prototxt: str, seed: int = 0) -> tuple[Path, Path]:
    """A prototxt and a caffemodel of seeded He-scaled weights for it."""
    proto = tmp_path / f"{name}.prototxt"
    proto.write_text(prototxt)
    weights = write_random_caffemodel(parse_netdef(prototxt, proto), tmp_path / f"{name}.caffemodel", seed)
    return proto, weights


@pytest.fixture
def model_factory(tmp_path):
    """write_model bound to this test's tmp_path."""
    return lambda name, text, seed=0: write_model(tmp_path, name, text, seed)


@pytest.fixture(scope="session")
def caffenet(tmp_path_factory, caffe_root) -> tuple[Path, Path]:
    """Caffe's reference CaffeNet deploy.prototxt with seeded random weights (session-wide)."""
    proto = caffe_root / "models" / "bvlc_reference_caffenet" / "deploy.prototxt"
    weights = tmp_path_factory.mktemp("caffenet") / "caffenet_seeded.caffemodel"
    from fcnify.caffe.netdef import read_netdef
    write_random_caffemodel(read_netdef(proto), weights, seed=1)
    return proto, weights


# ------------------------------------------------------------------ nothing left in the temporary folder

LEAK_PREFIX = "fcnify-"  # what fcnify names its temporary files and folders
_made_by: dict[str, str] = {}  # leftover name -> the test during which it appeared


@pytest.fixture(scope="session", autouse=True)
def fresh_tmpdir(tmp_path_factory):
    """The whole session (and every process it starts) uses a fresh temporary folder; at the end
    nothing named fcnify-* may be left in it: a run that leaks a conversion or a staged file fails the suite."""
    import tempfile
    folder = tmp_path_factory.mktemp("tmpdir")
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # gettempdir() looks again
    yield folder
    if saved is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved
    tempfile.tempdir = None
    left = sorted(p.name for p in folder.iterdir() if p.name.startswith(LEAK_PREFIX))
    assert not left, "left in the temporary folder: " + "; ".join(
        f"{name} ({', '.join(sorted(q.name for q in (folder / name).iterdir())) if (folder / name).is_dir() else 'a file'}; "
        f"appeared during {_made_by.get(name, 'a fixture')})" for name in left)


@pytest.fixture(autouse=True)
def _note_leaks(fresh_tmpdir, request):
    """Which test each fcnify-* entry appeared during, for the session's message."""
    before = set(os.listdir(fresh_tmpdir))
    yield
    for name in set(os.listdir(fresh_tmpdir)) - before:
        if name.startswith(LEAK_PREFIX):
            _made_by.setdefault(name, request.node.nodeid)
