#!/usr/bin/env python3
"""Benchmark classify-map throughput: one process vs local Dask workers.

Makes N different images (crops of the digits scene, tiled to the asked size),
then times the real commands end to end, each with a fresh --out folder:

  fcnify classify-map IMAGES/ --model digits --out OUT --quiet               (one process)
  fcnify classify-map IMAGES/ --model digits --out OUT --quiet --workers W   (W Dask workers)

and, with --caffenet, the same with Caffe's reference CaffeNet (seeded random
weights, converted once with fcnify.convert; `--card`). Wall time includes
starting Python, loading the net and, for Dask, starting the cluster; the
Dask rows also give the rate the run itself reports (cluster start excluded).
Prints a table and writes JSON (default bench_dask.json).
Usage: .venv/bin/python scripts/bench/bench_dask.py [--images 16] [--size 600] [--workers 2] [--caffenet]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fcnify.paths import prototxt_dir


def make_images(folder: Path, n: int, size: int) -> None:
    """n different size x size images: the digits scene repeated, each cut at its own offset."""
    scene = np.asarray(Image.open(prototxt_dir() / "digits" / "scene.png").convert("RGB"))
    big = np.tile(scene, (-(-size // scene.shape[0]) + 1, -(-size // scene.shape[1]) + 1, 1))
    rng = np.random.default_rng(0)
    for i in range(n):
        y, x = rng.integers(0, scene.shape[0]), rng.integers(0, scene.shape[1])
        Image.fromarray(big[y:y + size, x:x + size]).save(folder / f"img{i:03d}.png")


def caffenet_card(folder: Path) -> Path:
    """CaffeNet with seeded weights, converted once: its card."""
    from fcnify.convert import convert
    from fcnify.caffe.netdef import read_netdef
    from fcnify.paths import caffe_source
    from fcnify.synthetic import write_random_caffemodel
    proto = caffe_source() / "models" / "bvlc_reference_caffenet" / "deploy.prototxt"
    weights = folder / "caffenet_seeded.caffemodel"
    write_random_caffemodel(read_netdef(proto), weights, seed=1)
    return Path(convert(proto, weights, str(folder / "caffenet")).outputs["card"])


def timed(args: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds of the command and the processes it waited for, its stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    run = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        sys.exit(f"failed ({run.returncode}): {shlex.join(args)}\n{run.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, run.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=600)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--caffenet", action="store_true", help="also CaffeNet-size (seeded weights)")
    ap.add_argument("--no-digits", action="store_true", help="skip the digits model")
    ap.add_argument("--json", default="bench_dask.json")
    opts = ap.parse_args()
    fcnify = [sys.executable, "-m", "fcnify"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fcnify-bench-") as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        make_images(images, opts.images, opts.size)
        models = [] if opts.no_digits else [("digits", ["--model", "digits"])]
        if opts.caffenet:
            models.append(("caffenet (seeded)", ["--card", str(caffenet_card(tmp))]))
        for name, model in models:
            for workers in (None, opts.workers):
                out = tmp / f"out-{len(rows)}"
                args = fcnify + ["classify-map", str(images), *model, "--out", str(out), "--quiet"]
                if workers:
                    args += ["--workers", str(workers)]
                load = os.getloadavg()[0]
                seconds, cpu, err = timed(args)
                m = re.search(r"in ([\d.]+) s \(([\d.]+) images/min\)", err)
                rows.append({"model": name, "mode": f"{workers} Dask workers" if workers else "1 process",
                             "images": opts.images, "size": opts.size, "wall_s": round(seconds, 1),
                             "images_per_min": round(60 * opts.images / seconds, 1),
                             "run_s": float(m.group(1)) if m else None,
                             "run_images_per_min": float(m.group(2)) if m else None,
                             "cpu_s": round(cpu, 1), "load_before": round(load, 1),
                             "load_after": round(os.getloadavg()[0], 1),
                             "command": shlex.join(["fcnify", *args[3:]]).replace(str(tmp), "$TMP")})
                print(f"{name:18} {rows[-1]['mode']:16} {seconds:7.1f} s  "
                      f"{rows[-1]['images_per_min']:6.1f} images/min", flush=True)
    print(f"\n{opts.images} images of {opts.size}x{opts.size} px, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'model':18} {'mode':16} {'wall s':>7} {'img/min':>8} {'run s':>7} {'run img/min':>11} "
          f"{'CPU s':>6} {'load':>9}")
    for r in rows:
        run_s = f"{r['run_s']:7.1f}" if r["run_s"] else f"{'-':>7}"
        run_rate = f"{r['run_images_per_min']:11.1f}" if r["run_images_per_min"] else f"{'-':>11}"
        print(f"{r['model']:18} {r['mode']:16} {r['wall_s']:7.1f} {r['images_per_min']:8.1f} "
              f"{run_s} {run_rate} {r['cpu_s']:6.1f} {r['load_before']:4.1f}-{r['load_after']:<4.1f}")
    for r in rows:
        print("  " + r["command"])
    Path(opts.json).write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
