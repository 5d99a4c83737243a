"""The set-up step's decisions (scripts/setup/bootstrap.py) and `fcnify doctor`."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_fcnify

spec = importlib.util.spec_from_file_location("bootstrap", REPO / "scripts" / "setup" / "bootstrap.py")
bootstrap = importlib.util.module_from_spec(spec)
sys.modules["bootstrap"] = bootstrap  # dataclasses look their module up by name
spec.loader.exec_module(bootstrap)


def test_cache_key_parts():
    """The build key changes with each of Caffe version, flavour, Python and numpy major."""
    base = bootstrap.BuildKey("1.0.0+git20180821.99bd997-8", "cpu", "3.11", "2")
    names = {base.name,
             bootstrap.BuildKey("1.0.0+git20180821.99bd997-9", "cpu", "3.11", "2").name,
             bootstrap.BuildKey("1.0.0+git20180821.99bd997-8", "cuda13", "3.11", "2").name,
             bootstrap.BuildKey("1.0.0+git20180821.99bd997-8", "cpu", "3.12", "2").name,
             bootstrap.BuildKey("1.0.0+git20180821.99bd997-8", "cpu", "3.11", "1").name}
    assert len(names) == 5
    assert base.name == "caffe-1.0.0_git20180821.99bd997_8-cpu-py3.11-np2"


def test_key_from_interpreter():
    """The key is read from the virtualenv's interpreter: its Python and numpy major."""
    import numpy
    info = bootstrap.python_info(Path(sys.executable))
    key = bootstrap.build_key(info, cuda=False)
    assert key.python == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert key.numpy_major == numpy.__version__.split(".")[0]
    assert (Path(info["libdir"]) / info["ldlibrary"]).name.startswith("libpython")


