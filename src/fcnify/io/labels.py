"""Class names: turning a net's output index into words, and words back into an index.

A labels file has one class per non-empty line, in the net's output order. A
line may start with a WordNet id (`n02123045 tabby, tabby cat`, the format of
Caffe's synset_words.txt); the rest of the line is the class's names, the
first of which is its short name. fcnify ships ImageNet's 1000 labels, built
from timm's wheel by scripts/data/build_labels.py.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import InputError
from ..paths import data_file

WNID = re.compile(r"(n\d{8})(?:\s+(.*))?")
IMAGENET_FILE = "imagenet_labels.txt"


@dataclass(frozen=True)
class Labels:
    """Names (and WordNet ids, when the file has them) in the net's class order."""

    names: tuple[str, ...]
    ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.ids is not None and len(self.ids) != len(self.names):
            raise ValueError(f"{len(self.ids)} ids for {len(self.names)} names")

    def __len__(self) -> int:
        return len(self.names)

    def short(self, index: int) -> str:
        """The first of a class's names: what fits in a legend or a table cell."""
        return self.names[index].split(",")[0].strip()

    def aliases(self, index: int) -> tuple[str, ...]:
        """Every comma-separated name of a class, so users may type any of them."""
        return tuple(part.strip() for part in self.names[index].split(",") if part.strip())


def parse_labels(lines: list[str]) -> Labels:
    """Labels from lines of text; ids only when every line starts with one.

    A file where only some lines carry a WordNet id is not a synset file, so
    its lines are kept whole rather than guessed at.
    """
    rows = [unquoted(line.strip()) for line in lines if line.strip()]
    matches = [WNID.fullmatch(row) for row in rows]
    if rows and all(matches):
        return Labels(names=tuple(m.group(2) or m.group(1) for m in matches),
                      ids=tuple(m.group(1) for m in matches))
    return Labels(names=tuple(rows))


def unquoted(row: str) -> str:
    """A line without the quotes (and a list's trailing comma) of a label copied from Python.

    Synset lists are often pasted from code (`'n02123045 tabby, tabby cat',`);
    kept quoted, the names carry the quotes and the WordNet ids are not found.
    """
    text = row[:-1].rstrip() if row.endswith(",") and row[:1] in "'\"" else row
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1].strip()
    return row


def read_labels(path: str | Path) -> Labels:
    """Read a labels file, turning every way it can be unusable into InputError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError("labels file does not exist", path) from None
    except IsADirectoryError:
        raise InputError("labels file is a directory", path) from None
    except OSError as exc:
        raise InputError(f"cannot read labels file: {exc.strerror or exc}", path) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"labels file is not UTF-8 text (bad byte at offset {exc.start})",
                         path) from None
    labels = parse_labels(text.splitlines())
    if not labels.names:
        raise InputError("labels file has no labels (it is empty)", path)
    return labels


@lru_cache(maxsize=None)
def imagenet_labels() -> Labels:
    """The 1000 ILSVRC-2012 classes in Caffe's order (sorted WordNet ids)."""
    return read_labels(data_file(IMAGENET_FILE))


def check_labels(labels: Labels, num_classes: int, path: str | Path | None = None) -> None:
    """Refuse labels that would silently misname classes because the counts differ."""
    if len(labels) != num_classes:
        raise InputError(f"labels file has {len(labels)} lines, the net has {num_classes} classes",
                         path)


def resolve_class(labels: Labels, name_or_id: int | str) -> int:
    """The class index a user meant, given an index, a WordNet id or one of its names.

    A unique short-name match wins over matches among the other names
    ("partridge" is class 86's short name and also one of class 82's names);
    anything still ambiguous, or unknown, is an error that lists candidates.
    """
    if isinstance(name_or_id, bool):
        raise InputError(f"class must be an index or a name, not {name_or_id!r}")
    if isinstance(name_or_id, int):
        return _checked_index(labels, name_or_id)
    query = name_or_id.strip()
    if re.fullmatch(r"[+-]?\d+", query):
        return _checked_index(labels, int(query))
    wanted = query.casefold()
    if labels.ids is not None and wanted in (i.casefold() for i in labels.ids):
        return [i.casefold() for i in labels.ids].index(wanted)
    by_short = [i for i in range(len(labels)) if labels.short(i).casefold() == wanted]
    by_any = [i for i in range(len(labels))
              if wanted in (a.casefold() for a in labels.aliases(i))]
    found = by_short if by_short else by_any
    if len(found) == 1:
        return found[0]
    if found:
        listed = ", ".join(f"{i} ({labels.names[i]})" for i in found)
        raise InputError(f"class name {query!r} is ambiguous: it names classes {listed}; "
                         "give the index instead")
    raise InputError(f"no class is named {query!r}{_suggestions(labels, wanted)}")


def _checked_index(labels: Labels, index: int) -> int:
    if not 0 <= index < len(labels):
        raise InputError(f"class index {index} is out of range: the labels have classes "
                         f"0 to {len(labels) - 1}")
    return index


MAX_SUGGESTIONS = 8


def _suggestions(labels: Labels, wanted: str) -> str:
    """'; did you mean ...' with the likeliest names, so a vague or misspelt name costs one retry.

    Names that hold the query as a whole word come first ('cat' -> tabby cat,
    tiger cat, Persian cat, ...): that is what a user typing a short, general
    word means. Spelling neighbours ('crate', 'coast') only when none do.
    """
    owner: dict[str, tuple[str, int]] = {}
    for index in range(len(labels)):
        for alias in labels.aliases(index):
            owner.setdefault(alias.casefold(), (alias, index))
    word = re.compile(r"(?<![a-z0-9])" + re.escape(wanted) + r"(?![a-z0-9])")
    by_word, seen = [], set()
    for key, (alias, index) in owner.items():
        if word.search(key) and index not in seen:
            seen.add(index)
            by_word.append(key)
    close = by_word[:MAX_SUGGESTIONS] or difflib.get_close_matches(wanted, owner, n=3, cutoff=0.6)
    if not close:
        return ""
    named = [f"{owner[key][0]!r} ({owner[key][1]})" for key in close]
    more = f" (and {len(by_word) - MAX_SUGGESTIONS} more)" if len(by_word) > MAX_SUGGESTIONS else ""
    return "; did you mean " + ", ".join(named) + more + "?"
