"""A process killed outright (SIGKILL: no handler runs) leaves its scratch folder and staged
outputs behind; the next fcnify run that writes there removes them, and never a live run's."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from conftest import REPO
from fcnify import files
from fcnify.files import OWNER, TMP_MARK, OutputSet, ScratchDir, remove_abandoned_scratch

DIGITS_SCENE = REPO / "prototxt" / "digits" / "scene.png"


def _age(path: Path, seconds: float = 3 * files.ABANDONED_AFTER_S) -> None:
    """Make `path` look as old as a leftover from an earlier run."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def _killed_run(tmp: Path, out: Path) -> None:
    """A process that makes a scratch folder and stages an output, then is SIGKILLed."""
    code = textwrap.dedent(f"""
        import os, signal
        from fcnify.files import OutputSet, ScratchDir
        scratch = ScratchDir("convert")
        (scratch.path / "net_full_conv.caffemodel").write_bytes(b"w" * 1000)
        out = OutputSet()
        out.path_for({str(out / 'photo.scores.npy')!r}).write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TMPDIR=str(tmp)))
    assert proc.returncode == -signal.SIGKILL


def _live_holder(tmp: Path, out: Path) -> subprocess.Popen:
    """A process that holds a scratch folder and a staged output and waits."""
    code = textwrap.dedent(f"""
        import sys
        from fcnify.files import OutputSet, ScratchDir
        scratch = ScratchDir("convert")
        out = OutputSet()
        out.path_for({str(out / 'photo.scores.npy')!r}).write_bytes(b"live")
        print(scratch.name, flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, TMPDIR=str(tmp)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc


def _scratch(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("fcnify-*"))


def _staged(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if TMP_MARK in p.name)


def test_a_killed_runs_leftovers_are_removed_by_the_next(tmp_path):
    """SIGKILL leaves the folder and the staged file; the next ScratchDir and the next output
    staged under the same name remove them (once they are older than a moment)."""
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir(), out.mkdir()
    _killed_run(tmp, out)
    left, staged = _scratch(tmp), _staged(out)
    assert len(left) == 1 and (left[0] / "net_full_conv.caffemodel").exists(), left
    assert len(staged) == 1, staged

    fresh = ScratchDir("convert", dir=tmp)  # too young to be taken for abandoned: kept
    assert left[0].exists()
    fresh.cleanup()
    for path in (left[0] / OWNER, staged[0]):
        _age(path)
    fresh = ScratchDir("convert", dir=tmp)
    assert _scratch(tmp) == [fresh.path], "the killed run's folder is still there"
    fresh.cleanup()
    assert _scratch(tmp) == []

    with OutputSet() as outputs:
        outputs.path_for(out / "photo.scores.npy").write_bytes(b"whole")
    assert _staged(out) == [] and (out / "photo.scores.npy").read_bytes() == b"whole"


def test_a_live_runs_files_are_never_removed(tmp_path):
    """However old, a folder and a staged file whose process is alive stay."""
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir(), out.mkdir()
    holder = _live_holder(tmp, out)
    try:
        (folder,), (staged,) = _scratch(tmp), _staged(out)
        _age(folder / OWNER), _age(staged)
        assert remove_abandoned_scratch(tmp) == 0
        assert files.remove_abandoned_staged(out / "photo.scores.npy") == 0
        assert folder.exists() and staged.read_bytes() == b"live"
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert _scratch(tmp) == [], "a clean exit removes its own folder"


def test_folders_that_are_not_fcnifys_scratch_stay(tmp_path):
    """A fcnify-* folder without a locked owner file (another tool's, an older fcnify's) is left."""
    other = tmp_path / "fcnify-bench-xyz"
    other.mkdir()
    (other / "data").write_bytes(b"x")
    _age(other)
    assert remove_abandoned_scratch(tmp_path) == 0 and other.exists()


def test_classify_map_killed_during_conversion_leaves_nothing_after_the_next_run(tmp_path):
    """The user's case: `classify-map --model digits` converts in memory; SIGKILL it while the
    conversion folder exists, and the next run (same TMPDIR) ends with no fcnify-* there."""
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    args = [sys.executable, "-m", "fcnify", "classify-map", str(DIGITS_SCENE), "--model", "digits",
            "--out", str(out), "--quiet"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not any((p / OWNER).exists() for p in _scratch(tmp)):
        assert proc.poll() is None, "the run ended before its conversion folder was seen"
        assert time.monotonic() < deadline, "no conversion folder appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (left,) = _scratch(tmp)
    _age(left / OWNER)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert _scratch(tmp) == [], _scratch(tmp)
    assert (out / "scene.scores.npy").exists(), sorted(p.name for p in out.iterdir())
