"""Chunked map stores (--store zarr): chunks written as tiles finish, what is kept, --resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from fcnify.convert import card_for_model_def, convert
from fcnify.dense.chunked import chunk_plan, map_to_store
from fcnify.dense.dense import DenseModel
from fcnify.errors import CorruptTileError, InputError
from fcnify.io.store import Keep, MapStore
from fcnify.io.windows import TiffWindows
from fcnify.surgery.bound import within

from bounds import map_bound
from conftest import call_fcnify, write_model
from nets import TWO_HEADS
from test_tiling import STRIDE8, _image
from test_windows import write_pyramid

ALL = Keep(scores=True, topk=3, argmax=True)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store-net")
    proto, weights = write_model(tmp, "stride8", STRIDE8, seed=3)
    result = convert(proto, weights, tmp / "s8", check=False)
    card = card_for_model_def(result.outputs["prototxt"], result.outputs["caffemodel"])
    return card, result.outputs["prototxt"], result.outputs["caffemodel"]


@pytest.fixture(scope="module")
def raw(net):
    """The net with --softmax off: the store holds scores, which tests compare."""
    model = DenseModel(net[0], softmax=False, engine="caffe")  # tight budgets: Caffe's memory model
    yield model
    model.close()


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("store-img") / "slide.tif"
    return path, write_pyramid(path, _image(333, 410, seed=7))


def _arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(root[name][...]) for name in root.array_keys()}


def test_store_equals_the_whole_image_map(raw, slide, tmp_path):
    """The chunks' scores equal one whole-image pass within the float32 bound; every chunk is marked."""
    run = map_to_store(raw, slide[0], tmp_path / "m.zarr", keep=ALL, tile=90)
    got = _arrays(tmp_path / "m.zarr")
    whole, _ = raw.run_scores(slide[1][0])
    assert got["scores"].shape == whole.shape and run.chunks > 4 and run.ran == run.chunks
    assert run.cells == whole.shape[1:]
    ok, used = within(whole, got["scores"], map_bound(raw, slide[1][0]))
    assert ok, f"store differs by {used:.3g} of the bound"
    assert got["done"].all() and dict(zarr.open_group(str(tmp_path / "m.zarr")).attrs["fcnify"])["complete"]


def test_classes_topk_and_argmax_hold_the_full_maps_values(raw, slide, tmp_path):
    """--classes, top-k and argmax arrays equal the full scores' values for the same cells."""
    map_to_store(raw, slide[0], tmp_path / "all.zarr", keep=ALL, tile=90)
    map_to_store(raw, slide[0], tmp_path / "sub.zarr", keep=Keep(classes=(3, 1)), tile=90)
    full, sub = _arrays(tmp_path / "all.zarr"), _arrays(tmp_path / "sub.zarr")
    scores = full["scores"]
    assert np.array_equal(sub["scores"], scores[[3, 1]])
    order = np.argsort(-scores, axis=0, kind="stable")
    assert np.array_equal(full["topk_classes"], order[:3])
    assert np.array_equal(full["topk_probs"], np.take_along_axis(scores, order[:3], axis=0))
    assert np.array_equal(full["argmax"], scores.argmax(axis=0))
    assert np.array_equal(full["argmax_prob"], scores.max(axis=0))
    assert "topk_classes" not in sub and "argmax" not in sub


def test_chunk_tiles_fit_the_budget(raw, slide):
    """Under a tight budget every chunk's tile, with the reader's buffers, fits it."""
    budget = 140 * 2**20
    with TiffWindows(slide[0]) as src:
        tiles, chunk, largest = chunk_plan(raw, src.shape, budget, None, src)
        for shape in {t.shape for t in tiles}:
            est = raw.runner.memory(raw.netdef.param, *shape)
            assert est.total + src.buffer_bytes(*shape) + 2 * shape[0] * shape[1] * 3 * 4 <= budget
    assert len(tiles) > 1


class Interrupt(Exception):
    pass


