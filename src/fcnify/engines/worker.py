"""Entry point of fcnify's Caffe worker process: `python -m fcnify.engines.worker`.

Requests arrive on stdin and answers leave on the original stdout, each a
length-prefixed pickle. Anything else that writes to stdout (pycaffe prints)
is sent to stderr instead, which the parent reads for Caffe's last words.

Large arrays do not go through the pipe: a forward pass's input and output
live in `Region`s, anonymous shared-memory files (memfd) mapped by both
processes, whose descriptors cross once over a Unix socket (FDS_ENV names
its descriptor here). A request or reply names them by `Shared` markers, so
a tile's input is written once (by preprocessing, in place) and read once
(into Caffe's blob), instead of pickled, piped and unpickled.
"""
from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import struct
import sys
import traceback
from dataclasses import dataclass

import numpy as np

HEADER = struct.Struct("<Q")
FDS_ENV = "FCNIFY_WORKER_FDS"


class Region:
    """A shared-memory block (an unnamed memfd, so nothing to unlink) mapped into this process.

    close() closes the descriptor at once; the mapping goes with the last array
    viewing it (numpy holds it), so a caller's live view never dangles.
    """

    def __init__(self, size: int, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("fcnify-region", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                raise
        self.fd, self.size = fd, size
        self.map = mmap.mmap(fd, size)
        self.address = np.frombuffer(self.map, np.uint8, count=1).ctypes.data

    def holds(self, array: np.ndarray) -> bool:
        """Whether `array` is this region's array from its start (input_array's)."""
        return (array.__array_interface__["data"][0] == self.address and array.flags.c_contiguous
                and array.nbytes <= self.size)

    def array(self, shape: tuple[int, ...], dtype=np.float32, offset: int = 0) -> np.ndarray:
        return np.ndarray(shape, dtype, buffer=self.map, offset=offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.map.close()
        except BufferError:  # arrays still view it: unmapped when the last one goes
            pass


@dataclass(frozen=True)
class Shared:
    """An array in a Region, named in a pickled message: region id, offset, shape, dtype."""

    region: int
    offset: int
    shape: tuple[int, ...]
    dtype: str


def fits(regions: dict[int, Region], role: int, nbytes: int) -> Region | None:
    """The region of `role` if it holds `nbytes`; else None (the old one closed)."""
    old = regions.get(role)
    if old is not None and old.size >= nbytes:
        return old
    if old is not None:
        old.close()
        del regions[role]
    return None


def send_region(sock: socket.socket, key: int, region: Region) -> None:
    socket.send_fds(sock, [struct.pack("<qQ", key, region.size)], [region.fd])


def receive_region(sock: socket.socket) -> tuple[int, Region]:
    msg, fds, _, _ = socket.recv_fds(sock, 16, 1)
    if len(msg) != 16 or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise EOFError("the region's descriptor did not arrive")
    key, size = struct.unpack("<qQ", msg)
    return key, Region(size, fds[0])


def _read_exact(stream, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


OUTPUT_ROLE = 1  # the worker's own region, for forward's outputs


def _resolve(value, regions: dict[int, Region]):
    """A request's argument with its Shared markers replaced by the arrays they name."""
    if isinstance(value, Shared):
        return regions[value.region].array(value.shape, value.dtype, value.offset)
    if isinstance(value, dict):
        return {k: _resolve(v, regions) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, regions) for v in value)
    return value


def _outputs_shared(arrays: dict[str, np.ndarray], regions: dict[int, Region],
                    sock: socket.socket) -> tuple[dict[str, Shared], int | None]:
    """forward's output arrays copied into this worker's output region (grown, and its descriptor
    sent, when they do not fit): their markers, and the region's key if the caller must receive it."""
    sizes = [(name, a, -(-a.nbytes // 64) * 64) for name, a in arrays.items()]
    total = max(64, sum(s for _, _, s in sizes))
    region, sent = fits(regions, -OUTPUT_ROLE, total), None
    if region is None:
        region = regions[-OUTPUT_ROLE] = Region(total)
        sent = -OUTPUT_ROLE
    marks, offset = {}, 0
    for name, a, size in sizes:
        np.copyto(region.array(a.shape, a.dtype, offset), a)
        marks[name] = Shared(-OUTPUT_ROLE, offset, tuple(a.shape), a.dtype.str)
        offset += size
    if sent is not None:
        send_region(sock, sent, region)
    return marks, sent


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    sock = socket.socket(fileno=int(os.environ[FDS_ENV])) if os.environ.get(FDS_ENV) else None
    regions: dict[int, Region] = {}
    from . import pycaffe as engine
    if os.environ.get("FCNIFY_VERBOSE") == "1":
        engine.caffe(verbose=True)
    while True:
        head = _read_exact(inp, HEADER.size)
        if head is None:
            return 0
        body = _read_exact(inp, HEADER.unpack(head)[0])
        if body is None:
            return 0
        name, args, kwargs, arriving = pickle.loads(body)
        if name == "exit":
            return 0
        for _ in arriving:
            key, region = receive_region(sock)
            fits(regions, key, 1 << 62)  # closes the region it replaces
            regions[key] = region
        sent = None
        try:
            if name == "forward_shared":  # inputs in the caller's regions, outputs into ours
                arrays = engine.forward(*_resolve(args, regions), copy=False)
                payload, sent = _outputs_shared(arrays, regions, sock)
                del arrays
            else:
                payload = engine.dispatch(name, args, kwargs)
            reply = ("ok", payload, sent)
        except BaseException as exc:  # reported to the parent, which raises a named error
            reply = ("error", (type(exc).__name__, str(exc), traceback.format_exc()), sent)
        data = pickle.dumps(reply, protocol=5)
        out.write(HEADER.pack(len(data)))
        out.write(data)
        out.flush()


if __name__ == "__main__":  # run as the module itself, so pickled Shared markers are its class
    from fcnify.engines.worker import main as _main
    sys.exit(_main())
