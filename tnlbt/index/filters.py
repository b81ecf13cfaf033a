"""Payload filters: the one plain-data form both store backends read, and the builder the API uses.

A filter is plain data (it crosses Ray between the API and the index replica)::

    {"must": [[key, value], ...], "must_not": [[key, [value, ...]], ...]}

* a ``must`` pair with a scalar value matches a payload field equal to it, or a list field containing it;
  a list value matches any of its values; all ``must`` pairs must hold (AND);
* a ``must_not`` pair removes every point whose field equals (or whose list field contains) any of the values.

The older flat form ``{key: value, ...}`` (what ``{"split": "test"}`` always was) still means "all ``must``".
:class:`~tnlbt.index.store.QdrantStore` and :class:`~tnlbt.index.store.EdgeStore` translate the pairs into
their engines' ``FieldCondition`` / ``MatchValue`` / ``MatchAny`` (keyword matches only: no full-text index,
so a Qdrant server, its local mode and qdrant-edge give the same answer).

:func:`recipe_filter` builds one from what a search asks for, normalising ingredient names and title words
with :mod:`tnlbt.data.ingredients` -- the rule the indexers used for the ``ingredients_norm`` and
``title_terms`` payload fields. Photo points carry their recipe's fields too, so the same filter works in
both directions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tnlbt.data.ingredients import MAX_PHRASE, ingredient_key

INGREDIENTS_FIELD = "ingredients_norm"
TITLE_FIELD = "title_terms"
METADATA_FIELD = "metadata"

Condition = tuple[str, Any]


def conditions(filter: Mapping[str, Any] | None) -> tuple[list[Condition], list[tuple[str, list[Any]]]]:
    """``(must, must_not)`` pairs of a filter in either form (module doc)."""
    if not filter:
        return [], []
    if set(filter) <= {"must", "must_not"} and all(isinstance(v, list | tuple) for v in filter.values()):
        must = [(str(k), v) for k, v in filter.get("must", ())]
        must_not = [(str(k), list(v) if isinstance(v, list | tuple) else [v]) for k, v in filter.get("must_not", ())]
        return must, must_not
    return [(str(k), v) for k, v in filter.items()], []


def recipe_filter(
    *,
    equals: Mapping[str, Any] | None = None,
    must_include: Sequence[str] = (),
    must_exclude: Sequence[str] = (),
    title_keywords: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, list[Any]] | None:
    """The plain filter for a search (``None`` when it asks for nothing). ``ValueError`` names an ingredient or
    keyword that normalises to nothing ("2 cups") or to a longer phrase than the index stores."""
    must: list[list[Any]] = [[k, v] for k, v in (equals or {}).items() if v is not None]
    for name in must_include:
        must.append([INGREDIENTS_FIELD, _ingredient(name)])
    excluded = sorted({_ingredient(name) for name in must_exclude})
    for word in title_keywords:
        key = ingredient_key(word)  # the title's words are normalised the same way (singular, no stop words)
        if not key:
            raise ValueError(f"title keyword {word[:40]!r} has no searchable word")
        must.extend([TITLE_FIELD, w] for w in key.split())
    for field, value in (metadata or {}).items():
        must.append([f"{METADATA_FIELD}.{field}", value])
    out: dict[str, list[Any]] = {}
    if must:
        out["must"] = must
    if excluded:
        out["must_not"] = [[INGREDIENTS_FIELD, excluded]]
    return out or None


def split_terms(values: str | Sequence[str] | None) -> list[str]:
    """Comma-separated terms as a person types them in one box or flag ("peanut, Tomatoes" -> ``["peanut",
    "Tomatoes"]``; several boxes or repeated flags add up); blanks dropped, normalising is
    :func:`recipe_filter`'s."""
    parts = [values] if isinstance(values, str) else list(values or ())
    return [t.strip() for v in parts for t in str(v).split(",") if t.strip()]


def _ingredient(name: str) -> str:
    key = ingredient_key(name)
    if not key:
        raise ValueError(f"ingredient {name[:40]!r} has no ingredient word (quantities and units are ignored)")
    if key.count(" ") >= MAX_PHRASE:
        raise ValueError(f"ingredient {name[:40]!r}: at most {MAX_PHRASE} words")
    return key
