"""Tests for `fcnify convert`, `fcnify verify` and `fcnify info`, end to end through Caffe.

Weights are seeded and He-scaled (conftest.write_model), big enough that a
wrong conversion shows: the negative controls below transplant deliberately
wrong kernels and must be reported NOT EQUIVALENT.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fcnify.surgery.bound import score_layer, within
from fcnify.caffe.caffemodel import read_weights, write_weights
from fcnify.caffe.netdef import parse_netdef, read_netdef
from fcnify.caffe.proto import caffe_pb2
from fcnify.synthetic import random_blobs

from conftest import call_fcnify, run_fcnify, write_model
from nets import NIN, NIN_DENSE, PLAIN, V1_NET, input_layer, layer_text, small_net, vgg16, zoo

COMPARISON = re.compile(r": (\S+) of the bound \[.*\]; top-1(?: and top-5)? (same|DIFFERENT)")


def comparisons(out: str) -> list[tuple[float, str]]:
    """(fraction of the bound used, top-1/top-5 verdict) of each compared blob in a report."""
    return [(float(m.group(1)), m.group(2)) for m in COMPARISON.finditer(out)]


def assert_equivalent(run, blobs: int = 2) -> None:
    """Exit 0, EQUIVALENT, and every compared blob (scores before Softmax, output) within its bound."""
    assert run.code == 0, run.out + run.err
    assert "\n  result: EQUIVALENT" in run.out
    found = comparisons(run.out)
    assert len(found) == blobs, run.out
    assert all(used <= 1 and ranks == "same" for used, ranks in found), run.out


def outputs(prefix: Path) -> dict[str, Path]:
    return {ext: Path(f"{prefix}_full_conv.{ext}") for ext in ("prototxt", "caffemodel", "json")}


def card(prefix: Path) -> dict:
    return json.loads(outputs(prefix)["json"].read_text())


def sha1(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def convert_cli(proto: Path, weights: Path, prefix: Path, *extra: str):
    return call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", prefix, *extra)


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------ CaffeNet, the reference case

@pytest.fixture(scope="module")
def caffenet_converted(caffenet, tmp_path_factory):
    """`fcnify convert` run once on CaffeNet in a fresh process: (run, prefix, input hashes before)."""
    proto, weights = caffenet
    before = {p: sha1(p) for p in (proto, weights)}
    prefix = tmp_path_factory.mktemp("caffenet_fcn") / "caffenet"
    run = run_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", prefix)
    return run, prefix, before


def test_caffenet_converts_and_verifies(caffenet_converted):
    """CaffeNet converts, and the check finds it EQUIVALENT (within the bound, same top-1/top-5)."""
    run, prefix, before = caffenet_converted
    assert_equivalent(run)
    assert all(p.is_file() for p in outputs(prefix).values())
    verification = card(prefix)["verification"]
    assert verification["equivalent"] is True
    assert all(c["fraction"] <= 1 and c["top1_agree"] and c["topk_agree"] and c["ok"]
               for c in verification["comparisons"])
    assert [c["kind"] for c in verification["comparisons"]] == ["scores", "probabilities"]
    assert verification["params_checked"] == 16 and verification["params_mismatched"] == []  # 8 layers
    assert {p: sha1(p) for p in before} == before  # the inputs are untouched


def test_written_caffenet_matches_caffes_net_surgery_example(caffenet_converted, caffe_root):
    """The written prototxt equals bvlc_caffenet_full_conv.prototxt layer for layer, input shape aside."""
    _, prefix, _ = caffenet_converted
    ours = read_netdef(outputs(prefix)["prototxt"]).param
    theirs = read_netdef(caffe_root / "examples" / "net_surgery" / "bvlc_caffenet_full_conv.prototxt").param
    assert len(ours.layer) == len(theirs.layer)
    for a, b in zip(ours.layer, theirs.layer):
        if a.type == "Input":
            a, b = type(a)(name=a.name, type=a.type, top=a.top), type(b)(name=b.name, type=b.type, top=b.top)
        assert a == b, f"{a}\nvs Caffe's\n{b}"


def test_verify_finds_the_converted_caffenet_equivalent(caffenet_converted, caffenet):
    """`fcnify verify ORIGINAL FCN` (weights found through FCN's card) reports EQUIVALENT."""
    _, prefix, _ = caffenet_converted
    assert_equivalent(call_fcnify("verify", caffenet[0], outputs(prefix)["prototxt"]))


@pytest.mark.parametrize("env", [{"OPENBLAS_NUM_THREADS": "1"}, {"OPENBLAS_NUM_THREADS": "2"},
                                 {"OPENBLAS_NUM_THREADS": "4"}, {"ENGINE": "torch"}],
                         ids=["1 BLAS thread", "2 BLAS threads", "4 BLAS threads", "torch"])
def test_caffenet_verify_is_equivalent_on_other_kernels(caffenet_converted, caffenet, env):
    """verify --format json: EQUIVALENT with 1, 2 or 4 BLAS threads and on the torch engine,
    each score within its bound, inputs that are not all saturated."""
    _, prefix, _ = caffenet_converted
    engine = ["--engine", env.pop("ENGINE")] if "ENGINE" in env else []
    run = run_fcnify("verify", caffenet[0], outputs(prefix)["prototxt"], "--samples", "1", "--format", "json",
                     *engine, env=env)
    assert run.code == 0, run.out + run.err
    doc = json.loads(run.out)
    assert doc["equivalent"] is True and doc["saturated"] is False
    scores = doc["comparisons"][0]
    assert scores["kind"] == "scores" and 0 <= scores["fraction"] <= 1 and scores["bound"] > 0
    assert doc["criterion"]["accumulation_length"] == 25460  # input 1, conv1 363+1, LRN 5+2*96+3, ..., fc8 4096+1
    assert min(doc["top_probability"]) <= 0.9 and doc["added_for_saturation"]


def test_verify_accepts_caffes_hand_written_fcn(caffenet_converted, caffenet, caffe_root):
    """Caffe's own full-conv CaffeNet with fcnify's weights reproduces CaffeNet, all 16 blobs equal."""
    proto, weights = caffenet
    _, prefix, _ = caffenet_converted
    reference = caffe_root / "examples" / "net_surgery" / "bvlc_caffenet_full_conv.prototxt"
    run = call_fcnify("verify", proto, reference, "--weights", weights,
                      "--fcn-weights", outputs(prefix)["caffemodel"])
    assert_equivalent(run)
    assert "16/16 identical" in run.out


def test_verify_without_weights_or_card_asks_for_weights(tmp_path):
    """`fcnify verify` on an FCN with no card beside it cannot tell the original's weights: exit 2."""
    original, _ = write_model(tmp_path, "small", small_net("plain"))
    fcn = tmp_path / "fcn.prototxt"
    fcn.write_text(small_net("plain"))
    run = call_fcnify("verify", original, fcn)
    assert run.code == 2 and "cannot tell the original's weights: pass --weights" in run.err


def test_verify_rejects_transposed_fc6_kernels(caffenet_converted, caffenet, tmp_path):
    """Negative control: fc6-conv kernels with height and width swapped are NOT EQUIVALENT (exit 1)."""
    proto, weights = caffenet
    _, prefix, _ = caffenet_converted
    fcn = read_netdef(outputs(prefix)["prototxt"])
    blobs = {name: list(lw.blobs) for name, lw in read_weights(outputs(prefix)["caffemodel"]).layers.items()}
    blobs["fc6-conv"][0] = np.ascontiguousarray(blobs["fc6-conv"][0].transpose(0, 1, 3, 2))
    wrong = tmp_path / "wrong.caffemodel"
    with open(wrong, "wb") as f:
        write_weights(f, fcn.param, blobs)
    run = call_fcnify("verify", proto, outputs(prefix)["prototxt"], "--weights", weights, "--fcn-weights", wrong)
    assert run.code == 1
    assert "result: NOT EQUIVALENT" in run.out and "mismatched: fc6-conv[0]" in run.out
    (score_used, _), _ = comparisons(run.out)
    assert score_used > 10  # the outputs themselves differ, far past the bound, not only the digests


def test_caffenet_cells_differ_from_crops_because_of_padding(caffenet_converted, caffenet):
    """At 259 px each of the 2x2 cells differs from classifying its 227 px crop by over 5%."""
    from fcnify.engines.caffe_engine import CaffeRunner
    proto, weights = caffenet
    _, prefix, _ = caffenet_converted
    runner = CaffeRunner()
    original = runner.load(proto, weights)
    fcn = runner.load(outputs(prefix)["prototxt"], outputs(prefix)["caffemodel"])
    try:
        image = np.random.default_rng(0).normal(0, 50, (1, 3, 259, 259)).astype(np.float32)
        dense = fcn.forward({"data": image}, ["fc8-conv"])["fc8-conv"][0]
        corners = [(r, c) for r in (0, 1) for c in (0, 1)]
        crops = np.stack([image[0, :, 32 * r:32 * r + 227, 32 * c:32 * c + 227] for r, c in corners])
        out = original.forward({"data": crops}, ["fc8", "fc7"])
        scores = out["fc8"]
        centre = fcn.forward({"data": crops[:1]}, ["fc8-conv"])["fc8-conv"][0, :, 0, 0]
    finally:
        original.close()
        fcn.close()
    fc8 = score_layer(read_netdef(proto).param, "fc8", read_weights(weights))
    assert within(scores[0], centre, fc8.tolerance(out["fc7"][:1])[0])[0]  # InnerProduct vs 1x1 conv
    for i, (r, c) in enumerate(corners):
        rel = np.abs(dense[:, r, c] - scores[i]).max() / np.abs(scores[i]).max()
        assert rel > 0.05, f"cell ({r}, {c}) equals its crop to {rel:.3f}: padding has no effect?"


# ------------------------------------------------------------------ other nets, seeded weights

@pytest.mark.parametrize("name", ["alexnet", "rcnn", "flickr", "googlenet"])
def test_zoo_net_converts_and_verifies(name, caffe_root, tmp_path):
    """Caffe's AlexNet, R-CNN ILSVRC13, Flickr-style and GoogLeNet convert and verify EQUIVALENT."""
    text = zoo(caffe_root, name).read_text()
    proto, weights = write_model(tmp_path, name, text, seed=2)
    run = convert_cli(proto, weights, tmp_path / "out")
    layers = parse_netdef(text).param.layer
    assert_equivalent(run, blobs=2 if layers[-1].type == "Softmax" else 1)  # R-CNN ends in fc-rcnn
    ips = [l.name for l in layers if l.type == "InnerProduct"]
    assert [c["layer"] for c in card(tmp_path / "out")["conversions"] if c["kind"] == "inner_product"] == ips


def test_narrow_vgg16_converts_and_verifies(tmp_path):
    """VGG-16 at 1/8 width converts (fc6: 7x7 over 64 channels) and verifies EQUIVALENT."""
    proto, weights = write_model(tmp_path, "vgg", vgg16(width=8), seed=2)
    run = convert_cli(proto, weights, tmp_path / "vgg")
    assert_equivalent(run)
    fc6 = next(c for c in card(tmp_path / "vgg")["conversions"] if c["layer"] == "fc6")
    assert fc6["new_params"] == [[512, 64, 7, 7], [512]]


@pytest.mark.parametrize("head", ["plain", "transpose", "no_bias", "flatten", "reshape", "global_pooling",
                                  "axis_minus_one"])
def test_small_net_variant_converts_and_verifies(head, tmp_path):
    """transpose, bias_term: false, Flatten, Reshape, global pooling and axis -1 all verify EQUIVALENT."""
    proto, weights = write_model(tmp_path, head, small_net(head), seed=3)
    assert_equivalent(convert_cli(proto, weights, tmp_path / "out"))


def v1_caffemodel(path: Path, seed: int) -> dict[str, list[np.ndarray]]:
    """A V1-format caffemodel for V1_NET: `layers` entries, blobs with num/channels/height/width."""
    pb = caffe_pb2()
    arrays = random_blobs(parse_netdef(V1_NET), seed)
    net = pb.NetParameter(name="v1net")
    for name, blobs in arrays.items():
        kind = pb.V1LayerParameter.CONVOLUTION if name.startswith("conv") else pb.V1LayerParameter.INNER_PRODUCT
        layer = net.layers.add(name=name, type=kind)
        for array in blobs:
            num, channels, height, width = (1,) * (4 - array.ndim) + array.shape  # Caffe's legacy 4-D view
            blob = layer.blobs.add(num=num, channels=channels, height=height, width=width)
            blob.data.extend(array.ravel().tolist())
    path.write_bytes(net.SerializeToString())
    return arrays


def test_v1_net_and_v1_caffemodel_convert_and_verify(tmp_path):
    """A V1 prototxt with a V1 caffemodel (legacy 4-D blobs) converts, verifies, and keeps fc6's numbers."""
    proto = tmp_path / "v1.prototxt"
    proto.write_text(V1_NET)
    weights = tmp_path / "v1.caffemodel"
    arrays = v1_caffemodel(weights, seed=4)
    assert read_weights(weights).format == "V1"
    run = convert_cli(proto, weights, tmp_path / "out")
    assert_equivalent(run)
    assert "upgraded from V1" in run.out
    converted = read_weights(outputs(tmp_path / "out")["caffemodel"])
    # fc6's 32 x 784 rows are 16 x 7 x 7 kernels in Caffe's C-order (channel, row, column)
    np.testing.assert_array_equal(converted["fc6-conv"].blobs[0], arrays["fc6"][0].reshape(32, 16, 7, 7))
    np.testing.assert_array_equal(converted["fc7-conv"].blobs[1], arrays["fc7"][1])


def test_input_size_is_written_and_the_check_runs_at_the_original_size(tmp_path):
    """--input-size 64 declares a 64x64 input in the new net; the check still runs at 32x32."""
    proto, weights = write_model(tmp_path, "small", small_net("plain"), seed=3)
    run = convert_cli(proto, weights, tmp_path / "out", "--input-size", "64")
    assert_equivalent(run)
    assert "equivalence check at input 1x3x32x32" in run.out
    data = read_netdef(outputs(tmp_path / "out")["prototxt"]).layer("data")
    assert list(data.input_param.shape[0].dim) == [1, 3, 64, 64]
    assert card(tmp_path / "out")["original_input_shape"] == [1, 3, 32, 32]


# ------------------------------------------------------------------ nets that are not converted

def test_net_without_inner_product_gets_only_a_card(tmp_path):
    """A NIN-like net whose last pool slides: exit 0, 'nothing to convert', and only its card,
    pointing at the net's own prototxt and caffemodel, with the preprocessing given."""
    proto, weights = write_model(tmp_path, "nin", NIN_DENSE)
    before = files_in(tmp_path)
    run = convert_cli(proto, weights, tmp_path / "out", "--channels", "rgb")
    assert run.code == 0, run.err
    assert "nothing to convert in" in run.out and "already fully convolutional" in run.out
    assert files_in(tmp_path) == before | {"out_full_conv.json"}
    written = card(tmp_path / "out")
    assert (tmp_path / written["model_def"]).resolve() == proto.resolve()
    assert (tmp_path / written["weights"]).resolve() == weights.resolve()
    assert written["converted"] is False and written["preprocess"]["channels"] == "RGB"
    assert written["geometry"]["stride"] and written["verification"] is None


def test_inner_product_along_spatial_axes_is_refused_with_a_reason(tmp_path):
    """fc6 with axis 2 is refused (exit 2): one matrix per channel is no convolution; nothing written."""
    proto, weights = write_model(tmp_path, "ax", small_net(PLAIN.replace("num_output: 32 }",
                                                                        "num_output: 32 axis: 2 }")))
    before = files_in(tmp_path)
    run = convert_cli(proto, weights, tmp_path / "out")
    assert run.code == 2
    assert "InnerProduct 'fc6' has axis 2" in run.err and "cannot reproduce" in run.err
    assert files_in(tmp_path) == before


def test_inner_product_whose_input_has_no_map_is_refused(tmp_path):
    """An InnerProduct on a 2-axis input cannot become a convolution: exit 2, the reason, no files."""
    text = ('name: "vec"\n' + input_layer(1, 64)
            + layer_text("fc1", "InnerProduct", "data", "fc1", "inner_product_param { num_output: 5 }"))
    proto, weights = write_model(tmp_path, "vec", text)
    before = files_in(tmp_path)
    run = convert_cli(proto, weights, tmp_path / "out")
    assert run.code == 2
    assert "'fc1' reads 'data' of shape (1, 64)" in run.err and "cannot become a convolution" in run.err
    assert files_in(tmp_path) == before


# ------------------------------------------------------------------ weights that do not fit

@pytest.fixture
def small(tmp_path) -> tuple[Path, Path]:
    """The small classifier and its seeded weights."""
    return write_model(tmp_path, "small", small_net("plain"), seed=3)


def refused(proto: Path, weights: Path, tmp_path: Path):
    """Run convert into an empty folder expecting exit 2, inputs untouched, nothing written."""
    before = {p: sha1(p) for p in (proto, weights) if p.exists()}
    out = tmp_path / "out"
    out.mkdir()
    run = convert_cli(proto, weights, out / "net")
    assert run.code == 2, run.out + run.err
    assert run.err.startswith("fcnify: error: ") and run.err.count("\n") == 1  # one line
    assert {p: sha1(p) for p in before} == before
    assert files_in(out) == set()
    return run


def test_missing_weights_file(small, tmp_path):
    """--weights naming no file: exit 2, the path is named."""
    run = refused(small[0], tmp_path / "absent.caffemodel", tmp_path)
    assert "absent.caffemodel" in run.err and "not found" in run.err


def test_model_def_without_weights(small, tmp_path):
    """--model-def without --weights: exit 2, asking for --weights."""
    run = call_fcnify("convert", "--model-def", small[0], "--out", tmp_path / "out")
    assert run.code == 2 and "--model-def needs --weights" in run.err


def test_weights_with_a_different_fc6_shape(small, tmp_path):
    """Weights of the same net at 36 px (fc6 32 x 1024) for the 32 px net (32 x 784): both shapes named."""
    _, other = write_model(tmp_path, "small36", small_net("plain", size=36), seed=3)
    run = refused(small[0], other, tmp_path)
    assert "layer 'fc6' weights: the net definition needs (32, 784)" in run.err
    assert "has (32, 1024)" in run.err


def test_weights_without_a_bias_blob(small, tmp_path):
    """Weights of the bias-free variant: fc6 expects weights and bias, the file has 1 blob."""
    _, other = write_model(tmp_path, "nobias", small_net("no_bias"), seed=3)
    run = refused(small[0], other, tmp_path)
    assert "layer 'fc6' expects 2 parameter blob(s) (weights and bias)" in run.err and "has 1" in run.err


def test_weights_fine_tuned_for_other_classes(small, tmp_path):
    """fc7 with 20 outputs in the weights and 10 in the net: named, with the fine-tuning hint."""
    _, other = write_model(tmp_path, "ft", small_net(PLAIN.replace("num_output: 10", "num_output: 20")))
    run = refused(small[0], other, tmp_path)
    assert "layer 'fc7' weights: the net definition needs (10, 32)" in run.err and "has (20, 32)" in run.err
    assert "fine-tuned for other classes?" in run.err


def test_weights_whose_layer_names_match_nothing(small, tmp_path):
    """Weights for fc6_new/fc7_new: the message lists fc6 and fc7 as getting no weights."""
    renamed = PLAIN.replace('"fc6"', '"fc6_new"').replace('"fc7"', '"fc7_new"')
    _, other = write_model(tmp_path, "renamed", small_net(renamed))
    run = refused(small[0], other, tmp_path)
    assert "2 layer(s) of small.prototxt get no weights" in run.err
    assert "'fc6' expects (32, 784), (32,)" in run.err and "'fc7' expects (10, 32), (10,)" in run.err
    assert "fc6_new, fc7_new" in run.err


# ------------------------------------------------------------------ outputs

def test_existing_outputs_are_kept_without_force_and_replaced_with_it(small, tmp_path):
    """A second convert is refused (exit 2, files untouched); --force rewrites them; inputs never change."""
    proto, weights = small
    inputs = {p: sha1(p) for p in small}
    assert_equivalent(convert_cli(proto, weights, tmp_path / "out"))
    first = {k: sha1(p) for k, p in outputs(tmp_path / "out").items()}
    again = convert_cli(proto, weights, tmp_path / "out")
    assert again.code == 2 and "already exists (use --force to overwrite)" in again.err
    assert {k: sha1(p) for k, p in outputs(tmp_path / "out").items()} == first
    # other weights for the same net, forced over the first outputs
    _, weights2 = write_model(tmp_path, "small_seed9", small_net("plain"), seed=9)
    assert_equivalent(convert_cli(proto, weights2, tmp_path / "out", "--force"))
    forced = {k: sha1(p) for k, p in outputs(tmp_path / "out").items()}
    assert forced["caffemodel"] != first["caffemodel"]
    assert forced["prototxt"] == first["prototxt"]
    assert {p: sha1(p) for p in small} == inputs
    assert not [p for p in tmp_path.iterdir() if ".fcnify-tmp-" in p.name]


@pytest.mark.parametrize("kind", ["slash", "existing"])
def test_out_naming_a_folder_writes_into_it(small, tmp_path, monkeypatch, kind):
    """--out DIR/ (made if missing) or an existing folder: DIR/small_full_conv.*, nothing beside it."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "maps"
    if kind == "existing":
        folder.mkdir()
    before = files_in(tmp_path) - {"maps"}
    run = call_fcnify("convert", "--model-def", small[0], "--weights", small[1], "--out",
                      f"{folder}/" if kind == "slash" else str(folder), "--no-verify")
    assert run.code == 0, run.err
    assert files_in(folder) == {"small_full_conv.prototxt", "small_full_conv.caffemodel",
                                "small_full_conv.json"}
    assert files_in(tmp_path) - {"maps"} == before


def test_out_help_says_a_folder_is_written_into():
    """convert --help says what a trailing / or an existing folder means."""
    run = call_fcnify("convert", "--help")
    assert "ending in / or an existing folder" in " ".join(run.out.split())


def test_not_equivalent_exits_1_and_keeps_the_files(small, tmp_path, monkeypatch):
    """Negative control: fc6 kernels reshaped in Fortran order are NOT EQUIVALENT; exit 1, files kept."""
    module = importlib.import_module("fcnify.convert")  # the package exports a function of that name
    real = module.transplant

    def fortran_fc6(surgery, weights, checked=None):
        blobs, provenance = real(surgery, weights, checked)
        blobs["fc6-conv"][0] = np.ascontiguousarray(weights["fc6"].blobs[0].reshape(32, 16, 7, 7, order="F"))
        return blobs, provenance

    monkeypatch.setattr(module, "transplant", fortran_fc6)
    proto, weights = small
    inputs = {p: sha1(p) for p in small}
    run = convert_cli(proto, weights, tmp_path / "out")
    assert run.code == 1
    assert "result: NOT EQUIVALENT" in run.out
    assert "does NOT reproduce" in run.err and "files kept for inspection" in run.err
    assert all(p.is_file() for p in outputs(tmp_path / "out").values())
    assert card(tmp_path / "out")["verification"]["equivalent"] is False
    (score_used, _), _ = comparisons(run.out)
    assert score_used > 10
    assert {p: sha1(p) for p in small} == inputs


# ------------------------------------------------------------------ fcnify info

def test_info_on_caffenet_at_451(caffe_root):
    """info reports the converted CaffeNet at 451 px: fc6-conv 8x8, stride 32, reach 355, window 227."""
    run = call_fcnify("info", zoo(caffe_root, "caffenet"), "--input-size", "451")
    assert run.code == 0, run.err
    assert re.search(r"^\s+fc6-conv\s+Convolution\s+fc6-conv\s+1x4096x8x8\s+stride 32, reach 355$",
                     run.out, re.M)
    assert re.search(r"stride:\s+32 px", run.out) and "227x227 px at offset (y 0, x 0)" in run.out
    assert "at 451x451: 8x8 cells" in run.out


def test_info_on_a_fully_convolutional_net(tmp_path):
    """info on a NIN-like net says it is fully convolutional; cccp1 is 64 - 5 + 1 = 60 px at 64."""
    path = tmp_path / "nin.prototxt"
    path.write_text(NIN_DENSE)
    run = call_fcnify("info", path, "--input-size", "64")
    assert run.code == 0, run.err
    assert "fully convolutional (no InnerProduct)" in run.out
    assert re.search(r"^\s+cccp1\s+Convolution\s+cccp1\s+1x10x60x60\s", run.out, re.M)
