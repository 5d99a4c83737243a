"""The `fcnify` command: options in, library calls, one line out on error.

Every way a command fails is translated once (CommandError.of) into one line
on stderr and its exit code (2 bad input, 1 failed work, 3 a bug, 130
interrupted, 2 for usage); --debug also shows the traceback, and
the worker's when Caffe's worker process raised the error. Ctrl-C and
SIGTERM unwind normally, so staged outputs are removed.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import click

from .version import __version__
from .dense.pipeline import MapJob, MapOptions, ModelSpec, SaveOptions
from .engines import DEFAULT_ENGINE, PROOF_ENGINE, engine_help, engine_names
from .io.preprocess import PreprocessOverrides
from .io.saved import save_help
from .errors import (ArgumentError, FcnifyError, InputError, InternalError, NotEquivalentError,
                     OutputExists)


# click's own readability check would print a usage block; fcnify's checks say it in one line.
PATH = click.Path(readable=False)
class EngineChoice(click.Choice):
    """--engine: one of the names in engines.ENGINES, read from the table when parsing."""

    def __init__(self) -> None:
        super().__init__([])

    @property
    def choices(self):
        return tuple(engine_names())

    @choices.setter
    def choices(self, value) -> None:
        pass  # the table is the only source


ENGINE = EngineChoice()


class Context:
    def __init__(self, verbose: bool, debug: bool) -> None:
        self.verbose, self.debug = verbose, debug


class OptionValueError(click.BadParameter):
    """A bad option value, worded '--opt VALUE: why' as fcnify's other one-line errors are."""

    def format_message(self) -> str:
        return self.message


def _option(param: click.Parameter | None) -> str:
    return param.opts[0] if param is not None and param.opts else "value"


class _RangeSaysWhy:
    """Mixin for click's range types: a value out of range reads '--opt VALUE: why' (`why`)."""

    why = ""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            raise OptionValueError(f"{_option(param)} {value}: {self.why}", ctx, param) from None


class IntIn(_RangeSaysWhy, click.IntRange):
    """click.IntRange whose refusal says why in fcnify's words."""

    def __init__(self, why: str, **bounds) -> None:
        super().__init__(**bounds)
        self.why = why


class FloatIn(_RangeSaysWhy, click.FloatRange):
    """click.FloatRange whose refusal says why in fcnify's words."""

    def __init__(self, why: str, **bounds) -> None:
        super().__init__(**bounds)
        self.why = why

    def _describe_range(self) -> str:
        return super()._describe_range() if self.min is not None or self.max is not None else ""


class SizeType(click.ParamType):
    """'451' -> (451, 451); '480x640' -> (480, 640) as (height, width)."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise OptionValueError(f"{_option(param)} {value!r} is not N or HxW", ctx, param) from None
        if len(values) == 1:
            values *= 2
        if len(values) != 2 or min(values) <= 0:
            raise OptionValueError(f"{_option(param)} {value!r} is not N or HxW with positive numbers",
                                   ctx, param)
        return values[0], values[1]


class MemoryType(click.ParamType):
    """A number of bytes: 2GiB, 500MB, 123456 (planner.parse_size)."""

    name = "memory"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from .caffe.planner import parse_size
        try:
            return parse_size(value)
        except ValueError as exc:
            raise OptionValueError(f"{_option(param)}: {exc}", ctx, param) from None


class ScalesType(click.ParamType):
    """'1,0.75,0.5' -> (1.0, 0.75, 0.5): an image pyramid's factors (pyramid.parse_scales)."""

    name = "scales"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from .dense.pyramid import parse_scales
        try:
            return tuple(parse_scales(value))
        except InputError as exc:
            raise OptionValueError(str(exc), ctx, param) from None


class SaveType(click.ParamType):
    """'scores,json' -> frozenset({'scores', 'json'}): what --out writes (io.saved.SAVE_ITEMS)."""

    name = "save"

    def convert(self, value, param, ctx):
        if isinstance(value, frozenset):
            return value
        from .io.saved import parse_save
        try:
            return parse_save(value)
        except InputError as exc:
            raise OptionValueError(str(exc), ctx, param) from None


SIZE, MEMORY, SCALES, SAVE = SizeType(), MemoryType(), ScalesType(), SaveType()


_argv: list[str] = []


def _command_line() -> str:
    """The command as the user typed it, recorded in the JSON outputs."""
    return "fcnify " + " ".join(shlex.quote(a) for a in _argv)


def _err(msg: str) -> None:
    click.echo(msg, err=True)


# the Python API's argument -> the option that gives it (ArgumentError.for_options)
OPTION_NAMES = {"model": "--model", "card": "--card", "model_def": "--model-def",
                "weights": "--weights", "labels": "--labels"}


def _with_option_names(exc: FcnifyError) -> FcnifyError:
    """The error as the command line says it: its own option names, not the API's arguments."""
    if isinstance(exc, ArgumentError):
        return exc.for_options(OPTION_NAMES)
    return exc.for_option("--force") if isinstance(exc, OutputExists) else exc


def _one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped: an error is one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in str(text))


