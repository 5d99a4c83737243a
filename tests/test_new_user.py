"""What a new user meets (issue 16): sizes, batch, names, folders, JSON, suggestions, tiles, heatmaps.

Each test goes through the command line or the Python API the way the
issue's afternoon did, with the shipped digits model, Caffe's CaffeNet
prototxt or the real MTCNN and LeNet models.
"""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcnify
from bounds import assert_map_matches_pycaffe
from conftest import call_fcnify, run_fcnify
from fcnify.errors import InputError, OutputExists
from fcnify.io.labels import imagenet_labels, resolve_class
from fcnify.convert import card_for_model_def
from fcnify.io.models import find_model
from nets import zoo
from realdata import LENET_DEF, LENET_WEIGHTS, mtcnn_net

SCENE = find_model("digits").model_def.parent / "scene.png"


def _crop(tmp_path: Path, name: str = "crop.png", box=(0, 0, 160, 120)) -> Path:
    path = tmp_path / name
    Image.open(SCENE).convert("RGB").crop(box).save(path)
    return path


# ------------------------------------------------------------------ 3. one batch in info

def test_info_table_and_memory_use_one_batch(caffe_root):
    """info on CaffeNet (batch 10 in its prototxt): table and memory line are both for one image."""
    run = call_fcnify("info", zoo(caffe_root, "caffenet"), "--input-size", "451")
    assert run.code == 0, run.err
    assert "for one image (batch 1)" in run.out and "not the prototxt's batch of 10" in run.out
    name, values = re.search(r"largest blob (\S+): ([\d,]+) values", run.out).groups()
    row = next(line for line in run.out.splitlines() if re.match(rf"\s+{re.escape(name)}\s", line))
    shape = [int(d) for d in row.split()[3].split("x")]
    assert shape[0] == 1 and np.prod(shape) == int(values.replace(",", ""))


# ------------------------------------------------------------------ 5. height x width everywhere

def test_size_order_is_height_by_width(tmp_path):
    """--size 60x100 is fed at 60x100 and printed so; info --input-size 300x500 says 300x500."""
    run = call_fcnify("classify-map", _crop(tmp_path), "--model", "digits", "--size", "60x100")
    assert run.code == 0, run.err
    first = run.out.splitlines()[0]
    assert first.endswith("120x160 px (sizes are height x width), fed at 60x100"), first
    assert "map 9x19 cells" in run.out  # (60 - 28) / 4 + 1 rows, (100 - 28) / 4 + 1 columns
    info = call_fcnify("info", find_model("digits").model_def, "--input-size", "300x500")
    assert info.code == 0, info.err
    assert "at input 300x500 (height x width)" in info.out and "at 300x500: 69x119 cells" in info.out


# ------------------------------------------------------------------ 6. folders are made, API words

def test_convert_and_save_make_their_folder(tmp_path):
    """convert --out newdir/name and DenseMap.save('maps/x/') create the folder, as classify-map does."""
    run = call_fcnify("convert", "--model", "digits", "--out", tmp_path / "new" / "deeper" / "digits",
                      "--no-verify")
    assert run.code == 0, run.err
    assert (tmp_path / "new" / "deeper" / "digits_full_conv.prototxt").is_file()
    dm = fcnify.classify_map(_crop(tmp_path), model="digits")
    written = dm.save(tmp_path / "maps" / "x")
    assert len(written) == 6 and all(p.is_file() for p in written)


def test_api_error_names_the_api_argument(tmp_path):
    """An existing output refused by the API says force=True; the CLI says --force."""
    dm = fcnify.classify_map(_crop(tmp_path), model="digits")
    dm.save(tmp_path / "maps")
    with pytest.raises(OutputExists) as err:
        dm.save(tmp_path / "maps")
    assert "force=True" in str(err.value) and "--force" not in str(err.value)
    run = call_fcnify("classify-map", _crop(tmp_path), "--model", "digits", "--out", tmp_path / "maps")
    assert run.code == 2 and "--force" in run.err and "force=True" not in run.err


# ------------------------------------------------------------------ 7. a card path as a model

