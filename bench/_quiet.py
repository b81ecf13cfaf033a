"""The quiet-box rule every benchmark in ``bench/`` follows: no timing on a busy machine.

A timing taken beside other jobs is worth nothing (figures recorded at load 7-95 on the 2-core build box were off
by 15-26x), so a benchmark calls :func:`from_args` before it measures anything:

* the 1-minute load average must be below ``--max-load`` (default :data:`MAX_LOAD_1M` = 1.5) when it starts;
  ``--wait-quiet S`` polls for up to S seconds for that to happen;
* otherwise it refuses (exit status 3), unless ``--allow-loaded`` is given: then it runs and every result it
  writes says ``"quiet": {"valid": false, ...}``. Such results never belong in ``bench/results/``.

What comes back (and goes into the results) records the load at the start; :func:`finish` adds the load at the
end and the CPU it ran on (:func:`cpu_model`: two boxes both called "AMD EPYC", one with AVX512-BF16 and one
without, differed 1.8-2.9x). Ratios against a limit measured in the same process and minute (a matmul peak, the
previous code path, interleaved) stay meaningful under mild load; absolute figures do not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

MAX_LOAD_1M = 1.5
REFUSED = 3  # exit status of a refused benchmark


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded to 2 decimals."""
    return [round(v, 2) for v in os.getloadavg()]


def cpu_ticks() -> tuple[int, int] | None:
    """(total, steal) jiffies of all CPUs from /proc/stat, or None where there is none. Steal is time the
    hypervisor gave this VM's CPUs to someone else: invisible in the load average, it slows a timing all the
    same."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]), (fields[7] if len(fields) > 7 else 0)


def cpu_model() -> str:
    """The CPU's model name, family/model numbers and the SIMD that decides its speed, e.g. ``AMD EPYC (family
    23 model 49; avx2)``: a model name alone does not tell a Zen 2 from a Zen 4."""
    try:
        head = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return "unknown"
    f = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in head.splitlines() if ":" in line)}
    simd = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in f.get("flags", "").split()]
    where = f"family {f.get('cpu family', '?')} model {f.get('model', '?')}"
    return f"{f.get('model name', '?')} ({where}; {' '.join(simd) or 'no avx2'})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max-load``, ``--wait-quiet`` and ``--allow-loaded`` (every benchmark takes them)."""
    g = parser.add_argument_group("quiet box (bench/_quiet.py)")
    g.add_argument("--max-load", type=float, default=MAX_LOAD_1M,
                   help=f"refuse when the 1-minute load average is at or above this (default {MAX_LOAD_1M})")
    g.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="poll up to S seconds for a quiet box before refusing (default 0)")
    g.add_argument("--allow-loaded", action="store_true",
                   help="run anyway on a busy box; results are marked quiet.valid=false")


def gate(what: str, max_load: float = MAX_LOAD_1M, wait_s: float = 0.0, allow_loaded: bool = False,
         poll_s: float = 20.0) -> dict[str, Any]:
    """Check (and optionally wait for) a quiet box; raise ``SystemExit(3)`` when loaded unless allowed.

    Returns ``{"valid", "max_load_1m", "load_average_at_start", "waited_s"}``.
    """
    t0 = time.monotonic()
    load = load_average()
    while load[0] >= max_load and time.monotonic() - t0 < wait_s:
        time.sleep(min(poll_s, max(0.0, wait_s - (time.monotonic() - t0))) or 0.1)
        load = load_average()
    info = {"valid": load[0] < max_load, "max_load_1m": max_load, "load_average_at_start": load,
            "waited_s": round(time.monotonic() - t0, 1), "_ticks": cpu_ticks()}
    if not info["valid"]:
        msg = (f"{what}: 1-minute load average {load[0]} >= {max_load} (load {load}); a timing on a busy box "
               f"is not a measurement.")
        if not allow_loaded:
            print(msg + " Refusing: wait for a quiet box (--wait-quiet S) or mark the result invalid "
                  "(--allow-loaded).", file=sys.stderr, flush=True)
            raise SystemExit(REFUSED)
        print(msg + " Running anyway (--allow-loaded): results are marked quiet.valid=false.", file=sys.stderr,
              flush=True)
    else:
        print(f"{what}: quiet box (1-minute load {load[0]} < {max_load}, waited {info['waited_s']} s): measuring",
              file=sys.stderr, flush=True)
    return info


def from_args(args: argparse.Namespace, what: str, allow_loaded: bool = False) -> dict[str, Any]:
    """:func:`gate` with the options of :func:`add_arguments` (``allow_loaded`` forces the permissive mode)."""
    return gate(what, args.max_load, args.wait_quiet, allow_loaded or args.allow_loaded)


def finish(info: dict[str, Any], max_end_load: float | None = None) -> dict[str, Any]:
    """A copy of ``info`` with the load at the end. With ``max_end_load``, a run whose 1-minute load rose to it
    (another job started meanwhile) is marked invalid too."""
    out = dict(info)
    out["load_average_at_end"] = load_average()
    out["cpu"] = cpu_model()
    start, end = out.pop("_ticks", None), cpu_ticks()
    if start and end and end[0] > start[0]:
        out["cpu_steal_fraction"] = round((end[1] - start[1]) / (end[0] - start[0]), 4)
    if max_end_load is not None and out["load_average_at_end"][0] >= max_end_load:
        out["valid"] = False
        out["invalid_reason"] = f"1-minute load reached {out['load_average_at_end'][0]} during the run"
    return out
