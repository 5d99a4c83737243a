"""Map many images on a Dask cluster: each worker loads the net once and writes the usual files.

The client does nothing heavy. It checks the output names, asks one worker to
load the model (so a model that cannot load fails once, not once per image),
then submits one task per image. A worker maps the image and writes its
files with the batch pipeline (pipeline.map_image and save), exactly as
`classify-map` does in one process, every option included; when a
single-scale image needs tiling, the worker answers with its tile plan instead,
the client spreads the tiles over the workers, and one worker stitches their
cells into the map and writes the files.

A worker that dies mid-image has its tasks re-run elsewhere by Dask's
scheduler. Files are staged under hidden `.NAME.*.fcnify-tmp-*` names and
renamed at the end, so no file under an output name is ever half-written;
the stages a killed worker leaves behind are removed when the run ends.

Dask is imported inside functions only: fcnify works without it, and
`pip install 'fcnify[dask]'` adds it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import pickle
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from ..engines import DEFAULT_ENGINE
from ..errors import EngineCrash, FcnifyError, ImageError, InputError, OutputError, ResourceError, SetupError
from ..files import TMP_MARK, ScratchDir
from ..io.models import ModelCard
from ..io.outputs import unique_names
from .pipeline import MapJob, MapResult, ModelSpec, check_outputs, class_id, output_paths
from .tiling import Tile

if TYPE_CHECKING:
    from distributed import Client

    from .dense import DenseModel
    from ..io.labels import Labels

WORKER_WAIT_S = 60.0  # how long a run waits for a cluster without workers to get one


@dataclass(frozen=True, kw_only=True)
class Job:
    """What every task of a run needs: the model, how to map each image (the pipeline's), where outputs go."""

    key: str  # names the model in each worker's cache
    model: ModelSpec
    map_job: MapJob  # --class already an index (checked on one worker)
    out_dir: str
    heads: tuple[str, ...] = ()  # the net's other outputs saved beside the map
    workers_per_host: tuple[tuple[str, int], ...] = ()
    names: tuple[tuple[str, str], ...] = ()  # image path -> output name (outputs.unique_names)

    def name_for(self, path: str) -> str:
        """The output name the client chose for `path`, unique among the run's images."""
        return dict(self.names).get(path) or Path(path).stem


@dataclass(frozen=True)
class TilePlan:
    """A worker's answer for an image that needs tiling: the plan, made once for all workers."""

    fed: tuple[int, int]  # (height, width) the net sees, after --size/--scale/--long-side
    resize: tuple[tuple[int, int] | None, float | None]  # (size, scale) that resizes the image to `fed`
    tiles: tuple[Tile, ...]
    tile_size: tuple[int, int] | None
    seconds: float
    worker: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class TileCells:
    """What one worker computed for a share of a plan's tiles."""

    tiles: tuple[Tile, ...]
    cells: tuple[tuple[np.ndarray, dict[str, np.ndarray]], ...]  # class block, other outputs' blocks
    timings: dict
    seconds: float
    worker: str


@dataclass
class ImageResult:
    """One image's outcome: where its files are, or why it failed."""

    path: str
    ok: bool
    error: str | None = None
    exit_code: int = 0
    outputs: tuple[str, ...] = ()
    map_shape: tuple[int, int] | None = None
    mode: str | None = None
    tiles: int = 0
    seconds: float = 0.0  # time spent on the workers (image, forward, files), parts summed
    workers: tuple[str, ...] = ()  # workers that ran a part of it, the one that wrote the files last
    pid: int | None = None  # process id of the worker that wrote the files
    loads: int = 0  # times that process loaded the model in this run (1; more after a Caffe crash)
    warnings: tuple[str, ...] = ()  # what DenseModel.warn said (costly forced tiles), for the client to show
    text: str = ""  # the summary one process prints (pipeline.MapResult.text), made on the worker
    document: dict | None = None  # the --format json document one process prints (MapResult.document)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """What the client learns from loading the model once on a worker."""

    num_classes: int
    labels: "Labels | None"
    heads: tuple[str, ...]  # other outputs saved beside the class map
    unmapped_heads: tuple[str, ...]  # outputs that cannot be (cells that do not line up)


@dataclass
class MapReport:
    """A whole run: every image's result in input order, and how fast it went."""

    results: list[ImageResult]
    seconds: float
    workers: int
    cleaned: int = 0  # stale .fcnify-tmp- files of this run's outputs that were removed

    @property
    def done(self) -> list[ImageResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[ImageResult]:
        return [r for r in self.results if not r.ok]

    @property
    def images_per_minute(self) -> float:
        return 60.0 * len(self.done) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{len(self.done)} done, {len(self.failed)} failed of {len(self.results)} image(s) "
                f"in {self.seconds:.1f} s ({self.images_per_minute:.1f} images/min) "
                f"on {self.workers} Dask worker(s)")


# ------------------------------------------------------------------ client side

def _dask():
    """The `distributed` package, or one line saying how to get it."""
    try:
        import distributed
    except ImportError:
        raise SetupError("mapping on Dask needs the `distributed` package: "
                         "pip install 'fcnify[dask]'") from None
    return distributed


@contextmanager
def connect(scheduler: str | None = None, workers: int | None = None,
            timeout: float = 30.0) -> Iterator["Client"]:
    """A client of the Dask scheduler at `scheduler`, or of `workers` local processes.

    Local workers listen on loopback only, run one thread each (one Caffe
    process per worker; more threads would only queue on it) and are stopped
    when the block ends. They ignore SIGINT (the client decides what Ctrl-C
    means) and keep their temporary files in one folder, removed at the end
    however they ended.
    """
    distributed = _dask()
    if (scheduler is None) == (workers is None):
        raise InputError("give either a scheduler address or a number of workers")
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        with client:
            yield client
        return
    if workers < 1:
        raise InputError(f"--workers {workers}: need at least one worker")
    import dask
    folder = ScratchDir("dask")  # the workers' temporary files, whatever ends them (even a SIGKILL)
    scratch = folder.name
    try:
        with _sigint_ignored(), dask.config.set({"temporary-directory": scratch}):
            # no dashboard; the scheduler's small HTTP server (health, metrics) on a free loopback port
            cluster = distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                env={"TMPDIR": scratch}, local_directory=scratch)
        with cluster, distributed.Client(cluster, timeout=timeout) as client, \
                dask.config.set({"temporary-directory": scratch}):
            try:
                yield client
            except BaseException:
                _quiet(client)  # stopped mid-task (Ctrl-C, a failure): "still alive, killing" is expected
                raise
    finally:
        folder.cleanup()


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while the local cluster starts, so that its worker processes ignore it.

    A Ctrl-C at the terminal signals the whole process group: the workers
    would die mid-write. Ignoring is inherited by the processes spawned now,
    so only the client sees it, and it cancels the run and stops the workers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def model_key(spec: ModelSpec) -> str:
    """Names a model in the workers' caches; changes when the card, its files or the options change."""
    stats = []
    for p in (spec.card.model_def, spec.card.weights):
        try:
            st = os.stat(p) if p is not None else None
            stats.append((st.st_size, st.st_mtime_ns) if st else None)
        except OSError:
            stats.append(None)
    data = pickle.dumps((spec, stats))
    return "fcnify-" + hashlib.sha1(data).hexdigest()[:16]