def test_resume_runs_only_the_missing_chunks(raw, slide, tmp_path, monkeypatch):
    """Interrupted half-way and resumed: only the missing chunks run, and the store equals an
    uninterrupted run's, chunk for chunk; a chunk file lost meanwhile is found and run again."""
    ref = map_to_store(raw, slide[0], tmp_path / "ref.zarr", keep=ALL, tile=90)
    real, written = MapStore.write, []

    def write(self, i, j, arrays):
        if len(written) == ref.chunks // 2:
            raise Interrupt
        real(self, i, j, arrays)
        written.append((i, j))

    monkeypatch.setattr(MapStore, "write", write)
    with pytest.raises(Interrupt):
        map_to_store(raw, slide[0], tmp_path / "cut.zarr", keep=ALL, tile=90)
    monkeypatch.undo()
    assert not dict(zarr.open_group(str(tmp_path / "cut.zarr")).attrs["fcnify"])["complete"]
    i, j = written[0]
    for f in (tmp_path / "cut.zarr" / "topk_probs" / "c").glob(f"*/{i}/{j}"):
        f.unlink()  # a finished chunk lost: its check fails and it runs again
    run = map_to_store(raw, slide[0], tmp_path / "cut.zarr", keep=ALL, tile=90, resume=True)
    assert run.kept == ref.chunks // 2 - 1
    assert run.ran == ref.chunks - run.kept
    a, b = _arrays(tmp_path / "ref.zarr"), _arrays(tmp_path / "cut.zarr")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_store_of_other_options(raw, slide, tmp_path):
    """--resume on a store made with other kept values (or another net) is one line naming what differs."""
    map_to_store(raw, slide[0], tmp_path / "m.zarr", keep=ALL, tile=90)
    with pytest.raises(InputError, match=r"made by another run \(it differs in: keep\)"):
        map_to_store(raw, slide[0], tmp_path / "m.zarr", keep=Keep(classes=(1,)), tile=90, resume=True)


def test_corrupt_tile_keeps_the_finished_chunks(raw, tmp_path):
    """A corrupt file tile mid-image: exit-1 error naming it; the chunks before it are kept and marked,
    the store is marked incomplete, and --resume after a repair runs only the rest."""
    path = tmp_path / "bad.tif"
    levels = write_pyramid(path, _image(256, 256, seed=2), levels=1)
    good = path.read_bytes()
    with TiffWindows(path) as src:
        offset = src._page.dataoffsets[10]  # row 2, column 2 of 4 x 4
    with open(path, "r+b") as f:
        f.seek(offset + 2)
        f.write(b"\xff" * 64)
    with pytest.raises(CorruptTileError, match="row 2, column 2"):
        map_to_store(raw, path, tmp_path / "m.zarr", keep=ALL, tile=90)
    root = zarr.open_group(str(tmp_path / "m.zarr"))
    done = int(np.asarray(root["done"][...]).sum())
    assert done > 0 and not dict(root.attrs["fcnify"])["complete"]
    path.write_bytes(good)
    run = map_to_store(raw, path, tmp_path / "m.zarr", keep=ALL, tile=90, resume=True)
    assert (run.kept, run.ran) == (done, run.chunks - done)
    whole, _ = raw.run_scores(levels[0])
    ok, used = within(whole, _arrays(tmp_path / "m.zarr")["scores"], map_bound(raw, levels[0]))
    assert ok, used


def test_cli_store_resume_and_force(net, slide, tmp_path):
    """The CLI: a store and its geometry-only map.json and small overview; an existing store refused
    without --resume/--force; --resume of another run's store one line, exit 2."""
    _, proto, weights = net
    args = ["classify-map", slide[0], "--model-def", proto, "--weights", weights, "--store", "zarr",
            "--out", tmp_path, "--tile", "90", "--save", "scores,argmax,json,pictures"]
    first = call_fcnify(*args)
    assert first.code == 0, first.err
    rows, cols = _arrays(tmp_path / "slide.zarr")["argmax"].shape
    doc = json.loads((tmp_path / "slide.map.json").read_text())
    assert (doc["map"]["rows"], doc["map"]["cols"]) == (rows, cols) and "cells" not in doc
    assert (tmp_path / "slide.map.json").stat().st_size < 4000
    from PIL import Image
    assert Image.open(tmp_path / "slide.overview.png").size == (cols, rows)  # a pixel per cell here
    again = call_fcnify(*args)
    assert again.code == 2 and "--resume" in again.err and len(again.err.strip().splitlines()) == 1
    resumed = call_fcnify(*args, "--resume")
    assert resumed.code == 0 and "ran 0" in resumed.out
    other = call_fcnify(*args, "--resume", "--classes", "1")
    assert other.code == 2 and "differs in: keep" in other.err
    assert len(other.err.strip().splitlines()) == 1
    forced = call_fcnify(*args, "--force", "--save", "argmax")
    assert forced.code == 0 and set(_arrays(tmp_path / "slide.zarr")) == {"argmax", "argmax_prob", "done"}


def test_npy_argmax_item(net, tmp_path):
    """--save argmax in the ordinary mode: NAME.argmax.npy and NAME.argmax_prob.npy from the map."""
    from PIL import Image
    Image.fromarray(_image(120, 140, seed=4)).save(tmp_path / "p.png")
    _, proto, weights = net
    run = call_fcnify("classify-map", tmp_path / "p.png", "--model-def", proto, "--weights", weights,
                      "--out", tmp_path, "--save", "scores,argmax")
    assert run.code == 0, run.err
    probs = np.load(tmp_path / "p.scores.npy")
    assert np.array_equal(np.load(tmp_path / "p.argmax.npy"), probs.argmax(axis=0))
    assert np.array_equal(np.load(tmp_path / "p.argmax_prob.npy"), probs.max(axis=0))


