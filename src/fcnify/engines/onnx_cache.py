"""The onnx engine's graphs, kept between runs: a net loads without importing (or running) onnx.

Building the ONNX graph of a net needs the onnx package, whose import alone
costs ~0.7 s of CPU (its ml_dtypes extension) — a third of a one-image
classify-map. With the weights as external initializers (onnx_export's
`external=True`) the graph holds no weight values: it is a function of the
net definition, the outputs asked for and the exporting code only. So it is
stored once under the cache folder, named by a digest of exactly those, and
read back as bytes; ONNX Runtime gets the same graph and the same arrays as
when it is built afresh. A cache that cannot be read or written is passed
over silently: the graph is then built as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from ..paths import cache_dir
from ..version import __version__

Built = tuple[bytes, list[str]]  # the serialized graph, its external initializers' names in order


def graph_key(net, outputs: tuple[str, ...]) -> str:
    """The digest of what the graph depends on: the net, the outputs, fcnify's exporting code."""
    from importlib.metadata import PackageNotFoundError, version
    from . import onnx_export
    try:
        onnx_version = version("onnx")  # helper.make_model's defaults are the package's
    except PackageNotFoundError:
        onnx_version = "none"
    h = hashlib.sha256()
    h.update(f"{__version__} onnx {onnx_version}".encode())
    h.update(Path(onnx_export.__file__).read_bytes())
    h.update(net.SerializeToString(deterministic=True))
    h.update(json.dumps(list(outputs)).encode())
    return h.hexdigest()[:32]


def cached_graph(net, outputs: tuple[str, ...], build: Callable[[], Built]) -> Built:
    """The graph of `net` with `outputs`: from the cache when it is there, else `build()`, stored."""
    folder = cache_dir() / "onnx-graphs"
    key = graph_key(net, outputs)
    graph, names = folder / f"{key}.onnx", folder / f"{key}.json"
    try:
        return graph.read_bytes(), json.loads(names.read_text())
    except (OSError, ValueError):
        pass
    data, initializers = build()
    _store(folder, graph, data, names, json.dumps(initializers).encode())
    return data, initializers


def _store(folder: Path, graph: Path, data: bytes, names: Path, listed: bytes) -> None:
    """Write both files by rename (names last, so a reader never sees one without the other)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for final, content in ((graph, data), (names, listed)):
            _write_atomic(final, content)
    except OSError:
        pass  # a read-only or full cache: the next run builds the graph again


def _write_atomic(final: Path, content: bytes) -> None:
    """Write `final` through a temporary file in its folder and a rename: whole or not at all."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, final)
    except BaseException:
        os.unlink(tmp)
        raise


# ------------------------------------------------------------------ optimized sessions
#
# Building a session optimizes the graph (constant folding, fusions, the CPU's NCHWc
# layouts): about 1.5 s of a one-image classify-map on CaffeNet. ONNX Runtime can write
# the optimized model out (SessionOptions.optimized_model_filepath), its weights in a
# file beside it that a later session maps instead of reading (0.01 s to start, and the
# caffemodel is not read at all). The entry depends on the graph (graph_key), the weights
# file, ONNX Runtime's version, the session options and the CPU (NCHWc blocks follow its
# SIMD width), so all of those name it.
#
# An entry is a folder KEY/ with model.onnx, weights.bin and meta.json, written under a
# temporary name and renamed into place whole. meta.json holds the SHA-256 of model.onnx
# (a few kB), and weights.bin's size, mtime and inode with SHA-256 digests of 16 spread
# 64 KiB samples of it: a truncated, replaced or overwritten entry is found and rebuilt,
# at a cost of 1 MiB read, where a full digest of 244 MB (CaffeNet) costs 0.25-0.35 s, as
# much as the cache saves. The weights are known the same way, by their path, size, mtime
# and inode (weights_identity), not by a digest of their bytes.

SESSIONS = "onnx-sessions"
MODEL, WEIGHTS, META = "model.onnx", "weights.bin", "meta.json"
SAMPLES, SAMPLE_BYTES = 16, 64 << 10
STALE_SECONDS = 3600  # a temporary entry older than this was left by a killed run
# Entries are kept up to this many bytes in all, the least recently used removed first: a
# CaffeNet entry is 244 MB, and every new weights file (a conversion run again) is a new one.
SESSIONS_BYTES = int(os.environ.get("FCNIFY_ORT_SESSION_CACHE_BYTES", 2 << 30))


