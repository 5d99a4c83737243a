"""One batch pipeline: what every image goes through, in one process or on a Dask worker.

An image's run is always the same steps: refuse outputs that are in the way,
work out the size the net is fed (--size, --scale, --long-side/--short-side),
map it at one scale or as a pyramid with detections, and write its files.
`classify-map` runs `map_paths` in its own process; the Dask workers
(distributed.py) call `map_image` and `save` on theirs, so a feature added
here works in both, and each check exists once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

from ..engines import DEFAULT_ENGINE, resolve_engine
from ..errors import FcnifyError, InputError, OutputExists
from ..io.labels import Labels
from ..io.models import ModelCard
from .dense import DenseMap, DenseModel, Progress

# (index, path) -> a context giving the image's progress callback (or None): the CLI's bar
ProgressFor = Callable[[int, Path], ContextManager["Progress | None"]]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which net to load and how: all a Dask worker needs to load the same model as the client."""

    card: ModelCard
    engine: str = DEFAULT_ENGINE  # `auto` is resolved here, once, for every worker
    gpu: int | None = None
    verbose: bool = False
    output: str | None = None  # --output: the blob that is the class map
    stride: int | None = None  # --stride: a finer map (stride.py)
    softmax: bool | None = None  # --softmax on/off; None: as the card says
    precision: str = "f32"  # --precision: f32, or bf16 (engines/cpu.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine", resolve_engine(self.engine, self.precision))

    def load(self) -> DenseModel:
        """The loaded model; close it (or use it in a `with` block) when done."""
        return DenseModel(self.card, engine=self.engine, gpu=self.gpu, verbose=self.verbose,
                          output=self.output, stride=self.stride, softmax=self.softmax,
                          precision=self.precision)


@dataclass(frozen=True, kw_only=True)
class MapOptions:
    """How each image is sized, read and mapped (classify-map's map options and --detect).

    At most one of size, scale, long_side and short_side; `scales` (a pyramid)
    and `detect` resize the image themselves, so they take none of them
    (MapJob checks the options together).
    """

    size: tuple[int, int] | None = None
    scale: float | None = None
    long_side: int | None = None
    short_side: int | None = None
    level: int | None = None  # --level: the pyramid level of a tiled TIFF (io.windows)
    tile: int | None = None
    scales: tuple[float, ...] | None = None
    detect: bool = False
    threshold: float = 0.9
    nms_iou: float = 0.3
    batch: int = 8  # --batch: images fed at one size that go through one forward (onnx, openvino)


@dataclass(frozen=True, kw_only=True)
class SaveOptions:
    """What each image's run reports and writes (classify-map's output options).

    `cls` is a class index or name as given; MapJob.for_model checks it.
    """

    save: frozenset[str] | None = None  # outputs.SAVE_ITEMS to write; None: outputs.DEFAULT_SAVE
    store: str = "npy"  # --store: "npy" (the map in memory, .npy files) or "zarr" (chunked.py)
    classes: tuple[int | str, ...] | None = None  # --classes: the scores a store keeps
    resume: bool = False  # --resume: continue a store, running only its missing chunks
    cls: int | str | None = None
    top_k: int = 5
    heat_scale: str = "unit"
    force: bool = False


