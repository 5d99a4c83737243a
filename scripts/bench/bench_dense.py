#!/usr/bin/env python3
"""Benchmark dense inference with CaffeNet (seeded weights), in one process.

Prints a table and writes JSON (default bench_dense.json):
  (a) one 227x227 classification vs the 451x451 FCN map (Caffe's example says ~3x)
  (b) the 451 map vs classifying its 64 crops in one batch (sliding window)
  (c) achieved GFLOP/s of the FCN vs numpy's float32 matrix multiply, same run
  (d) time and peak memory from 451 to 4000 px, one forced whole-image pass vs
      what the planner picks under --max-memory
  (e) an 8000x8000 image, tiled under --max-memory, with peak RSS of both processes
  plus the tiling overhead: time per map cell tiled vs whole at the largest size
  that fits the same budget.
  (f) the engines side by side (--engines, default caffe,torch,onnx), same inputs,
  interleaved rounds: bare forward of the FCN at each size (and of the original at
  227), achieved GFLOP/s against the same run's matmul rate, the 451-vs-227 ratio,
  DenseModel.run at 451 (preprocessing, transfer, stitching) and its overhead over
  the bare forward, and each engine's DenseModel.run at 451 against Caffe's; then
  ONNX Runtime's measured activation memory (peak RSS of this process) against
  the planner's model of it (onnx_engine.onnx_memory). --only-engines runs (f) alone.
  (g) --stride 16 (half CaffeNet's) at 451 px against the stride-32 map: à trous
      (what fcnify picks) and plain shift-and-stitch (2x2 shifted runs)
  (h) the whole `fcnify classify-map` command on a 10000x7000 JPEG under
      --max-memory, with and without --out: peak RSS of fcnify's process, of the
      Caffe worker, and of the process tree (sampled every 0.1 s), against
      budget + image bytes + map bytes + 0.5 GiB; and, without Caffe, what writing
      the outputs of such a map adds to fcnify's own process (DenseMap.save on a
      seeded map of the same shape, peak RSS above the image and the map)

Forward times in (a)-(c) are measured inside fcnify's Caffe worker around
net.forward(); (d)-(e) are wall times of DenseModel.run (preprocessing,
transfers and stitching included). Peak RSS is read from /proc (VmHWM), reset
before each measurement. Usage: .venv/bin/python scripts/bench/bench_dense.py [--quick]
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fcnify.convert import convert
from fcnify.dense.dense import DenseModel
from fcnify.io.models import read_card
from fcnify.caffe.netdef import read_netdef
from fcnify.paths import caffe_source
from fcnify.caffe.planner import estimate, largest_square, format_bytes
from fcnify.engines.caffe_engine import CaffeRunner
from fcnify.engines.sandbox import Sandbox
from fcnify.caffe.shapes import count, infer
from fcnify.synthetic import write_random_caffemodel
from fcnify.dense.tiling import min_tile

GIB = 2**30


def hwm(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm(pid: int | str = "self") -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def conv_flops(net, h: int, w: int) -> int:
    """Multiply-adds x 2 of every Convolution/InnerProduct at an h x w input."""
    name = next(l.top[0] for l in net.layer if l.type == "Input")
    shape = infer(net).blobs[name]
    shapes = infer(net, {name: (1, shape[1], h, w)})
    total = 0
    for ls in shapes.layers:
        if ls.type in ("Convolution", "InnerProduct") and ls.params:
            total += 2 * count(ls.params[0]) * count(ls.tops[0][2:]) if ls.type == "Convolution" \
                else 2 * count(ls.params[0])
    return total


def numpy_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random 8-bit image, generated in strips to stay small in memory."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 32 + 2, w // 32 + 2, 3)).astype(np.uint8)
    out = np.empty((h, w, 3), np.uint8)
    for y0 in range(0, h, 512):
        ys = np.arange(y0, min(h, y0 + 512)) // 32
        out[y0:y0 + len(ys)] = small[ys][:, np.arange(w) // 32]
    return out


def measured_run(card, img: np.ndarray, **run_args) -> dict:
    """DenseModel.run in a fresh worker: wall time, and peak RSS of both processes during the run."""
    box = Sandbox()
    model = DenseModel(card, runner=CaffeRunner(box=box))
    pid = box.worker.proc.pid
    reset_hwm(pid)
    reset_hwm()
    t0 = time.perf_counter()
    probs, info = model.run(img, **run_args)
    seconds = time.perf_counter() - t0
    cells = int(probs.shape[1] * probs.shape[2])
    entry = {"size": img.shape[0], "ran_as": info["mode"], "tiles": info["tiles"],
             "tile_size": info["tile_size"], "seconds": seconds, "cells": cells,
             "seconds_per_cell": seconds / cells, "worker_peak_bytes": hwm(pid),
             "main_peak_bytes": hwm()}
    entry["sum_peak_bytes"] = entry["worker_peak_bytes"] + entry["main_peak_bytes"]
    model.close()
    box.close()
    return entry


def load_engine(name: str):
    """(engine, sandbox or None): the Caffe engine on its own worker process, so its peak is its own."""
    if name == "caffe":
        box = Sandbox()
        return CaffeRunner(box=box), box
    from fcnify.engines import make_engine
    return make_engine(name), None


def engines_section(args, proto: Path, weights: Path, fcn_card, fcn_net) -> dict:
    """(f): every engine on the same inputs, in interleaved rounds (see the module docstring)."""
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    sizes = [int(n) for n in args.engine_sizes.split(",")]
    pre = fcn_card.preprocess
    imgs = {n: image(n, n, n) for n in sorted({227, 451, *sizes})}
    xs = {n: pre.apply(img)[None] for n, img in imgs.items()}
    engines, nets, models = {}, {}, {}
    for name in names:
        engine, box = load_engine(name)
        engines[name] = (engine, box)
        nets[name] = (engine.load(proto, weights), engine.load(fcn_card.model_def, fcn_card.weights))
        models[name] = DenseModel(fcn_card, runner=engine)
    gf_np = []
    times: dict = {name: {"orig227": [], "run451": [], **{n: [] for n in sizes}} for name in names}
    for name in names:  # warm-up: first passes allocate
        original, fcn = nets[name]
        original.timed_forward({"data": xs[227]}, ["prob"], 1)
        fcn.timed_forward({"data": xs[451]}, ["prob"], 1)
        models[name].run(imgs[451])
    for _ in range(args.engine_repeats):
        gf_np.append(numpy_gflops(repeats=2))
        for name in names:
            original, fcn = nets[name]
            times[name]["orig227"] += original.timed_forward({"data": xs[227]}, ["prob"], 1)[1]
            for n in sizes:
                times[name][n] += fcn.timed_forward({"data": xs[n]}, ["prob"], 1)[1]
            times[name]["run451"].append(_timed(lambda: models[name].run(imgs[451])))
    matmul = float(np.median(gf_np))
    out: dict = {"matmul_gflops": matmul, "sizes": sizes, "engines": {}}
    caffe_run = float(np.median(times["caffe"]["run451"])) if "caffe" in names else None
    print(f"\n(f) engines on the same inputs, medians of {args.engine_repeats} interleaved rounds; "
          f"numpy float32 matmul {matmul:.0f} GFLOP/s in the same rounds")
    print(row("engine / measure", *[f"{n} px" for n in sizes]))
    for name in names:
        t = {k: float(np.median(v)) for k, v in times[name].items()}
        entry = {"forward_s": {n: t[n] for n in sizes}, "orig227_s": t["orig227"], "run451_s": t["run451"],
                 "gflops": {n: conv_flops(fcn_net, n, n) / t[n] / 1e9 for n in sizes}}
        entry["ratio_451_227"] = t[451] / t["orig227"] if 451 in sizes else None
        entry["run_overhead_451"] = t["run451"] / t[451] - 1 if 451 in sizes else None
        entry["run451_speedup_vs_caffe"] = caffe_run / t["run451"] if caffe_run else None
        out["engines"][name] = entry
        print(row(f"{name}: bare forward", *[f"{1000 * t[n]:.0f} ms" for n in sizes]))
        print(row(f"{name}: GFLOP/s (of matmul)",
                  *[f"{entry['gflops'][n]:.0f} ({100 * entry['gflops'][n] / matmul:.0f}%)" for n in sizes]))
        print(row(f"{name}: 227 classify / 451 map", f"{1000 * t['orig227']:.0f} ms",
                  f"ratio {entry['ratio_451_227']:.2f}x" if entry["ratio_451_227"] else "-"))
        print(row(f"{name}: DenseModel.run 451", f"{1000 * t['run451']:.0f} ms",
                  f"+{100 * entry['run_overhead_451']:.0f}% over bare" if entry["run_overhead_451"] is not None
                  else "-", f"{entry['run451_speedup_vs_caffe']:.2f}x caffe" if caffe_run else "-"))
    for name in names:
        for net in nets[name]:
            net.close()
        models[name].close()
        engines[name][0].close()
        if engines[name][1] is not None:
            engines[name][1].close()
    if "onnx" in names:
        out["onnx_memory"] = onnx_memory_rows(fcn_card, fcn_net, sizes)
    return out


def onnx_memory_rows(fcn_card, fcn_net, sizes: list[int]) -> list[dict]:
    """ONNX Runtime's activation memory measured (peak RSS over the RSS after loading, one
    fresh process per size) against the planner's model, without and with its slack."""
    import subprocess
    from fcnify.engines.onnx_engine import onnx_memory
    rows = []
    print("\n(f) ONNX Runtime's memory (a fresh process per size, peak RSS over the RSS before loading)"
          " vs the planner's onnx_memory().total")
    print(row("size", "measured", "peak", "planner", "peak/planner"))
    for n in sizes:
        probe = subprocess.run([sys.executable, __file__, "--probe-onnx-memory", str(n),
                                str(fcn_card.card_path)], capture_output=True, text=True, check=True)
        got = json.loads(probe.stdout.strip().splitlines()[-1])
        est = onnx_memory(fcn_net, n, n)
        peak = max(got["load_bytes"], got["held_bytes"] + got["run_bytes"])
        modelled = est.total - est.base
        rows.append({**got, "peak_bytes": peak, "planner_bytes": modelled, "params_bytes": est.params,
                     "activations_bytes": est.activations, "ratio": peak / modelled})
        print(row(f"{n}x{n}", f"load {format_bytes(got['load_bytes'])}, run +{format_bytes(got['run_bytes'])}",
                  format_bytes(peak), format_bytes(modelled), f"{peak / modelled:.2f}"))
    return rows


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe_onnx_memory(n: int, card_path: str) -> int:
    """In a fresh process: the peak RSS of loading the FCN into ONNX Runtime and of one n x n
    DenseModel.run, each over the RSS before it (printed as JSON)."""
    import fcnify.engines.onnx_engine  # noqa: F401 - imports are not the net's memory
    img = image(n, n, n)
    card = read_card(card_path)
    before = rss()
    reset_hwm()
    model = DenseModel(card, engine="onnx")
    loading = hwm() - before
    before_run = rss()
    reset_hwm()
    model.run(img, tile=n)
    print(json.dumps({"size": n, "load_bytes": loading, "held_bytes": before_run - before,
                      "run_bytes": hwm() - before_run, "total_bytes": hwm() - before}))
    return 0