class CommandError(click.ClickException):
    """How a command that did not succeed ends: one line `fcnify: ...` on stderr and its exit code.

    The one translation point (`of`): fcnify's errors keep their exit code (2 bad input,
    1 failed work, 3 a bug), a bad option or usage is 2 and points at --help, Ctrl-C and
    SIGTERM are 130. `before` is what --debug shows first (the traceback, the worker's).
    """

    def __init__(self, line: str | None, exit_code: int, before: str = "",
                 echo: Callable[[], None] | None = None) -> None:
        super().__init__(line or "")
        self.line, self.exit_code, self.before, self.echo = line, exit_code, before, echo

    def show(self, file=None) -> None:
        if self.before:
            _err(self.before.rstrip("\n"))
        if self.echo is not None:
            self.echo()
        if self.line is not None:
            _err(f"fcnify: {_one_line(self.line)}")

    @classmethod
    def of(cls, exc: BaseException, debug: bool) -> "CommandError":
        """`exc` (being handled) as the line and exit code fcnify reports for it."""
        trace = traceback.format_exc() if debug else ""
        if isinstance(exc, FcnifyError):
            if debug and exc.worker_traceback:
                trace += "Caffe's worker process raised it:\n" + exc.worker_traceback.rstrip()
            return cls(f"error: {_with_option_names(exc)}", exc.exit_code, trace)
        if isinstance(exc, (click.exceptions.Abort, KeyboardInterrupt)):  # after the terminal's ^C
            return cls("interrupted", 130, "\n" if sys.stderr.isatty() else "")
        if isinstance(exc, click.BadParameter):  # a bad option value: one line, as every bad input
            return cls(f"error: {exc.format_message()}", exc.exit_code)
        if isinstance(exc, click.UsageError):  # no such option or command, options that cannot go together
            line = _usage_line(exc)
            return cls(f"error: {line}", exc.exit_code) if line else cls(None, exc.exit_code, echo=exc.show)
        if isinstance(exc, click.ClickException):
            return cls(None, exc.exit_code, echo=exc.show)
        if isinstance(exc, SystemExit):  # a command's own status, its lines already printed
            return cls(None, exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1))
        if isinstance(exc, OSError):
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            return cls(f"error: {where}{exc.strerror or exc}", 2, trace)
        if isinstance(exc, Exception):  # a bug: its own exit status, the traceback under --debug
            return cls(f"internal error (a bug in fcnify; --debug shows where): "
                       f"{type(exc).__name__}: {exc}", InternalError.exit_code, trace)
        raise exc


class Group(click.Group):
    """The command group, run by main(): click's main without its own error and Ctrl-C handling
    (a usage block; a blank line, then Abort); main translates what it raises (CommandError.of)."""

    def main(self, args: Sequence[str], prog_name: str, **_) -> int:
        try:
            with self.make_context(prog_name, list(args)) as ctx:
                self.invoke(ctx)
        except click.exceptions.Exit as exc:  # --help, --version
            return exc.exit_code
        return 0


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", message="fcnify %(version)s")
@click.option("--verbose", is_flag=True, help="Show Caffe's own log lines (glog).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, debug: bool) -> None:
    """Caffe net surgery: make classification nets fully convolutional and map images densely.

    \b
    Examples:
      fcnify convert --model digits --out digits
      fcnify classify-map photo.jpg --model caffenet --out maps/
      fcnify info deploy.prototxt --input-size 451
    """
    if verbose:
        os.environ["GLOG_minloglevel"] = "0"
    ctx.obj = Context(verbose, debug)


class GroupedCommand(click.Command):
    """A command whose --help lists its options under headings, from OPTION_GROUPS.

    An option not named in its command's table is listed under "Other options",
    so a new option is never hidden; tests/test_cli.py asks that none is left there.
    """

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups = OPTION_GROUPS.get(self.name, {})
        rows = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                rows["help" if "--help" in param.opts else param.name] = record
        placed: set[str] = set()
        for heading, names in groups.items():
            records = [rows[n] for n in names if n in rows]
            placed.update(names)
            if records:
                with formatter.section(heading):
                    formatter.write_dl(records)
        rest = [r for n, r in rows.items() if n not in placed]
        if rest:
            with formatter.section("Other options" if groups else "Options"):
                formatter.write_dl(rest)


# command name -> heading -> option names (click's parameter names), in the order shown.
# Adding an option to a group: add its parameter name to the group's tuple.
OPTION_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "classify-map": {
        "Model": ("model", "model_def", "weights", "card", "labels"),
        "Preprocessing": ("channels", "raw_scale", "input_scale", "mean", "transpose"),
        "Map": ("size", "scale", "long_side", "short_side", "level", "tile", "batch", "stride", "scales"),
        "Outputs": ("out_dir", "save", "store", "classes", "resume", "output", "softmax",
                    "fmt", "top_k", "cls", "heat_scale", "force", "quiet",
                    "detect", "threshold", "nms_iou", "background_class", "box_head"),
        "Resources": ("gpu", "engine", "precision", "max_memory", "workers", "scheduler"),
        "Help": ("help",),
    },
}


