"""Hybrid ranking of text queries (:mod:`tnlbt.index.hybrid`): a hand-worked example, a brute-force twin on
a small index, the same answer from qdrant-client's local mode and qdrant-edge, the request option (422 for a
bad value) and ``tnlbt search --include/--exclude/--no-hybrid``. No Ray."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from test_api_hostile import _Handle
from test_search import WORDS, build_tiny_index, make_tiny_run

DIM = 8
N = 40


def _twin(terms: list[str], cands: list[tuple[str, set[str]]]) -> list[tuple[str, float]]:
    """The module doc's ranking written out as loops: candidates (id, terms) in dense order -> (id, fused)."""
    n, q = len(cands), set(terms)

    def idf(t: str) -> float:
        df = sum(1 for _, d in cands if t in d)
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    lex = [sum(idf(t) for t in q if t in d) for _, d in cands]
    fused = []
    for i in range(n):
        f = 1 / (60 + i + 1)
        if lex[i] > 0:
            f += 1.0 / (60 + 1 + sum(1 for j in range(n) if lex[j] > lex[i]))
        fused.append(f)
    order = sorted(range(n), key=lambda i: (-fused[i], i))
    return [(cands[i][0], fused[i]) for i in order]


def test_hand_worked_example():
    from tnlbt.index.hybrid import rerank

    # dense order A, B, C; "tomato" in B and C: idf = ln(1 + 1.5 / 2.5), B and C share lexical rank 1
    payloads = [{"title_terms": ["soup"]}, {"ingredients_norm": ["tomato"]},
                {"title_terms": ["tomato"], "ingredients_norm": ["basil"]}]
    got = rerank(["tomato"], payloads)
    assert [r.index for r in got] == [1, 2, 0]
    assert [round(r.fused, 6) for r in got] == [round(1 / 62 + 1 / 61, 6), round(1 / 63 + 1 / 61, 6),
                                                round(1 / 61, 6)]
    assert got[0].lexical == pytest.approx(math.log(1.6)) and got[2].lexical == 0
    # no matching term anywhere: the dense order, untouched
    assert [r.index for r in rerank(["pear"], payloads)] == [0, 1, 2]


def test_query_terms_follow_the_filter_rule():
    from tnlbt.data.ingredients import recipe_terms
    from tnlbt.index.hybrid import payload_terms, query_terms

    q = query_terms("Tomato Soups", ["2 cups chopped Tomatoes", "peanut butter"])
    assert q == sorted({"tomato", "soup", "peanut", "butter", "peanut butter"})
    stored = payload_terms(recipe_terms("Tomato soup", ["3 ripe tomatoes", "2 tbsp peanut butter"]))
    assert set(q) <= stored | {"ripe"}
    assert query_terms("", []) == []


def _points(seed: int = 0) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    from tnlbt.data.ingredients import recipe_terms

    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(N, DIM)).astype(np.float32)
    ids, payloads = [], []
    for i in range(N):
        w = rng.choice(WORDS[:14], 5, replace=False)
        title, ingredients = f"{w[0]} {w[1]}", [f"1 cup {w[2]}", f"{w[3]}", f"2 tbsp {w[4]}"]
        ids.append(f"img{i:03d}")
        payloads.append({"image_id": ids[-1], "recipe_id": f"r{i:03d}", "title": title, "split": "test",
                         **recipe_terms(title, ingredients)})
    return ids, vecs, payloads


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from tnlbt.config import IndexSettings
    from tnlbt.index.store import PHOTOS, build_collection, open_store, photo_point_id, publish

    pytest.importorskip("qdrant_edge")
    ids, vecs, payloads = _points()
    out = {"qdrant": open_store("qdrant", path=None, settings=IndexSettings()),
           "edge": open_store("edge", path=str(tmp_path_factory.mktemp("edge")), settings=IndexSettings())}
    for s in out.values():
        coll = build_collection(s, PHOTOS, "v1", [photo_point_id(i) for i in ids], vecs, payloads)
        publish(s, {PHOTOS: coll})
    yield out, (ids, vecs, payloads)
    for s in out.values():
        s.close()


def _brute(vecs: np.ndarray, payloads: list[dict[str, Any]], q: np.ndarray, terms: list[str], k: int,
           pool: int, keep: Any = None) -> list[tuple[str, float]]:
    from tnlbt.index.hybrid import payload_terms
    from tnlbt.index.search import brute_force_topk

    rows = [i for i in range(len(vecs)) if keep is None or keep(payloads[i])]
    idx, _ = brute_force_topk(vecs[rows], q, max(k, pool))
    cands = [(payloads[rows[i]]["image_id"], payload_terms(payloads[rows[i]])) for i in idx]
    return _twin(terms, cands)[:k]


