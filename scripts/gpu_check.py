#!/usr/bin/env python3
"""GPU check for the torch and onnx engines: CaffeNet on CUDA equals CaffeNet on the CPU, and how fast.

Runs fcnify's CaffeNet definition (prototxt/caffenet/deploy.prototxt) with
seeded He-scaled weights, converted to a fully-convolutional net (checked on
the CPU), at each --sizes input (default 227, 451 and 2000 px) with each of
--engines (default torch,onnx: PyTorch, and ONNX Runtime's CUDA execution
provider) on the CPU and on CUDA GPU --gpu, and prints a table: map size,
first and median forward time, and the largest relative difference of the
GPU's scores and probabilities from the same engine's CPU result (TF32 off;
fcnify's bar is 1e-4). Then the time ratio 451 px / 227 px per engine and
device. Writes the same as JSON.

Needs only torch (and onnx + onnxruntime-gpu for the onnx rows), numpy,
protobuf, click and pillow (no pycaffe) plus
Caffe's compiled caffe.proto: pass --descriptor (or FCNIFY_CAFFE_DESCRIPTOR)
with a copy of the caffe.desc that scripts/setup.sh made. Without a usable
GPU it prints the CPU rows and says why the GPU rows were skipped.

    python scripts/gpu_check.py --descriptor .device/caffe.desc --json gpu_check.json
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", type=int, default=0, help="CUDA device number (default 0)")
    p.add_argument("--sizes", default="227,451,2000", help="input sizes in px, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per row after the first")
    p.add_argument("--cpu-repeats", type=int, default=1, help="timed passes per CPU row")
    p.add_argument("--descriptor", type=Path, help="compiled caffe.proto (default: set-up's record)")
    p.add_argument("--model-def", type=Path, default=REPO / "prototxt" / "caffenet" / "deploy.prototxt")
    p.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where to write the results")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--engines", default="torch,onnx", help="engines to run, comma-separated")
    return p.parse_args(argv)


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A seeded 8-bit RGB image with structure at several scales (as verify.py's inputs)."""
    from fcnify.io.images import resize
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = resize(small, height, width).astype(np.int16)
    return np.clip(img + rng.integers(-20, 21, size=img.shape), 0, 255).astype(np.uint8)


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a64 - b64).max() / max(np.abs(a64).max(), np.finfo(np.float32).tiny))


def gpu_problem(gpu: int) -> str | None:
    """Why CUDA GPU `gpu` cannot be used here, or None."""
    from fcnify.errors import DeviceError
    from fcnify.engines.torch_engine import cuda_device
    try:
        cuda_device(gpu)
    except DeviceError as exc:
        return exc.message
    return None