def stride_rows(card, repeats: int) -> dict:
    """(g) Wall time of DenseModel.run at 451 px: stride 32, stride 16 à trous, stride 16 shifted."""
    box = Sandbox()
    runner = CaffeRunner(box=box)
    models = {"stride 32 (the net's)": DenseModel(card, runner=runner),
              "stride 16, à trous": DenseModel(card, runner=runner, stride=16),
              "stride 16, shift-and-stitch": DenseModel(card, runner=runner, stride=16, atrous=False)}
    img = image(451, 451, 3)
    times: dict[str, list[float]] = {k: [] for k in models}
    cells = {}
    for _ in range(2):  # warm-up
        for m in models.values():
            m.run(img)
    for _ in range(repeats):  # interleaved, so a drift in speed hits every variant
        for k, m in models.items():
            t0 = time.perf_counter()
            probs, _ = m.run(img)
            times[k].append(time.perf_counter() - t0)
            cells[k] = probs.shape[1:]
    base = float(np.median(times["stride 32 (the net's)"]))
    out = {}
    print(f"\n(g) CaffeNet at 451x451: --stride 16 against the net's stride 32 "
          f"(wall time of DenseModel.run, median of {repeats} interleaved rounds)")
    print(row("variant", "map", "ms", "x stride 32", "target"))
    for k, t in times.items():
        med = float(np.median(t))
        out[k] = {"cells": list(cells[k]), "seconds": med, "ratio": med / base,
                  "method": models[k].stride_plan.method if models[k].stride_plan else "native"}
        print(row(k, f"{cells[k][0]}x{cells[k][1]}", f"{1000 * med:.0f}", f"{med / base:.2f}x",
                  "<= 3" if "à trous" in k else ""))
    for m in models.values():
        m.close()
    box.close()
    return out