@dataclass(frozen=True, kw_only=True)
class MapJob(MapOptions, SaveOptions):
    """How every image of a run is mapped and saved: the map options and the save options (the
    two groups of classify-map's options, built by the CLI), the memory budget and the command."""

    budget: int | None = None  # bytes; None: half the free memory
    command: str | None = None  # recorded in the JSON outputs

    @classmethod
    def of(cls, mapping: MapOptions, saving: SaveOptions, **rest) -> "MapJob":
        """The job made of the two groups (and `rest`: budget, command)."""
        return cls(**asdict(mapping), **asdict(saving), **rest)

    def __post_init__(self) -> None:
        given = [n for n in ("size", "scale", "long_side", "short_side") if getattr(self, n) is not None]
        if len(given) > 1:
            raise InputError("give one of --size, --scale, --long-side, --short-side")
        if self.pyramid and given:
            raise InputError("--scales and --detect resize the image themselves: drop --size/--scale"
                             + ("/--long-side/--short-side" if set(given) - {"size", "scale"} else ""))
        if not 0.0 <= self.threshold <= 1.0:  # checked here only: the API's jobs too
            raise InputError(f"--threshold {self.threshold:g}: not a probability in [0, 1]")
        if self.level is not None and self.pyramid:
            raise InputError("--level picks one pyramid level of a tiled TIFF: drop --scales/--detect")
        if self.store == "zarr" and self.pyramid:
            raise InputError("--store zarr maps one scale: drop --scales/--detect")
        if (self.classes is not None or self.resume) and self.store != "zarr":
            raise InputError(f"{'--classes' if self.classes is not None else '--resume'} "
                             "goes with --store zarr")
        if not 0.0 < self.nms_iou <= 1.0:
            raise InputError(f"--nms-iou {self.nms_iou:g}: not an overlap in (0, 1]")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise InputError(f"--batch {self.batch}: not a number of images (1 or more)")

    @property
    def pyramid(self) -> bool:
        """Whether images go through pyramid.map_pyramid (--scales or --detect)."""
        return self.scales is not None or self.detect

    @property
    def items(self) -> frozenset[str]:
        """What --save asks for (outputs.SAVE_ITEMS), the defaults when it was not given."""
        from ..io.outputs import DEFAULT_SAVE
        return DEFAULT_SAVE if self.save is None else self.save

    @property
    def scale_list(self) -> list[float]:
        return list(self.scales) if self.scales else [1.0]

    def for_model(self, model: DenseModel) -> "MapJob":
        """This job with --class checked against the model and turned into its index, and the
        card's background class and (for --detect) box head checked against the net."""
        self.check_card(model)
        classes = None if self.classes is None else tuple(
            class_id(c, model.num_classes, model.labels, "--classes") for c in self.classes)
        return replace(self, cls=class_id(self.cls, model.num_classes, model.labels), classes=classes)

    def check_card(self, model: DenseModel) -> None:
        """A background class the net does not have, or a box head that is not a 4-value output
        beside the class map, fails once, before any image (one line naming the card)."""
        from ..io.models import check_background_class
        from .detect import box_head_blob
        card = model.card
        check_background_class(card.background_class, card.card_path or card.model_def, model.num_classes)
        if self.detect and not model.softmax.applied:
            raise InputError("--detect keeps cells by probability (--threshold): it needs the Softmax "
                             "that --softmax off leaves out")
        if self.detect:
            box_head_blob(card, model.heads)

    def feed(self, path: Path) -> tuple[tuple[int, int] | None, float | None]:
        """(size, scale) for DenseModel.classify: --long-side/--short-side become the image's factor."""
        if self.long_side is None and self.short_side is None:
            return self.size, self.scale
        from ..io.images import image_size, side_scale
        return None, side_scale(image_size(path), self.long_side, self.short_side)


@dataclass
class MapResult:
    """One image of a batch: its map (the fused one for a pyramid), what was written, or why it failed."""

    path: Path
    map: DenseMap | None = None
    pyramid: object | None = None  # pyramid.PyramidResult for --scales/--detect
    written: list[Path] = field(default_factory=list)
    error: FcnifyError | None = None
    name: str | None = None  # the output name (outputs.unique_names) when written
    store: object | None = None  # chunked.StoreRun for --store zarr (then `map` is None)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def detections(self) -> list | None:
        return getattr(self.pyramid, "detections", None)

    def document(self, job: "MapJob") -> dict:
        """The image's --format json document: the map's (DenseMap.to_json: card, map, softmax,
        heads, run), the files written and the boxes (None without --detect). One process, the
        Dask workers and the API return this one document."""
        from ..io.outputs import map_document
        if self.store is not None:
            return {"image": str(self.path), "ok": True, "error": None, "exit_code": 0,
                    "outputs": [str(p) for p in self.written], "store": self.store.summary()}
        doc = map_document(self.map.to_json(job.top_k, job.command), self.written)
        found = self.detections
        doc["detections"] = None if found is None else [d.to_dict() for d in found]
        return doc

    def text(self, job: "MapJob", wrote: str | None = None) -> str:
        """The image's text summary (outputs.text_summary, then the boxes, then `wrote`): what one
        process prints, and what a Dask worker sends back for the client to print."""
        from ..io.outputs import text_summary
        if self.store is not None:
            return "\n".join([f"{self.path}: {self.store.summary()}"] + ([wrote] if wrote else []))
        parts = [text_summary(self.map, job.top_k)]
        if self.detections is not None:
            from .detect import summary
            parts.append(summary(self.detections, self.map))
        if wrote:
            parts.append(wrote)
        return "\n".join(parts)


