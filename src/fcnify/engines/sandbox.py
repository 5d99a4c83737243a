"""Run Caffe in a child process, so that its aborts cannot kill the caller.

Caffe's CHECK macros call abort() on bad input, taking the whole process with
them: a CLI dies with a core dump, a notebook kernel dies with the user's
work. fcnify validates inputs first, but Caffe can still find something to
refuse, so every Caffe call goes to a worker process (`python -m
fcnify.engines.worker`). If the worker dies, its last glog line (`Check failed: ...`)
becomes an EngineCrash that names what fcnify was doing, and a fresh worker
is started for the next call.
"""
from __future__ import annotations

import atexit
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from .. import errors
from ..errors import EngineCrash, FcnifyError, InternalError, OutputExists, ResourceError

import numpy as np

from .worker import FDS_ENV, HEADER, Region, Shared, fits, receive_region, send_region

# glog writes "F0101 12:00:00.000000  123 file.cpp:42] ...", newer glog with the year
# ("F20260101 ..."); both are matched.
GLOG_PREFIX = re.compile(r"^[FEWI]\d{4}(?:\d{4})? [\d:.]+\s+\d+ (\S+:\d+)\] ")
FATAL_LINE = re.compile(r"^F\d{4}(?:\d{4})? |Check failed|terminate called|Segmentation fault|Error")


class Worker:
    """One worker process and its pipes."""

    def __init__(self, verbose: bool = False) -> None:
        env = dict(os.environ)
        env["GLOG_minloglevel"] = env.get("GLOG_minloglevel", "0" if verbose else "2")
        env["FCNIFY_VERBOSE"] = "1" if verbose else "0"
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.verbose = verbose
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env[FDS_ENV] = str(theirs.fileno())
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fcnify.engines.worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                start_new_session=False, pass_fds=(theirs.fileno(),))
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()
        self.regions: dict[int, Region] = {}  # inputs (keys from 1) and the worker's outputs (-1)
        self._keys: dict[str, int] = {}
        self._arriving: list[int] = []  # new input regions, their descriptors sent with the next call
        self.lines: deque[str] = deque(maxlen=400)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if self.verbose:
                print(line, file=sys.stderr, flush=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def input_array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of `shape` in shared memory, for forward_shared's input `name`: what is
        written into it is what the worker reads, with no copy on the way."""
        key = self._keys.setdefault(name, len(self._keys) + 1)
        nbytes = max(1, int(np.prod(shape)) * 4)
        region = fits(self.regions, key, nbytes)
        if region is None:
            region = self.regions[key] = Region(nbytes)
            self._arriving.append(key)
        return region.array(tuple(shape))

    def shared(self, name: str, array: np.ndarray) -> Shared:
        """The marker of input `name` in its region: `array` itself if it is input_array's (the
        worker reads it there), else copied in."""
        array = np.asarray(array, dtype=np.float32)
        key = self._keys.get(name)
        region = self.regions.get(key) if key is not None else None
        if region is None or not region.holds(array):
            target = self.input_array(name, array.shape)
            np.copyto(target, array)
            key, region = self._keys[name], self.regions[self._keys[name]]
        return Shared(key, 0, tuple(array.shape), "<f4")

    def forward_shared(self, handle: int, inputs: dict[str, np.ndarray], outputs: list[str]):
        """forward() with the inputs and outputs in shared memory; the outputs come back as arrays
        of this process (copied out, so the next call cannot change them)."""
        marks = {name: self.shared(name, a) for name, a in inputs.items()}
        status, payload = self.call("forward_shared", handle, marks, outputs)
        if status != "ok":
            return status, payload
        return status, {k: np.array(self.regions[m.region].array(m.shape, m.dtype, m.offset))
                        for k, m in payload.items()}

    def call(self, name: str, *args, **kwargs):
        arriving, self._arriving = self._arriving, []
        data = pickle.dumps((name, args, kwargs, arriving), protocol=5)
        try:
            for key in arriving:
                send_region(self.sock, key, self.regions[key])
            self.proc.stdin.write(HEADER.pack(len(data)))
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            head = self.proc.stdout.read(HEADER.size)
            if len(head) < HEADER.size:
                raise EOFError
            size = HEADER.unpack(head)[0]
            body = self.proc.stdout.read(size)
            if len(body) < size:
                raise EOFError
            status, payload, sent = pickle.loads(body)
            if sent is not None:
                key, region = receive_region(self.sock)
                fits(self.regions, key, 1 << 62)  # closes the region it replaces
                self.regions[key] = region
        except (BrokenPipeError, EOFError, OSError):
            raise self._death() from None
        return status, payload

    def _death(self) -> EngineCrash:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=5)
        self._close_pipes()
        return EngineCrash(describe_death(code, list(self.lines)))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                data = pickle.dumps(("exit", (), {}, []))
                self.proc.stdin.write(HEADER.pack(len(data)) + data)
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        self._close_pipes()

    def _close_pipes(self) -> None:
        """Close this side of the worker's pipes, socket and regions, so a dead worker leaks no
        file descriptors."""
        for region in self.regions.values():
            region.close()
        self.regions.clear()
        self.sock.close()
        streams = [self.proc.stdin, self.proc.stdout]
        if not self._reader.is_alive():  # it has read stderr to its end
            streams.append(self.proc.stderr)
        for stream in streams:
            try:
                stream.close()
            except OSError:
                pass


def describe_death(code: int, lines: list[str]) -> str:
    """One line: Caffe's fatal message when it printed one, else the signal or status."""
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    for line in reversed(lines):
        if FATAL_LINE.search(line):
            text = GLOG_PREFIX.sub(lambda m: f"{m.group(1)}: ", line).strip()
            return f"Caffe aborted ({how}): {text}"
    return f"Caffe's worker process died ({how}) without a message"


