"""The run directory's layout: where a run's checkpoints, index versions and machine-local state live.

::

    RUN/                          a local folder or a URI (s3://bucket/runs/NAME, see :mod:`tnlbt.storage`)
      checkpoints/{last,best}/    model.safetensors, config.json, vocab.json, ingredients.json, train_state.pt
      index/index.json            what the published index was built from (:func:`write_index_meta`)
      index/<version>/            embeddings.parquet of one index version
      edge/ or qdrant/            the embedded vector store of a local run (:func:`default_store_path`)

Every command that reads or writes a run goes through these functions, so the layout is written once.

Remote runs (``s3://``, ``gs://``, any :mod:`tnlbt.storage` URI):

* **Checkpoint** -- read where it is. :func:`checkpoint_location` finds it without downloading anything (the
  driver of ``tnlbt index`` and the Serve app builder only pass the *URI* on); each process that loads a model
  (a Ray Data actor, a Serve replica, possibly on another node) calls :func:`resolve_checkpoint`, which copies
  the four model files into a per-machine cache ``<cache>/checkpoints/<name>-<hash(uri)>/<hash(size+mtime of
  each file)>/`` (:func:`fetch_checkpoint`). Why a persistent cache and not a temp dir: several actors or
  replicas on one node, and every replica restart, would each download the weights again; keyed by size and
  mtime, a new ``best`` checkpoint written to the same URI gets a new folder instead of silently serving stale
  weights. A file lock makes one process per machine download while the others wait; the folder appears by an
  atomic rename, so a crash never leaves a half-copied checkpoint that looks complete. Only the model files
  are copied: ``train_state.pt`` (optimiser and GAN state, 2-3x the weights) is useless for inference. The
  newest two versions per URI are kept.
* **Index metadata and embeddings** -- written through :mod:`tnlbt.storage` next to the run (one object PUT
  each: visible whole or not at all).
* **Embedded vector store** -- qdrant-client local mode and qdrant-edge are folders with file locks, mmaps and
  renames: they cannot live on an object store. For a remote run the default store folder is therefore local,
  ``<cache>/runs/<name>-<hash(run uri)>/{edge,qdrant}`` (:func:`local_run_dir`), a pure function of the run
  URI, so ``tnlbt index --run s3://b/r`` followed by ``tnlbt serve --run s3://b/r`` on the same machine meet in
  the same folder. On another machine there is no such folder: use a Qdrant server for multi-machine serving.
* ``<cache>`` is :func:`tnlbt.storage.cache_dir`.

Local paths are returned as :class:`~pathlib.Path`, remote locations as the URI ``str``; nothing is copied for
a local run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tnlbt import storage

log = logging.getLogger(__name__)

# What inference needs from a checkpoint (tnlbt.models.io); train_state.pt is deliberately not fetched.
CHECKPOINT_FILES = ("model.safetensors", "config.json", "vocab.json", "ingredients.json")
WEIGHTS = CHECKPOINT_FILES[0]
TRAIN_STATE = "train_state.pt"  # written (uploaded) last: a checkpoint is complete once it is there
CHECKPOINT_NAMES = ("best", "last")  # the order a run's checkpoint is looked for
CHECKPOINT_VERSIONS_KEPT = 2


def _uri(p: str | Path) -> str:
    """A remote location as a normalised URI string (no trailing slash)."""
    s = os.fspath(p)
    return s.rstrip("/") if not s.endswith("://") else s


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cache_name(uri: str) -> str:
    """``<last path part>-<hash of the URI>``: readable in ``ls`` and unique per URI."""
    name = posixpath.basename(uri.rstrip("/")) or "root"
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:48]}-{_digest(uri)}"


# -- checkpoints ---------------------------------------------------------------------------------------------
def is_complete(ckpt_dir: str | Path, need_train_state: bool = True) -> bool:
    """True when the checkpoint folder (local path or URI) holds the model files (and ``train_state.pt``).

    On a remote URI only ``need_train_state=True`` proves a finished upload (``train_state.pt`` is uploaded
    last, see :mod:`tnlbt.train.checkpoint`); without it a checkpoint being replaced may read as complete.
    """
    need = ["model.safetensors", "config.json", "vocab.json"]
    if need_train_state:
        need.append(TRAIN_STATE)
    if storage.is_remote(ckpt_dir):
        uri = os.fspath(ckpt_dir)
        return all(storage.exists(storage.join(uri, n)) for n in need)
    d = storage.as_local(ckpt_dir)
    return d.is_dir() and all((d / n).exists() for n in need)


def _local_checkpoint(run: str | Path) -> Path:
    run = storage.as_local(run)
    if (run / WEIGHTS).exists():
        return run
    for name in CHECKPOINT_NAMES:
        c = run / "checkpoints" / name
        if (c / WEIGHTS).exists():
            return c
    raise FileNotFoundError(f"no checkpoint in {run} (expected {run}/checkpoints/best/model.safetensors)")


def checkpoint_location(run: str | Path) -> Path | str:
    """Where the checkpoint of a run (``RUN/checkpoints/{best,last}``) or checkpoint dir is, without
    downloading it: a local Path, or the checkpoint's URI for a remote run."""
    if not storage.is_remote(run):
        return _local_checkpoint(run)
    uri = _uri(run)
    if storage.exists(storage.join(uri, WEIGHTS)):
        return uri
    # A complete best/last first: one being replaced by a running training is skipped. With none complete, the
    # first that has weights, so the reader's error names the files that are missing.
    names = [storage.join(uri, "checkpoints", n) for n in CHECKPOINT_NAMES]
    for c in [c for c in names if is_complete(c)] or [c for c in names if storage.exists(storage.join(c, WEIGHTS))]:
        return c
    raise FileNotFoundError(
        f"no checkpoint in {uri} (expected {uri}/checkpoints/best/model.safetensors, .../last/..., complete, or "
        f"{uri}/model.safetensors; train first, or check the URI and the credentials)"
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of one machine (flock); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_checkpoint(uri: str) -> Path:
    """A remote checkpoint dir -> a local copy of its model files in the cache (see the module doc).

    Cheap when cached: one metadata request for the four files, no download.
    """
    import pyarrow.fs as pafs

    uri = _uri(uri)
    fs, base = storage.resolve(uri)
    paths = [posixpath.join(base, n) for n in CHECKPOINT_FILES]
    infos = fs.get_file_info(paths)
    missing = [n for n, i in zip(CHECKPOINT_FILES, infos, strict=True) if i.type != pafs.FileType.File]
    if missing:
        raise FileNotFoundError(f"{uri} is not a model checkpoint: missing {', '.join(missing)}")
    home = storage.cache_dir() / "checkpoints" / _cache_name(uri)
    target = home / _digest(*(f"{n}:{i.size}:{i.mtime_ns}" for n, i in zip(CHECKPOINT_FILES, infos, strict=True)))
    if target.is_dir():
        return target
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / ".lock"):
        if target.is_dir():  # another process of this machine fetched it while we waited
            return target
        # Under the lock any other partial folder is left over from a crashed download.
        for stale in home.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = home / f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        t0 = time.perf_counter()
        try:
            for name, path in zip(CHECKPOINT_FILES, paths, strict=True):
                with fs.open_input_stream(path) as src, open(partial / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 8 * 1024 * 1024)
            os.rename(partial, target)  # atomic: the folder exists only complete
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        log.info("fetched checkpoint %s -> %s in %.1fs", uri, target, time.perf_counter() - t0)
        versions = sorted(
            (p for p in home.iterdir() if p.is_dir() and not p.name.startswith(".") and p != target),
            key=lambda p: p.stat().st_mtime,
        )
        for old in versions[: max(0, len(versions) - (CHECKPOINT_VERSIONS_KEPT - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def resolve_checkpoint(run: str | Path) -> Path:
    """A run dir (``RUN/checkpoints/{best,last}``) or a checkpoint dir itself -> the *local* checkpoint dir;
    a remote one is fetched into the cache first (:func:`fetch_checkpoint`)."""
    loc = checkpoint_location(run)
    return loc if isinstance(loc, Path) else fetch_checkpoint(loc)


# -- the run directory and its local side --------------------------------------------------------------------
def run_dir_of(run: str | Path) -> Path | str:
    """The run directory for a run or checkpoint path (checkpoint dirs live at RUN/checkpoints/NAME): a Path
    for a local run, the URI for a remote one."""
    if storage.is_remote(run):
        uri = _uri(run)
        parent = posixpath.dirname(uri)
        if posixpath.basename(parent) == "checkpoints" and storage.exists(storage.join(uri, WEIGHTS)):
            return posixpath.dirname(parent)
        return uri
    run = storage.as_local(run)
    if (run / WEIGHTS).exists() and run.parent.name == "checkpoints":
        return run.parent.parent
    return run


def local_run_dir(run: str | Path) -> Path:
    """The local folder that holds a run's machine-local state (embedded store, UI examples): the run dir
    itself for a local run, ``<cache>/runs/<name>-<hash(uri)>`` for a remote one."""
    rd = run_dir_of(run)
    return rd if isinstance(rd, Path) else storage.cache_dir() / "runs" / _cache_name(rd)


def default_store_path(run: str | Path, kind: str) -> str:
    """``RUN/qdrant`` or ``RUN/edge`` for a local run; the same names under :func:`local_run_dir` for a remote
    one (an embedded store is a local folder; see the module doc)."""
    return str(local_run_dir(run) / ("qdrant" if kind == "qdrant" else "edge"))


# -- index metadata ------------------------------------------------------------------------------------------
# index.json records where things are so that a reader anywhere finds them: paths inside a local run directory
# relative to it (a run folder copied or moved elsewhere still serves), other local paths absolute (a reader
# in another working directory still finds them), URIs as they are.
def record_path(run: str | Path, path: str | Path | None) -> str | None:
    """``path`` as ``index.json`` records it (see above)."""
    if path is None:
        return None
    s = os.fspath(path)
    if storage.is_remote(s):
        return s
    p = Path(s).resolve()
    rd = run_dir_of(run)
    # A remote run's local folder is a cache path of this machine, not part of the run: recorded as it is.
    if isinstance(rd, Path) and p.is_relative_to(rd.resolve()):
        return p.relative_to(rd.resolve()).as_posix()
    return str(p)


def recorded_path(run: str | Path, recorded: str | None) -> str | None:
    """A path from ``index.json`` made usable here: relative ones are under the run's local folder; an older
    index's working-directory-relative path is kept when it exists as given and not under the run."""
    if not recorded or storage.is_remote(recorded) or os.path.isabs(recorded):
        return recorded
    under_run = local_run_dir(run) / recorded
    if under_run.exists() or not Path(recorded).exists():
        return str(under_run)
    return recorded


def index_dir(run: str | Path) -> Path | str:
    """``RUN/index``: ``index.json`` and one folder of embeddings per index version."""
    rd = run_dir_of(run)
    return rd / "index" if isinstance(rd, Path) else storage.join(rd, "index")


def write_index_meta(run: str | Path, meta: dict[str, Any]) -> Path | str:
    """Write ``RUN/index/index.json`` whole (a temp file and a rename locally, one PUT remotely)."""
    d = index_dir(run)
    text = json.dumps(meta, indent=2, sort_keys=True)
    if not isinstance(d, Path):
        uri = storage.join(d, "index.json")
        storage.write_text(uri, text)  # one PUT: readers see the old or the new object, never a mix
        return uri
    p = d / "index.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p


def read_index_meta(run: str | Path) -> dict[str, Any]:
    """``RUN/index/index.json``, or ``{}`` when the run has no index yet."""
    d = index_dir(run)
    if not isinstance(d, Path):
        try:
            return json.loads(storage.read_text(storage.join(d, "index.json")))
        except FileNotFoundError:
            return {}
    p = d / "index.json"
    return json.loads(p.read_text()) if p.exists() else {}


def index_checkpoint(run: str | Path, meta: dict[str, Any]) -> Path | str:
    """The checkpoint an index was built with (``meta["checkpoint"]``), located with
    :func:`checkpoint_location`; the run's own checkpoint when that one is not reachable here (an index built
    from a local copy of a run that was then uploaded, or a path relative to another working directory)."""
    recorded = recorded_path(run, meta.get("checkpoint"))
    if recorded:
        try:
            return checkpoint_location(recorded)
        except FileNotFoundError:
            log.warning("checkpoint %s recorded in index.json is not reachable; using %s's", recorded, run)
    return checkpoint_location(run)


# -- lineage: what a published index version was built from ------------------------------------------------
def content_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (a local path or a URI), streamed in 8 MiB reads."""
    h = hashlib.sha256()
    with storage.open_input(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _json_or_none(path: str | Path) -> Any:
    try:
        return json.loads(storage.read_text(path))
    except (FileNotFoundError, OSError, ValueError):
        return None


def run_metrics(run: str | Path) -> dict[str, Any]:
    """A run's recorded quality: ``test`` (``metrics_test.json``, what ``tnlbt eval`` wrote) and ``best_val``
    (the ``kind == "val"`` record of ``metrics.jsonl`` with the highest ``val/R@1``, its epoch and step); a
    missing file gives no key."""
    rd = run_dir_of(run)

    def at(name: str) -> str | Path:
        return storage.join(rd, name) if isinstance(rd, str) else rd / name

    out: dict[str, Any] = {}
    test = _json_or_none(at("metrics_test.json"))
    if test is not None:
        out["test"] = test
    best: dict[str, Any] | None = None
    try:
        lines = storage.read_text(at("metrics.jsonl")).split("\n")  # one record per step: small
    except (FileNotFoundError, OSError, UnicodeDecodeError):
        lines = []
    for raw in lines:
        try:
            rec = json.loads(raw) if raw.strip() else None
        except ValueError:
            continue  # a line cut by a crash is not a record
        is_val = isinstance(rec, dict) and rec.get("kind") == "val" and isinstance(rec.get("val/R@1"), int | float)
        if is_val and (best is None or rec["val/R@1"] > best["val/R@1"]):
            best = rec
    if best is not None:
        out["best_val"] = {k: v for k, v in best.items() if k.startswith("val/") or k in ("epoch", "step")}
    return out


def lineage_path(run: str | Path, version: str) -> Path | str:
    """``RUN/index/<version>/lineage.json``: the record of one published version."""
    d = index_dir(run)
    return d / version / "lineage.json" if isinstance(d, Path) else storage.join(d, version, "lineage.json")


def write_lineage(run: str | Path, lineage: dict[str, Any]) -> Path | str:
    """Write a version's lineage record next to its embeddings (kept and pruned with them)."""
    p = lineage_path(run, lineage["version"])
    text = json.dumps(lineage, indent=2, sort_keys=True)
    if isinstance(p, Path):
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
    else:
        storage.write_text(p, text)
    return p


def live_lineage(run: str | Path) -> dict[str, Any]:
    """The lineage of the version that is live now (``index.json``'s ``lineage``; what ``GET /v1/info`` and
    the UI's model card show). An index built before lineage existed gives what ``index.json`` knows; no
    index gives ``{}``."""
    meta = read_index_meta(run)
    if not meta:
        return {}
    if isinstance(meta.get("lineage"), dict):
        return meta["lineage"]
    return {
        "version": meta.get("version"),
        "checkpoint": {"path": meta.get("checkpoint")},
        "source": {"kind": "split", "split": meta.get("split"), "data_dir": meta.get("data_dir")},
        "counts": {"recipes": meta.get("recipes"), "photos": meta.get("photos")},
        "index_settings": meta.get("index_settings"),
        "note": "built before lineage records: no checkpoint hash, metrics or gate result",
    }


def checkpoint_drift(run: str | Path) -> str | None:
    """A warning when the weights at the live version's recorded checkpoint are no longer the weights it was
    built with (``checkpoints/best`` replaced by a later training, or a version the gate refused): queries
    would then be embedded by another model than the index. ``None`` when they match, or when there is no
    hash to compare (an index without lineage, a remote checkpoint: not downloaded just to check)."""
    meta = read_index_meta(run)
    want = ((meta.get("lineage") or {}).get("checkpoint") or {}).get("sha256")
    if not want:
        return None
    loc = index_checkpoint(run, meta)
    if not isinstance(loc, Path):
        return None
    got = content_sha256(loc / WEIGHTS)
    if got == want:
        return None
    return (f"the checkpoint {loc} is not the one index version {meta.get('version')} was built with "
            f"(weights sha256 {got[:12]}, built with {want[:12]}): query vectors will not match the index; "
            f"restore those weights or run `tnlbt index` again")
