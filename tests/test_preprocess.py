"""Preprocessing: exact counts on the hostile corpus, Parquet schema, vocabulary rules, idempotent reruns."""

from __future__ import annotations

import errno
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hostile_corpus import write_hostile_corpus

from tnlbt.config import DataConfig
from tnlbt.data.images import decode_rgb
from tnlbt.data.preprocess import read_raw
from tnlbt.data.schema import RECIPE_SCHEMA, check_schema
from tnlbt.data.vocab import END_ID, START_ID, Vocab, build_vocab, encode_recipe_text

CFG = DataConfig(
    min_word_count=1, image_short_side=32, rows_per_file=16, row_group_rows=4, max_title_tokens=6
)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hostile")
    return root, write_hostile_corpus(root, links=True)


@pytest.fixture(scope="module")
def processed(ray_session, hostile, tmp_path_factory) -> tuple[Path, dict, dict]:
    from tnlbt.data.preprocess import preprocess

    root, expect = hostile
    out = tmp_path_factory.mktemp("processed")
    return out, preprocess(root, out, CFG), expect


def test_encode_recipe_text_limits() -> None:
    vocab = build_vocab(Counter({"cup": 3, "rice": 3, "boil": 3}), 1)
    cfg = DataConfig(max_ingredients=3, max_instructions=3, max_line_tokens=4, max_title_tokens=3)
    enc = encode_recipe_text(
        vocab, cfg, "Rice rice rice", ["1 cup rice", "", "cup", "rice", "x", "y"], ["Boil.", "  "]
    )
    assert enc["title_ids"] == [START_ID, vocab.word_id("rice"), vocab.word_id("rice")]
    assert len(enc["ingredient_ids"]) == 3 and all(len(x) <= 4 for x in enc["ingredient_ids"])
    assert enc["ingredient_ids"][1] == [START_ID, vocab.word_id("cup"), END_ID]  # the empty line was skipped
    assert enc["instruction_ids"] == [[START_ID, vocab.word_id("boil"), vocab.word_id("."), END_ID]]


def test_driver_stage_counts_without_ray(hostile, tmp_path) -> None:
    root, expect = hostile
    raw = read_raw(root, tmp_path, CFG)
    assert raw["records_input"] == expect["input"]
    assert raw["rejected"]["counts"] == expect["rejected"]
    assert raw["dropped"]["counts"] == {"no_image_eval": expect["dropped"]["no_image_eval"]}
    assert raw["layer2"] == {
        "entries": raw["layer2"]["entries"],
        "bad_entries": 1,
        "duplicate_ids": 1,
        "orphans": 1,
    }
    assert raw["parse_errors"] == []
    assert raw["truncated"]["counts"] == expect["truncated"]
    records = [json.loads(line) for s in raw["shards"] for line in Path(s).read_text().splitlines()]
    long1 = next(r for r in records if r["id"] == "long1")
    assert long1["title"] == ("Tomato " * 43).strip() and len(long1["ingredients"]) == 50
    assert len(long1["instructions"]) == 50 and len(long1["ingredients"][0]) <= 500
    assert all(len(r["title"]) <= 300 and all(len(x) <= 500 for x in r["ingredients"] + r["instructions"])
               for r in records)
    per_shard = [len(Path(s).read_text().splitlines()) for s in raw["shards"]]
    assert sum(per_shard) == raw["kept_before_photos"]
    assert max(per_shard) <= CFG.rows_per_file
    # The vocabulary's counts, taken while reading, against counting the paired train shards afterwards.
    from collections import Counter

    from tnlbt.data.preprocess import record_cost
    from tnlbt.data.vocab import count_words

    brute: Counter[str] = Counter()
    for shard in (s for s in raw["shards"] if Path(s).name.startswith("train-p-")):
        for line in Path(shard).read_text().splitlines():
            r = json.loads(line)
            count_words([r["title"], *r["ingredients"], *r["instructions"]], brute)
    assert raw["word_counts"] == brute and brute
    assert raw["shard_costs"] == {s: sum(record_cost(json.loads(x)) for x in Path(s).read_text().splitlines())
                                  for s in raw["shards"]}


