"""Named errors: every bad input becomes one of these, never a Caffe abort.

The CLI turns `FcnifyError` into one line on stderr. `exit_code` follows the
project's contract: 2 for bad usage or bad input, 1 for work that failed
(e.g. a conversion that is not equivalent), 3 for a bug (InternalError).
What an error carries is declared on its class, as click's exceptions do.
"""
from __future__ import annotations

from pathlib import Path


class FcnifyError(Exception):
    """Base class. `path` names the file the problem is in, when there is one.

    `worker_traceback` is the traceback of Caffe's worker process when the
    error was raised there (the CLI prints it under --debug).
    """

    exit_code: int = 2
    path: str | None
    message: str
    worker_traceback: str | None = None

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(FcnifyError):
    """A file is missing, unreadable, empty or not what it claims to be."""


class ArgumentError(InputError):
    """Arguments that do not go together: two that each name the net, a net without its weights.

    `names` are the arguments the message is about, as the Python API spells
    them (model_def=); the command line words the same refusal with its own
    options (for_options), as OutputExists does with its hint.
    """

    template: str
    names: tuple[str, ...]

    def __init__(self, template: str, *names: str, spelling: dict[str, str] | None = None) -> None:
        self.template, self.names = template, names
        spelling = spelling or {}
        super().__init__(template.format(**{n: spelling.get(n, f"{n}=") for n in names}))

    def for_options(self, spelling: dict[str, str]) -> "ArgumentError":
        """The same refusal with each argument named as `spelling` says (model_def -> --model-def)."""
        return ArgumentError(self.template, *self.names, spelling=spelling)


class NetDefinitionError(FcnifyError):
    """A prototxt that does not parse or describes an impossible net."""


class WeightsError(FcnifyError):
    """A caffemodel that does not parse or does not fit its prototxt."""


class ShapeMismatchError(WeightsError):
    """Two parameter blobs that should hold the same numbers have different shapes."""


class ConversionError(FcnifyError):
    """A layer that cannot become a convolution; the message says why."""


class ImageError(FcnifyError):
    """An image that cannot be read or is too small/large for the net."""


class CorruptTileError(ImageError):
    """A tile of a windowed image that cannot be decoded, found mid-run: the work failed (exit 1),
    the input was not refused up front; the message names the file and the tile's position."""

    exit_code = 1


class ResourceError(FcnifyError):
    """A request that would exceed Caffe's blob limit or the memory budget."""


class DeviceError(FcnifyError):
    """A GPU request that this build or machine cannot serve."""


class OutputError(FcnifyError):
    """An output path that cannot be written or already exists."""


class OutputExists(OutputError):
    """An output file already there; overwriting it takes `hint` (force=True in Python).

    The command line words the same refusal with its own option (for_option).
    `image` names the input whose outputs these are, when there is one.
    """

    def __init__(self, final: str | Path, image: str | Path | None = None,
                 hint: str = "force=True") -> None:
        self.final, self.image, self.hint = Path(final), image, hint
        if image is None:
            super().__init__(f"already exists (use {hint} to overwrite)", final)
        else:
            super().__init__(f"output {final} already exists (use {hint} to overwrite)", image)

    def for_option(self, hint: str) -> "OutputExists":
        return OutputExists(self.final, self.image, hint)


class SetupError(FcnifyError):
    """pycaffe or another part of the installation is missing or broken."""


class EngineCrash(FcnifyError):
    """Caffe died in fcnify's child process; the message carries its last words."""


class FetchError(FcnifyError):
    """A download that failed or did not match its checksum."""


class DownloadError(FetchError):
    """A download that failed on the way (offline, refused, HTTP error): failed work, exit 1."""

    exit_code = 1


class NotEquivalentError(FcnifyError):
    """The converted net does not reproduce the original's outputs.

    `result` is the conversion (convert.ConvertResult, with its verify report)
    when there is one to report.
    """

    exit_code = 1
    result: object | None

    def __init__(self, message: str, path: str | Path | None = None, result: object | None = None) -> None:
        super().__init__(message, path)
        self.result = result


class InternalError(FcnifyError):
    """A bug: an exception fcnify did not expect (in Caffe's worker or in fcnify itself).

    Its own exit status, so that scripts can tell it from bad input (2) and failed work (1).
    """

    exit_code = 3