def test_card_path_accepted_as_model(tmp_path):
    """classify_map(img, model='x_full_conv.json') and --model x_full_conv.json read the card."""
    result = fcnify.convert(*_digits_files(), tmp_path / "digits", card=find_model("digits"), check=False)
    card = result.outputs["card"]
    dm = fcnify.classify_map(_crop(tmp_path), model=str(card), engine="caffe")
    assert dm.shape == (24, 34)
    run = call_fcnify("classify-map", _crop(tmp_path), "--model", card, "--engine", "caffe",
                      "--out", tmp_path / "maps", "--quiet")
    assert run.code == 0, run.err
    probs = np.load(tmp_path / "maps" / "crop.scores.npy")
    assert np.array_equal(probs, dm.probs)  # the same card, engine and shapes: the same map
    digits = find_model("digits")  # the map is digits' own: the original net on the crops
    assert_map_matches_pycaffe(probs, digits.model_def, digits.weights, digits.preprocess,
                               np.asarray(Image.open(_crop(tmp_path)).convert("RGB")), stride=4, window=28,
                               score_blob="ip2", prob_blob="prob")


def _digits_files() -> tuple[Path, Path]:
    card = find_model("digits")
    return card.model_def, card.weights


# ------------------------------------------------------------------ 8. models named by their name:

def test_model_named_by_prototxt_name(tmp_path):
    """A deploy.prototxt is called by its `name:` (LeNet, RNet), not 'deploy'."""
    assert card_for_model_def(LENET_DEF, LENET_WEIGHTS).name == "LeNet"
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (10, 10)).save(tiny)
    run = call_fcnify("classify-map", tiny, "--model-def", LENET_DEF, "--weights", LENET_WEIGHTS)
    assert run.code == 2 and "LeNet needs at least 28x28 px" in run.err, run.err
    assert "deploy needs" not in run.err


# ------------------------------------------------------------------ 9. one JSON schema, failures too

