"""Mixed precision: which autocast dtype a run uses, and the one context that applies it.

:func:`resolve_precision` turns ``train.precision`` into a dtype (or None for fp32); :func:`maybe_autocast` is the
context the training step (:class:`tnlbt.train.step.TrainStep`) and validation
(:func:`tnlbt.train.validation.embed_rows`) wrap their forward passes in.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """True when the CPU advertises bf16 matrix/vector units (AVX512-BF16 or AMX-BF16) in /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the forward passes, or None for fp32.

    ``auto``: bf16 on CUDA devices that support it; on CPU bf16 when the CPU has bf16 units, else fp32.
    Measured on the quiet 2-core build box (AMD EPYC, AVX512-BF16, no AMX), interleaved in one run: the demo_cpu
    paired step runs 1.44 x faster under bf16 autocast than in fp32 (a 2048^3 GEMM alone: 398 against
    168 GFLOP/s; bench/results/train.json, ``step``), which is why ``auto`` takes bf16 on such CPUs. Without bf16
    units it must not: on a Zen 2 EPYC (AVX2 only) torch emulates bf16 GEMMs at ~1 GFLOP/s against fp32's
    83-100 (bench/results/train_zen2.json, ``peak``), so a forced ``bf16`` there is ~80x slower.
    Parameters, optimiser state and the losses stay fp32 (autocast only lowers matmuls/convs), so no loss scaling
    is needed. ``fp32`` / ``bf16`` force the choice (tests use fp32 for exact comparisons).
    """
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_bf16():
            log.warning("train.precision=bf16 on a CPU without bf16 units: torch emulates bf16 here (a GEMM ran ~80x "
                        "slower than fp32 on a Zen 2); precision auto or fp32 trains in fp32")
        return torch.bfloat16
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def maybe_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` on ``device``'s type at ``dtype``; a no-op context for ``dtype=None`` (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
