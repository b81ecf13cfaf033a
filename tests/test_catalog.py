"""``tnlbt index --catalog``: a hand-style catalog with good and bad rows is indexed with exact counts, its items
are searchable and served, and every version carries a lineage record (``GET /v1/info`` reads it).

The embedding runs in this process (the Ray Data UDF called directly, as in test_index_lifecycle) except in
the one ``ray`` test, which runs the real actor pool.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_search import COLOURS, _jpeg, make_tiny_run

from tnlbt.config import IndexConfig, StoreConfig
from tnlbt.data.catalog import CatalogLimits, photo_id, photo_relpath, read_catalog, write_catalog
from tnlbt.data.ingredients import recipe_terms
from tnlbt.index import embed


@pytest.fixture()
def no_ray_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    """``embed_catalog`` with the actor pool replaced by the same UDF called in this process."""

    def embed_here(ckpt, tables, photos_root, index, **_kw):
        udf = embed.CatalogEmbedder(str(ckpt), photos_root, index.max_photo_bytes)
        parts = [udf(t) for t in tables if len(t)]
        return embed.split_catalog_output(pa.concat_tables(parts))

    monkeypatch.setattr(embed, "embed_catalog", embed_here)


GOOD = [
    {"id": "r1", "title": "tomato basil soup", "ingredients": ["4 Tomatoes, chopped", "1 cup basil"],
     "instructions": ["boil the tomato", "stir for 10 minutes"], "photos": ["dish/r1.jpg"],
     "metadata": {"cuisine": "italian", "price": 4.5}},
    {"id": "r2", "title": "chocolate cake", "ingredients": ["2 cups flour", "1 cup sugar", "3 eggs"],
     "instructions": "mix the flour\nbake in the oven", "photos": ["dish/r2a.jpg", "dish/r2b.png"]},
    {"id": 3, "title": "peanut rice", "ingredients": ["1 cup rice", "2 tbsp peanut butter"],
     "instructions": ["boil the rice"], "photos": ["../outside.jpg", "/etc/passwd", "dish/missing.jpg"]},
    {"id": "r4", "title": "garlic chicken", "ingredients": ["1 lb chicken", "garlic"], "instructions": [],
     "photos": ["dish/r1.jpg", "dish/link.jpg", "dish/broken.jpg", "dish/big.jpg"]},
    {"id": "r5", "title": "x" * 1000, "ingredients": ["salt"], "instructions": ["serve"]},
]


def hand_catalog(root: Path) -> tuple[Path, Path]:
    """catalog.jsonl + photos/ with every kind of bad row and photo (expected counts in the tests below)."""
    photos = root / "photos"
    (photos / "dish").mkdir(parents=True)
    (photos / "dish" / "r1.jpg").write_bytes(_jpeg(COLOURS[0]))
    (photos / "dish" / "r2a.jpg").write_bytes(_jpeg(COLOURS[1]))
    from PIL import Image

    Image.new("RGB", (60, 40), (10, 200, 30)).save(photos / "dish" / "r2b.png")
    (photos / "dish" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (photos / "dish" / "big.jpg").write_bytes(_jpeg(COLOURS[2]) + b"\0" * 10000)  # over max_photo_bytes below
    secret = root / "secret.jpg"
    secret.write_bytes(_jpeg(COLOURS[3]))
    os.symlink(secret, photos / "dish" / "link.jpg")  # a link out of the photos folder
    (root / "outside.jpg").write_bytes(_jpeg(COLOURS[4]))
    (photos / "loose1.jpg").write_bytes(_jpeg(COLOURS[5]))  # named by no row: a photo without a recipe
    (photos / "notes.txt").write_text("not a photo")
    lines = [json.dumps(r) for r in GOOD]
    lines += [
        "{not json",  # invalid_json
        json.dumps({"title": "no id", "ingredients": ["salt"]}),  # missing_id
        json.dumps({"id": "r1", "title": "again", "ingredients": ["salt"]}),  # duplicate_id
        json.dumps({"id": "r6", "title": "", "ingredients": [], "photos": ["dish/r1.jpg"]}),  # empty_recipe
        json.dumps({"id": "r7", "title": "t", "ingredients": "x", "metadata": [1]}),  # bad_type
        "[1, 2]",  # not_object
        json.dumps({"id": "r8", "title": "deep", "metadata": {"a": [[[[[[[[[[1]]]]]]]]]]}}),  # too_deep (limit 8)
        json.dumps({"id": "r9", "title": "long", "ingredients": ["y" * 3000]}),  # row_too_long (limit 2048)
        "",  # blank lines are not rows
        '{"id": "r10", "title": "lone \\udc80 surrogate"}',  # invalid_utf8 (valid JSON, not Unicode)
    ]
    cat = root / "catalog.jsonl"
    cat.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "r11", "title": "bad \xff byte"}\n')
    return cat, photos


LIMITS = CatalogLimits(max_row_bytes=2048, max_json_depth=8, max_title_chars=300)


def test_reader_counts_every_row_and_photo(tmp_path):
    cat, photos = hand_catalog(tmp_path)
    items = list(read_catalog(cat, LIMITS, photos))
    report = items[-1]
    rows = pa.concat_tables(items[:-1]).to_pylist()
    recipes = [r for r in rows if r["kind"] == "recipe"]
    assert [r["id"] for r in recipes] == ["r1", "r2", "3", "r4", "r5"]
    assert report.skipped.counts == {
        "invalid_json": 1, "missing_id": 1, "duplicate_id": 1, "empty_recipe": 1, "bad_type": 1,
        "not_object": 1, "too_deep": 1, "row_too_long": 1, "invalid_utf8": 2,
    }
    assert report.rows == 15 == report.recipes + report.skipped.total()  # the blank line is not a row
    assert report.skipped.examples["duplicate_id"] == ["line 8 (id 'r1')"]
    assert report.truncated.counts == {"long_title": 1} and len(recipes[4]["title"]) == 300
    # photo references: 1 + 2 + 3 + 4 listed; refused by path before any file is opened: ../ and /etc/passwd;
    # r4 names r1's photo again (duplicate_photo); loose: the folder's photo no row names (not notes.txt)
    assert report.photos_listed == 10
    assert report.photos_refused.counts == {"outside_photos": 2, "duplicate_photo": 1}
    assert report.loose_photos == 1 and rows[-1]["kind"] == "photo" and rows[-1]["photo_paths"] == ["loose1.jpg"]
    by_id = {r["id"]: r for r in recipes}
    # the filters' one rule (tnlbt/data/ingredients.py, tested in test_live.py): words and short phrases
    assert by_id["r1"]["ingredients_norm"] == ["basil", "tomato"]
    assert by_id["3"]["ingredients_norm"] == ["butter", "peanut", "rice", "peanut butter"]
    assert json.loads(by_id["r1"]["metadata"]) == {"cuisine": "italian", "price": 4.5}
    assert by_id["r2"]["instructions"] == ["mix the flour", "bake in the oven"]  # one text -> lines
    assert by_id["r2"]["photo_ids"] == [photo_id("dish/r2a.jpg"), photo_id("dish/r2b.png")]


def test_photo_paths_cannot_leave_the_folder():
    assert photo_relpath("dish/./a.jpg") == "dish/a.jpg"
    for bad in ("../a.jpg", "dish/../../a.jpg", "/etc/passwd", "C:/x.jpg", "a\\..\\b.jpg", "a\x00.jpg", "", "./"):
        assert photo_relpath(bad) is None, bad
    pid = photo_id("dish/r1.JPG")
    assert pid.endswith(".jpg") and len(pid) == 24
    from tnlbt.index.search import ImageSource

    assert ImageSource.valid_id(pid)


def _index(run: Path, cat: Path, photos: Path, **kw) -> dict:
    cfg = IndexConfig(keep=2, max_photo_bytes=8192, catalog_max_row_bytes=2048, store=StoreConfig(kind="edge"))
    return embed.index_run(run, index=cfg, catalog=cat, photos=photos, **kw)


def test_index_a_hand_catalog_with_exact_counts_and_lineage(tmp_path, no_ray_catalog, monkeypatch):
    from tnlbt.index.search import Searcher
    from tnlbt.runs import content_sha256, live_lineage, read_index_meta

    run = make_tiny_run(tmp_path)
    # the run's depth limit is 64: make the reader's limits the ones the counts above assume
    monkeypatch.setattr(CatalogLimits, "from_configs", classmethod(lambda cls, data, index: LIMITS))
    cat, photos = hand_catalog(tmp_path)
    meta = _index(run, cat, photos)
    c = meta["catalog"]
    assert (c["rows"], c["recipes"], c["rows_skipped"]) == (15, 5, 10)
    # photos: r1, r2a, r2b and loose1 decode; refused by path 3; unreadable: missing, link out, corrupt, too big
    assert c["photos_unreadable"]["counts"] == {"corrupt": 1, "missing_file": 1, "outside_root": 1, "too_large": 1}
    assert (c["photos_indexed"], c["photos_recipe"], c["photos_loose"], c["photos_skipped"]) == (4, 3, 1, 7)
    assert c["photos_listed"] + c["loose_photos"] == c["photos_indexed"] + c["photos_skipped"]
    assert (meta["recipes"], meta["photos"]) == (5, 4)
    recorded = read_index_meta(run)
    assert recorded["catalog"] == c and recorded["split"] == "catalog"
    lin = live_lineage(run)
    assert lin == recorded["lineage"] and lin["version"] == meta["version"]
    assert lin["checkpoint"]["sha256"] == content_sha256(run / "checkpoints" / "best" / "model.safetensors")
    assert lin["checkpoint"]["metrics"]["test"]["1k"]["image_to_recipe"]["R@1"] == 0.05
    assert lin["source"] == {"kind": "catalog", "catalog": str(cat.resolve()), "photos": str(photos.resolve()),
                             "sha256": content_sha256(cat)}
    assert lin["counts"]["catalog"]["rows"] == 15 and lin["gate"]["passed"]
    assert json.loads((run / "index" / meta["version"] / "lineage.json").read_text()) == lin

    # GET /v1/info serves it (the real SearchIndex method behind the route), and the UI's model card shows it
    from fastapi.testclient import TestClient
    from test_api_hostile import _Handle
    from tnlbt.serve.app import load_model_card
    from tnlbt.serve.deployments import SearchIndex, SearchService, build_api_app

    index = SearchIndex.func_or_class(str(run), store={"kind": "edge"})
    try:
        svc = SearchService(_Handle(), _Handle(), _Handle(info=index.info))
        r = TestClient(build_api_app(svc)).get("/v1/info")
        assert r.status_code == 200 and r.json() == {"version": meta["version"], "lineage": lin}
    finally:
        index.reader.close()
    notes = load_model_card(run)["notes"]
    assert lin["checkpoint"]["sha256"][:12] in notes and "Publish gate: passed" in notes

    s = Searcher.from_run(run)
    try:
        hits = s.search_text("tomato basil soup", k=10)
        assert {h["image_id"] for h in hits} == {photo_id(p) for p in
                                                 ("dish/r1.jpg", "dish/r2a.jpg", "dish/r2b.png", "loose1.jpg")}
        loose = next(h for h in hits if h["image_id"] == photo_id("loose1.jpg"))
        assert loose["recipe_id"] == ""
        r1 = s.reader.store.retrieve("recipes", ["r1"], "recipe")[0]
        assert r1["ingredients_norm"] == ["basil", "tomato"] and r1["metadata"]["cuisine"] == "italian"
        assert r1["image_ids"] == [photo_id("dish/r1.jpg")]
        p = s.reader.store.retrieve("photos", [photo_id("dish/r1.jpg")], "photo")[0]
        assert p["recipe_id"] == "r1" and p["ingredients_norm"] == ["basil", "tomato"]  # filterable by recipe
        # photos are served from the catalog folder, by id only
        assert s.reader.get_image(photo_id("dish/r1.jpg")) == (photos / "dish" / "r1.jpg").read_bytes()
        assert s.reader.get_image(photo_id("dish/link.jpg")) is None  # never indexed (points outside)
        assert s.reader.get_recipe("3")["title"] == "peanut rice"
    finally:
        s.close()


def test_synth_writes_a_catalog_that_indexes(tmp_path, no_ray_catalog):
    from tnlbt.cli import main

    out = tmp_path / "synth"
    cat = tmp_path / "cat.jsonl"
    assert main(["synth", "--out", str(out), "--recipes", "40", "--workers", "1", "--image-size", "64",
                 "--catalog", str(cat)]) == 0
    rows = [json.loads(x) for x in cat.read_text().splitlines()]
    assert rows and all(r["metadata"] == {"split": "test"} for r in rows)
    assert all((out / "images" / p).is_file() for r in rows for p in r["photos"])
    run = make_tiny_run(tmp_path / "r")
    meta = _index(run, cat, out / "images", loose_photos=False)
    n_photos = sum(len(r["photos"]) for r in rows)
    assert (meta["recipes"], meta["photos"]) == (len(rows), n_photos)
    assert meta["catalog"]["rows_skipped"] == 0 and meta["catalog"]["loose_photos"] == 0


def test_bad_arguments_fail_in_one_line(tmp_path, capsys):
    from tnlbt.cli import main

    run = make_tiny_run(tmp_path)
    assert main(["index", "--run", str(run), "--catalog", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    cat = write_catalog(tmp_path / "c.jsonl", GOOD[:1])
    assert main(["index", "--run", str(run), "--catalog", str(cat), "--photos", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["index", "--run", str(run), "--photos", str(tmp_path)]) == 2
    assert "--photos goes with --catalog" in capsys.readouterr().err


# -- the publish gate ------------------------------------------------------------------------------------------
def test_gate_compares_recall_on_the_same_canary_and_checks_counts():
    import numpy as np

    from tnlbt.index import gate
    from tnlbt.index.gate import Embeddings

    rng = np.random.default_rng(0)
    n = 40
    rids = [f"r{i}" for i in range(n)]
    pids = [f"p{i}.jpg" for i in range(n)]
    base = rng.normal(size=(n, 16)).astype(np.float32)
    ok_counts = {"recipes": {"stored": n, "embedded": n}, "photos": {"stored": n, "embedded": n}}
    # live: each recipe's vector sits next to its photo's (recall@1 = 1)
    live = Embeddings(rids, base, pids, base + 0.01 * rng.normal(size=base.shape).astype(np.float32))
    pairs = gate.sample_pairs(rids, rids, pids, 25)
    assert len(pairs) == 25 and pairs == gate.sample_pairs(list(reversed(rids)), rids, pids, 25)  # by id, not order
    assert gate.recall_at_k(live, pairs, 1) == 1.0
    # a good new version passes; a broken one (random recipe vectors) is refused
    ok = gate.check(Embeddings(rids, base, pids, base), live, ok_counts, pairs, k=1, margin=0.05, live_version="v1")
    assert ok["passed"] and ok["new_recall"] == ok["live_recall"] == 1.0 and ok["compared_pairs"] == 25
    broken = Embeddings(rids, rng.normal(size=(n, 16)).astype(np.float32), pids, base)
    bad = gate.check(broken, live, ok_counts, pairs, k=1, margin=0.05, live_version="v1")
    assert not bad["passed"] and bad["new_recall"] < 0.5 and "below the live version" in bad["reasons"][0]
    assert "REFUSED" in gate.format_report(bad) and "live version v1" in gate.format_report(bad)
    # recall@k with k = all photos finds everything: the broken version's drop is a ranking, not a lookup error
    assert gate.recall_at_k(broken, pairs, n) == 1.0
    # a generous margin lets the same drop through; a count that differs from what was embedded never does
    assert gate.check(broken, live, ok_counts, pairs, k=1, margin=1.0)["passed"]
    short = gate.check(live, live, {**ok_counts, "recipes": {"stored": n, "embedded": n + 1}}, pairs, k=1)
    assert not short["passed"] and short["reasons"] == [f"recipes: {n} points stored, {n + 1} embedded"]
    # the comparison uses only the pairs both versions hold
    half = Embeddings(rids[:20], base[:20], pids[:20], base[:20])
    part = gate.check(half, live, ok_counts, pairs, k=1)
    assert part["passed"] and part["compared_pairs"] == len([p for p in pairs if int(p.recipe_id[1:]) < 20])
    other = Embeddings([f"x{i}" for i in range(n)], base, [f"y{i}" for i in range(n)], base)
    nothing = gate.check(other, live, ok_counts, pairs, k=1)
    assert nothing["passed"] and nothing["compared_pairs"] == 0 and "nothing to compare" in nothing["note"]
    # a live version that cannot be read is not silently skipped; the floor applies without a live version
    unread = gate.check(live, None, ok_counts, pairs, k=1, live_version="v1", live_error="gone")
    assert not unread["passed"] and "cannot be measured" in unread["reasons"][0]
    assert not gate.check(broken, None, ok_counts, pairs, k=1, min_recall=0.9)["passed"]


def test_canary_file_errors_name_the_line(tmp_path):
    from tnlbt.index.gate import Pair, read_canary

    f = tmp_path / "canary.jsonl"
    f.write_text('{"recipe_id": "r1", "photo_ids": ["a.jpg"]}\n\n{"recipe_id": "r2", "image_ids": ["b.jpg"]}\n')
    assert read_canary(f) == [Pair("r1", ("a.jpg",)), Pair("r2", ("b.jpg",))]
    f.write_text('{"recipe_id": "r1", "photo_ids": ["a.jpg"]}\n{"recipe_id": "r2"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_canary(f)
    f.write_text("")
    with pytest.raises(ValueError, match="no canary pairs"):
        read_canary(f)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model trained for 24 steps on the toy data of test_train_loop (~20 s): its recipe -> photo
    recall@3 on the toy catalog below is far above a randomised model's, so the gate has something to guard."""
    import torch
    from test_train_loop import make_toy_processed, tiny_cfg

    from tnlbt.train.ray_trainer import fit_local

    tmp = tmp_path_factory.mktemp("trained")
    data = make_toy_processed(tmp / "processed")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit_local(tiny_cfg(tmp, data, "train.epochs=3", "train.max_steps_per_epoch=8", "train.run_name=good"),
                  data, None)
    finally:
        torch.set_num_threads(n)
    return tmp / "runs" / "good"


