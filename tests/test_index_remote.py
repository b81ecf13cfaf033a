"""``tnlbt index`` / ``search`` / ``serve`` with the run and the processed data on a remote object store.

``s3://`` is routed by ``TNLBT_STORAGE_ROUTES`` to an on-disk store with S3 semantics (``ObjectStoreOnDisk``:
no directories, no appends, no prefix renames, objects visible on close), and ``TNLBT_CACHE_DIR`` points the
per-machine cache (fetched checkpoints, the remote run's embedded store) at a temp folder. Both reach Ray
Data actors and Serve replicas through their ``runtime_env`` even when the session's Ray cluster was started
before this module set them.

The reference for every remote result is the same tiny run used from local paths (``make_tiny_run`` /
``build_tiny_index`` of ``test_search``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from test_search import COLOURS, _jpeg, build_tiny_index, make_tiny_run

from tnlbt import storage

# As in test_serve: on a busy 2-core box the Serve proxy can take longer than its 5 s readiness check.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")

RUN_URI = "s3://bucket/runs/tiny"
DATA_URI = "s3://bucket/processed"
TEXT_QUERY = "tomato basil soup\n1 cup flour\nsalt"


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A tiny run and its processed data, uploaded to ``s3://bucket/...``; the local copies stay as the
    reference (with a local index built without Ray)."""
    root = tmp_path_factory.mktemp("remote")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TNLBT_STORAGE_ROUTES", f"s3={root / 'objects'}")
        mp.setenv("TNLBT_CACHE_DIR", str(root / "cache"))
        run = make_tiny_run(root / "local", n_recipes=12)
        # training state sits next to the model in real runs; inference must not download it
        (run / "checkpoints" / "best" / "train_state.pt").write_bytes(b"\0" * 4096)
        storage.upload_dir(run, RUN_URI)
        storage.upload_dir(run.parent.parent / "processed", DATA_URI)
        local_meta = build_tiny_index(run)  # after the upload: the remote run has no index yet
        yield {"root": root, "run": run, "meta": local_meta, "cache": root / "cache"}
    storage.resolve("/")  # forget the route


def _same_hits(a: list[dict], b: list[dict], key: str) -> None:
    assert [h[key] for h in a] == [h[key] for h in b]
    np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-5)


# -- checkpoint: located remotely, fetched once per machine ------------------------------------------------
def test_remote_checkpoint_is_located_then_fetched_once(remote):
    from tnlbt import runs as embed  # the run layout (it was in tnlbt.index.embed)

    assert embed.checkpoint_location(RUN_URI) == f"{RUN_URI}/checkpoints/best"
    assert embed.checkpoint_location(RUN_URI + "/") == f"{RUN_URI}/checkpoints/best"
    assert embed.run_dir_of(f"{RUN_URI}/checkpoints/best") == RUN_URI
    assert embed.run_dir_of(RUN_URI) == RUN_URI
    assert embed.local_run_dir(RUN_URI).is_relative_to(remote["cache"])
    assert embed.default_store_path(RUN_URI, "edge").startswith(str(remote["cache"]))

    # a copy of the run so that rewriting its weights below does not disturb the other tests
    storage.copy_dir(f"{RUN_URI}/checkpoints", "s3://bucket/runs/copy/checkpoints")
    uri = "s3://bucket/runs/copy"
    local = embed.resolve_checkpoint(uri)
    assert local.is_relative_to(remote["cache"] / "checkpoints")
    assert sorted(p.name for p in local.iterdir()) == sorted(embed.CHECKPOINT_FILES)  # no train_state.pt
    src = remote["run"] / "checkpoints" / "best"
    for name in embed.CHECKPOINT_FILES:
        assert (local / name).read_bytes() == (src / name).read_bytes()
    stamp = (local / "model.safetensors").stat().st_mtime_ns
    assert embed.resolve_checkpoint(f"{uri}/checkpoints/best") == local  # cached: no second download
    assert (local / "model.safetensors").stat().st_mtime_ns == stamp
    # a new checkpoint at the same URI (retrained "best") is a new cache entry, never stale weights
    storage.write_bytes(f"{uri}/checkpoints/best/vocab.json", (src / "vocab.json").read_bytes() + b"\n")
    again = embed.resolve_checkpoint(uri)
    assert again != local and again.parent == local.parent and (again / "vocab.json").read_bytes().endswith(b"\n\n")
    assert not list(local.parent.glob(".partial-*"))


def test_encoder_from_remote_run_equals_local(remote):
    from tnlbt.inference import Encoder, RecipeText, decode_image

    a, b = Encoder(RUN_URI), Encoder(remote["run"])
    texts = [RecipeText("tomato soup", ["2 tomato", "salt"], ["boil"]), RecipeText.from_free_text("cake, flour")]
    np.testing.assert_allclose(a.encode_texts(texts), b.encode_texts(texts), atol=1e-6)
    imgs = [decode_image(_jpeg(c, seed=i)) for i, c in enumerate(COLOURS[:2])]
    np.testing.assert_allclose(a.encode_images(imgs), b.encode_images(imgs), atol=1e-6)


