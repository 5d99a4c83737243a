"""Ctrl-C and failures from the command line: exit 130 (or the error's code), one line, and --out
as it was before the run: no temporary file, no half-written output, no folder the run made."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, call_fcnify

DIGITS_SCENE = REPO / "prototxt" / "digits" / "scene.png"


def _images(folder: Path, count: int, size: tuple[int, int]) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / f"im{i:02d}.png")
    return folder


def _fcnify(args: list, tmp: Path, **kwargs) -> subprocess.Popen:
    """The command in its own process group (a terminal's Ctrl-C signals the whole group)
    and with its own temporary folder, to see what it leaves there."""
    env = dict(os.environ, TMPDIR=str(tmp))
    return subprocess.Popen([sys.executable, "-m", "fcnify", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def _whole_or_absent(out: Path, names: list[str]) -> int:
    """Each image has all its outputs or none; no staged file anywhere. Returns how many are whole."""
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in left if ".fcnify-tmp-" in n], left
    kinds = {n.split(".", 1)[1] for n in left}  # every kind of output some image has
    assert "map.json" in kinds and "scores.npy" in kinds, left
    whole = 0
    for name in names:
        present = [(out / f"{name}.{kind}").exists() for kind in kinds]
        assert all(present) or not any(present), (name, left)
        whole += all(present)
    return whole


def test_ctrl_c_with_dask_workers_leaves_nothing_half_done(tmp_path):
    """Ctrl-C to the process group mid-run with --workers 2: exit 130, one line, no traceback, no
    temporary file in --out or in the temporary folder; images not finished leave no file."""
    pytest.importorskip("distributed")
    imgs = _images(tmp_path / "imgs", 10, (500, 640))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    proc = _fcnify(["classify-map", imgs, "--model", "digits", "--workers", "2", "--out", out,
                    "--quiet"], tmp)
    first = proc.stdout.readline()  # the first image is done: the others are on their way
    assert first.startswith(str(imgs)), (first, proc.stderr.read() if proc.poll() is not None else "")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.splitlines() == ["fcnify: interrupted"], err
    whole = _whole_or_absent(out, [f"im{i:02d}" for i in range(10)])
    assert 1 <= whole < 10, whole
    assert list(tmp.iterdir()) == []


def test_ctrl_c_while_the_engine_closes_still_exits_130(tmp_path):
    """An interrupt while Caffe's worker is being stopped, at the very end: 130, one line, no atexit traceback."""
    code = ("import os, signal, sys\n"
            "from fcnify.engines import sandbox\n"
            "from fcnify.cli import main\n"
            "close = sandbox.Worker.close\n"
            "def interrupted(self):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    close(self)\n"
            "sandbox.Worker.close = interrupted\n"
            f"sys.argv = ['fcnify', 'classify-map', {str(DIGITS_SCENE)!r}, '--model', 'digits', '--engine', 'caffe']\n"
            "sys.exit(main())\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert run.returncode == 130, run.stderr
    assert run.stderr == "fcnify: interrupted\n"
    assert "map" in run.stdout  # the work itself was done
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("what", ["not an image", "stride", "interrupt"])
def test_a_failed_run_removes_the_out_folder_it_made(tmp_path, monkeypatch, what):
    """classify-map's --out (and parents) made by a run that fails (exit 2) or is interrupted is gone."""
    image = DIGITS_SCENE
    extra: list[str] = []
    if what == "not an image":
        image = tmp_path / "notes.png"
        image.write_text("not an image")
    elif what == "stride":
        extra = ["--stride", "3"]
    else:
        from fcnify.dense import pipeline

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(pipeline, "map_image", interrupted)
    out = tmp_path / "new" / "maps"
    run = call_fcnify("classify-map", image, "--model", "digits", "--out", out, *extra)
    assert run.code == (130 if what == "interrupt" else 2), run.err
    assert len(run.err.splitlines()) == 1, run.err
    assert not (tmp_path / "new").exists()


def test_a_failed_run_keeps_an_existing_out_folder(tmp_path):
    """An --out that was there before the run stays, with what it held."""
    out = tmp_path / "maps"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    run = call_fcnify("classify-map", DIGITS_SCENE, "--model", "digits", "--out", out, "--stride", "3")
    assert run.code == 2
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