@pytest.mark.parametrize("k", [5, 40])
@pytest.mark.parametrize("kind", ["qdrant", "edge"])
def test_hybrid_equals_brute_force_twin(stores, kind, k):
    from tnlbt.index import hybrid
    from tnlbt.index.store import PHOTOS

    out, (_, vecs, payloads) = stores
    q = np.random.default_rng(7).normal(size=DIM).astype(np.float32)
    terms = hybrid.query_terms("tomato soup", ["basil", "2 cups flour"])
    hits = hybrid.search(out[kind], PHOTOS, q, k, None, terms)
    want = _brute(vecs, payloads, q, terms, k, hybrid.POOL)
    assert [h.id for h in hits] == [w[0] for w in want]
    np.testing.assert_allclose([h.score for h in hits], [w[1] for w in want], rtol=1e-12)
    # the lexical part moved something: this is not the dense order
    assert [h.id for h in hits] != [h.id for h in out[kind].search(PHOTOS, q, k)]


def test_small_pool_and_filter_same_on_both_backends(stores, monkeypatch):
    from tnlbt.index import hybrid
    from tnlbt.index.filters import recipe_filter
    from tnlbt.index.store import PHOTOS

    out, (_, vecs, payloads) = stores
    monkeypatch.setattr(hybrid, "POOL", 12)  # re-rank only the 12 nearest: the pool bounds what is found
    flt = recipe_filter(must_exclude=["Tomatoes"])
    got = {}
    for kind, s in out.items():
        for seed in range(5):
            q = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
            terms = hybrid.query_terms("basil flour", ["sugar"])
            hits = hybrid.search(s, PHOTOS, q, 6, flt, terms)
            want = _brute(vecs, payloads, q, terms, 6, 12,
                          keep=lambda p: "tomato" not in p["ingredients_norm"])
            assert [(h.id, round(h.score, 12)) for h in hits] == [(w, round(f, 12)) for w, f in want], kind
            assert all("tomato" not in h.payload["ingredients_norm"] for h in hits)
            got.setdefault(seed, []).append([h.id for h in hits])
    assert all(a == b for a, b in got.values())  # qdrant-client local mode == qdrant-edge


def test_no_terms_is_dense(stores):
    from tnlbt.index import hybrid
    from tnlbt.index.store import PHOTOS

    s = stores[0]["edge"]
    q = np.ones(DIM, np.float32)
    dense = s.search(PHOTOS, q, 5)
    for terms in (None, []):
        assert [(h.id, h.score) for h in hybrid.search(s, PHOTOS, q, 5, None, terms)] == \
            [(h.id, h.score) for h in dense]


# -- the request option -------------------------------------------------------------------------------------
def _client(default: bool) -> tuple[Any, Any]:
    from fastapi.testclient import TestClient
    from tnlbt.serve.deployments import SearchService, build_api_app

    text = _Handle(encode=lambda q: [1.0, 0.0, 0.0, 0.0], dim=lambda: 4)
    image = _Handle(encode_photo=lambda d: [0.0, 1.0, 0.0, 0.0], dim=lambda: 4)
    index = _Handle(search_photos=lambda v, k, f, terms=None: [], search_recipes=lambda v, k, f, terms=None: [],
                    ready=lambda: {"recipes": 1, "photos": 1})
    svc = SearchService(text, image, index, request_timeout_s=5.0, hybrid=default)
    return TestClient(build_api_app(svc), raise_server_exceptions=False), index


@pytest.mark.parametrize("bad", ["yes", "true", 1, 0, "maybe", [True], {"on": True}])
def test_bad_hybrid_value_is_a_short_422(bad):
    c, index = _client(True)
    r = c.post("/v1/search/text", json={"title": "tomato soup", "hybrid": bad})
    assert r.status_code == 422, r.text
    assert "hybrid" in r.json()["detail"] and len(r.text) < 2000
    assert index.calls["search_photos"] == []