def test_remote_run_without_checkpoint_is_a_clear_error(remote, capsys):
    from tnlbt.serve.app import build_app

    from tnlbt.cli import main
    from tnlbt.config import IndexConfig, StoreConfig
    from tnlbt.index.embed import index_run
    from tnlbt.inference import Encoder

    storage.write_text("s3://bucket/runs/empty/metrics_test.json", "{}")  # the run exists, its checkpoint not
    for call in (
        lambda: Encoder("s3://bucket/runs/empty"),
        lambda: index_run("s3://bucket/runs/empty", data_dir=DATA_URI),  # fails before any Ray work
        lambda: build_app({"run": "s3://bucket/runs/empty"}),
    ):
        with pytest.raises(
            FileNotFoundError,
            match=r"no checkpoint in s3://bucket/runs/empty \(expected "
            r"s3://bucket/runs/empty/checkpoints/best/model.safetensors",
        ):
            call()
    # an incomplete checkpoint names what is missing
    storage.write_bytes("s3://bucket/runs/partial/checkpoints/best/model.safetensors", b"x")
    with pytest.raises(FileNotFoundError, match=r"not a model checkpoint: missing config\.json, vocab\.json"):
        Encoder("s3://bucket/runs/partial")
    # the CLI: one line, exit 2 (a missing run, a run without checkpoint or index)
    assert main(["search", "--run", "s3://bucket/runs/nope", "--text", "soup"]) == 2
    assert "run directory not found: s3://bucket/runs/nope" in capsys.readouterr().err
    assert main(["search", "--run", "s3://bucket/runs/empty", "--text", "soup"]) == 2
    assert "no checkpoint in s3://bucket/runs/empty" in capsys.readouterr().err
    storage.copy_dir(f"{RUN_URI}/checkpoints", "s3://bucket/runs/noindex/checkpoints")
    assert main(["search", "--run", "s3://bucket/runs/noindex", "--text", "soup"]) == 2  # not indexed
    err = capsys.readouterr().err
    assert "tnlbt index --run s3://bucket/runs/noindex" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="local folder"):
        index_run(
            RUN_URI, data_dir=DATA_URI, index=IndexConfig(store=StoreConfig(kind="qdrant", path="s3://bucket/store"))
        )


def test_examples_and_model_card_from_remote_run(remote):
    from tnlbt.serve.app import load_examples, load_model_card

    from tnlbt.runs import local_run_dir, write_index_meta

    storage.write_bytes("s3://bucket/runs/card/curves.png", b"\x89PNG\r\n\x1a\nfake")
    storage.write_text("s3://bucket/runs/card/metrics_test.json", '{"1k": {"medR": 3.0}}')
    write_index_meta("s3://bucket/runs/card", {"data_dir": DATA_URI, "split": "test", "version": "v1"})
    assert storage.exists("s3://bucket/runs/card/index/index.json")
    card = load_model_card("s3://bucket/runs/card")
    assert card["run"] == "card" and card["metrics"] == {"1k": {"medR": 3.0}} and "`v1`" in card["notes"]
    assert Path(card["curves"]).read_bytes() == b"\x89PNG\r\n\x1a\nfake"
    ex = load_examples("s3://bucket/runs/card", n=2)
    assert len(ex["text"]) == 2 and len(ex["images"]) == 2
    for p in ex["images"]:
        assert Path(p).is_relative_to(local_run_dir("s3://bucket/runs/card")) and Path(p).read_bytes()[:3] == (
            b"\xff\xd8\xff"
        )


# -- index from the remote run and data (Ray Data), then search -------------------------------------------
@pytest.fixture(scope="module")
def remote_index(remote, ray_session):
    """``tnlbt index --run s3://... --data s3://...`` (qdrant store, like the local reference)."""
    from tnlbt.config import IndexConfig, StoreConfig
    from tnlbt.index.embed import index_run

    # the routes and the cache folder are still set by `remote` (module scope)
    index = IndexConfig(split="test", keep=1, actors=1, store=StoreConfig(kind="qdrant"))
    return index_run(RUN_URI, data_dir=DATA_URI, index=index)


