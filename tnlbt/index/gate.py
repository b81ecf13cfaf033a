"""The publish gate: a new index version replaces the live one only if it is not worse on a canary set.

A **canary** is a list of known recipe -> photo pairs (``recipe_id``, the ids of its photos). The measure is
recipe -> photo recall@k: for each pair, the recipe's *stored* vector in a version's ``recipes`` collection is
the query into the same version's ``photos`` collection, and the pair counts as found when one of its photos is
in the top k. Stored vectors, not re-embedded text, because the live version must be measured with the model
that built it, and that checkpoint may have been overwritten since (``checkpoints/best`` is replaced by the
next training: exactly the case the gate is for).

* Default canary: up to ``index.gate_canary`` of the new version's own pairs, chosen by a hash of the recipe id
  (not by position), so two builds of the same catalog pick the same pairs. A user file (``--canary FILE``):
  JSON Lines ``{"recipe_id": "...", "photo_ids": ["..."]}`` naming indexed items.
* The comparison runs on the pairs present in **both** versions (recipe and at least one answer photo), with
  the answers cut to the photos both have, so the two numbers are about the same questions. No common pair (a
  different catalog) -> nothing to compare: the gate then checks the new version's floor only and says so.
* Refused when ``new < live - index.gate_margin``, when ``new < index.gate_min_recall``, or when a built
  collection holds a different number of points than were embedded.

No Ray here; the store is any :class:`tnlbt.index.store.VectorStore`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tnlbt.index.store import PHOTOS, RECIPES, IndexNotFound, VectorStore

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


def _present(store: VectorStore, coll: str, ids: Sequence[str], kind: str) -> set[str]:
    found = store.retrieve(coll, list(ids), kind)
    return {i for i, p in zip(ids, found, strict=True) if p is not None}


def common_pairs(store: VectorStore, a: dict[str, str], b: dict[str, str] | None, pairs: Sequence[Pair]) -> list[Pair]:
    """``pairs`` cut to what versions ``a`` and ``b`` (``{"recipes": coll, "photos": coll}``) both hold."""
    sides = [a] if b is None else [a, b]
    rids = [p.recipe_id for p in pairs]
    pids = sorted({i for p in pairs for i in p.photo_ids})
    have_r = set(rids)
    have_p = set(pids)
    for side in sides:
        have_r &= _present(store, side[RECIPES], rids, "recipe")
        have_p &= _present(store, side[PHOTOS], pids, "photo")
    out = []
    for p in pairs:
        answers = tuple(i for i in p.photo_ids if i in have_p)
        if p.recipe_id in have_r and answers:
            out.append(Pair(p.recipe_id, answers))
    return out


def recall_at_k(store: VectorStore, version: dict[str, str], pairs: Sequence[Pair], k: int) -> float:
    """Recipe -> photo recall@k of one version on ``pairs`` (all present in it)."""
    if not pairs:
        return float("nan")
    vecs = store.vectors(version[RECIPES], [p.recipe_id for p in pairs], "recipe")
    found = 0
    for p, v in zip(pairs, vecs, strict=True):
        if v is None:
            continue
        hits = store.search(version[PHOTOS], np.asarray(v, np.float32), k)
        found += any(h.id in p.photo_ids for h in hits)
    return found / len(pairs)


def check(
    store: VectorStore,
    built: dict[str, str],
    expected: dict[str, int],
    pairs: Sequence[Pair],
    k: int = 10,
    margin: float = 0.05,
    min_recall: float = 0.0,
    canary_source: str = "sample",
) -> dict[str, Any]:
    """The gate's verdict for the unpublished collections ``built`` (``{"recipes": coll, "photos": coll}``)
    against whatever the aliases point at now. Returns the report (``passed`` and the comparison)."""
    reasons: list[str] = []
    counts = {}
    for name, coll in built.items():
        n = store.count(coll)
        counts[name] = {"stored": n, "embedded": int(expected.get(name, 0))}
        if n != int(expected.get(name, 0)):
            reasons.append(f"{name}: {n} points stored, {expected.get(name, 0)} embedded")
    aliases = store.aliases()
    live = {n: aliases[n] for n in (RECIPES, PHOTOS) if n in aliases}
    live_v = live if len(live) == 2 else None
    report: dict[str, Any] = {
        "k": k, "margin": margin, "min_recall": min_recall, "canary": canary_source, "canary_pairs": len(pairs),
        "counts": counts, "live_version": live_v[RECIPES].rsplit("__", 1)[-1] if live_v else None,
    }
    if PHOTOS in built and RECIPES in built:
        try:
            common = common_pairs(store, built, live_v, pairs)
        except IndexNotFound:  # the live collections vanished under us: compare with nothing
            live_v, common = None, common_pairs(store, built, None, pairs)
        new = recall_at_k(store, built, common, k)
        report.update(compared_pairs=len(common), new_recall=_r(new))
        if live_v is not None and common:
            old = recall_at_k(store, live_v, common, k)
            report["live_recall"] = _r(old)
            if new < old - margin:
                reasons.append(f"recall@{k} {new:.3f} is more than {margin:.3f} below the live version's {old:.3f}")
        elif live_v is not None:
            report["note"] = "no canary pair is in both versions: nothing to compare with the live version"
        if common and new < min_recall:
            reasons.append(f"recall@{k} {new:.3f} is below the floor {min_recall:.3f}")
        if not common:
            report.setdefault("note", "no canary pair with a photo in this version: recall not measured")
    else:
        report["note"] = "a version without photos (or without recipes) has no recipe -> photo recall to gate on"
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
