"""Encoder / index build / Searcher / ``tnlbt search`` on a tiny randomly initialised model.

``make_tiny_run`` and ``build_tiny_index`` are shared with the Serve, UI and browser tests: a run directory
with a ``tiny_test`` checkpoint (saved with ``save_model``), a processed test split written straight from the
Arrow schema (colourful 48-px JPEGs), and an index built without Ray by calling the Ray Data UDFs directly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

WORDS = [
    "tomato",
    "basil",
    "soup",
    "chocolate",
    "cake",
    "flour",
    "sugar",
    "butter",
    "egg",
    "milk",
    "salt",
    "pepper",
    "garlic",
    "onion",
    "chicken",
    "rice",
    "beans",
    "lemon",
    "pasta",
    "cheese",
    "bake",
    "boil",
    "stir",
    "mix",
    "chop",
    "serve",
    "oven",
    "pan",
    "minutes",
    "cream",
]
COLOURS = [
    (200, 30, 30),
    (30, 160, 40),
    (40, 60, 200),
    (220, 200, 40),
    (120, 40, 160),
    (30, 180, 190),
    (240, 140, 20),
    (90, 90, 90),
]


def _jpeg(colour: tuple[int, int, int], size: int = 48, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(
        np.uint8
    )
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_tiny_run(root: Path, n_recipes: int = 24, seed: int = 0) -> Path:
    """RUN/checkpoints/best (tiny_test model), ROOT/processed/test/part-00000.parquet, metrics and curves."""
    from tnlbt.config import Config
    from tnlbt.data.schema import rows_to_table
    from tnlbt.data.vocab import Vocab, encode_recipe_text
    from tnlbt.models import create_model, save_model

    root = Path(root)
    processed = root / "processed"
    cfg = Config.load("tiny_test", [f"data.processed_dir={processed}", f"data.raw_dir={root / 'raw'}"])
    tokens = ["<pad>", "<start>", "<end>", *WORDS, "<unk>"]
    names = WORDS[:12]
    import torch

    torch.manual_seed(seed)
    model = create_model(cfg, len(tokens), len(names))
    run = root / "runs" / "tiny"
    save_model(run / "checkpoints" / "best", model, cfg, tokens, names)
    vocab = Vocab.load(run / "checkpoints" / "best" / "vocab.json")
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_recipes):
        w = rng.choice(WORDS, 8, replace=False)
        title = f"{w[0]} {w[1]} {w[2]}"
        ingredients = [f"1 cup {w[3]}", f"2 tbsp {w[4]}", f"{w[5]}"]
        instructions = [f"{w[6]} the {w[3]}", f"{w[7]} for 10 minutes"]
        n_img = 1 + i % 2
        image_ids = [f"{i:04x}{j}abcdef.jpg" for j in range(n_img)]
        images = [_jpeg(COLOURS[(i + j) % len(COLOURS)], seed=i * 10 + j) for j in range(n_img)]
        rows.append(
            {
                "id": f"rec{i:03d}",
                "partition": "test",
                "has_image": True,
                **encode_recipe_text(vocab, cfg.data, title, ingredients, instructions),
                "ingredient_labels": [int(x) for x in rng.choice(len(names), 2, replace=False)],
                "image_ids": image_ids,
                "images": images,
                "title": title,
                "ingredients": ingredients,
                "instructions": instructions,
            }
        )
    (processed / "test").mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_to_table(rows), processed / "test" / "part-00000.parquet")
    (run / "metrics_test.json").write_text(
        json.dumps({"1k": {"image_to_recipe": {"medR": 12.0, "R@1": 0.05, "R@5": 0.2, "R@10": 0.35}}})
    )
    return run


def build_tiny_index(run: Path, store_kind: str = "qdrant", version: str = "v1") -> dict:
    """Embed the tiny test split with the Ray Data UDFs (called directly, no Ray) and publish an index."""
    import pyarrow as pa

    from tnlbt.index.embed import PhotoEmbedder, RecipeEmbedder, load_into_store, write_embeddings
    from tnlbt.index.store import open_store
    from tnlbt.runs import default_store_path, write_index_meta

    ckpt = str(run / "checkpoints" / "best")
    processed = run.parent.parent / "processed"
    table = pq.read_table(processed / "test")
    recipes = pa.concat_tables([RecipeEmbedder(ckpt)(table.slice(i, 10)) for i in range(0, len(table), 10)])
    photos = PhotoEmbedder(ckpt)(table)
    emb = write_embeddings(run / "index" / version, recipes, photos)
    path = default_store_path(run, store_kind)
    store = open_store(store_kind, path=path)
    try:
        info = load_into_store(store, recipes, photos, version, keep=2)
    finally:
        store.close()
    meta = {
        **info,
        "store": store_kind,
        "qdrant_url": None,
        "store_path": path,
        "split": "test",
        "data_dir": str(processed),
        "checkpoint": ckpt,
        "embeddings": str(emb),
        "skipped_photos": 0,
        "dim": 32,
        "image_root": str(run.parent.parent / "raw" / "images"),
    }
    write_index_meta(run, meta)
    return meta


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    run = make_tiny_run(root)
    meta = build_tiny_index(run)
    return run, meta


def _emb(meta: dict, modality: str) -> tuple[list[str], np.ndarray]:
    t = pq.read_table(meta["embeddings"]).to_pylist()
    rows = [r for r in t if r["modality"] == modality]
    return [r["id"] for r in rows], np.array([r["vector"] for r in rows], np.float32)


def test_encoder_batches_equal_single_items(tiny_index):
    from tnlbt.inference import Encoder, RecipeText, decode_image

    run, _ = tiny_index
    enc = Encoder(run)
    texts = [
        RecipeText("tomato soup", ["2 tomato", "salt"], ["boil"]),
        RecipeText("cake"),
        RecipeText.from_free_text("chocolate cake, flour, sugar"),
    ]
    batch = enc.encode_texts(texts)
    assert batch.shape == (3, enc.dim) == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    singles = np.concatenate([enc.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(batch, singles, atol=1e-5)  # padding in a batch does not change a vector
    imgs = [decode_image(_jpeg(c, seed=i)) for i, c in enumerate(COLOURS[:3])]
    ib = enc.encode_images(imgs)
    np.testing.assert_allclose(ib, np.concatenate([enc.encode_images([im]) for im in imgs]), atol=1e-5)


def test_index_has_every_recipe_and_photo(tiny_index):
    from tnlbt.index.store import PHOTOS, RECIPES, open_store

    _, meta = tiny_index
    assert meta["recipes"] == 24 and meta["photos"] == 36  # 24 recipes, alternating 1 / 2 photos
    ids, vec = _emb(meta, "image")
    assert len(ids) == 36 and vec.shape == (36, 32)
    store = open_store("qdrant", path=meta["store_path"])
    try:
        assert store.count(RECIPES) == 24 and store.count(PHOTOS) == 36
        p = store.retrieve(RECIPES, ["rec005"], "recipe")[0]
        assert p["title"] and p["ingredients"] and p["split"] == "test" and len(p["image_ids"]) == 2
    finally:
        store.close()


def test_searcher_equals_brute_force_over_written_embeddings(tiny_index):
    from tnlbt.index.search import Searcher, brute_force_topk

    run, meta = tiny_index
    s = Searcher.from_run(run)
    try:
        hits = s.search_text("tomato basil soup\n1 cup flour\nsalt", k=7, hybrid=False)  # dense: cosine scores
        q = s.encoder.encode_texts(
            [
                __import__("tnlbt.inference", fromlist=["RecipeText"]).RecipeText(
                    "tomato basil soup", ["1 cup flour", "salt"]
                )
            ]
        )[0]
        ids, vec = _emb(meta, "image")
        idx, scores = brute_force_topk(vec, q, 7)
        assert [h["image_id"] for h in hits] == [ids[i] for i in idx]
        np.testing.assert_allclose([h["score"] for h in hits], scores, atol=1e-4)
        assert set(hits[0]) == {"image_id", "image_url", "recipe_id", "title", "score"}
        assert hits[0]["image_url"] == f"/v1/images/{hits[0]['image_id']}"

        photo = _jpeg(COLOURS[2], seed=99)
        rh = s.search_image(photo, k=5)
        from tnlbt.inference import decode_image

        q = s.encoder.encode_images([decode_image(photo)])[0]
        rids, rvec = _emb(meta, "recipe")
        idx, _ = brute_force_topk(rvec, q, 5)
        assert [h["id"] for h in rh] == [rids[i] for i in idx]
        assert rh[0]["ingredients"] and rh[0]["title"]
    finally:
        s.close()


def test_searcher_rejects_bad_input(tiny_index):
    from tnlbt.index.search import Searcher

    run, _ = tiny_index
    s = Searcher.from_run(run)
    try:
        with pytest.raises(ValueError, match="empty"):
            s.search_text("   \n ", k=3)
        with pytest.raises(ValueError, match="k must be"):
            s.search_text("soup", k=0)
        with pytest.raises(ValueError, match="k must be"):
            s.search_text("soup", k=101)
        with pytest.raises(ValueError, match="not a decodable image"):
            s.search_image(b"definitely not an image", k=3)
    finally:
        s.close()


def test_image_bytes_by_id_only_for_indexed_ids(tiny_index, tmp_path):
    from tnlbt.index.search import ImageSource, IndexReader

    run, meta = tiny_index
    r = IndexReader.from_run(run)
    try:
        iid = "0003" + "1abcdef.jpg"  # recipe 3's second photo
        data = r.get_image(iid)
        t = pq.read_table(Path(meta["data_dir"]) / "test").to_pylist()
        assert data == t[3]["images"][1]  # served from the processed Parquet (no raw tree in this run)
        assert r.get_image("ffff0abcdef.jpg") is None  # well-formed but unknown
        assert r.get_image("../../etc/passwd") is None
        assert r.get_recipe("rec003")["title"] == t[3]["title"]
        assert r.get_recipe("nope") is None
    finally:
        r.close()
    # raw tree (Recipe1M layout) wins when present, and paths cannot escape the root
    root = tmp_path / "images"
    p = root / "test" / "a" / "b" / "c" / "d" / "abcd.jpg"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"\xff\xd8\xffraw")
    src = ImageSource(str(root))
    assert src.get("abcd.jpg", "test") == b"\xff\xd8\xffraw"
    assert src.get("abcd.jpg") == b"\xff\xd8\xffraw"
    assert src.get("..abcd.jpg") is None and src.get("a/b.jpg") is None


def test_free_text_parsing():
    from tnlbt.inference import RecipeText

    assert RecipeText.from_free_text("cake, flour, sugar").ingredients == ["cake", "flour", "sugar"]
    t = RecipeText.from_free_text("Tomato soup\n- 2 tomatoes\n- salt\n")
    assert (t.title, list(t.ingredients)) == ("Tomato soup", ["2 tomatoes", "salt"])
    assert RecipeText.from_free_text("  ").is_empty()


def test_cli_search_prints_results(tiny_index, capsys):
    from tnlbt.cli import main

    run, meta = tiny_index
    assert main(["search", "--run", str(run), "--text", "chocolate cake", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("recipe rec") == 3
    img = Path(meta["data_dir"]).parent / "q.jpg"
    img.write_bytes(_jpeg(COLOURS[0]))
    assert main(["search", "--run", str(run), "--image", str(img), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count(": ") >= 2 and "rec" in out


@pytest.mark.ray  # ~25 s (actor start-up dominates); minutes when the box is overloaded
def test_index_with_ray_data_then_reindex_keeps_count(ray_session, tmp_path):
    """``tnlbt index`` on a Ray Data actor pool, then the same embeddings published again: same counts."""
    import pyarrow.compute as pc

    from tnlbt.config import IndexConfig, StoreConfig
    from tnlbt.index.embed import index_run, load_into_store
    from tnlbt.index.search import IndexReader
    from tnlbt.index.store import PHOTOS, RECIPES, IndexSettings, open_store

    run = make_tiny_run(tmp_path, n_recipes=12)
    built = IndexSettings.parse(["hnsw_m=8", "quantization=none"])
    store = StoreConfig(kind="edge", settings=("hnsw_m=8", "quantization=none"))
    a = index_run(run, index=IndexConfig(split="test", keep=1, actors=1, store=store))
    assert (a["recipes"], a["photos"], a["skipped_photos"]) == (12, 18, 0)
    # The build settings are recorded, and a reader layers its own search-time settings over them.
    assert a["index_settings"] == built.to_dict()
    reader = IndexReader.from_run(run, StoreConfig(settings=("hnsw_ef=32",)))
    try:
        st = reader.store.settings
        assert (st.hnsw_m, st.quantization, st.hnsw_ef) == (8, "none", 32)
    finally:
        reader.close()
    emb = pq.read_table(a["embeddings"])
    assert sorted(set(emb["modality"].to_pylist())) == ["image", "recipe"] and len(emb) == 30
    # the actor-pool vectors equal the UDF called in-process (same checkpoint, same rows)
    local = build_tiny_index(run, store_kind="qdrant", version="vlocal")
    lt = pq.read_table(local["embeddings"])
    by_id = {(r["modality"], r["id"]): np.array(r["vector"]) for r in lt.to_pylist()}
    for r in emb.to_pylist():
        np.testing.assert_allclose(r["vector"], by_id[(r["modality"], r["id"])], atol=1e-5)
    store = open_store("edge", path=a["store_path"])
    try:
        recipes = emb.filter(pc.equal(emb["modality"], "recipe"))
        photos = emb.filter(pc.equal(emb["modality"], "image"))
        for t in (recipes, photos):
            assert len(t) > 0
        b = load_into_store(store, recipes, photos, "v9999", keep=1)
        assert store.count(RECIPES) == 12 and store.count(PHOTOS) == 18
        assert store.versions(RECIPES) == ["recipes__v9999"] and b["dropped"]
    finally:
        store.close()


def test_cli_search_errors_are_one_line(tmp_path, capsys):
    from tnlbt.cli import main

    run = make_tiny_run(tmp_path, n_recipes=4)  # a checkpoint but no index yet
    assert main(["search", "--run", str(run), "--text", "soup"]) == 2
    assert "tnlbt index" in capsys.readouterr().err
    assert main(["search", "--run", str(tmp_path / "nope"), "--text", "soup"]) == 2
    assert main(["search", "--run", str(run), "--image", str(tmp_path / "missing.jpg")]) == 2


def test_index_fails_fast_when_the_local_store_is_held(tmp_path):
    """qdrant-client local mode allows one client per folder: indexing while it is held (e.g. by a running
    API) must fail at once with StoreUnavailable, before any embedding work (no Ray needed to see it)."""
    from tnlbt.config import IndexConfig, StoreConfig
    from tnlbt.index.embed import index_run
    from tnlbt.index.store import QdrantStore, StoreUnavailable

    run = make_tiny_run(tmp_path, n_recipes=4)
    held = QdrantStore(path=str(tmp_path / "held"))
    try:
        with pytest.raises(StoreUnavailable, match="already accessed"):
            index_run(run, index=IndexConfig(store=StoreConfig(kind="qdrant", path=str(tmp_path / "held"))))
    finally:
        held.close()


def test_index_settings_layering_and_cli_errors(tiny_index, monkeypatch, capsys):
    """defaults < index.json's recorded settings < TNLBT_INDEX_* < --index-setting; a bad one is one line."""
    from tnlbt.cli import main
    from tnlbt.index.store import IndexSettings

    monkeypatch.setenv("TNLBT_INDEX_HNSW_EF", "40")
    monkeypatch.setenv("TNLBT_INDEX_OVERSAMPLING", "3")
    st = IndexSettings.layered({"hnsw_m": 8, "hnsw_ef": 99, "not_a_field": 1}, ["oversampling=1.5"])
    assert (st.hnsw_m, st.hnsw_ef, st.oversampling) == (8, 40, 1.5)
    assert IndexSettings.layered(None, ()).quantization == IndexSettings().quantization
    run, _ = tiny_index
    assert main(["search", "--run", str(run), "--text", "soup", "--index-setting", "bogus=1"]) == 2
    assert "unknown index setting 'bogus'" in capsys.readouterr().err
    assert main(["search", "--run", str(run), "--text", "soup", "--index-setting", "hnsw_ef=abc"]) == 2
    assert main(["search", "--run", str(run), "--text", "soup", "--index-setting", "hnsw_ef=16"]) == 0