def map_images(paths: Sequence[str | Path], card: ModelCard | ModelSpec, out_dir: str | Path,
               client: "Client", *, job: MapJob | None = None, engine: str = DEFAULT_ENGINE,
               gpu: int | None = None, verbose: bool = False, stride: int | None = None,
               output: str | None = None, progress: Callable[[ImageResult, int, int], None] | None = None,
               on_model: Callable[[ModelInfo], None] | None = None, timeout: float | None = None,
               stop: Callable[[], bool] | None = None, **settings) -> MapReport:
    """Map images on the Dask cluster behind `client`, writing each image's files into `out_dir`.

    `card` with engine/gpu/verbose/stride/output, or a pipeline.ModelSpec,
    says which model; `job` (or its fields as keywords: size, scale,
    long_side, scales, detect, cls, top_k, force, ...) how each image is
    mapped, exactly as pipeline.map_paths maps it in one process: the files
    are the same (byte for byte under the same BLAS threading: Dask's nanny
    runs workers with one BLAS thread). A bad image becomes a failed
    ImageResult and the rest go on; `progress(result, done, total)` is called
    here, on the client, as each image finishes, `on_model(info)` once the
    model has loaded. Paths must mean the same files on the workers (a
    shared file system). Raises what loading the model raises, InputError
    for a bad `cls`, and TimeoutError after `timeout` s. `stop()`, asked a
    few times a second, ends the run early with KeyboardInterrupt (the CLI's
    Ctrl-C). Interrupted, the images not finished leave nothing in `out_dir`:
    a local cluster's workers are stopped first, then their staged files and
    any output they renamed into place are removed.
    """
    started = time.perf_counter()
    _dask()
    spec = card if isinstance(card, ModelSpec) else ModelSpec(card=card, engine=engine, gpu=gpu,
                                                              verbose=verbose, output=output, stride=stride)
    job_map = job if job is not None else MapJob(**settings)
    out = Path(out_dir)
    if not out.is_dir():
        raise OutputError("output folder does not exist or is not a folder", out)
    paths = [Path(p) for p in paths]
    names = unique_names(paths)
    try:
        client.wait_for_workers(1, timeout=min(timeout or WORKER_WAIT_S, WORKER_WAIT_S))
    except TimeoutError:
        raise ResourceError(f"the Dask cluster has no workers (waited {WORKER_WAIT_S:.0f} s)") from None
    workers = client.scheduler_info(n_workers=-1)["workers"]
    hosts = Counter(w.get("host", a) for a, w in workers.items())
    run = Job(key=model_key(spec), model=spec, map_job=job_map, out_dir=str(out),
              workers_per_host=tuple(sorted(hosts.items())),
              names=tuple((str(p), n) for p, n in names.items()))
    owner: dict = {}  # future -> index of its image
    finished: set[int] = set()  # images whose result the client has
    try:
        info = _result(client.submit(_probe, run, pure=False), timeout, stop)
        if isinstance(info, FcnifyError):
            raise info
        if on_model is not None:
            on_model(info)
        classes = None if job_map.classes is None else tuple(
            class_id(c, info.num_classes, info.labels, "--classes") for c in job_map.classes)
        run = replace(run, heads=info.heads,
                      map_job=replace(job_map, cls=class_id(job_map.cls, info.num_classes, info.labels),
                                  classes=classes))
        results, cleaned = _run(client, run, paths, out, len(workers), owner, finished,
                                progress, timeout, stop)
    except BaseException:
        if owner:  # interrupted or timed out: what has not finished leaves nothing behind
            _abandon(client, run, out, [p for i, p in enumerate(paths) if i not in finished], owner)
        raise
    finally:
        _release(client, run.key)
    return MapReport(results, time.perf_counter() - started, len(workers), cleaned)