def class_id(cls: int | str | None, num_classes: int, labels: Labels | None,
             option: str = "--class") -> int | None:
    """--class (or --classes' items) as a class index (an index, or a name when the net has
    labels), checked against the net."""
    if cls is None:
        return None
    if labels is not None:
        from ..io.labels import resolve_class
        index = resolve_class(labels, cls)
    else:
        try:
            index = int(cls)
        except ValueError:
            raise InputError(f"{option} {cls}: this model has no labels; give a class number "
                             "(or a labels file with --labels)") from None
    if not 0 <= index < num_classes:
        raise InputError(f"{option} {cls}: the net has classes 0..{num_classes - 1}")
    return index


def output_paths(out_dir: Path, name: str, job: MapJob, heads: Sequence[str] = ()) -> list[Path]:
    """Every file an image's run writes: its map's, each scale's (a pyramid), its detections'."""
    from ..io.outputs import output_names
    if job.store == "zarr":  # the store itself is checked when it is opened (--resume, --force)
        from .chunked import store_outputs
        return [p for k, p in store_outputs(Path(out_dir), name, job.items).items() if k != "store"]
    names = [name] + scale_names(name, job)
    paths = [p for n in names for p in output_names(Path(out_dir), n, tuple(heads), job.items).values()]
    if job.detect:
        paths += [Path(out_dir) / f"{name}.detections.json", Path(out_dir) / f"{name}.detections.png"]
    return paths


def scale_names(name: str, job: MapJob) -> list[str]:
    """The output names of a pyramid's per-scale files (none unless "scales" is saved)."""
    from .pyramid import scale_name
    if job.pyramid and len(job.scale_list) > 1 and "scales" in job.items:
        return [scale_name(name, s) for s in job.scale_list]
    return []


def check_outputs(out_dir: Path, name: str, job: MapJob, heads: Sequence[str] = (),
                  image: Path | None = None, force: bool | None = None) -> None:
    """Refuse an image's outputs before its work, naming the image and the file in the way."""
    from ..files import OutputSet
    if job.store == "zarr" and not (job.resume or job.force) and (Path(out_dir) / f"{name}.zarr").exists():
        from ..errors import OutputError
        raise OutputError("map store already exists: continue it with --resume, or start over with "
                          "--force", Path(out_dir) / f"{name}.zarr")
    checker = OutputSet((job.force or job.resume) if force is None else force)  # resumed: its own files
    for final in output_paths(out_dir, name, job, heads):
        try:
            checker.check(final)
        except OutputExists as exc:
            raise OutputExists(exc.final, image) from None


def map_image(model: DenseModel, path: Path, job: MapJob, progress: Progress | None = None,
              image: "Decoded | None" = None) -> MapResult:
    """Map one image as the job says: one DenseMap, or a pyramid (fused map, per-scale maps, boxes).

    `image` is the file already decoded (map_paths decodes the next image
    while the engine runs); without it the file is read here.
    """
    path = Path(path)
    if not job.pyramid:
        size, scale = job.feed(path)
        dm = model.classify(path if image is None else image.rgb, size, scale, job.budget, job.tile,
                            progress, path=path, level=job.level)
        if image is not None:
            dm.timings["load_image"] += image.seconds
        return MapResult(path, dm)
    from .pyramid import map_pyramid
    detect = None
    if job.detect:
        detect = {"scales": job.scale_list, "threshold": job.threshold, "iou": job.nms_iou,
                  "detect": True, "classes": None if job.cls is None else [job.cls]}
    found = map_pyramid(model, path, job.scale_list, job.budget, job.tile, detect, progress)
    return MapResult(path, found.fused, found)


@dataclass(frozen=True)
class Decoded:
    """An image decoded ahead of its turn, and what decoding it took."""

    rgb: object  # H x W x 3 uint8
    seconds: float


def decode(path: Path) -> Decoded:
    """io.images.load_image, timed: run on a worker thread while the engine maps the image before."""
    import time
    from ..io.images import load_image
    t0 = time.perf_counter()
    rgb = load_image(path)
    return Decoded(rgb, time.perf_counter() - t0)


def save(result: MapResult, out_dir: Path, name: str, job: MapJob, force: bool | None = None) -> list[Path]:
    """Write the image's files (the pyramid's when there is one) and note them in the result."""
    force = job.force if force is None else force
    what = result.pyramid if result.pyramid is not None else result.map
    result.written = what.save(out_dir, name, job.cls, job.top_k, job.command, force=force,
                               heat_scale=job.heat_scale, save=job.items)
    return result.written


