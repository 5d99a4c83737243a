"""Download official Caffe weights, resumably, and keep only files whose SHA-1 is right.

Each model's URL and checksum come from the front matter of its readme in
Caffe's own source tree, so fcnify hard-codes no host that may move. Bytes go
to `<dest>.part` first and are renamed to `dest` only once the checksum
matches, so a half-written or corrupt download is never mistaken for weights.
A dropped connection resumes from the .part with an HTTP Range request.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import BinaryIO
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from .. import paths
from ..errors import DownloadError, FetchError, InputError, OutputError

# progress(bytes_done, total_bytes_or_None), called as bytes arrive.
Progress = Callable[[int, int | None], None]

# fcnify's short names for the models under Caffe's models/ folder.
MODELS: dict[str, str] = {
    "caffenet": "bvlc_reference_caffenet",
    "alexnet": "bvlc_alexnet",
    "googlenet": "bvlc_googlenet",
    "rcnn": "bvlc_reference_rcnn_ilsvrc13",
    "flickr": "finetune_flickr_style",
}
REQUIRED_KEYS = ("caffemodel", "caffemodel_url", "sha1")
CHUNK = 1 << 16
# Seconds to wait before retry n is n * RETRY_PAUSE_S; tests set it to 0.
RETRY_PAUSE_S = 1.0


@dataclass(frozen=True)
class WeightsDownload:
    """Where one official model's weights live and the SHA-1 they must have."""

    name: str
    folder: str
    filename: str
    url: str
    sha1: str


def model_spec(name: str, caffe_root: Path | None = None) -> WeightsDownload:
    """The download facts for `name`, read from Caffe's readme rather than copied into fcnify."""
    folder = MODELS.get(name)
    if folder is None:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    root = Path(caffe_root) if caffe_root is not None else paths.caffe_source()
    readme = root / "models" / folder / "readme.md"
    fields = _front_matter(readme)
    missing = [key for key in REQUIRED_KEYS if not fields.get(key)]
    if missing:
        raise FetchError(f"front matter has no {', '.join(missing)}", path=readme)
    filename, sha1 = fields["caffemodel"], fields["sha1"].lower()
    if Path(filename).name != filename or filename in (".", ".."):
        raise FetchError(f"caffemodel {filename!r} is not a plain file name", path=readme)
    if len(sha1) != 40 or any(c not in "0123456789abcdef" for c in sha1):
        raise FetchError(f"sha1 {fields['sha1']!r} is not 40 hex digits", path=readme)
    return WeightsDownload(name, folder, filename, fields["caffemodel_url"], sha1)


def _front_matter(readme: Path) -> dict[str, str]:
    """The `key: value` lines between a readme's first two `---` lines (Jekyll style)."""
    try:
        lines = readme.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise FetchError(f"cannot read the model's readme ({reason})", path=readme) from e
    fences = [i for i, line in enumerate(lines) if line.strip() == "---"][:2]
    if len(fences) < 2 or any(line.strip() for line in lines[:fences[0]]):
        raise FetchError("no front matter (key: value lines between two '---' lines)", path=readme)
    fields: dict[str, str] = {}
    for line in lines[fences[0] + 1:fences[1]]:
        key, sep, value = line.partition(":")
        if sep and key.strip():
            fields[key.strip()] = value.strip().strip("'\"")
    return fields


def fetch(name: str, dest_dir: Path | None = None, progress: Progress | None = None,
          caffe_root: Path | None = None) -> Path:
    """Download one official model's weights to where `convert` looks for them."""
    spec = model_spec(name, caffe_root)
    folder = Path(dest_dir) if dest_dir is not None else paths.models_dir() / spec.folder
    return download(spec.url, folder / spec.filename, spec.sha1, progress=progress)


