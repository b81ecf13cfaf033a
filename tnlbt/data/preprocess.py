"""``tnlbt preprocess``: Recipe1M layout -> ``OUT/{split}/part-*.parquet``, vocabularies, stats (Ray Data).

Stages
1. **Read (driver, streaming).** ``layer2.json`` and ``det_ingrs.json`` are streamed into compact lookups
   (recipe id -> image ids; recipe id -> ingredient-name ids packed as int32 bytes): at Recipe1M scale about
   400k and 1M small entries, a few hundred MB at most. ``layer1.json`` (1.3 GB) is streamed record by record,
   validated (:mod:`tnlbt.data.recipe1m`), de-duplicated (first valid record wins), joined with the two
   lookups and written once as JSON Lines shards of ``rows_per_file`` recipes per split and kind: ``p`` (at
   least one photo listed) and ``r`` (train recipes without photos). Nothing holds all of layer1 in memory.
2. **Vocabulary (Ray Data).** Word counts over the *paired train* shards (train recipes with a photo listed in
   layer2, H-T's ``train.txt`` definition) in parallel tasks, merged in the driver; words with count >=
   ``min_word_count`` form ``vocab.json``. Ingredient labels: cleaned det_ingrs names of the same recipes with
   count >= ``min_ingredient_count`` form ``ingredients.json``.
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
* Accounting: ``records.input == kept + sum(rejected) + sum(dropped)``; ``photos.listed == ok + sum(rejected)
  + unused_over_limit`` where ``listed`` counts the photos of recipes that passed validation.
* Rerun: ``OUT/_SUCCESS`` holds a fingerprint of the inputs (layer files' size and mtime, image root,
  DataConfig, pipeline version); the same fingerprint skips all work, a different one asks for
  ``--overwrite``. The photo files themselves are not fingerprinted (887k files): use ``--overwrite`` after
  changing images in place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tnlbt.config import DataConfig
from tnlbt.data.images import load_image_file
from tnlbt.data.recipe1m import (
    PARTITIONS,
    clean_det_ingrs,
    clean_layer1,
    clean_layer2,
    image_path,
    iter_json_array,
    valid_image_id,
)
from tnlbt.data.vocab import IngredientVocab, Vocab, build_ingredient_vocab, build_vocab, count_words

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1
MAX_EXAMPLES = 5
_OUTPUT_NAMES = ("vocab.json", "ingredients.json", "stats.json", "config.json", "_SUCCESS", "_work")


# -- text -----------------------------------------------------------------------------------------------
def encode_recipe_text(
    vocab: Vocab, cfg: DataConfig, title: str, ingredients: list[str], instructions: list[str]
) -> dict[str, Any]:
    """Title / ingredient lines / instruction lines -> token ids with the limits of ``cfg`` (H-T rules).

    Empty lines are skipped; the first ``max_ingredients`` / ``max_instructions`` non-empty lines are kept.
    """
    ingr = [s for s in ingredients if s and s.strip()][: cfg.max_ingredients]
    instr = [s for s in instructions if s and s.strip()][: cfg.max_instructions]
    return {
        "title_ids": vocab.encode_sentence(title or "", cfg.max_title_tokens),
        "ingredient_ids": [vocab.encode_sentence(s, cfg.max_line_tokens) for s in ingr],
        "instruction_ids": [vocab.encode_sentence(s, cfg.max_line_tokens) for s in instr],
    }


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
class _ShardWriter:
    """JSON Lines shards ``{split}-{kind}-{k:05d}.jsonl`` of at most ``rows`` records each."""

    def __init__(self, folder: Path, rows: int):
        self.folder, self.rows = folder, rows
        self.open: dict[tuple[str, str], tuple[Any, int, Path]] = {}
        self.next_index: Counter[tuple[str, str]] = Counter()
        self.paths: list[Path] = []

    def write(self, split: str, kind: str, record: dict[str, Any]) -> None:
        key = (split, kind)
        fh, n, path = self.open.get(key, (None, 0, None))
        if fh is None or n >= self.rows:
            if fh is not None:
                fh.close()
            path = self.folder / f"{split}-{kind}-{self.next_index[key]:05d}.jsonl"
            self.next_index[key] += 1
            fh, n = path.open("w", encoding="utf-8"), 0
            self.paths.append(path)
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.open[key] = (fh, n + 1, path)

    def close(self) -> None:
        for fh, _, _ in self.open.values():
            fh.close()
        self.open.clear()


def _example_id(obj: Any, index: int) -> str:
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and rid.strip() and rid.isprintable() else f"#{index}"


def read_raw(data_dir: Path, shard_dir: Path, cfg: DataConfig) -> dict[str, Any]:
    """Stage 1 (driver): stream layer2, det_ingrs and layer1 into shards; return counters and label counts."""
    parse_errors: list[str] = []
    layer1 = data_dir / "layer1.json"
    layer2_path = data_dir / "layer2.json"
    det_path = data_dir / "det_ingrs.json"
    for p in (layer1, layer2_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: --data must be a Recipe1M-layout folder "
                                    "(layer1.json, layer2.json, det_ingrs.json, images/)")

    layer2: dict[str, tuple[str, ...]] = {}
    l2 = Counter()
    for obj in iter_json_array(layer2_path, parse_errors):
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
    if det_path.is_file():
        for obj in iter_json_array(det_path, parse_errors):
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

    records, dropped = Tally(), Tally()
    seen: set[str] = set()
    label_counts: Counter[str] = Counter()
    paired_train = 0
    n_input = 0
    matched_l2 = 0
    writer = _ShardWriter(shard_dir, cfg.rows_per_file)
    try:
        for index, obj in enumerate(iter_json_array(layer1, parse_errors)):
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
            if split == "train" and paired:
                paired_train += 1
                label_counts.update(labels)
            rec.update(image_ids=image_ids, labels=labels)
            writer.write(split, "p" if paired or split != "train" else "r", rec)
    finally:
        writer.close()
    l2["orphans"] = len(layer2) - matched_l2
    return {
        "shards": [str(p) for p in writer.paths],
        "records_input": n_input,
        "rejected": records.to_dict(),
        "dropped": dropped.to_dict(),
        "kept_before_photos": len(seen) - dropped.total(),
        "paired_train": paired_train,
        "label_counts": label_counts,
        "layer2": dict(l2),
        "det_ingrs": dict(dc),
        "parse_errors": parse_errors,
    }


def rebalance_shards(shards: list[str], folder: Path, min_shards: int, min_rows: int = 32) -> list[str]:
    """Split a small corpus into more, smaller shards so every CPU gets work (files stay <= rows_per_file).

    Only when there are fewer than ``min_shards`` shards, i.e. a corpus small enough to rewrite cheaply.
    """
    if len(shards) >= min_shards:
        return shards
    groups: dict[str, list[str]] = {}
    for s in shards:
        split, kind, _ = Path(s).stem.split("-")
        groups.setdefault(f"{split}-{kind}", []).append(s)
    texts = {key: [Path(p).read_text(encoding="utf-8") for p in paths] for key, paths in groups.items()}
    total = sum(t.count("\n") for ts in texts.values() for t in ts)
    size = max(min_rows, -(-total // min_shards))
    out: list[str] = []
    for key, paths in groups.items():
        lines = [line for t in texts[key] for line in t.splitlines(keepends=True)]
        for p in paths:
            Path(p).unlink()
        for k in range(0, len(lines), size):
            path = folder / f"{key}-{k // size:05d}.jsonl"
            path.write_text("".join(lines[k : k + size]), encoding="utf-8")
            out.append(str(path))
    return out


def _iter_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


# -- stage 2: vocabulary --------------------------------------------------------------------------------
def count_shard_words(path: str | Path) -> Counter[str]:
    """Word counts of title + ingredient + instruction lines of every record in one shard."""
    counter: Counter[str] = Counter()
    for rec in _iter_shard(path):
        count_words([rec["title"], *rec["ingredients"], *rec["instructions"]], counter)
    return counter


def _count_words_batch(batch: dict[str, Any]) -> dict[str, list[str]]:
    return {"counts": [json.dumps(count_shard_words(p)) for p in batch["path"]]}


# -- stage 3: process one shard -----------------------------------------------------------------------------
def process_shard(
    shard: str | Path,
    out_path: str | Path,
    *,
    vocab: Vocab,
    ingredients: IngredientVocab,
    cfg: DataConfig,
    images_dir: str | Path,
) -> dict[str, Any]:
    """Tokenise and decode one JSONL shard into one Parquet file; return its counters (no Ray needed)."""
    import pyarrow.parquet as pq

    from tnlbt.data.schema import RECIPE_SCHEMA, rows_to_table

    t0, c0 = time.perf_counter(), time.process_time()
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    photos, dropped = Tally(), Tally()
    formats: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    rows_out = Counter()
    listed = unused = ok = 0
    writer = None
    buffer: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal writer
        if not buffer:
            return
        if writer is None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            writer = pq.ParquetWriter(tmp, RECIPE_SCHEMA, compression="zstd")
        writer.write_table(rows_to_table(buffer), row_group_size=cfg.row_group_rows)
        buffer.clear()

    try:
        for rec in _iter_shard(shard):
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
                res = load_image_file(
                    image_path(images_dir, split, image_id), short_side=cfg.image_short_side,
                    quality=cfg.image_jpeg_quality, max_pixels=cfg.max_image_pixels,
                    min_side=cfg.min_image_side, max_aspect=cfg.max_image_aspect,
                )
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
        os.replace(tmp, out_path)  # atomic: a file named part-* is always complete
    return {
        "shard": Path(shard).name,
        "split": Path(shard).name.split("-")[0],
        "file": out_path.name if writer is not None else None,
        "rows": dict(rows_out),
        "dropped": dropped.to_dict(),
        "photos": {"listed": listed, "ok": ok, "unused_over_limit": unused, "rejected": photos.to_dict(),
                   "formats": dict(formats), "modes": dict(modes)},
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,  # this task's CPU time: comparable on a busy machine
    }


def _out_file(out_dir: Path, shard: str | Path) -> Path:
    split, kind, idx = Path(shard).stem.split("-")
    return out_dir / split / f"part-{kind}{idx}.parquet"


def _process_batch(
    batch: dict[str, Any], *, out_dir: str, done_dir: str, vocab: Vocab, ingredients: IngredientVocab,
    cfg_dict: dict[str, Any], images_dir: str,
) -> dict[str, list[str]]:
    cfg = DataConfig(**cfg_dict)
    results = []
    for shard in batch["path"]:
        # The marker names the shard's content: a resumed run that cut shards differently redoes them.
        digest = hashlib.sha1(Path(shard).read_bytes()).hexdigest()[:16]
        done = Path(done_dir) / f"{Path(shard).stem}-{digest}.json"
        if done.is_file():  # finished by an earlier, interrupted run with the same fingerprint
            results.append(done.read_text())
            continue
        res = process_shard(shard, _out_file(Path(out_dir), shard), vocab=vocab, ingredients=ingredients,
                            cfg=cfg, images_dir=images_dir)
        text = json.dumps(res)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, done)
        results.append(text)
    return {"result": results}


# -- driver -----------------------------------------------------------------------------------------------
def fingerprint(data_dir: Path, images_dir: Path, cfg: DataConfig) -> str:
    parts: dict[str, Any] = {"version": PIPELINE_VERSION, "images_dir": str(images_dir.resolve()),
                             "cfg": dataclasses.asdict(cfg)}
    for name in ("layer1.json", "layer2.json", "det_ingrs.json"):
        p = data_dir / name
        st = p.stat() if p.is_file() else None
        parts[name] = [st.st_size, st.st_mtime_ns] if st else None
    for key in ("preprocess_cpus", "raw_dir", "processed_dir", "image_root"):
        parts["cfg"].pop(key, None)  # parallelism and paths given elsewhere do not change the output
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _clean_outputs(out_dir: Path) -> None:
    """Remove only what this command writes (never other files a user keeps in OUT)."""
    for split in PARTITIONS:
        d = out_dir / split
        if d.is_dir():
            for f in list(d.glob("part-*.parquet")) + list(d.glob(".part-*.tmp")):
                f.unlink()
            with contextlib.suppress(OSError):
                d.rmdir()
    for name in _OUTPUT_NAMES:
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _ensure_ray(num_cpus: int) -> bool:
    """Start a local Ray unless one is running; returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runs: no token files in ~/.ray
    ray.init(num_cpus=num_cpus or None, include_dashboard=False, log_to_driver=False)
    return True


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
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    img_root = Path(images_dir or cfg.image_root or data_dir / "images")
    if not (data_dir / "layer1.json").is_file():
        raise FileNotFoundError(
            f"{data_dir / 'layer1.json'} not found: --data must be a Recipe1M-layout folder")
    fp = fingerprint(data_dir, img_root, cfg)
    success = out_dir / "_SUCCESS"
    if success.is_file() and not overwrite:
        done = json.loads(success.read_text())
        if done.get("fingerprint") == fp:
            log.info("%s is complete for this input and config; nothing to do (--overwrite to redo)", out_dir)
            stats = json.loads((out_dir / "stats.json").read_text())
            stats["skipped"] = True
            return stats
        raise ValueError(f"{out_dir} holds preprocessed data of a different input or config; "
                         "pass --overwrite to replace it or choose another --out")
    work = out_dir / "_work"
    resume = (not overwrite and (work / "fingerprint").is_file()
              and (work / "fingerprint").read_text().strip() == fp)
    if not resume:
        _clean_outputs(out_dir)
    shard_dir, done_dir = work / "shards", work / "done"
    for d in (shard_dir, done_dir):
        d.mkdir(parents=True, exist_ok=True)
    (work / "fingerprint").write_text(fp + "\n")

    # Stage 1: stream the raw files (driver).
    t0 = time.perf_counter()
    for old in shard_dir.glob("*.jsonl"):
        old.unlink()
    raw = read_raw(data_dir, shard_dir, cfg)
    t_read = time.perf_counter() - t0
    log.info("read %d records -> %d shards in %.1fs", raw["records_input"], len(raw["shards"]), t_read)

    started = _ensure_ray(num_cpus or int(cfg.preprocess_cpus))
    try:
        import ray
        from ray.data import TaskPoolStrategy

        _progress_bars()
        n_tasks = num_cpus or int(cfg.preprocess_cpus) or max(1, int(ray.cluster_resources().get("CPU", 1)))
        raw["shards"] = rebalance_shards(raw["shards"], shard_dir, 2 * n_tasks)

        # Stage 2: vocabulary from paired train shards (parallel word counts).
        t0 = time.perf_counter()
        train_p = [s for s in raw["shards"] if Path(s).name.startswith("train-p-")]
        words: Counter[str] = Counter()
        if train_p:
            ds = ray.data.from_items([{"path": s} for s in train_p], override_num_blocks=len(train_p))
            counts = ds.map_batches(_count_words_batch, batch_size=1, num_cpus=1,
                                    compute=TaskPoolStrategy(size=min(n_tasks, len(train_p))))
            for row in counts.iter_rows():
                words.update(json.loads(row["counts"]))
        vocab = build_vocab(words, cfg.min_word_count)
        ingr_vocab = build_ingredient_vocab(raw["label_counts"], cfg.min_ingredient_count)
        vocab.save(out_dir / "vocab.json")
        ingr_vocab.save(out_dir / "ingredients.json")
        t_vocab = time.perf_counter() - t0
        log.info("vocabulary: %d tokens (min count %d), %d ingredient labels", len(vocab), cfg.min_word_count,
                 len(ingr_vocab))

        # Stage 3: tokenise + photos + Parquet, one shard per task, streamed.
        t0 = time.perf_counter()
        shards = raw["shards"]
        results = []
        if shards:
            ds = ray.data.from_items([{"path": s} for s in shards], override_num_blocks=len(shards))
            out = ds.map_batches(
                _process_batch, batch_size=1, num_cpus=1,
                compute=TaskPoolStrategy(size=min(n_tasks, len(shards))),
                fn_kwargs={"out_dir": str(out_dir), "done_dir": str(done_dir), "vocab": vocab,
                           "ingredients": ingr_vocab, "cfg_dict": dataclasses.asdict(cfg),
                           "images_dir": str(img_root)},
            )
            results = [json.loads(row["result"]) for row in out.iter_rows()]
        t_process = time.perf_counter() - t0
        # Files left by an interrupted run whose shards were cut differently are not part of this output.
        wanted = {out_dir / r["split"] / r["file"] for r in results if r["file"]}
        for split in PARTITIONS:
            for f in (out_dir / split).glob("part-*.parquet"):
                if f not in wanted:
                    f.unlink()
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
    stats["data_dir"], stats["images_dir"] = str(data_dir), str(img_root)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    config = {"data": dataclasses.asdict(cfg), "data_dir": str(data_dir), "images_dir": str(img_root),
              "pipeline_version": PIPELINE_VERSION}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)  # the shards duplicate layer1's text; done markers are in stats
    success.write_text(json.dumps({"fingerprint": fp, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                               time.gmtime())}) + "\n")
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
    records = {"input": raw["records_input"], "kept": kept, "rejected": rejected["counts"],
               "dropped": dropped.to_dict()["counts"],
               "examples": {**rejected["examples"], **dropped.to_dict()["examples"]}}
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
        },
    }


# -- CLI --------------------------------------------------------------------------------------------------
def cli_preprocess(args: argparse.Namespace) -> int:
    from tnlbt.config import Config

    cfg = Config.load(args.config, args.overrides).data
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
    print(f"rejected: {rec['rejected'] or 'none'}; dropped: {rec['dropped'] or 'none'}", file=out)
    print(f"photos: {ph['listed']} listed, {ph['ok']} ok, rejected {ph['rejected'] or 'none'}, "
          f"{ph['unused_over_limit']} over the per-recipe limit", file=out)
    print(f"vocab {stats['vocab']['size']} tokens, {stats['ingredients']['size']} ingredient labels; "
          f"output in {args.out} ({stats['timings']['total_s']:.1f}s)", file=out)
    return 0
