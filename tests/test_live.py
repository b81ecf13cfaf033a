"""Live changes and filters without Ray: ingredient normalisation, the filter form on both store backends
(qdrant-client local mode and qdrant-edge), :class:`LiveIndex` writes (idempotent, concurrent, refused), the
changes log and its replay into a rebuilt index."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_search import COLOURS, _jpeg, build_tiny_index, make_tiny_run

KINDS = ["qdrant", "edge"]
PEANUT = {
    "title": "Satay peanut noodles",
    "ingredients": ["200 g rice noodles", "3 tbsp crunchy Peanut Butter", "1 lime"],
    "instructions": ["Boil the noodles.", "Stir in the sauce."],
    "metadata": {"cuisine": "thai", "minutes": 20, "vegan": "yes"},
}


# -- normalisation -----------------------------------------------------------------------------------------------
def test_ingredient_names_normalise_like_the_index():
    from tnlbt.data.ingredients import ingredient_key, ingredient_terms, singular, title_terms

    assert ingredient_key("Tomatoes") == ingredient_key("tomato") == "tomato"
    assert ingredient_key("2 cups chopped Cherry Tomatoes") == "cherry tomato"
    assert ingredient_key("2 cups") == ""
    assert [singular(w) for w in ("berries", "peaches", "eggs", "leaves", "olives", "asparagus", "swiss")] == [
        "berry", "peach", "egg", "leaf", "olive", "asparagus", "swiss"]
    terms = ingredient_terms(["2 tbsp peanut butter", "1 cup cherry tomatoes, halved", "salt and pepper to taste"])
    for t in ("peanut", "butter", "peanut butter", "cherry tomato", "tomato", "salt", "pepper"):
        assert t in terms, t
    assert "salt and pepper" not in terms and "cup" not in terms and "halved" not in terms
    assert title_terms("Spicy Tomatoes with Basil") == ["basil", "spicy", "tomato"]
    assert len(ingredient_terms([" ".join(f"w{'a' * (i % 7 + 1)}x{i}" for i in range(400))])) <= 512


def test_filter_builder_and_both_forms():
    from tnlbt.index.filters import conditions, recipe_filter

    f = recipe_filter(equals={"split": "test", "recipe_id": None}, must_include=["Tomatoes"],
                      must_exclude=["peanuts", "Peanut"], title_keywords=["Soups"], metadata={"cuisine": "thai"})
    assert f == {"must": [["split", "test"], ["ingredients_norm", "tomato"], ["title_terms", "soup"],
                          ["metadata.cuisine", "thai"]], "must_not": [["ingredients_norm", ["peanut"]]]}
    assert json.loads(json.dumps(f)) == f  # plain data: it crosses Ray
    assert conditions({"split": "test"}) == ([("split", "test")], [])  # the older flat form
    assert recipe_filter() is None
    for bad in (["2 cups"], ["!!!"], ["one two three four"]):
        with pytest.raises(ValueError):
            recipe_filter(must_include=bad)


# -- a tiny index per backend, changed live ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=KINDS)
def live(request, tmp_path_factory):
    from tnlbt.inference import Encoder

    run = make_tiny_run(tmp_path_factory.mktemp(f"live-{request.param}"))
    meta = build_tiny_index(run, store_kind=request.param)
    return request.param, run, meta, Encoder(run)


def _open(kind, run):
    from tnlbt.index.store import open_store
    from tnlbt.runs import default_store_path

    return open_store(kind, path=default_store_path(run, kind))


def _live_index(store, run):
    from tnlbt.index.changes import ChangeLog, LiveIndex, changes_dir

    return LiveIndex(store, ChangeLog(changes_dir(run)))


def _text_vec(enc, r):
    from tnlbt.inference import RecipeText

    return enc.encode_texts([RecipeText(r["title"], r["ingredients"], r.get("instructions", []))])[0]


def _photo_vec(enc, data):
    return enc.encode_tensors([enc.photo_tensor(data)])[0]


def _put_recipe_with_photo(li, enc, recipe_id: str, recipe: dict, photo: bytes) -> None:
    """A live recipe and one photo of it, ``{recipe_id}.jpg``, each embedded by the run's encoder."""
    li.put_recipe(recipe_id, _text_vec(enc, recipe), recipe)
    li.put_photo(f"{recipe_id}.jpg", _photo_vec(enc, photo), photo, recipe_id)


