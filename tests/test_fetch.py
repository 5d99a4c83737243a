"""fetch.py against a real HTTP server on loopback that can drop, ignore Range or 404."""
from __future__ import annotations

import hashlib
import random
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fcnify.io import fetch as fetch_mod
from fcnify.errors import FetchError, InputError
from fcnify.io.fetch import WeightsDownload, download, fetch, model_spec

PAYLOAD = random.Random(1234).randbytes(200_000)
PAYLOAD_SHA1 = hashlib.sha1(PAYLOAD).hexdigest()
WRONG_SHA1 = "0" * 40


@dataclass
class ServerState:
    """What the test server does next, and what it has been asked."""

    payload: bytes = PAYLOAD
    drops_left: int = 0          # this many answers stop after `drop_after` bytes
    drop_after: int = 50_000
    ignore_range: bool = False   # answer 200 with the whole file even when asked for a range
    not_found: bool = False      # answer every request with 404
    ranges: list[str | None] = field(default_factory=list)  # Range header of each GET


class Handler(BaseHTTPRequestHandler):
    """Serves `server.state.payload` with byte-range support and the failures above."""

    def do_GET(self) -> None:  # noqa: N802 (the name http.server looks for)
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        asked = self.headers.get("Range")
        state.ranges.append(asked)
        if state.not_found:
            self.send_error(404, "Not Found")
            return
        data, size = state.payload, len(state.payload)
        start = int(asked[len("bytes="):].split("-")[0]) if asked and not state.ignore_range else 0
        if start >= size and asked and not state.ignore_range:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        body = data[start:]
        if state.drops_left > 0:
            state.drops_left -= 1
            body = body[:state.drop_after]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep pytest's output clean."""


@pytest.fixture
def server():
    """A loopback HTTP server in a thread; yields (base_url, state); shut down afterwards."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/model.caffemodel", httpd.state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_retry_pause(monkeypatch):
    """Retries happen at once so the tests stay fast."""
    monkeypatch.setattr(fetch_mod, "RETRY_PAUSE_S", 0.0)


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _fake_caffe_root(root: Path, front_matter: str, folder: str = "bvlc_reference_caffenet") -> Path:
    readme = root / "models" / folder / "readme.md"
    readme.parent.mkdir(parents=True)
    readme.write_text(f"---\n{front_matter}---\n\nSome prose: with a colon.\n")
    return root


def _caffenet_front_matter(url: str, sha1: str = PAYLOAD_SHA1) -> str:
    return (f"name: BAIR/BVLC CaffeNet Model\ncaffemodel: bvlc_reference_caffenet.caffemodel\n"
            f"caffemodel_url: {url}\nlicense: unrestricted\nsha1: {sha1}\n")


def test_matching_checksum_writes_file_and_reports_progress(server, tmp_path):
    """A good download lands at dest with no .part, and progress climbs to the total."""
    url, _ = server
    dest = tmp_path / "w.caffemodel"
    calls: list[tuple[int, int | None]] = []
    assert download(url, dest, PAYLOAD_SHA1, progress=lambda d, t: calls.append((d, t)),
                    timeout=5) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()
    done = [d for d, _ in calls]
    assert len(done) >= 2 and all(a < b for a, b in zip(done, done[1:]))
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_mismatching_checksum_leaves_nothing(server, tmp_path):
    """A wrong checksum raises FetchError naming both sha1s and leaves no file behind."""
    url, state = server
    dest = tmp_path / "w.caffemodel"
    with pytest.raises(FetchError) as info:
        download(url, dest, WRONG_SHA1, timeout=5)
    assert WRONG_SHA1 in str(info.value) and PAYLOAD_SHA1 in str(info.value)
    assert not dest.exists() and not _part(dest).exists()
    assert len(state.ranges) == 2  # one clean retry before giving up


def test_dropped_connection_resumes_with_range(server, tmp_path):
    """A connection cut mid-way is resumed with a Range request and completes."""
    url, state = server
    state.drops_left = 1
    dest = download(url, tmp_path / "w.caffemodel", PAYLOAD_SHA1, timeout=5)
    assert dest.read_bytes() == PAYLOAD
    assert state.ranges == [None, f"bytes={state.drop_after}-"]


def test_drops_beyond_retries_keep_part_for_later(server, tmp_path):
    """More drops than retries gives a one-line FetchError and keeps the .part to resume."""
    url, state = server
    state.drops_left, state.drop_after = 3, 10_000
    dest = tmp_path / "w.caffemodel"
    with pytest.raises(FetchError, match="cannot reach 127.0.0.1"):
        download(url, dest, PAYLOAD_SHA1, retries=2, timeout=5)
    assert len(state.ranges) == 3
    assert _part(dest).read_bytes() == PAYLOAD[:30_000]
    assert download(url, dest, PAYLOAD_SHA1, timeout=5).read_bytes() == PAYLOAD


def test_corrupt_part_is_discarded_and_downloaded_again(server, tmp_path):
    """A stale .part with wrong bytes fails the checksum once, then a clean retry is right."""
    url, state = server
    dest = tmp_path / "w.caffemodel"
    _part(dest).write_bytes(bytes(10_000))
    assert download(url, dest, PAYLOAD_SHA1, timeout=5).read_bytes() == PAYLOAD
    assert state.ranges == ["bytes=10000-", None]
    assert not _part(dest).exists()


def test_server_ignoring_range_starts_over(server, tmp_path):
    """A 200 answer to a Range request replaces the .part instead of being appended to it."""
    url, state = server
    state.ignore_range = True
    dest = tmp_path / "w.caffemodel"
    _part(dest).write_bytes(PAYLOAD[:10_000])
    assert download(url, dest, PAYLOAD_SHA1, timeout=5).read_bytes() == PAYLOAD
    assert state.ranges == ["bytes=10000-"]  # no checksum failure, so no second request


def test_complete_part_is_checked_not_downloaded(server, tmp_path):
    """A .part that already holds the whole file (416 to its Range) is checked and kept."""
    url, state = server
    dest = tmp_path / "w.caffemodel"
    _part(dest).write_bytes(PAYLOAD)
    assert download(url, dest, PAYLOAD_SHA1, timeout=5).read_bytes() == PAYLOAD
    assert state.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_existing_good_dest_is_not_downloaded(server, tmp_path):
    """A dest that already has the right sha1 is returned without any request."""
    url, state = server
    dest = tmp_path / "w.caffemodel"
    dest.write_bytes(PAYLOAD)
    assert download(url, dest, PAYLOAD_SHA1, timeout=5) == dest
    assert state.ranges == []


def test_http_404_is_fetch_error(server, tmp_path):
    """A 404 becomes a FetchError that names the status."""
    url, state = server
    state.not_found = True
    dest = tmp_path / "w.caffemodel"
    with pytest.raises(FetchError, match="404"):
        download(url, dest, PAYLOAD_SHA1, timeout=5)
    assert not dest.exists()


def test_offline_is_one_line_naming_host(tmp_path):
    """A refused connection, after retries, is one FetchError line naming host and by-hand step."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.caffemodel"
    dest = tmp_path / "w.caffemodel"
    with pytest.raises(FetchError) as info:
        download(url, dest, PAYLOAD_SHA1, retries=1, timeout=5)
    message = str(info.value)
    assert "\n" not in message
    assert "cannot reach 127.0.0.1" in message and url in message and str(tmp_path) in message
    assert not dest.exists()


