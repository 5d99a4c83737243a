#!/usr/bin/env python3
"""Benchmark a user's batch and every engine, side by side in one run (issue 21).

CaffeNet FCN with seeded weights (scripts/bench/bench_dense.py's set-up). Prints
tables and writes JSON (default bench_batch.json):

  (1) folders of JPEGs through `fcnify classify-map DIR --card CARD --out OUT --quiet`
      (the default engine and outputs) against a bare ONNX Runtime loop over the same
      images on fcnify's own exported .onnx (PIL decode, the card's preprocessing,
      session.run; one fresh process each). Throughput after start-up is
      (N - 1) / (wall for N images - wall for 1 image), for 64 images of 256 px and
      8 of 1024 px; the ratio is classify-map's over the bare loop's.
      Each row is given twice: by wall time, and by CPU time (user + system of the
      process), which other jobs on a shared machine disturb far less.
  (2) one 451-px image through `classify-map --out`: wall time from the shell
      (a fresh process; net loading, conversion check and outputs included).
  (3) every engine (caffe, torch, onnx, openvino f32, openvino bf16 where the CPU has
      AVX512-BF16/AMX) on the same inputs in interleaved rounds: bare forward passes
      inside the engine at 227/451/899/1795 px, GFLOP/s and its share of numpy's
      float32 matmul (sgemm) measured in the same rounds; bf16's speed-up over onnx
      and its argmax agreement with openvino f32 per size.
  (4) OpenVINO's memory: peak RSS of a fresh process per size (loading, and one
      DenseModel.run over what loading left) against the planner's openvino_memory().

The machine's CPU model and SIMD flags are printed and stored. --quick runs a
subset (16 and 4 images, 227/451 px, 2 rounds, no memory probe).
Usage: .venv/bin/python scripts/bench/bench_batch.py [--quick] [--out FILE]
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dense import conv_flops, hwm, numpy_gflops, reset_hwm, rss  # noqa: E402

FLAGS_SHOWN = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
               "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """CPU model and the SIMD flags that matter here, from /proc/cpuinfo."""
    model, flags = platform.processor(), set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    return {"model": model, "cpus": os.cpu_count(), "flags": [f for f in FLAGS_SHOWN if f in flags]}


def row(*cells, widths=(34, 16, 16, 16, 16, 16)) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))


# ------------------------------------------------------------------ set-up

def caffenet(tmp: Path):
    """(original prototxt, seeded weights, converted card path): CaffeNet as bench_dense.py makes it."""
    from fcnify.caffe.netdef import read_netdef
    from fcnify.convert import convert
    from fcnify.paths import caffe_source
    from fcnify.synthetic import write_random_caffemodel
    proto = caffe_source() / "models" / "bvlc_reference_caffenet" / "deploy.prototxt"
    weights = write_random_caffemodel(read_netdef(proto), tmp / "caffenet.caffemodel", seed=1)
    conv = convert(proto, weights, tmp / "caffenet", check=False)
    return proto, weights, conv.outputs["card"]


def folder(tmp: Path, name: str, count: int, side: int) -> Path:
    """`count` JPEGs of side x side px: crops of Caffe's cat.jpg at random places and scales."""
    from PIL import Image
    from fcnify.paths import caffe_source
    cat = Image.open(caffe_source() / "examples" / "images" / "cat.jpg").convert("RGB")
    rng = np.random.default_rng(side)
    out = tmp / name
    out.mkdir()
    for i in range(count):
        s = int(rng.integers(min(cat.size) // 2, min(cat.size)))
        x, y = int(rng.integers(0, cat.size[0] - s + 1)), int(rng.integers(0, cat.size[1] - s + 1))
        cat.crop((x, y, x + s, y + s)).resize((side, side), Image.BILINEAR).save(out / f"{i:03d}.jpg",
                                                                                 quality=90)
    return out


def subset(src: Path, n: int, tmp: Path) -> Path:
    """A folder with the first n images of src (symlinks)."""
    out = tmp / f"{src.name}_{n}"
    out.mkdir(exist_ok=True)
    for p in sorted(src.iterdir())[:n]:
        (out / p.name).symlink_to(p)
    return out


def wall(cmd: list[str], env: dict | None = None) -> float:
    """Wall time of a command from the shell's point of view (a fresh process)."""
    return timed(cmd, env)[0]


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds of a command in a fresh process: CPU is its user + system time,
    which other jobs on a shared machine disturb far less than the wall time."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# ------------------------------------------------------------------ (1) folders

def bare_loop(onnx_file: str, card_path: str, images: str) -> int:
    """--bare: a plain ONNX Runtime loop over a folder (decode, preprocess, run), nothing saved."""
    import onnxruntime as ort
    from PIL import Image
    from fcnify.io.models import read_card
    pre = read_card(card_path).preprocess
    options = ort.SessionOptions()
    session = ort.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for p in sorted(Path(images).iterdir()):
        rgb = np.asarray(Image.open(p).convert("RGB"))
        session.run(None, {name: pre.apply(rgb)[None]})
    return 0


def folder_rows(card: str, onnx_file: Path, tmp: Path, sets: list[tuple[int, int]], repeats: int) -> list[dict]:
    rows = []
    print("\n(1) a folder through classify-map (default engine and outputs) vs a bare ONNX Runtime loop;"
          f" wall of a fresh process, min of {repeats}; throughput = (N-1) / (t_N - t_1)")
    print(row("images", "classify-map t1", "classify-map tN", "bare t1", "bare tN", "ratio"))
    for count, side in sets:
        src = folder(tmp, f"img{side}", count, side)
        one = subset(src, 1, tmp)
        cli = [sys.executable, "-m", "fcnify", "classify-map"]
        times: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for key, cmd in (("cli1", cli + [str(one), "--card", card, "--quiet", "--force", "--out"]),
                         ("cliN", cli + [str(src), "--card", card, "--quiet", "--force", "--out"]),
                         ("bare1", [sys.executable, __file__, "--bare", str(onnx_file), card, str(one)]),
                         ("bareN", [sys.executable, __file__, "--bare", str(onnx_file), card, str(src)])):
            runs = []
            for i in range(repeats):
                out = tmp / f"out_{key}_{side}_{i}"
                runs.append(timed(cmd + [str(out)] if key.startswith("cli") else cmd))
            times[key] = min(r[0] for r in runs)
            cpu[key] = min(r[1] for r in runs)
        cli_rate = (count - 1) / max(times["cliN"] - times["cli1"], 1e-9)
        bare_rate = (count - 1) / max(times["bareN"] - times["bare1"], 1e-9)
        cli_cpu = (count - 1) / max(cpu["cliN"] - cpu["cli1"], 1e-9)
        bare_cpu = (count - 1) / max(cpu["bareN"] - cpu["bare1"], 1e-9)
        entry = {"images": count, "side_px": side, **{k: v for k, v in times.items()},
                 "cli_images_per_s": cli_rate, "bare_images_per_s": bare_rate, "ratio": cli_rate / bare_rate,
                 "cpu_seconds": cpu, "cli_images_per_cpu_s": cli_cpu, "bare_images_per_cpu_s": bare_cpu,
                 "cpu_ratio": cli_cpu / bare_cpu}
        rows.append(entry)
        print(row(f"{count} x {side} px", f"{times['cli1']:.2f} s", f"{times['cliN']:.2f} s",
                  f"{times['bare1']:.2f} s", f"{times['bareN']:.2f} s",
                  f"{100 * entry['ratio']:.0f}% ({cli_rate:.1f} vs {bare_rate:.1f}/s)"))
        print(row("  same, CPU seconds", f"{cpu['cli1']:.2f} s", f"{cpu['cliN']:.2f} s",
                  f"{cpu['bare1']:.2f} s", f"{cpu['bareN']:.2f} s",
                  f"{100 * entry['cpu_ratio']:.0f}% ({cli_cpu:.1f} vs {bare_cpu:.1f}/CPU-s)"))
    return rows


def startup_rows(card: str, tmp: Path, repeats: int) -> dict:
    """(2): one 451-px image through classify-map --out, from the shell."""
    src = folder(tmp, "one451", 1, 451)
    cmd = [sys.executable, "-m", "fcnify", "classify-map", str(next(src.iterdir())), "--card", card, "--quiet",
           "--force", "--out"]
    runs = [wall(cmd + [str(tmp / f"out451_{i}")]) for i in range(repeats)]
    print(f"\n(2) one 451-px image, classify-map --out, wall from the shell: min {min(runs):.2f} s, "
          f"median {float(np.median(runs)):.2f} s over {repeats}")
    return {"seconds": runs, "min_s": min(runs), "median_s": float(np.median(runs))}


# ------------------------------------------------------------------ (3) engines

def engine_list(quick: bool) -> list[tuple[str, str, str]]:
    """(label, engine, precision) for every engine installed here; bf16 where the CPU has it."""
    from fcnify.engines import ENGINES
    from fcnify.engines.cpu import bf16_flags
    out = [(n, n, "f32") for n in ("caffe", "torch", "onnx", "openvino") if ENGINES[n].installed()]
    if bf16_flags() and ENGINES["openvino"].installed():
        out.append(("openvino bf16", "openvino", "bf16"))
    return out


def engines_rows(card_path: str, sizes: list[int], repeats: int, quick: bool) -> dict:
    from fcnify.caffe.netdef import read_netdef
    from fcnify.engines import make_engine
    from fcnify.io.models import read_card
    card = read_card(card_path)
    net = read_netdef(card.model_def).param
    xs = {n: np.random.default_rng(n).normal(0, 60, (1, 3, n, n)).astype(np.float32) for n in sizes}
    labels = engine_list(quick)
    nets = {}
    for label, name, precision in labels:
        nets[label] = make_engine(name, precision=precision).load(card.model_def, card.weights)
    outputs: dict = {label: {} for label, _, _ in labels}
    for label, _, _ in labels:  # warm-up (OpenVINO compiles each shape on first use)
        for n in sizes:
            outputs[label][n] = nets[label].timed_forward({"data": xs[n]}, ["fc8-conv"], 0)[0]["fc8-conv"]
    times: dict = {label: {n: [] for n in sizes} for label, _, _ in labels}
    sgemm = []
    for _ in range(repeats):
        sgemm.append(numpy_gflops(repeats=2))
        for label, _, _ in labels:
            for n in sizes:
                times[label][n] += nets[label].timed_forward({"data": xs[n]}, ["fc8-conv"], 1)[1]
    for n_ in nets.values():
        n_.close()
    matmul = float(np.median(sgemm))
    out: dict = {"sgemm_gflops": matmul, "sgemm_rounds": sgemm, "sizes": sizes, "engines": {}}
    print(f"\n(3) engines, bare forward of the CaffeNet FCN, median of {repeats} interleaved rounds; "
          f"numpy float32 matmul {matmul:.0f} GFLOP/s in the same rounds")
    print(row("engine", *[f"{n} px" for n in sizes]))
    for label, _, precision in labels:
        t = {n: float(np.median(times[label][n])) for n in sizes}
        gf = {n: conv_flops(net, n, n) / t[n] / 1e9 for n in sizes}
        out["engines"][label] = {"precision": precision, "forward_s": t, "gflops": gf,
                                 "share_of_sgemm": {n: gf[n] / matmul for n in sizes}}
        print(row(label, *[f"{1000 * t[n]:.1f} ms" for n in sizes]))
        print(row("  GFLOP/s (share of sgemm)", *[f"{gf[n]:.0f} ({100 * gf[n] / matmul:.0f}%)" for n in sizes]))
    if "openvino bf16" in outputs and "onnx" in out["engines"]:
        speed = {n: out["engines"]["onnx"]["forward_s"][n] / out["engines"]["openvino bf16"]["forward_s"][n]
                 for n in sizes}
        agree = {n: float((outputs["openvino"][n].argmax(1) == outputs["openvino bf16"][n].argmax(1)).mean())
                 for n in sizes}
        err = {n: float(np.abs(outputs["openvino"][n] - outputs["openvino bf16"][n]).max()) for n in sizes}
        scale = {n: float(np.abs(outputs["openvino"][n]).max()) for n in sizes}
        out["bf16"] = {"speedup_over_onnx": speed, "argmax_agreement_vs_f32": agree,
                       "max_score_difference": err, "max_abs_score": scale}
        print(row("bf16 speed-up over onnx", *[f"{speed[n]:.2f}x" for n in sizes]))
        print(row("bf16 argmax = openvino f32", *[f"{100 * agree[n]:.1f}% of cells" for n in sizes]))
        print(row("bf16 largest score diff", *[f"{err[n]:.2f} of {scale[n]:.0f}" for n in sizes]))
    return out


# ------------------------------------------------------------------ (4) OpenVINO's memory

def probe_memory(n: int, card_path: str) -> int:
    """--probe-memory: in a fresh process, peak RSS of loading the FCN into OpenVINO and of one
    n x n DenseModel.run, each over the RSS before it (JSON on stdout)."""
    import fcnify.engines.openvino_engine  # noqa: F401 - imports are not the net's memory
    from fcnify.dense.dense import DenseModel
    from fcnify.io.models import read_card
    card = read_card(card_path)
    img = np.random.default_rng(n).integers(0, 256, (n, n, 3), dtype=np.uint8)
    before = rss()
    reset_hwm()
    model = DenseModel(card, engine="openvino")
    loading = hwm() - before
    before_run = rss()
    reset_hwm()
    model.run(img, tile=n)
    print(json.dumps({"size": n, "load_bytes": loading, "held_bytes": before_run - before,
                      "run_bytes": hwm() - before_run}))
    return 0


def memory_rows(card_path: str, sizes: list[int]) -> list[dict]:
    from fcnify.caffe.netdef import read_netdef
    from fcnify.caffe.planner import format_bytes
    from fcnify.engines.openvino_engine import openvino_memory
    from fcnify.io.models import read_card
    net = read_netdef(read_card(card_path).model_def).param
    rows = []
    print("\n(4) OpenVINO's memory, a fresh process per size: loading, what stays, one pass over it; "
          "against openvino_memory()")
    print(row("size", "load peak", "held", "run peak", "peak", "planner (ratio)"))
    for n in sizes:
        probe = subprocess.run([sys.executable, __file__, "--probe-memory", str(n), card_path],
                               capture_output=True, text=True, check=True)
        got = json.loads(probe.stdout.strip().splitlines()[-1])
        est = openvino_memory(net, n, n)
        peak = max(got["load_bytes"], got["held_bytes"] + got["run_bytes"])
        modelled = est.total  # openvino_memory(base=0): OpenVINO's plugin, in the measured growth too
        rows.append({**got, "peak_bytes": peak, "planner_bytes": modelled, "params_bytes": est.params,
                     "activations_bytes": est.activations, "ratio": peak / modelled})
        print(row(f"{n}x{n}", format_bytes(got["load_bytes"]), format_bytes(got["held_bytes"]),
                  f"+{format_bytes(got['run_bytes'])}", format_bytes(peak),
                  f"{format_bytes(modelled)} ({peak / modelled:.2f})"))
    return rows


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--bare":
        return bare_loop(*sys.argv[2:])
    if len(sys.argv) == 4 and sys.argv[1] == "--probe-memory":
        return probe_memory(int(sys.argv[2]), sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_batch.json")
    ap.add_argument("--quick", action="store_true", help="16 and 4 images, 227/451 px, 2 rounds, no memory")
    ap.add_argument("--only", choices=["folders", "startup", "engines", "memory"], help="one section")
    ap.add_argument("--repeats", type=int, default=None, help="rounds of (3) (default 5; 2 with --quick)")
    args = ap.parse_args()
    quick = args.quick
    from fcnify.engines import resolve_engine
    results: dict = {"cpu": cpu_info(), "python": platform.python_version(), "platform": platform.platform(),
                     "default_engine": resolve_engine(), "command": " ".join(sys.argv)}
    try:
        import openvino
        results["openvino"] = openvino.__version__
    except ImportError:
        pass
    print(f"CPU: {results['cpu']['model']}, {results['cpu']['cpus']} CPUs; flags: {' '.join(results['cpu']['flags'])}")
    print(f"default engine (auto): {results['default_engine']}")
    tmp = Path(tempfile.mkdtemp(prefix="fcnify-bench-batch-"))
    atexit.register(shutil.rmtree, tmp, True)  # seeded weights and maps: hundreds of MB
    _, _, card = caffenet(tmp)
    card = str(card)
    want = lambda s: args.only in (None, s)  # noqa: E731
    if want("folders"):
        from fcnify.export import export_onnx
        from fcnify.io.models import read_card
        onnx_file = tmp / "caffenet.onnx"
        export_onnx(read_card(card), onnx_file, check=False)
        sets = [(16, 256), (4, 1024)] if quick else [(64, 256), (8, 1024)]
        results["folders"] = folder_rows(card, onnx_file, tmp, sets, 1 if quick else 2)
    if want("startup"):
        results["startup_451"] = startup_rows(card, tmp, 2 if quick else 3)
    if want("engines"):
        sizes = [227, 451] if quick else [227, 451, 899, 1795]
        results["engines"] = engines_rows(card, sizes, args.repeats or (2 if quick else 5), quick)
    if want("memory") and not quick:
        results["openvino_memory"] = memory_rows(card, [451, 899, 1795])
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
