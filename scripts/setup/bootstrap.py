#!/usr/bin/env python3
"""Set up fcnify on a Debian 12 machine: system packages, pycaffe, virtualenv.

Caffe is on neither PyPI nor Debian 12, so this script builds it from Debian's
bullseye source package, once per (Caffe version, build flavour, Python
version, numpy major) and caches the result outside the checkout. A second run
finds everything in place and finishes in seconds. A pycaffe the user already
has is re-used instead of building one (FCNIFY_CAFFE=auto, the default).

On a cold machine the two long steps overlap: once numpy is in the new
virtualenv (the build compiles against its headers), Caffe compiles in the
background while pip installs the rest, with numpy pinned so that it stays
the version the build saw. They meet at the final `import caffe` check.

Environment:
  FCNIFY_CAFFE   auto (default: re-use an importable pycaffe, else build),
                 build (always use fcnify's own cached build),
                 existing (require the user's pycaffe; never build).
  FCNIFY_CUDA    1 to build Caffe with CUDA (needs nvcc); default CPU_ONLY.
  FCNIFY_CACHE   cache folder (default: $XDG_CACHE_HOME/fcnify or ~/.cache/fcnify).
  FCNIFY_VENV    virtualenv folder (default: .venv in the checkout).
  FCNIFY_PYTHON  interpreter for a new virtualenv (default: the one running this).
  FCNIFY_EXTRAS  pip extras to install (default: test,torch,onnx,openvino).

Only the standard library is used: this runs before the virtualenv exists.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CAFFE_PACKAGE = "caffe"
CAFFE_VERSION = "1.0.0+git20180821.99bd997-8"
CAFFE_SUITE = "bullseye"
PATCH_DIR = REPO / "scripts" / "setup" / "patches"
CPU_PATCHES = ("protobuf-settotalbyteslimit.patch",)
CUDA_PATCHES = ("cuda13-deviceprop.patch",)
# cuBLAS/cuRAND from NVIDIA's PyPI wheels, per CUDA major version, for toolkits
# without them (the CUDA 13.0 toolkit on these machines has only cudart). Pinned
# to the versions the CUDA build was checked with (scripts/setup/check_cuda_build.sh).
CUDA_WHEELS = {"13": ("nvidia-cublas==13.1.1.3", "nvidia-curand==10.4.0.35")}
CUDA_ARCH_BIN = "80 90"  # A100 (sm_80), H100/H200 (sm_90)
CUDA_ARCH_PTX = "90"
# MARKER_NAME and cache_root() are copies of fcnify.paths' MARKER_NAME and cache_dir(): this
# script runs under the system Python before the virtualenv (and so fcnify) exists, and
# fcnify.paths cannot be imported without its package. tests/test_setup.py checks they agree.
MARKER_NAME = "fcnify-caffe.json"
# CPU builds compile Caffe's sources 8 to a file (CMake's unity build): each
# file parses boost and the 1 MB caffe.pb.h once instead of 8 times (compiler
# CPU time for `make pycaffe`: 166 s vs 437 s user, on a shared machine). The
# library is the same: maps of the digits net and of CaffeNet were
# bit-identical to the one-file-per-source build's. CUDA builds keep one file
# per source (nvcc's .cu files were not tried this way).
UNITY_BUILD = ("-DCMAKE_UNITY_BUILD=ON", "-DCMAKE_UNITY_BUILD_BATCH_SIZE=8")

BUILD_PACKAGES = (
    "build-essential", "cmake", "dpkg-dev", "patch",
    "libboost-system-dev", "libboost-thread-dev", "libboost-filesystem-dev",
    "libboost-python-dev", "libprotobuf-dev", "protobuf-compiler",
    "libgoogle-glog-dev", "libgflags-dev", "libhdf5-dev", "libopenblas-dev",
)
DEBIAN_PYTHON_PACKAGES = ("python3-venv", "python3-dev")


class SetupError(RuntimeError):
    """A set-up step failed; the message says which and what to do."""


def log(msg: str) -> None:
    print(f"[setup] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command, failing with the command line when it fails."""
    proc = subprocess.run(cmd, **kw)
    if proc.returncode != 0:
        raise SetupError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}")
    return proc


