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
    """With --batch 1, image i+1 is decoded, and image i-1 written, on other threads while the engine maps image i;
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
        job = MapJob(batch=1).for_model(model)  # one image per forward: the pipeline alone
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


def _forward_batches(model, monkeypatch) -> list[int]:
    """The batch size (N of the N x C x H x W input) of every forward pass the model's net runs."""
    sizes, forward = [], model.net.forward
    monkeypatch.setattr(model.net, "forward",
                        lambda inputs, outputs: sizes.append(next(iter(inputs.values())).shape[0])
                        or forward(inputs, outputs))
    return sizes


def test_a_batch_maps_each_image_as_alone(tmp_path, monkeypatch):
    """Five crops of one size with --batch 3 go through two forward passes (3 and 2 images), an
    image of another size through its own; every map is the image's map alone within the derived
    float32 bound, and the crops' maps differ from each other by more than that bound, so a map
    given to the wrong image would fail."""
    from bounds import map_bound
    from fcnify.surgery.bound import within
    paths = _crops(tmp_path, 5)
    other = tmp_path / "in" / "other.png"
    Image.open(paths[0]).crop((0, 0, 120, 100)).save(other)
    paths.append(other)
    with DenseModel(find_model("digits"), engine="onnx") as model:
        rgbs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        alone = [model.classify(rgb).probs for rgb in rgbs]
        bounds = [map_bound(model, rgb) for rgb in rgbs]
        passes = _forward_batches(model, monkeypatch)
        job = MapJob(batch=3).for_model(model)
        out = tmp_path / "out"
        out.mkdir()
        results = list(map_paths(model, paths, job, out, unique_names(paths)))
    assert passes == [3, 2, 1]
    assert [r.path for r in results] == paths and all(r.ok for r in results)
    assert [r.map.batch for r in results] == [3, 3, 3, 2, 2, 1]
    for i, (result, probs, bound) in enumerate(zip(results, alone, bounds)):
        ok, used = within(probs, result.map.probs, bound)
        assert ok, f"image {i}: {used:.3g} of the bound"
        assert within(probs, np.load(out / f"{paths[i].stem}.scores.npy"), bound)[0]
    for i in range(5):
        for j in range(5):
            if i != j:
                assert not within(alone[i], alone[j], bounds[i])[0], (i, j)


def test_the_budget_makes_the_batch_smaller(tmp_path, monkeypatch):
    """DenseModel.batch_size counts the activations once per image and the weights once: a budget
    that holds 2.5 images' activations gives batches of 2, one that holds 8.5 batches of 8 or
    fewer (--batch); map_paths runs batches of that size."""
    from fcnify.caffe.planner import HEADROOM
    paths = _crops(tmp_path, 5)
    with DenseModel(find_model("digits"), engine="onnx") as model:
        fed = np.asarray(Image.open(paths[0])).shape[:2]
        est = model.runner.memory(model.netdef.param, *fed)
        assert 2 * est.activations > est.params  # else the weights, not the batch, set the peak
        budget = lambda n: int((est.base + est.params + n * est.activations) / HEADROOM)  # noqa: E731
        assert model.batch_size(fed, 8, budget(2.5)) == 2
        assert model.batch_size(fed, 8, budget(1.5)) == 1
        assert model.batch_size(fed, 8, budget(8.5)) == 8
        assert model.batch_size(fed, 4, budget(8.5)) == 4
        passes = _forward_batches(model, monkeypatch)
        job = MapJob(batch=8, budget=budget(2.5)).for_model(model)
        results = list(map_paths(model, paths, job))
    assert all(r.ok for r in results) and passes == [2, 2, 1]


def test_batch_must_be_positive():
    """--batch 0 or negative is refused in one line (exit 2), before any work."""
    import pytest
    from fcnify.errors import InputError
    for bad in (0, -2):
        with pytest.raises(InputError, match=f"--batch {bad}: not a number of images"):
            MapJob(batch=bad)