def _tree(pid: int) -> list[int]:
    """A process and all its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _rss(pid: int, field: str = "VmRSS:") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def watched(cmd: list[str]) -> dict:
    """Run a command, sampling its process tree's RSS every 0.1 s: peaks of the tree and per process."""
    import subprocess
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tree_peak, main_peak, worker_peak = 0, 0, 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        rss = {p: _rss(p) for p in pids}
        tree_peak = max(tree_peak, sum(rss.values()))
        main_peak = max(main_peak, _rss(proc.pid, "VmHWM:"))
        worker_peak = max([worker_peak] + [_rss(p, "VmHWM:") for p in pids if p != proc.pid])
        time.sleep(0.1)
    err = proc.stderr.read()
    return {"exit": proc.returncode, "seconds": time.perf_counter() - t0, "tree_peak_bytes": tree_peak,
            "main_peak_bytes": main_peak, "worker_peak_bytes": worker_peak, "stderr_tail": err[-300:]}


def output_rows(card, h: int, w: int, tmp: Path) -> dict:
    """(h) DenseMap.save for an h x w image's CaffeNet map, in this process: the RSS it adds."""
    from fcnify.dense.dense import DenseMap
    from fcnify.caffe.geometry import map_geometry, map_size, score_blob
    net = read_netdef(card.model_def).param
    rows, cols = map_size(net, h, w)
    rng = np.random.default_rng(5)
    img = image(h, w, 11)
    probs = np.empty((1000, rows, cols), np.float32)
    for r in range(rows):  # softmax of seeded scores, a row at a time
        z = rng.standard_normal((1000, cols), dtype=np.float32) * 4
        z = np.exp(z - z.max(axis=0))
        probs[:, r] = z / z.sum(axis=0)
    dm = DenseMap(probs, map_geometry(net, score_blob(net)), (h, w), (h, w), card, image=img)
    before = _rss(os.getpid())
    reset_hwm()
    t0 = time.perf_counter()
    written = dm.save(tmp / "outputs", "big", force=True)
    seconds = time.perf_counter() - t0
    peak = hwm()
    out = {"image": [h, w], "map": [rows, cols], "image_bytes": img.nbytes, "map_bytes": probs.nbytes,
           "rss_before_bytes": before, "peak_bytes": peak, "added_bytes": peak - before,
           "seconds": seconds, "files": {p.name: p.stat().st_size for p in written}}
    print(f"\n(h) writing the outputs of a {w}x{h} image's {rows}x{cols} CaffeNet map (DenseMap.save)")
    print(row("RSS before (image + map held)", format_bytes(before)))
    print(row("peak while writing", format_bytes(peak), f"+{format_bytes(peak - before)}", f"{seconds:.1f} s"))
    return out


