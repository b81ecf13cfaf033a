"""The run directory as the training loop writes it: :class:`MetricsWriter` (``metrics.jsonl`` and TensorBoard)
and :class:`RunFiles` (a local run directory, or a remote one staged locally and published whole files at a time).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tnlbt import storage
from tnlbt.train import checkpoint as ckpt_mod

log = logging.getLogger(__name__)


def _append_line(path: Path, line: bytes) -> None:
    """Append one whole line or nothing: a write cut short (a full disk) is truncated away and re-raised, so
    the log never holds half a record that the next append would glue to a whole one (two records lost)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"short write to {path} ({written} of {len(line)} bytes)")
        except OSError:
            os.ftruncate(fd, start)  # shrinking needs no space
            raise
    finally:
        os.close(fd)


def _drop_partial_line(path: Path) -> None:
    """A process killed mid-append can still leave a tail without its newline: cut it before appending."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            log.warning("%s: dropped an incomplete last line left by an interrupted write", path)


class MetricsWriter:
    """Rank-0 sink: ``metrics.jsonl`` (append) and TensorBoard events under ``RUN/tb``.

    ``run_dir`` is a local folder (a remote run's staging folder, see :class:`RunFiles`); None when disabled.
    """

    def __init__(self, run_dir: Path | None, enabled: bool) -> None:
        self.enabled = enabled and run_dir is not None
        self._tb = None
        self._path = run_dir / "metrics.jsonl" if run_dir is not None else None
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self._path)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except Exception as e:  # tensorboard missing or broken: JSONL still works
                log.warning("TensorBoard disabled: %s", e)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        _append_line(self._path, (json.dumps(record, default=float) + "\n").encode())
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k in ("kind", "step", "epoch") or not isinstance(v, int | float) or isinstance(v, bool):
                    continue
                tag = k if "/" in k else f"{record.get('kind', 'train')}/{k}"
                self._tb.add_scalar(tag, float(v), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class RunFiles:
    """The run directory ``{runs_dir}/{run_name}`` as the loop writes it (a local path or a remote URI).

    Local run directory: ``local`` *is* the run directory and every ``publish_*`` method is a no-op, so a
    local run writes exactly what it always did (``metrics.jsonl`` appended line by line, checkpoints renamed
    into place, ``best`` copied from ``last``).

    Remote run directory (rank 0): the loop writes into ``local``, a staging folder under
    ``storage.cache_dir()/staging`` (else the system temp dir), created fresh for every process and deleted by
    :meth:`close`, and publishes from there. Why a staging folder: object stores have no append (the JSONL log,
    TensorBoard's event files), no rename (the checkpoint swap), and ``safetensors``/``torch.save`` want local
    files. What is published, and when:

    * ``metrics.jsonl``: the whole file is rewritten (no appends on S3) at every epoch end and step
      checkpoint, on :meth:`close` (also after a crash, so the records of lost steps are kept as they are
      locally), and at most every ``publish_every_s`` seconds after a log line (a live view without rewriting
      a growing file on every step). The staging copy starts from the remote one, so a resumed run -- a rerun
      with the same name, or a Ray worker group restarted on another node -- keeps its history.
    * ``tb/`` (whole event files) and ``curves.png`` (rendered by :func:`tnlbt.train.plots.plot_run`) at every
      epoch end: with nothing on local disk to point ``tnlbt plot`` or TensorBoard at, the bucket itself shows
      the curves. Local runs do not render the PNG (``tnlbt plot RUN`` reads the live ``metrics.jsonl``).
    * checkpoints with :func:`tnlbt.train.checkpoint.upload_checkpoint` (``train_state.pt`` last). Metrics are
      published *before* a checkpoint, so a crash in between leaves duplicated records after the resume
      (as locally), never a checkpoint whose epoch is missing from the log.

    Other ranks of a remote run write nothing (``local`` is None).
    """

    METRICS = "metrics.jsonl"

    def __init__(self, uri: str | Path, is_main: bool, publish_every_s: float = 60.0) -> None:
        self.uri = os.fspath(uri)
        self.remote = storage.is_remote(self.uri)
        self.is_main = is_main
        self.publish_every_s = publish_every_s
        self._tmp: str | None = None
        self._last_publish = time.monotonic()
        self.local: Path | None
        if not self.remote:
            self.local = Path(uri) if storage.scheme(self.uri) == "" else Path(storage.local_path(self.uri) or uri)
        elif is_main:
            self._tmp = tempfile.mkdtemp(prefix="tnlbt-run-", dir=ckpt_mod.staging_root())
            self.local = Path(self._tmp)
            src = storage.join(self.uri, self.METRICS)
            if storage.exists(src):
                (self.local / self.METRICS).write_bytes(storage.read_bytes(src))
        else:
            self.local = None

    def join(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    # fault injection marker (tests): on the run directory itself, so a restarted process sees it
    def fail_marker_exists(self) -> bool:
        if not self.remote:
            return (self.local / ".fail_injected").exists()
        return storage.exists(self.join(".fail_injected"))

    def write_fail_marker(self, text: str) -> None:
        if not self.remote:
            marker = self.local / ".fail_injected"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(text)
        else:
            storage.write_text(self.join(".fail_injected"), text)

    def publish_metrics(self, force: bool = True) -> None:
        """Rewrite the remote ``metrics.jsonl`` from the staging copy (remote rank 0 only)."""
        if not (self.remote and self.is_main):
            return
        if not force and time.monotonic() - self._last_publish < self.publish_every_s:
            return
        path = self.local / self.METRICS
        if path.exists():
            storage.write_bytes(self.join(self.METRICS), path.read_bytes())
        self._last_publish = time.monotonic()

    def publish_epoch(self) -> None:
        """Epoch end: ``metrics.jsonl``, ``tb/`` and a fresh ``curves.png`` (remote rank 0 only)."""
        if not (self.remote and self.is_main):
            return
        self.publish_metrics()
        tb = self.local / "tb"
        if tb.is_dir() and any(tb.iterdir()):
            storage.upload_dir(tb, self.join("tb"))
        try:
            from tnlbt.train.plots import plot_run

            png = plot_run(self.local)
            storage.write_bytes(self.join(png.name), png.read_bytes())
        except Exception as e:  # a plot must never stop a training run
            log.warning("curves.png not published: %s: %s", type(e).__name__, e)

    def publish_checkpoint(self, local_ckpt: Path, name: str) -> None:
        """``checkpoints/{name}`` from a local checkpoint folder. Local runs: ``best`` is copied from ``last``
        (temp folder + rename, as before); ``last`` is already in place."""
        if not self.remote:
            dst = self.local / "checkpoints" / name
            if Path(local_ckpt).resolve() != dst.resolve():
                ckpt_mod.copy_checkpoint(local_ckpt, dst)
            return
        if self.is_main:
            ckpt_mod.upload_checkpoint(local_ckpt, self.join("checkpoints", name))

    def close(self) -> None:
        """Publish ``metrics.jsonl`` one last time and delete the staging folder.

        Best effort: it also runs while an exception propagates (a crash), which a failed upload must not mask.
        """
        try:
            self.publish_metrics()
        except Exception as e:
            log.warning("metrics.jsonl not published to %s: %s: %s", self.uri, type(e).__name__, e)
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
