"""Reading inputs and writing outputs safely.

Inputs are checked before anything parses them, so a missing or empty file
gets a sentence rather than a parser's complaint. Outputs are staged as
hidden temporary files in the destination folder and renamed into place
together at the end: an interrupted run leaves no file under an output name,
and an existing output is only replaced with `force`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import InputError, OutputError, OutputExists

TMP_MARK = ".fcnify-tmp-"

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
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.close(fd)
        self._staged.append((Path(tmp), final))
        return Path(tmp)

    def write_bytes(self, final: str | Path, data: bytes) -> None:
        self.path_for(final).write_bytes(data)

    def write_text(self, final: str | Path, text: str) -> None:
        self.path_for(final).write_text(text)

    def write_with(self, final: str | Path, writer: Callable[[Path], None]) -> None:
        writer(self.path_for(final))

    def finals(self) -> Iterator[Path]:
        return (final for _, final in self._staged)

    def commit(self) -> list[Path]:
        for tmp, final in self._staged:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, final in self._staged:
            os.replace(tmp, final)
        done = [final for _, final in self._staged]
        self._staged = []
        self._made = []
        return done

    def discard(self) -> None:
        for tmp, _ in self._staged:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self._staged = []
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
