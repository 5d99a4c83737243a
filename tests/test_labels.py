"""Tests for fcnify.io.labels: the shipped ImageNet labels, reading files, name lookup."""
from __future__ import annotations

from pathlib import Path

import pytest

from fcnify.errors import InputError
from fcnify.io.labels import (Labels, check_labels, imagenet_labels, parse_labels, read_labels,
                           resolve_class)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_imagenet_has_1000_classes_in_sorted_wnid_order():
    """Caffe numbers ILSVRC-2012 classes by sorted WordNet id, so ours must too."""
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels.ids is not None and list(labels.ids) == sorted(set(labels.ids))


def test_imagenet_cats_sit_where_caffe_puts_them():
    """Classes 281, 282 and 285 are tabby, tiger cat and Egyptian cat, as in synset_words.txt."""
    labels = imagenet_labels()
    assert (labels.ids[281], labels.names[281]) == ("n02123045", "tabby, tabby cat")
    assert labels.short(281) == "tabby"
    assert labels.short(282) == "tiger cat"
    assert labels.short(285) == "Egyptian cat"


def test_resolve_class_by_name_and_by_index_string():
    """A short name, another of the names, an index string, an int and a wnid all resolve."""
    labels = imagenet_labels()
    assert resolve_class(labels, "tiger cat") == 282
    assert resolve_class(labels, "285") == 285
    assert resolve_class(labels, 285) == 285
    assert resolve_class(labels, "Tabby Cat") == 281
    assert resolve_class(labels, "n02123045") == 281


def test_unique_short_name_beats_other_names():
    """'partridge' is class 86's short name and one of class 82's names: 86 wins."""
    labels = imagenet_labels()
    assert "partridge" in labels.aliases(82)
    assert resolve_class(labels, "partridge") == 86


def test_unknown_name_suggests_close_match():
    """A typo is an InputError whose message offers the intended class."""
    with pytest.raises(InputError, match=r"'tiger cat' \(282\)"):
        resolve_class(imagenet_labels(), "tigr cat")


def test_ambiguous_name_lists_both_classes():
    """ImageNet has two 'crane' classes (bird and machine); the error names both indices."""
    with pytest.raises(InputError, match="ambiguous") as caught:
        resolve_class(imagenet_labels(), "crane")
    assert "134" in str(caught.value) and "517" in str(caught.value)


@pytest.mark.parametrize("index", ["1000", "-1", 1000])
def test_index_out_of_range(index):
    """Indices outside 0..N-1 are errors, not Python's negative indexing."""
    with pytest.raises(InputError, match="out of range"):
        resolve_class(imagenet_labels(), index)


def test_check_labels_count_mismatch(tmp_path):
    """A labels file with the wrong number of lines is refused, naming the file and both counts."""
    path = write(tmp_path, "three.txt", b"a\nb\nc\n")
    message = "labels file has 3 lines, the net has 21 classes"
    with pytest.raises(InputError, match=message) as caught:
        check_labels(read_labels(path), 21, path)
    assert "three.txt" in str(caught.value)
    check_labels(read_labels(path), 3, path)


def test_plain_lines_have_no_ids(tmp_path):
    """Without wnids each non-empty line is a whole label and ids is None."""
    labels = read_labels(write(tmp_path, "voc.txt", b"background\n\naeroplane\r\nbicycle, bike\n"))
    assert labels == Labels(names=("background", "aeroplane", "bicycle, bike"), ids=None)
    assert labels.short(2) == "bicycle"


def test_mixed_lines_are_kept_whole():
    """If only some lines start with a wnid, none are split, so nothing is half-parsed."""
    labels = parse_labels(["n01440764 tench", "goldfish"])
    assert labels.ids is None and labels.names == ("n01440764 tench", "goldfish")


def test_quoted_synset_lines_parse_without_quotes():
    """Lines pasted from Python ('n02123045 tabby, tabby cat',) give ids and names without quotes."""
    labels = parse_labels(["'n02123045 tabby, tabby cat',", '"n02123159 tiger cat"', "'no face'"][:2])
    assert labels.ids == ("n02123045", "n02123159")
    assert labels.names == ("tabby, tabby cat", "tiger cat")
    assert resolve_class(labels, "n02123045") == 0 and resolve_class(labels, "tabby") == 0
    assert parse_labels(["'no face'", "face"]).names == ("no face", "face")
    assert parse_labels(["don't", "it's"]).names == ("don't", "it's")  # a quote inside stays


def test_utf8_bom_is_ignored(tmp_path):
    """Files saved by Windows editors start with a BOM that must not join the first name."""
    labels = read_labels(write(tmp_path, "bom.txt", "\ufeffn01440764 tench\n".encode("utf-8")))
    assert labels.ids == ("n01440764",) and labels.names == ("tench",)


def test_missing_labels_file(tmp_path):
    """A missing file is an InputError naming it."""
    with pytest.raises(InputError, match="nope.txt: labels file does not exist"):
        read_labels(tmp_path / "nope.txt")


def test_empty_labels_file(tmp_path):
    """A file of blank lines has no labels and is refused."""
    with pytest.raises(InputError, match="blank.txt: .*empty"):
        read_labels(write(tmp_path, "blank.txt", b"\n  \n"))


def test_undecodable_labels_file(tmp_path):
    """Bytes that are not UTF-8 are an InputError naming the file and the offset."""
    with pytest.raises(InputError, match=r"latin1.txt: .*not UTF-8 .*offset 3"):
        read_labels(write(tmp_path, "latin1.txt", b"caf\xe9\n"))


def test_directory_as_labels_file(tmp_path):
    """A directory given as the labels file is an InputError, not IsADirectoryError."""
    with pytest.raises(InputError, match="is a directory"):
        read_labels(tmp_path)
