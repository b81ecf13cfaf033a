"""``tnlbt preprocess`` with remote raw data and/or a remote output (``s3://`` on an on-disk object store).

``TNLBT_STORAGE_ROUTES=s3=DIR`` routes ``s3://`` in this process and in every Ray task to
:class:`tnlbt.storage.ObjectStoreOnDisk`, which has S3's semantics: no empty directories, no appends, no
directory renames, objects visible only once their stream is closed. A remote run must give exactly what a
local run gives on the same input, and leave nothing but the outputs behind.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hostile_corpus import write_hostile_corpus
from PIL import Image

from tnlbt import storage
from tnlbt.config import DataConfig
from tnlbt.data import preprocess as pp
from tnlbt.data.vocab import IngredientVocab, Vocab, build_vocab

CFG = DataConfig(min_word_count=1, image_short_side=32, rows_per_file=16, row_group_rows=4, max_title_tokens=6)
NUM_CPUS = 2
OUTPUT_NAMES = {"vocab.json", "ingredients.json", "stats.json", "config.json", "_SUCCESS"}
RUN_DEPENDENT = ("timings", "fingerprint", "data_dir", "images_dir", "skipped")


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3root(tmp_path_factory):
    """``s3://`` -> an on-disk object store for the whole module (Ray tasks get the route in runtime_env)."""
    root = tmp_path_factory.mktemp("objs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TNLBT_STORAGE_ROUTES", f"s3={root}")
        yield root
    storage.resolve("/")  # forget the route


def _tree(uri: str) -> dict[str, pafs.FileInfo]:
    """Every object under ``uri``: relative key -> FileInfo."""
    fs, base = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1 :]: i for i in infos if i.type == pafs.FileType.File}


def _expected_keys(tree: dict[str, pafs.FileInfo]) -> None:
    """Only the outputs: no _work, no temp objects, nothing hidden."""
    for key in tree:
        head = key.split("/")[0]
        assert head in OUTPUT_NAMES or (
            head in ("train", "val", "test")
            and key.count("/") == 1
            and key.split("/")[1].startswith("part-")
            and key.endswith(".parquet")
        ), key


def _store_tmp_empty(root: Path) -> bool:
    return not any((root / storage.ObjectStoreOnDisk._TMP).iterdir())


def _rows(out: str) -> dict[str, list[dict]]:
    """Every Parquet row per split, sorted by id (read through storage for remote and local alike)."""
    rows = {}
    for split in ("train", "val", "test"):
        d = storage.join(out, split)
        table_rows = []
        for name in storage.listdir(d):
            fs, path = storage.resolve(storage.join(d, name))
            table_rows += pq.read_table(path, filesystem=fs).to_pylist()
        rows[split] = sorted(table_rows, key=lambda r: r["id"])
    return rows


def _parts(out: str) -> dict[str, list[str]]:
    return {split: storage.listdir(storage.join(out, split)) for split in ("train", "val", "test")}


def _stable(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in RUN_DEPENDENT}


@pytest.fixture(scope="module")
def synth_runs(ray_session, s3root, tmp_path_factory):
    """A tiny offline dataset preprocessed twice: local -> local, and s3 -> s3 (copied with upload_dir)."""
    from tnlbt.data.synthetic import generate_dataset

    raw = tmp_path_factory.mktemp("synth") / "raw"
    generate_dataset(raw, 40, seed=3, workers=1, image_size=64)
    storage.upload_dir(raw, "s3://bucket/raw")
    local_out = tmp_path_factory.mktemp("local") / "processed"
    local = pp.preprocess(raw, local_out, CFG, num_cpus=NUM_CPUS)
    remote = pp.preprocess("s3://bucket/raw", "s3://bucket/processed", CFG, num_cpus=NUM_CPUS)
    return {"local_out": str(local_out), "local": local, "remote": remote, "raw": raw}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hostile")
    return root, write_hostile_corpus(root)


# -- whole runs (Ray) -------------------------------------------------------------------------------------
@pytest.mark.ray
def test_remote_run_equals_local_run(synth_runs, s3root) -> None:
    local, remote, out = synth_runs["local"], synth_runs["remote"], "s3://bucket/processed"
    assert remote["records"]["balanced"] and remote["photos"]["balanced"]
    assert remote["records"]["kept"] > 0 and remote["photos"]["ok"] > 0
    assert _stable(remote) == _stable(local)
    assert remote["data_dir"] == "s3://bucket/raw" and remote["images_dir"] == "s3://bucket/raw/images"
    assert storage.read_text(storage.join(out, "vocab.json")) == (
        Path(synth_runs["local_out"], "vocab.json").read_text()
    )
    assert storage.read_text(storage.join(out, "ingredients.json")) == (
        Path(synth_runs["local_out"], "ingredients.json").read_text()
    )
    assert _parts(out) == _parts(synth_runs["local_out"])
    remote_rows, local_rows = _rows(out), _rows(synth_runs["local_out"])
    for split in ("train", "val", "test"):
        assert len(remote_rows[split]) == remote["splits"][split]["rows"] > 0, split
        assert remote_rows[split] == local_rows[split], split  # every column, image bytes included
    tree = _tree(out)
    _expected_keys(tree)
    assert set(tree) >= OUTPUT_NAMES
    assert _store_tmp_empty(s3root)
    assert json.loads(storage.read_text(storage.join(out, "config.json")))["data_dir"] == "s3://bucket/raw"


