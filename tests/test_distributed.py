"""fcnify.dense.distributed: images and tiles spread over a real local Dask cluster give single-process files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

distributed = pytest.importorskip("distributed")

from fcnify.dense.dense import DenseModel  # noqa: E402
from fcnify.dense.distributed import map_images  # noqa: E402
from fcnify.errors import InputError  # noqa: E402
from fcnify.files import TMP_MARK  # noqa: E402
from fcnify.io.models import find_model  # noqa: E402
from fcnify.io.outputs import output_names  # noqa: E402
from fcnify.paths import prototxt_dir  # noqa: E402
from fcnify.engines.caffe_engine import CaffeRunner  # noqa: E402
from fcnify.engines.sandbox import Sandbox  # noqa: E402

from conftest import call_fcnify  # noqa: E402

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


@pytest.fixture(scope="module")
def single(card):
    """The single-process mode, its Caffe process started with one BLAS thread like Dask's workers.

    Dask's nanny starts workers with OPENBLAS_NUM_THREADS=1; OpenBLAS's sums
    round differently with more threads, so the reference must match it.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENBLAS_NUM_THREADS", "1")
        mp.setenv("OMP_NUM_THREADS", "1")
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
    report = map_images(paths, card, tmp_path / "dask", client, timeout=RUN_TIMEOUT)
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
    report = map_images(paths, card, out, client, timeout=RUN_TIMEOUT)
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
        map_images(crops[:2], missing, tmp_path, client, timeout=RUN_TIMEOUT)
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
    assert sorted(p.name for p in out.iterdir()) == sorted(f"crop6.{k}" for k in
                                                           ("scores.npy", "map.json", "heatmap.png", "argmax.png"))


def test_tiled_image_spread_over_workers(client, single, card, tmp_path):
    """A large image's tiles run on both workers and stitch into the single process's map."""
    big = tmp_path / "big.png"
    Image.open(prototxt_dir() / "digits" / "scene.png").crop((60, 40, 380, 280)).save(big)
    out = tmp_path / "dask"
    out.mkdir()
    report = map_images([big], card, out, client, scale=0.8, tile=64, timeout=RUN_TIMEOUT)
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
            os.kill(pids[busy[0] if busy else next(iter(pids))], signal.SIGKILL)
            killed.append(result.pid)
    report = map_images(crops, card, out, client, progress=progress, timeout=RUN_TIMEOUT)
    assert killed and not report.failed, [r.error for r in report.failed]
    assert len(report.done) == len(crops)
    assert len({r.pid for r in report.done}) >= 2
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
