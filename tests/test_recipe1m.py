"""Streaming Recipe1M reader: record validation, invalid UTF-8, broken JSON, image paths."""

from __future__ import annotations

import io
import json
import random
import time
import tracemalloc

import pytest

from tnlbt.data.recipe1m import (
    JsonDepthGuard,
    TooDeep,
    Utf8Sanitizer,
    clean_det_ingrs,
    clean_layer1,
    clean_layer2,
    image_path,
    iter_json_array,
)

GOOD = {
    "id": "000018c8a5",
    "title": " Worlds Best Mac and Cheese ",
    "partition": "train",
    "url": "u",
    "ingredients": [{"text": "6 ounces penne"}, {"text": "  "}, {"text": "2 cups milk"}],
    "instructions": [{"text": "Preheat oven."}, {"text": "Bake."}],
}


def test_clean_layer1_good_record() -> None:
    rec, reason = clean_layer1(GOOD)
    assert reason is None
    assert rec == {
        "id": "000018c8a5",
        "title": "Worlds Best Mac and Cheese",
        "partition": "train",
        "ingredients": ["6 ounces penne", "2 cups milk"],
        "instructions": ["Preheat oven.", "Bake."],
    }


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": None}, "missing_field"),
        ({"id": 5}, "bad_type"),
        ({"id": ""}, "bad_id"),
        ({"title": ["x"]}, "bad_type"),
        ({"ingredients": {"text": "x"}}, "bad_type"),
        ({"ingredients": ["x"]}, "bad_type"),
        ({"instructions": [{"txt": "x"}]}, "bad_type"),
        ({"partition": "dev"}, "bad_partition"),
        ({"ingredients": []}, "empty_ingredients"),
        ({"instructions": [{"text": " "}]}, "empty_instructions"),
        ({"title": "caf\ufdd0"}, "invalid_utf8"),
        ({"instructions": [{"text": "a\udc80"}]}, "invalid_utf8"),
    ],
)
def test_clean_layer1_rejections(change: dict, reason: str) -> None:
    assert clean_layer1({**GOOD, **change}) == (None, reason)
    assert clean_layer1([GOOD]) == (None, "not_object")


def test_partition_is_normalised() -> None:
    rec, _ = clean_layer1({**GOOD, "partition": " Val "})
    assert rec is not None and rec["partition"] == "val"


def test_layer2_and_det_entries() -> None:
    rid, ids = clean_layer2({"id": "r1", "images": [{"id": "3e233001e2.jpg"}, {"id": "../x.jpg"}, "x", {}]})
    assert rid == "r1" and ids == ["3e233001e2.jpg", "", "", ""]
    assert clean_layer2({"id": "r1"}) == (None, None)
    rid, names = clean_det_ingrs(
        {
            "id": "r1",
            "ingredients": [{"text": "Penne_Pasta"}, {"text": "milk"}, {"text": "x"}],
            "valid": [True, True, False],
        }
    )
    assert (rid, names) == ("r1", ["penne pasta", "milk"])
    assert clean_det_ingrs({"id": "r1", "ingredients": [{"text": "a"}]}) == (None, None)


def test_image_path_layout(tmp_path) -> None:
    assert image_path(tmp_path, "val", "ef3dc0de11.jpg") == tmp_path / "val/e/f/3/d/ef3dc0de11.jpg"


def test_stream_skips_invalid_utf8_record_only(tmp_path) -> None:
    items = [json.dumps({**GOOD, "id": f"r{i}"}).encode() for i in range(4)]
    items[1] = items[1].replace(b"Worlds", b"W\xff\xc3rlds")
    items[2] = items[2].replace(b"penne", b"pen\\udc80ne")
    (tmp_path / "l1.json").write_bytes(b"\xef\xbb\xbf[" + b",".join(items) + b"]")
    out = [clean_layer1(x) for x in iter_json_array(tmp_path / "l1.json")]
    assert [r for _, r in out] == [None, "invalid_utf8", "invalid_utf8", None]
    assert [rec["id"] for rec, _ in out if rec] == ["r0", "r3"]