def _quiet_dask() -> None:
    """Only Dask's errors from here on (runs on the client and on each local worker)."""
    logging.getLogger("distributed").setLevel(logging.ERROR)


def _quiet(client) -> None:
    """_quiet_dask here and on a local cluster's workers (a remote cluster's logs are not ours)."""
    _quiet_dask()
    if client.cluster is not None:
        try:
            client.run(_quiet_dask, on_error="ignore")
        except Exception:  # noqa: BLE001 - a worker already gone says nothing either
            pass


POLL_S = 0.1  # how often the client looks at its tasks (and at `stop`)


def _result(fut, timeout: float | None, stop: Callable[[], bool] | None):
    """A future's value, waited for here: Dask's own wait prints tracebacks when Ctrl-C lands in it."""
    next(_completed({fut: 0}, timeout, stop))
    return fut.result()


def _completed(owner: dict, timeout: float | None, stop: Callable[[], bool] | None) -> Iterator:
    """The futures of `owner` as they finish; the caller removes each (and may add new ones)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while owner:
        done = [f for f in list(owner) if f.done()]
        for fut in done:
            yield fut
        if done:
            continue
        if stop is not None and stop():
            raise KeyboardInterrupt
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the Dask run did not finish within {timeout:g} s")
        time.sleep(POLL_S)


def _abandon(client, job: Job, out: Path, unfinished: list[Path], owner: dict) -> None:
    """Cancel the run; once no worker can write any more, remove what the unfinished images wrote.

    Their outputs did not exist before the run (or --force allowed replacing
    them); a local cluster is closed here, so its workers stop first; a remote
    cluster's running tasks end on their own, and what they write after this is theirs.
    """
    try:
        if client.cluster is not None:  # stopping busy workers makes Dask warn: expected, not news
            _quiet(client)
        client.cancel(list(owner))
        if client.cluster is not None:
            client.cluster.close()
    finally:
        for path in unfinished:
            name = job.name_for(str(path))
            _remove_stale(out, name, job)
            if not job.map_job.force:
                for final in output_paths(out, name, job.map_job, job.heads):
                    try:
                        final.unlink(missing_ok=True)
                    except OSError:  # not ours to remove (a folder): the interrupt is what is reported
                        pass


def _run(client, job: Job, paths: list[Path], out: Path, workers: int, owner: dict,
         finished: set[int], progress, timeout: float | None,
         stop: Callable[[], bool] | None) -> tuple[list[ImageResult], int]:
    """Submit every image, follow tiled ones through their tiles, collect the results in order."""
    results: list[ImageResult | None] = [None] * len(paths)
    done = 0

    def finish(i: int, result: ImageResult) -> None:
        nonlocal done
        results[i] = result
        finished.add(i)
        done += 1
        if progress:
            progress(result, done, len(paths))

    for i, path in enumerate(paths):
        refused = _refuse_outputs(path, out, job)
        if refused is not None:
            finish(i, refused)
            continue
        first = _store_prepare if job.map_job.store == "zarr" else _first_pass
        owner[client.submit(first, job, str(path), pure=False)] = i
    for fut in _completed(owner, timeout, stop):
        i = owner.pop(fut)
        value = _outcome(fut, paths[i])
        if isinstance(value, TilePlan):
            owner[_submit_tiles(client, job, str(paths[i]), value, workers)] = i
            continue
        if not isinstance(value, ImageResult):  # a store's plan (chunked.StorePlan)
            owner[_submit_store(client, job, value, workers)] = i
            continue
        finish(i, value)
    # every task of this run has ended: what is still staged was left by a killed worker
    cleaned = sum(_remove_stale(out, job.name_for(str(p)), job) for p in paths)
    return [r for r in results if r is not None], cleaned


def result_document(result: ImageResult) -> dict:
    """An image's --format json line, in the schema a single process prints (outputs.map_document).

    The map document is the NAME.map.json the worker wrote; the run's
    distribution details are added under "dask".
    """
    from ..io.outputs import failure_document, map_document
    dask = {"workers": list(result.workers), "seconds": result.seconds, "mode": result.mode,
            "tiles": result.tiles}
    if not result.ok:
        doc = failure_document(result.path, result.error or "failed")
        doc["exit_code"] = result.exit_code
        return doc | {"dask": dask}
    if result.document is not None:  # the worker's, as one process makes it
        return result.document | {"dask": dask}
    written = [Path(p) for p in result.outputs]
    doc = next((json.loads(p.read_text()) for p in written if p.name.endswith(".map.json")), {})
    return map_document(doc, written) | {"dask": dask}


def _refuse_outputs(path: Path, out: Path, job: Job) -> ImageResult | None:
    """Check an image's output names here, once, so that a re-run of it may overwrite them.

    Without this a worker that died after renaming some files would make the
    image's second run fail with 'already exists'. The names are unique per
    image (map_images chose them), so no two images race for one file.
    """
    try:
        check_outputs(out, job.name_for(str(path)), job.map_job, job.heads, path)
    except FcnifyError as exc:
        return ImageResult(str(path), False, str(exc), exc.exit_code)
    return None


def _outcome(fut, path: Path):
    """A task's value; an exception (a worker that died too often, a bug) as a failed image."""
    try:
        return fut.result()
    except Exception as exc:  # noqa: BLE001 - reported per image, like any other failure
        if isinstance(exc, FcnifyError):
            return ImageResult(str(path), False, str(exc), exc.exit_code)
        return ImageResult(str(path), False, f"{path}: {type(exc).__name__}: {exc}", 1)