def option_group(cls: type, argument: str, *options: Callable) -> Callable:
    """Decorator: click `options` (each named as a field of the frozen dataclass `cls`) given to
    the command as one `cls` called `argument`, so a command takes a group, not its fields.

    A field without an option on this command keeps its default.
    """
    names = {f.name for f in fields(cls)}

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def gathered(*args, **kwargs):
            group = cls(**{n: kwargs.pop(n) for n in names if n in kwargs})
            return command(*args, **{argument: group}, **kwargs)
        for option in reversed(options):  # shown in the order given
            gathered = option(gathered)
        return gathered
    return decorate


@dataclass(frozen=True, kw_only=True)
class NetSource:
    """Which net a command runs: a shipped model or card's path, a card, or a prototxt and its
    weights (resolve.source_card takes one); for classify-map also the head and stride of its map."""

    model: str | None = None
    model_def: str | None = None
    weights: str | None = None
    card: str | None = None
    output: str | None = None  # --output: the blob that is the class map
    stride: int | None = None  # --stride: a finer map (stride.py)


@dataclass(frozen=True, kw_only=True)
class CardOptions:
    """What a command's options say over the card besides its preprocessing (None: the card's)."""

    labels: str | None = None
    background_class: int | None = None
    box_head: str | None = None
    softmax: bool | None = None


def _model_card(source: NetSource, options: CardOptions, preprocess: PreprocessOverrides):
    """The run's model card (resolve.resolve_card: options over the card, the card over defaults),
    weights checked."""
    from .io.models import require_weights
    from .resolve import resolve_card
    card = resolve_card(source.model, model_def=source.model_def, weights=source.weights,
                        card=source.card, overrides=preprocess, **asdict(options))
    require_weights(card)
    return card


def _source_options(*extra: Callable) -> Callable:
    """--model, --model-def, --weights (and `extra` of NetSource's options) as one NetSource."""
    return option_group(
        NetSource, "source",
        click.option("--model", "model", metavar="NAME",
                     help="A model fcnify ships: caffenet (default) or digits."),
        click.option("--model-def", type=PATH, help="Net definition (deploy .prototxt)."),
        click.option("--weights", type=PATH, help="Weights (.caffemodel)."),
        *extra)


# Caffe's preprocessing terms as options; each one given wins over the model card.
preprocess_options = option_group(
    PreprocessOverrides, "preprocess",
    click.option("--channels", type=click.Choice(["rgb", "bgr", "gray"], case_sensitive=False),
                 help="Channel order the net was trained on."),
    click.option("--raw-scale", type=float, metavar="X",
                 help="Pixels 0-255 are scaled to 0-X before the mean (Caffe's raw_scale)."),
    click.option("--input-scale", type=float, metavar="X",
                 help="Multiply by X after subtracting the mean (Caffe's input_scale / scale)."),
    click.option("--mean", metavar="V[,V,V]|FILE",
                 help="Mean subtracted per channel, in the net's channel order: numbers "
                      "(104,117,123 or one for all), a .npy or a Caffe .binaryproto."),
    click.option("--transpose/--no-transpose", default=None,
                 help="The net was trained on transposed images (height and width swapped, "
                      "e.g. MATLAB-trained MTCNN)."))


SOFTMAX_SETTING = {"auto": None, "on": True, "off": False}


def _card_options(labels_help: str) -> Callable:
    """--labels (`labels_help`), then what --detect reads from the card (--background-class,
    --box-head) and --softmax, as one CardOptions; each one given wins over the card."""
    return option_group(
        CardOptions, "card_options",
        click.option("--labels", "labels", type=PATH, help=labels_help),
        click.option("--background-class", type=click.IntRange(min=0), metavar="N",
                     help="The class that means 'nothing here' (never a box; shaded grey in pictures)."),
        click.option("--box-head", metavar="BLOB",
                     help="Output that regresses each cell's box (4 values: x0, y0, x1, y1 offsets "
                          "in window widths/heights, as MTCNN's conv4-2/conv5-2/conv6-2)."),
        click.option("--softmax", "softmax", type=click.Choice(list(SOFTMAX_SETTING)), default="auto",
                     show_default=True, callback=lambda ctx, param, value: SOFTMAX_SETTING[value],
                     help="Class map as probabilities (on: the net's own Softmax, or fcnify's where "
                          "the net has none) or raw scores (off); auto: as the card says (on "
                          "without one)."))


# ------------------------------------------------------------------ convert

@cli.command()
@_source_options()
@click.option("--out", "out_prefix", metavar="PREFIX|DIR/",
              help="Output prefix: writes PREFIX_full_conv.{prototxt,caffemodel,json}; a path "
                   "ending in / or an existing folder is a folder to write NET_full_conv.* into.")
@click.option("--input-size", type=SIZE, metavar="H[xW]", help="Input size written into the new net.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--no-verify", is_flag=True, help="Skip the equivalence check (not recommended).")
@click.option("--keep-output-names", is_flag=True,
              help="Keep the net's output blobs' names (default: converted blobs become NAME-conv).")
@click.option("--gpu", type=int, metavar="ID", help="Run the check on this GPU (CUDA build).")
@click.option("--engine", type=ENGINE, default=PROOF_ENGINE, show_default=True,
              help="Engine that runs the equivalence check (Caffe proves it by default).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: the whole report as one JSON document on stdout (exit code unchanged).")