def end_to_end_rows(card_path, max_memory: str, budget: int, h: int, w: int, tmp: Path) -> dict:
    """(h) `fcnify classify-map` on an h x w JPEG, with and without --out, watched from outside."""
    from PIL import Image
    from fcnify.caffe.geometry import map_size
    jpg = tmp / f"big_{w}x{h}.jpg"
    Image.fromarray(image(h, w, 11)).save(jpg, quality=90)
    card = read_card(card_path)
    net = read_netdef(card.model_def).param
    rows, cols = map_size(net, h, w)
    classes = 1000
    image_bytes, map_bytes = h * w * 3, classes * rows * cols * 4
    target = budget + image_bytes + map_bytes + GIB // 2
    base = [sys.executable, "-m", "fcnify", "classify-map", str(jpg), "--card", str(card_path),
            "--max-memory", max_memory, "--quiet"]
    out = {"image": [h, w], "map": [rows, cols], "image_bytes": image_bytes, "map_bytes": map_bytes,
           "target_bytes": target}
    print(f"\n(h) fcnify classify-map, {w}x{h} JPEG, --max-memory {max_memory}: peak RSS "
          f"(target: tree < budget + image {format_bytes(image_bytes)} + map {format_bytes(map_bytes)} "
          f"+ 0.5 GiB = {format_bytes(target)})")
    print(row("run", "seconds", "fcnify peak", "worker peak", "tree peak"))
    for label, extra in (("without --out", []), ("with --out", ["--out", str(tmp / "maps"), "--force"])):
        r = watched(base + extra)
        r["within_target"] = r["tree_peak_bytes"] < target
        out[label] = r
        print(row(label + ("" if r["exit"] == 0 else f" (exit {r['exit']})"), f"{r['seconds']:.1f}",
                  format_bytes(r["main_peak_bytes"]), format_bytes(r["worker_peak_bytes"]),
                  format_bytes(r["tree_peak_bytes"]) + (" ok" if r["within_target"] else " OVER")))
    return out


