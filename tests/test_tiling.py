"""Exact tiling: stitched tile maps equal the whole-image map."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fcnify.surgery.bound import within
from fcnify.convert import convert
from fcnify.dense.dense import DenseModel
from fcnify.caffe.geometry import map_geometry, map_size
from fcnify.io.images import resize
from fcnify.convert import card_for_model_def
from fcnify.caffe.netdef import parse_netdef
from fcnify.errors import ResourceError
from fcnify.caffe.planner import HEADROOM, SPEED_CAP, estimate, fits, largest_square
from fcnify.caffe.shapes import INT_MAX
from fcnify.dense.tiling import min_tile, plan

from bounds import map_bound
from conftest import write_model

# A small net with a stride of 8, padding, ceil-rounded pooling that overhangs,
# LRN and a dilated convolution: different geometry from CaffeNet's. The LRN has
# CaffeNet's alpha: with Caffe's default alpha = 1 on activations of ~300 it divides
# them by up to ~300 while passing a near-zero channel's rounding error at gain 1,
# which breaks the bound's stated assumption (docs/verify.md, 'A chain of layers'):
# tiles vs whole then differed by 2.2x the bound under one OpenBLAS thread on an AMD EPYC.
STRIDE8 = """
name: "stride8"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 45 dim: 45 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 5 stride: 2 pad: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
        lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
        convolution_param { num_output: 12 kernel_size: 3 pad: 2 dilation: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "fc3" type: "InnerProduct" bottom: "pool2" top: "fc3" inner_product_param { num_output: 16 } }