def _submit_tiles(client, job: Job, path: str, plan: TilePlan, workers: int):
    """Tiles of one image in contiguous shares (grouped by size), one per worker, then a stitch."""
    shares = max(1, min(len(plan.tiles), workers))
    bounds = [round(k * len(plan.tiles) / shares) for k in range(shares + 1)]
    parts = [client.submit(_run_tiles, job, path, plan, plan.tiles[a:b], pure=False, priority=1)
             for a, b in zip(bounds, bounds[1:])]
    return client.submit(_stitch, job, path, plan, *parts, pure=False, priority=1)


def _remove_stale(out: Path, name: str, job: Job) -> int:
    """Remove staged files of `name`'s outputs that a killed worker left behind."""
    removed = 0
    for final in output_paths(out, name, job.map_job, job.heads):
        pattern = os.path.join(glob.escape(str(out)), glob.escape(f".{final.name}{TMP_MARK}") + "*")
        for stale in glob.glob(pattern):
            try:
                os.unlink(stale)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _release(client, key: str) -> None:
    """Close the run's model on every worker (best effort, bounded)."""
    try:
        client.run(_forget_if_idle, key, on_error="ignore", callback_timeout=10)
    except Exception:  # noqa: BLE001 - a worker that cannot be reached keeps its copy until it exits
        pass


