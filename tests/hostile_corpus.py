"""Writes a tiny Recipe1M-layout folder full of known bad items, and the exact counts preprocessing must
report.


Every hostile item is listed once, with the reason the pipeline must give it; :func:`write_hostile_corpus`
returns those expectations so tests compare numbers, not just "it did not crash". Photos are small (<= 96 px)
so a whole run takes seconds.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

WORDS = [
    "tomato",
    "onion",
    "garlic",
    "basil",
    "chicken",
    "rice",
    "butter",
    "flour",
    "sugar",
    "lemon",
    "pepper",
    "salt",
    "cream",
    "cheese",
    "pasta",
    "beef",
    "carrot",
    "celery",
    "egg",
    "milk",
]
MAX_IMAGES = 5  # the corpus expects data.max_images_per_recipe=5


def _photo(rng: random.Random, w: int = 64, h: int = 48, mode: str = "RGB") -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = [rng.randrange(256) for _ in range(3)]
    arr[h // 4 : h // 2, w // 4 : w // 2] = [rng.randrange(256) for _ in range(3)]
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _bomb_png(w: int = 40000, h: int = 40000) -> bytes:
    """A tiny PNG whose header claims w x h pixels: PIL must refuse it from the header alone."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00"))
        + _png_chunk(b"IEND", b"")
    )