# ---------------------------------------------------------------- decisions

@dataclass(frozen=True)
class BuildKey:
    """What a cached Caffe build depends on; a change in any part is a cache miss."""

    caffe_version: str
    flavour: str  # "cpu" or "cuda<major>"
    python: str   # "3.11"
    numpy_major: str

    @property
    def name(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9.]+", "_", self.caffe_version)
        return f"caffe-{safe}-{self.flavour}-py{self.python}-np{self.numpy_major}"


def cache_root(env: dict[str, str] | None = None) -> Path:
    """The cache folder, outside the checkout so clones share one build (fcnify.paths.cache_dir)."""
    env = os.environ if env is None else env
    if env.get("FCNIFY_CACHE"):
        return Path(env["FCNIFY_CACHE"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".cache")
    return Path(base) / "fcnify"


def caffe_mode(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    mode = env.get("FCNIFY_CAFFE", "auto").strip().lower() or "auto"
    if mode not in ("auto", "build", "existing"):
        raise SetupError(f"FCNIFY_CAFFE={mode!r}: expected auto, build or existing")
    return mode


def choose_caffe(mode: str, existing: str | None, cached_ok: bool) -> str:
    """Decide where pycaffe comes from: 'cache' (ours, built or to build) or 'existing'.

    `existing` is the path of a pycaffe importable without fcnify's own build,
    or None. `cached_ok` says fcnify's cached build for this key is complete.
    """
    if mode == "build":
        return "cache"
    if mode == "existing":
        if existing is None:
            raise SetupError("FCNIFY_CAFFE=existing but `import caffe` fails in the virtualenv; "
                             "put your pycaffe on PYTHONPATH or unset FCNIFY_CAFFE")
        return "existing"
    if cached_ok:
        return "cache"
    return "existing" if existing is not None else "cache"


def build_alongside_pip(mode: str, cached_ok: bool, findable: bool) -> bool:
    """Whether to compile Caffe while pip installs the project, before the full virtualenv exists.

    Only when the build is sure to be needed: no complete cached build, and
    no other pycaffe to re-use. Whether the user's pycaffe works can only be
    tried once pip has installed what it imports (six, scikit-image, ...), so
    in auto mode a pycaffe that can merely be found (`findable`) keeps the old
    order: pip first, then the import decides, then a build only if needed.
    """
    if cached_ok or mode == "existing":
        return False
    return mode == "build" or not findable


def parse_mirror(sources: dict[str, str]) -> str:
    """Find the Debian archive URI the machine already uses (never a hard-coded host).

    `sources` maps file names to their text: one-line `deb URI suite ...` files
    and deb822 `.sources` files are both understood. Security and update
    suites are skipped: the source package lives in the main archive.
    """
    candidates: list[tuple[str, list[str]]] = []
    for name, text in sources.items():
        if name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                types = fields.get("types", "").split()
                if "deb" not in types and "deb-src" not in types:
                    continue
                for uri in fields.get("uris", "").split():
                    candidates.append((uri, fields.get("suites", "").split()))
        else:
            for line in text.splitlines():
                line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(line) >= 3 and line[0] in ("deb", "deb-src"):
                    candidates.append((line[1], [line[2]]))
    for uri, suites in candidates:
        if "security" in uri or not uri.startswith(("http://", "https://", "file:", "mirror")):
            continue
        if "/debian" not in uri:
            continue
        if any(s.endswith(("-security", "-updates", "-backports")) for s in suites) and \
                not any(re.fullmatch(r"[a-z]+", s) for s in suites):
            continue
        return uri.rstrip("/")
    raise SetupError("no Debian archive found in /etc/apt/sources.list{,.d}; "
                     "cannot fetch the caffe source package")


def read_apt_sources() -> dict[str, str]:
    out: dict[str, str] = {}
    main = Path("/etc/apt/sources.list")
    if main.is_file():
        out[str(main)] = main.read_text(errors="replace")
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        for p in sorted(parts.iterdir()):
            if p.suffix in (".list", ".sources") and p.is_file():
                out[str(p)] = p.read_text(errors="replace")
    return out


# ---------------------------------------------------------------- steps

def sudo_prefix() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo"]
    raise SetupError("installing Debian packages needs root (or sudo)")


def missing_packages(names: tuple[str, ...]) -> list[str]:
    missing = []
    for name in names:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name],
                              capture_output=True, text=True)
        if "install ok installed" not in proc.stdout:
            missing.append(name)
    return missing


