"""Where fcnify's installed pieces live: Caffe's source tree, caffe.proto, models.

The set-up step (scripts/setup.sh) records what it built in a small JSON file
inside the virtualenv; everything here reads that record, and each answer can
be overridden by an environment variable for installations made by hand.
"""
from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from pathlib import Path

from .errors import SetupError

MARKER_NAME = "fcnify-caffe.json"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@lru_cache(maxsize=None)
def setup_record() -> dict:
    """The set-up step's record for this interpreter's virtualenv ({} if none)."""
    override = os.environ.get("FCNIFY_SETUP_RECORD")
    path = Path(override) if override else Path(sys.prefix) / MARKER_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _recorded(env: str, key: str, what: str) -> Path:
    value = os.environ.get(env) or setup_record().get(key)
    if not value:
        raise SetupError(f"{what} is unknown: run scripts/setup.sh, or set {env}")
    path = Path(value)
    if not path.exists():
        raise SetupError(f"{what} {path} is missing: run scripts/setup.sh, or set {env}")
    return path


def caffe_source() -> Path:
    """Caffe's source tree (models/, examples/, python/caffe/imagenet/), fetched by set-up."""
    return _recorded("FCNIFY_CAFFE_SOURCE", "caffe_source", "Caffe's source tree")


def caffe_descriptor() -> Path:
    """caffe.proto compiled by protoc into a FileDescriptorSet at set-up."""
    return _recorded("FCNIFY_CAFFE_DESCRIPTOR", "caffe_descriptor", "the compiled caffe.proto")


def cache_dir() -> Path:
    """fcnify's cache folder (Caffe builds, sources), outside any checkout."""
    if os.environ.get("FCNIFY_CACHE"):
        return Path(os.environ["FCNIFY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fcnify"


def models_dir() -> Path:
    """Where `fcnify fetch` puts downloaded weights and `convert` looks for them.

    $FCNIFY_MODELS, else $XDG_DATA_HOME/fcnify/models (~/.local/share/fcnify/models).
    """
    if os.environ.get("FCNIFY_MODELS"):
        return Path(os.environ["FCNIFY_MODELS"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fcnify" / "models"


def prototxt_dir() -> Path:
    """fcnify's own shipped nets (prototxt/ in the checkout)."""
    for candidate in (os.environ.get("FCNIFY_PROTOTXT"), REPO_ROOT / "prototxt",
                      Path(sys.prefix) / "share" / "fcnify" / "prototxt"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise SetupError("fcnify's prototxt/ folder is missing; set FCNIFY_PROTOTXT")


def data_file(name: str) -> Path:
    """A data file shipped inside the package (labels)."""
    return Path(__file__).resolve().parent / "data" / name