def test_split_index_payloads_carry_filter_fields(live):
    from tnlbt.index.store import PHOTOS, RECIPES

    kind, run, _, _ = live
    store = _open(kind, run)
    try:
        r = store.retrieve(RECIPES, ["rec003"], "recipe")[0]
        assert r["ingredients_norm"] and r["title_terms"]
        p = store.retrieve(PHOTOS, [r["image_ids"][0]], "photo")[0]
        assert p["ingredients_norm"] == r["ingredients_norm"] and p["title_terms"] == r["title_terms"]
    finally:
        store.close()


def test_filters_on_both_directions_and_peanut_exclusion(live):
    from tnlbt.index.filters import recipe_filter
    from tnlbt.index.search import IndexReader
    from tnlbt.index.store import PHOTOS, RECIPES

    kind, run, _, enc = live
    store = _open(kind, run)
    try:
        li = _live_index(store, run)
        _put_recipe_with_photo(li, enc, "peanut1", PEANUT, _jpeg(COLOURS[4], seed=77))
        reader = IndexReader(store)
        q = _text_vec(enc, PEANUT)
        everything = reader.search_recipes(q, 100)
        assert "peanut1" in {h["id"] for h in everything}
        no_nuts = reader.search_recipes(q, 100, recipe_filter(must_exclude=["Peanuts"]))
        assert no_nuts and all(not any("peanut" in s.lower() for s in h["ingredients"]) for h in no_nuts)
        assert len(no_nuts) == len(everything) - 1
        # photo search filters by the recipe each photo belongs to
        photos = reader.search_photos(q, 100, recipe_filter(must_exclude=["peanut"]))
        assert photos and "peanut1" not in {h["recipe_id"] for h in photos}
        assert [h["recipe_id"] for h in reader.search_photos(q, 100, recipe_filter(must_include=["peanuts"]))] == [
            "peanut1"]
        # include = every recipe naming it; the reference is the recipes' own lines
        rows = pq.read_table(run.parent.parent / "processed" / "test").to_pylist()
        want = {r["id"] for r in rows if any("tomato" in s for s in r["ingredients"])}
        got = {h["id"] for h in reader.search_recipes(q, 100, recipe_filter(must_include=["Tomatoes"]))}
        assert got == want and want
        both = recipe_filter(must_include=["tomato"], title_keywords=[rows[0]["title"].split()[0]])
        assert {h["id"] for h in reader.search_recipes(q, 100, both)} == {
            r["id"] for r in rows if r["id"] in want and rows[0]["title"].split()[0] in r["title"].split()}
        for meta_f, n in (({"cuisine": "thai"}, 1), ({"minutes": 20}, 1), ({"vegan": "yes"}, 1), ({"cuisine": "x"}, 0)):
            assert len(reader.search_recipes(q, 100, recipe_filter(metadata=meta_f))) == n, meta_f
            assert len(reader.search_photos(q, 100, recipe_filter(metadata=meta_f))) == n, meta_f
        assert store.count(RECIPES) == 25 and store.count(PHOTOS) == 37
        li.delete_recipe("peanut1")
        assert store.count(RECIPES) == 24 and store.count(PHOTOS) == 36  # its photo went with it
    finally:
        store.close()