def ensure_packages(names: tuple[str, ...]) -> None:
    missing = missing_packages(names)
    if not missing:
        return
    log(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = sudo_prefix() + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env).returncode != 0:
        run(sudo_prefix() + ["apt-get", "update", "-q"], env=env)
        run(cmd, env=env)


def fetch_source(cache: Path) -> Path:
    """Download and unpack Debian's caffe source package with its patch series applied.

    apt uses a temporary configuration (its own sources list, lists and
    archives folders) pointing at the mirror the machine already uses, so the
    machine's own apt state is not changed.
    """
    upstream = CAFFE_VERSION.rsplit("-", 1)[0]
    dest = cache / "source" / f"caffe-{upstream}"
    stamp = dest / ".fcnify-source-complete"
    if stamp.is_file():
        return dest
    mirror = parse_mirror(read_apt_sources())
    log(f"fetching caffe {CAFFE_VERSION} source ({CAFFE_SUITE}) with a temporary apt configuration")
    (cache / "source").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fcnify-apt-") as tmp:
        t = Path(tmp)
        for sub in ("lists/partial", "archives/partial", "parts", "dl"):
            (t / sub).mkdir(parents=True)
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        signed = f" [signed-by={keyring}]" if Path(keyring).is_file() else ""
        (t / "sources.list").write_text(f"deb-src{signed} {mirror} {CAFFE_SUITE} main\n")
        opts = [f"-oDir::Etc::SourceList={t / 'sources.list'}",
                f"-oDir::Etc::SourceParts={t / 'parts'}",
                f"-oDir::State::Lists={t / 'lists'}",
                f"-oDir::Cache::Archives={t / 'archives'}",
                "-oAPT::Sandbox::User=root", "-q"]
        run(["apt-get", *opts, "update"])
        run(["apt-get", *opts, "source", "--download-only", f"{CAFFE_PACKAGE}={CAFFE_VERSION}"],
            cwd=t / "dl")
        dsc = next((t / "dl").glob("*.dsc"))
        partial = cache / "source" / f".partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        # apt already checked the files against the signed archive index;
        # dpkg-source's own warning about the uploader's key is noise here.
        run(["dpkg-source", "--skip-patches", "-x", str(dsc), str(partial)],
            capture_output=True)
        apply_series(partial)
        keep = cache / "source" / "debian-package"
        keep.mkdir(exist_ok=True)
        for f in (t / "dl").iterdir():
            shutil.copy2(f, keep / f.name)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    stamp.write_text(CAFFE_VERSION + "\n")
    return dest


def patch_files(tree: Path, cuda: bool) -> list[Path]:
    """Debian's series in order, then fcnify's own patches."""
    series = tree / "debian" / "patches" / "series"
    names = [l.split("#", 1)[0].split() for l in series.read_text().splitlines()]
    files = [tree / "debian" / "patches" / n[0] for n in names if n]
    files += [PATCH_DIR / p for p in CPU_PATCHES]
    if cuda:
        files += [PATCH_DIR / p for p in CUDA_PATCHES]
    return files