def map_paths(model: DenseModel, paths: Sequence[Path], job: MapJob, out_dir: Path | None = None,
              names: dict[Path, str] | None = None,
              progress: ProgressFor | None = None) -> Iterator[MapResult]:
    """Map images with one loaded model, yielding each image's result in order.

    An image that fails (bad file, output in the way, too small) gives a
    result with its error and the batch goes on; `job` must have been
    through `for_model`. With `out_dir`, each image's files are written
    under `names[path]` (outputs.unique_names), refused before the work if
    one is in the way.

    A pipeline, not a loop: while the engine maps image i (ONNX Runtime,
    Caffe's worker and torch release the GIL), one thread decodes image i+1
    and another writes image i-1's files (zlib and numpy release it too).
    Consecutive images fed at one size go through one forward pass, up to
    job.batch of them (DenseModel.batch_size: the engine must take batches,
    and the memory budget the batch's activations); the next group is
    decoded while one runs. What is decoded ahead stays under AHEAD_BYTES
    (a larger image is decoded in its turn), so memory stays that of a
    batch on each side.
    """
    from concurrent.futures import ThreadPoolExecutor
    paths = [Path(p) for p in paths]
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fcnify-io")
    groups = _groups(model, paths, job)
    try:
        group = next(groups, None)
        ahead = _decode_ahead(pool, paths, group or [], job)
        writing: list = []  # futures of the results before, in order (written on the pool)
        while group is not None:
            following = next(groups, None)
            mine, ahead = ahead, {}
            named = {i: (names or {}).get(paths[i]) or paths[i].stem for i in group}
            results: dict[int, MapResult] = {}
            decoded: dict[int, Decoded | None] = {}
            for i in group:
                try:
                    if out_dir is not None:
                        check_outputs(Path(out_dir), named[i], job, tuple(model.heads), paths[i])
                    decoded[i] = mine[i].result() if i in mine else None
                except FcnifyError as exc:
                    results[i] = MapResult(paths[i], error=exc)
                    if i in mine:
                        mine[i].cancel()
            ahead = _decode_ahead(pool, paths, following or [], job)
            todo = [i for i in group if i not in results]
            if len(todo) > 1:
                results.update(_map_batch(model, paths, todo, decoded, job, progress))
            for i in todo:
                if i not in results:
                    results[i] = _map_one(model, paths[i], job, out_dir, named[i], progress, i, decoded[i])
            for done in writing:
                yield done.result()
            writing = []
            for i in group:
                result = results[i]
                result.name = named[i]
                if out_dir is not None and result.ok and result.store is None:
                    writing.append(pool.submit(_write, result, Path(out_dir), named[i], job))
                else:
                    writing.append(_ready(result))
            group = following
        for done in writing:
            yield done.result()
    finally:  # an interrupt: the files being written are finished (or not begun), nothing more
        pool.shutdown(wait=True, cancel_futures=True)


# What may be decoded ahead of the engine, in bytes (pixels as decoded, resized and
# preprocessed): a batch's images, or the next image. 256 MiB holds eight 2000 x 2000
# images fed as they are, or one 5000 x 5000; a larger image is decoded in its turn.
AHEAD_BYTES = 256 << 20


def held_bytes(original: tuple[int, int], fed: tuple[int, int], channels: int) -> int:
    """Bytes one image holds on its way to the engine: its decoded RGB, the resized RGB
    (when resized) and the preprocessed float32 input (counted twice: it is stacked)."""
    resized = 0 if tuple(fed) == tuple(original) else 3 * fed[0] * fed[1]
    return 3 * original[0] * original[1] + resized + 2 * 4 * channels * fed[0] * fed[1]


