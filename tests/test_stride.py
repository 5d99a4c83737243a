"""--stride: maps finer than the net's stride, à trous and shift-and-stitch, held to exact references.

Each cell of a stride-S map must be the stride-N net's cell for the window
at (r*S, c*S): shift-and-stitch is compared bit for bit with the stride-N
net run on the shifted image (same engine, same shapes); à trous changes
the matrix shapes of the dilated layers, so BLAS may sum in another order,
and it is held to the float32 bound of the score layer (tests/bounds.py,
docs/verify.md), as the tiling tests are; so are the torch engine and the
original classifier on the crops under the cells.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from fcnify.convert import convert
from fcnify.dense.dense import DenseModel
from fcnify.errors import InputError
from fcnify.convert import card_for_model_def
from fcnify.io.models import read_card
from fcnify.io.preprocess import Preprocess
from fcnify.surgery.bound import within

from bounds import map_bound, scores_of
from realdata import LENET_DEF, LENET_WEIGHTS, digit_scene


def lenet_card():
    """Caffe's LeNet MNIST with the pixels it was trained on: grey, x/256, no mean."""
    card = card_for_model_def(LENET_DEF, LENET_WEIGHTS)
    return replace(card, preprocess=Preprocess(channels="gray", raw_scale=255 / 256, mean=None))


@pytest.fixture(scope="module")
def lenet_models():
    models = {key: DenseModel(lenet_card(), stride=s, atrous=a)
              for key, (s, a) in {"native": (None, True), "s1": (1, True), "s2": (2, True),
                                  "s1_shift": (1, False)}.items()}
    yield models
    for m in models.values():
        m.close()


def _assert_within(a: np.ndarray, b: np.ndarray, bound: np.ndarray, what: str) -> None:
    """The same sums in other orders: equal within the float32 bound (bound.within)."""
    ok, used = within(a, b, bound)
    assert ok, f"{what}: {used:.3g} of the float32 bound"


def test_lenet_plan_is_atrous_then_shift(lenet_models):
    """LeNet (stride 4): pool2 goes to stride 1 (x2 by à trous), the last x2 by 2x2 shifted runs."""
    plan = lenet_models["s1"].stride_plan
    assert (plan.atrous, plan.layer, plan.shifts) == (2, "pool2", 2)
    assert lenet_models["s2"].stride_plan.shifts == 1
    assert lenet_models["s1"].geometry.stride == (1, 1)
    assert lenet_models["s1"].geometry.field == (28, 28)


def test_lenet_shift_and_stitch_equals_shifted_runs(lenet_models):
    """Shift-and-stitch only: cell (r, c) is, bit for bit, the stride-4 map of the shifted image."""
    scene, _ = digit_scene(70, 83, 3, seed=3, gap=4)
    fine, _ = lenet_models["s1_shift"].run_scores(scene)
    native = lenet_models["native"]
    for dy in range(4):
        for dx in range(4):
            ref, _ = native.run_scores(scene[dy:, dx:])
            part = fine[:, dy::4, dx::4]
            assert np.array_equal(part, ref[:, :part.shape[1], :part.shape[2]]), (dy, dx)
    # every full 28-px window, and (Caffe's ceil rounding in pooling) those hanging over the edge
    assert fine.shape[1] >= 70 - 28 + 1 and fine.shape[2] >= 83 - 28 + 1


@pytest.mark.parametrize("key", ["s1", "s2", "s1_shift"])
def test_lenet_cells_equal_the_classifier_on_crops(lenet_models, key):
    """LeNet has no padding: every cell equals the original net on the 28x28 crop at (r*S, c*S)."""
    scene, _ = digit_scene(64, 61, 3, seed=4, gap=4)
    model = lenet_models[key]
    fine, _ = model.run_scores(scene)
    s = model.geometry.stride[0]
    original = model.runner.load(LENET_DEF, LENET_WEIGHTS)
    try:
        rows, cols = (64 - 28) // s + 1, (61 - 28) // s + 1  # full windows (pooling may add more)
        fine = fine[:, :rows, :cols]
        crops = np.stack([model.card.preprocess.apply(scene[r * s:r * s + 28, c * s:c * s + 28])
                          for r in range(rows) for c in range(cols)])
        outs = [original.forward({"data": crops[i:i + 64]}, ["ip2", "ip1"]) for i in range(0, len(crops), 64)]
    finally:
        original.close()
    ref = np.concatenate([o["ip2"] for o in outs])
    # the bound of LeNet's ip2 on what it read for each crop (ip1 after its in-place ReLU)
    bound = scores_of(LENET_DEF, LENET_WEIGHTS, "ip2").tolerance(np.concatenate([o["ip1"] for o in outs]))
    got = fine.reshape(fine.shape[0], -1).T
    assert got.shape == ref.shape
    _assert_within(got, ref, bound, f"{key}: cells against LeNet on the crops")