def apply_series(tree: Path, cuda: bool = False, dry_run: bool = False) -> None:
    for pf in patch_files(tree, cuda):
        cmd = ["patch", "-p1", "-N", "--quiet", "-i", str(pf)]
        if dry_run:
            cmd.insert(1, "--dry-run")
        proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SetupError(f"patch {pf.name} does not apply to {tree}: "
                             f"{(proc.stdout + proc.stderr).strip().splitlines()[-1:]}")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, base_python: str) -> Path:
    py = venv_python(venv)
    if py.exists() and subprocess.run([str(py), "-c", "import sys"]).returncode == 0:
        return py
    if base_python.startswith("/usr/bin/"):
        ensure_packages(DEBIAN_PYTHON_PACKAGES)
    log(f"creating virtualenv {venv} with {base_python}")
    shutil.rmtree(venv, ignore_errors=True)
    run([base_python, "-m", "venv", str(venv)])
    return py


CONSTRAINTS = REPO / "scripts" / "setup" / "constraints.txt"


def project_installed(py: Path, venv: Path, extras: str) -> bool:
    """True when pip already installed this pyproject.toml with these extras (and it imports)."""
    stamp = venv / "fcnify-installed.sha256"
    if not (stamp.is_file() and stamp.read_text().strip() == _project_digest(extras)):
        return False
    return subprocess.run([str(py), "-c", "import fcnify, numpy"], capture_output=True).returncode == 0


def _project_digest(extras: str) -> str:
    pyproject = REPO / "pyproject.toml"
    return hashlib.sha256(pyproject.read_bytes() + extras.encode() + str(REPO).encode()).hexdigest()


def ensure_numpy(py: Path) -> None:
    """numpy alone, first: the Caffe build needs its headers, and nothing else from pip."""
    if subprocess.run([str(py), "-c", "import numpy"], capture_output=True).returncode == 0:
        return
    log("installing numpy into the virtualenv (the Caffe build compiles against it)")
    run([str(py), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), "numpy"])


def pip_install_command(py: Path, extras: str, pins_file: Path | None = None) -> list[str]:
    """pip install -e .[extras] under constraints.txt, and `pins_file` when given."""
    target = f".[{extras}]" if extras else "."
    pinned = ["-c", str(pins_file)] if pins_file else []
    return [str(py), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), *pinned, "-e", target]


def ensure_project(py: Path, venv: Path, extras: str, pins: list[str] | None = None) -> None:
    """pip install -e . with extras, skipped while pyproject.toml is unchanged.

    `pins` are extra constraints: numpy==<the version Caffe is being built
    against>, so that pip cannot swap numpy under a running build.
    """
    if project_installed(py, venv, extras):
        return
    pins = pins or []
    log(f"installing fcnify[{extras}] into {venv}" + (f" (pinned: {' '.join(pins)})" if pins else ""))
    run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    pins_file = venv / "fcnify-pins.txt" if pins else None
    if pins_file:
        pins_file.write_text("".join(f"{p}\n" for p in pins))
    run(pip_install_command(py, extras, pins_file), cwd=REPO)
    (venv / "fcnify-installed.sha256").write_text(_project_digest(extras) + "\n")


def python_info(py: Path) -> dict:
    code = ("import json, sys, sysconfig, numpy;"
            "print(json.dumps({'version': '%d.%d' % sys.version_info[:2],"
            "'numpy': numpy.__version__, 'include': sysconfig.get_paths()['include'],"
            "'libdir': sysconfig.get_config_var('LIBDIR'),"
            "'ldlibrary': sysconfig.get_config_var('LDLIBRARY'),"
            "'purelib': sysconfig.get_paths()['purelib'],"
            "'numpy_include': numpy.get_include()}))")
    out = run([str(py), "-c", code], capture_output=True, text=True).stdout
    return json.loads(out)


@contextmanager
def _without(pth: Path):
    """fcnify's own .pth moved aside for the duration, so its build never counts as the user's."""
    hidden = pth.with_suffix(".pth.off")
    moved = False
    if pth.exists():
        pth.rename(hidden)
        moved = True
    try:
        yield
    finally:
        if moved:
            hidden.rename(pth)