@pytest.mark.parametrize("default", [True, False])
def test_hybrid_option_and_server_default(default):
    from tnlbt.index.hybrid import query_terms

    c, index = _client(default)
    body = {"title": "Tomato Soup", "ingredients": ["2 cups basil"]}
    want = query_terms("Tomato Soup", ["2 cups basil"])
    for opt, terms in ((None, want if default else None), (True, want), (False, None)):
        r = c.post("/v1/search/text", json={**body, **({} if opt is None else {"hybrid": opt})})
        assert r.status_code == 200, r.text
        assert index.calls["search_photos"][-1][3] == terms, opt
    # free text: the same one-box rule as the encoder gets (first line title, later lines ingredients)
    assert c.post("/v1/search/text", json={"text": "tomato soup\nbasil", "hybrid": True}).status_code == 200
    assert index.calls["search_photos"][-1][3] == ["basil", "soup", "tomato"]


def test_plain_method_validates_hybrid_too():
    import asyncio

    from fastapi import HTTPException
    from tnlbt.serve.deployments import SearchService

    text = _Handle(encode=lambda q: [1.0, 0.0], dim=lambda: 2)
    index = _Handle(search_photos=lambda v, k, f, terms=None: [])
    svc = SearchService(text, _Handle(), index, request_timeout_s=5.0)
    with pytest.raises(HTTPException) as e:
        asyncio.run(svc.search_text_hits({"title": "cake"}, 3, None, "yes"))
    assert e.value.status_code == 422


def test_serve_config_default_and_override():
    from tnlbt.config import HYBRID_DEFAULT, ConfigError, ServeConfig

    assert ServeConfig.from_args({"run": "r"}).hybrid is HYBRID_DEFAULT
    assert ServeConfig.from_args({"run": "r", "hybrid": None}).hybrid is HYBRID_DEFAULT
    assert ServeConfig.from_args({"run": "r", "hybrid": False}).hybrid is False
    with pytest.raises(ConfigError):
        ServeConfig.from_args({"run": "r", "hybrid": "sometimes"})


# -- tnlbt search --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp("hyb"))
    build_tiny_index(run)
    return run


def _cli_hits(capsys: Any, argv: list[str]) -> list[str]:
    from tnlbt.cli import main

    assert main(argv) == 0
    out = capsys.readouterr().out
    return [ln.split("recipe ", 1)[1].split(":", 1)[0] for ln in out.splitlines() if "recipe rec" in ln]


def test_cli_include_exclude_and_hybrid_flags(tiny_run, capsys):
    from tnlbt.cli import main
    from tnlbt.data.ingredients import ingredient_terms
    from tnlbt.index.search import Searcher

    base = ["search", "--run", str(tiny_run), "--text", "tomato basil soup", "-k", "24"]
    s = Searcher.from_run(tiny_run)  # closed before the CLI runs: one process per embedded store folder
    try:
        ingr = {h["id"]: set(ingredient_terms(h["ingredients"])) for h in
                (s.reader.get_recipe(f"rec{i:03d}") for i in range(24))}
        want = {m: [h["recipe_id"] for h in s.search_text("tomato basil soup", 5, hybrid=m)] for m in (True, False)}
    finally:
        s.close()
    assert len(_cli_hits(capsys, base)) == 24
    no = _cli_hits(capsys, [*base, "--exclude", "Tomatoes, basil", "--exclude", "flour"])
    assert no and all(not ({"tomato", "basil", "flour"} & ingr[r]) for r in no)
    yes = _cli_hits(capsys, [*base, "--include", "sugar"])
    assert yes and all("sugar" in ingr[r] for r in yes)
    assert _cli_hits(capsys, [*base, "-k", "5", "--no-hybrid"]) == want[False]
    assert _cli_hits(capsys, [*base, "-k", "5", "--hybrid"]) == want[True] == _cli_hits(capsys, [*base, "-k", "5"])
    # a term that names no ingredient: one line on stderr, exit 2, before anything is loaded
    assert main([*base, "--include", "2 cups"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tnlbt search:") and err.count("\n") == 1


@pytest.mark.parametrize(("flag", "want"), [([], True), (["--no-hybrid"], False), (["--hybrid"], True)])
def test_serve_flag_sets_the_default(tmp_path, monkeypatch, flag, want):
    import tnlbt.serve.app as app

    from tnlbt.cli import main
    from tnlbt.config import HYBRID_DEFAULT

    seen = {}
    monkeypatch.setattr(app, "serve_until_interrupted", lambda cfg, **kw: seen.setdefault("cfg", cfg) and 0)
    assert main(["serve", "--run", str(tmp_path), *flag]) == 0
    assert seen["cfg"].hybrid is (HYBRID_DEFAULT if not flag else want)