def test_lenet_stride_with_tiles_and_torch(lenet_models):
    """--stride 1 gives the same map tiled (forced 40-px tiles) and on the torch engine."""
    scene, _ = digit_scene(90, 100, 4, seed=5, gap=4)
    whole, info = lenet_models["s1"].run_scores(scene)
    tiled, tinfo = lenet_models["s1"].run_scores(scene, tile=40)
    assert info["mode"] == "whole" and tinfo["mode"] == "tiled"
    bound = map_bound(lenet_models["s1"], scene, whole.shape)  # one pass per offset, interleaved
    _assert_within(tiled, whole, bound, "tiled against whole")
    torch_model = DenseModel(lenet_card(), engine="torch", stride=1)
    try:
        on_torch, _ = torch_model.run_scores(scene)
    finally:
        torch_model.close()
    # the torch engine is held to Caffe by the same bound (as in tests/test_torch_engine.py)
    _assert_within(on_torch, whole, bound, "torch against Caffe")


def test_lenet_stride_1_names_digits_placed_anywhere(lenet_models):
    """Done-when: the cell centred on each digit names it for >= 98% at stride 1 (vs stride 4)."""
    scene, placed = digit_scene(360, 480, 120, seed=14, gap=4)
    assert len(placed) >= 90
    right = {}
    for key in ("native", "s1"):
        model = lenet_models[key]
        dm = model.classify(scene)
        s = model.geometry.stride[0]
        arg = dm.argmax()
        hits = 0
        for p in placed:
            x0, y0 = p.box[:2]
            r = min(round(y0 / s), dm.shape[0] - 1)
            c = min(round(x0 / s), dm.shape[1] - 1)
            hits += int(arg[r, c]) == p.label
        right[key] = hits / len(placed)
    print(f"\ndigits named by the cell centred on them: stride 4 {right['native']:.1%}, "
          f"stride 1 {right['s1']:.1%} of {len(placed)}")
    assert right["s1"] >= 0.98
    assert right["s1"] > right["native"]


@pytest.fixture(scope="module")
def caffenet_card(caffenet, tmp_path_factory):
    proto, weights = caffenet
    result = convert(proto, weights, tmp_path_factory.mktemp("cn_stride") / "cn", check=False)
    return read_card(result.outputs["card"])


def test_caffenet_plans(caffenet_card):
    """CaffeNet: 16 by à trous on pool5; 8 is à trous plus 2x2 offsets; 12 does not divide 32."""
    from fcnify.caffe.netdef import read_netdef
    from fcnify.dense.stride import plan_stride
    net = read_netdef(caffenet_card.model_def).param
    assert (plan_stride(net, (32, 32), 16).atrous, plan_stride(net, (32, 32), 16).layer) == (2, "pool5")
    p8 = plan_stride(net, (32, 32), 8)
    assert (p8.atrous, p8.shifts) == (2, 2)
    assert plan_stride(net, (32, 32), 16, atrous=False).shifts == 2
    with pytest.raises(InputError, match="does not divide the net's stride of 32 px"):
        plan_stride(net, (32, 32), 12)


def test_caffenet_stride_16(caffenet_card):
    """Seeded CaffeNet at stride 16: shift-and-stitch equals the shifted runs bit for bit; à trous
    equals the stride-32 map on its grid and the shifted runs wherever padding cannot reach."""
    rng = np.random.default_rng(16)
    img = rng.integers(0, 256, (227 + 96, 227 + 128, 3), dtype=np.uint8)
    native = DenseModel(caffenet_card)
    shifted = DenseModel(caffenet_card, runner=native.runner, stride=16, atrous=False)
    atrous = DenseModel(caffenet_card, runner=native.runner, stride=16)
    try:
        base, _ = native.run_scores(img)
        refs = {(i, j): native.run_scores(img[16 * i:, 16 * j:])[0] for i in (0, 1) for j in (0, 1)}
        stitched, _ = shifted.run_scores(img)
        fine, _ = atrous.run_scores(img)
        for (i, j), ref in refs.items():
            part = stitched[:, i::2, j::2]
            assert np.array_equal(part, ref[:, :part.shape[1], :part.shape[2]]), (i, j)
        _assert_within(fine[:, ::2, ::2], base, map_bound(native, img), "à trous on the stride-32 grid")
        # CaffeNet reaches 64 px above and left of a window: from shifted cell 2 on, no padding
        for (i, j), ref in refs.items():
            a = fine[:, i::2, j::2][:, 2:, 2:]
            rows, cols = min(a.shape[1], ref.shape[1] - 2), min(a.shape[2], ref.shape[2] - 2)
            assert rows >= 1 and cols >= 1
            bound = map_bound(native, img[16 * i:, 16 * j:])[:, 2:2 + rows, 2:2 + cols]
            _assert_within(a[:, :rows, :cols], ref[:, 2:2 + rows, 2:2 + cols], bound, f"offset {(i, j)}")
        assert atrous.stride_plan.method.startswith("à trous")
    finally:
        atrous.close()
        shifted.close()
        native.close()