def test_model_spec_reads_readme_front_matter(tmp_path):
    """model_spec takes file name, URL and sha1 from the readme's front matter."""
    root = _fake_caffe_root(tmp_path, _caffenet_front_matter("http://127.0.0.1:9/c.caffemodel",
                                                             PAYLOAD_SHA1.upper()))
    assert model_spec("caffenet", root) == WeightsDownload(
        "caffenet", "bvlc_reference_caffenet", "bvlc_reference_caffenet.caffemodel",
        "http://127.0.0.1:9/c.caffemodel", PAYLOAD_SHA1)


def test_model_spec_unknown_name_lists_known(tmp_path):
    """An unknown model name is an InputError that lists the names fcnify knows."""
    with pytest.raises(InputError, match="alexnet, caffenet, flickr, googlenet, rcnn"):
        model_spec("vgg16", tmp_path)


def test_model_spec_readme_without_sha1(tmp_path):
    """A readme whose front matter lacks sha1 is a FetchError naming the readme."""
    root = _fake_caffe_root(tmp_path, "caffemodel: c.caffemodel\ncaffemodel_url: http://x/c\n")
    with pytest.raises(FetchError, match="sha1") as info:
        model_spec("caffenet", root)
    assert info.value.path == str(root / "models" / "bvlc_reference_caffenet" / "readme.md")


def test_model_spec_missing_readme(tmp_path):
    """A caffe root without the model's readme is a FetchError naming the readme."""
    with pytest.raises(FetchError) as info:
        model_spec("googlenet", tmp_path)
    assert info.value.path == str(tmp_path / "models" / "bvlc_googlenet" / "readme.md")


def test_model_spec_refuses_path_in_file_name(tmp_path):
    """A caffemodel entry that is a path, not a file name, cannot steer the download elsewhere."""
    front = _caffenet_front_matter("http://x/c").replace(
        "bvlc_reference_caffenet.caffemodel", "../../evil.caffemodel")
    with pytest.raises(FetchError, match="plain file name"):
        model_spec("caffenet", _fake_caffe_root(tmp_path, front))


def test_fetch_end_to_end(server, tmp_path):
    """fetch() reads the readme, downloads from the local server and names the file after it."""
    url, _ = server
    root = _fake_caffe_root(tmp_path / "caffe", _caffenet_front_matter(url))
    path = fetch("caffenet", dest_dir=tmp_path / "out" / "deep", caffe_root=root)
    assert path == tmp_path / "out" / "deep" / "bvlc_reference_caffenet.caffemodel"
    assert path.read_bytes() == PAYLOAD


def test_fetch_defaults_to_models_dir(server, tmp_path, monkeypatch):
    """Without dest_dir, fetch() saves under models_dir()/<folder>/, where convert looks."""
    url, _ = server
    monkeypatch.setenv("FCNIFY_MODELS", str(tmp_path / "models"))
    root = _fake_caffe_root(tmp_path / "caffe", _caffenet_front_matter(url))
    path = fetch("caffenet", caffe_root=root)
    assert path == (tmp_path / "models" / "bvlc_reference_caffenet"
                    / "bvlc_reference_caffenet.caffemodel")
    assert path.read_bytes() == PAYLOAD
