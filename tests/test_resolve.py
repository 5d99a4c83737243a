"""resolve.resolve_card: explicit arguments over the model's card, the card over defaults; one net source."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcnify
from bounds import assert_map_matches_pycaffe
from conftest import call_fcnify
from fcnify.errors import ArgumentError, InputError
from fcnify.io.fetch import MODELS
from fcnify.io.models import find_model
from fcnify.paths import models_dir
from fcnify.io.preprocess import Preprocess, PreprocessOverrides
from fcnify.resolve import resolve_card

DIGITS = find_model("digits")
SCENE = DIGITS.model_def.parent / "scene.png"
NAMES = [f"digit {i}" for i in range(10)] + ["paper"]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """The digits net as a bare prototxt (no card beside it), a card for it, other weights and labels."""
    plain = tmp_path / "bare" / "lenet.prototxt"
    plain.parent.mkdir()
    shutil.copy(DIGITS.model_def, plain)
    shutil.copy(DIGITS.weights, tmp_path / "card.caffemodel")
    shutil.copy(DIGITS.weights, tmp_path / "other.caffemodel")
    (tmp_path / "card_labels.txt").write_text("\n".join(f"card {i}" for i in range(11)) + "\n")
    (tmp_path / "other_labels.txt").write_text("\n".join(NAMES) + "\n")
    card = tmp_path / "mine.json"
    card.write_text(json.dumps({
        "name": "mine", "model_def": "bare/lenet.prototxt", "weights": "card.caffemodel",
        "preprocess": {"channels": "gray", "raw_scale": 2.0, "mean": [3.0], "input_scale": 4.0},
        "labels": "card_labels.txt", "background_class": 10, "box_head": "card_head"}))
    return {"plain": plain, "card": card, "weights": tmp_path / "other.caffemodel",
            "labels": tmp_path / "other_labels.txt", "card_weights": tmp_path / "card.caffemodel",
            "card_labels": tmp_path / "card_labels.txt"}


# field -> (explicit argument, its value, how the card reads it back)
FIELDS = {
    "weights": lambda f: ({"weights": f["weights"]}, f["weights"], f["card_weights"], None),
    "labels": lambda f: ({"labels": f["labels"]}, str(f["labels"]), str(f["card_labels"]), None),
    "channels": lambda f: ({"channels": "rgb", "mean": "5,6,7"}, "RGB", "gray", "gray"),
    "raw_scale": lambda f: ({"raw_scale": 7.0}, 7.0, 2.0, 255.0),
    "mean": lambda f: ({"mean": "9"}, (9.0,), (3.0,), None),
    "input_scale": lambda f: ({"input_scale": 0.5}, 0.5, 4.0, 1.0),
    "transpose": lambda f: ({"transpose": True}, True, False, False),
    "background_class": lambda f: ({"background_class": 2}, 2, 10, None),
    "box_head": lambda f: ({"box_head": "mine"}, "mine", "card_head", None),
}


def arguments(explicit: dict) -> dict:
    """`explicit` as resolve_card's keywords: the preprocessing terms gathered into overrides=."""
    terms = {k: explicit[k] for k in explicit if k in PreprocessOverrides.__dataclass_fields__}
    rest = {k: v for k, v in explicit.items() if k not in terms}
    return {**rest, "overrides": PreprocessOverrides(**terms)} if terms else rest


def field(card, name: str):
    if name in ("weights", "labels"):
        value = getattr(card, name)
        return None if value is None else (Path(value) if name == "weights" else str(value))
    if name in ("background_class", "box_head"):
        return getattr(card, name)
    return getattr(card.preprocess, name)


@pytest.mark.parametrize("name", FIELDS)
def test_explicit_over_card_over_default_field_by_field(files, name):
    """Each field: the explicit argument when given, else the card's, else Caffe's zoo default."""
    explicit, wanted, on_card, default = FIELDS[name](files)
    if name != "weights":  # a prototxt's weights are always given: their default is CaffeNet's (below)
        assert field(resolve_card(model_def=files["plain"], weights=files["weights"]), name) == default
    assert field(resolve_card(card=files["card"]), name) == on_card
    got = resolve_card(card=files["card"], **arguments(explicit))
    assert field(got, name) == wanted
    others = [n for n in FIELDS if n not in explicit and n != name]
    card = resolve_card(card=files["card"])
    assert [field(got, n) for n in others] == [field(card, n) for n in others]  # the rest: the card's


def test_no_model_means_caffenet_where_fetch_puts_it():
    """Nothing named: CaffeNet, its weights where `fcnify fetch caffenet` puts them."""
    card = resolve_card()
    folder = MODELS["caffenet"]
    assert card.name == "caffenet" and card.weights == models_dir() / folder / f"{folder}.caffemodel"


