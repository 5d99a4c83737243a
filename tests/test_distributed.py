"""fcnify.dense.distributed: images and tiles spread over a real local Dask cluster give single-process files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

distributed = pytest.importorskip("distributed")

from fcnify.dense.dense import DenseModel  # noqa: E402
from fcnify.dense.distributed import map_images  # noqa: E402
from fcnify.dense.pipeline import MapJob, map_paths  # noqa: E402
from fcnify.errors import InputError  # noqa: E402
from fcnify.files import TMP_MARK  # noqa: E402
from fcnify.surgery.bound import factor  # noqa: E402
from fcnify.io.models import find_model  # noqa: E402
from fcnify.io.outputs import DEFAULT_SAVE, output_names, unique_names  # noqa: E402
from fcnify.paths import prototxt_dir  # noqa: E402
from fcnify.engines.caffe_engine import CaffeRunner  # noqa: E402
from fcnify.engines.sandbox import Sandbox  # noqa: E402

from conftest import call_fcnify, write_model  # noqa: E402
from nets import TWO_HEADS  # noqa: E402

RUN_TIMEOUT = 120  # s; every wait on the cluster is bounded, so a broken run fails instead of hanging
CROPS = [(0, 0), (96, 40), (200, 120), (310, 200), (40, 300), (420, 10), (250, 330), (500, 250)]


@pytest.fixture(scope="module")
def card():
    return find_model("digits")


@pytest.fixture(scope="module")
def client():
    """Two worker processes on loopback, one thread each, as `--workers 2` starts them."""
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                       host="127.0.0.1", dashboard_address=None,
                                       scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    client = distributed.Client(cluster, timeout=30)
    try:
        client.wait_for_workers(2, timeout=60)
        yield client
    finally:
        client.close(timeout=30)
        cluster.close(timeout=30)


BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


@pytest.fixture(scope="module")
def worker_blas(client) -> dict[str, str | None]:
    """The BLAS thread settings the workers' Caffe processes inherit.

    Dask's nanny sets OPENBLAS_NUM_THREADS=1 unless the environment already
    sets it (then the user's value stands, as it does for `--workers N`).
    OpenBLAS's sums round differently with other thread counts, so the
    one-process references are run with the workers' settings, whatever the
    machine's environment says.
    """
    seen = list(client.run(lambda: {k: os.environ.get(k) for k in BLAS_THREADS}).values())
    assert all(env == seen[0] for env in seen), seen
    return seen[0]


def _blas_like_workers(mp: pytest.MonkeyPatch, env: dict[str, str | None]) -> None:
    for key, value in env.items():
        if value is None:
            mp.delenv(key, raising=False)
        else:
            mp.setenv(key, value)


@pytest.fixture(scope="module")
def single(card, worker_blas):
    """The single-process mode, its Caffe process started with the workers' BLAS threads (worker_blas)."""
    with pytest.MonkeyPatch.context() as mp:
        _blas_like_workers(mp, worker_blas)
        box = Sandbox()
        model = DenseModel(card, runner=CaffeRunner(box=box))
    yield model
    model.close()
    box.close()


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> list[Path]:
    """Small pieces of the shipped digits scene (128x96 px: a 18x26 map each)."""
    folder = tmp_path_factory.mktemp("crops")
    scene = Image.open(prototxt_dir() / "digits" / "scene.png")
    paths = []
    for i, (x, y) in enumerate(CROPS):
        path = folder / f"crop{i}.png"
        scene.crop((x, y, x + 128, y + 96)).save(path)
        paths.append(path)
    return paths


def _reference(model: DenseModel, paths, out: Path, **kw) -> None:
    """What `fcnify classify-map PATHS --out OUT` writes, in this process."""
    out.mkdir(exist_ok=True)
    for p in paths:
        model.classify(p, kw.get("size"), kw.get("scale"), None, kw.get("tile")).save(out)


def _assert_same_files(names, got: Path, want: Path) -> None:
    """Same .npy and .png bytes; the same JSON but for the run's timings.

    The digits card is converted in memory by each process, so the JSON's
    model files are each process's own temporary copies.
    """
    for name in names:
        for kind, path in output_names(got, name).items():
            ref = want / path.name
            if kind == "json":
                a, b = json.loads(path.read_text()), json.loads(ref.read_text())
                for doc in (a, b):
                    del doc["run"]["seconds"], doc["model"]["model_def"], doc["model"]["weights"]
                assert a == b, path.name
            else:
                assert path.read_bytes() == ref.read_bytes(), path.name


def _staged(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if TMP_MARK in p.name]


def test_maps_match_single_process(client, single, card, crops, tmp_path):
    """Every file equals the single process's, and each worker loaded the net once."""
    paths = crops[:5]
    (tmp_path / "dask").mkdir()
    report = map_images(paths, card, tmp_path / "dask", client, engine="caffe", timeout=RUN_TIMEOUT)
    _reference(single, paths, tmp_path / "single")
    assert [r.path for r in report.done] == [str(p) for p in paths] and not report.failed
    _assert_same_files([p.stem for p in paths], tmp_path / "dask", tmp_path / "single")
    assert sorted(os.listdir(tmp_path / "dask")) == sorted(os.listdir(tmp_path / "single"))
    assert {r.loads for r in report.done} == {1}
    assert len({r.pid for r in report.done}) == 2, "both workers took images"
    assert report.images_per_minute > 0 and "5 done, 0 failed" in report.summary()


def test_bad_images_are_reported_and_the_rest_finish(client, single, card, crops, tmp_path):
    """A corrupt file, a truncated one and an existing output fail by name; the others are written."""
    bad = tmp_path / "noise.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(crops[0].read_bytes()[:300])
    out = tmp_path / "out"
    out.mkdir()
    (out / "crop2.map.json").write_text("{}")  # from an earlier run
    paths = [crops[1], bad, crops[2], cut, crops[3]]
    report = map_images(paths, card, out, client, engine="caffe", timeout=RUN_TIMEOUT)
    assert [r.path for r in report.done] == [str(crops[1]), str(crops[3])]
    errors = {Path(r.path).name: r.error for r in report.failed}
    assert "noise.png" in errors["noise.png"] and "cut.png" in errors["cut.png"]
    assert "already exists" in errors["crop2.png"]
    assert (out / "crop2.map.json").read_text() == "{}"
    _reference(single, [crops[1], crops[3]], tmp_path / "single")
    _assert_same_files(["crop1", "crop3"], out, tmp_path / "single")
    assert not _staged(out)


def test_model_that_cannot_load_fails_once(client, card, crops, tmp_path):
    """Weights the workers cannot find: one error from the run, no image tried."""
    missing = replace(card, weights=tmp_path / "missing.caffemodel")
    with pytest.raises(InputError, match="missing.caffemodel"):
        map_images(crops[:2], missing, tmp_path, client, engine="caffe", timeout=RUN_TIMEOUT)
    assert not list(tmp_path.glob("*.npy"))


def test_cli_on_an_existing_scheduler(client, crops, tmp_path):
    """`classify-map --scheduler ADDRESS`: one line per image, skips reported, summary, exit 1."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a nonsense")
    out = tmp_path / "maps"
    run = call_fcnify("classify-map", crops[4], bad, crops[5], "--model", "digits", "--out", out,
                      "--scheduler", client.scheduler.address, "--class", "7", "--quiet")
    assert run.code == 1, run.err
    assert f"fcnify: skipped {bad}" in run.err
    assert "2 done, 1 failed of 3 image(s)" in run.err and "images/min" in run.err
    assert "crop4.png: map 18x26 (whole)" in run.out
    data = json.loads((out / "crop5.map.json").read_text())
    assert data["heatmap_class"]["class"] == 7 and "--scheduler" in data["command"]


def test_cli_local_workers_and_usage(crops, tmp_path):
    """`--workers N` starts and stops its own cluster; --workers without --out is a usage error."""
    out = tmp_path / "maps"
    run = call_fcnify("classify-map", crops[6], "--model", "digits", "--out", out, "--workers", "1",
                      "--format", "json")
    assert run.code == 0, run.err
    line = json.loads(run.out.strip())
    assert line["ok"] and line["outputs"][0].endswith("crop6.scores.npy")
    assert (out / "crop6.argmax.png").is_file()
    no_out = call_fcnify("classify-map", crops[6], "--model", "digits", "--workers", "2")
    assert no_out.code == 2 and "give --out DIR" in no_out.err, no_out.err
    both = call_fcnify("classify-map", crops[6], "--model", "digits", "--out", out, "--workers", "1",
                       "--scheduler", "tcp://127.0.0.1:1")
    assert both.code == 2 and "either --scheduler or --workers, not both" in both.err, both.err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"crop6.{k}" for k in (
        "scores.npy", "map.json", "heatmap.png", "argmax.png", "topk_classes.npy", "topk_probs.npy"))


def test_tiled_image_spread_over_workers(client, single, card, tmp_path):
    """A large image's tiles run on both workers and stitch into the single process's map."""
    big = tmp_path / "big.png"
    Image.open(prototxt_dir() / "digits" / "scene.png").crop((60, 40, 380, 280)).save(big)
    out = tmp_path / "dask"
    out.mkdir()
    report = map_images([big], card, out, client, engine="caffe", scale=0.8, tile=64, timeout=RUN_TIMEOUT)
    (result,) = report.results
    assert result.ok, result.error
    assert result.mode == "tiled" and result.tiles > 4
    assert len(set(result.workers)) == 2, result.workers
    _reference(single, [big], tmp_path / "single", scale=0.8, tile=64)
    _assert_same_files(["big"], out, tmp_path / "single")


def test_killed_worker_images_run_elsewhere(client, single, card, crops, tmp_path):
    """SIGKILL on a busy worker mid-run: every image still done, right, and nothing staged left."""
    out = tmp_path / "dask"
    out.mkdir()
    stale = out / f".crop0.scores.npy{TMP_MARK}dead1234"  # what a killed writer leaves
    stale.write_bytes(b"half")
    pids = client.run(os.getpid)
    killed = []

    def progress(result, done, total):
        if not killed:
            busy = [w for w, keys in client.processing().items() if keys and w in pids]
            victim = pids[busy[0] if busy else next(iter(pids))]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
    report = map_images(crops, card, out, client, engine="caffe", progress=progress, timeout=RUN_TIMEOUT)
    assert killed and not report.failed, [r.error for r in report.failed]
    assert len(report.done) == len(crops)
    # the other worker (or the killed one's restart) did the rest; which one is the scheduler's choice
    assert {r.pid for r in report.done} - set(killed)
    assert report.cleaned >= 1 and not _staged(out)
    _reference(single, crops, tmp_path / "single")
    _assert_same_files([p.stem for p in crops], out, tmp_path / "single")
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def test_fcnify_imports_without_dask():
    """fcnify, its CLI and this module import without Dask; using it says what to install."""
    code = ("import sys; sys.modules['distributed'] = None\n"
            "import fcnify, fcnify.cli, fcnify.dense.distributed as d\n"
            "from fcnify.errors import SetupError\n"
            "try:\n    d.connect(workers=1).__enter__()\nexcept SetupError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "pip install 'fcnify[dask]'" in run.stdout


def test_cli_workers_json_is_the_single_process_schema(crops, tmp_path):
    """--workers --format json prints, for a good and a failed image, the lines one process prints."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a nonsense")
    lines = {}
    for mode, extra in (("dask", ("--workers", "1")), ("single", ())):
        run = call_fcnify("classify-map", crops[7], bad, "--model", "digits", "--out", tmp_path / mode,
                          "--format", "json", "--quiet", *extra)
        assert run.code == 1, run.err
        lines[mode] = [json.loads(line) for line in run.out.splitlines()]
    for dask, single in zip(lines["dask"], lines["single"]):
        assert set(single) <= set(dask), set(single) - set(dask)
        assert (dask["image"], dask["ok"], dask["exit_code"]) == (single["image"], single["ok"],
                                                                  single["exit_code"])
    assert [d["ok"] for d in lines["dask"]] == [True, False] and "bad.png" in lines["dask"][1]["error"]
    assert lines["dask"][0]["map"] == lines["single"][0]["map"]


