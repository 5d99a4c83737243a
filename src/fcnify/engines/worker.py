"""Entry point of fcnify's Caffe worker process: `python -m fcnify.engines.worker`.

Requests arrive on stdin and answers leave on the original stdout, each a
length-prefixed pickle. Anything else that writes to stdout (pycaffe prints)
is sent to stderr instead, which the parent reads for Caffe's last words.
"""
from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import traceback

HEADER = struct.Struct("<Q")


def _read_exact(stream, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
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
        name, args, kwargs = pickle.loads(body)
        if name == "exit":
            return 0
        try:
            reply = ("ok", engine.dispatch(name, args, kwargs))
        except BaseException as exc:  # reported to the parent, which raises a named error
            reply = ("error", (type(exc).__name__, str(exc), traceback.format_exc()))
        data = pickle.dumps(reply, protocol=5)
        out.write(HEADER.pack(len(data)))
        out.write(data)
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