def _photo_bytes(kind: str, rng: random.Random) -> bytes | None:
    """Bytes for one photo kind (None = no file). Kinds ending in '_ok' must decode."""
    if kind == "jpeg_ok":
        return _encode(_photo(rng), "JPEG", quality=85)
    if kind == "png_named_jpg_ok":
        return _encode(_photo(rng), "PNG")
    if kind == "webp_named_jpg_ok":
        return _encode(_photo(rng), "WEBP")
    if kind == "cmyk_ok":
        return _encode(_photo(rng, mode="CMYK"), "JPEG")
    if kind == "grey_ok":
        return _encode(_photo(rng, mode="L"), "JPEG")
    if kind == "palette_alpha_ok":
        img = _photo(rng).convert("P")
        return _encode(img, "PNG", transparency=0)
    if kind == "rgba_ok":
        return _encode(_photo(rng, mode="RGBA"), "PNG")
    if kind == "grey16_ok":
        arr = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
        return _encode(Image.fromarray(arr, "I;16"), "PNG")
    if kind == "missing_file":
        return None
    if kind == "empty_file":
        return b""
    if kind == "truncated":
        data = _encode(_photo(rng, 96, 96), "JPEG", quality=95)
        return data[: len(data) // 2]
    if kind == "corrupt":
        return bytes(rng.randrange(256) for _ in range(700))
    if kind == "too_large":
        return _bomb_png()
    if kind == "too_small":
        return _encode(_photo(rng, 8, 8), "JPEG")
    if kind == "extreme_aspect":
        return _encode(_photo(rng, 240, 16), "JPEG")
    raise ValueError(kind)


class CorpusBuilder:
    def __init__(self, root: Path, seed: int = 0):
        self.root = Path(root)
        self.rng = random.Random(seed)
        self.layer1: list[bytes] = []  # raw JSON items, so invalid bytes can be injected
        self.layer2: list[bytes] = []
        self.det: list[bytes] = []
        self.n = 0
        self.expect: dict[str, Any] = {
            "input": 0,
            "rejected": Counter(),
            "dropped": Counter(),
            "truncated": {},  # kept records whose stored text is cut, by limit (default DataConfig limits)
            "splits": {s: Counter() for s in ("train", "val", "test")},
            "photos": {"listed": 0, "ok": 0, "unused_over_limit": 0, "rejected": Counter()},
            "formats": Counter(),
            "kept_ids": set(),
            "paired_ids": set(),
            "outside_ids": set(),  # photos behind a symlink out of the image root (links=True)
        }

    def _text(self, k: int) -> list[str]:
        return [
            f"{self.rng.randint(1, 3)} cup {self.rng.choice(WORDS)} {self.rng.choice(WORDS)}"
            for _ in range(k)
        ]

    def _next_id(self) -> str:
        self.n += 1
        return f"r{self.n:05d}"

    def raw(self, item: bytes, reason: str) -> None:
        """A layer1 item that must be rejected with ``reason``."""
        self.layer1.append(item)
        self.expect["input"] += 1
        self.expect["rejected"][reason] += 1

    def bad(self, obj: Any, reason: str) -> None:
        self.raw(json.dumps(obj).encode(), reason)

    def recipe(
        self,
        split: str,
        photos: list[str],
        rid: str | None = None,
        *,
        expect: bool = True,
        image_entries: list[Any] | None = None,
        title: str | None = None,
        ingredients: list[str] | None = None,
        instructions: list[str] | None = None,
    ) -> dict[str, Any]:
        rid = rid or self._next_id()
        title = title or f"{self.rng.choice(WORDS).title()} {self.rng.choice(WORDS)} bake"
        rec = {
            "id": rid,
            "title": title,
            "ingredients": [{"text": t} for t in ingredients or self._text(self.rng.randint(2, 5))],
            "instructions": [
                {"text": t}
                for t in instructions or [f"Mix the {w} well. Bake 20 minutes." for w in self.rng.sample(WORDS, 3)]
            ],
            "partition": split,
            "url": f"http://example.com/{rid}",
        }
        self.layer1.append(json.dumps(rec).encode())
        self.expect["input"] += 1
        names = [t["text"].split(" ", 2)[2] for t in rec["ingredients"]]
        self.det.append(
            json.dumps(
                {"id": rid, "ingredients": [{"text": n} for n in names], "valid": [True] * len(names)}
            ).encode()
        )
        entries = []
        for kind in photos:
            iid = f"{self.rng.getrandbits(40):010x}.jpg"
            path = self.root / "images" / split / iid[0] / iid[1] / iid[2] / iid[3] / iid
            if kind.startswith(("outside_root", "link_")):
                self._link(kind, path)
            elif (data := _photo_bytes(kind, self.rng)) is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            entries.append({"id": iid, "url": f"http://example.com/{iid}", "_kind": kind})
        if image_entries is not None:
            entries = image_entries
        if entries:
            clean = [
                {k: v for k, v in e.items() if k != "_kind"} if isinstance(e, dict) else e for e in entries
            ]
            self.layer2.append(json.dumps({"id": rid, "images": clean}).encode())
        if expect:
            self._expect_recipe(rid, split, entries)
        return rec

    def _link(self, kind: str, path: Path) -> None:
        """A good JPEG reached through a symlink: out of the image root (file or folder link) or inside it."""
        data = _photo_bytes("jpeg_ok", self.rng) or b""
        if kind == "link_inside_ok":  # a relative link to a photo elsewhere in the tree: allowed
            target = self.root / "images" / "shared" / path.name
        elif kind == "outside_root":  # the photo itself links to a file next to the image root
            target = self.root / "outside" / path.name
        else:  # "outside_root:dir": the folder above the photo links out of the root
            target = self.root / "outside" / f"dir-{path.name}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if kind == "outside_root:dir":
            path.parent.parent.mkdir(parents=True, exist_ok=True)
            path.parent.symlink_to(target.parent, target_is_directory=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(os.path.relpath(target, path.parent))
        self.expect["outside_ids"] |= {path.name} if kind.startswith("outside_root") else set()

    def _expect_recipe(self, rid: str, split: str, entries: list[Any]) -> None:
        ph, kept = self.expect["photos"], 0
        seen = set()
        for e in entries:
            ph["listed"] += 1
            if kept >= MAX_IMAGES:
                ph["unused_over_limit"] += 1
                continue
            kind = e.get("_kind", "bad_image_id") if isinstance(e, dict) else "bad_image_id"
            if kind != "bad_image_id" and e["id"] in seen:
                kind = "duplicate_image"
            if isinstance(e, dict) and "id" in e:
                seen.add(e["id"])
            if kind.endswith("_ok"):
                kept += 1
                ph["ok"] += 1
            else:
                ph["rejected"][kind.split(":")[0]] += 1  # "outside_root:dir" is counted as outside_root
        if not entries and split != "train":
            self.expect["dropped"]["no_image_eval"] += 1
        elif kept == 0 and split != "train":
            self.expect["dropped"]["no_valid_image"] += 1
        else:
            self.expect["splits"][split]["paired" if kept else "recipe_only"] += 1
            self.expect["kept_ids"].add(rid)
            if kept:
                self.expect["paired_ids"].add(rid)

    def write(self) -> dict[str, Any]:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "layer1.json").write_bytes(b"[\n" + b",\n".join(self.layer1) + b"\n]\n")
        (self.root / "layer2.json").write_bytes(b"[" + b",".join(self.layer2) + b"]")
        (self.root / "det_ingrs.json").write_bytes(b"[" + b",".join(self.det) + b"]")
        e = self.expect
        e["photos"]["rejected"] = dict(e["photos"]["rejected"])
        e["rejected"], e["dropped"] = dict(e["rejected"]), dict(e["dropped"])
        e["splits"] = {s: dict(c) for s, c in e["splits"].items()}
        return e


def write_hostile_corpus(root: str | Path, seed: int = 0, *, links: bool = False) -> dict[str, Any]:
    """Write the corpus under ``root``; return the exact expected counts (see CorpusBuilder.expect).

    ``links``: also photos behind symlinks (two out of the image root, one inside it). Off by default because
    copying the corpus to an object store (``storage.upload_dir``) follows links and turns them into plain files.
    """
    b = CorpusBuilder(Path(root), seed)
    ok = "jpeg_ok"
    # Valid recipes: train paired / recipe-only, val and test paired.
    for _ in range(8):
        b.recipe("train", [ok, ok])
    for _ in range(4):
        b.recipe("train", [])  # recipe-only (self-supervision)
    b.recipe("train", [], title="Quinoaonly salad")  # words only in recipe-only / val rows: not in the vocab
    for split in ("val", "test"):
        for _ in range(4):
            b.recipe(split, [ok])
    b.recipe("val", [ok], title="Zucchinival soup")
    # Valid but unusual photos: all decode.
    b.recipe("train", ["png_named_jpg_ok", "webp_named_jpg_ok", "cmyk_ok"])
    b.recipe("val", ["grey_ok", "palette_alpha_ok", "rgba_ok", "grey16_ok"])
    # Bad photos next to good ones; the recipe stays paired.
    b.recipe("train", ["missing_file", ok, "empty_file"])
    b.recipe("test", ["truncated", "corrupt", ok])
    b.recipe("train", ["too_large", "too_small", "extreme_aspect", ok])
    if links:  # a photo behind a link out of the root is refused; a link within the root is fine
        b.recipe("train", ["outside_root", "link_inside_ok", "outside_root:dir"])
        b.recipe("val", ["outside_root"])  # its only photo refused: dropped as no_valid_image
    # Oversized text is kept but cut to DataConfig's limits (300-char title, 50 lines of 500 chars per list).
    long_line = " ".join(b.rng.choice(WORDS) for _ in range(1500))
    b.recipe("train", [ok], rid="long1", title="Tomato " * 20_000, ingredients=[long_line, *b._text(119)],
             instructions=[f"Stir the {w}." for w in WORDS * 4])
    b.expect["truncated"] = {"long_title": 1, "long_line": 1, "many_lines": 1}
    # Photo limit: 7 good photos, 5 kept, 2 unused.
    b.recipe("train", [ok] * 7)
    # A train recipe whose photos all fail -> recipe-only row; val/test ones are dropped.
    b.recipe("train", ["corrupt", "missing_file"])
    b.recipe("val", ["truncated"])
    b.recipe("test", ["empty_file"])
    b.recipe("val", [])  # val without photos -> dropped no_image_eval
    # Bad image entries in layer2: unsafe id, missing id, non-object, and one photo listed twice.
    iid = "abcdef0123.jpg"
    rid = b._next_id()
    good = b.root / "images" / "train" / "a" / "b" / "c" / "d" / iid
    good.parent.mkdir(parents=True, exist_ok=True)
    good.write_bytes(_photo_bytes(ok, b.rng) or b"")
    entries = [
        {"id": "../../etc/passwd"},
        {"url": "x"},
        "notadict",
        {"id": iid, "_kind": ok},
        {"id": iid, "_kind": ok},
    ]
    b.recipe("train", [], rid=rid, image_entries=entries)
    # Duplicate ids: the first valid record wins; an invalid first record does not block a later valid one.
    first = b.recipe("train", [ok])
    b.raw(json.dumps({**first, "title": "second copy"}).encode(), "duplicate_id")
    b.bad(
        {
            "id": "dupx",
            "title": "t",
            "ingredients": [],
            "instructions": [{"text": "x"}],
            "partition": "train",
        },
        "empty_ingredients",
    )
    b.recipe("train", [ok], rid="dupx")
    # Malformed records.
    b.bad(42, "not_object")
    b.bad("a string", "not_object")
    b.bad([1, 2], "not_object")
    b.bad({"id": "m1", "title": "t", "ingredients": [{"text": "a"}], "partition": "train"}, "missing_field")
    b.bad(
        {
            "id": "m2",
            "title": None,
            "ingredients": [{"text": "a"}],
            "instructions": [{"text": "b"}],
            "partition": "train",
        },
        "missing_field",
    )
    b.bad(
        {
            "id": 7,
            "title": "t",
            "ingredients": [{"text": "a"}],
            "instructions": [{"text": "b"}],
            "partition": "train",
        },
        "bad_type",
    )
    b.bad(
        {
            "id": "m3",
            "title": "t",
            "ingredients": "1 cup flour",
            "instructions": [{"text": "b"}],
            "partition": "train",
        },
        "bad_type",
    )
    b.bad(
        {
            "id": "m4",
            "title": "t",
            "ingredients": [{"text": "a"}],
            "instructions": [{"text": 5}],
            "partition": "train",
        },
        "bad_type",
    )
    b.bad(
        {
            "id": "  ",
            "title": "t",
            "ingredients": [{"text": "a"}],
            "instructions": [{"text": "b"}],
            "partition": "train",
        },
        "bad_id",
    )
    b.bad(
        {
            "id": "m5",
            "title": "t",
            "ingredients": [{"text": "a"}],
            "instructions": [{"text": "b"}],
            "partition": "training",
        },
        "bad_partition",
    )
    b.bad(
        {
            "id": "m6",
            "title": "t",
            "ingredients": [{"text": "  "}],
            "instructions": [{"text": "b"}],
            "partition": "val",
        },
        "empty_ingredients",
    )
    b.bad(
        {"id": "m7", "title": "t", "ingredients": [{"text": "a"}], "instructions": [], "partition": "test"},
        "empty_instructions",
    )
    # Invalid UTF-8 bytes inside a title, and a lone surrogate escape in an ingredient line.
    b.raw(
        b'{"id": "u1", "title": "caf\xc3 \xff\xfe", "ingredients": [{"text": "a"}], '
        b'"instructions": [{"text": "b"}], "partition": "train"}',
        "invalid_utf8",
    )
    b.raw(
        b'{"id": "u2", "title": "ok", "ingredients": [{"text": "a\\udc80b"}], '
        b'"instructions": [{"text": "b"}], "partition": "train"}',
        "invalid_utf8",
    )
    # Nested 1,000 levels deep in a field nobody reads (the parser's memory grows with depth squared): rejected
    # before the parser sees the deep part, the records around it unaffected.
    deep = json.dumps({"id": "d1", "title": "t", "ingredients": [{"text": "a"}], "instructions": [{"text": "b"}],
                       "partition": "train", "extra": None})
    b.raw(deep.replace("null", "[" * 1000 + "]" * 1000).encode(), "too_deep")
    # A valid record after all that, with non-ASCII text and an emoji escape pair: must be kept.
    b.layer1.append(
        json.dumps(
            {
                "id": "z1",
                "title": "Crème brûlée \ud83c\udf6e",
                "ingredients": [{"text": "½ cup cream"}],
                "instructions": [{"text": "Bake."}],
                "partition": "train",
            }
        ).encode()
    )
    b.expect["input"] += 1
    b.layer2.append(json.dumps({"id": "z1", "images": []}).encode())  # listed with no photos -> recipe-only
    b._expect_recipe("z1", "train", [])
    # layer2 noise: a non-object, an orphan id, a duplicate entry.
    b.layer2.append(b"17")
    b.layer2.append(json.dumps({"id": "orphan", "images": [{"id": "ffff000000.jpg"}]}).encode())
    b.layer2.append(json.dumps({"id": "r00001", "images": [{"id": "eeee000000.jpg"}]}).encode())
    b.det.append(b'"bad det entry"')
    return b.write()
