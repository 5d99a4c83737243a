"""What `classify-map --out` can write (--save), and what each item costs.

Kept apart from outputs.py, which needs numpy, so that the CLI can list the
items in its --help without importing it.
"""
from __future__ import annotations

from ..errors import InputError

# What --save can choose, and what each costs (classify-map --help prints this).
SAVE_ITEMS: dict[str, str] = {
    "scores": "NAME.scores.npy, every class's probability per cell (4 bytes x classes x cells)",
    "topk": "NAME.topk_classes.npy and NAME.topk_probs.npy, each cell's --top-k classes and "
            "probabilities (8 bytes x k x cells)",
    "argmax": "NAME.argmax.npy (int32) and NAME.argmax_prob.npy (float32), each cell's winning "
              "class and its probability (8 bytes x cells; off by default)",
    "json": "NAME.map.json, the map's metadata and geometry (a few kB whatever its size)",
    "pictures": "NAME.heatmap.png and NAME.argmax.png (about 10 ms of CPU each for a 256-px image, 40 ms from 1024 px up)",
    "heads": "NAME.BLOB.npy for each other output of the net (as scores)",
    "scales": "with --scales, every scale's own files as NAME.xS.* (the other items, once per scale)",
    "cells": "the per-cell list in NAME.map.json, each cell's window, box and top-k labels "
             "(about 300 bytes a cell: 5 MB for a 640x480 digits map)",
}
DEFAULT_SAVE = frozenset({"scores", "topk", "json", "pictures", "heads"})


def save_help() -> str:
    """--save's help: the items, what each writes and costs, and the default."""
    items = "; ".join(f"{k}: {v}" for k, v in SAVE_ITEMS.items())
    return (f"What --out writes, comma-separated (default: {','.join(k for k in SAVE_ITEMS if k in DEFAULT_SAVE)}). "
            + items + ". With --detect, NAME.detections.json/.png are always written.")


def parse_save(text: str) -> frozenset[str]:
    """--save 'scores,json' -> its items; InputError naming an unknown one and the known ones."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [i for i in items if i not in SAVE_ITEMS]
    if unknown or not items:
        raise InputError(f"--save {text}: {'unknown item ' + repr(unknown[0]) if unknown else 'no item'}; "
                         f"choose from {','.join(SAVE_ITEMS)}")
    return frozenset(items)
