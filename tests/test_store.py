"""Vector stores: top-k equals numpy brute force (both stores), idempotent re-indexing, atomic alias switch,
keep-N pruning."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tnlbt.index.embed import load_into_store
from tnlbt.index.search import brute_force_topk
from tnlbt.index.store import (
    PHOTOS,
    RECIPES,
    EdgeStore,
    IndexNotFound,
    QdrantStore,
    build_collection,
    new_version,
    open_store,
    photo_point_id,
    prune,
    publish,
    recipe_point_id,
)

STORES = ["qdrant-memory", "qdrant-path", "edge-plain", "edge-hnsw"]


def make_store(kind: str, tmp_path):
    if kind == "qdrant-memory":
        return open_store("qdrant")
    if kind == "qdrant-path":
        return open_store("qdrant", path=str(tmp_path / "q"))
    if kind == "edge-plain":
        return open_store("edge", path=str(tmp_path / "e"))
    # HNSW on from 500 points, so the graph index (not a full scan) answers the queries below.
    return EdgeStore(str(tmp_path / "e"), hnsw_min_points=500)


def data(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = [f"img{i:05d}" for i in range(n)]
    payloads = [
        {"image_id": s, "recipe_id": f"r{i // 2}", "split": "test" if i % 3 else "val"}
        for i, s in enumerate(ids)
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
        if kind == "edge-hnsw":
            recall.append(len(set(got) & set(want)) / k)
        else:  # exact search: same ids in the same order, same cosine scores
            assert got == want
            np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-4)
        # filtered search agrees with brute force on the filtered subset
        sub = [i for i, p in enumerate(pl) if p["split"] == "val"]
        fidx, _ = brute_force_topk(x[sub], q, k)
        fhits = store.search(PHOTOS, q, k, filter={"split": "val"})
        assert all(h.payload["split"] == "val" for h in fhits)
        if kind != "edge-hnsw":
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