def measure(net, x: np.ndarray, blobs: list[str], repeats: int) -> tuple[dict, float, list[float]]:
    """(outputs, first pass seconds, timed pass seconds): the first pass includes warm-up."""
    import torch
    t0 = time.perf_counter()
    out = net.forward({"data": x}, blobs)
    device = getattr(net, "device", None)  # the torch engine's; ONNX Runtime returns when done
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - t0
    _, times = net.timed_forward({"data": x}, blobs, repeats) if repeats else (None, [])
    return out, first, times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.descriptor:
        os.environ["FCNIFY_CAFFE_DESCRIPTOR"] = str(args.descriptor.resolve())
    import torch
    from fcnify.surgery.bound import score_layer, within
    from fcnify.caffe.caffemodel import read_weights
    from fcnify.convert import convert
    from fcnify.io.models import read_card
    from fcnify.caffe.netdef import read_netdef
    from fcnify.synthetic import write_random_caffemodel
    from fcnify.engines.torch_engine import TorchRunner

    torch.backends.cuda.matmul.allow_tf32 = False  # the engine also does this around each pass
    torch.backends.cudnn.allow_tf32 = False
    sizes = [int(s) for s in args.sizes.split(",") if s]
    problem = gpu_problem(args.gpu)
    gpu_name = None if problem else torch.cuda.get_device_name(args.gpu)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.get_num_threads()} CPU threads, "
          f"{platform.processor() or platform.machine()}; GPU: {gpu_name or 'none'}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="fcnify-gpu-check-"))
    atexit.register(shutil.rmtree, work, True)  # seeded weights and maps: hundreds of MB
    t0 = time.perf_counter()
    weights = write_random_caffemodel(read_netdef(args.model_def), work / "caffenet_seeded.caffemodel",
                                      seed=args.seed)
    card = read_card(args.model_def.parent / "model.json") if (args.model_def.parent / "model.json").is_file() \
        else None
    result = convert(args.model_def, weights, work / "caffenet", runner=TorchRunner(), card=card)
    report = result.report
    print(f"converted with seeded weights in {time.perf_counter() - t0:.1f} s; check on the CPU: "
          f"{'EQUIVALENT' if report.equivalent else 'NOT EQUIVALENT'} "
          f"(worst {max(c.fraction for c in report.comparisons):.2e} of the float32 bound)", flush=True)
    fcn = read_card(result.outputs["card"])
    score, prob = "fc8-conv", "prob"
    scores = score_layer(read_netdef(fcn.model_def).param, score, read_weights(fcn.weights))

    devices, skipped_engines = engine_devices(args, problem)
    rows, cpu_out = [], {}
    for engine, device, runner, repeats in devices:
        net = runner.load(fcn.model_def, fcn.weights)
        if device != "cpu" and engine == "torch":
            torch.cuda.reset_peak_memory_stats(args.gpu)
        for size in sizes:
            x = fcn.preprocess.apply(smooth_image(size, size, seed=size))[None]
            out, first, times = measure(net, x, [score, prob, scores.bottom], repeats)
            row = {"engine": engine, "device": device, "size": size,
                   "map": list(out[score].shape[2:]), "first_s": round(first, 4),
                   "median_s": round(statistics.median(times), 4) if times else None, "repeats": len(times)}
            if device == "cpu":
                cpu_out[engine, size] = out
            else:
                ref = cpu_out[engine, size]
                row["max_rel_scores_vs_cpu"] = max_rel(ref[score], out[score])
                row["max_rel_probs_vs_cpu"] = max_rel(ref[prob], out[prob])
                row["bound_used_vs_cpu"] = within(ref[score], out[score], scores.tolerance(ref[scores.bottom]))[1]
                row["argmax_agrees"] = bool((ref[prob].argmax(1) == out[prob].argmax(1)).all())
            rows.append(row)
            print_row(row, header=len(rows) == 1)
        if device != "cpu" and engine == "torch":
            rows[-1]["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated(args.gpu))
        net.close()

    ratios, cells = {}, {}
    for engine, device, _, _ in devices:
        by = {r["size"]: r for r in rows if r["device"] == device and r["engine"] == engine}
        if 227 in by and 451 in by:
            t = lambda r: r["median_s"] or r["first_s"]  # noqa: E731
            ratios[f"{engine} {device}"] = round(t(by[451]) / t(by[227]), 2)
            cells = {s: by[s]["map"][0] * by[s]["map"][1] for s in (227, 451)}
    print()
    for where, ratio in ratios.items():
        print(f"time 451 px / 227 px, {where}: {ratio}x (for {cells[451]} map cells instead of "
              f"{cells[227]}; {451 * 451 / 227 ** 2:.2f}x the pixels)")
    reasons = ([f"GPU rows skipped: {problem}"] if problem is not None else []) + skipped_engines
    skipped = "; ".join(reasons) or None
    if skipped:
        print(skipped)
    worst = max((r.get("bound_used_vs_cpu", 0.0) for r in rows), default=0.0)
    ok = problem is not None or worst <= 1.0  # the float32 bound of docs/verify.md
    data = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu_name, "skipped": skipped,
            "cpu_threads": torch.get_num_threads(), "model_def": str(args.model_def), "seed": args.seed,
            "conversion_equivalent": report.equivalent, "rows": rows, "ratio_451_over_227": ratios,
            "worst_bound_used_vs_cpu": worst, "ok": ok}
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if ok else 1


def engine_devices(args, problem: str | None) -> tuple[list, list[str]]:
    """(engine, device, runner, repeats) to run, and why any engine or GPU row is left out."""
    from fcnify.errors import FcnifyError
    from fcnify.engines.torch_engine import TorchRunner
    devices, skipped = [], []
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        if engine == "torch":
            devices.append((engine, "cpu", TorchRunner(None), args.cpu_repeats))
            if problem is None:
                devices.append((engine, f"cuda:{args.gpu}", TorchRunner(args.gpu), args.repeats))
        elif engine == "onnx":
            from fcnify.engines.onnx_engine import OnnxRunner
            try:
                devices.append((engine, "cpu", OnnxRunner(None), args.cpu_repeats))
                devices.append((engine, f"cuda:{args.gpu}", OnnxRunner(args.gpu), args.repeats))
            except FcnifyError as exc:  # no onnxruntime, or one without the CUDA provider
                skipped.append(f"onnx: {exc.message}")
        else:
            skipped.append(f"{engine}: not an engine this check runs (torch, onnx)")
    return devices, skipped


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"\n{'engine':6} {'device':7} {'size':>5} {'map':>7} {'first s':>8} {'median s':>9} "
              f"{'rel scores':>11} {'rel probs':>10} {'of bound':>9}")
    rel = lambda k: f"{row[k]:.2e}" if k in row else "-"  # noqa: E731
    med = f"{row['median_s']:.4f}" if row["median_s"] is not None else "-"
    print(f"{row['engine']:6} {row['device']:7} {row['size']:5d} {'x'.join(map(str, row['map'])):>7} "
          f"{row['first_s']:8.4f} {med:>9} {rel('max_rel_scores_vs_cpu'):>11} "
          f"{rel('max_rel_probs_vs_cpu'):>10} {rel('bound_used_vs_cpu'):>9}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