@pytest.mark.ray  # ~25-40 s: one Ray Data actor pool over 12 recipes (actor start-up dominates)
def test_index_remote_equals_local_index(remote, remote_index, capsys):
    from tnlbt.cli import main
    from tnlbt.index.search import IndexReader, Searcher
    from tnlbt.runs import read_index_meta

    meta = remote_index
    assert (meta["recipes"], meta["photos"], meta["skipped_photos"]) == (12, 18, 0)
    assert meta["checkpoint"] == f"{RUN_URI}/checkpoints/best" and meta["data_dir"] == DATA_URI
    assert meta["embeddings"].startswith(f"{RUN_URI}/index/v") and storage.exists(meta["embeddings"])
    assert Path(meta["store_path"]).is_relative_to(remote["cache"] / "runs") and meta["store_host"]
    assert read_index_meta(RUN_URI) == meta  # index.json went to the bucket
    assert not storage.exists(f"{RUN_URI}/qdrant")  # nothing tried to put the embedded store on S3

    rs, ls = Searcher.from_run(RUN_URI), Searcher.from_run(remote["run"])
    try:
        assert rs.encoder.checkpoint_dir.is_relative_to(remote["cache"])
        _same_hits(rs.search_text(TEXT_QUERY, k=7), ls.search_text(TEXT_QUERY, k=7), "image_id")
        photo = _jpeg(COLOURS[2], seed=99)
        _same_hits(rs.search_image(photo, k=5), ls.search_image(photo, k=5), "id")
        _same_hits(
            rs.search_text("chocolate cake", k=18), ls.search_text("chocolate cake", k=18), "image_id"
        )  # every photo: the whole ranking agrees
        iid = "0003" + "1abcdef.jpg"  # recipe 3's second photo, read from the remote Parquet
        assert rs.reader.get_image(iid) == ls.reader.get_image(iid) is not None
        assert rs.reader.get_recipe("rec003") == ls.reader.get_recipe("rec003")
    finally:
        rs.close()
        ls.close()

    assert main(["search", "--run", RUN_URI, "--text", "chocolate cake", "-k", "3"]) == 0
    assert capsys.readouterr().out.count("recipe rec") == 3
    # another machine (no store folder there) gets a message naming the host that holds the store
    other = {**meta, "store_path": str(remote["root"] / "elsewhere"), "store_host": "indexer-7"}
    from tnlbt.index.store import IndexNotFound
    from tnlbt.runs import write_index_meta

    write_index_meta("s3://bucket/runs/other", other)
    with pytest.raises(IndexNotFound, match="local folder on indexer-7"):
        IndexReader.from_run("s3://bucket/runs/other")


@pytest.mark.ray
@pytest.mark.slow  # Serve start-up on a loaded 2-core box: 1-3 minutes
def test_serve_answers_from_a_remote_run(remote, remote_index):
    import requests
    from conftest import free_port
    from ray import serve
    from tnlbt.serve.app import build_app, wait_ready

    from tnlbt.index.search import Searcher

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    args = {"run": RUN_URI, "cpus": 0.25, "max_replicas": 1, "text_batch": 2, "image_batch": 2}
    base = f"http://127.0.0.1:{port}"
    try:
        # the replicas get the checkpoint's URI and fetch it themselves (runtime_env carries the routes)
        serve.run(build_app(args), name="api", route_prefix="/", blocking=False)
        assert wait_ready(base, timeout_s=240), "API never became ready"
        r = requests.get(base + "/readyz", timeout=30)
        assert r.json() == {"status": "ready", "recipes": 12, "photos": 18}
        hits = requests.post(base + "/v1/search/text", json={"text": TEXT_QUERY, "k": 5}, timeout=60).json()
        img = requests.get(base + hits["hits"][0]["image_url"], timeout=30)
        assert img.status_code == 200 and img.content[:3] == b"\xff\xd8\xff"
    finally:
        serve.shutdown()  # not just delete: test_serve starts Serve again on its own port
    ls = Searcher.from_run(remote["run"])
    try:
        _same_hits(hits["hits"], ls.search_text(TEXT_QUERY, k=5), "image_id")
    finally:
        ls.close()


def test_old_embeddings_are_pruned_on_the_bucket(remote):
    from tnlbt.index.embed import _prune_embeddings
    from tnlbt.runs import write_index_meta

    for v in ("v1", "v2", "v3"):
        storage.write_bytes(f"s3://bucket/runs/prune/index/{v}/embeddings.parquet", b"x")
    write_index_meta("s3://bucket/runs/prune", {"version": "v3"})
    _prune_embeddings("s3://bucket/runs/prune", keep=2)
    assert storage.listdir("s3://bucket/runs/prune/index") == ["index.json", "v2", "v3"]


def test_photo_bytes_from_a_remote_image_tree(remote):
    from tnlbt.index.search import ImageSource

    storage.write_bytes("s3://bucket/raw/images/test/a/b/c/d/abcd.jpg", b"\xff\xd8\xffraw")
    src = ImageSource("s3://bucket/raw/images/", [f"{DATA_URI}/test"])
    assert src.get("abcd.jpg", "test") == b"\xff\xd8\xffraw" and src.get("abcd.jpg") == b"\xff\xd8\xffraw"
    assert src.get("..abcd.jpg") is None and src.get("a/b.jpg") is None and src.get("ffff0abcdef.jpg") is None
    local = ImageSource(None, [str(remote["run"].parent.parent / "processed" / "test")])
    assert src.get("00031abcdef.jpg") == local.get("00031abcdef.jpg") is not None  # not in the tree: Parquet