@_card_options("Class names, one per line in the net's order (written into the card).")
@preprocess_options
@click.pass_obj
def convert(obj, source, out_prefix, input_size, force, no_verify, keep_output_names, gpu, engine, fmt,
            card_options, preprocess):
    """Turn InnerProduct layers into convolutions, transplant weights, check equivalence.

    \b
    Examples:
      fcnify convert                                  # CaffeNet, weights from `fcnify fetch caffenet`
      fcnify convert --model digits --out /tmp/digits
      fcnify convert --model-def deploy.prototxt --weights net.caffemodel --out mynet
      fcnify convert --model-def lenet.prototxt --weights lenet.caffemodel --input-scale 0.00390625
      fcnify convert --model-def det2.prototxt --weights det2.caffemodel --channels rgb --mean 127.5 \\
          --input-scale 0.0078125 --transpose --background-class 0 --box-head conv5-2
    """
    from .convert import convert as do_convert
    from .surgery.report import conversion_document, conversion_report
    card = _model_card(source, card_options, preprocess)
    from .engines import make_engine
    runner = None if no_verify else make_engine(engine, gpu, verbose=obj.verbose)
    t0 = time.perf_counter()
    try:
        result = do_convert(card.model_def, card.weights, out_prefix,
                            input_size=input_size, force=force,
                            check=not no_verify, gpu=gpu, card=card, runner=runner,
                            keep_output_names=keep_output_names)
    except NotEquivalentError as exc:
        if exc.result is not None:
            click.echo(json.dumps(conversion_document(exc.result, time.perf_counter() - t0))
                       if fmt == "json" else conversion_report(exc.result))
        raise
    if fmt == "json":
        click.echo(json.dumps(conversion_document(result, time.perf_counter() - t0)))
        return
    click.echo(conversion_report(result))
    click.echo(f"done in {time.perf_counter() - t0:.1f} s")


@cli.command()
@click.argument("original", type=PATH)
@click.argument("fcn", type=PATH)
@click.option("--weights", type=PATH, help="Original weights (default: from FCN's card).")
@click.option("--fcn-weights", type=PATH, help="FCN weights (default: FCN with .caffemodel).")
@click.option("--samples", default=3, show_default=True, help="Seeded random inputs (plus cat.jpg).")
@click.option("--gpu", type=int, metavar="ID", help="Run on this GPU (CUDA build).")
@click.option("--engine", type=ENGINE, default=PROOF_ENGINE, show_default=True,
              help="Engine that runs both nets.")
@click.option("--precision", type=click.Choice(["f32", "bf16"]), default="f32", show_default=True,
              help="bf16: run FCN in bf16 and ORIGINAL in f32 on the engine (default for bf16: "
                   "openvino, else torch) and report bf16's own criterion (argmax agreement, largest "
                   "score error, the bound with u = 2^-8; docs/verify.md), never EQUIVALENT; CPUs "
                   "without AVX512-BF16 or AMX are refused.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: the whole report as one JSON document on stdout (exit code unchanged).")
@click.option("--card", type=PATH,
              help="Model card whose preprocessing the check uses (default: FCN's own card).")
@preprocess_options
@click.pass_obj
def verify(obj, original, fcn, weights, fcn_weights, samples, gpu, engine, precision, fmt, card, preprocess):
    """Check that FCN reproduces ORIGINAL at ORIGINAL's input size (exit 1 if not).

    Scores before Softmax must agree within a float32 accumulation bound
    (docs/verify.md), and so must every other output head both nets have
    (a box regression too), each with its own bound; the report gives the
    largest difference and the share of the bound it used. The inputs are
    convert's (same seeds), preprocessed as FCN's card says (as convert
    wrote it), or --card's, with the preprocessing options over it.

    \b
    Examples:
      fcnify verify deploy.prototxt mynet_full_conv.prototxt --weights net.caffemodel
      fcnify verify deploy.prototxt mynet_full_conv.prototxt --engine torch --format json
    """
    from .surgery.report import verify_document, verify_report
    from .convert import verify_files
    if precision == "bf16":  # Caffe has no bf16: the default engine is auto's bf16 pick
        from .engines import AUTO, check_choice
        engine = check_choice(AUTO if engine == PROOF_ENGINE else engine, precision)
    report = verify_files(Path(original), Path(fcn), weights, fcn_weights, samples=samples, gpu=gpu,
                          verbose=obj.verbose, engine=engine, card=card, overrides=preprocess,
                          precision=precision)
    if precision == "bf16":
        from .surgery.bf16 import bf16_report
        click.echo(json.dumps(verify_document(report, Path(original), Path(fcn))) if fmt == "json"
                   else bf16_report(report))
        if not report.within_bound:
            raise SystemExit(1)
        return
    click.echo(json.dumps(verify_document(report, Path(original), Path(fcn))) if fmt == "json"
               else verify_report(report))
    if not report.equivalent:
        raise SystemExit(1)