# ------------------------------------------------------------------ the options of one process, on Dask


@pytest.fixture
def like_workers(worker_blas):
    """DenseModels whose Caffe process has the workers' BLAS threads (see worker_blas)."""
    made = []

    def load(card, **options) -> DenseModel:
        with pytest.MonkeyPatch.context() as mp:
            _blas_like_workers(mp, worker_blas)
            box = Sandbox()
            made.append(box)
            model = DenseModel(card, runner=CaffeRunner(box=box), **options)
        made.append(model)
        return model
    yield load
    for thing in reversed(made):
        thing.close()


def _pipeline_run(model: DenseModel, paths, out: Path, **settings) -> None:
    """What `classify-map PATHS --out OUT` with these options writes in one process (pipeline.map_paths)."""
    out.mkdir()
    job = MapJob(**settings).for_model(model)
    results = list(map_paths(model, [Path(p) for p in paths], job, out, unique_names([Path(p) for p in paths])))
    assert all(r.ok for r in results), [str(r.error) for r in results]


def _assert_same_folders(got: Path, want: Path) -> None:
    """The same files; .npy and .png byte for byte, JSON equal but for timings and temporary model files."""
    names = sorted(os.listdir(want))
    assert names and sorted(os.listdir(got)) == names
    for name in names:
        a, b = got / name, want / name
        if name.endswith(".json"):
            docs = [json.loads(a.read_text()), json.loads(b.read_text())]
            for doc in docs:
                if "run" in doc:
                    del doc["run"]["seconds"], doc["model"]["model_def"], doc["model"]["weights"]
            assert docs[0] == docs[1], name
        else:
            assert a.read_bytes() == b.read_bytes(), name


