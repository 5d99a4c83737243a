"""Reduced precision (--precision bf16): which engines offer it, and whether this CPU runs it.

bf16 keeps float32's exponent and 8 bits of significand (unit roundoff
u = 2^-8 instead of 2^-24): a bf16 map is close to the float32 one, not equal
to it, so it is opt-in, recorded in map.json, and judged by its own criterion
(docs/verify.md, "bf16"). Only CPUs with AVX512-BF16 or AMX-BF16 compute it
in hardware; elsewhere OpenVINO would silently emulate or fall back, so
fcnify refuses it with one line instead.

The CPU's flags come from /proc/cpuinfo; FCNIFY_CPU_FLAGS (space-separated
flags) replaces them, so a test, or a user who wants to see the refusal, can
present a CPU without bf16 (FCNIFY_CPU_FLAGS="avx2 avx512f").
"""
from __future__ import annotations

import os
from functools import lru_cache

from ..errors import ArgumentError

PRECISIONS = ("f32", "bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=4)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (FCNIFY_CPU_FLAGS, when set, stands in for /proc/cpuinfo's)."""
    given = os.environ.get("FCNIFY_CPU_FLAGS")
    return frozenset(given.split()) if given is not None else _cpuinfo_flags()


def bf16_flags() -> list[str]:
    """The bf16 flags this CPU has (empty: no bf16 in hardware)."""
    flags = cpu_flags()
    return [f for f in BF16_FLAGS if f in flags]


def check_precision(precision: str, engine: str, bf16_engines: list[str],
                    capabilities: frozenset[str] | None = None) -> None:
    """Refuse a precision the engine or this CPU cannot run, in one line (exit 2).

    `bf16_engines` are the engines that compute bf16 (engines.ENGINES rows with
    a `bf16` entry); `capabilities` is what the engine itself reports
    (OpenVINO's OPTIMIZATION_CAPABILITIES): BF16 must be among them too, when given.
    """
    if precision not in PRECISIONS:
        raise ArgumentError(f"--precision {precision}: one of {', '.join(PRECISIONS)}")
    if precision == "f32":
        return
    if engine not in bf16_engines:
        raise ArgumentError(f"--precision {precision}: the {engine} engine computes in float32 only; "
                            f"bf16 runs on --engine {' or '.join(bf16_engines)}")
    if not bf16_flags():
        raise ArgumentError(f"--precision {precision}: this CPU has neither AVX512-BF16 nor AMX-BF16 "
                            "(/proc/cpuinfo), so bf16 would be emulated; use the default f32")
    if capabilities is not None and "BF16" not in capabilities:
        raise ArgumentError(f"--precision {precision}: the {engine} engine reports no BF16 on this "
                            f"device (it has {', '.join(sorted(capabilities)) or 'none'})")
