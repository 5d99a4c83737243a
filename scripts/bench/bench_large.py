#!/usr/bin/env python3
"""Benchmark an image larger than memory: a SIZE x SIZE tiled pyramidal TIFF mapped under --max-memory.

Makes, in a temporary folder (removed at the end unless --keep):
  - a small fully-convolutional net (stride 8, a padded 3x3 layer, 4 classes, seeded weights);
  - a SIZE x SIZE px tiled, deflate-compressed, pyramidal BigTIFF, mostly uniform grey with four
    known patterns (checkerboard, stripes, seeded noise, a gradient) at known places; uniform file
    tiles are compressed once and written as the same bytes, so making 60,000 px takes seconds;
then runs the real command

  fcnify classify-map big.tif --model-def net.prototxt --weights net.caffemodel --engine caffe \
      --store zarr --out OUT --max-memory 1GiB --softmax off --save scores,argmax,json,pictures

and measures its wall time and the peak RSS of its process tree (fcnify and Caffe's worker,
summed, sampled every 20 ms). Then, for each pattern, the same region cut out of the image as an
ordinary PNG (origin on the map's stride grid, a margin past the reach) is mapped in this process,
and its interior cells (reach inside the crop) are compared with the store's: the float32 bound of
the score layer (fcnify.surgery.bound, as the tests use it), the same argmax where the top two
classes are further apart than the bound. Prints a table and writes JSON (default bench_large.json).

Usage: .venv/bin/python scripts/bench/bench_large.py [--size 60000] [--max-memory 1GiB] [--workers 2]
       [--resume-check] [--keep]
--resume-check also SIGKILLs a second run once about half its chunks are marked done, runs it again
with --resume, counts the chunks each part ran and compares the store with the uninterrupted one.
With --workers N, the same command also runs on N local Dask workers (both runs on one BLAS thread):
its time, the client's peak RSS, the chunks each worker wrote, and whether the stores are equal.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

NET = """
name: "benchnet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 64 dim: 64 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 8 stride: 8 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "score" type: "Convolution" bottom: "conv2" top: "score"
        convolution_param { num_output: 4 kernel_size: 1 } }