def test_stride_on_dask_matches_one_process(client, card, crops, like_workers, tmp_path):
    """--stride 2 (à trous) under Dask, with a forced-tile image spread over both workers: same files."""
    big = tmp_path / "big.png"
    Image.open(prototxt_dir() / "digits" / "scene.png").crop((60, 40, 380, 280)).save(big)
    paths = [crops[0], big]
    settings = {"scale": 0.8, "tile": 64}
    (tmp_path / "dask").mkdir()
    report = map_images(paths, card, tmp_path / "dask", client, engine="caffe", stride=2, timeout=RUN_TIMEOUT, **settings)
    assert not report.failed, [r.error for r in report.failed]
    tiled = report.results[1]
    assert tiled.mode == "tiled" and tiled.tiles > 4, tiled  # planned once, its tiles run as tasks
    _pipeline_run(like_workers(card, stride=2), paths, tmp_path / "single", **settings)
    _assert_same_folders(tmp_path / "dask", tmp_path / "single")
    doc = json.loads((tmp_path / "dask" / "big.map.json").read_text())
    assert doc["map"]["stride_px"] == [2, 2] and doc["stride"]["stride"] == 2


def test_scales_and_detect_on_dask_match_one_process(client, card, crops, like_workers, tmp_path):
    """--scales 1,0.8 --detect --class 2 under Dask: fused and per-scale maps and detections as in one
    process; crop6 has boxes of classes 1 and 2, and --class 2 keeps only the 2s."""
    paths = crops[6:7]
    settings = {"scales": (1.0, 0.8), "detect": True, "threshold": 0.5, "cls": "2",
                "save": DEFAULT_SAVE | {"scales"}}
    (tmp_path / "dask").mkdir()
    report = map_images(paths, card, tmp_path / "dask", client, engine="caffe", timeout=RUN_TIMEOUT, **settings)
    assert not report.failed, [r.error for r in report.failed]
    model = like_workers(card)
    _pipeline_run(model, paths, tmp_path / "single", **settings)
    _assert_same_folders(tmp_path / "dask", tmp_path / "single")
    _pipeline_run(model, paths, tmp_path / "all", **{**settings, "cls": None})
    classes = {}
    for run in ("dask", "all"):
        found = json.loads((tmp_path / run / "crop6.detections.json").read_text())
        assert found["scales"] == [1.0, 0.8]
        classes[run] = sorted({d["class"] for d in found["detections"]})
    assert classes == {"dask": [2], "all": [1, 2]}
    assert (tmp_path / "dask" / "crop6.x0.8.scores.npy").is_file()