# ------------------------------------------------------------------ worker side

_lock = threading.Lock()  # one Caffe process per worker process: one image at a time
_models: dict[str, "DenseModel"] = {}
_loads: Counter = Counter()


def _model(job: Job) -> "DenseModel":
    """The worker's copy of the model, loaded on first use (call with _lock held)."""
    model = _models.get(job.key)
    if model is None:
        with _in_worker_directory():
            model = job.model.load()
        _models[job.key] = model
        _loads[job.key] += 1
    return model


@contextmanager
def _in_worker_directory() -> Iterator[None]:
    """Temporary files made now (an in-memory conversion, an à trous prototxt) go into the Dask
    worker's own folder: if the worker is killed, Dask removes that folder, not /tmp's."""
    import tempfile
    from distributed import get_worker
    try:
        folder = get_worker().local_directory
    except ValueError:  # not on a worker (a test calling the task directly)
        folder = None
    saved, tempfile.tempdir = tempfile.tempdir, folder or tempfile.tempdir
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _forget(key: str) -> None:
    model = _models.pop(key, None)
    if model is not None:
        try:
            model.close()
        except FcnifyError:
            pass


def _forget_if_idle(key: str) -> bool:
    """Close a model unless a task is using it (run on the worker's event loop: never waits)."""
    if not _lock.acquire(blocking=False):
        return False
    try:
        _forget(key)
        _loads.pop(key, None)
        return True
    finally:
        _lock.release()


@contextmanager
def _loaded(job: Job, said: list[str] | None = None) -> Iterator["DenseModel"]:
    """The worker's model, one task at a time; its warnings go to `said` (for the client to show)."""
    with _lock:
        model = None
        try:
            model = _model(job)
            model.warn = said.append if said is not None else None
            yield model
        except EngineCrash:
            _forget(job.key)  # Caffe's process died with the net in it: load it again next time
            raise
        finally:
            if model is not None:
                model.warn = None