def test_truncated_json_keeps_records_before_the_error(tmp_path) -> None:
    text = json.dumps([{**GOOD, "id": f"r{i}"} for i in range(5)])
    (tmp_path / "l1.json").write_text(text[: len(text) * 3 // 4])
    errors: list[str] = []
    got = list(iter_json_array(tmp_path / "l1.json", errors))
    assert 1 <= len(got) < 5 and len(errors) == 1 and "JSON error" in errors[0]


def test_not_an_array_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "l1.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="expected a JSON array"):
        list(iter_json_array(tmp_path / "l1.json"))


def test_sanitizer_chunking_matches_whole_file_decode() -> None:
    """Chunked streaming (any chunk size) vs a brute-force whole-buffer decode of the same bytes."""
    src = (
        rb'["a\udc80b", "\\udc80", "\ud83d\ude00", "x\ud800y", "qqqqqqqq\ud83d", "\\\ud800", "caf'
        + b"\xc3\xa9"
        + b'", "bad\xff\xfe", "\xe2\x82"]'
    )
    want = [
        "a\ufdd0b",
        "\\udc80",
        "\U0001f600",
        "x\ufdd0y",
        "qqqqqqqq\ufdd0",
        "\\\ufdd0",
        "café",
        "bad\ufdd0\ufdd0",
        "\ufdd0",
    ]
    whole = Utf8Sanitizer(io.BytesIO(src), chunk_size=1 << 20).read()
    assert json.loads(whole) == want
    for chunk in (1, 2, 3, 5, 7, 11, 13):
        f = Utf8Sanitizer(io.BytesIO(src), chunk_size=chunk)
        parts = []
        while piece := f.read(4):
            parts.append(piece)
        assert b"".join(parts) == whole, chunk


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("unit", "mib"),
    [
        ("a", 16),  # hex digits: was carried and re-scanned chunk after chunk (8 MiB: 4 s, 20 MiB: 9.9 s)
        ("\\\\", 4),  # escaped backslashes: the surrogate regex backtracked over the run (64 KiB: 36 s)
        ("ud83d", 16),
    ],
)
def test_sanitizer_is_linear_on_escape_like_runs(unit: str, mib: int) -> None:
    """A title made of one escape-like character repeated: CPU time stays that of ordinary text."""
    body = (unit * ((mib << 20) // len(unit) + 1))[: (mib << 20) // len(unit) * len(unit)]
    data = b'["' + body.encode() + b'\\u00e9", "x\\udc80"]'
    t0 = time.process_time()  # this process's CPU time: other jobs on the box do not count
    out = Utf8Sanitizer(io.BytesIO(data)).read()
    spent = time.process_time() - t0
    got = json.loads(out)
    assert got[0].endswith("é") and got[1] == "x\ufdd0"
    assert spent < 1.5, f"{spent:.2f}s CPU for {mib} MiB"  # about 0.05 s/MiB after the fix


def test_sanitizer_any_chunking_matches_whole_decode_on_random_escapes() -> None:
    """Backslash runs of any length before surrogate-like escapes, cut at every small chunk size: the same
    bytes as one whole decode (the carried tail keeps only a run's parity)."""
    rng = random.Random(7)
    pieces = ["ud83d", "udc80", "ude00", "uD800", "u00e9", "a", "x", "é", "", "u"]
    for _ in range(300):
        text = "".join("\\" * rng.choice([0, 0, 1, 2, 3, 4, 11, 12, 13]) + rng.choice(pieces)
                       for _ in range(rng.randint(1, 12)))
        src = b'["' + text.encode() + b'"]'
        whole = Utf8Sanitizer(io.BytesIO(src), chunk_size=1 << 20).read()
        for chunk in (1, 2, 3, 4, 5, 7, 11, 12, 13, 17, 29):
            assert Utf8Sanitizer(io.BytesIO(src), chunk_size=chunk).read() == whole, (text, chunk)


def test_deep_record_is_rejected_before_the_parser_grows() -> None:
    """ijson's memory is quadratic in depth (10k levels: 240 MiB traced, 40k: 3.9 GiB); the guard keeps it flat."""
    depth = 20_000  # 40 KB of brackets; 1 GiB traced and 2 s before the guard
    deep = {**GOOD, "id": "deep", "url": None}
    raw = json.dumps(deep).replace('"url": null', '"url": ' + "[" * depth + "]" * depth).encode()
    data = b"[" + json.dumps(GOOD).encode() + b"," + raw + b"," + json.dumps({**GOOD, "id": "after"}).encode() + b"]"
    tracemalloc.start()
    try:
        items = list(iter_json_array(io.BytesIO(data)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak >> 20} MiB"
    assert [clean_layer1(x)[1] for x in items] == [None, "too_deep", None]
    assert isinstance(items[1], TooDeep) and items[1].item["id"] == "deep"  # the rest of the record is kept
    assert items[2]["id"] == "after"
    # Recipe1M's own records nest 3 levels; the limit counts the record itself as level 1.
    assert [type(x) for x in iter_json_array(io.BytesIO(b"[" + json.dumps(GOOD).encode() + b"]"), max_depth=3)] \
        == [dict]
    assert isinstance(next(iter_json_array(io.BytesIO(b"[" + json.dumps(GOOD).encode() + b"]"), max_depth=2)),
                      TooDeep)


def _random_json(rng: random.Random, level: int) -> object:
    texts = ["", "a", "[", "]", "{", "}", ",", '"', "\\", '\\"', 'x"[{', "é", "\u2028", "\\u005b"]
    kind = rng.random()
    if level > 7 or kind < 0.3:
        return rng.choice([rng.choice(texts) * rng.randint(1, 3), 1.5, None, True, -3])
    if kind < 0.65:
        return [_random_json(rng, level + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(texts) + str(i): _random_json(rng, level + 1) for i in range(rng.randint(0, 3))}


def _clip(value: object, level: int, max_depth: int) -> tuple[object, bool]:
    """Reference: containers below ``max_depth`` levels become None (an item is level 1)."""
    if not isinstance(value, (list, dict)):
        return value, False
    if level > max_depth:
        return None, True
    if isinstance(value, list):
        pairs = [_clip(v, level + 1, max_depth) for v in value]
        return [v for v, _ in pairs], any(c for _, c in pairs)
    pairs2 = {k: _clip(v, level + 1, max_depth) for k, v in value.items()}
    return {k: v for k, (v, _) in pairs2.items()}, any(c for _, c in pairs2.values())


@pytest.mark.parametrize("walk_only", [False, True])
def test_depth_guard_matches_a_reference_at_any_chunking(walk_only: bool, monkeypatch) -> None:
    """Random nesting with strings full of brackets, quotes and backslashes: the guard's output parses to the
    reference clip, and it flags exactly the items that were clipped (fast path and token walk alike)."""
    if walk_only:
        monkeypatch.setattr(JsonDepthGuard, "_summed", lambda self, b: False)
    rng = random.Random(11)
    for _ in range(40):
        items = [_random_json(rng, 1) for _ in range(rng.randint(1, 6))]
        max_depth = rng.randint(1, 5)
        want = [_clip(x, 1, max_depth) for x in items]
        text = json.dumps(items, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
        for chunk in (1, 2, 3, 7, 64, 1 << 20):
            guard = JsonDepthGuard(io.BytesIO(text.encode()), max_depth, chunk_size=chunk)
            out = b"".join(iter(lambda g=guard: g.read(5), b""))
            assert json.loads(out) == [v for v, _ in want], (text, chunk)
            assert guard.too_deep == {i for i, (_, cut) in enumerate(want) if cut}, (text, chunk)


def test_cap_text_cuts_and_names_each_limit() -> None:
    from tnlbt.data.recipe1m import cap_text

    rec, _ = clean_layer1({**GOOD, "title": "ab " * 10, "ingredients": [{"text": f"{i} cup  x"} for i in range(9)]})
    assert rec is not None
    assert cap_text(rec, max_title_chars=5, max_line_chars=6, max_lines=4) == ["long_title", "long_line", "many_lines"]
    assert rec["title"] == "ab ab" and rec["ingredients"] == ["0 cup", "1 cup", "2 cup", "3 cup"]
    assert rec["instructions"] == ["Prehea", "Bake."]  # cut to 6 characters
    untouched = dict(rec)
    assert cap_text(rec, 300, 500, 50) == [] and rec == untouched


def test_json_error_message_names_the_file_and_where(tmp_path) -> None:
    text = json.dumps([{**GOOD, "id": f"r{i}"} for i in range(5)])
    cases = {"cut.json": text[: len(text) * 3 // 4], "garbled.json": text.replace('"id": "r3"', '"id" "r3"')}
    for name, data in cases.items():
        (tmp_path / name).write_text(data)
    errors: list[str] = []
    assert len(list(iter_json_array(tmp_path / "cut.json", errors))) == 3
    assert len(list(iter_json_array(tmp_path / "garbled.json", errors))) == 3
    size = len(cases["cut.json"].encode())
    assert errors[0] == f"cut.json: JSON error after 3 items, the file ends early, at byte {size:,}: " \
                        "parse error: premature EOF"
    assert errors[1].startswith("garbled.json: JSON error after 3 items, within its first ")
    assert all("\n" not in e for e in errors)