def toy_catalog(root: Path, n: int = 24) -> Path:
    """Recipes in the toy data's words (class c: w{4c}..w{4c+3}) with one photo of the class colour each."""
    import numpy as np
    from test_train_loop import _jpeg as toy_jpeg

    colours = np.random.default_rng(99).uniform(0, 255, (8, 3))
    rng = np.random.default_rng(5)
    (root / "photos").mkdir(parents=True)
    rows = []
    for i in range(n):
        c = i % 8
        (root / "photos" / f"t{i}.jpg").write_bytes(toy_jpeg(colours[c], rng))
        rows.append({"id": f"t{i}", "title": f"w{4 * c} w{4 * c + 1}",
                     "ingredients": [f"w{4 * c + 2}", f"w{int(rng.integers(40))}"],
                     "instructions": [f"w{4 * c + 3} w{int(rng.integers(40))}"], "photos": [f"photos/t{i}.jpg"]})
    return write_catalog(root / "catalog.jsonl", rows)


def _randomise_weights(ckpt: Path) -> None:
    """A deliberately broken checkpoint: every weight replaced by noise of the same scale (same file, same
    architecture, so it loads and embeds; it has just learnt nothing)."""
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(123)
    sd = load_file(ckpt / "model.safetensors")
    for k, t in sd.items():
        if t.is_floating_point():
            sd[k] = torch.randn(t.shape, generator=g, dtype=t.dtype) * (t.float().std() if t.numel() > 1 else 1.0)
    save_file(sd, ckpt / "model.safetensors")