def test_live_writes_are_idempotent_linked_and_served(live):
    from tnlbt.index.changes import UnknownItem
    from tnlbt.index.search import IndexReader
    from tnlbt.index.store import PHOTOS, RECIPES

    kind, run, _, enc = live
    store = _open(kind, run)
    try:
        li = _live_index(store, run)
        reader = IndexReader(store, blobs=li.changes)
        n_r, n_p = store.count(RECIPES), store.count(PHOTOS)
        r = {"title": "lemon chicken rice", "ingredients": ["2 chicken breasts", "1 cup rice"], "instructions": []}
        assert li.put_recipe("new1", _text_vec(enc, r), r) is False
        assert li.put_recipe("new1", _text_vec(enc, r), r) is True  # same id: replaced, not duplicated
        assert store.count(RECIPES) == n_r + 1
        assert reader.search_recipes(_text_vec(enc, r), 1)[0]["id"] == "new1"
        photo = _jpeg(COLOURS[2], seed=99)
        li.put_photo("new1-a.jpg", _photo_vec(enc, photo), photo, "new1")
        li.put_photo("new1-a.jpg", _photo_vec(enc, photo), photo, "new1")
        assert store.count(PHOTOS) == n_p + 1
        assert reader.get_recipe("new1")["image_ids"] == ["new1-a.jpg"]
        assert reader.get_image("new1-a.jpg") == photo
        hit = reader.search_photos(_photo_vec(enc, photo), 1)[0]
        assert (hit["image_id"], hit["recipe_id"], hit["title"]) == ("new1-a.jpg", "new1", r["title"])
        # the recipe changes: its photo's copies follow
        r2 = {**r, "title": "lemon chicken soup", "ingredients": ["2 chicken breasts", "1 lemon"]}
        li.put_recipe("new1", _text_vec(enc, r2), r2)
        p = store.retrieve(PHOTOS, ["new1-a.jpg"], "photo")[0]
        assert p["title"] == r2["title"] and "lemon" in p["ingredients_norm"] and "rice" not in p["ingredients_norm"]
        assert reader.get_recipe("new1")["image_ids"] == ["new1-a.jpg"]
        # refused: nothing logged, nothing changed
        lines = li.changes.path.read_text().count("\n")
        blobs = sorted(li.changes.blobs.iterdir())
        with pytest.raises(UnknownItem):
            li.put_photo("x.jpg", _photo_vec(enc, photo), photo + b"other bytes", "no-such-recipe")
        assert sorted(li.changes.blobs.iterdir()) == blobs  # a refused photo leaves no file
        for bad in ("../x", "a/b", "", "x" * 129, ".hidden", "a..b"):
            with pytest.raises(ValueError):
                li.put_recipe(bad, _text_vec(enc, r), r)
        assert li.changes.path.read_text().count("\n") == lines and store.count(PHOTOS) == n_p + 1
        # a photo moves to another recipe, then goes
        li.put_recipe("new2", _text_vec(enc, r), r)
        li.put_photo("new1-a.jpg", _photo_vec(enc, photo), photo, "new2")
        assert reader.get_recipe("new1")["image_ids"] == [] and reader.get_recipe("new2")["image_ids"] == ["new1-a.jpg"]
        assert li.delete_photo("new1-a.jpg") is True and li.delete_photo("new1-a.jpg") is False
        assert reader.get_recipe("new2")["image_ids"] == [] and reader.get_image("new1-a.jpg") is None
        assert li.delete_recipe("new1") and li.delete_recipe("new2") and not li.delete_recipe("new2")
        assert (store.count(RECIPES), store.count(PHOTOS)) == (n_r, n_p)
        for line in li.changes.path.read_text().splitlines():  # whole lines, ids only, no vectors
            rec = json.loads(line)
            assert rec["op"] and rec["id"] and "vector" not in rec
    finally:
        store.close()