@pytest.mark.ray
def test_hostile_counts_are_exact(processed) -> None:
    _, stats, expect = processed
    rec, ph = stats["records"], stats["photos"]
    assert rec["input"] == expect["input"]
    assert rec["rejected"] == expect["rejected"]
    assert rec["dropped"] == expect["dropped"]
    assert rec["kept"] + sum(rec["rejected"].values()) + sum(rec["dropped"].values()) == rec["input"]
    assert rec["truncated"] == expect["truncated"] and rec["examples"]["long_title"] == ["long1"]
    assert rec["balanced"] and ph["balanced"]
    assert {k: ph[k] for k in ("listed", "ok", "unused_over_limit")} == {
        k: expect["photos"][k] for k in ("listed", "ok", "unused_over_limit")
    }
    want_rejected = {k: v for k, v in expect["photos"]["rejected"].items()}
    assert ph["rejected"] == want_rejected
    assert ph["formats"] == {"JPEG": ph["ok"] - 5, "PNG": 4, "WEBP": 1}  # png/webp named .jpg decode
    for split in ("train", "val", "test"):
        got = stats["splits"][split]
        assert got["paired"] == expect["splits"][split].get("paired", 0), split
        assert got["recipe_only"] == expect["splits"][split].get("recipe_only", 0), split
    for reason, ids in rec["examples"].items():
        assert 1 <= len(ids) <= 5, reason


@pytest.mark.ray
def test_parquet_schema_and_rows(processed) -> None:
    out, _, expect = processed
    vocab = Vocab.load(out / "vocab.json")
    n_labels = len(json.loads((out / "ingredients.json").read_text())["names"])
    ids, paired = set(), set()
    for split in ("train", "val", "test"):
        files = sorted((out / split).glob("part-*.parquet"))
        assert files, split
        for f in files:
            pf = pq.ParquetFile(f)
            assert check_schema(pf.schema_arrow) == [] and pf.schema_arrow.equals(RECIPE_SCHEMA)
            assert pf.metadata.num_rows <= CFG.rows_per_file
            assert all(
                pf.metadata.row_group(i).num_rows <= CFG.row_group_rows
                for i in range(pf.metadata.num_row_groups)
            )
            for row in pf.read().to_pylist():
                assert row["partition"] == split and row["id"] not in ids
                ids.add(row["id"])
                assert row["has_image"] == bool(row["images"]) and len(row["images"]) == len(row["image_ids"])
                assert len(row["images"]) <= CFG.max_images_per_recipe
                if row["has_image"]:
                    paired.add(row["id"])
                    img = decode_rgb(row["images"][0])
                    assert img.mode == "RGB" and min(img.size) == CFG.image_short_side
                assert row["title_ids"][0] == START_ID and len(row["title_ids"]) <= CFG.max_title_tokens
                assert len(row["title"]) <= CFG.max_title_chars
                assert len(row["ingredients"]) <= CFG.max_lines and len(row["instructions"]) <= CFG.max_lines
                assert all(len(x) <= CFG.max_line_chars for x in row["ingredients"] + row["instructions"])
                assert 1 <= len(row["ingredient_ids"]) <= CFG.max_ingredients
                assert all(0 < t < len(vocab) for line in row["instruction_ids"] for t in line)
                assert all(0 <= k < n_labels for k in row["ingredient_labels"])
                if split != "train":
                    assert row["has_image"]
    assert ids == expect["kept_ids"] and paired == expect["paired_ids"]
    assert (out / "_SUCCESS").is_file() and not (out / "_work").exists()
    assert json.loads((out / "config.json").read_text())["data"]["image_short_side"] == 32


@pytest.mark.ray
def test_vocab_from_paired_train_only(processed) -> None:
    out, _, _ = processed
    vocab = Vocab.load(out / "vocab.json")
    assert vocab.tokens[:3] == ["<pad>", "<start>", "<end>"] and vocab.tokens[-1] == "<unk>"
    assert "tomato" in vocab and "bake" in vocab and "1/2" not in vocab
    assert "quinoaonly" not in vocab and "zucchinival" not in vocab  # recipe-only train / val words


