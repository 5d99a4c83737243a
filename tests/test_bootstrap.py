"""Set-up decisions for the CUDA build of Caffe (scripts/setup/bootstrap.py), without building it.

The full CUDA build takes minutes: scripts/setup/check_cuda_build.sh does it. These
tests check what decides it: flags, patches, cache keys, where the toolkit and
cuBLAS/cuRAND are found.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _bootstrap():
    spec = importlib.util.spec_from_file_location("fcnify_bootstrap", REPO / "scripts" / "setup" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


bootstrap = _bootstrap()
INFO = {"version": "3.11", "numpy": "2.4.6", "include": "/py/include", "libdir": "/py/lib",
        "ldlibrary": "libpython3.11.so", "purelib": "/venv/site-packages", "numpy_include": "/np/include"}


def _toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_cuda_patch_applies_cleanly_to_the_fetched_source(caffe_root):
    """cuda13-deviceprop.patch applies to set-up's Caffe source (dry run; the tree is not changed)."""
    for name in bootstrap.CUDA_PATCHES:
        proc = subprocess.run(["patch", "-p1", "-N", "--dry-run", "-i", str(bootstrap.PATCH_DIR / name)],
                              cwd=caffe_root, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cuda_patch_replaces_every_removed_device_prop_field():
    """The patch removes each cudaDeviceProp field CUDA 13 dropped from DeviceQuery."""
    text = (bootstrap.PATCH_DIR / "cuda13-deviceprop.patch").read_text()
    removed = "".join(l for l in text.splitlines(keepends=True) if l.startswith("-") and not l.startswith("---"))
    added = "".join(l for l in text.splitlines(keepends=True) if l.startswith("+") and not l.startswith("+++"))
    for field in ("clockRate", "deviceOverlap", "kernelExecTimeoutEnabled"):
        assert f"prop.{field}" in removed and f"prop.{field}" not in added


def test_patch_series_adds_the_cuda_patch_only_for_cuda(caffe_root):
    """The CUDA patch follows Debian's series and the CPU fixes, and only in the CUDA flavour."""
    cpu = bootstrap.patch_files(caffe_root, cuda=False)
    cuda = bootstrap.patch_files(caffe_root, cuda=True)
    assert [p.name for p in cuda[len(cpu):]] == list(bootstrap.CUDA_PATCHES)
    assert not any(p.name in bootstrap.CUDA_PATCHES for p in cpu)


def test_cuda_cmake_args_target_sm80_and_sm90(tmp_path):
    """CUDA flags: CPU_ONLY off, no cuDNN/NCCL, sm_80 + sm_90 binaries and compute_90 PTX."""
    args = bootstrap.cuda_cmake_args(tmp_path / "cuda")
    assert "-DCPU_ONLY=OFF" in args and "-DUSE_CUDNN=OFF" in args and "-DUSE_NCCL=OFF" in args
    arch = next(a for a in args if a.startswith("-DCUDA_ARCH_BIN="))
    assert set(arch.split("=", 1)[1].split()) == {"80", "90"}
    assert "-DCUDA_ARCH_NAME=Manual" in args and "-DCUDA_ARCH_PTX=90" in args
    assert f"-DCUDA_TOOLKIT_ROOT_DIR={tmp_path / 'cuda'}" in args
    assert not any("CMAKE_LIBRARY_PATH" in a for a in args)


def test_cuda_cmake_args_use_extra_libs_for_headers_linking_and_rpath(tmp_path):
    """A cuBLAS/cuRAND folder goes to the compiler, nvcc, the linker search path and the rpath."""
    libs = tmp_path / "cuda13-libs"
    args = bootstrap.cuda_cmake_args(tmp_path / "cuda", libs)
    assert f"-DCMAKE_LIBRARY_PATH={libs}/lib" in args
    assert f"-DCMAKE_CXX_FLAGS=-I{libs}/include" in args and f"-DCUDA_NVCC_FLAGS=-I{libs}/include" in args
    assert f"-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath,{libs}/lib" in args


def test_cpu_build_has_no_cuda_flags():
    """The default flavour stays CPU_ONLY."""
    args = bootstrap.cmake_args(INFO, Path("/venv/bin/python"), cuda=False)
    assert "-DCPU_ONLY=ON" in args and not any("CUDA" in a for a in args)


def test_unity_build_only_for_cpu(tmp_path, monkeypatch):
    """The CPU build compiles sources in batches (unity build); the CUDA build does not."""
    cpu = bootstrap.cmake_args(INFO, Path("/venv/bin/python"), cuda=False)
    assert "-DCMAKE_UNITY_BUILD=ON" in cpu
    monkeypatch.setattr(bootstrap, "cuda_toolkit_root", lambda: tmp_path)
    cuda = bootstrap.cmake_args(INFO, Path("/venv/bin/python"), cuda=True)
    assert not any("UNITY" in a for a in cuda)


def test_cuda_build_has_its_own_cache_key(monkeypatch):
    """The CUDA flavour (cuda<nvcc major>) never reuses the CPU build's cache folder."""
    monkeypatch.setattr(bootstrap, "nvcc_major", lambda: "13")
    cpu, cuda = bootstrap.build_key(INFO, False), bootstrap.build_key(INFO, True)
    assert cpu.flavour == "cpu" and cuda.flavour == "cuda13"
    assert cpu.name != cuda.name and "-cuda13-" in cuda.name


def test_toolkit_found_behind_a_wrapper_script(tmp_path, monkeypatch):
    """nvcc on PATH may be a wrapper (/usr/local/bin/nvcc): the toolkit is where cuda_runtime.h is."""
    wrapper = tmp_path / "local" / "bin"
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text("#!/bin/sh\nexec /elsewhere/nvcc \"$@\"\n")
    (wrapper / "nvcc").chmod(0o755)
    real = _toolkit(tmp_path / "cuda-13.0")
    monkeypatch.setenv("PATH", str(wrapper))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert bootstrap.cuda_toolkit_root(fallback=str(real)) == real
    monkeypatch.setenv("CUDA_HOME", str(_toolkit(tmp_path / "home")))
    assert bootstrap.cuda_toolkit_root(fallback=str(real)) == tmp_path / "home"
    monkeypatch.delenv("CUDA_HOME")
    with pytest.raises(bootstrap.SetupError, match="no CUDA toolkit found"):
        bootstrap.cuda_toolkit_root(fallback=str(tmp_path / "nothing"))


def test_cuda_libs_from_wheels_get_unversioned_symlinks(tmp_path, monkeypatch):
    """Without cuBLAS in the toolkit, the pinned wheels are installed and linked as libcublas.so etc."""
    site = tmp_path / "site-packages"
    cu13 = site / "nvidia" / "cu13"
    (cu13 / "include").mkdir(parents=True)
    (cu13 / "lib").mkdir()
    (cu13 / "include" / "cublas_v2.h").write_text("")
    for lib in ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10"):
        (cu13 / "lib" / lib).write_text("")
    installed = []
    monkeypatch.setattr(bootstrap, "run", lambda cmd, **kw: installed.append(cmd))
    monkeypatch.setattr(bootstrap, "python_info", lambda py: dict(INFO, purelib=str(site)))
    monkeypatch.delenv("FCNIFY_CUDA_LIBS", raising=False)
    root = _toolkit(tmp_path / "cuda")
    assert not bootstrap.toolkit_has_blas(root)
    dest = bootstrap.ensure_cuda_libs(Path("/venv/bin/python"), tmp_path / "cache", root, "13")
    assert installed and installed[0][-2:] == list(bootstrap.CUDA_WHEELS["13"])
    assert dest == tmp_path / "cache" / "cuda13-libs"
    assert (dest / "lib" / "libcublas.so").resolve() == cu13 / "lib" / "libcublas.so.13"
    assert (dest / "lib" / "libcurand.so").resolve() == cu13 / "lib" / "libcurand.so.10"
    assert (dest / "include" / "cublas_v2.h").is_file()
    # a second run re-points the links without failing on the existing ones
    assert bootstrap.ensure_cuda_libs(Path("/venv/bin/python"), tmp_path / "cache", root, "13") == dest


def test_cuda_libs_folder_can_be_given(tmp_path, monkeypatch):
    """FCNIFY_CUDA_LIBS wins (checked for include/cublas_v2.h and lib/); nothing is installed."""
    given = tmp_path / "given"
    (given / "include").mkdir(parents=True)
    (given / "lib").mkdir()
    monkeypatch.setattr(bootstrap, "run", lambda cmd, **kw: pytest.fail(f"ran {cmd}"))
    monkeypatch.setenv("FCNIFY_CUDA_LIBS", str(given))
    with pytest.raises(bootstrap.SetupError, match="cublas_v2.h"):
        bootstrap.ensure_cuda_libs(Path("/py"), tmp_path, tmp_path, "13")
    (given / "include" / "cublas_v2.h").write_text("")
    assert bootstrap.ensure_cuda_libs(Path("/py"), tmp_path, tmp_path, "13") == given.resolve()


def test_pinned_wheels_are_real_cuda13_packages():
    """The pins name NVIDIA's CUDA 13 cuBLAS (13.x) and cuRAND (10.4.x) wheels."""
    cublas, curand = bootstrap.CUDA_WHEELS["13"]
    assert cublas.startswith("nvidia-cublas==13.") and curand.startswith("nvidia-curand==10.4.")
