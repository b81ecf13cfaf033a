"""``tnlbt preprocess``: Recipe1M layout -> ``OUT/{split}/part-*.parquet``, vocabularies, stats (Ray Data).

Stages
1. **Read (driver, streaming).** ``layer2.json`` and ``det_ingrs.json`` are streamed into compact lookups
   (recipe id -> image ids; recipe id -> ingredient-name ids packed as int32 bytes): at Recipe1M scale about
   400k and 1M small entries, a few hundred MB at most. ``layer1.json`` (1.3 GB) is streamed record by record,
   validated (:mod:`tnlbt.data.recipe1m`), de-duplicated (first valid record wins), joined with the two
   lookups and written once as JSON Lines shards of ``rows_per_file`` recipes per split and kind: ``p`` (at
   least one photo listed) and ``r`` (train recipes without photos). Nothing holds all of layer1 in memory.
2. **Vocabulary.** Word counts over the *paired train* records (train recipes with a photo listed in
   layer2, H-T's ``train.txt`` definition), taken in stage 1 as each record is written (after the text caps);
   words with count >= ``min_word_count`` form ``vocab.json``. Ingredient labels: cleaned det_ingrs names of
   the same recipes with count >= ``min_ingredient_count`` form ``ingredients.json``.
3. **Process (Ray Data, streaming).** One dataset of shard paths -> ``map_batches`` on a task pool (one shard
   per call, ``compute=TaskPoolStrategy(size=cpus)``): tokenise, decode/convert/resize photos, write the
   shard's Parquet file (row groups of ``row_group_rows``; tmp file + rename) and return only its counters.
   The task writes its own file so that file names are stable (``part-p00000.parquet``), a crashed run resumes
   shard by shard, and every skipped item is counted exactly (``write_parquet`` offers neither counters nor
   names).

Decisions (also in stats.json):
* A train recipe whose photos all fail becomes a recipe-only row (``has_image=false``); a val/test recipe with
  no photo listed is dropped as ``no_image_eval`` and one whose photos all fail as ``no_valid_image``: the
  evaluation protocol needs pairs. Up to ``max_images_per_recipe`` photos that decode are kept, in layer2
  order; listed photos after that are counted ``unused_over_limit`` and not opened.
* Stored text is cut to ``max_title_chars`` / ``max_line_chars`` / ``max_lines`` (the search API's sizes); such
  a record is kept and counted in ``records.truncated`` by limit (``long_title``, ``long_line``,
  ``many_lines``). A record nested deeper than ``max_json_depth`` is rejected (``too_deep``).
* Accounting: ``records.input == kept + sum(rejected) + sum(dropped)``; ``photos.listed == ok + sum(rejected)
  + unused_over_limit`` where ``listed`` counts the photos of recipes that passed validation.
* Rerun: ``OUT/_SUCCESS`` holds a fingerprint of the inputs (layer files' size and mtime, image root,
  DataConfig, pipeline version); the same fingerprint skips all work, a different one asks for
  ``--overwrite``. The photo files themselves are not fingerprinted (887k files): use ``--overwrite`` after
  changing images in place.
* Broken input fails the run in one line (``IncompleteInput``, ``EmptyOutput``; exit 2): a JSON error part-way
  through a layer file (a truncated download; ``--allow-partial`` / ``data.allow_partial`` keeps the items
  before it and lists the error in ``parse_errors``), or no recipe left to keep.
* A full disk (ENOSPC, EDQUOT) anywhere, driver or task, ends the run with one line and exit 28. Nothing half
  written is taken as complete: a part is a tmp file, fsynced, renamed; its done marker comes after it;
  ``_SUCCESS`` (atomic) after every output, and ``_work`` is removed only after that, so the same command
  resumes from the markers once there is space.

Remote storage: ``--data``, ``--images`` and ``--out`` may each be a local folder or a URI (``s3://bucket/x``,
``gs://...``; anything :mod:`tnlbt.storage` resolves), in any mix. Everything is read and written through
:mod:`tnlbt.storage`, with what object stores lack (empty directories, appends, renames) designed out:
* ``OUT/_work`` (JSONL shards and per-shard done markers) lives under ``OUT`` wherever ``OUT`` is, so Ray tasks
  on any node of a cluster without a shared filesystem read the same shards, and an interrupted run resumes
  from the markers even when started from another machine. Each shard is written through one output stream
  (one object, visible when complete); markers are single small objects. The cost is one extra copy of
  layer1's text on the store during the run (removed at the end).
* A Parquet part is written to a local temp file and then uploaded as one object (a multipart upload that
  completes only after the last byte; the size is checked and a failed upload is deleted), so a crash never
  leaves a truncated ``part-*.parquet`` visible. Local output keeps tmp file + ``os.replace`` in place.
* Photos under a remote image root are read with the root's filesystem resolved once per task (no per-photo
  resolution); every I/O failure of a photo is a counted reason (``missing_file``, ``unreadable_file``).
* The fingerprint takes size and mtime of the layer files from ``FileSystem.get_file_info`` when remote
  (``os.stat`` locally, as before).
* Ray tasks get string URIs and resolve filesystems themselves; ``TNLBT_STORAGE_ROUTES`` (tests, laptops) is
  passed to them in their ``runtime_env`` because a Ray started earlier would not have it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import posixpath
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from tnlbt import storage
from tnlbt.config import DataConfig
from tnlbt.data.images import load_image_file
from tnlbt.data.recipe1m import (
    PARTITIONS,
    TooDeep,
    cap_text,
    clean_det_ingrs,
    clean_layer1,
    clean_layer2,
    image_path,
    image_relpath,
    iter_json_array,
    valid_image_id,
)
from tnlbt.data.vocab import (
    IngredientVocab,
    Vocab,
    build_ingredient_vocab,
    build_vocab,
    count_words,
    encode_recipe_text,
)

log = logging.getLogger(__name__)

PIPELINE_VERSION = 2  # 2: text limits, photos must resolve inside the image root
MAX_EXAMPLES = 5
_OUTPUT_NAMES = ("vocab.json", "ingredients.json", "stats.json", "config.json", "_SUCCESS", "_work")


# -- locations (local paths or URIs, through tnlbt.storage) ---------------------------------------------
def _loc(path: str | os.PathLike[str]) -> str:
    """One string per location: a plain local path as ``str(Path(p))`` (as before), ``file://`` as an absolute
    path, a remote URI as given without a trailing ``/``."""
    s = os.fspath(path)
    if storage.scheme(s) == "":
        return str(Path(s))
    lp = storage.local_path(s)
    return lp if lp is not None else s.rstrip("/")


def _name(uri: str | os.PathLike[str]) -> str:
    """The last component of a path or URI (``Path.name`` for both)."""
    return os.fspath(uri).rstrip("/").rsplit("/", 1)[-1]


def _stem(uri: str | os.PathLike[str]) -> str:
    name = _name(uri)
    return name.rsplit(".", 1)[0] if "." in name else name


def _fsync(path: str | os.PathLike[str]) -> None:
    """Flush a finished local file before it is renamed into place: a write error that a filesystem reports
    only at writeback (a full NFS or FUSE disk) is raised here, instead of a short file under a final name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(uri: str, text: str) -> None:
    """Write a small file so that it is never seen half-written (done markers, ``_SUCCESS``).

    Local: tmp file, fsync, ``os.replace``; a failed write (a full disk) removes the tmp file and leaves no
    marker. Remote: one object written from memory in one stream; object stores publish it only when the
    stream completes (no rename exists there, none is needed).
    """
    lp = storage.local_path(uri)
    if lp is None:
        storage.write_text(uri, text)
        return
    tmp = Path(lp).with_suffix(".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, lp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _upload_file(local_file: str | os.PathLike[str], uri: str) -> None:
    """Copy a finished local file to ``uri`` as one object; never leave a partial object behind.

    pyarrow's S3/GCS output streams complete the upload when closed, also when closed by an exception, so a
    failure deletes the object again; the size is checked afterwards for the same reason.
    """
    size = os.path.getsize(local_file)
    try:
        with open(local_file, "rb") as src, storage.open_output(uri) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        fs, path = storage.resolve(uri)
        got = fs.get_file_info(path).size
        if got != size:
            raise OSError(f"{uri}: uploaded {got} bytes, expected {size}")
    except BaseException:
        with contextlib.suppress(Exception):
            storage.remove(uri)
        raise


def _task_remote_args() -> dict[str, Any]:
    """Ray remote args carrying ``TNLBT_STORAGE_ROUTES`` into the tasks (see ``storage.ray_runtime_env``)."""
    env = storage.ray_runtime_env()
    return {"runtime_env": env} if env else {}


def _split_lines(text: str) -> list[str]:
    """Lines of a JSONL text with their ``\\n``, split on ``\\n`` only.

    ``str.splitlines`` would also cut at U+0085, U+2028 and U+2029, which ``json.dumps(ensure_ascii=False)``
    leaves raw inside strings (scraped recipe text does contain them) and would break a record in two.
    """
    parts = text.split("\n")
    out = [line + "\n" for line in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


# -- counters ----------------------------------------------------------------------------------------------
class Tally:
    """Counts per reason with up to five example ids each (JSON-friendly, mergeable across tasks)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str | None = None, n: int = 1) -> None:
        self.counts[reason] += n
        if example is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < MAX_EXAMPLES:
                ex.append(example)

    def merge(self, data: dict[str, Any]) -> None:
        self.counts.update(data.get("counts", {}))
        for reason, ids in data.get("examples", {}).items():
            ex = self.examples.setdefault(reason, [])
            ex.extend(ids[: MAX_EXAMPLES - len(ex)])

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())),
                "examples": {k: v for k, v in sorted(self.examples.items()) if v}}

    def total(self) -> int:
        return sum(self.counts.values())


# -- stage 1: stream the raw files into JSONL shards --------------------------------------------------
# A shard's work in stage 3 is mostly its photos (open, decode, resize, re-encode: milliseconds each) against a
# fraction of a millisecond of text per record; the estimate orders the shards largest first, so the last task
# to start is a small one and the tail is short (issue 10 §4).
PHOTO_COST = 20.0


def record_cost(record: dict[str, Any]) -> float:
    """Estimated stage-3 work of one shard record, in units of one record's text."""
    return 1.0 + PHOTO_COST * len(record.get("image_ids") or ())


def largest_first(shards: list[str], costs: dict[str, float]) -> list[str]:
    """Shards by estimated work, largest first (ties: the given order)."""
    return sorted(shards, key=lambda s: -costs.get(s, 0.0))


class _ShardWriter:
    """JSON Lines shards ``{split}-{kind}-{k:05d}.jsonl`` of at most ``rows`` records each.

    ``folder`` is a local path or a URI. Each shard is written through one output stream of
    :mod:`tnlbt.storage` and closed when full: no appends and no renames, so on an object store every shard is
    one object that appears complete. Lines are buffered and written in pieces of about 1 MiB.
    """

    _CHUNK = 1 << 20

    def __init__(self, folder: str | os.PathLike[str], rows: int):
        self.folder, self.rows = os.fspath(folder), rows
        # (split, kind) -> [stream, rows written, pending lines, pending bytes, path]
        self.open: dict[tuple[str, str], list[Any]] = {}
        self.next_index: Counter[tuple[str, str]] = Counter()
        self.paths: list[str] = []
        self.costs: Counter[str] = Counter()  # path -> estimated work (record_cost), for largest-first scheduling

    @staticmethod
    def _drain(entry: list[Any]) -> None:
        if entry[2]:
            entry[0].write(b"".join(entry[2]))
            entry[2].clear()
            entry[3] = 0

    def write(self, split: str, kind: str, record: dict[str, Any]) -> None:
        key = (split, kind)
        entry = self.open.get(key)
        if entry is None or entry[1] >= self.rows:
            if entry is not None:
                self._drain(entry)
                entry[0].close()
            path = storage.join(self.folder, f"{split}-{kind}-{self.next_index[key]:05d}.jsonl")
            self.next_index[key] += 1
            entry = [storage.open_output(path), 0, [], 0, path]
            self.open[key] = entry
            self.paths.append(path)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self.costs[entry[4]] += record_cost(record)
        entry[1] += 1
        entry[2].append(line)
        entry[3] += len(line)
        if entry[3] >= self._CHUNK:
            self._drain(entry)

    def close(self) -> None:
        try:
            for entry in self.open.values():
                self._drain(entry)
        finally:
            for entry in self.open.values():
                entry[0].close()
            self.open.clear()


def _example_id(obj: Any, index: int) -> str:
    if isinstance(obj, TooDeep):
        obj = obj.item  # what is left of it: the id is usually there
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and rid.strip() and rid.isprintable() else f"#{index}"


class IncompleteInput(ValueError):
    """An input file ends early or breaks part-way (a truncated download): fails unless data.allow_partial."""


class EmptyOutput(ValueError):
    """The input yields no recipe to keep: an empty dataset would only fail later, in training."""


def _read_array(path: str, parse_errors: list[str], cfg: DataConfig) -> Iterator[Any]:
    """The items of one input file. A JSON error part-way fails the run unless ``cfg.allow_partial``: keeping
    the items before it would silently lose everything after (a truncated layer1.json used to exit 0)."""
    before = len(parse_errors)
    yield from iter_json_array(path, parse_errors, cfg.max_json_depth)
    if len(parse_errors) > before and not cfg.allow_partial:
        where = path + parse_errors[-1].removeprefix(_name(path))  # the message with the whole path
        raise IncompleteInput(f"{where}. Replace the file, or pass --allow-partial (data.allow_partial=true) "
                              "to keep the items before the error")


def read_raw(data_dir: str | os.PathLike[str], shard_dir: str | os.PathLike[str], cfg: DataConfig) -> dict[str, Any]:
    """Stage 1 (driver): stream layer2, det_ingrs and layer1 into shards; return counters and label counts.

    ``data_dir`` and ``shard_dir`` are local paths or URIs; ``shards`` in the result are strings of the same kind.
    """
    parse_errors: list[str] = []
    data = _loc(data_dir)
    layer1 = storage.join(data, "layer1.json")
    layer2_path = storage.join(data, "layer2.json")
    det_path = storage.join(data, "det_ingrs.json")
    for p in (layer1, layer2_path):
        if not storage.isfile(p):
            raise FileNotFoundError(f"{p} not found: --data must be a Recipe1M-layout folder "
                                    "(layer1.json, layer2.json, det_ingrs.json, images/)")

    layer2: dict[str, tuple[str, ...]] = {}
    l2 = Counter()
    for obj in _read_array(layer2_path, parse_errors, cfg):
        l2["entries"] += 1
        rid, ids = clean_layer2(obj)
        if rid is None:
            l2["bad_entries"] += 1
        elif rid in layer2:
            l2["duplicate_ids"] += 1
        else:
            layer2[rid] = tuple(ids or ())

    names: dict[str, int] = {}
    name_list: list[str] = []
    det: dict[str, bytes] = {}
    dc = Counter()
    if storage.isfile(det_path):
        for obj in _read_array(det_path, parse_errors, cfg):
            dc["entries"] += 1
            rid, det_names = clean_det_ingrs(obj)
            if rid is None:
                dc["bad_entries"] += 1
            elif rid in det:
                dc["duplicate_ids"] += 1
            else:
                ids = array("i")
                for n in det_names or ():
                    if n not in names:
                        names[n] = len(name_list)
                        name_list.append(n)
                    ids.append(names[n])
                det[rid] = ids.tobytes()  # compact: 4 bytes a name instead of a list of str
    else:
        log.warning("%s not found: recipes get no ingredient labels", det_path)

    records, dropped, truncated = Tally(), Tally(), Tally()
    seen: set[str] = set()
    label_counts: Counter[str] = Counter()
    words: Counter[str] = Counter()  # the vocabulary's counts, taken here where every record is read anyway
    paired_train = 0
    n_input = 0
    matched_l2 = 0
    writer = _ShardWriter(shard_dir, cfg.rows_per_file)
    try:
        for index, obj in enumerate(_read_array(layer1, parse_errors, cfg)):
            n_input += 1
            if n_input % 100_000 == 0:
                log.info("layer1: %d records read, %d kept so far", n_input, len(seen))
            rec, reason = clean_layer1(obj)
            if rec is None:
                records.add(reason or "bad_type", _example_id(obj, index))
                continue
            rid = rec["id"]
            if rid in seen:
                records.add("duplicate_id", rid)
                continue
            seen.add(rid)
            image_ids = list(layer2.get(rid, ()))
            matched_l2 += rid in layer2
            if rid in det:
                label_ids = array("i")
                label_ids.frombytes(det[rid])
                labels = [name_list[i] for i in label_ids]
            else:
                labels = []
                dc["recipes_without_entry"] += 1
            paired = any(valid_image_id(i) for i in image_ids)
            split = rec["partition"]
            if split != "train" and not image_ids:
                dropped.add("no_image_eval", rid)
                continue
            for cut in cap_text(rec, cfg.max_title_chars, cfg.max_line_chars, cfg.max_lines):
                truncated.add(cut, rid)
            if split == "train" and paired:  # H-T's vocabulary: paired train recipes, as written to the shards
                paired_train += 1
                label_counts.update(labels)
                count_words([rec["title"], *rec["ingredients"], *rec["instructions"]], words)
            rec.update(image_ids=image_ids, labels=labels)
            writer.write(split, "p" if paired or split != "train" else "r", rec)
    finally:
        writer.close()
    l2["orphans"] = len(layer2) - matched_l2
    return {
        "shards": list(writer.paths),
        "records_input": n_input,
        "rejected": records.to_dict(),
        "dropped": dropped.to_dict(),
        "truncated": truncated.to_dict(),
        "kept_before_photos": len(seen) - dropped.total(),
        "paired_train": paired_train,
        "label_counts": label_counts,
        "word_counts": words,
        "shard_costs": dict(writer.costs),
        "layer2": dict(l2),
        "det_ingrs": dict(dc),
        "parse_errors": parse_errors,
    }


def rebalance_shards(
    shards: list[str], folder: str | os.PathLike[str], min_shards: int, min_rows: int = 32,
    max_rows: int | None = None, costs: dict[str, float] | None = None,
) -> list[str]:
    """Split a small corpus into more, smaller shards so every CPU gets work (files stay <= ``max_rows``, the
    config's rows_per_file: ``min_rows`` alone made a 17-row shard with rows_per_file 16).

    Only when there are fewer than ``min_shards`` shards, i.e. a corpus small enough to rewrite cheaply. Shards
    are read, deleted and written whole (one object each on an object store). ``costs`` (path -> estimated
    work), when given, is updated for the new shards.
    """
    if len(shards) >= min_shards:
        return shards
    groups: dict[str, list[str]] = {}
    for s in shards:
        split, kind, _ = _stem(s).split("-")
        groups.setdefault(f"{split}-{kind}", []).append(s)
    texts = {key: [storage.read_text(p) for p in paths] for key, paths in groups.items()}
    total = sum(t.count("\n") for ts in texts.values() for t in ts)
    size = max(min_rows, -(-total // min_shards))
    if max_rows is not None:
        size = min(size, max_rows)
    out: list[str] = []
    folder = os.fspath(folder)
    for key, paths in groups.items():
        lines = [line for t in texts[key] for line in _split_lines(t)]
        for p in paths:
            storage.remove(p)
        for k in range(0, len(lines), size):
            path = storage.join(folder, f"{key}-{k // size:05d}.jsonl")
            storage.write_text(path, "".join(lines[k : k + size]))
            out.append(path)
            if costs is not None:
                costs[path] = sum(record_cost(json.loads(line)) for line in lines[k : k + size])
    return out


def _iter_shard(path: str | os.PathLike[str], data: bytes | None = None) -> Iterator[dict[str, Any]]:
    """Records of one JSONL shard (a local path or URI; ``data``: its bytes, already read)."""
    text = (storage.read_bytes(path) if data is None else data).decode("utf-8")
    for line in text.split("\n"):  # not splitlines(): see _split_lines
        if line.strip():
            yield json.loads(line)


# -- stage 3: process one shard -----------------------------------------------------------------------------
def process_shard(
    shard: str | Path,
    out_path: str | Path,
    *,
    vocab: Vocab,
    ingredients: IngredientVocab,
    cfg: DataConfig,
    images_dir: str | Path,
    shard_bytes: bytes | None = None,
) -> dict[str, Any]:
    """Tokenise and decode one JSONL shard into one Parquet file; return its counters (no Ray needed).

    ``shard``, ``out_path`` and ``images_dir`` are local paths or URIs (``shard_bytes``: the shard's content when
    the caller has read it already). The Parquet file appears complete or not at all: locally a hidden tmp file
    renamed into place; remotely a local temp file uploaded as one object.
    """
    import pyarrow.parquet as pq

    from tnlbt.data.schema import RECIPE_SCHEMA, rows_to_table

    t0, c0 = time.perf_counter(), time.process_time()
    out_uri = os.fspath(out_path)
    out_local = storage.local_path(out_uri)
    final = Path(out_local) if out_local is not None else None
    tmp: Path | None = final.with_name(f".{final.name}.tmp") if final is not None else None
    photo_kw = {
        "short_side": cfg.image_short_side,
        "quality": cfg.image_jpeg_quality,
        "max_pixels": cfg.max_image_pixels,
        "min_side": cfg.min_image_side,
        "max_aspect": cfg.max_image_aspect,
    }
    if storage.is_remote(images_dir):
        # Resolve the image root once per shard and read each photo by its inner path: resolving a URI per
        # photo would repeat the filesystem lookup thousands of times.
        img_fs, img_root = storage.resolve(images_dir)

        def load_photo(split: str, image_id: str) -> Any:
            return load_image_file(
                posixpath.join(img_root, image_relpath(split, image_id)), filesystem=img_fs, **photo_kw
            )
    else:
        root = os.path.realpath(images_dir)  # once per shard; each photo must resolve inside it

        def load_photo(split: str, image_id: str) -> Any:
            return load_image_file(image_path(images_dir, split, image_id), root=root, **photo_kw)

    photos, dropped = Tally(), Tally()
    formats: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    rows_out = Counter()
    listed = unused = ok = 0
    writer = None
    buffer: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal writer, tmp
        if not buffer:
            return
        if writer is None:
            if final is not None:
                final.parent.mkdir(parents=True, exist_ok=True)
            else:
                fd, name = tempfile.mkstemp(prefix=".part-", suffix=".parquet.tmp")
                os.close(fd)
                tmp = Path(name)
            writer = pq.ParquetWriter(tmp, RECIPE_SCHEMA, compression="zstd")
        writer.write_table(rows_to_table(buffer), row_group_size=cfg.row_group_rows)
        buffer.clear()

    try:
        try:
            for rec in _iter_shard(shard, shard_bytes):
                split, rid = rec["partition"], rec["id"]
                kept_ids: list[str] = []
                kept_bytes: list[bytes] = []
                seen_ids: set[str] = set()
                for image_id in rec["image_ids"]:
                    listed += 1
                    if len(kept_ids) >= cfg.max_images_per_recipe:
                        unused += 1
                        continue
                    if not image_id:
                        photos.add("bad_image_id", rid)
                        continue
                    if image_id in seen_ids:
                        photos.add("duplicate_image", image_id)
                        continue
                    seen_ids.add(image_id)
                    res = load_photo(split, image_id)
                    if res.data is None:
                        photos.add(res.reason or "corrupt", image_id)
                        continue
                    ok += 1
                    formats[res.fmt or "?"] += 1
                    modes[res.mode or "?"] += 1
                    kept_ids.append(image_id)
                    kept_bytes.append(res.data)
                if not kept_ids and split != "train":
                    dropped.add("no_valid_image", rid)
                    continue
                row = {"id": rid, "partition": split, "has_image": bool(kept_ids), "image_ids": kept_ids,
                       "images": kept_bytes, "title": rec["title"], "ingredients": rec["ingredients"],
                       "instructions": rec["instructions"],
                       "ingredient_labels": ingredients.encode(rec["labels"])}
                row.update(encode_recipe_text(vocab, cfg, rec["title"], rec["ingredients"], rec["instructions"]))
                buffer.append(row)
                rows_out["paired" if kept_ids else "recipe_only"] += 1
                if len(buffer) >= cfg.row_group_rows:
                    flush()
            flush()
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            if final is not None:
                _fsync(tmp)
                os.replace(tmp, final)  # atomic: a file named part-* is always complete
            else:
                _upload_file(tmp, out_uri)  # one object, visible only complete
    except BaseException:
        if tmp is not None:  # a failed part (a full disk): its tmp file would only hold on to space
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if final is None and tmp is not None:
            tmp.unlink(missing_ok=True)  # remote output: the local temp copy, uploaded or not
    return {
        "shard": _name(shard),
        "split": _name(shard).split("-")[0],
        "file": _name(out_uri) if writer is not None else None,
        "rows": dict(rows_out),
        "dropped": dropped.to_dict(),
        "photos": {"listed": listed, "ok": ok, "unused_over_limit": unused, "rejected": photos.to_dict(),
                   "formats": dict(formats), "modes": dict(modes)},
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,  # this task's CPU time: comparable on a busy machine
    }


def _out_file(out_dir: str | os.PathLike[str], shard: str | os.PathLike[str]) -> str:
    split, kind, idx = _stem(shard).split("-")
    return storage.join(out_dir, split, f"part-{kind}{idx}.parquet")


def _process_batch(
    batch: dict[str, Any], *, out_dir: str, done_dir: str, vocab: Vocab, ingredients: IngredientVocab,
    cfg_dict: dict[str, Any], images_dir: str,
) -> dict[str, list[str]]:
    cfg = DataConfig(**cfg_dict)
    results = []
    for shard in batch["path"]:
        data = storage.read_bytes(shard)  # read once: for the digest and for the records
        # The marker names the shard's content: a resumed run that cut shards differently redoes them.
        digest = hashlib.sha1(data).hexdigest()[:16]
        done = storage.join(done_dir, f"{_stem(shard)}-{digest}.json")
        if storage.isfile(done):  # finished by an earlier, interrupted run with the same fingerprint
            results.append(storage.read_text(done))
            continue
        out_file = _out_file(out_dir, shard)
        try:
            res = process_shard(shard, out_file, vocab=vocab, ingredients=ingredients, cfg=cfg,
                                images_dir=images_dir, shard_bytes=data)
            text = json.dumps(res)
            _write_marker(done, text)  # after the part is in place: a marker always names a complete part
        except OSError as e:
            full = storage.out_of_space(e)
            if full is None:
                raise
            # Reported, not raised: the driver ends the run with one line instead of a remote traceback, and
            # a rerun redoes only the shards without a marker.
            text = json.dumps({"shard": _name(shard), "out_of_space": f"{out_file}: {storage.error_line(full)}"})
        results.append(text)
    return {"result": results}


# -- driver -----------------------------------------------------------------------------------------------
def fingerprint(data_dir: str | os.PathLike[str], images_dir: str | os.PathLike[str], cfg: DataConfig) -> str:
    """Inputs and settings that decide the output: layer files' size + mtime, image root, DataConfig, version.

    Local files as before (``os.stat``, the resolved image root), so existing outputs keep their fingerprint;
    remote ones from ``FileSystem.get_file_info`` (object size and last-modified time) and the URI itself.
    """
    img = _loc(images_dir)
    img_key = img if storage.is_remote(img) else str(Path(img).resolve())
    parts: dict[str, Any] = {"version": PIPELINE_VERSION, "images_dir": img_key, "cfg": dataclasses.asdict(cfg)}
    data = _loc(data_dir)
    remote = storage.is_remote(data)
    fs, base = storage.resolve(data) if remote else (None, "")
    for name in ("layer1.json", "layer2.json", "det_ingrs.json"):
        if remote:
            info = fs.get_file_info(posixpath.join(base, name))
            parts[name] = [info.size, info.mtime_ns] if info.type == pafs.FileType.File else None
        else:
            p = Path(data) / name
            st = p.stat() if p.is_file() else None
            parts[name] = [st.st_size, st.st_mtime_ns] if st else None
    for key in ("preprocess_cpus", "raw_dir", "processed_dir", "image_root", "allow_partial"):
        parts["cfg"].pop(key, None)  # parallelism, paths given elsewhere, the partial-input consent: same output
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _clean_outputs(out_dir: str | os.PathLike[str]) -> None:
    """Remove only what this command writes (never other files a user keeps in OUT)."""
    for split in PARTITIONS:
        d = storage.join(out_dir, split)
        for name in storage.list_files(d, "part-*.parquet", ".part-*.tmp"):
            storage.remove(storage.join(d, name))
        if not storage.is_remote(d):  # an object store has no empty folders to remove
            with contextlib.suppress(OSError):
                os.rmdir(storage.as_local(d))
    for name in _OUTPUT_NAMES:
        storage.remove(storage.join(out_dir, name))  # a file, or a whole folder (_work/)


def _progress_bars() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0") not in ("", "0"):
        ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False


def preprocess(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: DataConfig,
    *,
    images_dir: str | None = None,
    overwrite: bool = False,
    num_cpus: int = 0,
) -> dict[str, Any]:
    """Run the three stages (module docstring) and return the stats written to ``OUT/stats.json``."""
    t_start = time.perf_counter()
    # Locations are strings: local paths or URIs (s3://, gs://, ...), each resolved through tnlbt.storage.
    data_dir, out_dir = _loc(data_dir), _loc(out_dir)
    img_root = _loc(images_dir or cfg.image_root or storage.join(data_dir, "images"))
    layer1 = storage.join(data_dir, "layer1.json")
    if not storage.isfile(layer1):
        raise FileNotFoundError(f"{layer1} not found: --data must be a Recipe1M-layout folder")
    fp = fingerprint(data_dir, img_root, cfg)
    success = storage.join(out_dir, "_SUCCESS")
    if storage.isfile(success) and not overwrite:
        done = json.loads(storage.read_text(success))
        if done.get("fingerprint") == fp:
            log.info("%s is complete for this input and config; nothing to do (--overwrite to redo)", out_dir)
            stats = json.loads(storage.read_text(storage.join(out_dir, "stats.json")))
            stats["skipped"] = True
            return stats
        raise ValueError(f"{out_dir} holds preprocessed data of a different input or config; "
                         "pass --overwrite to replace it or choose another --out")
    # _work lives under OUT even when OUT is remote: tasks on other nodes must read the shards, and the done
    # markers let any later run resume (see the module docstring).
    work = storage.join(out_dir, "_work")
    fp_file = storage.join(work, "fingerprint")
    resume = not overwrite and storage.isfile(fp_file) and storage.read_text(fp_file).strip() == fp
    if not resume:
        _clean_outputs(out_dir)
    shard_dir, done_dir = storage.join(work, "shards"), storage.join(work, "done")
    for d in (shard_dir, done_dir):
        storage.makedirs(d)  # a no-op on object stores
    storage.write_text(fp_file, fp + "\n")

    # Stage 1: stream the raw files (driver).
    t0 = time.perf_counter()
    for old in storage.list_files(shard_dir, "*.jsonl"):
        storage.remove(storage.join(shard_dir, old))
    raw = read_raw(data_dir, shard_dir, cfg)
    t_read = time.perf_counter() - t0
    if raw["kept_before_photos"] == 0:
        raise EmptyOutput(f"{layer1}: no usable recipe among {raw['records_input']} records (rejected: "
                          f"{raw['rejected']['counts'] or 'none'}; dropped: {raw['dropped']['counts'] or 'none'})")
    log.info("read %d records -> %d shards in %.1fs", raw["records_input"], len(raw["shards"]), t_read)

    from tnlbt.ray_init import ensure_ray

    started = ensure_ray(num_cpus or int(cfg.preprocess_cpus))
    try:
        import ray
        from ray.data import TaskPoolStrategy

        _progress_bars()
        n_tasks = num_cpus or int(cfg.preprocess_cpus) or max(1, int(ray.cluster_resources().get("CPU", 1)))
        raw["shards"] = rebalance_shards(raw["shards"], shard_dir, 2 * n_tasks, max_rows=cfg.rows_per_file,
                                         costs=raw["shard_costs"])

        # Stage 2: vocabulary from the word counts of stage 1 (a separate Ray job re-reading the paired train
        # shards cost 4.4 s of serial start-up on the 20k corpus, issue 10 §4).
        t0 = time.perf_counter()
        vocab = build_vocab(raw["word_counts"], cfg.min_word_count)
        ingr_vocab = build_ingredient_vocab(raw["label_counts"], cfg.min_ingredient_count)
        vocab.save(storage.join(out_dir, "vocab.json"))
        ingr_vocab.save(storage.join(out_dir, "ingredients.json"))
        t_vocab = time.perf_counter() - t0
        log.info("vocabulary: %d tokens (min count %d), %d ingredient labels", len(vocab), cfg.min_word_count,
                 len(ingr_vocab))

        # Stage 3: tokenise + photos + Parquet, one shard per task, streamed.
        t0 = time.perf_counter()
        shards = largest_first(raw["shards"], raw["shard_costs"])
        results = []
        if shards:
            ds = ray.data.from_items([{"path": s} for s in shards], override_num_blocks=len(shards))
            out = ds.map_batches(
                _process_batch, batch_size=1, num_cpus=1,
                compute=TaskPoolStrategy(size=min(n_tasks, len(shards))),
                fn_kwargs={"out_dir": out_dir, "done_dir": done_dir, "vocab": vocab,
                           "ingredients": ingr_vocab, "cfg_dict": dataclasses.asdict(cfg),
                           "images_dir": img_root},
                **_task_remote_args(),
            )
            results = [json.loads(row["result"]) for row in out.iter_rows()]
            full = [r["out_of_space"] for r in results if "out_of_space" in r]
            if full:
                raise OSError(errno.ENOSPC, f"{len(full)} of {len(results)} parts not written, e.g. {full[0]}")
        t_process = time.perf_counter() - t0
        # Files left by an interrupted run whose shards were cut differently are not part of this output.
        wanted = {(r["split"], r["file"]) for r in results if r["file"]}
        for split in PARTITIONS:
            for name in storage.list_files(storage.join(out_dir, split), "part-*.parquet"):
                if (split, name) not in wanted:
                    storage.remove(storage.join(out_dir, split, name))
    finally:
        if started:
            import ray

            ray.shutdown()

    stats = _merge_stats(raw, results, vocab, ingr_vocab)
    stats["timings"] = {"read_s": round(t_read, 3), "vocab_s": round(t_vocab, 3),
                        "process_s": round(t_process, 3), "total_s": round(time.perf_counter() - t_start, 3),
                        "process_cpu_s": round(sum(r.get("cpu_seconds", 0.0) for r in results), 3),
                        "tasks": n_tasks}
    stats["fingerprint"] = fp
    stats["data_dir"], stats["images_dir"] = data_dir, img_root
    storage.write_text(storage.join(out_dir, "stats.json"), json.dumps(stats, indent=2) + "\n")
    if stats["records"]["kept"] == 0:  # every val/test recipe lost its photos: stats.json says which way
        raise EmptyOutput(f"no recipe kept: all {raw['kept_before_photos']} recipes that passed validation were "
                          f"dropped ({stats['records']['dropped']}); see {storage.join(out_dir, 'stats.json')}")
    config = {"data": dataclasses.asdict(cfg), "data_dir": data_dir, "images_dir": img_root,
              "pipeline_version": PIPELINE_VERSION}
    storage.write_text(storage.join(out_dir, "config.json"), json.dumps(config, indent=2) + "\n")
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # Atomic, and before _work goes: a run that cannot write it (a full disk) resumes from the done markers.
    _write_marker(success, json.dumps({"fingerprint": fp, "finished": finished}) + "\n")
    # the shards duplicate layer1's text; done markers are in stats
    if storage.is_remote(work):
        try:
            storage.remove(work)  # every object under the prefix
        except OSError as e:
            log.warning("could not remove %s (%s); it is safe to delete", work, e)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return stats


def _merge_stats(raw: dict[str, Any], results: list[dict[str, Any]], vocab: Vocab,
                 ingr_vocab: IngredientVocab) -> dict[str, Any]:
    dropped = Tally()
    dropped.merge(raw["dropped"])
    photo_rej = Tally()
    photos: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    splits = {s: {"rows": 0, "paired": 0, "recipe_only": 0, "files": 0} for s in PARTITIONS}
    for res in sorted(results, key=lambda r: r["shard"]):
        dropped.merge(res["dropped"])
        photo_rej.merge(res["photos"]["rejected"])
        for k in ("listed", "ok", "unused_over_limit"):
            photos[k] += res["photos"][k]
        formats.update(res["photos"]["formats"])
        modes.update(res["photos"]["modes"])
        sp = splits[res["split"]]
        sp["paired"] += res["rows"].get("paired", 0)
        sp["recipe_only"] += res["rows"].get("recipe_only", 0)
        sp["files"] += res["file"] is not None
    for sp in splits.values():
        sp["rows"] = sp["paired"] + sp["recipe_only"]
    kept = sum(sp["rows"] for sp in splits.values())
    rejected = raw["rejected"]
    truncated = raw["truncated"]  # kept records whose text was cut (not part of the balance below)
    records = {"input": raw["records_input"], "kept": kept, "rejected": rejected["counts"],
               "dropped": dropped.to_dict()["counts"], "truncated": truncated["counts"],
               "examples": {**rejected["examples"], **dropped.to_dict()["examples"], **truncated["examples"]}}
    records["balanced"] = records["input"] == kept + sum(rejected["counts"].values()) + dropped.total()
    rej = photo_rej.to_dict()
    photo_stats = {"listed": photos["listed"], "ok": photos["ok"], "rejected": rej["counts"],
                   "unused_over_limit": photos["unused_over_limit"], "examples": rej["examples"],
                   "formats": dict(sorted(formats.items())), "source_modes": dict(sorted(modes.items()))}
    accounted = photos["ok"] + photo_rej.total() + photos["unused_over_limit"]
    photo_stats["balanced"] = photos["listed"] == accounted
    if not (records["balanced"] and photo_stats["balanced"]):
        log.error("counts do not add up: records %s photos %s", records, photo_stats)
    return {
        "splits": splits,
        "records": records,
        "photos": photo_stats,
        "layer2": raw["layer2"],
        "det_ingrs": raw["det_ingrs"],
        "parse_errors": raw["parse_errors"],
        "vocab": {"size": len(vocab), "min_count": vocab.min_count,
                  "paired_train_recipes": raw["paired_train"]},
        "ingredients": {"size": len(ingr_vocab), "min_count": ingr_vocab.min_count},
        "decisions": {
            "paired_for_vocab": "train recipe with >= 1 photo id listed in layer2 (H-T train.txt)",
            "train_without_valid_photo": "kept as recipe-only row (has_image=false)",
            "val_test_without_photo": "dropped: no_image_eval (none listed), no_valid_image (all failed)",
            "max_images_per_recipe": "first photos that decode, in layer2 order; the rest unused_over_limit",
            "text_limits": "title, each line and the number of lines cut to data.max_title_chars, "
                           "max_line_chars, max_lines; the record kept (records.truncated)",
        },
    }


# -- CLI --------------------------------------------------------------------------------------------------
def cli_preprocess(args: argparse.Namespace) -> int:
    from tnlbt.config import Config

    cfg = Config.load(args.config, args.overrides).data
    if args.allow_partial:
        cfg = dataclasses.replace(cfg, allow_partial=True)
    # A full disk propagates: `tnlbt` prints one line and exits 28 (tnlbt.cli); finished parts are kept.
    stats = preprocess(args.data, args.out, cfg, images_dir=args.images or None, overwrite=args.overwrite,
                       num_cpus=args.num_cpus)
    rec, ph = stats["records"], stats["photos"]
    out = sys.stdout
    if stats.get("skipped"):
        print(f"{args.out}: already complete for this input (use --overwrite to redo)", file=out)
    sp = stats["splits"]
    print(f"records: {rec['input']} in, {rec['kept']} kept "
          f"(train {sp['train']['paired']} paired + {sp['train']['recipe_only']} recipe-only, "
          f"val {sp['val']['rows']}, test {sp['test']['rows']})", file=out)
    print(f"rejected: {rec['rejected'] or 'none'}; dropped: {rec['dropped'] or 'none'}; "
          f"kept with text cut: {rec.get('truncated') or 'none'}", file=out)
    print(f"photos: {ph['listed']} listed, {ph['ok']} ok, rejected {ph['rejected'] or 'none'}, "
          f"{ph['unused_over_limit']} over the per-recipe limit", file=out)
    for err in stats.get("parse_errors", []):  # accepted with --allow-partial
        print(f"partial input kept: {err}", file=out)
    print(f"vocab {stats['vocab']['size']} tokens, {stats['ingredients']['size']} ingredient labels; "
          f"output in {args.out} ({stats['timings']['total_s']:.1f}s)", file=out)
    return 0
