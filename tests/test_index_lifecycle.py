"""A run directory is movable and servable from anywhere, reading never creates a store, and a killed
``tnlbt index`` leaves nothing that the next run keeps (or that makes it drop the published version)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_search import make_tiny_run

from tnlbt.config import IndexConfig, StoreConfig
from tnlbt.index import embed
from tnlbt.index.search import IndexReader, Searcher
from tnlbt.index.store import PHOTOS, RECIPES, IndexNotFound, new_version, open_store
from tnlbt.runs import index_dir, read_index_meta, recorded_path


@pytest.fixture()
def no_ray_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    """``index_run`` with the Ray Data pool replaced by the same UDFs called in this process."""

    def embed_here(ckpt, data_dir, split="test", **_kw):
        table = pq.read_table(Path(data_dir) / split)
        recipes = embed.RecipeEmbedder(str(ckpt))(table)
        photos = embed.PhotoEmbedder(str(ckpt))(table)
        return recipes, photos.drop_columns(["skipped"]), 0

    monkeypatch.setattr(embed, "embed_for_index", embed_here)


def _index(run: str | Path, keep: int = 2) -> dict:
    return embed.index_run(run, index=IndexConfig(keep=keep, store=StoreConfig(kind="edge")))


def test_a_moved_run_serves_the_same_answers_from_another_folder(tmp_path, monkeypatch, no_ray_embedding):
    root = tmp_path / "proj"
    make_tiny_run(root)
    monkeypatch.chdir(root)
    _index("runs/tiny")  # a relative run path, as `make demo` passes it
    recorded = json.loads((root / "runs/tiny/index/index.json").read_text())
    assert recorded["store_path"] == "edge" and recorded["checkpoint"] == "checkpoints/best"
    assert Path(recorded["data_dir"]).is_absolute() and recorded["embeddings"].startswith("index/v")

    moved = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(root / "runs" / "tiny", moved)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    a, b = Searcher.from_run(root / "runs" / "tiny"), Searcher.from_run(moved)
    try:
        assert b.reader.store.count(RECIPES) == 24
        for query in ("tomato basil soup", "chocolate cake"):
            ha, hb = a.search_text(query, k=8), b.search_text(query, k=8)
            assert [h["image_id"] for h in ha] == [h["image_id"] for h in hb]
    finally:
        a.close()
        b.close()
    assert list(cwd.iterdir()) == []  # nothing was created where the reader happened to run


def test_reading_a_run_without_an_index_creates_nothing(tmp_path, monkeypatch):
    run = make_tiny_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in run.iterdir())
    for kind in ("edge", "qdrant"):
        with pytest.raises(IndexNotFound, match="tnlbt index --run"):
            IndexReader.from_run(run, StoreConfig(kind=kind))
    assert sorted(p.name for p in run.iterdir()) == before
    assert not (tmp_path / "edge").exists() and not (tmp_path / "qdrant").exists()


def _killed_build(run: Path, version: str) -> None:
    """What a `tnlbt index` killed after embedding and during the load leaves: embeddings, one collection."""
    from tnlbt.index.store import build_collection, recipe_point_id

    emb = pq.read_table(recorded_path(run, read_index_meta(run)["embeddings"]))
    rec = emb.filter(pa.compute.equal(emb["modality"], "recipe"))
    embed.write_embeddings(index_dir(run) / version, rec, None)
    store = open_store("edge", path=str(run / "edge"))
    try:
        vecs = embed._vectors(rec["vector"])
        ids = [recipe_point_id(i) for i in rec["id"].to_pylist()]
        build_collection(store, RECIPES, version, ids, vecs, [{} for _ in ids])
    finally:
        store.close()


@pytest.mark.parametrize("keep", [1, 2])
def test_the_next_index_removes_a_killed_build_and_keeps_the_published_one(tmp_path, no_ray_embedding, keep):
    run = make_tiny_run(tmp_path)
    first = _index(run, keep=keep)["version"]
    killed = new_version()  # newer than the published version, as a build started after it
    _killed_build(run, killed)
    second = _index(run, keep=keep)["version"]
    assert first < killed < second
    expected = [first, second][-keep:]
    store = open_store("edge", path=str(run / "edge"))
    try:
        for name in (RECIPES, PHOTOS):
            assert [c.rsplit("__", 1)[-1] for c in store.versions(name)] == expected, name
        assert store.aliases()[RECIPES] == f"{RECIPES}__{second}"
    finally:
        store.close()
    assert sorted(p.name for p in index_dir(run).glob("v*")) == expected
    assert read_index_meta(run)["version"] == second
