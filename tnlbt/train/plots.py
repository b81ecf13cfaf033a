"""``tnlbt plot RUN``: training curves (loss terms, margin, learning rate, validation R@1 / medR) as one PNG.

Reads ``RUN/metrics.jsonl`` written by the training loop: one JSON object per line with ``kind`` = ``train``
(rank-0 step summaries: ``loss/<term>``, ``margin``, ``lr``, ``samples_per_s``) or ``val`` (epoch-end
``val/R@1``, ``val/medR``, ...). Malformed lines are skipped and counted.

The run directory may be a remote URI (``tnlbt plot s3://bucket/runs/RUN``): ``metrics.jsonl`` is read and the
PNG written through :mod:`tnlbt.storage` (rendered in memory, uploaded as one object).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from tnlbt import storage

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a ``metrics.jsonl`` (local path or URI) and the number of lines that could not be parsed."""
    records: list[dict[str, Any]] = []
    bad = 0
    text = Path(path).read_text() if storage.scheme(path) == "" else storage.read_text(path)
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | str:
    """Write the curves of a run to ``out`` (default ``RUN/curves.png``) and return the path.

    ``run_dir`` and ``out`` may be URIs; the return value is then the URI string.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers / CI
    import matplotlib.pyplot as plt

    remote_run = storage.scheme(run_dir) != ""
    if remote_run:
        mpath: str | Path = storage.join(os.fspath(run_dir), "metrics.jsonl")
        found = storage.exists(mpath)
        name = os.fspath(run_dir).rstrip("/").rsplit("/", 1)[-1]
    else:
        run_dir = Path(run_dir)
        mpath = run_dir / "metrics.jsonl"
        found = mpath.exists()
        name = run_dir.name
    if not found:
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (is it a training run directory?)")
    records, bad = read_metrics(mpath)
    if bad:
        log.warning("skipped %d malformed lines in %s", bad, mpath)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    terms = sorted({k for r in train for k in r if k.startswith("loss/")})
    for t in terms:
        xs = [r["step"] for r in train if t in r]
        ys = [r[t] for r in train if t in r]
        ax.plot(xs, ys, label=t.removeprefix("loss/"))
    ax.set_title("loss terms")
    ax.set_xlabel("step")
    ax.set_yscale("symlog", linthresh=1e-3)
    if terms:
        ax.legend(fontsize=7)

    ax = axes[0][1]
    ax.plot([r["step"] for r in train if "margin" in r], [r["margin"] for r in train if "margin" in r], label="margin")
    ax.set_title("margin and lr")
    ax.set_xlabel("step")
    ax2 = ax.twinx()
    ax2.plot(
        [r["step"] for r in train if "lr" in r], [r["lr"] for r in train if "lr" in r], color="tab:orange", label="lr"
    )
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)

    ax = axes[1][0]
    for key in ("val/R@1", "val/R@5", "val/R@10"):
        pts = [(r["epoch"], r[key]) for r in val if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=key)
    ax.set_title("validation recall (image->recipe, val split bags)")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)

    ax = axes[1][1]
    pts = [(r["epoch"], r["val/medR"]) for r in val if "val/medR" in r]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="o", color="tab:red")
    ax.set_title("validation medR (lower is better)")
    ax.set_xlabel("epoch")

    fig.suptitle(f"{name}: {len(train)} step records, {len(val)} val records")
    fig.tight_layout()
    if out is None:
        out = storage.join(os.fspath(run_dir), "curves.png") if remote_run else run_dir / "curves.png"
    if storage.scheme(out) == "":
        out = Path(out)
        fig.savefig(out, dpi=100)
    else:
        buf = io.BytesIO()
        fig.savefig(buf, dpi=100, format="png")
        out = os.fspath(out)
        storage.write_bytes(out, buf.getvalue())
    plt.close(fig)
    return out


def cli_plot(args: argparse.Namespace) -> int:
    out = plot_run(args.run, args.out)
    print(out)
    return 0