def download(url: str, dest: Path, sha1: str, progress: Progress | None = None,
             retries: int = 2, timeout: float = 30) -> Path:
    """Put `url` at `dest` only if its SHA-1 matches, resuming any earlier partial download.

    A resumed file that fails its checksum may hold stale or corrupt bytes, so
    it is thrown away and downloaded once more from zero before giving up.
    """
    dest, expected = Path(dest), sha1.lower()
    if dest.is_file() and _sha1_of(dest) == expected:
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder ({e.strerror or e})", path=dest.parent) from e
    got = ""
    for _ in range(2):
        _transfer_with_retries(url, part, progress, retries, timeout)
        got = _sha1_of(part)
        if got == expected:
            try:
                os.replace(part, dest)
            except OSError as e:
                raise OutputError(f"cannot move the download into place ({e.strerror or e})",
                                  path=dest) from e
            return dest
        part.unlink(missing_ok=True)
    raise FetchError(f"checksum mismatch for {url}: expected sha1 {expected}, got {got}",
                     path=dest)


def _transfer_with_retries(url: str, part: Path, progress: Progress | None,
                           retries: int, timeout: float) -> None:
    """Run `_transfer` to completion, keeping the .part between tries so each one resumes."""
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(RETRY_PAUSE_S * attempt)
        try:
            _transfer(url, part, progress, timeout)
            return
        except (URLError, HTTPException, OSError) as e:  # HTTPError is turned into FetchError
            last = e
    host = urlsplit(url).hostname or url
    raise DownloadError(f"cannot reach {host} ({_one_line(last)}): are you offline? "
                     f"Download {url} by hand into {part.parent}") from last


def _transfer(url: str, part: Path, progress: Progress | None, timeout: float) -> None:
    """One request: append the rest of `url` to `part`, or restart it if the server won't resume.

    Raises OSError/URLError/HTTPException when the connection fails or ends early.
    """
    start = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        e.close()
        if e.code == 416 and start:
            return  # nothing beyond what the .part holds; the checksum judges it
        raise DownloadError(f"HTTP {e.code} ({e.reason}) from {url}") from e
    except ValueError as e:
        raise FetchError(f"cannot download {url!r} ({e})") from e
    with response:
        if start and response.status != 206:
            start = 0  # the server sent the whole file: start the .part over
        elif start and not _range_start_is(response, start):
            part.unlink(missing_ok=True)
            raise ConnectionError("the server answered with the wrong byte range")
        total = _total_size(response, start)
        done = _copy(response, part, start, total, progress)
    if total is not None and done < total:
        raise ConnectionError(f"connection closed after {done} of {total} bytes")


def _copy(response: HTTPResponse, part: Path, start: int, total: int | None,
          progress: Progress | None) -> int:
    """Stream the body into `part` (appending after `start` bytes); return the bytes held."""
    done = start
    try:
        out: BinaryIO = open(part, "ab" if start else "wb")
    except OSError as e:
        raise OutputError(f"cannot write ({e.strerror or e})", path=part) from e
    with out:
        if progress:
            progress(done, total)
        while chunk := response.read(CHUNK):
            try:
                out.write(chunk)
            except OSError as e:  # a full disk is not a network problem: do not retry it
                raise OutputError(f"cannot write ({e.strerror or e})", path=part) from e
            done += len(chunk)
            if progress:
                progress(done, total)
    return done


def _range_start_is(response: HTTPResponse, start: int) -> bool:
    """Whether a 206 answer's Content-Range begins where the .part ends."""
    return (response.headers.get("Content-Range") or "").strip().startswith(f"bytes {start}-")


def _total_size(response: HTTPResponse, start: int) -> int | None:
    """The full file's size in bytes, from Content-Range or Content-Length (None if unsaid)."""
    if response.status == 206:
        total = (response.headers.get("Content-Range") or "").rpartition("/")[2]
        if total.strip().isdigit():
            return int(total)
    length = (response.headers.get("Content-Length") or "").strip()
    return start + int(length) if length.isdigit() else None


def _sha1_of(path: Path) -> str:
    """Hex SHA-1 of a file, read in chunks so a 250 MB caffemodel needs little memory."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as e:
        raise OutputError(f"cannot read back ({e.strerror or e})", path=path) from e
    return digest.hexdigest()


def _one_line(error: Exception | None) -> str:
    """A connection error's reason on one line (URLError hides it in `.reason`)."""
    reason = getattr(error, "reason", None) or error
    text = " ".join(str(reason).split())
    return text or type(error).__name__