@pytest.mark.ray
def test_remote_rerun_skips_and_guards(synth_runs) -> None:
    out = "s3://bucket/processed"
    before = {k: (i.size, i.mtime_ns) for k, i in _tree(out).items()}
    again = pp.preprocess("s3://bucket/raw", out, CFG, num_cpus=NUM_CPUS)
    assert again["skipped"] is True and again["records"] == synth_runs["remote"]["records"]
    assert {k: (i.size, i.mtime_ns) for k, i in _tree(out).items()} == before  # nothing rewritten
    with pytest.raises(ValueError, match="--overwrite"):
        pp.preprocess("s3://bucket/raw", out, DataConfig(min_word_count=2, image_short_side=32))


@pytest.mark.ray
@pytest.mark.parametrize("where", ["local_raw_remote_out", "remote_raw_local_out"])
def test_mixed_locations_count_the_hostile_corpus_exactly(where, ray_session, s3root, hostile, tmp_path) -> None:
    root, expect = hostile
    if where == "local_raw_remote_out":
        raw, out = str(root), f"s3://bucket/{tmp_path.name}/out"
        storage.write_text(storage.join(out, "notes.txt"), "user file")  # not ours: must survive --overwrite
    else:
        raw, out = f"s3://bucket/{tmp_path.name}/raw", str(tmp_path / "out")
        storage.upload_dir(root, raw)
    stats = pp.preprocess(raw, out, CFG, num_cpus=NUM_CPUS)
    rec, ph = stats["records"], stats["photos"]
    assert rec["input"] == expect["input"] and rec["rejected"] == expect["rejected"]
    assert rec["dropped"] == expect["dropped"] and rec["balanced"] and ph["balanced"]
    assert {k: ph[k] for k in ("listed", "ok", "unused_over_limit")} == {
        k: expect["photos"][k] for k in ("listed", "ok", "unused_over_limit")
    }
    assert ph["rejected"] == expect["photos"]["rejected"]  # missing/empty/corrupt photos: counted, not fatal
    for split in ("train", "val", "test"):
        assert stats["splits"][split]["paired"] == expect["splits"][split].get("paired", 0), split
        assert stats["splits"][split]["recipe_only"] == expect["splits"][split].get("recipe_only", 0), split
    rows = _rows(out)
    assert {r["id"] for split_rows in rows.values() for r in split_rows} == expect["kept_ids"]
    assert not storage.exists(storage.join(out, "_work")) and storage.exists(storage.join(out, "_SUCCESS"))
    if where == "local_raw_remote_out":
        # --overwrite with another config on the object store: our objects replaced, the user's kept
        cfg2 = DataConfig(min_word_count=2, image_short_side=32, rows_per_file=1000, max_title_tokens=6)
        again = pp.preprocess(raw, out, cfg2, overwrite=True, num_cpus=NUM_CPUS)
        assert again["vocab"]["min_count"] == 2 and again["records"] == stats["records"]
        tree = _tree(out)
        assert storage.read_text(storage.join(out, "notes.txt")) == "user file"
        _expected_keys({k: v for k, v in tree.items() if k != "notes.txt"})
        assert _parts(out)["train"] == ["part-p00000.parquet", "part-r00000.parquet"]  # old parts removed
        assert _store_tmp_empty(s3root)


@pytest.mark.ray
def test_dataset_reads_remote_output(synth_runs) -> None:
    from tnlbt.data.dataset import RecipeDataset, split_files

    out = "s3://bucket/processed"
    files = split_files(storage.join(out, "train"))
    assert files and all(isinstance(f, str) and f.startswith("s3://bucket/processed/train/part-") for f in files)
    remote = RecipeDataset(storage.join(out, "train"))
    local = RecipeDataset(Path(synth_runs["local_out"], "train"))
    assert len(remote) == len(local) == synth_runs["remote"]["splits"]["train"]["rows"]
    assert [remote[i] for i in range(len(remote))] == [local[i] for i in range(len(local))]
    paired = RecipeDataset(storage.join(out, "train"), paired_only=True, columns=["id", "images"])
    assert len(paired) == synth_runs["remote"]["splits"]["train"]["paired"] and set(paired[0]) == {"id", "images"}
    clone = pickle.loads(pickle.dumps(paired))  # DataLoader workers: strings only, filesystem resolved again
    assert clone[-1] == paired[-1]
    assert Vocab.load(storage.join(out, "vocab.json")) == Vocab.load(Path(synth_runs["local_out"], "vocab.json"))
    with pytest.raises(FileNotFoundError, match="part-"):
        RecipeDataset(storage.join(out, "nothing"))