@pytest.mark.ray
def test_rerun_is_idempotent_and_guarded(processed, hostile) -> None:
    from tnlbt.data.preprocess import preprocess

    out, stats, _ = processed
    root, _ = hostile
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = preprocess(root, out, CFG)
    assert again["skipped"] is True and again["records"] == stats["records"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == files
    with pytest.raises(ValueError, match="--overwrite"):
        preprocess(root, out, DataConfig(min_word_count=2, image_short_side=32))


@pytest.mark.ray
def test_cli_overwrite(processed, hostile, tmp_path, capsys) -> None:
    from tnlbt.cli import main

    root, expect = hostile
    out = tmp_path / "cli"
    (out / "train").mkdir(parents=True)
    (out / "notes.txt").write_text("user file")  # not ours: must survive --overwrite
    args = [
        "preprocess",
        "--data",
        str(root),
        "--out",
        str(out),
        "data.min_word_count=2",
        "data.image_short_side=48",
        "data.rows_per_file=1000",
    ]
    assert main(args) == 0
    assert main([*args[:5], "--overwrite", *args[5:]]) == 0
    text = capsys.readouterr().out
    assert f"records: {expect['input']} in" in text
    assert (out / "notes.txt").read_text() == "user file"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["records"]["balanced"] and stats["vocab"]["min_count"] == 2
    assert len(list((out / "train").glob("part-*.parquet"))) == 2  # one paired + one recipe-only file


def test_rebalance_small_corpus_keeps_every_line(tmp_path) -> None:
    from tnlbt.data.preprocess import rebalance_shards

    (tmp_path / "train-p-00000.jsonl").write_text("".join(f'{{"i": {i}}}\n' for i in range(100)))
    (tmp_path / "val-p-00000.jsonl").write_text("".join(f'{{"i": {i}}}\n' for i in range(100, 110)))
    shards = [str(tmp_path / "train-p-00000.jsonl"), str(tmp_path / "val-p-00000.jsonl")]
    out = rebalance_shards(shards, tmp_path, min_shards=4, min_rows=8)
    lines = [json.loads(x)["i"] for s in out for x in Path(s).read_text().splitlines()]
    assert sorted(lines) == list(range(110)) and len(out) == 5  # 28-row shards: 4 train + 1 val
    assert all(Path(s).name.split("-")[0] == ("val" if "val" in s else "train") for s in out)
    assert rebalance_shards(out, tmp_path, min_shards=2) == out  # enough shards: untouched
    costs: dict[str, float] = {}
    capped = rebalance_shards(out[:1], tmp_path, min_shards=4, min_rows=32, max_rows=16, costs=costs)  # 28 rows
    assert [len(Path(s).read_text().splitlines()) for s in capped] == [16, 12]  # never above rows_per_file
    assert [costs[s] for s in capped] == [16.0, 12.0]  # text-only records: one unit each


def test_largest_shards_are_scheduled_first() -> None:
    from tnlbt.data.preprocess import PHOTO_COST, largest_first, record_cost

    assert record_cost({"image_ids": ["a", "b"]}) == 1 + 2 * PHOTO_COST and record_cost({}) == 1
    costs = {"a": 5.0, "b": 50.0, "c": 5.0, "d": 70.0}
    assert largest_first(["a", "b", "c", "d", "e"], costs) == ["d", "b", "a", "c", "e"]  # stable among equals


def test_shard_task_resumes_from_done_marker(hostile, tmp_path) -> None:
    """The Ray UDF called directly (no cluster): a finished shard is not processed twice."""
    from tnlbt.data.preprocess import _process_batch
    from tnlbt.data.vocab import IngredientVocab

    root, _ = hostile
    raw = read_raw(root, tmp_path, CFG)
    shard = next(s for s in raw["shards"] if Path(s).name.startswith("val-"))
    done = tmp_path / "done"
    done.mkdir()
    kwargs = dict(
        out_dir=str(tmp_path / "out"),
        done_dir=str(done),
        vocab=build_vocab(Counter(a=1), 1),
        ingredients=IngredientVocab([]),
        cfg_dict=CFG.__dict__.copy(),
        images_dir=str(root / "images"),
    )
    first = json.loads(_process_batch({"path": [shard]}, **kwargs)["result"][0])
    part = tmp_path / "out" / "val" / "part-p00000.parquet"
    assert first["file"] == part.name and part.is_file() and first["rows"]["paired"] >= 1
    part.unlink()  # a second call with the same shard content reads the done marker, writes nothing
    again = json.loads(_process_batch({"path": [shard]}, **kwargs)["result"][0])
    assert again == first and not part.exists()
    with open(shard, "a") as fh:  # different content under the same name (shards cut differently): redone
        fh.write(Path(shard).read_text().splitlines(keepends=True)[0])
    third = json.loads(_process_batch({"path": [shard]}, **kwargs)["result"][0])
    assert part.exists() and sum(third["rows"].values()) == sum(first["rows"].values()) + 1


def test_photos_behind_links_out_of_the_image_root_are_refused(hostile, tmp_path) -> None:
    """Every shard through the task function (no Ray): links out of images/ are counted, never stored."""
    from tnlbt.data.preprocess import process_shard
    from tnlbt.data.vocab import IngredientVocab

    root, expect = hostile
    assert len(expect["outside_ids"]) == 3 and all((root / "outside").rglob("*.jpg"))
    raw = read_raw(root, tmp_path / "shards", CFG)
    rejected, stored = Counter(), set()
    for shard in raw["shards"]:
        out = tmp_path / "out" / f"{Path(shard).stem}.parquet"
        res = process_shard(shard, out, vocab=build_vocab(Counter(a=1), 1), ingredients=IngredientVocab([]),
                            cfg=CFG, images_dir=str(root / "images"))
        rejected.update(res["photos"]["rejected"]["counts"])
        if out.exists():
            stored |= {i for row in pq.read_table(out, columns=["image_ids"]).to_pylist() for i in row["image_ids"]}
    assert rejected["outside_root"] == expect["photos"]["rejected"]["outside_root"] == 3
    assert not stored & expect["outside_ids"]
    assert any(p.is_symlink() for p in (root / "images").rglob("*.jpg"))  # the link inside the root is kept


def _cli(args: list[str], capsys) -> tuple[int, str, list[str]]:
    """Run ``tnlbt ARGS`` in this process: exit code, stdout, stderr lines."""
    from tnlbt.cli import main

    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.splitlines()


def _truncated_copy(root: Path, dest: Path) -> tuple[Path, int]:
    """The hostile layer files with layer1.json cut at two thirds (a broken download); returns its size."""
    dest.mkdir()
    for name in ("layer2.json", "det_ingrs.json"):
        (dest / name).write_bytes((root / name).read_bytes())
    whole = (root / "layer1.json").read_bytes()
    (dest / "layer1.json").write_bytes(whole[: len(whole) * 2 // 3])
    return dest, len(whole) * 2 // 3


SMALL = ["data.min_word_count=1", "data.image_short_side=32", "data.rows_per_file=16"]


def test_truncated_layer1_fails_in_one_line(hostile, tmp_path, capsys) -> None:
    """Before: exit 0 with the first two thirds of the records. Now the driver stops before Ray starts."""
    root, _ = hostile
    data, size = _truncated_copy(root, tmp_path / "raw")
    rc, _, err = _cli(["preprocess", "--data", str(data), "--out", str(tmp_path / "out"), *SMALL], capsys)
    assert rc == 2 and len(err) == 1, err
    assert f"{data / 'layer1.json'}: JSON error after " in err[0]
    assert f"the file ends early, at byte {size:,}: parse error: premature EOF" in err[0]
    assert "--allow-partial" in err[0]
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.ray
def test_allow_partial_keeps_the_records_before_the_error(ray_session, hostile, tmp_path, capsys) -> None:
    from tnlbt.data.recipe1m import iter_json_array

    root, _ = hostile
    data, _ = _truncated_copy(root, tmp_path / "raw")
    out = tmp_path / "out"
    args = ["preprocess", "--data", str(data), "--images", str(root / "images"), "--out", str(out), *SMALL]
    rc, text, err = _cli([*args[:7], "--allow-partial", *args[7:]], capsys)
    assert rc == 0, err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["records"]["input"] == sum(1 for _ in iter_json_array(data / "layer1.json", []))
    assert stats["records"]["balanced"] and stats["records"]["kept"] > 0 and (out / "_SUCCESS").is_file()
    assert len(stats["parse_errors"]) == 1 and "ends early" in stats["parse_errors"][0]
    assert "partial input kept: " in text


def test_no_usable_recipe_fails_in_one_line(tmp_path, capsys) -> None:
    """Before: exit 0 and an empty dataset, which only failed later, in training."""
    data = tmp_path / "raw"
    data.mkdir()
    (data / "layer1.json").write_text(json.dumps([42, {"id": "x", "title": "t"}]))
    (data / "layer2.json").write_text("[]")
    rc, _, err = _cli(["preprocess", "--data", str(data), "--out", str(tmp_path / "out"), *SMALL], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "layer1.json: no usable recipe among 2 records (rejected: {'missing_field': 1, 'not_object': 1}" in err[0]
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.ray
def test_every_recipe_losing_its_photos_fails_in_one_line(ray_session, tmp_path, capsys) -> None:
    data = tmp_path / "raw"
    data.mkdir()
    rec = {"id": "v1", "title": "Soup", "ingredients": [{"text": "water"}], "instructions": [{"text": "Boil."}],
           "partition": "val"}
    (data / "layer1.json").write_text(json.dumps([rec]))
    (data / "layer2.json").write_text(json.dumps([{"id": "v1", "images": [{"id": "abcd000000.jpg"}]}]))
    out = tmp_path / "out"
    rc, _, err = _cli(["preprocess", "--data", str(data), "--out", str(out), *SMALL], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "no recipe kept: all 1 recipes that passed validation were dropped ({'no_valid_image': 1})" in err[0]
    assert json.loads((out / "stats.json").read_text())["photos"]["rejected"] == {"missing_file": 1}
    assert not (out / "_SUCCESS").exists()


class _FullDisk(io.RawIOBase):
    """An output stream on a disk that fills up after ``room`` bytes (what the shard writer sees)."""

    def __init__(self, inner, room: int):
        self.inner, self.room = inner, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            self.inner.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.inner.write(data)

    def close(self) -> None:
        self.inner.close()
        super().close()


@pytest.mark.ray
def test_full_disk_is_one_line_and_the_same_command_completes_later(
    ray_session, hostile, tmp_path, capsys, monkeypatch
) -> None:
    """Before: a 20-line traceback. Now: exit 1 and one line, whether the disk fills in the driver (shards),
    in a Ray task (a Parquet part: a real ENOSPC from /dev/full) or at the last file (_SUCCESS); nothing
    half-written is left under a final name, and the same command completes once there is space again."""
    from tnlbt import storage

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    root, expect = hostile
    out = tmp_path / "out"
    args = ["preprocess", "--data", str(root), "--out", str(out), *SMALL]

    def assert_failed_in_one_line(*names: str) -> None:
        rc, _, err = _cli(args, capsys)
        assert rc == 28 and len(err) == 1, err  # tnlbt.cli.EXIT_NO_SPACE
        assert err[0].startswith("tnlbt preprocess: out of disk space (") and "run the same command again" in err[0]
        assert all(n in err[0] for n in names), err[0]
        assert not (out / "_SUCCESS").exists()
        assert not [p for p in out.rglob("*.tmp")], "a failed write left its temp file"

    real_open = storage.open_output
    monkeypatch.setattr(storage, "open_output", lambda uri: _FullDisk(real_open(uri), 100)
                        if "/_work/shards/" in str(uri) else real_open(uri))
    assert_failed_in_one_line("No space left on device")  # the driver, writing the first JSONL shard
    monkeypatch.undo()

    # The rerun resumes (same fingerprint: nothing is cleaned), so this link stays where the task writes.
    part_tmp = out / "train" / ".part-p00000.parquet.tmp"
    part_tmp.parent.mkdir(parents=True, exist_ok=True)
    part_tmp.symlink_to("/dev/full")
    assert_failed_in_one_line("part-p00000.parquet", "No space left on device")
    assert not part_tmp.is_symlink() and not (out / "train" / "part-p00000.parquet").exists()
    assert list((out / "_work" / "done").glob("*.json")), "the parts that were written are marked done"

    (out / "_SUCCESS.tmp").symlink_to("/dev/full")  # the very last write
    assert_failed_in_one_line()
    assert (out / "stats.json").is_file() and (out / "_work").is_dir()  # resumable from the done markers

    rc, _, err = _cli(args, capsys)
    assert rc == 0, err
    stats = json.loads((out / "stats.json").read_text())
    rec, ph = stats["records"], stats["photos"]
    assert (rec["input"], rec["rejected"], rec["dropped"]) == (expect["input"], expect["rejected"], expect["dropped"])
    assert ph["ok"] == expect["photos"]["ok"] and ph["rejected"] == expect["photos"]["rejected"]
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("*/part-*.parquet"))
    assert rows == rec["kept"] == len(expect["kept_ids"])
    assert (out / "_SUCCESS").is_file() and not (out / "_work").exists() and not list(out.rglob("*.tmp"))
