"""What writing the outputs costs: cells computed a row at a time, pictures from a small copy."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fcnify.dense.dense import DenseMap
from fcnify.caffe.geometry import AxisGeometry, MapGeometry
from fcnify.io.models import ModelCard
from fcnify.io.outputs import cell_rows, top_k_arrays, write_map_json
from fcnify.io.pictures import preview
from fcnify.io.preprocess import Preprocess


def _map(probs: np.ndarray, image: np.ndarray | None = None, scale: float = 1.0) -> DenseMap:
    axis = AxisGeometry(stride=8, box_lo=-3, box_hi=28, reach_lo=-10, reach_hi=40)
    card = ModelCard("t", "t.prototxt", None, Preprocess())
    rows, cols = probs.shape[1:]
    size = (rows * 8 + 40, cols * 8 + 40)
    fed = (round(size[0] * scale), round(size[1] * scale))
    return DenseMap(probs, MapGeometry("out", axis, axis), size, fed, card, image=image)


def test_cell_rows_equal_the_per_cell_reference():
    """Per-row top-k by partition gives DenseMap.top_k and DenseMap.box exactly, ties included."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(40, 0.05), size=(7, 9)).transpose(2, 0, 1).astype(np.float32)
    probs[:, 2, 3] = 0.0  # ties: many zeros, two equal leaders
    probs[[5, 17], 2, 3] = 0.5
    probs[:, 4, :] = np.float32(1 / 40)  # a row of all-equal cells
    dm = _map(probs, scale=0.75)
    assert np.array_equal(dm.argmax(), probs.argmax(axis=0))  # computed a row at a time
    got = [cell for row in cell_rows(dm, 6) for cell in row]
    assert len(got) == 63
    for cell in got:
        r, c = cell["row"], cell["col"]
        assert cell["box"] == [round(v, 3) for v in dm.box(r, c)]
        assert cell["window"] == [round(v, 3) for v in dm.box(r, c, clip=False)]
        assert [(t["class"], t["prob"]) for t in cell["top"]] == \
            [(k, round(p, 6)) for k, p in dm.top_k(r, c, 6)]


@pytest.mark.parametrize("cells", [False, True])
def test_streamed_json_is_one_document(tmp_path, cells):
    """write_map_json gives the same document as to_json, plus the extra keys; the per-cell list
    only when asked for (--save cells)."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=(3, 4)).transpose(2, 0, 1).astype(np.float32)
    dm = _map(probs)
    path = tmp_path / "m.json"
    write_map_json(dm, path, 3, "cmd", {"heatmap_class": {"class": 1}}, cells=cells)
    data = json.loads(path.read_text())
    assert data == {**json.loads(json.dumps(dm.to_json(3, "cmd", cells=cells))), "heatmap_class": {"class": 1}}
    assert ("cells" in data) == cells


def test_top_k_arrays_equal_the_per_cell_reference():
    """NAME.topk_*.npy: each cell's DenseMap.top_k, classes and exact float32 probabilities, ties included."""
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.full(30, 0.05), size=(5, 6)).transpose(2, 0, 1).astype(np.float32)
    probs[:, 1, 2] = 0.0
    probs[[4, 9, 20], 1, 2] = np.float32(1 / 3)
    dm = _map(probs)
    classes, top = top_k_arrays(dm, 4)
    assert classes.shape == top.shape == (4, 5, 6) and classes.dtype == np.int32 and top.dtype == np.float32
    for r, c in np.ndindex(5, 6):
        assert [(int(k), float(p)) for k, p in zip(classes[:, r, c], top[:, r, c])] == dm.top_k(r, c, 4)


def test_map_json_of_a_6000x4000_map_stays_small(tmp_path):
    """A 6000x4000 photo mapped every 8 px (496x746 cells): map.json without the cell list is < 1 MB,
    and its window formula gives each cell's window as DenseMap.box does."""
    probs = np.lib.stride_tricks.as_strided(np.ones(1, np.float32), (10, 496, 746), (0, 0, 0))
    axis = AxisGeometry(stride=8, box_lo=-3, box_hi=28, reach_lo=-10, reach_hi=40)
    dm = DenseMap(probs, MapGeometry("out", axis, axis), (4000, 6000), (4000, 6000),
                  ModelCard("t", "t.prototxt", None, Preprocess()))
    path = tmp_path / "big.map.json"
    write_map_json(dm, path, 5, "cmd", {})
    assert path.stat().st_size < 1_000_000
    f = json.loads(path.read_text())["map"]["cell_window_image_px"]
    for r, c in ((0, 0), (3, 700), (495, 745)):
        x0, y0 = f["x_first"] + c * f["x_step"], f["y_first"] + r * f["y_step"]
        assert (x0, y0, x0 + f["width"], y0 + f["height"]) == dm.box(r, c, clip=False)


def test_preview_is_small_and_box_averaged():
    """A 5000x3000 photo is drawn from a <= 1280-px copy whose pixels are block means."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (3000, 5000, 3), dtype=np.uint8)
    small = preview(image)
    assert max(small.shape[:2]) <= 1280 and small.shape == (750, 1250, 3)
    block = image[400:404, 800:804].astype(np.float64).mean(axis=(0, 1))
    assert np.array_equal(small[100, 200], np.rint(block).astype(np.uint8))
    tiny = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert preview(tiny) is tiny
