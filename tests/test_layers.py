"""The package's layers hold: `lint-imports` keeps pyproject's contract, and breaks it when a lower layer
imports a higher one (docs/development.md, "Layout")."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    """lint-imports with pyproject.toml of `cwd`, importing fcnify from `pythonpath`; no cache written."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_layers_contract_is_kept():
    """The package as it is keeps its layers."""
    run = lint(REPO, REPO / "src")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fcnify's layers KEPT" in run.stdout


@pytest.mark.parametrize("module, bad_import, broken", [
    ("caffe/shapes.py", "from ..dense import dense  # noqa: F401", "fcnify.caffe is not allowed to import fcnify.dense"),
    ("io/models.py", "def _late():\n    from ..engines import make_engine  # noqa: F401",
     "fcnify.io is not allowed to import fcnify.engines"),
    ("errors.py", "from . import paths  # noqa: F401", "fcnify.errors is not allowed to import fcnify.paths"),
])
def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path, module, bad_import, broken):
    """A copy of the package with one upward import (even inside a function) fails, naming the layers."""
    shutil.copytree(REPO / "src" / "fcnify", tmp_path / "src" / "fcnify",
                    ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "fcnify" / module
    target.write_text(target.read_text() + "\n\n" + bad_import + "\n")
    run = lint(tmp_path, tmp_path / "src")
    assert run.returncode != 0
    assert "fcnify's layers BROKEN" in run.stdout
    assert broken in run.stdout, run.stdout