"""
STRIDE = 8
FILE_TILE = 512
GREY = 128
# The fixed part beside --max-memory: this interpreter with numpy, zarr, tifffile, Pillow and fcnify
# (about 150 MiB measured) and what the engine's memory model leaves out of its own process.
ALLOWANCE = 256 * 2**20


def patterns(size: int) -> list[dict]:
    """Four 1024-px patterns at fixed fractions of the image, off the file's tile grid."""
    side = min(1024, size // 4)
    spots = [(0.085, 0.117), (0.5, 0.5), (0.867, 0.183), (0.283, 0.8)]
    return [{"name": name, "y": int(fy * size) + 37, "x": int(fx * size) + 53, "h": side, "w": side}
            for name, (fy, fx) in zip(("checkerboard", "stripes", "noise", "gradient"), spots)]


NOISE = np.random.default_rng(7).integers(0, 256, size=(1024, 1024, 3), dtype=np.uint8)


def pixels(spots: list[dict], y0: int, x0: int, h: int, w: int, step: int = 1) -> np.ndarray:
    """The image's pixels [y0, y0+h) x [x0, x0+w) of the level sampled every `step` px (level 0: 1)."""
    out = np.full((h, w, 3), GREY, np.uint8)
    ys, xs = (y0 + np.arange(h)) * step, (x0 + np.arange(w)) * step
    for p in spots:
        iy = np.nonzero((ys >= p["y"]) & (ys < p["y"] + p["h"]))[0]
        ix = np.nonzero((xs >= p["x"]) & (xs < p["x"] + p["w"]))[0]
        if not len(iy) or not len(ix):
            continue
        py, px = ys[iy][:, None] - p["y"], xs[ix][None, :] - p["x"]
        if p["name"] == "checkerboard":
            v = (((py // 32) + (px // 32)) % 2 * 255).astype(np.uint8)
            block = np.repeat(v[..., None], 3, axis=2)
        elif p["name"] == "stripes":
            red = (px // 24) % 2 == 0
            block = np.where(red[..., None], np.array([220, 30, 30], np.uint8),
                             np.array([30, 30, 220], np.uint8)) + np.zeros_like(py)[..., None].astype(np.uint8)
        elif p["name"] == "noise":
            block = NOISE[py % 1024, px % 1024]
        else:
            g = ((py + px) * 255 // (p["h"] + p["w"])).astype(np.uint8)
            block = np.stack([g, 255 - g, np.full_like(g, 90)], axis=2)
        out[iy[0]:iy[-1] + 1, ix[0]:ix[-1] + 1] = block
    return out


def write_tiff(path: Path, size: int, spots: list[dict], levels_down_to: int = 2048) -> list[int]:
    """The pyramidal tiled TIFF (SubIFDs; each level samples every 2**k px); returns the levels' sides."""
    import tifffile
    sides = [size]
    while sides[-1] // 2 >= levels_down_to:
        sides.append(sides[-1] // 2)
    uniform = zlib.compress(np.full((FILE_TILE, FILE_TILE, 3), GREY, np.uint8).tobytes(), 6)

    def tiles(level: int):
        side, step = sides[level], 2 ** level
        for ty in range(-(-side // FILE_TILE)):
            for tx in range(-(-side // FILE_TILE)):
                y0, x0 = ty * FILE_TILE, tx * FILE_TILE
                if not any(_meets(p, y0 * step, x0 * step, FILE_TILE * step) for p in spots):
                    yield uniform
                    continue
                yield zlib.compress(pixels(spots, y0, x0, FILE_TILE, FILE_TILE, step).tobytes(), 6)

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for level, side in enumerate(sides):
            extra = {"subifds": len(sides) - 1} if level == 0 else {"subfiletype": 1}
            tw.write(tiles(level), shape=(side, side, 3), dtype=np.uint8, tile=(FILE_TILE, FILE_TILE),
                     compression="deflate", photometric="rgb", **extra)
    return sides


def _meets(p: dict, y0: int, x0: int, span: int) -> bool:
    return y0 < p["y"] + p["h"] and p["y"] < y0 + span and x0 < p["x"] + p["w"] and p["x"] < x0 + span


def make_net(folder: Path) -> tuple[Path, Path]:
    from fcnify.caffe.netdef import parse_netdef
    from fcnify.synthetic import write_random_caffemodel
    proto = folder / "benchnet.prototxt"
    proto.write_text(NET)
    weights = write_random_caffemodel(parse_netdef(NET, proto), folder / "benchnet.caffemodel", seed=11)
    return proto, weights


def tree_rss(pid: int) -> int:
    import psutil
    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_measured(args: list[str], env: dict | None = None) -> dict:
    """Run `args`, sampling its process tree's RSS every 20 ms: wall time, peak RSS (the tree's, and
    the main process's alone: the client of a Dask run), output."""
    import psutil
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    peak, main_peak = [0], [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            try:
                main_peak[0] = max(main_peak[0], psutil.Process(proc.pid).memory_info().rss)
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak[0], "main_peak_rss": main_peak[0],
            "code": proc.returncode, "stdout": out, "stderr": err}


def done_chunks(store: Path) -> tuple[int, int | None]:
    """(chunks marked done, chunks in all) of a store being written; (0, None) before it exists."""
    meta = store / "zarr.json"
    if not meta.is_file():
        return 0, None
    try:
        grid = json.loads(meta.read_text())["attributes"]["fcnify"]["grid"]
    except (ValueError, KeyError):
        return 0, None
    return sum(1 for _ in (store / "done" / "c").glob("*/*")), grid[0] * grid[1]


def killed_and_resumed(cmd: list[str], store: Path, env: dict | None) -> dict:
    """Run `cmd`, SIGKILL its process group once about half its chunks are done, then run it again
    with --resume: how many chunks each part ran."""
    import signal
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **(env or {})), start_new_session=True)
    done, total = 0, None
    while proc.poll() is None:
        done, total = done_chunks(store)
        if total and done >= total // 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    done, total = done_chunks(store)
    again = run_measured(cmd + ["--resume", "--format", "json"], env)
    summary = json.loads(again["stdout"].strip().splitlines()[-1])["store"] if again["code"] == 0 else again["stderr"]
    return {"chunks": total, "done_when_killed": done, "resume_code": again["code"], "resume_summary": summary,
            "resume_seconds": round(again["seconds"], 2)}


def same_stores(a: Path, b: Path) -> dict:
    """Whether two stores hold the same arrays, chunk for chunk (a chunk row of cells at a time)."""
    import zarr
    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = sorted(ra.array_keys())
    if names != sorted(rb.array_keys()):
        return {"same": False, "why": f"arrays {names} vs {sorted(rb.array_keys())}"}
    for name in names:
        x, y = ra[name], rb[name]
        if x.shape != y.shape:
            return {"same": False, "why": f"{name}: {x.shape} vs {y.shape}"}
        step = x.chunks[-2]
        for r0 in range(0, x.shape[-2], step):
            if not np.array_equal(np.asarray(x[..., r0:r0 + step, :]), np.asarray(y[..., r0:r0 + step, :])):
                return {"same": False, "why": f"{name}: rows from {r0} differ"}
    return {"same": True, "arrays": names}


def check_crops(store: Path, proto: Path, weights: Path, spots: list[dict], size: int,
                folder: Path) -> list[dict]:
    """Each pattern's crop as an ordinary PNG, mapped here, against the store's cells."""
    import zarr
    from PIL import Image
    from fcnify.caffe.caffemodel import read_weights
    from fcnify.dense.dense import DenseModel
    from fcnify.resolve import resolve_card
    from fcnify.surgery.bound import score_layer, within
    root = zarr.open_group(str(store), mode="r")
    model = DenseModel(resolve_card(None, model_def=proto, weights=weights), engine="caffe", softmax=False)
    layer = score_layer(model.netdef.param, model.score_blob, read_weights(weights))
    g = model.geometry
    margin = g.reach[0] + STRIDE
    results = []
    try:
        for p in spots:
            y0 = max(0, (p["y"] - margin) // STRIDE * STRIDE)
            x0 = max(0, (p["x"] - margin) // STRIDE * STRIDE)
            y1, x1 = min(size, p["y"] + p["h"] + margin), min(size, p["x"] + p["w"] + margin)
            crop = pixels(spots, y0, x0, y1 - y0, x1 - x0)
            png = folder / f"crop_{p['name']}.png"
            Image.fromarray(crop).save(png)
            rgb = np.asarray(Image.open(png).convert("RGB"))
            scores, _ = model.run_scores(rgb)
            x = model.card.preprocess.apply(rgb)[None]
            bottom = model.net.forward({model.input_blob: x}, [layer.bottom])[layer.bottom]
            tol = layer.tolerance(bottom)[0]
            rows, cols = scores.shape[1:]
            # interior cells: their whole reach inside the crop (or the crop's edge is the image's)
            r = [i for i in range(rows) if (y0 == 0 or i * STRIDE + g.y.reach_lo >= 0)
                 and (y1 == size or i * STRIDE + g.y.reach_lo + g.y.reach <= y1 - y0)]
            c = [j for j in range(cols) if (x0 == 0 or j * STRIDE + g.x.reach_lo >= 0)
                 and (x1 == size or j * STRIDE + g.x.reach_lo + g.x.reach <= x1 - x0)]
            rs, cs = slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1)
            big_r, big_c = slice(y0 // STRIDE + r[0], y0 // STRIDE + r[-1] + 1), \
                slice(x0 // STRIDE + c[0], x0 // STRIDE + c[-1] + 1)
            mine, theirs, bound = scores[:, rs, cs], np.asarray(root["scores"][:, big_r, big_c]), tol[:, rs, cs]
            ok, used = within(mine, theirs, bound)
            ordered = np.sort(mine, axis=0)
            clear = (ordered[-1] - ordered[-2]) > 2 * bound.max(axis=0)
            arg_same = np.array_equal(mine.argmax(0)[clear], np.asarray(root["argmax"][big_r, big_c])[clear])
            results.append({"pattern": p["name"], "crop_yx": [y0, x0, y1, x1], "cells": [len(r), len(c)],
                            "grid_aligned": y0 % STRIDE == 0 and x0 % STRIDE == 0,
                            "within_bound": bool(ok), "bound_used": float(used),
                            "argmax_same": bool(arg_same), "argmax_cells_compared": int(clear.sum())})
    finally:
        model.close()
    return results


def digits_run(args, folder: Path) -> int:
    """--digits: the shipped digits scene pasted at known places on paper, mapped with the digits
    model into a store; each placement's argmax must be the ordinary scene's, cell for cell, and
    every digit of scene.json found (its centre cell's class) at its place."""
    import tifffile
    import zarr
    from PIL import Image
    from fcnify.caffe.planner import format_bytes, parse_size
    from fcnify.dense.dense import DenseModel
    from fcnify.io.models import find_model
    from fcnify.paths import prototxt_dir
    scene = np.asarray(Image.open(prototxt_dir() / "digits" / "scene.png").convert("RGB"))
    digits = json.loads((prototxt_dir() / "digits" / "scene.json").read_text())["digits"]
    model = DenseModel(find_model("digits"), engine="caffe")
    try:
        ordinary = model.classify(scene).argmax()
        step = model.geometry.stride[0]
    finally:
        model.close()
    paper = int(scene[0, 0, 0])
    n = args.size
    places = [(int(fy * n) // step * step, int(fx * n) // step * step)
              for fy, fx in ((0.05, 0.05), (0.05, 0.6), (0.6, 0.05), (0.6, 0.6))]  # apart from 1500 px
    places = [(min(y, n - scene.shape[0]) // step * step, min(x, n - scene.shape[1]) // step * step)
              for y, x in places]
    plain = zlib.compress(np.full((FILE_TILE, FILE_TILE, 3), paper, np.uint8).tobytes(), 6)

    def tiles():
        for ty in range(-(-n // FILE_TILE)):
            for tx in range(-(-n // FILE_TILE)):
                y0, x0 = ty * FILE_TILE, tx * FILE_TILE
                hit = [(y, x) for y, x in places if y0 < y + scene.shape[0] and y < y0 + FILE_TILE
                       and x0 < x + scene.shape[1] and x < x0 + FILE_TILE]
                if not hit:
                    yield plain
                    continue
                tile = np.full((FILE_TILE, FILE_TILE, 3), paper, np.uint8)
                for y, x in hit:
                    ys, xs = slice(max(y, y0), min(y + scene.shape[0], y0 + FILE_TILE)), \
                        slice(max(x, x0), min(x + scene.shape[1], x0 + FILE_TILE))
                    tile[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = \
                        scene[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x]
                yield zlib.compress(tile.tobytes(), 6)

    with tifffile.TiffWriter(folder / "digits.tif", bigtiff=True) as tw:
        tw.write(tiles(), shape=(n, n, 3), dtype=np.uint8, tile=(FILE_TILE, FILE_TILE),
                 compression="deflate", photometric="rgb")
    cmd = [sys.executable, "-m", "fcnify", "classify-map", str(folder / "digits.tif"), "--model", "digits",
           "--engine", "caffe", "--store", "zarr", "--out", str(folder / "out"), "--max-memory",
           args.max_memory, "--save", "argmax,json", "--quiet"]
    run = run_measured(cmd)
    if run["code"] != 0:
        print(run["stderr"], file=sys.stderr)
        return 1
    arg = zarr.open_group(str(folder / "out" / "digits.zarr"), mode="r")["argmax"]
    rows, cols = ordinary.shape
    found = []
    for y, x in places:
        got = np.asarray(arg[y // step:y // step + rows, x // step:x // step + cols])
        same = float((got == ordinary).mean())
        hits = 0
        for d in digits:
            r = min(rows - 1, max(0, round((d["center"][1] - model.geometry.window[0] / 2) / step)))
            c = min(cols - 1, max(0, round((d["center"][0] - model.geometry.window[1] / 2) / step)))
            hits += int(got[r, c] == d["class"]) if ordinary[r, c] == d["class"] else 0
        found.append({"place_yx": [y, x], "cells_equal": same,
                      "digits_found": hits, "digits_found_in_scene": int(sum(
                          ordinary[min(rows - 1, max(0, round((d["center"][1] - model.geometry.window[0] / 2) / step))),
                                   min(cols - 1, max(0, round((d["center"][0] - model.geometry.window[1] / 2) / step)))]
                          == d["class"] for d in digits))})
    budget = parse_size(args.max_memory)
    doc = {"size": n, "command": " ".join(cmd[1:]), "summary": run["stdout"].strip(),
           "seconds": round(run["seconds"], 2), "peak_rss": run["peak_rss"], "max_memory": budget,
           "allowance": ALLOWANCE, "places": found}
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(run["stdout"].strip())
    print(f"{run['seconds']:.1f} s, peak RSS {format_bytes(run['peak_rss'])} (budget {format_bytes(budget)} "
          f"+ {format_bytes(ALLOWANCE)})")
    print(f"{'place':>14} {'cells equal':>12} {'digits found (scene finds)':>28}")
    for f in found:
        print(f"{str(tuple(f['place_yx'])):>14} {f['cells_equal']:>12.4f} "
              f"{f['digits_found']:>14} ({f['digits_found_in_scene']})")
    good = run["peak_rss"] <= budget + ALLOWANCE and all(
        f["cells_equal"] == 1.0 and f["digits_found"] == f["digits_found_in_scene"] for f in found)
    return 0 if good else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=60000)
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--folder", type=Path, default=None, help="work folder (default: a new one in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the TIFF and the store")
    ap.add_argument("--json", type=Path, default=Path("bench_large.json"))
    ap.add_argument("--resume-check", action="store_true",
                    help="also kill a second run at about half-way, --resume it, and compare the stores")
    ap.add_argument("--tile", type=int, default=None, help="--tile for the runs (default: from the budget)")
    ap.add_argument("--digits", action="store_true",
                    help="the digits model on its scene pasted at four places (see digits_run)")
    ap.add_argument("--workers", type=int, default=0,
                    help="also run with --workers N (both runs on one BLAS thread) and compare the stores")
    args = ap.parse_args(argv)
    from fcnify.caffe.planner import format_bytes, parse_size
    folder = args.folder or Path(tempfile.mkdtemp(prefix="fcnify-bench-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if args.digits:
            return digits_run(args, folder)
        proto, weights = make_net(folder)
        spots = patterns(args.size)
        t0 = time.perf_counter()
        sides = write_tiff(folder / "big.tif", args.size, spots)
        make_s = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "fcnify", "classify-map", str(folder / "big.tif"),
               "--model-def", str(proto), "--weights", str(weights), "--engine", "caffe",
               "--store", "zarr", "--out", str(folder / "out"), "--max-memory", args.max_memory,
               "--softmax", "off", "--save", "scores,argmax,json,pictures", "--quiet"]
        if args.tile:
            cmd += ["--tile", str(args.tile)]
        env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"} if args.workers else None
        run = run_measured(cmd, env)
        if run["code"] != 0:
            print(run["stderr"], file=sys.stderr)
            return 1
        steps = json.loads((folder / "out" / "big.zarr" / "zarr.json").read_text())["attributes"]["fcnify"]
        steps = steps.get("seconds", {})  # the run's own seconds by step (read + preprocess, forward, write)
        crops = check_crops(folder / "out" / "big.zarr", proto, weights, spots, args.size, folder)
        resumed = None
        if args.resume_check:
            rcmd = [a if a != str(folder / "out") else str(folder / "out_resumed") for a in cmd]
            resumed = killed_and_resumed(rcmd, folder / "out_resumed" / "big.zarr", env)
            resumed["store_vs_uninterrupted"] = same_stores(folder / "out" / "big.zarr",
                                                            folder / "out_resumed" / "big.zarr")
            shutil.rmtree(folder / "out_resumed", ignore_errors=True)
        dask = None
        if args.workers:
            wcmd = [a if a != str(folder / "out") else str(folder / "out_dask") for a in cmd]
            wrun = run_measured(wcmd + ["--workers", str(args.workers), "--format", "json"], env)
            if wrun["code"] != 0:
                print(wrun["stderr"], file=sys.stderr)
                return 1
            doc_w = json.loads(wrun["stdout"].strip().splitlines()[-1])
            dask = {"command": " ".join(wcmd[1:]) + f" --workers {args.workers}",
                    "seconds": round(wrun["seconds"], 2), "client_peak_rss": wrun["main_peak_rss"],
                    "tree_peak_rss": wrun["peak_rss"],
                    "chunks_per_worker": doc_w.get("chunks_per_worker"),
                    "store_vs_one_process": same_stores(folder / "out" / "big.zarr",
                                                        folder / "out_dask" / "big.zarr")}
        budget = parse_size(args.max_memory)
        doc = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
               "image": {"size": args.size, "file_tile": FILE_TILE, "levels": sides,
                         "tiff_bytes": (folder / "big.tif").stat().st_size, "make_seconds": round(make_s, 2)},
               "command": " ".join(cmd[1:]), "summary": run["stdout"].strip(),
               "seconds": round(run["seconds"], 2), "steps": steps, "peak_rss": run["peak_rss"],
               "max_memory": budget, "load_average": list(os.getloadavg()), "allowance": ALLOWANCE,
               "rss_within": run["peak_rss"] <= budget + ALLOWANCE, "crops": crops, "dask": dask,
               "resumed": resumed}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{args.size} x {args.size} px tiled deflate pyramid ({len(sides)} levels, "
              f"{format_bytes(doc['image']['tiff_bytes'])}, made in {make_s:.1f} s)")
        print(run["stdout"].strip())
        print(f"{'wall s':>8} {'peak RSS':>12} {'budget':>10} {'+allowance':>11} {'within':>7}")
        print(f"{run['seconds']:>8.1f} {format_bytes(run['peak_rss']):>12} {format_bytes(budget):>10} "
              f"{format_bytes(ALLOWANCE):>11} {str(doc['rss_within']):>7}")
        print("steps, s: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
              + " (preprocess includes reading the windows); load average "
              + " ".join(f"{v:.1f}" for v in doc["load_average"]))
        print(f"{'pattern':<13} {'cells':>10} {'aligned':>8} {'bound':>6} {'used':>8} {'argmax':>7}")
        for c in crops:
            print(f"{c['pattern']:<13} {'x'.join(map(str, c['cells'])):>10} {str(c['grid_aligned']):>8} "
                  f"{str(c['within_bound']):>6} {c['bound_used']:>8.3g} {str(c['argmax_same']):>7}")
        if dask:
            print(f"--workers {args.workers}: {dask['seconds']:.1f} s, client peak RSS "
                  f"{format_bytes(dask['client_peak_rss'])}, chunks per worker {dask['chunks_per_worker']}, "
                  f"same store as one process: {dask['store_vs_one_process']['same']}")
        if resumed:
            print(f"killed at {resumed['done_when_killed']} of {resumed['chunks']} chunks; --resume: "
                  f"{resumed['resume_summary']}; same store as uninterrupted: "
                  f"{resumed['store_vs_uninterrupted']['same']}")
        print(f"wrote {args.json}")
        good = doc["rss_within"] and all(c["within_bound"] and c["argmax_same"] for c in crops)
        if resumed:
            good = good and resumed["resume_code"] == 0 and resumed["store_vs_uninterrupted"]["same"]
        if dask:
            good = good and dask["store_vs_one_process"]["same"] and dask["client_peak_rss"] < 300 * 2**20
        return 0 if good else 1
    finally:
        if not args.keep and args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