def test_a_broken_checkpoint_is_refused_and_the_old_version_keeps_serving(
    tmp_path, trained_run, no_ray_catalog, monkeypatch, capsys
):
    import shutil

    from tnlbt.cli import main
    from tnlbt.index.gate import GateRefused
    from tnlbt.index.search import Searcher
    from tnlbt.index.store import PHOTOS, RECIPES, open_store
    from tnlbt.runs import checkpoint_drift, live_lineage, read_index_meta

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cat = toy_catalog(tmp_path)
    cfg = IndexConfig(keep=3, gate_k=3, store=StoreConfig(kind="edge"))
    first = embed.index_run(run, index=cfg, catalog=cat)
    assert first["gate"]["passed"] and first["gate"]["live_version"] is None  # nothing live: nothing to compare
    assert first["gate"]["new_recall"] >= 0.9, first["gate"]
    serving = Searcher.from_run(run)  # a running server: the good model and the published version
    try:
        before = [serving.search_text(f"w{4 * c} w{4 * c + 1}", k=5) for c in range(3)]
        _randomise_weights(run / "checkpoints" / "best")
        with pytest.raises(GateRefused) as refused:
            embed.index_run(run, index=cfg, catalog=cat)
        r = refused.value.report
        assert not r["passed"] and r["live_version"] == first["version"] and r["compared_pairs"] == 24
        assert r["new_recall"] < r["live_recall"] - cfg.gate_margin, r
        # the live aliases, index.json and the lineage are untouched; the server answers as before
        assert read_index_meta(run)["version"] == first["version"] and live_lineage(run) == first["lineage"]
        assert [serving.search_text(f"w{4 * c} w{4 * c + 1}", k=5) for c in range(3)] == before
        assert serving.reader.store.resolve(RECIPES) == first["collections"][RECIPES]
        # a server (re)started now would load the replaced weights: the lineage hash catches it
        assert "not the one index version" in (checkpoint_drift(run) or "")
        # the CLI says the same with exit 3 and the comparison
        monkeypatch.setattr("tnlbt.ray_init.ensure_ray", lambda *a, **k: None)
        assert main(["index", "--run", str(run), "--catalog", str(cat), "--store", "edge",
                     "--gate-margin", "0.05"]) == 3
        err = capsys.readouterr().err
        assert "publish gate: REFUSED" in err and f"live version {first['version']}" in err
        assert read_index_meta(run)["version"] == first["version"]
        # --force publishes it anyway, and the lineage says so (and which weights)
        forced = embed.index_run(run, index=cfg, catalog=cat, force=True)
        lin = live_lineage(run)
        assert lin["version"] == forced["version"] != first["version"]
        assert lin["gate"]["forced"] and not lin["gate"]["passed"]
        assert lin["checkpoint"]["sha256"] != first["lineage"]["checkpoint"]["sha256"]
        assert lin["checkpoint"]["metrics"]["best_val"]["val/R@1"] >= 0  # from the run's metrics.jsonl
        assert checkpoint_drift(run) is None
    finally:
        serving.close()
    store = open_store("edge", path=str(run / "edge"))
    try:
        assert store.aliases()[PHOTOS] == forced["collections"][PHOTOS]
    finally:
        store.close()


