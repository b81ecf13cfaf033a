"""Hybrid ranking of text queries: a lexical score over a recipe's title and ingredient terms, fused with the
dense (cosine) ranking by reciprocal rank fusion.

How a hybrid text search ranks (:func:`rerank`):

1. the store returns the top ``pool`` points by cosine (:data:`POOL`, or ``k`` when larger), with the
   request's filter applied there, as for a dense search;
2. each candidate's lexical score is the idf-weighted overlap of the query's terms with the candidate's
   payload terms (``title_terms`` and ``ingredients_norm``, the filter fields)::

       lexical(d) = sum over t in Q & terms(d) of idf(t),  idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

   ``N`` and ``df`` counted over the pool (BM25's idf; the terms are sets, so there is no term frequency or
   length normalisation to do);
3. the candidates are ordered by ``fused(d) = 1 / (RRF_K + dense_rank(d)) + LEXICAL_WEIGHT / (RRF_K +
   lexical_rank(d))``, where a candidate matching no query term gets no lexical part (as in Qdrant's own RRF,
   where a point absent from one prefetch adds nothing for it). Ranks start at 1; equal lexical scores share
   the better rank; equal fused scores keep the dense order. A hit's ``score`` is its fused score.

The query's terms come from the same rule as the payloads (:mod:`tnlbt.data.ingredients`: title words and
ingredient words and phrases, singular, quantities and units dropped), so "Tomatoes" typed matches "2 ripe
tomatoes" stored. A query with no such term (instructions only) is ranked dense.

Why a re-rank of dense candidates and not Qdrant sparse vectors: qdrant-edge 0.9 and the server both have
sparse vectors and RRF fusion queries, but using them needs a second (sparse) named vector in every
collection -- a re-index of every existing index, and the live writes and their changes log writing it -- and
an idf over the whole collection, which the server's and qdrant-edge's IDF modifiers and qdrant-client's local
mode would each compute their own way. The re-rank reads only payload fields every index already has and is
plain Python over at most ``pool`` payloads, so a Qdrant server, its local mode and qdrant-edge give the same
ranking for the same dense candidates. Its limit: a recipe that matches the words but is not among the
``pool`` nearest dense candidates is not found (the README says so).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tnlbt.data.ingredients import ingredient_terms, title_terms
from tnlbt.index.filters import INGREDIENTS_FIELD, TITLE_FIELD

POOL = 100  # dense candidates re-ranked (the API's k is at most 100, so a full page is always re-ranked)
RRF_K = 60  # the usual RRF constant (Cormack et al. 2009; Qdrant's default too): damps the top ranks' lead
LEXICAL_WEIGHT = 1.0  # the lexical ranking counts as much as the dense one


@dataclass(frozen=True)
class Ranked:
    """One re-ranked candidate: its position in the dense order (0-based), fused and lexical scores."""

    index: int
    fused: float
    lexical: float


def query_terms(title: str, ingredients: Sequence[str]) -> list[str]:
    """The lexical terms of a text query: its title's words and its ingredient words and phrases, by the rule
    the index stored them with (sorted, unique)."""
    return sorted(set(title_terms(title)) | set(ingredient_terms(ingredients)))


def payload_terms(payload: Mapping[str, Any]) -> set[str]:
    """A point's terms: its recipe's title terms and ingredient terms (photo points carry their recipe's)."""
    return {str(t) for t in payload.get(TITLE_FIELD) or ()} | {str(t) for t in payload.get(INGREDIENTS_FIELD) or ()}


def lexical_scores(terms: Iterable[str], docs: Sequence[set[str]]) -> list[float]:
    """idf-weighted overlap of ``terms`` with each of ``docs`` (module doc, step 2), idf over ``docs``."""
    q = set(terms)
    n = len(docs)
    df = {t: sum(1 for d in docs if t in d) for t in q}
    idf = {t: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
    return [sum(idf[t] for t in q & d) for d in docs]


def rerank(terms: Iterable[str], payloads: Sequence[Mapping[str, Any]]) -> list[Ranked]:
    """Candidates in dense order (best first) -> their hybrid order (module doc, step 3)."""
    lex = lexical_scores(terms, [payload_terms(p) for p in payloads])
    ascending = sorted(lex)
    out = []
    for i, s in enumerate(lex):
        fused = 1.0 / (RRF_K + i + 1)
        if s > 0:
            lex_rank = 1 + len(lex) - bisect.bisect_right(ascending, s)  # 1 + how many score strictly higher
            fused += LEXICAL_WEIGHT / (RRF_K + lex_rank)
        out.append(Ranked(index=i, fused=fused, lexical=s))
    return sorted(out, key=lambda r: (-r.fused, r.index))


def pool_size(k: int, pool: int | None = None) -> int:
    """How many dense candidates a hybrid search of ``k`` results re-ranks (``pool`` default: :data:`POOL`)."""
    return max(int(k), int(POOL if pool is None else pool))


def search(store: Any, name: str, vector: Any, k: int, filter: dict[str, Any] | None,
           terms: Sequence[str] | None) -> list[Any]:
    """Top ``k`` :class:`~tnlbt.index.store.Hit` of ``store``'s collection ``name``: hybrid (module doc) when
    ``terms`` has a term, else dense (cosine scores, what the store returns)."""
    from tnlbt.index.store import Hit

    if not terms:
        return store.search(name, vector, k, filter)
    cands = store.search(name, vector, pool_size(k), filter)
    return [Hit(id=cands[r.index].id, score=r.fused, payload=cands[r.index].payload)
            for r in rerank(terms, [h.payload for h in cands])[:k]]
