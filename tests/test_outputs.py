"""Output files: one set of names per image, never shared, and messages that name the image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import call_fcnify
from fcnify.errors import InputError
from fcnify.io.models import find_model
from fcnify.io.outputs import unique_names

SCENE = find_model("digits").model_def.parent / "scene.png"


def _touch(root: Path, *names: str) -> list[Path]:
    paths = []
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        paths.append(p)
    return paths


def test_unique_names_keep_stems_when_they_differ(tmp_path):
    """Images with different stems are named after their stems, as before."""
    a, b = _touch(tmp_path, "a/one.png", "b/two.jpg")
    assert unique_names([a, b]) == {a: "one", b: "two"}


def test_unique_names_add_extension_then_folder(tmp_path):
    """a/x.png, a/x.jpg, b/x.png: the extension, then the folder, tell them apart."""
    ax_png, ax_jpg, bx_png = _touch(tmp_path, "a/x.png", "a/x.jpg", "b/x.png")
    names = unique_names([ax_png, ax_jpg, bx_png])
    assert names == {ax_png: "a__x.png", ax_jpg: "x.jpg", bx_png: "b__x.png"}


def test_unique_names_case_insensitive(tmp_path):
    """X.png and x.png would overwrite each other on a case-insensitive disk: they get apart."""
    upper, lower = _touch(tmp_path, "a/X.png", "b/x.png")
    names = unique_names([upper, lower])
    assert names[upper].casefold() != names[lower].casefold()


def test_unique_names_refuse_what_cannot_be_told_apart(tmp_path):
    """Two images whose every name clashes (case-folded) are refused, both named."""
    one, two = _touch(tmp_path, "d/A/x.png", "d/a/x.png")
    with pytest.raises(InputError) as err:
        unique_names([one, two])
    assert str(one) in str(err.value) and str(two) in str(err.value)


def _crops(root: Path) -> dict[str, Path]:
    """Three different pictures under the clashing names of the issue."""
    scene = Image.open(SCENE).convert("RGB")
    files = {"a/x.png": (0, 0, 120, 100), "a/x.jpg": (200, 100, 320, 200), "b/x.png": (400, 300, 520, 400)}
    out = {}
    for name, box in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        scene.crop(box).save(p, quality=95)
        out[name] = p
    return out


def test_classify_map_clashing_names_keep_every_map(tmp_path):
    """classify-map a/ b/ --force with a/x.png, a/x.jpg, b/x.png writes three maps, none lost."""
    crops = _crops(tmp_path / "in")
    out = tmp_path / "o"
    run = call_fcnify("classify-map", crops["a/x.png"].parent, crops["b/x.png"].parent,
                      "--model", "digits", "--out", out, "--force", "--quiet")
    assert run.code == 0, run.err
    docs = [json.loads(p.read_text()) for p in sorted(out.glob("*.map.json"))]
    assert sorted(Path(d["image"]).resolve() for d in docs) == sorted(p.resolve() for p in crops.values())
    scores = [np.load(p) for p in sorted(out.glob("*.scores.npy"))]
    assert len(scores) == 3 and not np.array_equal(scores[0], scores[1])
    assert "outputs named" in run.err  # the renaming is said


def test_existing_output_message_names_the_image(tmp_path):
    """An output in the way: the skipped image is named, with the file that blocks it."""
    crops = _crops(tmp_path / "in")
    out = tmp_path / "o"
    out.mkdir()
    (out / "a__x.png.map.json").write_text("keep me")
    run = call_fcnify("classify-map", crops["a/x.png"], crops["b/x.png"], crops["a/x.jpg"],
                      "--model", "digits", "--out", out, "--quiet")
    assert run.code == 1
    skipped = [line for line in run.err.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and str(crops["a/x.png"]) in skipped[0]
    assert "a__x.png.map.json" in skipped[0] and "already exists" in skipped[0]
    assert (out / "a__x.png.map.json").read_text() == "keep me"