def row(*cells) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, (34, 14, 14, 14, 14)))


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--probe-onnx-memory":
        return probe_onnx_memory(int(sys.argv[2]), sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_dense.json")
    ap.add_argument("--max-memory", default="2GiB")
    ap.add_argument("--quick", action="store_true", help="small sizes only (451-2000, no 8000)")
    ap.add_argument("--only-ab", action="store_true", help="stop after (a)-(c)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--engines", default="caffe,torch,onnx", help="engines for (f), comma-separated")
    ap.add_argument("--engine-sizes", default="451,899,1795", help="FCN input sizes for (f)")
    ap.add_argument("--engine-repeats", type=int, default=5, help="interleaved rounds in (f)")
    ap.add_argument("--only-engines", action="store_true", help="run (f) alone")
    ap.add_argument("--only", choices=["stride", "e2e", "outputs"],
                    help="run only (g), only (h), or only (h)'s output-writing part")
    ap.add_argument("--e2e-size", default="7000x10000", help="HxW of the (h) image")
    args = ap.parse_args()
    from fcnify.caffe.planner import parse_size
    budget = parse_size(args.max_memory)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "platform": platform.platform()},
                     "budget_bytes": budget}
    tmp = Path(tempfile.mkdtemp(prefix="fcnify-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # seeded weights and maps: hundreds of MB
    proto = caffe_source() / "models" / "bvlc_reference_caffenet" / "deploy.prototxt"
    weights = write_random_caffemodel(read_netdef(proto), tmp / "caffenet.caffemodel", seed=1)
    conv = convert(proto, weights, tmp / "caffenet", check=False)
    conv.blobs = {}  # the transplanted arrays are on disk now; keep this process small
    fcn_card = read_card(conv.outputs["card"])
    fcn_net = read_netdef(fcn_card.model_def).param
    pre = fcn_card.preprocess
    if args.only_engines or args.only:
        h, w = (int(v) for v in args.e2e_size.split("x"))
        if args.only_engines:
            results["f_engines"] = engines_section(args, proto, weights, fcn_card, fcn_net)
        elif args.only == "stride":
            results["g_stride"] = stride_rows(fcn_card, max(5, args.repeats // 3))
        elif args.only == "outputs":
            results["h_outputs"] = output_rows(fcn_card, h, w, tmp)
        else:
            results["h_end_to_end"] = end_to_end_rows(conv.outputs["card"], args.max_memory, budget,
                                                      h, w, tmp)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
        return 0

    box = Sandbox()
    runner = CaffeRunner(box=box)
    original = runner.load(proto, weights)
    fcn = runner.load(fcn_card.model_def, fcn_card.weights)
    img451 = image(451, 451, 1)
    x451 = pre.apply(img451)[None]
    x227 = pre.apply(img451[:227, :227])[None]
    crops = np.stack([pre.apply(img451[32 * r:32 * r + 227, 32 * c:32 * c + 227])
                      for r in range(8) for c in range(8)])
    # interleaved rounds, so a drift in the machine's speed hits both sides of each ratio
    for warm in range(2):
        original.timed_forward({"data": x227}, ["prob"], 1)
        fcn.timed_forward({"data": x451}, ["prob"], 1)
    original.timed_forward({"data": crops}, ["prob"], 1)
    t227, t451, t64 = [], [], []
    for _ in range(args.repeats):
        t227 += original.timed_forward({"data": x227[:1]}, ["prob"], 1)[1]
        t451 += fcn.timed_forward({"data": x451}, ["prob"], 1)[1]
        t64 += original.timed_forward({"data": crops}, ["prob"], 1)[1]
        t227 += original.timed_forward({"data": x227[:1]}, ["prob"], 1)[1]
    pairs_a = [b / ((a1 + a2) / 2) for b, a1, a2 in zip(t451, t227[0::2], t227[1::2])]
    pairs_b = [c / b for c, b in zip(t64, t451)]
    m227, m451, m64 = (float(np.median(t)) for t in (t227, t451, t64))
    flops451 = conv_flops(fcn_net, 451, 451)
    gf_fcn = flops451 / m451 / 1e9
    gf_np = numpy_gflops()
    ratio_a, speedup_b = float(np.median(pairs_a)), float(np.median(pairs_b))
    results["a_227_vs_451"] = {"t227_s": m227, "t451_s": m451, "ratio": ratio_a,
                               "ratio_min": min(pairs_a), "ratio_max": max(pairs_a), "target": "<= 3.2"}
    results["b_sliding_window"] = {"t451_map_s": m451, "t64_crops_s": m64, "speedup": speedup_b,
                                   "speedup_min": min(pairs_b), "speedup_max": max(pairs_b),
                                   "target": ">= 8"}
    results["c_gflops"] = {"fcn_451_gflop": flops451 / 1e9, "fcn_gflops": gf_fcn,
                           "numpy_sgemm_gflops": gf_np, "fraction": gf_fcn / gf_np}
    original.close()
    fcn.close()
    box.close()

    print(f"CaffeNet, seeded weights; {os.cpu_count()} CPUs; forward times are medians of "
          f"{args.repeats} interleaved rounds inside the Caffe worker, ratios the median of "
          f"the per-round ratios (min-max)\n")
    print(row("measure", "value", "target"))
    print(row("(a) 227x227 classification", f"{m227 * 1000:.1f} ms"))
    print(row("(a) 451x451 map (8x8 cells)", f"{m451 * 1000:.1f} ms"))
    print(row("(a) ratio 451 map / 227", f"{ratio_a:.2f}x", "<= 3.2",
              f"{min(pairs_a):.2f}-{max(pairs_a):.2f}"))
    print(row("(b) 64 crops, one batch", f"{m64 * 1000:.1f} ms"))
    print(row("(b) map speed-up over crops", f"{speedup_b:.1f}x", ">= 8",
              f"{min(pairs_b):.1f}-{max(pairs_b):.1f}"))
    print(row("(c) FCN GFLOP/s at 451", f"{gf_fcn:.1f}"))
    print(row("(c) numpy sgemm GFLOP/s", f"{gf_np:.1f}", f"FCN at {100 * gf_fcn / gf_np:.0f}%"))

    results["f_engines"] = engines_section(args, proto, weights, fcn_card, fcn_net)
    if args.only_ab:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    sizes = [451, 1000, 2000] if args.quick else [451, 1000, 2000, 3000, 4000]
    print(f"\n(d) whole image vs tiled under --max-memory {format_bytes(budget)} "
          "(wall time of DenseModel.run; peak RSS of the Caffe worker / of this process)")
    print(row("size", "mode", "seconds", "worker peak", "main peak"))
    d_rows = []
    for n in sizes:
        img = image(n, n, n)
        for mode in ("whole", "tiled"):
            # "whole" is forced (one tile as large as the image), "tiled" is the planner's choice
            entry = measured_run(fcn_card, img, tile=n) if mode == "whole" else \
                measured_run(fcn_card, img, budget=budget)
            entry.update(mode=mode, estimate_bytes=estimate(fcn_net, *(entry["tile_size"] or (n, n))).total)
            d_rows.append(entry)
            print(row(f"{n}x{n}", f"{entry['ran_as']} ({entry['tiles']})", f"{entry['seconds']:.2f}",
                      format_bytes(entry["worker_peak_bytes"]), format_bytes(entry["main_peak_bytes"])))
    results["d_sizes"] = d_rows

    # tiling overhead: whole at the largest size within the budget vs a tiled large image
    side = largest_square(fcn_net, budget, 32, 227, 8000)
    results["budget_largest_whole_side"] = side
    big = 4000 if args.quick else 8000
    runs = {}
    for label, n in (("whole_at_budget", side), ("tiled", big)):
        runs[label] = measured_run(fcn_card, image(n, n, 7), budget=budget)
    overhead = runs["tiled"]["seconds_per_cell"] / runs["whole_at_budget"]["seconds_per_cell"] - 1
    results["e_large"] = runs
    results["tiling_overhead"] = {"value": overhead, "target": "<= 0.30"}
    w, t = runs["whole_at_budget"], runs["tiled"]
    print(f"\n(e) {big}x{big} tiled under {format_bytes(budget)}, against the largest whole image "
          f"that fits ({side}x{side})")
    print(row("run", "seconds", "ms per cell", "worker peak", "sum of peaks"))
    for label, r in runs.items():
        print(row(f"{label} {r['size']}px {r['ran_as']} ({r['tiles']})", f"{r['seconds']:.1f}",
                  f"{1000 * r['seconds_per_cell']:.3f}", format_bytes(r["worker_peak_bytes"]),
                  format_bytes(r["sum_peak_bytes"])))
    print(row("tiling overhead per cell", f"{100 * overhead:.1f}%", "target <= 30%"))
    print(row(f"{big}px peak RSS, both processes", format_bytes(t["sum_peak_bytes"]), "target < 3 GiB"))
    results["g_stride"] = stride_rows(fcn_card, max(5, args.repeats // 3))
    results["h_end_to_end"] = end_to_end_rows(conv.outputs["card"], args.max_memory, budget,
                                              *((2000, 3000) if args.quick else (7000, 10000)), tmp)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
