"""Start-up: `import fcnify`, the CLI and a one-image classify-map load only what they use."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# packages that cost tenths of a second to import (or start services) and that a command
# not choosing them must never load
HEAVY = ("torch", "dask", "distributed", "onnx", "openvino", "matplotlib", "scipy", "zarr", "caffe")


def _imported(code: str, env: dict | None = None) -> list[str]:
    """The HEAVY packages in sys.modules after running `code` in a fresh interpreter."""
    probe = code + f"\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_probe_sees_an_import():
    """The probe itself: a heavy package that is imported is reported (else the tests below prove nothing)."""
    assert _imported("import fcnify.cli\nimport json as caffe\nimport sys; sys.modules['caffe'] = caffe") == ["caffe"]


@pytest.mark.parametrize("code", ["import fcnify", "import fcnify.cli",
                                  "from fcnify.cli import main\nmain(['classify-map', '--help'])"])
def test_import_and_help_load_no_heavy_package(code):
    """The package, the CLI module and --help import none of the engines' or plotting packages."""
    assert _imported(code) == []


def test_a_one_image_onnx_map_loads_no_other_engine(tmp_path):
    """classify-map on the onnx engine, with its default outputs written, imports ONNX Runtime
    only: not onnx (the graph is cached after the first run), torch, dask, openvino or caffe."""
    pytest.importorskip("onnxruntime")
    from PIL import Image
    from fcnify.convert import convert
    from fcnify.io.models import find_model
    card = find_model("digits")
    result = convert(card.model_def, card.weights, tmp_path / "digits", card=card, check=False)
    image = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    env = {"FCNIFY_CACHE": str(tmp_path / "cache")}
    run = ("from fcnify.cli import main\n"
           f"code = main(['classify-map', {str(image)!r}, '--card', {str(result.outputs['card'])!r}, "
           f"'--engine', 'onnx', '--quiet', '--force', '--out', {str(tmp_path / 'out')!r}])\n"
           "assert code == 0, code\n")
    _imported(run, env)  # the first run builds (and caches) the graph with onnx
    assert _imported(run, env) == []
    assert (tmp_path / "out" / "digit.map.json").is_file()