@pytest.mark.ray  # ~30 s: actor start-up dominates
def test_catalog_on_a_ray_data_actor_pool(ray_session, tmp_path, monkeypatch):
    """The real pool: the same counts as in-process, and the same vectors as the UDF called here."""
    import numpy as np
    import pyarrow.compute as pc

    run = make_tiny_run(tmp_path)
    monkeypatch.setattr(CatalogLimits, "from_configs", classmethod(lambda cls, data, index: LIMITS))
    cat, photos = hand_catalog(tmp_path)
    cfg = IndexConfig(keep=1, actors=1, batch_size=2, max_photo_bytes=8192, store=StoreConfig(kind="edge"))
    meta = embed.index_run(run, index=cfg, catalog=cat, photos=photos)
    c = meta["catalog"]
    assert (c["rows"], c["recipes"], c["rows_skipped"], c["photos_indexed"], c["photos_skipped"]) == (15, 5, 10, 4, 7)
    emb = pq.read_table(meta["embeddings"])
    items = list(read_catalog(cat, LIMITS, photos))
    local = embed.CatalogEmbedder(str(run / "checkpoints" / "best"), str(photos), 8192)(pa.concat_tables(items[:-1]))
    want = {(m, i): v for m, i, v in zip(local["modality"].to_pylist(), local["id"].to_pylist(),
                                         local["vector"].to_pylist(), strict=True) if m != "skip"}
    got = emb.filter(pc.invert(pc.equal(emb["modality"], "skip")))
    assert len(got) == len(want) == 9
    for m, i, v in zip(got["modality"].to_pylist(), got["id"].to_pylist(), got["vector"].to_pylist(), strict=True):
        np.testing.assert_allclose(v, want[(m, i)], atol=1e-5)


