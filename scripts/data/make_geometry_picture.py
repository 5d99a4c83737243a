#!/usr/bin/env python3
"""Draw docs/images/window_reach.png: one cell's window and reach over Caffe's cat.jpg.

CaffeNet converted in memory (no weights needed: geometry comes from the
layers) over cat.jpg resized to 451x451, as Caffe's net-surgery example feeds
it. The picture shows cell (1, 1)'s window (the 227-px crop the classifier
would be given for it), its reach (every pixel that can change it, 355 px,
hanging over the image where padding stands in) and the 8x8 grid of window
starts every 32 px. Run from the repository root:

    .venv/bin/python scripts/data/make_geometry_picture.py [--out docs/images/window_reach.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from fcnify.caffe.geometry import hw, map_geometry, map_size  # noqa: E402
from fcnify.io.images import load_image, resize  # noqa: E402
from fcnify.caffe.netdef import read_netdef  # noqa: E402
from fcnify.paths import caffe_source  # noqa: E402
from fcnify.surgery.surgery import convert_net  # noqa: E402

SIZE = 451
CELL = (1, 1)


def draw(out: Path) -> None:
    root = caffe_source()
    net = convert_net(read_netdef(root / "models" / "bvlc_reference_caffenet" / "deploy.prototxt")).net
    geo = map_geometry(net)
    rows, cols = map_size(net, SIZE, SIZE)
    image = resize(load_image(root / "examples" / "images" / "cat.jpg"), SIZE, SIZE)
    fig, ax = plt.subplots(figsize=(6.4, 6.4), dpi=100)
    ax.imshow(image, extent=(0, SIZE, SIZE, 0))
    sy, sx = geo.stride
    for r in range(rows):
        for c in range(cols):
            ax.plot(c * sx + geo.offset[1], r * sy + geo.offset[0], "+", color="white", ms=5, alpha=0.8)
    x0, y0, x1, y1 = geo.box(*CELL)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="#00e5ff", lw=2.5,
                           label=f"window of cell {CELL}, {hw(*geo.window)} px: the crop the "
                                 "classifier would be given"))
    x0, y0, x1, y1 = geo.reach_box(*CELL)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="#ff2bd6", lw=2, ls="--",
                           label=f"reach of cell {CELL}, {hw(*geo.reach)} px: every pixel that "
                                 "can change it (zero padding where it leaves the image)"))
    ax.plot([], [], "+", color="grey", label=f"window starts: {rows}x{cols} cells every {sx} px")
    margin = max(-geo.x.reach_lo, geo.x.reach_hi) // 2
    ax.set_xlim(-margin, SIZE + margin)
    ax.set_ylim(SIZE + margin, -margin)
    ax.set_title(f"CaffeNet over a {hw(SIZE, SIZE)} image: one cell's window and reach", fontsize=10)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.02), fontsize=8, frameon=False)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/window_reach.png"))
    args = parser.parse_args()
    draw(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