@cli.command()
@click.argument("net", type=PATH)
@click.option("--input-size", type=SIZE, metavar="H[xW]", help="Input size to report shapes at.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: the card's fields, the surgery, the geometry and the shapes as one document.")
@click.pass_obj
def info(obj, net, input_size, fmt):
    """Per-layer shapes and the dense map's geometry, computed from the layers.

    Works on any deploy prototxt; a net with InnerProduct layers is converted
    in memory to report the map it would give.

    \b
    Example:
      fcnify info deploy.prototxt --input-size 451
    """
    from .surgery.report import net_document, net_info
    click.echo(json.dumps(net_document(Path(net), input_size)) if fmt == "json"
               else net_info(Path(net), input_size))


@cli.command()
@click.argument("net", type=PATH)
@click.option("--weights", type=PATH, help="Weights (.caffemodel) of a prototxt NET.")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="File format to write.")
@click.option("--out", "out_file", type=PATH, required=True, help="File to write (FILE.onnx).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--no-verify", is_flag=True, help="Skip the check against Caffe (not recommended).")
@_card_options("Class names, one per line (over the card's).")
@preprocess_options
def export(net, weights, fmt, out_file, force, no_verify, card_options, preprocess):
    """Write the fully-convolutional net as an ONNX model with free input height and width.

    NET is a model card (.json, from convert), a model fcnify ships (digits,
    caffenet), or a prototxt with --weights; a net that convert would convert
    (InnerProduct layers, a pooling that collapses the map) gets the same
    surgery first. The preprocessing, label and detector options override the
    card's, as in convert. Caffe's pooling, LRN and BatchNorm arithmetic is
    kept; a layer without an exact ONNX form is refused by name. The card
    (preprocessing, labels, background class, box head, softmax) and the
    geometry of the net written go into the model's metadata; with the
    Softmax on for a net without one, an output NAME_softmax is added. The
    file is checked with onnx.checker and, run by ONNX Runtime, against the
    net in Caffe (as `fcnify verify` checks a conversion) before it is put
    in place.

    \b
    Examples:
      fcnify export mynet_full_conv.json --out mynet.onnx
      fcnify export deploy.prototxt --weights net.caffemodel --out net.onnx
      fcnify export digits --out digits.onnx
    """
    from .export import export_onnx
    from .io.models import require_weights
    options = dict(weights=weights, overrides=preprocess, **asdict(card_options))
    card = _export_card(net, options)
    require_weights(card)
    result = export_onnx(card, Path(out_file), force=force, check=not no_verify)
    click.echo(result.summary())


def _export_card(net: str, options: dict):
    """The model card for `fcnify export NET`: a card file, a shipped model, or a prototxt,
    with the options given over it (resolve.resolve_card, as for every command)."""
    from .io.models import shipped_models
    from .resolve import resolve_card
    path = Path(net)
    if not path.exists() and net in shipped_models():
        return resolve_card(net, **options)
    if path.suffix == ".json":
        return resolve_card(card=path, **options)
    if options["weights"] is None:
        raise click.UsageError("a prototxt NET needs --weights")
    return resolve_card(model_def=path, **options)


# ------------------------------------------------------------------ classify-map