def _caffe_probe(py: Path, pth: Path, code: str) -> str | None:
    with _without(pth):
        proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd="/",
                              env=dict(os.environ, GLOG_minloglevel="2"))
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def find_existing_pycaffe(py: Path, pth: Path) -> str | None:
    """Path of a pycaffe the interpreter imports without fcnify's own .pth, or None."""
    return _caffe_probe(py, pth, "import caffe, sys; sys.stdout.write(caffe.__file__)")


def findable_pycaffe(py: Path, pth: Path) -> str | None:
    """Where a `caffe` package would be imported from (without importing it), or None.

    Works before pip has installed what pycaffe imports, so it can tell early
    that no user pycaffe exists and the build may start at once.
    """
    return _caffe_probe(py, pth, "import importlib.util, sys; s = importlib.util.find_spec('caffe'); "
                                 "sys.stdout.write(s.origin or '' if s else '')")


def build_key(info: dict, cuda: bool) -> BuildKey:
    flavour = "cpu"
    if cuda:
        flavour = f"cuda{nvcc_major() or 'x'}"
    return BuildKey(CAFFE_VERSION, flavour, info["version"], info["numpy"].split(".")[0])


def nvcc_major() -> str | None:
    nvcc = shutil.which("nvcc") or (os.path.isfile("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
    if not nvcc:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.", out)
    return m.group(1) if m else None


def cmake_args(info: dict, py: Path, cuda: bool, cuda_libs: Path | None = None) -> list[str]:
    libpython = str(Path(info["libdir"]) / info["ldlibrary"])
    args = ["-DCMAKE_BUILD_TYPE=Release", "-DUSE_OPENCV=OFF", "-DUSE_LEVELDB=OFF",
            "-DUSE_LMDB=OFF", "-DBLAS=Open", "-Dpython_version=3", "-DBUILD_docs=OFF",
            f"-DPYTHON_EXECUTABLE={py}", f"-DPYTHON_INCLUDE_DIR={info['include']}",
            f"-DPYTHON_LIBRARY={libpython}", f"-DNUMPY_INCLUDE_DIR={info['numpy_include']}"]
    if not cuda:
        return args + ["-DCPU_ONLY=ON", *UNITY_BUILD]
    return args + cuda_cmake_args(cuda_toolkit_root(), cuda_libs)


def cuda_toolkit_root(fallback: str = "/usr/local/cuda") -> Path:
    """The toolkit folder (bin/nvcc and include/cuda_runtime.h side by side).

    `nvcc` on PATH may be a wrapper script (/usr/local/bin/nvcc on these
    machines execs /usr/local/cuda-13.0/bin/nvcc), so its parent is not the
    toolkit: CUDA_HOME, CUDA_PATH, nvcc's resolved folder and /usr/local/cuda
    are tried in that order.
    """
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None, fallback]
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").is_file() and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c).resolve()
    raise SetupError("FCNIFY_CUDA=1 but no CUDA toolkit found (bin/nvcc with include/cuda_runtime.h) "
                     "in CUDA_HOME, CUDA_PATH, next to nvcc or in /usr/local/cuda")


def cuda_cmake_args(root: Path, cuda_libs: Path | None = None) -> list[str]:
    """CUDA flags: cuDNN/NCCL off, sm_80 and sm_90 (+ PTX), cuBLAS/cuRAND from `cuda_libs`.

    `cuda_libs` is a folder with include/ and lib/ (see ensure_cuda_libs) when
    the toolkit lacks cuBLAS/cuRAND; the libraries are also put on the rpath,
    so pycaffe finds them at run time without LD_LIBRARY_PATH.
    """
    args = ["-DCPU_ONLY=OFF", "-DUSE_CUDNN=OFF", "-DUSE_NCCL=OFF", "-DCUDA_ARCH_NAME=Manual",
            f"-DCUDA_ARCH_BIN={CUDA_ARCH_BIN}", f"-DCUDA_ARCH_PTX={CUDA_ARCH_PTX}",
            f"-DCUDA_TOOLKIT_ROOT_DIR={root}"]
    if cuda_libs:
        args += [f"-DCMAKE_LIBRARY_PATH={cuda_libs}/lib",
                 f"-DCMAKE_CXX_FLAGS=-I{cuda_libs}/include",
                 f"-DCUDA_NVCC_FLAGS=-I{cuda_libs}/include",
                 f"-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath,{cuda_libs}/lib",
                 f"-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath,{cuda_libs}/lib",
                 f"-DCMAKE_MODULE_LINKER_FLAGS=-Wl,-rpath,{cuda_libs}/lib"]
    return args


def toolkit_has_blas(root: Path) -> bool:
    """True when the toolkit itself has cuBLAS and cuRAND headers and libraries."""
    libs = [root / "lib64", root / "lib"]
    return (all((root / "include" / h).is_file() for h in ("cublas_v2.h", "curand.h"))
            and all(any(d.glob(f"lib{n}.so") for d in libs if d.is_dir()) for n in ("cublas", "curand")))


def ensure_cuda_libs(py: Path, cache: Path, root: Path, major: str) -> Path | None:
    """cuBLAS/cuRAND for the CUDA build: FCNIFY_CUDA_LIBS, the toolkit's own, or NVIDIA's wheels.

    Returns a folder with include/ and lib/ for cmake, or None when the toolkit
    has them. The wheels are installed into the virtualenv (site-packages/
    nvidia/cu<major>/); they ship only versioned libraries (libcublas.so.13),
    so the linker's plain libcublas.so/libcurand.so are symlinks in
    <cache>/cuda<major>-libs/, which the build also uses as its rpath. The
    links are re-pointed at this virtualenv's wheels on every set-up run.
    """
    given = os.environ.get("FCNIFY_CUDA_LIBS")
    if given:
        folder = Path(given).expanduser().resolve()
        if not (folder / "include" / "cublas_v2.h").is_file() or not (folder / "lib").is_dir():
            raise SetupError(f"FCNIFY_CUDA_LIBS={given}: expected include/cublas_v2.h and lib/ in it")
        return folder
    if toolkit_has_blas(root):
        return None
    wheels = CUDA_WHEELS.get(major)
    if wheels is None:
        raise SetupError(f"the CUDA {major} toolkit at {root} has no cuBLAS/cuRAND and fcnify knows "
                         "no wheels for it; set FCNIFY_CUDA_LIBS to a folder with include/ and lib/")
    log(f"installing {' '.join(wheels)} into the virtualenv (cuBLAS/cuRAND for CUDA {major})")
    run([str(py), "-m", "pip", "install", "-q", *wheels])
    site = Path(python_info(py)["purelib"]) / "nvidia" / f"cu{major}"
    if not (site / "include" / "cublas_v2.h").is_file():
        raise SetupError(f"{' '.join(wheels)} installed, but {site}/include/cublas_v2.h is missing")
    dest = cache / f"cuda{major}-libs"
    (dest / "lib").mkdir(parents=True, exist_ok=True)
    _symlink(site / "include", dest / "include")
    for lib in sorted((site / "lib").glob("lib*.so.*")):
        _symlink(lib, dest / "lib" / lib.name)
        _symlink(lib, dest / "lib" / (lib.name.split(".so")[0] + ".so"))
    for name in ("cublas", "curand"):
        if not (dest / "lib" / f"lib{name}.so").exists():
            raise SetupError(f"lib{name}.so.* not found in {site}/lib after installing the wheels")
    return dest


def _symlink(target: Path, link: Path) -> None:
    """Point `link` at `target`, replacing what was there in one step."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def build_caffe(cache: Path, source: Path, key: BuildKey, info: dict, py: Path, cuda: bool,
                cuda_libs: Path | None = None) -> Path:
    """Build pycaffe for `key` in its own copy of the source; return its python/ folder."""
    tree = cache / key.name
    done = tree / ".fcnify-build-complete"
    if done.is_file() and (tree / "python" / "caffe" / "_caffe.so").exists():
        return tree / "python"
    t0 = time.monotonic()
    log(f"building pycaffe ({key.name}); about 170 s of compiler CPU time (2 cores share it)")
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(source, tree, symlinks=True,
                    ignore=shutil.ignore_patterns(".fcnify-source-complete"))
    if cuda:
        for pf in CUDA_PATCHES:
            run(["patch", "-p1", "-N", "--quiet", "-i", str(PATCH_DIR / pf)], cwd=tree)
    build = tree / "build"
    build.mkdir()
    jobs = str(os.cpu_count() or 2)
    logfile = tree / "build.log"
    with open(logfile, "w") as logf:
        for cmd in (["cmake", *cmake_args(info, py, cuda, cuda_libs), ".."], ["make", f"-j{jobs}", "pycaffe"]):
            logf.write(f"$ {' '.join(cmd)}\n")
            logf.flush()
            if subprocess.run(cmd, cwd=build, stdout=logf, stderr=subprocess.STDOUT).returncode != 0:
                tail = logfile.read_text(errors="replace").splitlines()[-25:]
                print("\n".join(tail), file=sys.stderr)
                raise SetupError(f"{cmd[0]} failed building Caffe; full log: {logfile}")
    if not (tree / "python" / "caffe" / "_caffe.so").exists():
        raise SetupError(f"build finished but {tree}/python/caffe/_caffe.so is missing")
    done.write_text(json.dumps({"key": key.name, "seconds": round(time.monotonic() - t0)}) + "\n")
    log(f"built pycaffe in {time.monotonic() - t0:.0f} s")
    return tree / "python"


def generate_descriptor(cache: Path, source: Path) -> Path:
    """protoc caffe.proto into a binary FileDescriptorSet (caffe.desc).

    fcnify builds its message classes from it in a private descriptor pool, so
    it needs no pycaffe (the torch engine runs without one) and cannot clash
    with pycaffe's own caffe_pb2, which registers the same names in the
    default pool when `import caffe` runs in the same process.
    """
    proto = source / "src" / "caffe" / "proto" / "caffe.proto"
    digest = hashlib.sha256(proto.read_bytes()).hexdigest()[:12]
    out = cache / "proto" / digest
    target = out / "caffe.desc"
    if not target.is_file():
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".caffe.desc.{os.getpid()}"
        run(["protoc", f"--proto_path={proto.parent}", f"--descriptor_set_out={tmp}", str(proto)])
        tmp.rename(target)
    shutil.copy2(proto, out / "caffe.proto")
    return target


def write_marker(venv: Path, data: dict) -> None:
    (venv / MARKER_NAME).write_text(json.dumps(data, indent=2) + "\n")


def setup(args: argparse.Namespace) -> dict:
    cuda = os.environ.get("FCNIFY_CUDA", "0") not in ("", "0", "no", "false")
    mode = caffe_mode()
    cache = cache_root()
    venv = Path(os.environ.get("FCNIFY_VENV", REPO / ".venv")).resolve()
    base_python = os.environ.get("FCNIFY_PYTHON", sys.executable)
    extras = os.environ.get("FCNIFY_EXTRAS", "test,torch,onnx,openvino")

    packages = BUILD_PACKAGES
    if cuda and not nvcc_major():
        raise SetupError("FCNIFY_CUDA=1 but no nvcc found (PATH or /usr/local/cuda); "
                         "install a CUDA toolkit or unset FCNIFY_CUDA")
    timed = Timer()
    timed("apt", ensure_packages, packages)
    source = timed("caffe source", fetch_source, cache)
    descriptor = generate_descriptor(cache, source)
    py = ensure_venv(venv, base_python)
    timed("numpy", ensure_numpy, py)
    info = python_info(py)
    pth = Path(info["purelib"]) / "fcnify-caffe.pth"
    key = build_key(info, cuda)
    cached_ok = (cache / key.name / ".fcnify-build-complete").is_file()
    cuda_libs = ensure_cuda_libs(py, cache, cuda_toolkit_root(), nvcc_major() or "") if cuda else None
    findable = mode != "build" and not cached_ok and findable_pycaffe(py, pth) is not None
    if not project_installed(py, venv, extras) and build_alongside_pip(mode, cached_ok, findable):
        log("compiling Caffe while pip installs the rest")
        pins = [f"numpy=={info['numpy']}"]
        overlap(lambda: timed("pycaffe build", build_caffe, cache, source, key, info, py, cuda, cuda_libs),
                lambda: timed("pip", ensure_project, py, venv, extras, pins))
    else:
        timed("pip", ensure_project, py, venv, extras)
    info = python_info(py)  # pip may have changed numpy when nothing was pinned: the key follows it
    key = build_key(info, cuda)
    cached_ok = (cache / key.name / ".fcnify-build-complete").is_file()
    existing = None if mode == "build" else find_existing_pycaffe(py, pth)
    choice = choose_caffe(mode, existing, cached_ok)
    if choice == "existing":
        pth.unlink(missing_ok=True)
        pycaffe = str(Path(existing).parent.parent) if existing else None
        log(f"re-using the existing pycaffe at {existing} (FCNIFY_CAFFE=build to build fcnify's own)")
    else:
        python_dir = timed("pycaffe build", build_caffe, cache, source, key, info, py, cuda, cuda_libs)
        pth.write_text(str(python_dir) + "\n")
        pycaffe = str(python_dir)
    marker = {"mode": choice, "key": key.name, "pycaffe": pycaffe,
              "caffe_source": str(source), "caffe_descriptor": str(descriptor), "cache": str(cache),
              "cuda_libs": str(cuda_libs) if cuda_libs else None}
    code = ("import caffe, json, sys; sys.stdout.write(json.dumps({'version': getattr(caffe, "
            "'__version__', 'unknown'), 'layer_types': sorted(caffe.layer_type_list())}))")
    check = subprocess.run([str(py), "-c", code], cwd="/", capture_output=True, text=True,
                           env=dict(os.environ, GLOG_minloglevel="2"))
    if check.returncode != 0:
        raise SetupError(f"`import caffe` fails after set-up: {check.stderr.strip().splitlines()[-1:]}")
    caffe_info = json.loads(check.stdout)
    marker.update(caffe_version=caffe_info["version"], layer_types=caffe_info["layer_types"])
    write_marker(venv, marker)
    if timed.seconds:
        log("time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in timed.seconds.items()))
    return marker


class Timer:
    """Calls a step and adds its wall time under a name (steps may run in two threads)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args):
        t0 = time.monotonic()
        try:
            return fn(*args)
        finally:
            spent = time.monotonic() - t0
            if spent >= 1.0:
                self.seconds[name] = self.seconds.get(name, 0.0) + spent


def overlap(build, install):
    """Run `build` in a thread while `install` runs here; return build's result.

    Both wait on subprocesses (make, pip), so a thread is enough. If pip fails,
    the build is still let finish: it is cached, and the next run needs it.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        built = pool.submit(build)
        try:
            install()
        except BaseException:
            if not built.done():
                log("pip failed; waiting for the Caffe build to finish (it is cached for the next run)")
            raise
        return built.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-key", action="store_true",
                        help="print the cache key for the virtualenv's interpreter and exit")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        if args.print_key:
            venv = Path(os.environ.get("FCNIFY_VENV", REPO / ".venv"))
            cuda = os.environ.get("FCNIFY_CUDA", "0") not in ("", "0", "no", "false")
            print(build_key(python_info(venv_python(venv)), cuda).name)
            return 0
        marker = setup(args)
    except SetupError as exc:
        print(f"setup: error: {exc}", file=sys.stderr)
        return 2
    log(f"ready in {time.monotonic() - t0:.1f} s: pycaffe from {marker['mode']} ({marker['pycaffe']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
