"""pipeline.map_paths: a pipeline, not a loop — the next image decoded and the last one written
while the engine maps, results still in order and the files those of one image at a time."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fcnify.dense import pipeline
from fcnify.dense.dense import DenseModel
from fcnify.dense.pipeline import MapJob, map_paths
from fcnify.io.models import find_model
from fcnify.io.outputs import unique_names

ENGINE_SECONDS = 0.3  # the engine's time per image, made long enough to see what runs beside it


def _crops(tmp_path: Path, n: int) -> list[Path]:
    scene = Image.open(find_model("digits").model_def.parent / "scene.png")
    paths = []
    for i in range(n):
        p = tmp_path / "in" / f"c{i}.png"
        p.parent.mkdir(exist_ok=True)
        scene.crop((60 * i, 40 * i, 60 * i + 200, 40 * i + 160)).save(p)
        paths.append(p)
    return paths


def _spy(events: list, what: str, fn):
    """fn, recording (what, start, end, thread name) of every call."""
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            events.append((what, t0, time.perf_counter(), threading.current_thread().name))
    return wrapped


def test_decode_and_writing_overlap_the_engine(tmp_path, monkeypatch):
    """Image i+1 is decoded, and image i-1 written, on other threads while the engine maps image i;
    the results come in order and the scores are those of mapping each image alone."""
    paths = _crops(tmp_path, 4)
    events: list = []
    monkeypatch.setattr(pipeline, "decode", _spy(events, "decode", pipeline.decode))
    monkeypatch.setattr(pipeline, "save", _spy(events, "save", pipeline.save))
    with DenseModel(find_model("digits")) as model:
        alone = [model.classify(p).probs for p in paths]
        classify = model.classify

        def slow(*args, **kwargs):
            time.sleep(ENGINE_SECONDS)
            return classify(*args, **kwargs)
        model.classify = _spy(events, "engine", slow)
        job = MapJob().for_model(model)
        out = tmp_path / "out"
        out.mkdir()
        results = list(map_paths(model, paths, job, out, unique_names(paths)))
    assert [r.path for r in results] == paths and all(r.ok for r in results)
    for p, probs in zip(paths, alone):
        assert np.array_equal(np.load(out / f"{p.stem}.scores.npy"), probs)
    engine = [e for e in events if e[0] == "engine"]
    decodes = [e for e in events if e[0] == "decode"]
    saves = [e for e in events if e[0] == "save"]
    assert len(engine) == len(decodes) == len(saves) == 4
    main = threading.current_thread().name
    assert all(e[3] == main for e in engine) and all(e[3] != main for e in decodes + saves)
    for i in range(3):  # decoding i+1 begins before the engine is done with i ...
        assert sorted(decodes, key=lambda e: e[1])[i + 1][1] < engine[i][2]
        # ... and writing i begins before the engine is done with i+1
        assert sorted(saves, key=lambda e: e[1])[i][1] < engine[i + 1][2]


def test_a_bad_image_in_the_middle_keeps_the_order(tmp_path):
    """A file that cannot be decoded (decoded ahead, on another thread) is its own failed result,
    in its place; the images around it are written."""
    paths = _crops(tmp_path, 3)
    paths[1].write_bytes(paths[1].read_bytes()[:200])
    with DenseModel(find_model("digits")) as model:
        job = MapJob().for_model(model)
        out = tmp_path / "out"
        out.mkdir()
        results = list(map_paths(model, paths, job, out, unique_names(paths)))
    assert [r.path for r in results] == paths and [r.ok for r in results] == [True, False, True]
    assert "decode" in str(results[1].error) and str(paths[1]) in str(results[1].error)
    assert sorted(p.name.split(".")[0] for p in out.iterdir()) == ["c0"] * 6 + ["c2"] * 6
