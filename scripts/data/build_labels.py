"""Build src/fcnify/data/imagenet_labels.txt from timm's wheel, not by hand.

Caffe's ILSVRC-2012 nets number their 1000 classes in sorted-wnid order (the
order of Caffe's data/ilsvrc12/synset_words.txt). timm's wheel ships the 1000
wnids and a wnid -> lemma table, so the labels file can be rebuilt and checked
by anyone: `python scripts/data/build_labels.py`.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SYNSETS = "timm/data/_info/imagenet_synsets.txt"
LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"
OUTPUT = Path(__file__).resolve().parents[2] / "src" / "fcnify" / "data" / "imagenet_labels.txt"
# Spot checks against Caffe's synset_words.txt (0-based class indices).
KNOWN = {281: "n02123045 tabby, tabby cat", 282: "n02123159 tiger cat",
         285: "n02124075 Egyptian cat"}


def download_timm(folder: Path) -> Path:
    """Fetch timm's wheel with pip, so the labels come from a published package."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "timm", "-d", str(folder)], check=True)
    wheels = sorted(folder.glob("timm-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no timm wheel in {folder}")
    return wheels[-1]


def label_lines(wheel: Path) -> list[str]:
    """`wnid names` lines in Caffe's class order (sorted wnids)."""
    with zipfile.ZipFile(wheel) as archive:
        wnids = archive.read(SYNSETS).decode("utf-8").split()
        lemma_rows = archive.read(LEMMAS).decode("utf-8").splitlines()
    lemmas = dict(row.split("\t", 1) for row in lemma_rows if row.strip())
    if len(wnids) != 1000 or len(set(wnids)) != 1000:
        raise SystemExit(f"{SYNSETS} has {len(wnids)} wnids ({len(set(wnids))} distinct), "
                         "expected 1000")
    missing = [w for w in wnids if w not in lemmas]
    if missing:
        raise SystemExit(f"{LEMMAS} lacks names for {missing[:5]}")
    return [f"{wnid} {lemmas[wnid].strip()}" for wnid in sorted(wnids)]


def check(lines: list[str]) -> None:
    """Refuse to write a file whose class order disagrees with Caffe's."""
    for index, expected in KNOWN.items():
        if lines[index] != expected:
            raise SystemExit(f"class {index} is {lines[index]!r}, expected {expected!r}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_timm(Path(tmp))
        lines = label_lines(wheel)
    check(lines)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} labels from {wheel.name} to {OUTPUT}")


if __name__ == "__main__":
    main()