# -- pieces without Ray ---------------------------------------------------------------------------------
def test_json_array_from_uri_and_stream(s3root) -> None:
    from tnlbt.data.recipe1m import iter_json_array

    data = json.dumps([{"id": "a"}, {"id": "b"}]).encode()
    storage.write_bytes("s3://bucket/j/l.json", data)
    assert [x["id"] for x in iter_json_array("s3://bucket/j/l.json")] == ["a", "b"]
    stream = io.BytesIO(data)
    assert [x["id"] for x in iter_json_array(stream)] == ["a", "b"] and not stream.closed
    with pytest.raises(FileNotFoundError):
        list(iter_json_array("s3://bucket/j/missing.json"))
    storage.write_bytes("s3://bucket/j/obj.json", b'{"id": 1}')
    with pytest.raises(ValueError, match=r"s3://bucket/j/obj\.json: expected a JSON array"):
        list(iter_json_array("s3://bucket/j/obj.json"))
    errors: list[str] = []
    storage.write_bytes("s3://bucket/j/cut.json", data[:-8])
    assert len(list(iter_json_array("s3://bucket/j/cut.json", errors))) == 1
    assert errors and errors[0].startswith("cut.json: JSON error")


def test_photos_from_uri_are_counted_reasons(s3root) -> None:
    from tnlbt.data.images import load_image_file
    from tnlbt.data.recipe1m import image_path, image_relpath

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="JPEG")
    uri = image_path("s3://bucket/img", "val", "abcd1234.jpg")
    assert uri == "s3://bucket/img/val/a/b/c/d/abcd1234.jpg"
    storage.write_bytes(uri, buf.getvalue())
    storage.write_bytes("s3://bucket/img/val/e/m/p/t/empty.jpg", b"")
    storage.write_bytes("s3://bucket/img/val/b/a/d/x/badx.jpg", b"not an image")
    res = load_image_file(uri, short_side=32)
    assert res.data is not None and res.fmt == "JPEG"
    fs, root = storage.resolve("s3://bucket/img")  # resolved once, inner paths per photo
    inner = f"{root}/{image_relpath('val', 'abcd1234.jpg')}"
    assert load_image_file(inner, filesystem=fs, short_side=32).data == res.data
    assert load_image_file(f"{root}/val/n/o/p/e/nope.jpg", filesystem=fs).reason == "missing_file"
    assert load_image_file(f"{root}/val/a", filesystem=fs).reason == "missing_file"  # a prefix, not a photo
    assert load_image_file("s3://bucket/img/val/e/m/p/t/empty.jpg").reason == "empty_file"
    assert load_image_file("s3://bucket/img/val/b/a/d/x/badx.jpg").reason == "corrupt"

    # every read fails: a lost connection is a reason, not a crash
    broken = pafs.PyFileSystem(storage.ObjectStoreOnDisk(s3root))
    broken.handler.open_input_stream = lambda path: (_ for _ in ()).throw(OSError("connection reset"))
    assert load_image_file(inner, filesystem=broken).reason == "unreadable_file"


def test_vocab_round_trip_through_storage(s3root) -> None:
    vocab = build_vocab(Counter({"rice": 3, "cup": 2}), 1)
    vocab.save("s3://bucket/v/vocab.json")
    assert Vocab.load("s3://bucket/v/vocab.json") == vocab
    iv = IngredientVocab(["rice", "salt"], counts={"rice": 2, "salt": 1})
    iv.save("s3://bucket/v/ingredients.json")
    assert IngredientVocab.load("s3://bucket/v/ingredients.json") == iv


