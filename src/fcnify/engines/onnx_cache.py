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
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{final.name}.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
                os.replace(tmp, final)
            except BaseException:
                os.unlink(tmp)
                raise
    except OSError:
        pass  # a read-only or full cache: the next run builds the graph again
