"""Reading inputs and writing outputs safely.

Inputs are checked before anything parses them, so a missing or empty file
gets a sentence rather than a parser's complaint. Outputs are staged as
hidden temporary files in the destination folder and renamed into place
together at the end: an interrupted run leaves no file under an output name,
and an existing output is only replaced with `force`.

A process killed with SIGKILL cleans nothing up, so every staged file and
scratch folder is held under an advisory lock (flock) for as long as its
process lives: the kernel drops the lock when the process dies, however it
dies, and the next fcnify run that writes there removes what is unlocked.
"""
from __future__ import annotations

import fcntl
import glob
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import IO, Callable

from .errors import InputError, OutputError, OutputExists

TMP_MARK = ".fcnify-tmp-"
SCRATCH_PREFIX = "fcnify-"
OWNER = ".owner"  # the locked file in a scratch folder
# A leftover is removed only when it is unlocked AND this old: the few microseconds between
# making a file and locking it must never look like an abandoned file to another run.
ABANDONED_AFTER_S = 10.0

MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x93NUMPY", "a NumPy .npy file"),
    (b"\x1f\x8b", "a gzip archive"),
)


def check_input_file(path: str | Path, what: str) -> Path:
    """Fail with one line unless `path` is an existing, readable, non-empty file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found", p)
    if p.is_dir():
        raise InputError(f"is a directory, expected {what}", p)
    if not p.is_file():
        raise InputError(f"is not a regular file, expected {what}", p)
    if not os.access(p, os.R_OK):
        raise InputError(f"permission denied reading {what}", p)
    if p.stat().st_size == 0:
        raise InputError(f"is empty (0 bytes), expected {what}", p)
    return p


def read_bytes(path: str | Path, what: str) -> bytes:
    p = check_input_file(path, what)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what}: {exc.strerror or exc}", p) from exc


def sniff(data: bytes) -> str | None:
    """Name the kind of a well-known non-Caffe file from its first bytes."""
    for magic, kind in MAGIC:
        if data.startswith(magic):
            return kind
    return None


def hold(path: Path) -> IO[bytes]:
    """Open `path` and lock it for as long as the returned file stays open (or the process lives)."""
    f = open(path, "rb")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise
    return f


def abandoned(path: Path, *, now: float | None = None) -> bool:
    """True when no process holds `path` (hold()) and it is older than ABANDONED_AFTER_S."""
    try:
        if (now or time.time()) - path.lstat().st_mtime < ABANDONED_AFTER_S:
            return False
        with open(path, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when f closes
        return True
    except OSError:  # locked by a live process, gone, or unreadable: not ours to remove
        return False


def remove_abandoned_staged(final: Path) -> int:
    """Remove the staged copies of `final` that a killed run left (see hold()); how many."""
    removed = 0
    try:
        siblings = list(final.parent.glob(f".{glob.escape(final.name)}{TMP_MARK}*"))
    except OSError:
        return 0
    for stale in siblings:
        if abandoned(stale):
            try:
                stale.unlink()
                removed += 1
            except OSError:
                pass
    return removed


class ScratchDir:
    """A temporary folder (like tempfile.TemporaryDirectory) that outlives no process.

    Removed by cleanup(), at garbage collection or at exit; and when its
    process is killed outright, by the next ScratchDir made in the same
    temporary directory (remove_abandoned_scratch), because the folder's
    .owner file is locked for the process's lifetime.
    """

    def __init__(self, kind: str, dir: str | Path | None = None) -> None:
        remove_abandoned_scratch(dir)
        self.path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{kind}-", dir=dir))
        pending = self.path / f"{OWNER}.new"
        pending.touch()
        lock = hold(pending)
        pending.rename(self.path / OWNER)  # only ever seen under its name while locked
        self._finalizer = weakref.finalize(self, _remove_scratch, self.path, lock)

    @property
    def name(self) -> str:
        return str(self.path)

    def cleanup(self) -> None:
        self._finalizer()


def _remove_scratch(path: Path, lock: IO[bytes]) -> None:
    shutil.rmtree(path, ignore_errors=True)
    lock.close()


def remove_abandoned_scratch(dir: str | Path | None = None) -> int:
    """Remove scratch folders whose process died without cleaning up; how many."""
    removed = 0
    try:
        folders = list(Path(dir or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"))
    except OSError:
        return 0
    now = time.time()
    for folder in folders:
        owner = folder / OWNER
        if owner.is_file() and abandoned(owner, now=now):  # no .owner: not a ScratchDir, left alone
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputSet:
    """Stage several output files, then put them all in place at once.

    Use as a context manager: `path_for(final)` returns a temporary path in
    the same folder; on a clean exit every staged file is renamed to its
    final name, and on an exception (Ctrl-C and SIGTERM included, see the
    CLI) every temporary file is removed.
    """

    def __init__(self, force: bool = False) -> None:
        self.force = force
        self._staged: list[tuple[Path, Path]] = []
        self._locks: list[IO[bytes]] = []  # one per staged file: see hold()
        self._made: list[Path] = []  # folders made for the outputs, removed again on failure

    def check(self, final: str | Path) -> Path:
        """Fail before any work if `final` cannot be written (or exists without force).

        A missing output folder is fine when it can be made: path_for makes it.
        """
        final = Path(final)
        parent = final.parent if str(final.parent) else Path(".")
        if not parent.exists():
            existing = next((p for p in parent.parents if p.exists()), Path("."))
            if not existing.is_dir():
                raise OutputError("cannot make the output folder: a file is in the way", existing)
            if not os.access(existing, os.W_OK | os.X_OK):
                raise OutputError("cannot make the output folder: not writable", existing)
            return final
        if not parent.is_dir():
            raise OutputError("output folder is not a directory", parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError("output folder is not writable", parent)
        if final.is_dir():
            raise OutputError("output path is a directory", final)
        if final.exists() and not self.force:
            raise OutputExists(final)
        return final

    def path_for(self, final: str | Path) -> Path:
        final = self.check(final)
        self._make_folder(final.parent)
        remove_abandoned_staged(final)  # a killed run's half-written copy of this output
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.close(fd)
        self._locks.append(hold(Path(tmp)))
        self._staged.append((Path(tmp), final))
        return Path(tmp)

    def write_bytes(self, final: str | Path, data: bytes) -> None:
        self.path_for(final).write_bytes(data)

    def write_text(self, final: str | Path, text: str) -> None:
        self.path_for(final).write_text(text)

    def write_with(self, final: str | Path, writer: Callable[[Path], None]) -> None:
        writer(self.path_for(final))

    def commit(self) -> list[Path]:
        for tmp, final in self._staged:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, final in self._staged:
            os.replace(tmp, final)
        done = [final for _, final in self._staged]
        self._staged = []
        self._made = []
        self._release()
        return done

    def _release(self) -> None:
        for lock in self._locks:
            lock.close()
        self._locks = []

    def discard(self) -> None:
        for tmp, _ in self._staged:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self._staged = []
        self._release()
        for folder in reversed(self._made):  # no empty folder is left behind by a failed run
            try:
                folder.rmdir()
            except OSError:
                pass
        self._made = []

    def _make_folder(self, folder: Path) -> None:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            self._made.append(p)

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