def test_concurrent_puts_to_one_id_end_in_one_version(live):
    from tnlbt.index.store import RECIPES

    kind, run, _, enc = live
    store = _open(kind, run)
    try:
        li = _live_index(store, run)
        n = store.count(RECIPES)
        versions = [{"title": f"version {i} cake", "ingredients": [f"{i} egg", "flour"]} for i in range(8)]
        vecs = [_text_vec(enc, v) for v in versions]
        threads = [threading.Thread(target=li.put_recipe, args=("race", vecs[i], versions[i])) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.count(RECIPES) == n + 1
        got = store.retrieve(RECIPES, ["race"], "recipe")[0]
        last = [json.loads(x) for x in li.changes.path.read_text().splitlines() if '"race"' in x][-1]
        assert got["title"] == last["recipe"]["title"]  # the log's last line is the state
        i = versions.index(next(v for v in versions if v["title"] == got["title"]))
        np.testing.assert_allclose(store.search(RECIPES, vecs[i], 1)[0].score, 1.0, atol=1e-4)
        li.delete_recipe("race")
    finally:
        store.close()


def test_replay_keeps_live_changes_in_a_rebuilt_index(live):
    import pyarrow as pa

    from tnlbt.index.changes import replay_with_encoder
    from tnlbt.index.embed import PhotoEmbedder, RecipeEmbedder, load_into_store
    from tnlbt.index.search import IndexReader
    from tnlbt.index.store import PHOTOS, RECIPES

    kind, run, _, enc = live
    store = _open(kind, run)
    try:
        li = _live_index(store, run)
        photo = _jpeg(COLOURS[5], seed=5)
        _put_recipe_with_photo(li, enc, "keep1", PEANUT, photo)
        li.put_photo("orphan.jpg", _photo_vec(enc, photo), photo)  # a photo without a recipe
        _put_recipe_with_photo(li, enc, "gone1", PEANUT, photo)
        li.delete_recipe("gone1")
        li.delete_recipe("rec001")  # a recipe of the split: the rebuild must not bring it back
        before = {c: store.count(c) for c in (RECIPES, PHOTOS)}
        ckpt = str(run / "checkpoints" / "best")
        table = pq.read_table(run.parent.parent / "processed" / "test")
        recipes = pa.concat_tables([RecipeEmbedder(ckpt)(table.slice(i, 10)) for i in range(0, len(table), 10)])
        photos = PhotoEmbedder(ckpt)(table)
        info = load_into_store(store, recipes, photos, "v2", keep=2,
                               before_publish=lambda st, built: replay_with_encoder(st, built, run, ckpt))
        # the module's whole log, compacted: keep1 is the only recipe put that was not deleted later
        assert (info["changes"]["recipes"], info["changes"]["photos"], info["changes"]["skipped"]) == (1, 2, 0)
        assert store.resolve(RECIPES).endswith("__v2")
        assert {c: store.count(c) for c in (RECIPES, PHOTOS)} == before
        reader = IndexReader(store, blobs=li.changes)
        assert reader.get_recipe("rec001") is None and reader.get_recipe("gone1") is None
        assert reader.get_recipe("keep1")["image_ids"] == ["keep1.jpg"]
        assert reader.get_image("orphan.jpg") == photo and reader.get_image("gone1.jpg") is None
        p = store.retrieve(PHOTOS, ["keep1.jpg"], "photo")[0]
        assert "peanut" in p["ingredients_norm"] and p["metadata"]["cuisine"] == "thai"
    finally:
        store.close()


def test_a_torn_last_line_is_skipped(tmp_path):
    from tnlbt.index.changes import ChangeLog

    log = ChangeLog(tmp_path)
    log.append({"op": "delete_recipe", "id": "a"})
    with log.path.open("ab") as f:
        f.write(b'{"op": "delete_recipe", "id": "b"')  # a crash mid-append
    log.append({"op": "delete_recipe", "id": "c"})  # on a line of its own, not glued to the torn one
    log.append({"op": "bogus", "id": "d"})
    log.append({"op": "delete_recipe", "id": "../etc"})
    assert [r["id"] for r in log.records()] == ["a", "c"]
    sha = log.write_blob(b"abc")
    assert log.read_blob(sha) == b"abc" and log.read_blob("../../etc/passwd") is None


def test_index_run_replays_the_log_before_publishing(tmp_path, monkeypatch):
    """The hook in ``tnlbt index`` (``index_run``): a recipe added and one deleted through the live path stay
    that way in the next full index."""
    from tnlbt.config import IndexConfig, StoreConfig
    from tnlbt.index import embed
    from tnlbt.index.search import IndexReader
    from tnlbt.inference import Encoder

    def embed_here(ckpt, data_dir, split="test", **_kw):
        table = pq.read_table(f"{data_dir}/{split}")
        return embed.RecipeEmbedder(str(ckpt))(table), embed.PhotoEmbedder(str(ckpt))(table).drop_columns(
            ["skipped"]), 0

    monkeypatch.setattr(embed, "embed_for_index", embed_here)
    run = make_tiny_run(tmp_path)
    cfg = IndexConfig(store=StoreConfig(kind="edge"))
    first = embed.index_run(run, index=cfg)
    assert "changes" not in first  # no log yet: nothing replayed, no encoder loaded for it
    enc = Encoder(run)
    store = _open("edge", run)
    try:
        li = _live_index(store, run)
        li.put_recipe("added1", _text_vec(enc, PEANUT), PEANUT)
        li.delete_recipe("rec002")
    finally:
        store.close()
    second = embed.index_run(run, index=cfg)
    assert second["changes"] == {"recipes": 1, "photos": 0, "deleted": 1, "skipped": 0}
    reader = IndexReader.from_run(run)
    try:
        assert reader.get_recipe("added1")["title"] == PEANUT["title"] and reader.get_recipe("rec002") is None
        assert reader.store.resolve("recipes").endswith(second["version"])
    finally:
        reader.close()