@dataclass(frozen=True, kw_only=True)
class Outputs:
    """Where classify-map writes and what it prints (the library's part is SaveOptions)."""

    out_dir: str | None = None
    fmt: str = "text"
    quiet: bool = False


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What classify-map runs on: the engine and its device and precision, the memory budget, the
    Dask cluster (a scheduler's address, or a number of local workers)."""

    gpu: int | None = None
    engine: str = DEFAULT_ENGINE
    precision: str = "f32"
    max_memory: int | None = None
    workers: int | None = None
    scheduler: str | None = None

    @property
    def dask(self) -> bool:
        return self.scheduler is not None or self.workers is not None


def _class_list(ctx, param, value: str | None) -> tuple[str, ...] | None:
    """--classes 'a, b' -> ('a', 'b'), checked against the net by MapJob.for_model."""
    return tuple(c.strip() for c in value.split(",") if c.strip()) if value else None


@cli.command("classify-map", cls=GroupedCommand)
@click.argument("images", nargs=-1, required=True)
@_source_options(
    click.option("--card", type=PATH, help="A model card (.json) written by convert."),
    click.option("--output", "output", metavar="BLOB",
                 help="Output blob that is the class map (default: the net's last); the net's other "
                      "outputs are saved beside it as NAME.BLOB.npy."),
    click.option("--stride", type=IntIn("must be a positive divisor of the net's stride", min=1),
                 metavar="S", help="Map every S px, S a divisor of the net's stride (à trous / "
                                   "shift-and-stitch)."))
@_card_options("Override the labels file.")
@preprocess_options
@option_group(
    MapOptions, "mapping",
    click.option("--size", type=SIZE, metavar="N|HxW", help="Resize to N x N (or H x W) before mapping."),
    click.option("--scale", type=FloatIn("must be positive", min=0, min_open=True),
                 help="Resize by this factor before mapping."),
    click.option("--long-side", type=click.IntRange(min=1), metavar="N",
                 help="Resize so the longer side is N px, keeping the aspect ratio."),
    click.option("--short-side", type=click.IntRange(min=1), metavar="N",
                 help="Resize so the shorter side is N px, keeping the aspect ratio."),
    click.option("--level", type=IntIn("must be 0 or more", min=0), metavar="N",
                 help="Map level N of a tiled TIFF's pyramid (0: full resolution; read a tile at a time)."),
    click.option("--tile", type=IntIn("must be positive", min=1), metavar="N",
                 help="Force tiles of N x N px."),
    click.option("--batch", type=IntIn("not a number of images (1 or more)", min=1), default=8,
                 show_default=True, metavar="N",
                 help="Up to N consecutive images fed at one size go through one forward pass (onnx "
                      "and openvino engines; fewer when --max-memory cannot hold N): throughput on "
                      "folders of small images. 1: one image per pass."),
    click.option("--scales", type=SCALES, metavar="LIST",
                 help="Image pyramid, e.g. 1,0.75,0.5: a map per scale, fused."),
    click.option("--detect", is_flag=True, help="Boxes from cells above --threshold, merged by NMS."),
    # the ranges are MapJob's to check (the API's jobs too); the types only word a non-number
    click.option("--threshold", type=FloatIn("not a probability in [0, 1]"), default=0.9,
                 show_default=True, metavar="P", help="Probability a cell needs to become a box (--detect)."),
    click.option("--nms-iou", type=FloatIn("not an overlap in (0, 1]"), default=0.3, show_default=True,
                 metavar="IOU", help="Boxes of a class overlapping a better one by more than this are dropped."))
@option_group(
    SaveOptions, "saving",
    click.option("--save", "save", type=SAVE, metavar="LIST", help=save_help()),
    click.option("--store", "store", type=click.Choice(["npy", "zarr"]), default="npy", show_default=True,
                 help="npy: the map in memory, saved as .npy; zarr: written a chunk at a time into "
                      "OUT/NAME.zarr as tiles finish (maps larger than memory; docs/large.md)."),
    click.option("--classes", "classes", metavar="LIST", callback=_class_list,
                 help="--store zarr: keep the scores of these classes only (names or ids, comma-separated)."),
    click.option("--resume", is_flag=True,
                 help="--store zarr: continue the store of an interrupted run of the same command; "
                      "only its missing chunks run."),
    click.option("--class", "cls", metavar="NAME_OR_ID", help="Class for the heatmap (default: top)."),
    click.option("--top-k", type=IntIn("must be at least 1", min=1), default=5, show_default=True,
                 help="Classes listed per cell and overall."),
    click.option("--heatmap-scale", "heat_scale", type=click.Choice(["unit", "map"]), default="unit",
                 show_default=True,
                 help="Heatmap colours over probability 0-1 (unit), or stretched over the class's own "
                      "range (map; the picture's title says so). The title states the peak either way."),
    click.option("--force", is_flag=True, help="Overwrite existing outputs."))
@option_group(
    Outputs, "outputs",
    click.option("--out", "out_dir", type=PATH, help="Folder for .npy/.json/.png outputs (see --save)."),
    click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
                 help="Print a text summary, or one JSON document per image."),
    click.option("--quiet", is_flag=True, help="No progress bar."))
@option_group(
    Resources, "resources",
    click.option("--gpu", type=int, metavar="ID", help="Run on this GPU."),
    click.option("--engine", type=ENGINE, default=DEFAULT_ENGINE, show_default=True, help=engine_help()),
    click.option("--precision", type=click.Choice(["f32", "bf16"]), default="f32", show_default=True,
                 help="bf16: OpenVINO's (or torch autocast's) bfloat16 arithmetic, on CPUs with AMX or "
                      "AVX512-BF16 only: several times faster, close to but not equal to the f32 map "
                      "(docs/verify.md, bf16); recorded in map.json."),
    click.option("--max-memory", type=MEMORY, metavar="SIZE",
                 help="Memory budget, e.g. 2GiB (default: half of free RAM)."),
    click.option("--workers", type=IntIn("need at least one worker", min=1), metavar="N",
                 help="Spread the images over N local Dask worker processes; needs --out."),
    click.option("--scheduler", metavar="ADDRESS",
                 help="Spread the images over the Dask cluster at ADDRESS (tcp://host:8786); needs --out."))
@click.pass_context
def classify_map(ctx, images, source: NetSource, card_options: CardOptions, preprocess: PreprocessOverrides,
                 mapping: MapOptions, saving: SaveOptions, outputs: Outputs, resources: Resources):
    """Dense classification maps of images at their own resolution.

    IMAGES are files, folders (their images) or glob patterns. The net is
    loaded once; an image that fails is reported and skipped, and the exit
    status is 1 if any failed. With --scheduler or --workers the images (and
    the tiles of large ones) are spread over Dask workers, each loading the
    net once and writing the same files into --out (see docs/dask.md).

    \b
    Examples:
      fcnify classify-map cat.jpg --model caffenet --size 451 --out maps/
      fcnify classify-map scans/ --model-def fcn.prototxt --weights fcn.caffemodel --format json
      fcnify classify-map scans/ --model digits --out maps/ --workers 2
      fcnify classify-map photo.jpg --card det2_full_conv.json --output prob1 --out maps/
      fcnify classify-map photo.jpg --model-def det1.prototxt --weights det1.caffemodel --output prob1 \\
          --channels rgb --mean 127.5 --input-scale 0.0078125 --transpose \\
          --background-class 0 --box-head conv4-2 --scales 0.3,0.2,0.13 --detect --out boxes/
      fcnify classify-map /shared/scans/ --card /shared/mynet_full_conv.json --out /shared/maps \\
          --scheduler tcp://10.0.0.5:8786
    """
    from .io.images import list_images
    from .io.outputs import renamed_note, unique_names
    if resources.dask:
        _dask_usage(resources, outputs.out_dir)
    job = MapJob.of(mapping, saving, budget=resources.max_memory, command=_command_line())
    paths = list_images(images)
    names = unique_names(paths) if outputs.out_dir else {}
    for line in renamed_note(names):
        _err(f"fcnify: {line}")
    the_card = _model_card(source, card_options, preprocess)
    from .engines import check_choice
    check_choice(resources.engine, resources.precision)  # a missing package or bf16 here: before any output
    spec = ModelSpec(card=the_card, engine=resources.engine, gpu=resources.gpu, verbose=ctx.obj.verbose,
                     output=source.output, stride=source.stride, precision=resources.precision)
    with _out_folder(Path(outputs.out_dir)) if outputs.out_dir else nullcontext():
        if resources.dask:
            _map_on_dask(ctx, paths, spec, job, names, outputs, resources)
        else:
            _map_here(ctx, paths, spec, job, names, outputs)


