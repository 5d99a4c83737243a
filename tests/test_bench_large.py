"""scripts/bench/bench_large.py at a small size: the benchmark's own checks hold (crops, RSS, Dask store)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("distributed")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench" / "bench_large.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_large", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_pyramid_crops_memory_and_workers(tmp_path):
    """A 2400 px pyramid: every pattern's crop mapped as a PNG matches the store's cells within the
    float32 bound with the same argmax on aligned grids, the RSS stays under the budget plus the
    allowance, 2 Dask workers write the same store, both of them writing chunks, and a run killed
    part-way and resumed runs only its missing chunks and gives the uninterrupted store."""
    bench = _bench()
    out = tmp_path / "b.json"
    code = bench.main(["--size", "2400", "--max-memory", "200MiB", "--json", str(out), "--workers", "2",
                       "--tile", "256", "--resume-check", "--folder", str(tmp_path / "work")])
    doc = json.loads(out.read_text())
    assert code == 0, doc
    assert len(doc["crops"]) == 4 and all(c["grid_aligned"] and c["within_bound"] and c["argmax_same"]
                                          and c["argmax_cells_compared"] > 0 for c in doc["crops"])
    assert doc["peak_rss"] <= doc["max_memory"] + doc["allowance"]
    assert doc["dask"]["store_vs_one_process"]["same"]
    assert len(doc["dask"]["chunks_per_worker"]) == 2
    resumed = doc["resumed"]  # killed (SIGKILL) part-way, then --resume
    assert 0 < resumed["done_when_killed"] < resumed["chunks"]
    assert f"ran {resumed['chunks'] - resumed['done_when_killed']}, {resumed['done_when_killed']} kept" \
        in resumed["resume_summary"]
    assert resumed["store_vs_uninterrupted"]["same"]
    assert doc["image"]["levels"][0] == 2400 and (tmp_path / "work" / "big.tif").is_file()


def test_pixels_are_the_patterns():
    """The image function puts each pattern where it says, grey elsewhere (what the crops rely on)."""
    bench = _bench()
    spots = bench.patterns(8000)
    board = spots[0]
    px = bench.pixels(spots, board["y"], board["x"], 64, 64)
    assert set(px[:32, :32].ravel()) == {0} and set(px[:32, 32:64].ravel()) == {255}
    assert (bench.pixels(spots, 0, 0, 8, 8) == bench.GREY).all()
