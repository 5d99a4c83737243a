"""One image's chunks spread over Dask workers: each reads its own windows and writes its chunks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

distributed = pytest.importorskip("distributed")

from fcnify.convert import card_for_model_def, convert  # noqa: E402
from fcnify.dense.chunked import map_to_store, store_options  # noqa: E402
from fcnify.dense.distributed import map_images  # noqa: E402
from fcnify.dense.pipeline import MapJob  # noqa: E402
from fcnify.io.store import Keep  # noqa: E402

from conftest import write_model  # noqa: E402
from test_distributed import RUN_TIMEOUT, client, like_workers, worker_blas  # noqa: E402,F401
from test_tiling import STRIDE8, _image  # noqa: E402
from test_windows import write_pyramid  # noqa: E402


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dask-store-net")
    proto, weights = write_model(tmp, "stride8", STRIDE8, seed=3)
    result = convert(proto, weights, tmp / "s8", check=False)
    return card_for_model_def(result.outputs["prototxt"], result.outputs["caffemodel"])


def _arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(root[name][...]) for name in root.array_keys()}


def test_store_chunks_spread_over_both_workers(client, card, like_workers, tmp_path):
    """--store zarr on 2 workers: both write chunks, and the store equals one process's bit for bit
    (the one-process run has the workers' BLAS threads)."""
    slide = tmp_path / "slide.tif"
    write_pyramid(slide, _image(333, 410, seed=7), levels=1)
    out = tmp_path / "dask"
    out.mkdir()
    job = MapJob(store="zarr", tile=90, save=frozenset({"scores", "argmax", "json"}))
    report = map_images([slide], card, out, client, job=job, engine="caffe", timeout=RUN_TIMEOUT)
    (result,) = report.results
    assert result.ok, result.error
    per_worker = result.document["chunks_per_worker"]
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values())
    model = like_workers(card)
    ref = map_to_store(model, slide, tmp_path / "ref.zarr", keep=Keep(scores=True, argmax=True), tile=90,
                       options=store_options(model))
    assert sum(per_worker.values()) == ref.chunks
    got, want = _arrays(out / "slide.zarr"), _arrays(tmp_path / "ref.zarr")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert (out / "slide.map.json").is_file()


def test_tiled_tiff_spread_in_the_ordinary_mode(client, card, like_workers, tmp_path):
    """A tiled TIFF under Dask without a store: its tiles spread over both workers, each reading
    windows, and the .npy map equals one process's bit for bit."""
    slide = tmp_path / "slide.tif"
    levels = write_pyramid(slide, _image(333, 410, seed=8), levels=2)
    out = tmp_path / "dask"
    out.mkdir()
    job = MapJob(tile=90, level=1, save=frozenset({"scores"}))
    report = map_images([slide], card, out, client, job=job, engine="caffe", timeout=RUN_TIMEOUT)
    (result,) = report.results
    assert result.ok, result.error
    assert result.mode == "tiled" and len(set(result.workers)) == 2, result.workers
    want = like_workers(card).classify(slide, tile=90, level=1, keep_image=False)
    assert want.image_size == levels[1].shape[:2]
    assert np.array_equal(np.load(out / "slide.scores.npy"), want.probs)