@contextmanager
def _out_folder(out: Path):
    """--out: made if missing, refused before any work if it cannot hold the outputs.

    A folder this run made is removed again when the run fails or is
    interrupted and leaves it empty (as convert does with its folder).
    """
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is not a folder", out)
    made = [p for p in (out, *out.absolute().parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    try:
        if not os.access(out, os.W_OK):
            raise InputError("--out folder is not writable", out)
        yield
    except BaseException:
        for folder in made:  # innermost first; one that is not empty stops it
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _not_saved(unmapped: Sequence[str]) -> None:
    if unmapped:
        _err(f"fcnify: not saved: output(s) {', '.join(unmapped)} (their cells do not "
             "line up with the class map's)")


def _map_here(ctx, paths, spec, job, names, outputs: Outputs) -> None:
    """classify-map in this process: one model, closed on every path out (ctx.with_resource)."""
    from .dense.pipeline import map_paths
    model = ctx.with_resource(spec.load())
    model.warn = lambda message: _err(f"fcnify: warning: {_one_line(message)}")
    _not_saved(model.unmapped_heads)
    job = job.for_model(model)
    out_dir, fmt = outputs.out_dir, outputs.fmt
    show_bar = not outputs.quiet and sys.stderr.isatty()
    failed = 0
    for result in map_paths(model, paths, job, Path(out_dir) if out_dir else None, names,
                            _bar(len(paths)) if show_bar else None):
        if result.ok:
            _print_map(result, fmt, job, saved=bool(out_dir))
            continue
        exc = _with_option_names(result.error)
        if fmt == "json":
            from .io.outputs import failure_document
            click.echo(json.dumps(failure_document(result.path, exc)))
        if len(paths) == 1:
            raise result.error
        failed += 1
        _err(f"fcnify: skipped {_one_line(exc)}")
    if failed:
        _err(f"fcnify: {failed} of {len(paths)} image(s) failed")
        raise SystemExit(1)


class Bar:
    """The one progress bar of the commands, on stderr: `bar(done, total)` moves it to `done`
    of `total` (None: not known; the bar counts instead). Made when entered if `length` is
    known, else at the first report; a `with` block closes it."""

    def __init__(self, label: str, length: int | None = None) -> None:
        self.label, self.length, self._bar = label, length, None

    def __enter__(self) -> "Bar":
        if self.length is not None:
            self._open(self.length)
        return self

    def _open(self, total: int | None) -> None:
        self._bar = click.progressbar(length=total or 0, label=self.label, file=sys.stderr,
                                      show_pos=total is None)
        self._bar.__enter__()

    def __call__(self, done: int, total: int | None) -> None:
        if self._bar is None:
            self._open(total)
        if total:
            self._bar.length = total
        self._bar.update(done - self._bar.pos)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _bar(count: int):
    """A progress bar per image, for pipeline.map_paths (its ProgressFor)."""
    return lambda i, path: Bar(f"[{i + 1}/{count}] {path.name}", length=1)


def _print_map(result, fmt: str, job, *, saved: bool) -> None:
    """One mapped image on stdout: a text summary, or its --format json line."""
    dm = result.map
    if fmt == "json":
        click.echo(json.dumps(result.document(job)))
        return
    click.echo(result.text(job, _wrote(result.written, result.name, job) if saved else None))
    if dm is None:  # --store zarr: the summary said it all
        return
    t = dm.timings
    click.echo(f"time: forward {t['forward']:.2f} s, preprocess {t['preprocess']:.2f} s, "
               f"image {t['load_image']:.2f} s\n")


def _wrote(paths, name: str | None, job) -> str:
    """The 'wrote ...' line of an image: its files, a pyramid's per-scale ones named once."""
    from .dense.pipeline import scale_names
    from .io.outputs import written_line
    if name is None:
        return "wrote " + ", ".join(map(str, paths))
    return written_line(paths, name, [s[len(name) + 1:] for s in scale_names(name, job)])


def _dask_usage(resources: Resources, out_dir: str | None) -> None:
    """--scheduler/--workers: the option combinations that cannot work, refused before the work."""
    if resources.scheduler is not None and resources.workers is not None:
        raise click.UsageError("give either --scheduler or --workers, not both")
    if not out_dir:
        raise click.UsageError("--scheduler/--workers write each map's files: give --out DIR")


@contextmanager
def _signals_to(stop: threading.Event):
    """Ctrl-C and SIGTERM set `stop` instead of raising: raised inside Dask's waits, they print
    its tracebacks; map_images asks `stop` and ends the run (and stops its workers) in order."""
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _map_on_dask(ctx, paths, spec, job, names, outputs: Outputs, resources: Resources) -> None:
    """classify-map --scheduler/--workers: one line per image as it finishes, then a summary."""
    from .dense.distributed import connect, map_images, result_document
    bar = Bar("mapping", length=len(paths)) if not outputs.quiet and sys.stderr.isatty() else None

    def progress(result, done, total):
        if bar is not None:
            click.echo("\r\033[K", err=True, nl=False)  # the line below replaces the bar, then it is redrawn
        for message in result.warnings:
            _err(f"fcnify: warning: {_one_line(message)}")
        if outputs.fmt == "json":
            click.echo(json.dumps(result_document(result)))
        elif result.ok:
            if result.text:  # the summary one process prints, made on the worker
                click.echo(result.text)
            rows, cols = result.map_shape
            how = f"{result.tiles} tiles" if result.mode == "tiled" else result.mode
            click.echo(f"{result.path}: map {rows}x{cols} ({how}), {result.seconds:.2f} s on "
                       f"{', '.join(result.workers)}; {_wrote(result.outputs, names.get(Path(result.path)), job)}")
        if not result.ok:
            _err(f"fcnify: skipped {_one_line(result.error)}")
        if bar is not None:
            bar(done, total)

    stop = threading.Event()
    with _signals_to(stop), connect(resources.scheduler, resources.workers) as client, \
            bar if bar is not None else nullcontext():
        report = map_images(paths, spec, outputs.out_dir, client, job=job, progress=progress,
                            on_model=lambda info: _not_saved(info.unmapped_heads), stop=stop.is_set)
    if stop.is_set():
        raise KeyboardInterrupt
    _err(f"fcnify: {report.summary()}")
    if report.failed:
        raise SystemExit(report.failed[0].exit_code if len(paths) == 1 else 1)


# ------------------------------------------------------------------ fetch, doctor, demo

@cli.command()
@click.argument("name")
@click.option("--dest", type=PATH, help="Folder to download into (default: models folder).")
def fetch(name, dest):
    """Download official Caffe weights (checked against the SHA-1 in Caffe's readme).

    \b
    Example:
      fcnify fetch caffenet
    """
    from .io.fetch import fetch as do_fetch, model_spec
    spec = model_spec(name)
    with Bar(spec.filename) as bar:
        path = do_fetch(name, Path(dest) if dest else None, bar if sys.stderr.isatty() else None)
    click.echo(f"{path} (sha1 {spec.sha1} verified)")


@cli.command()
@click.pass_obj
def doctor(obj):
    """Check the installation: pycaffe, its build, Caffe's source tree and cache."""
    from .doctor import diagnose
    ok, lines = diagnose(verbose=obj.verbose)
    for line in lines:
        click.echo(line)
    if not ok:
        raise SystemExit(2)


@cli.command()
@click.option("--out", "out_dir", default="fcnify-demo", show_default=True, type=PATH,
              help="Folder for the demo's outputs.")
@click.pass_obj
def demo(obj, out_dir):
    """The embedded demo: convert the shipped digits model and map a scene of digits.

    Then, if the CaffeNet weights have been fetched, map Caffe's cat.jpg at 451x451.
    """
    from .demo import run_demo
    ok = run_demo(Path(out_dir), echo=click.echo, verbose=obj.verbose)
    if not ok:
        raise SystemExit(1)


def _usage_line(exc: click.UsageError) -> str:
    """A usage error in one line, as every other error, pointing at the command's --help.

    A bare `fcnify` (click's NoArgsIsHelpError, whose message is the help) shows the help.
    """
    if type(exc).__name__ == "NoArgsIsHelpError":
        return ""
    where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    return exc.format_message() + where


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the CLI, turning fcnify errors into one line.

    Run as the command (no `argv`), it stops Caffe's worker itself before
    returning, with Ctrl-C recorded rather than raised: an interrupt that
    lands then still exits 130, quietly, instead of a traceback from atexit.
    """
    code = _main(list(argv if argv is not None else sys.argv[1:]))
    return code if argv is not None else _stop_engines(code)


def _stop_engines(code: int) -> int:
    from .engines.sandbox import close_all
    hit: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # left recording: the process is about to exit
        signal.signal(sig, lambda signum, frame: hit.append(signum))
    close_all()
    if hit and code != 130:
        _err("fcnify: interrupted")
        return 130
    return code


def _main(args: list[str]) -> int:
    _argv[:] = args

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return cli.main(args=args, prog_name="fcnify")
    except BaseException as exc:  # every failure, translated once
        error = CommandError.of(exc, debug="--debug" in args)
        error.show()
        return error.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