def test_long_side_and_output_on_dask_match_one_process(client, like_workers, tmp_path):
    """--long-side 100 --output box under Dask, tiled: the class map and the other head as in one process."""
    from fcnify.convert import card_for_model_def
    proto, weights = write_model(tmp_path, "two_heads", TWO_HEADS, seed=5)
    two = card_for_model_def(proto, weights)
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(8)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(photo)
    settings = {"long_side": 100, "tile": 40}
    (tmp_path / "dask").mkdir()
    report = map_images([photo], two, tmp_path / "dask", client, engine="caffe", output="box", timeout=RUN_TIMEOUT, **settings)
    (result,) = report.results
    assert result.ok and result.mode == "tiled" and result.tiles > 1, result
    _pipeline_run(like_workers(two, output="box"), [photo], tmp_path / "single", **settings)
    _assert_same_folders(tmp_path / "dask", tmp_path / "single")
    doc = json.loads((tmp_path / "dask" / "photo.map.json").read_text())
    assert doc["input_size"] == {"height": 75, "width": 100} and doc["map"]["output"] == "box"
    prob = np.load(tmp_path / "dask" / "photo.prob.npy")
    # each probability carries Softmax's float32 rounding (an exp, a sum of 3, a division): bound.py
    assert prob.shape[0] == 3 and np.abs(prob.sum(axis=0, dtype=np.float64) - 1).max() <= factor(3 + 2)