# ------------------------------------------------------------------ a net whose declared input is small

@pytest.fixture(scope="module")
def cifar_card(caffe_root, tmp_path_factory):
    """Caffe's CIFAR-10 quick with seeded weights, converted: 32x32 input, stride 8, ceil-rounded pooling."""
    from conftest import write_model
    tmp = tmp_path_factory.mktemp("cifar")
    text = (caffe_root / "examples" / "cifar10" / "cifar10_quick.prototxt").read_text()
    proto, weights = write_model(tmp, "cifar", text, seed=10)
    return read_card(convert(proto, weights, tmp / "cifar", check=False).outputs["card"])


def test_cifar_quick_maps_at_every_stride(cifar_card):
    """CIFAR-10 quick at --stride 4, 2, 1: à trous needs more than its 32x32 declared input (its
    last pooling can no longer hang over the edge), yet every stride maps; stride 4 equals the
    stride-8 map on its grid within the float32 bound, 2 and 1 the stride-4 net's shifted runs."""
    img = np.random.default_rng(32).integers(0, 256, (101, 93, 3), dtype=np.uint8)
    native = DenseModel(cifar_card)
    models = {s: DenseModel(cifar_card, runner=native.runner, stride=s) for s in (4, 2, 1)}
    try:
        base, _ = native.run_scores(img)
        fine = {s: m.run_scores(img)[0] for s, m in models.items()}
        grid = fine[4][:, ::2, ::2]
        rows, cols = grid.shape[1:]
        assert rows >= base.shape[1] - 1 and cols >= base.shape[2] - 1  # only an overhanging cell is lost
        ok, used = within(grid, base[:, :rows, :cols], map_bound(native, img)[:, :rows, :cols])
        assert ok, f"stride 4 differs from stride 8 on its grid by {used:.3g} of the float32 bound"
        for s, f in ((2, 2), (1, 4)):
            assert models[s].geometry.stride == (s, s) and models[s].stride_plan.shifts == f
            for i in range(f):
                for j in range(f):
                    ref, _ = models[4].run_scores(img[i * s:, j * s:])
                    part = fine[s][:, i::f, j::f]
                    assert np.array_equal(part, ref[:, :part.shape[1], :part.shape[2]]), (s, i, j)
    finally:
        for m in models.values():
            m.close()
        native.close()


def test_cifar_quick_too_small_for_stride_names_the_image(cifar_card, tmp_path):
    """An image one cell fits natively but not à trous: one line naming the image, no temporary file."""
    from PIL import Image
    from conftest import call_fcnify
    Image.fromarray(np.full((34, 34, 3), 128, np.uint8)).save(tmp_path / "small.png")
    run = call_fcnify("classify-map", tmp_path / "small.png", "--card", cifar_card.card_path,
                      "--stride", "4")
    assert run.code == 2, run.err
    assert run.err.startswith(f"fcnify: error: {tmp_path / 'small.png'}: image is 34x34 px")
    assert "at stride 4" in run.err and "fcnify-" not in run.err and len(run.err.splitlines()) == 1


def test_map_json_says_how_the_stride_was_made(tmp_path):
    """classify-map --stride 2 and 1 on digits (stride 4, LeNet's layers): map.json's "stride" says
    à trous on pool2, and at 1 also 2x2 shift-and-stitch offsets (README: the run's JSON says which)."""
    from PIL import Image
    from conftest import call_fcnify
    from fcnify.paths import prototxt_dir
    image = tmp_path / "crop.png"
    Image.open(prototxt_dir() / "digits" / "scene.png").crop((0, 0, 64, 48)).save(image)
    atrous = "à trous (pool2 stride / 2, later convolutions dilated)"
    for stride, method, shifts in ((2, atrous, 1), (1, atrous + " + shift-and-stitch (2x2 offsets)", 2)):
        run = call_fcnify("classify-map", image, "--model", "digits", "--stride", stride, "--engine", "caffe",
                          "--out", tmp_path / str(stride), "--quiet")
        assert run.code == 0, run.err
        doc = json.loads((tmp_path / str(stride) / "crop.map.json").read_text())
        assert doc["stride"] == {"net_stride": 4, "stride": stride, "method": method, "atrous_factor": 2,
                                 "atrous_layer": "pool2", "shift_offsets_per_axis": shifts}
        assert doc["map"]["stride_px"] == [stride, stride]
