"""`fcnify doctor`: what is installed, where, and what to run when something is missing."""
from __future__ import annotations

import platform
import sys

from .version import __version__
from .errors import FcnifyError
from .paths import cache_dir, caffe_descriptor, caffe_source, models_dir, setup_record


def diagnose(*, verbose: bool = False) -> tuple[bool, list[str]]:
    """(healthy, report lines). Unhealthy when pycaffe is missing or does not import."""
    from .engines.caffe_engine import caffe_build
    from .engines.sandbox import Sandbox
    lines = [f"fcnify {__version__}", f"python {platform.python_version()} ({sys.executable})"]
    record = setup_record()
    ok = True
    try:
        build = caffe_build()
    except FcnifyError as exc:
        return False, lines + [f"pycaffe: MISSING — {exc.message}"]
    box = Sandbox(verbose)
    try:
        info = box.call("info", context="importing pycaffe")
    except FcnifyError as exc:
        return False, lines + [f"pycaffe: BROKEN at {build.pycaffe} — {exc.message}; "
                               "run scripts/setup.sh (FCNIFY_CAFFE=build rebuilds fcnify's own)"]
    finally:
        box.close()
    lines.append(f"pycaffe: {build.pycaffe} ({record.get('mode', 'found on sys.path')}"
                 + (f", build {record['key']}" if record.get("key") else "") + ")")
    lines.append(f"caffe version: {info['version']}, {len(info['layer_types'])} layer types")
    lines.append(f"build: {'CUDA' if build.cuda else 'CPU-only'}, BLAS: {build.blas}")
    for label, fn in (("caffe source", caffe_source), ("caffe.proto (compiled)", caffe_descriptor)):
        try:
            lines.append(f"{label}: {fn()}")
        except FcnifyError as exc:
            ok = False
            lines.append(f"{label}: MISSING — {exc.message}")
    lines.append(f"cache: {record.get('cache', cache_dir())}")
    lines.append(f"models folder (fcnify fetch): {models_dir()}")
    lines.append("status: OK" if ok else "status: incomplete — run scripts/setup.sh")
    return ok, lines