def test_a_preprocess_object_sits_between_its_terms_and_the_card(files):
    """preprocess= replaces the card's description; single terms given beside it win over it."""
    pre = Preprocess(channels="gray", raw_scale=10.0, mean=(11.0,), input_scale=12.0)
    got = resolve_card(card=files["card"], preprocess=pre,
                       overrides=PreprocessOverrides(input_scale=0.25)).preprocess
    assert (got.raw_scale, got.mean, got.input_scale) == (10.0, (11.0,), 0.25)


def test_the_card_beside_a_prototxt_is_its_card(files):
    """A prototxt with a card beside it takes that card's settings, with the weights given."""
    beside = files["plain"].with_suffix(".json")
    beside.write_text(json.dumps({"model_def": "lenet.prototxt", "preprocess": {"channels": "gray",
                                                                                 "input_scale": 8.0}}))
    card = resolve_card(model_def=files["plain"], weights=files["weights"])
    assert card.preprocess.input_scale == 8.0 and card.weights == files["weights"]


@pytest.mark.parametrize("given, names", [
    ({"card": "card", "model_def": "plain"}, ("card", "model_def")),
    ({"model": "digits", "card": "card"}, ("model", "card")),
    ({"model": "card", "model_def": "plain"}, ("model", "model_def")),
    ({"model": "digits", "model_def": "plain"}, ("model", "model_def")),
])
def test_naming_the_net_twice_is_refused(files, given, names):
    """Two sources for the net are refused naming both, not settled silently (exit 2)."""
    args = {k: (files[v] if v in files else v) for k, v in given.items()}
    with pytest.raises(ArgumentError) as info:
        resolve_card(weights=files["weights"], **args)
    assert info.value.exit_code == 2
    assert str(info.value).startswith(f"{names[0]}= and {names[1]}= both name the net")


def test_a_prototxt_needs_weights(files):
    """model_def without weights: one line naming both arguments."""
    with pytest.raises(ArgumentError, match=r"^model_def= needs weights=$"):
        resolve_card(model_def=files["plain"])


def test_a_bad_labels_file_is_refused_when_resolving(files, tmp_path):
    """labels= naming a missing file fails before any net is loaded."""
    with pytest.raises(InputError, match="labels file does not exist"):
        resolve_card(card=files["card"], labels=tmp_path / "missing.txt")


def test_classify_map_api_refuses_two_nets_before_loading(files):
    """fcnify.classify_map resolves as the CLI does: a card and a prototxt together are refused."""
    with pytest.raises(ArgumentError, match="card= and model_def= both name the net"):
        fcnify.classify_map(SCENE, card=files["card"], model_def=files["plain"], weights=files["weights"])


def test_cli_refuses_card_with_model_def(files, tmp_path):
    """--card with --model-def was silently ignored: now one line, exit 2, nothing written."""
    out = tmp_path / "maps"
    run = call_fcnify("classify-map", SCENE, "--card", files["card"], "--model-def", files["plain"],
                      "--weights", files["weights"], "--out", out)
    assert run.code == 2
    assert run.err.strip().splitlines() == [
        "fcnify: error: --card and --model-def both name the net: give one (weights, labels and "
        "preprocessing given beside it override its card's)"]
    assert not out.exists() or not any(out.iterdir())


def test_cli_convert_refuses_model_with_model_def(files, tmp_path):
    """convert --model NAME --model-def FILE: one line naming both options, exit 2."""
    run = call_fcnify("convert", "--model", "digits", "--model-def", files["plain"], "--weights",
                      files["weights"], "--out", tmp_path / "x", "--no-verify")
    assert run.code == 2 and len(run.err.strip().splitlines()) == 1
    assert "--model and --model-def both name the net" in run.err
    assert not list(tmp_path.glob("x_full_conv.*"))


@pytest.fixture(scope="module")
def digits_card(tmp_path_factory) -> Path:
    """The digits net converted (unchecked: resolution, not conversion, is under test here)."""
    tmp = tmp_path_factory.mktemp("resolve_digits")
    return fcnify.convert(DIGITS.model_def, DIGITS.weights, tmp / "digits", card=DIGITS,
                          check=False).outputs["card"]