def _here() -> str:
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def _budget(job: Job) -> int:
    """The memory budget: as given, else half the free RAM shared by this host's workers."""
    if job.map_job.budget is not None:
        return job.map_job.budget
    from ..caffe.planner import default_budget
    from distributed.comm import get_address_host
    host = get_address_host(_here())
    share = max(dict(job.workers_per_host).get(host, 1), 1)
    return max(default_budget() // share, 1)


def _failure(path: str, exc: FcnifyError) -> ImageResult:
    return ImageResult(path, False, str(exc), exc.exit_code, workers=(_here(),), pid=os.getpid())


def _save(job: Job, result: MapResult, seconds: float, workers: tuple[str, ...],
          warnings: Sequence[str] = ()) -> ImageResult:
    from .pipeline import save
    t0 = time.perf_counter()
    path = str(result.path)
    # force: the client checked the names before the run; a re-run replaces its own files
    written = save(result, Path(job.out_dir), job.name_for(path), job.map_job, force=True)
    dm = result.map
    return ImageResult(path, True, outputs=tuple(map(str, written)), map_shape=dm.shape,
                       mode=dm.mode, tiles=dm.tiles, seconds=seconds + time.perf_counter() - t0,
                       workers=workers, pid=os.getpid(), loads=_loads[job.key], warnings=tuple(warnings),
                       text=result.text(job.map_job), document=result.document(job.map_job))


def _probe(job: Job) -> ModelInfo | FcnifyError:
    """Load the model on one worker: what the client needs to know of it, or why it cannot load.

    The error is returned, not raised, so that the worker does not log it as a crash.
    """
    try:
        with _loaded(job) as model:
            job.map_job.check_card(model)
            return ModelInfo(model.num_classes, model.labels, tuple(model.heads),
                             tuple(model.unmapped_heads))
    except FcnifyError as exc:
        return exc


def _windows(path: str, job: Job):
    """The windowed reader of a tiled TIFF at the job's --level (io.windows)."""
    from ..io.windows import open_windows
    return open_windows(path, job.map_job.level or 0)


def windowed(path: str) -> bool:
    from ..io.windows import windowed as is_windowed
    return is_windowed(path)


def _first_pass(job: Job, path: str) -> ImageResult | TilePlan:
    """Map an image that fits whole (or a pyramid, or a shift-and-stitched map); else return the plan.

    The tiles of a plan are spread over the workers; a pyramid and
    shift-and-stitch run a plan per scale or offset, so such an image stays
    on one worker.
    """
    from .dense import fed_size
    from .pipeline import map_image
    t0 = time.perf_counter()
    said: list[str] = []
    try:
        with _loaded(job, said) as model:
            from ..io.images import image_size
            settings = replace(job.map_job, budget=_budget(job))
            if windowed(path):  # a tiled TIFF: its own size at --level, read by window (no resizing)
                with _windows(path, job) as reader:
                    feed, fed = (None, None), reader.shape
            elif not settings.pyramid and model.shifts == 1:
                feed = settings.feed(Path(path))
                fed = fed_size(image_size(path), *feed)
            if not settings.pyramid and model.shifts == 1:
                small = fed[0] < model.minimum[0] or fed[1] < model.minimum[1]  # classify says so
                if not small:
                    tiles, tile_size = model.plan(*fed, settings.budget, settings.tile)
                    if len(tiles) > 1:
                        return TilePlan(fed, feed, tuple(tiles), tile_size, time.perf_counter() - t0,
                                        _here(), tuple(said))
            result = map_image(model, Path(path), settings)
            return _save(job, result, time.perf_counter() - t0, (_here(),), said)
    except FcnifyError as exc:
        return _failure(path, exc)


# --store zarr: one worker opens the store and plans its chunks, every worker computes a share of
# them (reading its own windows, writing its own chunks), one marks it complete and writes map.json.

@dataclass(frozen=True)
class StoreShare:
    """What one worker did for a share of a store's chunks."""

    chunks: int
    timings: dict
    seconds: float
    worker: str


def _store_prepare(job: Job, path: str):
    """chunked.prepare on a worker: the StorePlan (plain data: tiles and chunk grid), or a failure."""
    from .chunked import prepare_job
    try:
        with _loaded(job) as model:
            return prepare_job(model, Path(path), Path(job.out_dir), job.name_for(path), job.map_job,
                               budget=_budget(job))
    except FcnifyError as exc:
        return _failure(path, exc)


def _store_tiles(job: Job, plan, tiles: tuple[Tile, ...]) -> StoreShare | ImageResult:
    """Some of a store's chunks, computed and written here."""
    from .chunked import run_chunks
    t0 = time.perf_counter()
    try:
        with _loaded(job) as model:
            timings = run_chunks(model, plan, tiles)
        return StoreShare(len(tiles), timings, time.perf_counter() - t0, _here())
    except FcnifyError as exc:
        return _failure(str(plan.image), exc)


def _store_finish(job: Job, plan, *shares: StoreShare | ImageResult) -> ImageResult:
    """Mark the store complete once every share is written; its map.json and overview."""
    from .chunked import finish, write_beside
    path = str(plan.image)
    failed = [s for s in shares if isinstance(s, ImageResult)]
    if failed:
        return failed[0]
    try:
        with _loaded(job) as model:
            timings = {k: sum(s.timings.get(k, 0.0) for s in shares) for k in ("preprocess", "forward", "write")}
            run = finish(plan, timings)
            written = write_beside(model, run, Path(path), Path(job.out_dir), job.name_for(path), job.map_job)
        result = MapResult(Path(path), written=written, store=run)
        workers = tuple(dict.fromkeys(s.worker for s in shares)) or (_here(),)
        return ImageResult(path, True, outputs=tuple(map(str, written)), map_shape=run.cells, mode="store",
                           tiles=run.chunks, seconds=sum(s.seconds for s in shares), workers=workers,
                           pid=os.getpid(), loads=_loads[job.key], text=result.text(job.map_job),
                           document=result.document(job.map_job) | {"chunks_per_worker": {
                               s.worker: s.chunks for s in shares}})
    except FcnifyError as exc:
        return _failure(path, exc)


def _submit_store(client, job: Job, plan, workers: int):
    """A store's missing chunks in interleaved shares, one per worker, then the finishing task."""
    shares = max(1, min(len(plan.todo), workers))
    parts = [client.submit(_store_tiles, job, plan, plan.todo[k::shares], pure=False, priority=1)
             for k in range(shares)]
    return client.submit(_store_finish, job, plan, *parts, pure=False, priority=1)


def _run_tiles(job: Job, path: str, plan: TilePlan, tiles: tuple[Tile, ...]) -> TileCells | ImageResult:
    """The map cells of some of an image's tiles (and of the net's other outputs)."""
    from .dense import resized
    from ..io.images import load_image
    t0 = time.perf_counter()
    try:
        with _loaded(job) as model:
            pixels = _windows(path, job) if windowed(path) else resized(load_image(path), *plan.resize)
            if tuple(pixels.shape[:2]) != tuple(plan.fed):
                raise ImageError(f"image is now {pixels.shape[0]}x{pixels.shape[1]} px (height x width), "
                                 f"planned at {plan.fed[0]}x{plan.fed[1]}; did it change during the run?",
                                 path)
            timings = {"load_image": time.perf_counter() - t0}
            try:
                cells = tuple((part.copy(), {k: v.copy() for k, v in heads.items()})
                              for _, (part, heads) in model.run_tiles(pixels, tiles, seconds=timings))
            finally:
                if hasattr(pixels, "close"):
                    pixels.close()
        return TileCells(tiles, cells, timings, time.perf_counter() - t0, _here())
    except FcnifyError as exc:
        return _failure(path, exc)


def _stitch(job: Job, path: str, plan: TilePlan, *shares: TileCells | ImageResult) -> ImageResult:
    """Put the tiles' cells together into the image's map and write its files."""
    from ..io.images import load_image
    t0 = time.perf_counter()
    failed = [s for s in shares if isinstance(s, ImageResult)]
    if failed:
        return failed[0]
    try:
        with _loaded(job) as model:
            rows, cols = model.cells(*plan.fed)
            probs = np.empty((model.num_classes, rows, cols), dtype=np.float32)
            heads = {name: np.empty((c, rows, cols), dtype=np.float32) for name, c in model.heads.items()}
            placed = 0
            for share in shares:
                for t, (cells, blocks) in zip(share.tiles, share.cells):
                    probs[t.cells] = cells
                    for name, block in blocks.items():
                        heads[name][t.cells] = block
                    placed += 1
            if placed != len(plan.tiles):
                raise FcnifyError(f"got {placed} of {len(plan.tiles)} tiles back", path)
            timings = {k: sum(s.timings.get(k, 0.0) for s in shares)
                       for k in ("load_image", "preprocess", "forward")}
            if windowed(path):  # the pictures are drawn over the original, or a tiled TIFF's overview
                with _windows(path, job) as reader:
                    rgb, size = reader.overview(), reader.shape
            else:
                rgb = load_image(path)
                size = rgb.shape[:2]
            info = {"mode": "tiled", "tiles": len(plan.tiles), "tile_size": plan.tile_size, "heads": heads}
            dm = model.dense_map(probs, info, image=rgb, fed=plan.fed, path=Path(path), timings=timings,
                                 image_size=size)
            seconds = plan.seconds + sum(s.seconds for s in shares) + time.perf_counter() - t0
            workers = tuple(dict.fromkeys([plan.worker, *(s.worker for s in shares), _here()]))
            return _save(job, MapResult(Path(path), dm), seconds, workers, plan.warnings)
    except FcnifyError as exc:
        return _failure(path, exc)