def test_json_lines_include_failures_in_one_schema(tmp_path):
    """--format json: a good and a corrupt image give two lines with the same keys; the bad one says why."""
    good = _crop(tmp_path, "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(SCENE.read_bytes()[:2000])
    run = call_fcnify("classify-map", good, bad, "--model", "digits", "--format", "json",
                      "--out", tmp_path / "o")
    assert run.code == 1
    docs = [json.loads(line) for line in run.out.splitlines()]
    assert [d["ok"] for d in docs] == [True, False]
    assert {"image", "ok", "error", "exit_code", "outputs"} <= set(docs[0]) & set(docs[1])
    assert docs[1]["image"] == str(bad) and "decode" in docs[1]["error"] and docs[1]["exit_code"] == 2
    assert len(docs[0]["outputs"]) == 6 and docs[0]["map"]["window_px"] == [28, 28]


# ------------------------------------------------------------------ 10. words inside labels

def test_class_suggestions_match_words_inside_labels():
    """--class cat suggests the cat classes (tabby, tiger cat, Persian cat), not 'crate' or 'coast'."""
    with pytest.raises(InputError) as err:
        resolve_class(imagenet_labels(), "cat")
    message = str(err.value)
    for wanted in ("tiger cat", "Persian cat", "Siamese cat"):
        assert wanted in message, message
    assert "crate" not in message and "coast" not in message


def test_typo_still_gets_spelling_neighbours():
    """A misspelt name with no word match still gets its closest spellings."""
    with pytest.raises(InputError, match="did you mean 'tabby'"):
        resolve_class(imagenet_labels(), "tabyy")


# ------------------------------------------------------------------ 11. keep the aspect ratio

def test_long_side_keeps_aspect_ratio(tmp_path):
    """--long-side 80 on a 160x120 (width x height) crop feeds 60x80 (height x width)."""
    run = call_fcnify("classify-map", _crop(tmp_path), "--model", "digits", "--long-side", "80")
    assert run.code == 0, run.err
    assert "fed at 60x80" in run.out.splitlines()[0]
    run = call_fcnify("classify-map", _crop(tmp_path), "--model", "digits", "--short-side", "90")
    assert run.code == 0, run.err
    assert "fed at 90x120" in run.out.splitlines()[0]


# ------------------------------------------------------------------ 12. tiles that cost more than they save

def test_tiny_forced_tiles_warn_with_cost(tmp_path):
    """--tile at the smallest size on a 480x640 scene warns, with the estimated cost; large tiles do not."""
    run = call_fcnify("classify-map", SCENE, "--model", "digits", "--tile", "40", "--quiet")
    assert run.code == 0, run.err
    warning = [line for line in run.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "--tile 40" in warning[0] and "x its pixels" in warning[0]
    cost = float(re.search(r"compute ([\d.]+)x its pixels", warning[0]).group(1))
    assert cost > 2
    quiet = call_fcnify("classify-map", SCENE, "--model", "digits", "--tile", "400", "--quiet")
    assert quiet.code == 0 and "warning" not in quiet.err


# ------------------------------------------------------------------ 13. offline is failed work

def test_fetch_offline_exits_1(tmp_path):
    """fetch with the download host unreachable is failed work: exit 1, one line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "caffe"
    readme = root / "models" / "bvlc_reference_caffenet" / "readme.md"
    readme.parent.mkdir(parents=True)
    readme.write_text(f"---\nname: t\ncaffemodel: bvlc_reference_caffenet.caffemodel\n"
                      f"caffemodel_url: http://127.0.0.1:{port}/c.caffemodel\nsha1: {'0' * 40}\n---\n")
    run = run_fcnify("fetch", "caffenet", env={"FCNIFY_CAFFE_SOURCE": str(root),
                                               "FCNIFY_MODELS": str(tmp_path / "models")})
    assert run.code == 1, run.err
    assert len(run.err.strip().splitlines()) == 1 and "cannot reach 127.0.0.1" in run.err


# ------------------------------------------------------------------ 14. the heatmap's colour scale

def test_heatmap_on_unit_scale_by_default_and_stretched_on_request(tmp_path):
    """A faint class is drawn on 0-1 by default (dark); --heatmap-scale map stretches the colours
    over its own range (brighter). Issue 24 item 8: a stretched faint class read as a strong one."""
    from fcnify.io.outputs import heat_range
    dm = fcnify.classify_map(_crop(tmp_path), model="digits")
    faint = int(np.argmin(dm.probs.max(axis=(1, 2))))
    peak = float(dm.probs[faint].max())
    assert peak < 0.5
    assert heat_range(dm.probs[faint]) == (0.0, 1.0)
    assert heat_range(dm.probs[faint], "map") == (float(dm.probs[faint].min()), peak)
    unit = call_fcnify("classify-map", _crop(tmp_path), "--model", "digits", "--class", str(faint),
                       "--out", tmp_path / "u", "--quiet")
    mapped = call_fcnify("classify-map", _crop(tmp_path), "--model", "digits", "--class", str(faint),
                         "--out", tmp_path / "m", "--quiet", "--heatmap-scale", "map")
    assert mapped.code == 0 and unit.code == 0, mapped.err + unit.err
    bright = [np.asarray(Image.open(tmp_path / d / "crop.heatmap.png").convert("L"), float).mean()
              for d in ("m", "u")]
    assert bright[0] > bright[1]


# ------------------------------------------------------------------ 17. output names kept on request

def test_convert_keeps_reference_naming_by_default_and_output_names_on_request(tmp_path):
    """MTCNN's R-Net: conv5-2 becomes conv5-2-conv by default; --keep-output-names keeps conv5-2 and prob1."""
    from fcnify.caffe.netdef import read_netdef
    from fcnify.caffe.geometry import output_blobs
    proto, weights = mtcnn_net(2)
    plain = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "ref")
    assert plain.code == 0, plain.err
    ref = read_netdef(tmp_path / "ref_full_conv.prototxt").param
    assert sorted(output_blobs(ref)) == ["conv5-2-conv", "prob1"]
    kept = call_fcnify("convert", "--model-def", proto, "--weights", weights, "--out", tmp_path / "kept",
                       "--keep-output-names")
    assert kept.code == 0, kept.err
    assert "result: EQUIVALENT" in kept.out
    net = read_netdef(tmp_path / "kept_full_conv.prototxt").param
    assert sorted(output_blobs(net)) == sorted(output_blobs(read_netdef(proto).param)) == ["conv5-2", "prob1"]
    assert any(l.name == "conv5-1-conv" for l in net.layer)  # inner layers keep the reference naming
    card = json.loads((tmp_path / "kept_full_conv.json").read_text())
    assert card["output_blob"] == "prob1"