def test_cache_root_outside_checkout(tmp_path):
    """The cache follows FCNIFY_CACHE, then XDG_CACHE_HOME, then ~/.cache."""
    assert bootstrap.cache_root({"FCNIFY_CACHE": str(tmp_path)}) == tmp_path
    assert bootstrap.cache_root({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/fcnify")
    assert bootstrap.cache_root({"HOME": "/h"}) == Path("/h/.cache/fcnify")


def test_bootstrap_copies_agree_with_paths(tmp_path, monkeypatch):
    """bootstrap.py's copies of the marker's name and the cache folder are fcnify.paths' own."""
    from fcnify import paths
    assert bootstrap.MARKER_NAME == paths.MARKER_NAME
    for env in ({"FCNIFY_CACHE": str(tmp_path / "c")}, {"XDG_CACHE_HOME": str(tmp_path / "x")},
                {"HOME": str(tmp_path / "h")}):
        for name in ("FCNIFY_CACHE", "XDG_CACHE_HOME", "HOME"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert bootstrap.cache_root(env) == paths.cache_dir()


@pytest.mark.parametrize("mode,existing,cached,expected", [
    ("auto", None, False, "cache"),
    ("auto", "/opt/caffe/python/caffe/__init__.py", False, "existing"),
    ("auto", "/opt/caffe/python/caffe/__init__.py", True, "cache"),
    ("build", "/opt/caffe/python/caffe/__init__.py", False, "cache"),
    ("existing", "/opt/caffe/python/caffe/__init__.py", True, "existing"),
])
def test_choose_caffe(mode, existing, cached, expected):
    """Where pycaffe comes from, for each FCNIFY_CAFFE mode."""
    assert bootstrap.choose_caffe(mode, existing, cached) == expected


def test_existing_mode_without_pycaffe_fails():
    """FCNIFY_CAFFE=existing with no importable pycaffe is an error, not a build."""
    with pytest.raises(bootstrap.SetupError, match="import caffe"):
        bootstrap.choose_caffe("existing", None, True)
    with pytest.raises(bootstrap.SetupError, match="auto, build or existing"):
        bootstrap.caffe_mode({"FCNIFY_CAFFE": "sometimes"})


def test_mirror_from_deb822_and_one_line():
    """The Debian mirror is read from the machine's sources; security and update suites are skipped."""
    deb822 = ("Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
              "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian\n"
              "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert bootstrap.parse_mirror({"debian.sources": deb822}) == "http://mirror.example/debian"
    one_line = "# comment\ndeb [arch=amd64] http://other.example/debian/ bookworm main\n"
    assert bootstrap.parse_mirror({"sources.list": one_line}) == "http://other.example/debian"
    with pytest.raises(bootstrap.SetupError, match="no Debian archive"):
        bootstrap.parse_mirror({"x.list": "deb http://ppa.example/ubuntu jammy main\n"})


def _fake_pycaffe(root: Path) -> Path:
    pkg = root / "caffe"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VERSION = 'fake'\n")
    return pkg


def test_existing_pycaffe_detection(tmp_path):
    """A pycaffe on PYTHONPATH is found; without one the answer is None, not our own build."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    pth = tmp_path / "absent.pth"
    assert bootstrap.find_existing_pycaffe(py, pth) is None
    fake = _fake_pycaffe(tmp_path / "user")
    env_path = str(tmp_path / "user")
    import os
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_path
    try:
        found = bootstrap.find_existing_pycaffe(py, pth)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    assert found == str(fake / "__init__.py")


def test_existing_detection_ignores_our_pth(tmp_path):
    """fcnify's own .pth is hidden while looking, so its build never counts as the user's."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = next((venv / "lib").glob("python3*/site-packages"))
    fake = _fake_pycaffe(tmp_path / "ours")
    pth = site / "fcnify-caffe.pth"
    pth.write_text(str(tmp_path / "ours") + "\n")
    assert bootstrap.find_existing_pycaffe(py, pth) is None
    assert pth.read_text().strip() == str(tmp_path / "ours"), "the .pth must be put back"
    assert fake.exists()


def test_patches_apply_to_fetched_source(tmp_path, caffe_root):
    """Debian's series and fcnify's patch apply cleanly to a fresh unpack of the source package."""
    kept = caffe_root.parent / "debian-package"
    dsc = next(kept.glob("*.dsc"))
    tree = tmp_path / "caffe"
    subprocess.run(["dpkg-source", "--skip-patches", "-x", str(dsc), str(tree)], check=True,
                   capture_output=True)
    io_cpp = (tree / "src" / "caffe" / "util" / "io.cpp").read_text()
    assert "SetTotalBytesLimit(kProtoReadBytesLimit, 536870912)" in io_cpp
    bootstrap.apply_series(tree, cuda=True)
    io_cpp = (tree / "src" / "caffe" / "util" / "io.cpp").read_text()
    assert "SetTotalBytesLimit(kProtoReadBytesLimit);" in io_cpp
    assert "prop.clockRate" not in (tree / "src" / "caffe" / "common.cpp").read_text()
    with pytest.raises(bootstrap.SetupError, match="does not apply"):
        bootstrap.apply_series(tree, cuda=False)  # a second time: already applied


def test_import_caffe_from_root():
    """The virtualenv's interpreter imports, from any directory (here: /), the pycaffe set-up chose."""
    proc = subprocess.run([sys.executable, "-c", "import caffe; print(caffe.__file__)"], cwd="/",
                          capture_output=True, text=True, env={"GLOG_minloglevel": "2", "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr
    marker = json.loads((Path(sys.prefix) / bootstrap.MARKER_NAME).read_text())
    imported = Path(proc.stdout.strip())
    assert imported.name == "__init__.py" and imported.parent.name == "caffe"
    assert imported.parent.parent == Path(marker["pycaffe"]), (imported, marker["pycaffe"])
    if marker["mode"] == "cache":  # fcnify's own build, put on the path by its .pth file
        pth = Path(bootstrap.python_info(Path(sys.executable))["purelib"]) / "fcnify-caffe.pth"
        assert pth.read_text().strip() == marker["pycaffe"]
        assert (imported.parent / "_caffe.so").exists()


def test_doctor_reports_cpu_openblas():
    """`fcnify doctor` reports a CPU-only build with OpenBLAS and exits 0."""
    run = run_fcnify("doctor")
    assert run.code == 0, run.err
    assert "build: CPU-only, BLAS: OpenBLAS" in run.out
    assert "caffe source:" in run.out and "status: OK" in run.out


def test_doctor_without_pycaffe(tmp_path):
    """With pycaffe unimportable, doctor exits non-zero with one line saying what to run."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'caffe' or name.startswith('caffe.'):\n"
        "            raise ModuleNotFoundError('blocked for the test')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n")
    run = run_fcnify("doctor", env={"PYTHONPATH": str(block)})
    assert run.code == 2
    assert "pycaffe: MISSING" in run.out and "scripts/setup.sh" in run.out
    assert "Traceback" not in run.out + run.err


def test_doctor_with_broken_pycaffe(tmp_path):
    """A pycaffe that fails to import is reported as broken, exit 2, no traceback."""
    pkg = _fake_pycaffe(tmp_path / "broken")
    (pkg / "__init__.py").write_text("raise RuntimeError('this pycaffe is broken')\n")
    (pkg / "_caffe.so").write_bytes(b"")
    run = run_fcnify("doctor", env={"PYTHONPATH": str(tmp_path / "broken")})
    assert run.code == 2
    assert "pycaffe: BROKEN" in run.out and "this pycaffe is broken" in run.out
    assert "Traceback" not in run.out + run.err


# ------------------------------------------------------------------ the cold path: pip while Caffe compiles

@pytest.mark.parametrize("mode,cached,findable,expected", [
    ("auto", False, False, True),    # nothing to re-use: build now, pip meanwhile
    ("auto", False, True, False),    # a pycaffe is there: pip first, then try importing it
    ("auto", True, False, False),    # the cached build is complete: nothing to compile
    ("build", False, True, True),    # always ours: whatever else is installed
    ("build", True, False, False),
    ("existing", False, False, False),  # never builds
])
def test_build_alongside_pip(mode, cached, findable, expected):
    """Caffe compiles during pip only when the build is sure to be needed."""
    assert bootstrap.build_alongside_pip(mode, cached, findable) is expected


def test_overlap_runs_pip_while_the_build_runs():
    """The build and pip run at the same time: each waits here for a sign of the other."""
    import threading
    build_started, pip_started = threading.Event(), threading.Event()

    def build():
        build_started.set()
        return pip_started.wait(timeout=20)

    def install():
        assert build_started.wait(timeout=20), "the build did not start before pip"
        pip_started.set()
    assert bootstrap.overlap(build, install) is True


def test_overlap_pip_failure_lets_the_build_finish():
    """A pip failure is raised, but only after the build (cached for the next run) has finished."""
    import threading
    import time as _time
    finished = threading.Event()

    def build():
        _time.sleep(0.3)
        finished.set()

    def install():
        raise bootstrap.SetupError("pip failed")
    with pytest.raises(bootstrap.SetupError, match="pip failed"):
        bootstrap.overlap(build, install)
    assert finished.is_set()


def test_overlap_build_failure_is_raised():
    """A failed build is the set-up's error even when pip worked."""
    def build():
        raise bootstrap.SetupError("make failed building Caffe")
    with pytest.raises(bootstrap.SetupError, match="make failed"):
        bootstrap.overlap(build, lambda: None)


def test_numpy_pinned_while_building(tmp_path, monkeypatch):
    """pip gets numpy==<the version the build compiles against> as a constraint; unpinned otherwise."""
    calls = []
    monkeypatch.setattr(bootstrap, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(bootstrap, "project_installed", lambda py, venv, extras: False)
    py = tmp_path / "bin" / "python"
    bootstrap.ensure_project(py, tmp_path, "test", ["numpy==2.4.6"])
    install = calls[-1]
    pins = tmp_path / "fcnify-pins.txt"
    assert pins.read_text() == "numpy==2.4.6\n"
    assert install[install.index(str(pins)) - 1] == "-c"
    assert ["-e", ".[test]"] == install[-2:] and str(bootstrap.CONSTRAINTS) in install
    calls.clear()
    bootstrap.ensure_project(py, tmp_path, "test")
    assert str(pins) not in calls[-1] and str(bootstrap.CONSTRAINTS) in calls[-1]


def test_findable_but_unimportable_pycaffe(tmp_path, monkeypatch):
    """A pycaffe that can be found but not imported keeps pip first; it is not re-used as it is."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    pth = tmp_path / "absent.pth"
    assert bootstrap.findable_pycaffe(py, pth) is None
    pkg = _fake_pycaffe(tmp_path / "user")
    (pkg / "__init__.py").write_text("import a_module_pip_has_not_installed_yet\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "user"))
    assert bootstrap.findable_pycaffe(py, pth) == str(pkg / "__init__.py")
    assert bootstrap.find_existing_pycaffe(py, pth) is None
