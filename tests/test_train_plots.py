"""``tnlbt plot``: curves from metrics.jsonl; malformed lines are skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tnlbt.train.plots import plot_run, read_metrics


def test_plot_skips_bad_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"kind": "train", "epoch": 0, "step": s, "loss/retrieval": 1.0 / s,
                         "margin": 0.05 + s / 100, "lr": 1e-3}) for s in range(1, 6)]
    lines += ["{not json", "[1, 2]", json.dumps({"kind": "val", "epoch": 0, "step": 5, "val/R@1": 0.2,
                                                  "val/medR": 4.0})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    recs, bad = read_metrics(tmp_path / "metrics.jsonl")
    assert len(recs) == 6 and bad == 2
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 5000


def test_plot_missing_metrics(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        plot_run(tmp_path)
