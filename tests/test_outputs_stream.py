"""What writing the outputs costs: cells computed a row at a time, pictures from a small copy."""
from __future__ import annotations

import json

import numpy as np

from fcnify.dense.dense import DenseMap
from fcnify.caffe.geometry import AxisGeometry, MapGeometry
from fcnify.io.models import ModelCard
from fcnify.io.outputs import cell_rows, write_map_json
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


def test_streamed_json_is_one_document(tmp_path):
    """write_map_json gives the same document as to_json, plus the extra keys."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=(3, 4)).transpose(2, 0, 1).astype(np.float32)
    dm = _map(probs)
    path = tmp_path / "m.json"
    write_map_json(dm, path, 3, "cmd", {"heatmap_class": {"class": 1}})
    data = json.loads(path.read_text())
    assert data == {**json.loads(json.dumps(dm.to_json(3, "cmd"))), "heatmap_class": {"class": 1}}


def test_preview_is_small_and_box_averaged():
    """A 5000x3000 photo is drawn from a <= 2048-px copy whose pixels are block means."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (3000, 5000, 3), dtype=np.uint8)
    small = preview(image)
    assert max(small.shape[:2]) <= 2048 and small.shape == (1000, 1666, 3)
    block = image[300:303, 600:603].astype(np.float64).mean(axis=(0, 1))
    assert np.array_equal(small[100, 200], np.rint(block).astype(np.uint8))
    tiny = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert preview(tiny) is tiny