def test_cli_dask_detect_and_refused_outputs(client, crops, tmp_path):
    """`classify-map --scheduler --scales --detect --out`: the detection files; a second run refuses them."""
    out = tmp_path / "maps"
    args = ("classify-map", crops[4], "--model", "digits", "--out", out, "--scheduler",
            client.scheduler.address, "--scales", "1,0.8", "--detect", "--threshold", "0.5", "--quiet",
            "--save", "scores,json,scales")
    run = call_fcnify(*args)
    assert run.code == 0, run.err
    assert (out / "crop4.detections.png").read_bytes()[:4] == b"\x89PNG"
    assert f"{out / 'crop4'}.{{x1,x0.8}}.{{scores.npy,map.json}}" in run.out  # per-scale files named once
    assert (out / "crop4.x0.8.map.json").is_file() and not (out / "crop4.heatmap.png").exists()
    again = call_fcnify(*args)
    assert again.code == 2 and "crop4" in again.err and "already exists" in again.err, again.err


def test_cli_dask_forced_tiles_warn_as_one_process(client, tmp_path):
    """--tile 40 on a 240x320 scene under Dask prints the costly-tiles warning one process prints."""
    scene = tmp_path / "scene.png"
    Image.open(prototxt_dir() / "digits" / "scene.png").crop((0, 0, 320, 240)).save(scene)
    warnings = {}
    for mode, extra in (("dask", ("--scheduler", client.scheduler.address)), ("single", ())):
        run = call_fcnify("classify-map", scene, "--model", "digits", "--tile", "40", "--quiet",
                          "--out", tmp_path / mode, *extra)
        assert run.code == 0, run.err
        warnings[mode] = [line for line in run.err.splitlines() if "warning" in line]
    assert len(warnings["single"]) == 1 and "--tile 40" in warnings["single"][0]
    assert warnings["dask"] == warnings["single"]