layer { name: "relu3" type: "ReLU" bottom: "fc3" top: "fc3" }
layer { name: "fc4" type: "InnerProduct" bottom: "fc3" top: "fc4" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc4" top: "prob" }
"""


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 12), max(2, w // 12), 3), dtype=np.uint8)
    noise = rng.integers(-25, 26, size=(h, w, 3))
    return np.clip(resize(small, h, w).astype(np.int16) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def caffenet_fcn(caffenet, tmp_path_factory):
    proto, weights = caffenet
    out = tmp_path_factory.mktemp("tiling") / "caffenet"
    result = convert(proto, weights, out, check=False)
    card = card_for_model_def(result.outputs["prototxt"], result.outputs["caffemodel"])
    model = DenseModel(card, engine="caffe")  # Caffe's memory model (planner.estimate) plans its tiles
    yield model
    model.close()


@pytest.fixture(scope="module")
def stride8_fcn(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stride8")
    proto, weights = write_model(tmp, "stride8", STRIDE8, seed=3)
    result = convert(proto, weights, tmp / "s8", check=False)
    card = card_for_model_def(result.outputs["prototxt"], result.outputs["caffemodel"])
    model = DenseModel(card, engine="caffe")  # Caffe's memory model (planner.estimate) plans its tiles
    yield model
    model.close()


def _equal_to_rounding(model, img: np.ndarray, whole: np.ndarray, tiled: np.ndarray) -> None:
    """Tiles give other BLAS shapes, so other summation orders: equal within the float32 bound."""
    ok, used = within(whole, tiled, map_bound(model, img))
    assert ok, f"tiled map differs from the whole image's by {used:.3g} of the float32 bound"


@pytest.mark.parametrize("h,w,tile", [(700, 600, 451), (620, 960, 500), (451, 900, 390)])
def test_caffenet_tiled_equals_whole(caffenet_fcn, h, w, tile):
    """CaffeNet scores stitched from tiles equal the whole image's, at several sizes and tiles."""
    img = _image(h, w, seed=h + w)
    whole, info_w = caffenet_fcn.run_scores(img, budget=1 << 40)
    tiled, info_t = caffenet_fcn.run_scores(img, tile=tile)
    assert info_w["mode"] == "whole" and info_t["mode"] == "tiled" and info_t["tiles"] > 1
    assert whole.shape == tiled.shape == (1000,) + map_size(caffenet_fcn.netdef.param, h, w)
    _equal_to_rounding(caffenet_fcn, img, whole, tiled)


@pytest.mark.parametrize("h,w,tile", [(203, 157, 90), (160, 333, 120), (121, 121, 100)])
def test_stride8_tiled_equals_whole(stride8_fcn, h, w, tile):
    """A stride-8 net with dilation, padded AVE pooling and LRN tiles exactly too."""
    assert stride8_fcn.geometry.stride == (8, 8)
    img = _image(h, w, seed=h * w)
    whole, _ = stride8_fcn.run_scores(img, budget=1 << 40)
    tiled, info = stride8_fcn.run_scores(img, tile=tile)
    assert info["tiles"] > 1
    _equal_to_rounding(stride8_fcn, img, whole, tiled)


def test_naive_tiling_is_not_exact(stride8_fcn):
    """Cutting tiles without the reach margin changes cells: the test data can see a wrong tiling."""
    img = _image(203, 157, seed=1)
    whole, _ = stride8_fcn.run_scores(img, budget=1 << 40)
    net = stride8_fcn.net
    blob = stride8_fcn.score_blob
    # the left half on its own, as a user cutting by hand would do
    x = stride8_fcn.card.preprocess.apply(img[:, :80])[None]
    half = net.forward({stride8_fcn.input_blob: x}, [blob])[blob][0]
    cols = half.shape[2]
    _, used = within(whole[:, :, :cols], half, map_bound(stride8_fcn, img)[:, :, :cols])
    assert used > 10, used


def test_plan_partitions_cells(stride8_fcn):
    """Kept cells cover every map cell exactly once, origins on the stride grid, few tile shapes."""
    net = stride8_fcn.netdef.param
    geo = map_geometry(net, stride8_fcn.score_blob)
    h, w = 403, 517
    rows, cols = map_size(net, h, w, stride8_fcn.score_blob)
    tiles = plan(h, w, rows, cols, (120, 150), geo.y, geo.x,
                 lambda n: map_size(net, n, w, stride8_fcn.score_blob)[0],
                 lambda n: map_size(net, h, n, stride8_fcn.score_blob)[1])
    hits = np.zeros((rows, cols), dtype=int)
    for t in tiles:
        assert t.y.start % 8 == 0 and t.x.start % 8 == 0
        assert t.y.stop <= h and t.x.stop <= w
        hits[t.y.first:t.y.last + 1, t.x.first:t.x.last + 1] += 1
    assert (hits == 1).all()
    assert len({t.shape for t in tiles}) <= 4
    shapes_in_order = [t.shape for t in tiles]
    assert shapes_in_order == sorted(shapes_in_order), "tiles must be grouped by shape"


def test_min_tile_from_reach(caffenet_fcn):
    """The smallest useful tile is the reach plus the lead margin (CaffeNet: 64 + 290 + 1 px)."""
    g = caffenet_fcn.geometry
    assert (g.y.reach_lo, g.y.reach_hi) == (-64, 290)
    assert min_tile(g.y) == 64 + 290 + 1


def test_budget_picks_tiles(caffenet_fcn):
    """A budget below the whole image's estimate makes the planner tile, within the budget."""
    net = caffenet_fcn.netdef.param
    h = w = 1400
    need = estimate(net, h, w).total
    budget = int(need * 0.75)
    tiles, tile_size = caffenet_fcn.plan(h, w, budget=budget)
    assert len(tiles) > 1 and tile_size is not None
    assert estimate(net, *tile_size).total <= budget * HEADROOM
    bigger = (tile_size[0] + 32, tile_size[1] + 32)
    assert estimate(net, *bigger).total > budget * HEADROOM, \
        "the planner should take the largest tile that fits"


def test_speed_cap_tiles_large_passes(caffenet_fcn):
    """With memory to spare, a pass whose activations pass the speed cap is still tiled."""
    net = caffenet_fcn.netdef.param
    assert estimate(net, 3000, 3000).activations > SPEED_CAP
    tiles, tile_size = caffenet_fcn.plan(3000, 3000, budget=1 << 40)
    assert len(tiles) > 1 and estimate(net, *tile_size).activations <= SPEED_CAP
    assert caffenet_fcn.plan(1000, 1000, budget=1 << 40)[1] is None  # small: one pass


def test_int_max_forces_tiling(caffenet_fcn):
    """An input whose blob or im2col buffer would pass INT_MAX never runs in one pass.

    The budget is unlimited and the speed cap off, so only the INT_MAX rule can
    refuse these sizes: CaffeNet's conv2 im2col buffer (96*5*5 rows x the conv2
    cells) passes INT_MAX at about 7570 px, its largest blob (conv1) at about
    18900 px.
    """
    net = caffenet_fcn.netdef.param
    unlimited = 1 << 50
    assert estimate(net, 7000, 7000).largest_buffer < INT_MAX < estimate(net, 7600, 7600).largest_buffer
    assert estimate(net, 7600, 7600).largest_blob < INT_MAX
    assert fits(net, 7000, 7000, unlimited, speed_cap=None)
    assert not fits(net, 7600, 7600, unlimited, speed_cap=None)
    assert not fits(net, 19500, 19500, unlimited, speed_cap=None)  # conv1's blob itself
    with pytest.raises(ResourceError, match="INT_MAX"):
        estimate(net, 19500, 19500)
    side = largest_square(net, unlimited, 32, 355, 20000, speed_cap=None)
    assert 7000 < side < 7600
    assert estimate(net, side, side).largest_buffer <= INT_MAX < estimate(net, side + 32, side + 32).largest_buffer
    tiles, tile_size = caffenet_fcn.plan(40000, 40000, budget=3 << 30)
    assert len(tiles) > 1 and fits(net, *tile_size, 3 << 30)