def weights_identity(weights: Path | None) -> list:
    """What tells a weights file from its replacement without reading it: path, size, mtime, inode."""
    if weights is None:
        return []
    st = Path(weights).stat()
    return [str(Path(weights).resolve()), st.st_size, st.st_mtime_ns, st.st_ino]


def session_key(graph: str, weights: Path | None, runtime: str, options: dict) -> str:
    """The name of an optimized session entry: its graph, weights, runtime, options and CPU."""
    from .cpu import _cpuinfo_flags
    h = hashlib.sha256()
    h.update(json.dumps({"graph": graph, "weights": weights_identity(weights), "runtime": runtime,
                         "options": options, "cpu": sorted(_cpuinfo_flags())}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def session_entry(key: str) -> Path:
    return cache_dir() / SESSIONS / key


def _fingerprint(entry: Path) -> dict:
    """meta.json's content for the files now in `entry` (module comment)."""
    graph = (entry / MODEL).read_bytes()
    weights = entry / WEIGHTS
    st = weights.stat()
    samples = hashlib.sha256()
    with open(weights, "rb") as f:
        for i in range(SAMPLES):
            f.seek(max(0, st.st_size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            samples.update(f.read(SAMPLE_BYTES))
    return {"model_sha256": hashlib.sha256(graph).hexdigest(), "weights_size": st.st_size,
            "weights_mtime_ns": st.st_mtime_ns, "weights_ino": st.st_ino,
            "weights_samples_sha256": samples.hexdigest()}


def read_session(key: str) -> Path | None:
    """The optimized model file stored under `key`, or None when there is none or it does not
    match its meta.json (then the entry is removed, to be built again)."""
    entry = session_entry(key)
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        if entry.exists():
            drop_session(key)
        return None
    try:
        good = meta == _fingerprint(entry)
    except OSError:
        good = False
    if not good:
        drop_session(key)
        return None
    try:
        os.utime(entry / META)  # used now: the last to be evicted (_evict)
    except OSError:
        pass
    return entry / MODEL


def drop_session(key: str) -> None:
    """Remove a session entry (damaged, or one ONNX Runtime refused)."""
    import shutil
    shutil.rmtree(session_entry(key), ignore_errors=True)


def session_target(key: str) -> Path | None:
    """A temporary folder beside the entry for ONNX Runtime to write the optimized model into
    (None when the cache cannot be written); `commit_session` renames it into place."""
    folder = cache_dir() / SESSIONS
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _sweep(folder)
        return Path(tempfile.mkdtemp(dir=folder, prefix=f".{key}.", suffix=".tmp"))
    except OSError:
        return None


def session_options(options, target: Path) -> None:
    """Ask ONNX Runtime (SessionOptions `options`) to write the optimized model into `target`."""
    options.optimized_model_filepath = str(target / MODEL)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     "1024")


def commit_session(key: str, target: Path) -> None:
    """Put what ONNX Runtime wrote into `target` in place as the entry `key`, meta.json written
    last and the folder renamed whole; the temporary folder is gone on every path."""
    import shutil
    try:
        _write_atomic(target / META, json.dumps(_fingerprint(target)).encode())
        os.rename(target, session_entry(key))  # fails when another run put it there first
        _evict(target.parent, keep=key)
    except OSError:
        pass
    finally:
        shutil.rmtree(target, ignore_errors=True)


def _evict(folder: Path, keep: str, limit: int | None = None) -> None:
    """Remove the least recently used entries (meta.json's mtime) until they hold `limit` bytes
    (SESSIONS_BYTES) or fewer; the entry `keep` stays whatever its size."""
    limit = SESSIONS_BYTES if limit is None else limit
    entries = []
    for entry in folder.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            size = sum(f.stat().st_size for f in entry.iterdir())
            used = (entry / META).stat().st_mtime
        except OSError:
            continue
        entries.append((entry.name == keep, used, size, entry))
    total = sum(size for _, _, size, _ in entries)
    for kept, _, size, entry in sorted(entries, key=lambda e: (e[0], e[1])):
        if total <= limit or kept:
            break
        drop_session(entry.name)
        total -= size


def _sweep(folder: Path) -> None:
    """Remove temporary entries that a killed run left (older than STALE_SECONDS)."""
    import shutil
    import time
    for tmp in folder.glob(".*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