def _fed(model: DenseModel, path: Path, job: MapJob) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(fed size, original size) of image `path` from its header; None for a file that is
    mapped on its own (a tiled TIFF, or one whose header cannot be read or is too small)."""
    from ..io.images import image_size
    from ..io.windows import windowed
    from .dense import fed_size
    try:
        if windowed(path):
            return None
        original = image_size(path)
        size, scale = job.feed(path)
        fed = fed_size(original, size, scale)
        model.check_minimum(fed, resized=fed != original, path=path)
    except FcnifyError:
        return None
    return fed, original


def _groups(model: DenseModel, paths: Sequence[Path], job: MapJob) -> Iterator[list[int]]:
    """The images' indices in order, cut into groups that go through one forward pass:
    consecutive images fed at one size, at most model.batch_size of them and AHEAD_BYTES
    together. Everything is a group of one without --batch, for a pyramid or a store,
    with --tile, or on an engine that runs one image at a time."""
    if (job.batch <= 1 or job.pyramid or job.store == "zarr" or job.tile is not None
            or not getattr(model.runner, "batches", False) or model.shifts > 1):
        yield from ([i] for i in range(len(paths)))
        return
    sizes: dict[tuple[int, int], int] = {}
    group: list[int] = []
    key, held = None, 0
    for i, path in enumerate(paths):
        found = _fed(model, path, job)
        if found is None:
            if group:
                yield group
            group, key, held = [], None, 0
            yield [i]
            continue
        fed, original = found
        if fed not in sizes:
            sizes[fed] = model.batch_size(fed, job.batch, job.budget)
        cost = held_bytes(original, fed, model.channels)
        if group and (fed != key or len(group) >= sizes[fed] or held + cost > AHEAD_BYTES):
            yield group
            group, held = [], 0
        group.append(i)
        key, held = fed, held + cost
    if group:
        yield group


def _map_one(model: DenseModel, path: Path, job: MapJob, out_dir: Path | None, name: str,
             progress: ProgressFor | None, i: int, image: Decoded | None) -> MapResult:
    """One image on its own (map_image, or its store), its failure as its result."""
    try:
        if job.store == "zarr":
            return _map_store(model, path, job, out_dir, name, progress, i)
        if progress is None:
            return map_image(model, path, job, image=image)
        with progress(i, path) as bar:
            return map_image(model, path, job, bar, image=image)
    except FcnifyError as exc:
        return MapResult(path, error=exc)


def _map_batch(model: DenseModel, paths: Sequence[Path], todo: list[int], decoded: dict,
               job: MapJob, progress: ProgressFor | None) -> dict[int, MapResult]:
    """Images fed at one size through one forward pass (DenseModel.classify_batch); {} when
    they cannot be (not all decoded ahead, or the decoded sizes differ from the headers'),
    so that each is then mapped on its own and fails, if it fails, on its own."""
    if any(decoded.get(i) is None for i in todo):
        return {}
    try:
        maps = model.classify_batch([decoded[i].rgb for i in todo], [paths[i] for i in todo],
                                    [job.feed(paths[i]) for i in todo], job.budget,
                                    [decoded[i].seconds for i in todo])
    except FcnifyError:
        return {}
    results = {}
    for i, dm in zip(todo, maps):
        if progress is not None:
            with progress(i, paths[i]) as bar:
                if bar is not None:
                    bar(1, 1)
        results[i] = MapResult(paths[i], dm)
    return results


def _ready(result: MapResult):
    """A future that already holds `result` (an image that is not written keeps its place)."""
    from concurrent.futures import Future
    done: Future = Future()
    done.set_result(result)
    return done


def _map_store(model: DenseModel, path: Path, job: MapJob, out_dir: Path | None, name: str,
               progress: ProgressFor | None, i: int) -> MapResult:
    """--store zarr: the image's chunks into OUT/NAME.zarr as its tiles finish (chunked.py)."""
    from contextlib import nullcontext
    from .chunked import map_into_store
    if out_dir is None:
        raise InputError("--store zarr writes the map into --out DIR: give --out")
    with (progress(i, path) if progress is not None else nullcontext()) as bar:
        run, written = map_into_store(model, path, Path(out_dir), name, job, bar)
    return MapResult(path, written=written, store=run)


def _decode_ahead(pool, paths: Sequence[Path], group: Sequence[int], job: MapJob) -> dict:
    """Start decoding a group's images on `pool`: {index: future}. None are for a pyramid or a
    store (they load their own), a tiled TIFF (read by window, in its turn) or an image whose
    pixels alone pass AHEAD_BYTES (decoded in its turn)."""
    from ..io.images import image_size
    from ..io.windows import windowed
    if job.pyramid or job.store == "zarr":
        return {}
    started = {}
    for i in group:
        if windowed(paths[i]):
            continue
        try:
            h, w = image_size(paths[i])
        except FcnifyError:
            h = w = 0  # decoding says what is wrong, in the image's turn
        if 3 * h * w <= AHEAD_BYTES:
            started[i] = pool.submit(decode, paths[i])
    return started


def _write(result: MapResult, out_dir: Path, name: str, job: MapJob) -> MapResult:
    """save(), on the writing thread: a failure becomes the image's error, as in the loop it replaces."""
    try:
        save(result, out_dir, name, job)
    except FcnifyError as exc:
        return MapResult(result.path, error=exc, name=name)
    return result