def test_transposed_net_store_equals_the_in_memory_map(net, slide, tmp_path):
    """A net that sees the image transposed (MTCNN's cards): the store, in the image's orientation,
    equals the in-memory map within the float32 bound, chunk grid and cells alike."""
    from dataclasses import replace
    card = net[0]
    card = replace(card, preprocess=replace(card.preprocess, transpose=True))
    model = DenseModel(card, softmax=False, engine="caffe")
    try:
        run = map_to_store(model, slide[0], tmp_path / "t.zarr", keep=ALL, tile=90)
        got = _arrays(tmp_path / "t.zarr")
        whole, _ = model.run_scores(slide[1][0])
        bound = map_bound(model, slide[1][0]).transpose(0, 2, 1)  # the net's orientation -> the image's
    finally:
        model.close()
    assert whole.shape[1] != whole.shape[2] and got["scores"].shape == whole.shape and run.chunks > 4
    ok, used = within(whole, got["scores"], bound)
    assert ok, f"store differs by {used:.3g} of the bound"
    assert np.array_equal(got["argmax"], got["scores"].argmax(axis=0)) and got["done"].all()


def test_atrous_stride_store_equals_the_in_memory_map(net, slide, tmp_path):
    """--stride 4 on the stride-8 net (reached à trous, one pass): the store equals the in-memory map."""
    model = DenseModel(net[0], softmax=False, engine="caffe", stride=4)
    try:
        assert model.shifts == 1 and model.stride_plan.atrous == 2
        run = map_to_store(model, slide[0], tmp_path / "a.zarr", keep=ALL, tile=90)
        got = _arrays(tmp_path / "a.zarr")
        whole, _ = model.run_scores(slide[1][0])
        bound = map_bound(model, slide[1][0])
    finally:
        model.close()
    assert got["scores"].shape == whole.shape and run.chunks > 4
    ok, used = within(whole, got["scores"], bound)
    assert ok, f"store differs by {used:.3g} of the bound"


def test_shift_and_stitch_stride_is_refused(net, slide, tmp_path):
    """A --stride only shift-and-stitch reaches cannot be stored: one line, exit 2, no store."""
    model = DenseModel(net[0], engine="caffe", stride=1)
    try:
        assert model.shifts > 1
    finally:
        model.close()
    _, proto, weights = net
    run = call_fcnify("classify-map", slide[0], "--model-def", proto, "--weights", weights, "--store", "zarr",
                      "--out", tmp_path / "out", "--tile", "90", "--stride", "1")
    assert run.code == 2 and "--stride 1" in run.err and "shift-and-stitch" in run.err, run
    assert len(run.err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "slide.zarr").exists()



def test_other_heads_are_stored_as_their_own_arrays(slide, tmp_path):
    """The net's other output (`box`, 4 values a cell) is the store's head_box, equal to the
    in-memory map's head within the float32 bound of its layer; the class map beside it."""
    from bounds import scores_of
    proto, weights = write_model(tmp_path, "two_heads", TWO_HEADS, seed=5)
    model = DenseModel(card_for_model_def(proto, weights), engine="caffe", output="prob")
    rgb = slide[1][0]
    try:
        assert set(model.heads) == {"box"}
        map_to_store(model, slide[0], tmp_path / "h.zarr", keep=Keep(argmax=True, scores=False), tile=60)
        got = _arrays(tmp_path / "h.zarr")
        probs, info = model.run(rgb, budget=1 << 40)
        layer = scores_of(proto, weights, "box")
        x = model.card.preprocess.apply(rgb)[None]
        bottom = model.net.forward({model.input_blob: x}, [layer.bottom])[layer.bottom]
        bound = layer.tolerance(bottom)[0]
    finally:
        model.close()
    whole = info["heads"]["box"]
    assert got["head_box"].shape == whole.shape == (4, *probs.shape[1:])
    ok, used = within(whole, got["head_box"], bound)
    assert ok, f"head differs by {used:.3g} of the bound"
    assert set(got) == {"argmax", "argmax_prob", "head_box", "done"}


def test_argmax_without_a_sort_is_the_top_1_also_on_ties():
    """The one-pass argmax equals the stable sort's first class, ties (the lower class) included."""
    from fcnify.io.store import reduce_block
    rng = np.random.default_rng(4)
    block = rng.integers(0, 3, size=(6, 20, 30)).astype(np.float32)  # many ties
    out = reduce_block(block, Keep(scores=False, topk=2, argmax=True))
    assert (block == block.max(axis=0)).sum(axis=0).max() > 1
    assert np.array_equal(out["argmax"], out["topk_classes"][0])
    assert np.array_equal(out["argmax_prob"], out["topk_probs"][0])
