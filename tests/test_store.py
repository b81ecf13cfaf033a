"""Vector stores: top-k equals numpy brute force (both stores), idempotent re-indexing, atomic alias switch,
keep-N pruning, HNSW / int8 settings reaching the engines (and their recall)."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest

from tnlbt.index.embed import load_into_store
from tnlbt.index.search import brute_force_topk
from tnlbt.index.store import (
    PHOTOS,
    RECIPES,
    EdgeStore,
    IndexNotFound,
    IndexSettings,
    QdrantStore,
    build_collection,
    new_version,
    open_store,
    photo_point_id,
    prune,
    publish,
    recipe_point_id,
)

STORES = ["qdrant-memory", "qdrant-path", "edge-plain", "edge-hnsw", "edge-int8"]
APPROXIMATE = {"edge-hnsw", "edge-int8"}


def make_store(kind: str, tmp_path):
    if kind == "qdrant-memory":
        return open_store("qdrant")
    if kind == "qdrant-path":
        return open_store("qdrant", path=str(tmp_path / "q"))
    if kind == "edge-plain":
        return open_store("edge", path=str(tmp_path / "e"))
    # HNSW on from 500 points, so the graph index (not a full scan) answers the queries below.
    if kind == "edge-int8":
        return EdgeStore(str(tmp_path / "e"), settings=IndexSettings(quantization="int8", full_scan_points=500))
    return EdgeStore(str(tmp_path / "e"), hnsw_min_points=500)


def data(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = [f"img{i:05d}" for i in range(n)]
    payloads = [
        {"image_id": s, "recipe_id": f"r{i // 2}", "split": "test" if i % 3 else "val"} for i, s in enumerate(ids)
    ]
    return x, ids, payloads


def test_point_ids_are_deterministic_uuids():
    assert photo_point_id("abc.jpg") == photo_point_id("abc.jpg")
    assert photo_point_id("abc") != recipe_point_id("abc")  # kinds never collide
    assert len(recipe_point_id("x")) == 36


@pytest.mark.parametrize("kind", STORES)
def test_topk_equals_numpy_brute_force(kind, tmp_path):
    n, d, k = 1500, 24, 10
    x, ids, pl = data(n, d)
    store = make_store(kind, tmp_path)
    coll = build_collection(store, PHOTOS, new_version(), [photo_point_id(i) for i in ids], x, pl)
    publish(store, {PHOTOS: coll})
    rng = np.random.default_rng(1)
    recall = []
    for _ in range(20):
        q = rng.standard_normal(d).astype(np.float32)
        hits = store.search(PHOTOS, q, k)
        idx, scores = brute_force_topk(x, q, k)
        want = [ids[i] for i in idx]
        got = [h.id for h in hits]
        if kind in APPROXIMATE:
            recall.append(len(set(got) & set(want)) / k)
        else:  # exact search: same ids in the same order, same cosine scores
            assert got == want
            np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-4)
        # filtered search agrees with brute force on the filtered subset
        sub = [i for i, p in enumerate(pl) if p["split"] == "val"]
        fidx, _ = brute_force_topk(x[sub], q, k)
        fhits = store.search(PHOTOS, q, k, filter={"split": "val"})
        assert all(h.payload["split"] == "val" for h in fhits)
        if kind not in APPROXIMATE:
            assert [h.id for h in fhits] == [ids[sub[i]] for i in fidx]
    if recall:
        assert np.mean(recall) >= 0.95, recall
    store.close()


@pytest.mark.parametrize("kind", ["qdrant-memory", "edge-plain"])
def test_reindex_same_ids_keeps_count(kind, tmp_path):
    x, ids, pl = data(300, 8)
    store = make_store(kind, tmp_path)
    coll = build_collection(store, PHOTOS, "v1", [photo_point_id(i) for i in ids], x, pl)
    publish(store, {PHOTOS: coll})
    # same points upserted again into the same collection: overwritten, not duplicated
    store.upsert(coll, [photo_point_id(i) for i in ids], x * 2, pl, batch_size=64)
    assert store.count(PHOTOS) == 300
    # a full rebuild under a new version has the same count, and the alias moves to it
    coll2 = build_collection(store, PHOTOS, "v2", [photo_point_id(i) for i in ids], x, pl)
    publish(store, {PHOTOS: coll2})
    assert store.count(PHOTOS) == 300
    assert store.aliases()[PHOTOS] == coll2
    store.close()


@pytest.mark.parametrize("kind", ["qdrant-memory", "edge-plain"])
def test_prune_keeps_newest_and_live(kind, tmp_path):
    x, ids, pl = data(50, 8)
    store = make_store(kind, tmp_path)
    for v in ("v1", "v2", "v3", "v4"):
        c = build_collection(store, PHOTOS, v, [photo_point_id(i) for i in ids], x, pl)
    publish(store, {PHOTOS: c})
    dropped = prune(store, [PHOTOS], keep=2)
    assert sorted(dropped) == ["photos__v1", "photos__v2"]
    assert store.versions(PHOTOS) == ["photos__v3", "photos__v4"]
    # the live version survives even when keep would drop it
    publish(store, {PHOTOS: "photos__v3"})
    c5 = build_collection(store, PHOTOS, "v5", [photo_point_id(i) for i in ids], x, pl)
    assert prune(store, [PHOTOS], keep=1) == ["photos__v4"]
    assert set(store.versions(PHOTOS)) == {"photos__v3", c5}
    store.close()


def test_unpublished_name_raises_index_not_found(tmp_path):
    store = open_store("qdrant")
    with pytest.raises(IndexNotFound):
        store.search(PHOTOS, np.ones(4), 3)
    edge = open_store("edge", path=str(tmp_path / "e"))
    with pytest.raises(IndexNotFound):
        edge.search(PHOTOS, np.ones(4), 3)


@pytest.mark.parametrize("kind", ["qdrant-memory", "edge-plain"])
def test_alias_switch_is_atomic_for_readers(kind, tmp_path):
    """A reader querying while a new version is being written always sees a complete version."""
    n_old, n_new, d = 400, 900, 16
    x_old, ids_old, pl_old = data(n_old, d, seed=1)
    x_new, ids_new, pl_new = data(n_new, d, seed=2)
    store = make_store(kind, tmp_path)
    publish(
        store,
        {PHOTOS: build_collection(store, PHOTOS, "v1", [photo_point_id(i) for i in ids_old], x_old, pl_old)},
    )
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(store.count(PHOTOS))
            except BaseException as e:  # any failure is a test failure
                errors.append(e)
            time.sleep(0.001)

    t = threading.Thread(target=reader)
    t.start()
    try:
        # small batches make the build long enough for the reader to run during it
        coll = versioned_build = build_collection(
            store, PHOTOS, "v2", [photo_point_id(i) for i in ids_new], x_new, pl_new, batch_size=32
        )
        time.sleep(0.02)
        assert store.count(PHOTOS) == n_old  # built but not yet published: readers still see v1
        publish(store, {PHOTOS: versioned_build})
        time.sleep(0.02)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:1]
    assert len(seen) > 5
    assert set(seen) <= {n_old, n_new}, sorted(set(seen))  # never a partial count
    assert seen[0] == n_old and seen[-1] == n_new
    assert store.aliases()[PHOTOS] == coll
    store.close()


def test_load_into_store_builds_both_collections_and_is_idempotent():
    import pyarrow as pa

    rng = np.random.default_rng(0)
    rv = rng.standard_normal((5, 8)).astype(np.float32)
    pv = rng.standard_normal((7, 8)).astype(np.float32)
    recipes = pa.table(
        {
            "id": [f"r{i}" for i in range(5)],
            "vector": pa.array(list(rv), pa.list_(pa.float32())),
            "title": [f"t{i}" for i in range(5)],
            "ingredients": [["a", "b"]] * 5,
            "instructions": ["do"] * 5,
            "image_ids": [["p0"]] * 5,
            "split": ["test"] * 5,
        }
    )
    photos = pa.table(
        {
            "id": [f"p{i}" for i in range(7)],
            "recipe_id": [f"r{i % 5}" for i in range(7)],
            "vector": pa.array(list(pv), pa.list_(pa.float32())),
            "title": ["t"] * 7,
            "split": ["test"] * 7,
        }
    )
    store = QdrantStore()
    a = load_into_store(store, recipes, photos, "v1", keep=2)
    b = load_into_store(store, recipes, photos, "v2", keep=2)
    assert (a["recipes"], a["photos"]) == (5, 7) == (b["recipes"], b["photos"])
    assert store.count(RECIPES) == 5 and store.count(PHOTOS) == 7
    hit = store.search(RECIPES, rv[3], 1)[0]
    assert hit.id == "r3" and hit.payload["ingredients"] == ["a", "b"]
    assert store.retrieve(PHOTOS, ["p6", "nope"], "photo")[0]["recipe_id"] == "r1"
    assert store.retrieve(PHOTOS, ["nope"], "photo") == [None]


# -- HNSW / int8 settings -----------------------------------------------------------------------------------
def clustered(n: int, d: int, n_queries: int, seed: int = 0):
    """Unit vectors around 40 centres with a shared mean direction (like trained embeddings, unlike uniform
    noise), and held-out queries from the same mixture."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(d).astype(np.float32) * 0.5
    centres = rng.standard_normal((40, d)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        x = mean + centres[rng.integers(0, 40, m)] + 0.5 * rng.standard_normal((m, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(n), draw(n_queries)


def build_photos(store, x):
    ids = [f"img{i:05d}" for i in range(len(x))]
    pl = [{"image_id": s, "recipe_id": s, "split": "test"} for s in ids]
    publish(store, {PHOTOS: build_collection(store, PHOTOS, "v1", [photo_point_id(i) for i in ids], x, pl)})
    return ids


def test_index_settings_parse_env_and_validation():
    st = IndexSettings.parse(["hnsw_ef=64", "quantization=INT8", "rescore=false", "oversampling=3", "hnsw_m=8.0"])
    assert (st.hnsw_ef, st.quantization, st.rescore, st.oversampling, st.hnsw_m) == (64, "int8", False, 3.0, 8)
    assert IndexSettings() == IndexSettings.from_env({})
    d = IndexSettings()
    assert (d.quantization, d.on_disk_vectors, d.rescore, d.oversampling) == ("int8", True, True, 2.0)
    assert (d.hnsw_m, d.ef_construct, d.hnsw_ef, d.full_scan_points) == (16, 100, 256, None)
    env = {"TNLBT_INDEX_FULL_SCAN_POINTS": "500", "TNLBT_INDEX_EXACT": "yes", "PATH": "/bin"}
    assert IndexSettings.from_env(env) == IndexSettings(full_scan_points=500, exact=True)
    assert IndexSettings.parse({"full_scan_points": "none"}).full_scan_points is None
    for bad, key in [
        (["hnsw_ef=0"], "hnsw_ef"),
        (["quantization=pq"], "quantization"),
        (["rescore=maybe"], "rescore"),
        (["oversampling=0.5"], "oversampling"),
        (["hnsw_ef=1.5"], "hnsw_ef"),
        (["ef=64"], "ef"),
        (["hnsw_ef"], "hnsw_ef"),
    ]:
        with pytest.raises(ValueError, match=key):
            IndexSettings.parse(bad)
    with pytest.raises(ValueError, match="unknown index setting 'nope'"):
        IndexSettings.from_env({"TNLBT_INDEX_NOPE": "1"})


def test_open_store_reads_settings_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TNLBT_INDEX_QUANTIZATION", "none")
    monkeypatch.setenv("TNLBT_INDEX_HNSW_EF", "48")
    edge = open_store("edge", path=str(tmp_path / "e"))
    assert (edge.settings.quantization, edge.settings.hnsw_ef) == ("none", 48)
    assert open_store("qdrant").settings.quantization == "none"
    # explicit settings win over the environment
    assert open_store("qdrant", settings=IndexSettings()).settings.quantization == "int8"
    monkeypatch.setenv("TNLBT_INDEX_HNSW_EF", "lots")
    with pytest.raises(ValueError, match="hnsw_ef"):
        open_store("qdrant")


def test_edge_settings_reach_the_engine(tmp_path):
    x, _ = clustered(1200, 32, 0)
    st = IndexSettings(hnsw_m=8, ef_construct=40, full_scan_points=300, quantization="int8", quantile=0.95)
    store = EdgeStore(str(tmp_path / "e"), settings=st)
    build_photos(store, x)
    info = store.describe(PHOTOS)
    # what qdrant-edge recorded for the shard, not what we asked for
    assert info["hnsw"]["m"] == 8 and info["hnsw"]["ef_construct"] == 40
    assert info["hnsw"]["full_scan_threshold"] == 300 * 32 * 4 // 1024
    assert info["quantization"]["scalar"]["type"] == "int8" and info["quantization"]["scalar"]["quantile"] == 0.95
    assert info["hnsw_built"] and info["indexed_vectors"] == 1200 and info["quantized_segments"] >= 1
    store.close()
    # a reader with other search-time settings sees the build settings recorded with the collection
    reader = EdgeStore(str(tmp_path / "e"), settings=IndexSettings(hnsw_ef=32, rescore=False))
    info = reader.describe(PHOTOS)
    assert info["built_with"]["quantization"] == "int8" and info["built_with"]["hnsw_m"] == 8
    assert info["search"] == {"hnsw_ef": 32, "exact": False, "rescore": False, "oversampling": 2.0}
    reader.close()
    # below full_scan_points: no graph and no int8 copy, exact search
    small = EdgeStore(str(tmp_path / "s"), settings=st)
    build_photos(small, x[:200])
    info = small.describe(PHOTOS)
    assert not info["hnsw_built"] and info["quantized_segments"] == 0
    small.close()


def test_qdrant_store_sends_settings_and_local_mode_ignores_them(monkeypatch):
    st = IndexSettings(hnsw_m=32, ef_construct=200, full_scan_points=1000, quantization="int8", hnsw_ef=77)
    store = QdrantStore(settings=st)
    sent = {}
    create = store.client.create_collection
    monkeypatch.setattr(store.client, "create_collection", lambda name, **kw: (sent.update(kw), create(name, **kw))[1])
    x, q = clustered(300, 16, 5)
    ids = build_photos(store, x)
    hnsw, quant = sent["hnsw_config"], sent["quantization_config"]
    assert (hnsw.m, hnsw.ef_construct, hnsw.full_scan_threshold) == (32, 200, 1000 * 16 * 4 // 1024)
    assert quant.scalar.type.value == "int8" and quant.scalar.quantile == 0.99 and quant.scalar.always_ram
    # local mode (":memory:" / a folder) drops both configs: it is exact brute force in Python
    info = store.describe(PHOTOS)
    assert info["quantization"] is None and info["hnsw"]["m"] == 16 and info["mode"].startswith("local")
    calls = []
    query = store.client.query_points
    monkeypatch.setattr(store.client, "query_points", lambda *a, **kw: (calls.append(kw), query(*a, **kw))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # local mode warns on every query given search_params: we send none
        hits = store.search(PHOTOS, q[0], 10)
    assert calls[-1]["search_params"] is None
    assert [h.id for h in hits] == [ids[i] for i in brute_force_topk(x, q[0], 10)[0]]  # exact whatever the settings
    # against a server the search-time settings go with every query
    store.url = "http://qdrant.invalid:6333"
    sp = store._search_params(10)
    assert (sp.hnsw_ef, sp.exact, sp.quantization.rescore, sp.quantization.oversampling) == (77, False, True, 2.0)
    assert store._search_params(100).hnsw_ef == 100  # never below k
    store.close()


def test_int8_recall_and_rescoring_vs_brute_force(tmp_path):
    """HNSW + int8 on clustered vectors: recall@10 vs numpy; rescoring gives exact cosines; exact=True is the
    brute-force twin (same ids in the same order, same scores)."""
    n, d, k = 3000, 64, 10
    x, q = clustered(n, d, 40, seed=2)
    store = EdgeStore(str(tmp_path / "e"), settings=IndexSettings(quantization="int8", full_scan_points=500))
    ids = build_photos(store, x)
    pos = {s: i for i, s in enumerate(ids)}
    assert store.describe(PHOTOS)["quantized_segments"] >= 1
    base = store.settings

    def run(**change):
        store.settings = IndexSettings.parse(change, base)
        rec, err = [], []
        for v in q:
            hits = store.search(PHOTOS, v, k)
            idx, _ = brute_force_topk(x, v, k)
            rec.append(len({ids[i] for i in idx} & {h.id for h in hits}) / k)
            err += [abs(h.score - float(x[pos[h.id]] @ v)) for h in hits]
        return float(np.mean(rec)), float(np.max(err))

    recall_rescored, err_rescored = run(rescore=True, oversampling=2.0)
    recall_raw, err_raw = run(rescore=False, oversampling=1.0)
    assert recall_rescored >= 0.95, recall_rescored
    assert recall_raw >= 0.85, recall_raw
    assert err_rescored < 1e-4  # rescored: the scores are the float32 cosines
    assert err_raw > 1e-4  # not rescored: int8 approximations (so the rescore switch reaches the engine)
    store.settings = IndexSettings.parse({"exact": True}, base)
    for v in q[:10]:
        idx, scores = brute_force_topk(x, v, k)
        hits = store.search(PHOTOS, v, k)
        assert [h.id for h in hits] == [ids[i] for i in idx]
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-4)
    store.close()


@pytest.mark.parametrize("kind", STORES)
def test_recipe_filters_equal_brute_force_on_every_store(kind, tmp_path):
    """``must_include`` / ``must_exclude`` / ``title_keywords`` / ``metadata`` (tnlbt.index.filters) give the same
    points on every backend: exact stores the brute-force top-k of the matching subset, the HNSW ones only
    matching points with high recall; and point-level writes (delete, set_payload, find) act the same."""
    from tnlbt.index.filters import recipe_filter

    n, d, k = 1500, 24, 10
    rng = np.random.default_rng(3)
    x, ids, pl = data(n, d, seed=3)
    names = ["tomato", "peanut", "basil", "egg", "peanut butter", "rice"]
    for p in pl:
        p["ingredients_norm"] = sorted(set(rng.choice(names, 2).tolist()))
        p["title_terms"] = ["soup"] if rng.random() < 0.3 else ["cake"]
        p["metadata"] = {"cuisine": str(rng.choice(["thai", "italian"])), "minutes": int(rng.integers(1, 4)) * 10}
    store = make_store(kind, tmp_path)
    coll = build_collection(store, PHOTOS, new_version(), [photo_point_id(i) for i in ids], x, pl)
    publish(store, {PHOTOS: coll})
    cases = [
        (dict(must_exclude=["Peanuts"]), lambda p: "peanut" not in p["ingredients_norm"]),
        (dict(must_include=["Tomatoes", "egg"]), lambda p: {"tomato", "egg"} <= set(p["ingredients_norm"])),
        (dict(must_include=["rice"], title_keywords=["Soups"]), lambda p: "rice" in p["ingredients_norm"]
         and p["title_terms"] == ["soup"]),
        (dict(metadata={"cuisine": "thai", "minutes": 20}, must_exclude=["basil", "peanut butter"]),
         lambda p: p["metadata"] == {"cuisine": "thai", "minutes": 20}
         and not {"basil", "peanut butter"} & set(p["ingredients_norm"])),
    ]
    recall = []
    for flt, keep in cases:
        sub = [i for i, p in enumerate(pl) if keep(p)]
        assert 20 < len(sub) < n
        for _ in range(5):
            q = rng.standard_normal(d).astype(np.float32)
            fidx, _ = brute_force_topk(x[sub], q, k)
            want = [ids[sub[i]] for i in fidx]
            got = [h.id for h in store.search(PHOTOS, q, k, recipe_filter(**flt))]
            assert all(keep(pl[int(g[3:])]) for g in got), (flt, got)
            if kind in APPROXIMATE:
                recall.append(len(set(got) & set(want)) / k)
            else:
                assert got == want, flt
    if recall:
        assert np.mean(recall) >= 0.9, recall
    # point-level writes, as the live changes use them
    found = store.find(PHOTOS, {"must": [["recipe_id", "r7"]]})
    assert sorted(p["image_id"] for _, p in found) == ["img00014", "img00015"]
    store.set_payload(PHOTOS, [pid for pid, _ in found], {"title_terms": ["pie"]})
    assert len(store.search(PHOTOS, x[14], 5, recipe_filter(title_keywords=["pie"]))) == 2
    store.delete(PHOTOS, ["img00014", "no-such-photo"], "photo")
    assert store.count(PHOTOS) == n - 1 and store.retrieve(PHOTOS, ["img00014"], "photo") == [None]
    store.close()
