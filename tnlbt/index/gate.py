"""The publish gate: a new index version replaces the live one only if it is not worse on a canary set.

A **canary** is a list of known recipe -> photo pairs (``recipe_id``, the ids of its photos). The measure is
recipe -> photo recall@k: the recipe's embedding is the query against all photo embeddings of the same
version (exact cosine; rank = 1 + the number of photos scoring strictly higher than its best answer, the
metrics' tie rule), and the pair counts as found when that rank is <= k.

Both versions are measured from their **embeddings** (``RUN/index/<version>/embeddings.parquet``, written for
every version and kept while it is live), not by re-embedding text and not through the store:

* the live version must be measured with the model that built it, and that checkpoint may have been
  overwritten since (``checkpoints/best`` is replaced by the next training: exactly the case the gate is for);
* an embedded store's live shards are held by the running server (qdrant-edge: one process per shard), so the
  indexing process cannot open them; and exact search on both sides keeps HNSW / int8 approximation out of a
  comparison that is about the model and the data.

The store's part is the count check: each built collection must hold exactly the points that were embedded.

* Default canary: up to ``index.gate_canary`` of the new version's own pairs, chosen by a hash of the recipe id
  (not by position), so two builds of the same catalog pick the same pairs. A user file (``--canary FILE``):
  JSON Lines ``{"recipe_id": "...", "photo_ids": ["..."]}`` naming indexed items.
* The comparison runs on the pairs present in **both** versions (recipe and at least one answer photo), with
  the answers cut to the photos both have, so the two numbers are about the same questions. No common pair (a
  different catalog) -> nothing to compare: the gate then checks the new version's floor only and says so.
* Refused when ``new < live - index.gate_margin``, when ``new < index.gate_min_recall``, when a built
  collection holds a different number of points than were embedded, or when the live version's embeddings
  cannot be read (it cannot be compared; ``--force`` publishes anyway).

No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_CANARY_LINE = 1 << 16
MAX_CANARY_PAIRS = 100_000


@dataclass(frozen=True)
class Pair:
    recipe_id: str
    photo_ids: tuple[str, ...]


class GateRefused(RuntimeError):
    """The new version was not published; ``report`` holds the comparison."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__(format_report(report))
        self.report = report


def _rank_key(recipe_id: str) -> str:
    return hashlib.sha256(recipe_id.encode()).hexdigest()


def sample_pairs(recipe_ids: Sequence[str], photo_recipe_ids: Sequence[str], photo_ids: Sequence[str],
                 n: int) -> list[Pair]:
    """The default canary: up to ``n`` recipes that have photos, with all their photos (see the module doc)."""
    by_recipe: dict[str, list[str]] = {}
    for rid, pid in zip(photo_recipe_ids, photo_ids, strict=True):
        if rid:
            by_recipe.setdefault(rid, []).append(pid)
    have = [r for r in set(recipe_ids) if r in by_recipe]
    have.sort(key=_rank_key)
    return [Pair(r, tuple(by_recipe[r])) for r in have[:n]]


def read_canary(path: str | os.PathLike[str]) -> list[Pair]:
    """A canary file (JSON Lines ``{"recipe_id", "photo_ids"}``); a malformed line is a ``ValueError`` naming
    it: a canary is a measuring instrument, so it is fixed rather than partly used."""
    from tnlbt.data.catalog import iter_lines
    from tnlbt.data.recipe1m import open_binary

    pairs: list[Pair] = []
    with open_binary(path) as raw:
        for lineno, line in iter_lines(raw, MAX_CANARY_LINE):
            if line is not None and not line.strip():
                continue
            try:
                obj = json.loads(line) if line is not None else None
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                obj = None
            rid = obj.get("recipe_id") if isinstance(obj, dict) else None
            pids = obj.get("photo_ids", obj.get("image_ids")) if isinstance(obj, dict) else None
            if not (isinstance(rid, str) and rid and isinstance(pids, list) and pids
                    and all(isinstance(p, str) and p for p in pids)):
                raise ValueError(f"{path} line {lineno}: expected {{\"recipe_id\": str, \"photo_ids\": [str, ...]}}")
            pairs.append(Pair(rid, tuple(pids)))
            if len(pairs) > MAX_CANARY_PAIRS:
                raise ValueError(f"{path}: more than {MAX_CANARY_PAIRS} canary pairs")
    if not pairs:
        raise ValueError(f"{path}: no canary pairs")
    return pairs