def test_rebalance_remote_keeps_lines_with_unicode_separators(s3root) -> None:
    """Shards are rewritten as whole objects, split on "\\n" only (U+2028/U+0085 stay inside their record)."""
    recs = [{"i": i, "t": f"a\u2028b\x85c{i}"} for i in range(40)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    storage.write_text("s3://bucket/sh/train-p-00000.jsonl", text)
    out = pp.rebalance_shards(["s3://bucket/sh/train-p-00000.jsonl"], "s3://bucket/sh", min_shards=4, min_rows=8)
    assert len(out) == 4 and all(o.startswith("s3://bucket/sh/train-p-") for o in out)
    assert [r for o in out for r in pp._iter_shard(o)] == recs
    assert storage.listdir("s3://bucket/sh") == sorted(pp._name(o) for o in out)


def test_shard_writer_makes_one_object_per_shard(s3root) -> None:
    w = pp._ShardWriter("s3://bucket/w", rows=3)
    for i in range(7):
        w.write("train", "p", {"i": i})
    w.write("val", "p", {"i": 99})
    assert not storage.exists("s3://bucket/w/train-p-00002.jsonl")  # still open: not visible yet
    w.close()
    assert storage.listdir("s3://bucket/w") == [
        "train-p-00000.jsonl",
        "train-p-00001.jsonl",
        "train-p-00002.jsonl",
        "val-p-00000.jsonl",
    ]
    assert [r["i"] for p in w.paths for r in pp._iter_shard(p)] == [0, 1, 2, 3, 4, 5, 6, 99]


def test_remote_shard_task_resumes_and_never_leaves_a_partial_part(s3root, hostile, tmp_path, monkeypatch) -> None:
    """The Ray UDF called directly with URIs: done markers on the store; a crash leaves no part and no temp."""
    root, _ = hostile
    storage.upload_dir(root, "s3://bucket/h/raw")
    raw = pp.read_raw("s3://bucket/h/raw", "s3://bucket/h/out/_work/shards", CFG)
    assert raw["shards"] and all(s.startswith("s3://bucket/h/out/_work/shards/") for s in raw["shards"])
    shard = next(s for s in raw["shards"] if pp._name(s).startswith("train-p-"))
    kwargs = dict(
        out_dir="s3://bucket/h/out",
        done_dir="s3://bucket/h/out/_work/done",
        vocab=build_vocab(Counter(a=1), 1),
        ingredients=IngredientVocab([]),
        cfg_dict=CFG.__dict__.copy(),
        images_dir="s3://bucket/h/raw/images",
    )
    part = "s3://bucket/h/out/train/part-p00000.parquet"

    # A crash in the middle of the shard (after row groups were written): nothing named part-* appears.
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmpdir))
    real, calls = pp.load_image_file, []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) > 12:
            raise RuntimeError("node lost")
        return real(*a, **kw)

    monkeypatch.setattr(pp, "load_image_file", failing)
    with pytest.raises(RuntimeError, match="node lost"):
        pp._process_batch({"path": [shard]}, **kwargs)
    assert not storage.exists(part) and not storage.exists("s3://bucket/h/out/_work/done")
    assert list(tmpdir.iterdir()) == []  # the local temp Parquet file is gone too
    monkeypatch.setattr(pp, "load_image_file", real)

    first = json.loads(pp._process_batch({"path": [shard]}, **kwargs)["result"][0])
    assert first["file"] == "part-p00000.parquet" and storage.exists(part)
    assert pq.ParquetFile(storage.resolve(part)[1], filesystem=storage.resolve(part)[0]).metadata.num_rows == sum(
        first["rows"].values()
    )
    assert len(storage.listdir("s3://bucket/h/out/_work/done")) == 1
    storage.remove(part)  # the done marker (an object on the store) short-cuts the second call
    again = json.loads(pp._process_batch({"path": [shard]}, **kwargs)["result"][0])
    assert again == first and not storage.exists(part)
    assert list(tmpdir.iterdir()) == []
    assert _store_tmp_empty(s3root)


def test_failed_upload_leaves_no_object(s3root, tmp_path, monkeypatch) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(1 << 16))

    def half_then_fail(fsrc, fdst, length=0):
        fdst.write(fsrc.read(1 << 15))
        raise OSError("connection reset")

    monkeypatch.setattr(pp.shutil, "copyfileobj", half_then_fail)
    with pytest.raises(OSError, match="connection reset"):
        pp._upload_file(src, "s3://bucket/u/part-p00000.parquet")
    assert not storage.exists("s3://bucket/u/part-p00000.parquet")


def test_remote_fingerprint_follows_the_layer_objects(s3root) -> None:
    storage.write_text("s3://bucket/fp/layer1.json", "[]")
    storage.write_text("s3://bucket/fp/layer2.json", "[]")
    a = pp.fingerprint("s3://bucket/fp", "s3://bucket/fp/images", CFG)
    assert a == pp.fingerprint("s3://bucket/fp/", "s3://bucket/fp/images/", CFG)
    assert a != pp.fingerprint("s3://bucket/fp", "s3://bucket/other/images", CFG)
    storage.write_text("s3://bucket/fp/layer1.json", "[ ]")
    assert pp.fingerprint("s3://bucket/fp", "s3://bucket/fp/images", CFG) != a


def test_missing_remote_layer1_is_a_clear_error(s3root) -> None:
    with pytest.raises(FileNotFoundError, match=r"s3://bucket/none/layer1.json not found"):
        pp.preprocess("s3://bucket/none", "s3://bucket/none-out", CFG)