def test_a_split_index_is_filterable_by_the_same_ingredient_names(tmp_path):
    from test_search import build_tiny_index

    from tnlbt.index.store import open_store

    run = make_tiny_run(tmp_path, n_recipes=6)
    t = pq.read_table(tmp_path / "processed" / "test")
    both = embed.IndexEmbedder(str(run / "checkpoints" / "best"))(t)
    rows = both.to_pylist()
    want = {r["id"]: recipe_terms(r["title"], r["ingredients"])["ingredients_norm"] for r in t.to_pylist()}
    assert all(r["ingredients_norm"] == want[r["recipe_id"]] for r in rows)  # recipes and their photos
    build_tiny_index(run, store_kind="edge")
    store = open_store("edge", path=str(run / "edge"))
    try:
        rec = store.retrieve("recipes", ["rec000"], "recipe")[0]
        photo = store.retrieve("photos", [rec["image_ids"][0]], "photo")[0]
        assert rec["ingredients_norm"] == photo["ingredients_norm"] == want["rec000"] != []
    finally:
        store.close()


def test_lines_over_the_limit_are_skipped_as_they_stream_past():
    import io

    from tnlbt.data.catalog import iter_lines

    big = b"x" * (3 << 20)  # spans several 1 MiB reads
    data = b'{"a": 1}\n' + big + b"\n\n" + b'{"b": 2}\n' + big + b'\n{"c": 3}'  # last line without newline
    got = list(iter_lines(io.BytesIO(data), 1 << 20))
    assert got == [(1, b'{"a": 1}'), (2, None), (3, b""), (4, b'{"b": 2}'), (5, None), (6, b'{"c": 3}')]
    assert list(iter_lines(io.BytesIO(b"abc"), 2)) == [(1, None)]


def test_a_folder_of_photos_without_recipes_is_an_index(tmp_path, no_ray_catalog):
    from tnlbt.index.search import Searcher

    run = make_tiny_run(tmp_path)
    photos = tmp_path / "dishes"
    (photos / "a").mkdir(parents=True)
    for i in range(3):
        (photos / "a" / f"{i}.jpg").write_bytes(_jpeg(COLOURS[i]))
    (photos / os.fsdecode(b"bad\xffname.jpg")).write_bytes(_jpeg(COLOURS[3]))  # not UTF-8: refused, counted
    cat = tmp_path / "empty.jsonl"
    cat.write_text("")
    meta = _index(run, cat, photos)
    assert (meta["recipes"], meta["photos"], meta["catalog"]["rows"], meta["catalog"]["loose_photos"]) == (0, 3, 0, 4)
    assert meta["catalog"]["photos_refused"]["counts"] == {"bad_file_name": 1}
    assert "recall not measured" in meta["gate"]["note"]
    s = Searcher.from_run(run)
    try:
        assert s.reader.ready() == {"recipes": 0, "photos": 3}
        assert len(s.search_text("tomato soup", k=5)) == 3
        assert s.search_image(_jpeg(COLOURS[0]), k=5) == []
    finally:
        s.close()