def test_cli_options_override_the_card_field_by_field(digits_card, files, tmp_path):
    """classify-map --card: --weights, --labels and --input-scale replace the card's; the rest stays.

    The map document reports the card the run used; the map itself changes with
    the input scale (the net sees other numbers) and not with identical weights.
    """
    card = fcnify.read_card(digits_card)
    weights = shutil.copy(card.weights, tmp_path / "copy.caffemodel")
    docs, maps = {}, {}
    for name, extra in (("card", []),
                        ("explicit", ["--weights", weights, "--labels", files["labels"],
                                      "--input-scale", "-0.25"])):
        run = call_fcnify("classify-map", SCENE, "--card", digits_card, "--format", "json",
                          "--out", tmp_path / name, "--quiet", *extra)
        assert run.code == 0, run.err
        docs[name] = json.loads(run.out.splitlines()[0])["model"]
        maps[name] = np.load(tmp_path / name / "scene.scores.npy")
    assert docs["card"]["weights"] == str(card.weights) and docs["card"]["labels"] == card.labels
    assert docs["card"]["preprocess"] == card.preprocess.to_dict()
    assert docs["explicit"]["weights"] == str(weights)
    assert docs["explicit"]["labels"] == str(files["labels"])
    assert docs["explicit"]["preprocess"] == {**card.preprocess.to_dict(), "input_scale": -0.25}
    # each map is the original digits net, run by pycaffe on the crops, with that run's preprocessing
    rgb = np.asarray(Image.open(SCENE).convert("RGB"))
    for name, pre in (("card", card.preprocess), ("explicit", replace(card.preprocess, input_scale=-0.25))):
        assert_map_matches_pycaffe(maps[name], DIGITS.model_def, DIGITS.weights, pre, rgb, stride=4,
                                   window=28, score_blob="ip2", prob_blob="prob")


def test_dense_model_takes_a_name_or_a_card_path(digits_card):
    """DenseModel("x_full_conv.json") is DenseModel(read_card(...)): the same card, the same map."""
    scene = np.asarray(Image.open(SCENE).convert("RGB"))[:96, :128]
    maps = []
    for given in (str(digits_card), fcnify.read_card(digits_card)):
        model = fcnify.DenseModel(given)
        try:
            assert model.card.card_path == Path(digits_card)
            maps.append(model.run_scores(scene)[0])
        finally:
            model.close()
    assert np.array_equal(maps[0], maps[1])


def test_a_converted_card_with_missing_weights_is_not_sent_to_fetch(digits_card, tmp_path):
    """A converted CaffeNet card whose weights are gone: 'not found', not `fcnify fetch caffenet`."""
    data = json.loads(Path(digits_card).read_text())
    card = tmp_path / "caffenet_full_conv.json"
    card.write_text(json.dumps({**data, "name": "caffenet", "weights": str(tmp_path / "gone.caffemodel"),
                                "model_def": str(Path(digits_card).with_suffix(".prototxt"))}))
    run = call_fcnify("classify-map", SCENE, "--card", card)
    assert run.code == 2
    assert run.err.strip().splitlines() == [f"fcnify: error: {tmp_path / 'gone.caffemodel'}: "
                                            "weights (caffemodel) not found"]


def test_cli_convert_writes_options_over_the_shipped_card(tmp_path):
    """convert --model digits --raw-scale --input-scale: the written card has those, the rest digits' own."""
    run = call_fcnify("convert", "--model", "digits", "--raw-scale", "2", "--input-scale", "-0.5",
                      "--out", tmp_path / "d", "--no-verify")
    assert run.code == 0, run.err
    written = fcnify.read_card(tmp_path / "d_full_conv.json")
    assert (DIGITS.preprocess.raw_scale, DIGITS.preprocess.input_scale) != (2.0, -0.5)
    assert written.preprocess == Preprocess(channels="gray", raw_scale=2.0, mean=DIGITS.preprocess.mean,
                                            input_scale=-0.5)
    assert (written.labels, written.background_class) == (DIGITS.labels, DIGITS.background_class)


def test_no_transpose_overrides_a_card_that_transposes(digits_card, tmp_path):
    """--no-transpose on a card that says transpose: the map is the untransposed card's, bit for bit;
    without it, the map is the untransposed net's on the transposed image, transposed back."""
    data = json.loads(Path(digits_card).read_text())
    data["preprocess"]["transpose"] = True
    data["model_def"], data["weights"] = str(fcnify.read_card(digits_card).model_def), \
        str(fcnify.read_card(digits_card).weights)
    transposing = tmp_path / "transposing.json"
    transposing.write_text(json.dumps(data))
    image = tmp_path / "crop.png"
    rgb = np.asarray(Image.open(SCENE).convert("RGB"))[:96, :128]
    Image.fromarray(rgb).save(image)
    maps, docs = {}, {}
    for name, card, extra in (("plain", digits_card, []), ("flag", transposing, ["--no-transpose"]),
                              ("card", transposing, [])):
        run = call_fcnify("classify-map", image, "--card", card, "--engine", "caffe", "--out", tmp_path / name,
                          "--quiet", *extra)
        assert run.code == 0, run.err
        maps[name] = np.load(tmp_path / name / "crop.scores.npy")
        docs[name] = json.loads((tmp_path / name / "crop.map.json").read_text())["model"]["preprocess"]
    assert (docs["flag"]["transpose"], docs["card"]["transpose"]) == (False, True)
    assert np.array_equal(maps["flag"], maps["plain"])
    model = fcnify.DenseModel(fcnify.read_card(digits_card), engine="caffe")
    try:
        on_transposed = model.classify(np.ascontiguousarray(rgb.transpose(1, 0, 2))).probs
    finally:
        model.close()
    assert np.array_equal(maps["card"], on_transposed.transpose(0, 2, 1))