@dataclass
class Embeddings:
    """One version's vectors: recipe ids and (N, D) vectors, photo ids and (M, D) vectors (any scale)."""

    recipe_ids: list[str]
    recipes: np.ndarray
    photo_ids: list[str]
    photos: np.ndarray

    @classmethod
    def from_tables(cls, recipes: Any, photos: Any) -> Embeddings:
        """From pyarrow tables with ``id`` and ``vector`` columns (what ``tnlbt index`` embeds)."""
        from tnlbt.index.embed import _vectors

        return cls(recipes["id"].to_pylist(), _unit(_vectors(recipes["vector"])),
                   photos["id"].to_pylist() if photos is not None else [],
                   _unit(_vectors(photos["vector"])) if photos is not None and len(photos) else np.zeros((0, 0)))

    @classmethod
    def from_parquet(cls, path: str | os.PathLike[str]) -> Embeddings:
        """From a version's ``embeddings.parquet`` (``id, modality, recipe_id, vector``)."""
        import pyarrow.compute as pc

        from tnlbt import storage

        t = storage.open_parquet(os.fspath(path)).read(columns=["id", "modality", "vector"])
        return cls.from_tables(t.filter(pc.equal(t["modality"], "recipe")), t.filter(pc.equal(t["modality"], "image")))


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    if v.size == 0:
        return v
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def common_pairs(a: Embeddings, b: Embeddings | None, pairs: Sequence[Pair]) -> list[Pair]:
    """``pairs`` cut to what versions ``a`` and ``b`` both hold (``b`` None: ``a`` alone)."""
    sides = [a] if b is None else [a, b]
    have_r = set.intersection(*(set(e.recipe_ids) for e in sides))
    have_p = set.intersection(*(set(e.photo_ids) for e in sides))
    out = []
    for p in pairs:
        answers = tuple(i for i in p.photo_ids if i in have_p)
        if p.recipe_id in have_r and answers:
            out.append(Pair(p.recipe_id, answers))
    return out


def recall_at_k(emb: Embeddings, pairs: Sequence[Pair], k: int) -> float:
    """Recipe -> photo recall@k of one version on ``pairs`` (all present in it); exact, chunked by 256 queries."""
    if not pairs or emb.photos.size == 0:
        return float("nan")
    r_index = {r: i for i, r in enumerate(emb.recipe_ids)}
    p_index = {p: i for i, p in enumerate(emb.photo_ids)}
    found = 0
    for start in range(0, len(pairs), 256):
        chunk = pairs[start:start + 256]
        q = emb.recipes[[r_index[p.recipe_id] for p in chunk]]
        scores = q @ emb.photos.T  # (queries, photos)
        for row, p in zip(scores, chunk, strict=True):
            best = max(row[p_index[i]] for i in p.photo_ids)
            found += int(np.count_nonzero(row > best)) + 1 <= k
    return found / len(pairs)


def check(
    new: Embeddings,
    live: Embeddings | None,
    counts: dict[str, dict[str, int]],
    pairs: Sequence[Pair],
    k: int = 10,
    margin: float = 0.05,
    min_recall: float = 0.0,
    canary_source: str = "sample",
    live_version: str | None = None,
    live_error: str | None = None,
) -> dict[str, Any]:
    """The gate's verdict. ``counts``: ``{collection name: {"stored": n, "embedded": n}}`` of the new build;
    ``live``: the live version's embeddings (None: nothing is live, or ``live_error`` says why they could not
    be read). Returns the report (``passed``, the comparison and the reasons)."""
    reasons = [f"{name}: {c['stored']} points stored, {c['embedded']} embedded"
               for name, c in counts.items() if c["stored"] != c["embedded"]]
    report: dict[str, Any] = {
        "k": k, "margin": margin, "min_recall": min_recall, "canary": canary_source, "canary_pairs": len(pairs),
        "counts": counts, "live_version": live_version,
    }
    if live_error:
        reasons.append(f"the live version {live_version} cannot be measured: {live_error}")
    common = common_pairs(new, live, pairs)
    new_r = recall_at_k(new, common, k)
    report.update(compared_pairs=len(common), new_recall=_r(new_r))
    if live is not None and common:
        old = recall_at_k(live, common, k)
        report["live_recall"] = _r(old)
        if new_r < old - margin:
            reasons.append(f"recall@{k} {new_r:.3f} is more than {margin:.3f} below the live version's {old:.3f}")
    elif live is not None:
        report["note"] = "no canary pair is in both versions: nothing to compare with the live version"
    if common and new_r < min_recall:
        reasons.append(f"recall@{k} {new_r:.3f} is below the floor {min_recall:.3f}")
    if not common:
        report.setdefault("note", "no canary pair with a photo in this version: recall not measured")
    report["passed"] = not reasons
    report["reasons"] = reasons
    return report


def _r(x: float) -> float | None:
    return None if x != x else round(float(x), 4)  # NaN -> None (JSON)


def format_report(report: dict[str, Any]) -> str:
    """The comparison in a few lines (printed by ``tnlbt index``)."""
    k = report.get("k")
    lines = [
        f"publish gate: {'passed' if report.get('passed') else 'REFUSED'} "
        f"(canary {report.get('canary')}: {report.get('compared_pairs', 0)} of {report.get('canary_pairs', 0)} "
        f"pairs compared, recall@{k})",
        f"  new version:  recall@{k} = {report.get('new_recall')}",
    ]
    if report.get("live_version"):
        lines.append(f"  live version {report['live_version']}: recall@{k} = {report.get('live_recall')} "
                     f"(allowed drop {report.get('margin')})")
    for name, c in (report.get("counts") or {}).items():
        lines.append(f"  {name}: {c['stored']} points stored, {c['embedded']} embedded")
    if report.get("note"):
        lines.append(f"  note: {report['note']}")
    lines += [f"  refused: {r}" for r in report.get("reasons", [])]
    return "\n".join(lines)