def worker_error(kind: str) -> type[FcnifyError]:
    """The error class for an exception the worker raised, by its class name: fcnify's own
    errors keep their class, running out of memory is a ResourceError, anything else is a
    bug (InternalError, its own exit status)."""
    if kind == "MemoryError":
        return ResourceError
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, FcnifyError) and cls is not OutputExists:
        return cls
    return InternalError


class Sandbox:
    """A worker that is restarted after a crash; calls raise EngineCrash with context."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self._worker: Worker | None = None
        self.crashes = 0
        self.generation = 0  # workers started so far: nets of an older one are gone

    @property
    def running(self) -> bool:
        """Whether a worker is started and alive (without starting one)."""
        return self._worker is not None and self._worker.alive()

    @property
    def worker(self) -> Worker:
        if self._worker is None or not self._worker.alive():
            self._worker = Worker(self.verbose)
            self.generation += 1
        return self._worker

    def call(self, name: str, *args, context: str = "", path: str | Path | None = None, **kwargs):
        try:
            if name == "forward_shared":
                status, payload = self.worker.forward_shared(*args, **kwargs)
            else:
                status, payload = self.worker.call(name, *args, **kwargs)
        except EngineCrash as exc:
            self.crashes += 1
            self._worker = None
            msg = f"{exc.message} (while {context})" if context else exc.message
            raise EngineCrash(msg, path) from None
        if status == "ok":
            return payload
        kind, message, tb = payload
        first = message.strip().splitlines()[0] if message.strip() else kind
        err = worker_error(kind)(f"Caffe failed{' while ' + context if context else ''}: {kind}: {first}", path)
        err.worker_traceback = tb
        raise err

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


_shared: dict[bool, Sandbox] = {}


def shared(*, verbose: bool = False) -> Sandbox:
    """The process-wide sandbox (one worker, reused by every call)."""
    box = _shared.get(verbose)
    if box is None:
        box = _shared[verbose] = Sandbox(verbose)
    return box


def close_all() -> None:
    """Stop the shared workers (the CLI does it before exiting, where Ctrl-C is still its own)."""
    for box in _shared.values():
        box.close()


@atexit.register
def _close_at_exit() -> None:
    """A library user's workers, stopped at exit; Ctrl-C meanwhile kills them instead of a traceback."""
    try:
        close_all()
    except KeyboardInterrupt:
        for box in _shared.values():
            if box._worker is not None and box._worker.alive():
                box._worker.proc.kill()
