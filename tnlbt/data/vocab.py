"""Word vocabulary (H-T ids) and the ingredient-label vocabulary (cleaned names from det_ingrs.json).

Word ids follow H-T: 0 ``<pad>``, 1 ``<start>``, 2 ``<end>``, then the kept words, and ``<unk>`` last. Words
are ordered by count (descending) then alphabetically, so the same counts always give the same ids. A sentence
is ``[<start>] + ids + [<end>]`` truncated to ``max_len`` afterwards, exactly like H-T (a long line loses its
``<end>``).
:func:`encode_recipe_text` applies the vocabulary and the data limits to a whole recipe: preprocessing and the
query encoder (:mod:`tnlbt.inference`) both call it, so a query is tokenised exactly like the training rows.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tnlbt.data.text import tokenize

if TYPE_CHECKING:
    from tnlbt.config import DataConfig

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
PAD_ID, START_ID, END_ID = 0, 1, 2


class Vocab:
    """Token list with H-T's special ids; ``len(vocab)`` counts the specials and ``<unk>``."""

    def __init__(self, words: Sequence[str], *, min_count: int = 1, counts: Mapping[str, int] | None = None):
        specials = {PAD, START, END, UNK}
        words = [w for w in words if w not in specials]
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be unique")
        self.tokens: list[str] = [PAD, START, END, *words, UNK]
        self.index: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        self.min_count = int(min_count)
        self.counts: dict[str, int] = dict(counts) if counts else {}

    # -- ids (the fixed ones are the module constants PAD_ID, START_ID, END_ID) -------------------------
    @property
    def unk_id(self) -> int:
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, word: object) -> bool:
        return word in self.index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    def __hash__(self) -> int:  # pragma: no cover - Vocab is a value object; hash by content
        return hash(tuple(self.tokens))

    def word_id(self, word: str) -> int:
        i = self.index.get(word)
        # the specials are not words: text that literally says "<pad>" is unknown, not padding
        return self.unk_id if i is None or i in (PAD_ID, START_ID, END_ID) else i

    def encode_tokens(self, tokens: Iterable[str], max_len: int) -> list[int]:
        """``[<start>] + ids + [<end>]``, then truncated to ``max_len`` (H-T: truncation after ``<end>``)."""
        ids = [START_ID, *(self.word_id(t) for t in tokens), END_ID]
        return ids[:max_len]

    def encode_sentence(self, text: str, max_len: int) -> list[int]:
        """Tokenise one line (:func:`tnlbt.data.text.tokenize`) and encode it."""
        return self.encode_tokens(tokenize(text), max_len)

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if skip_special and i in (PAD_ID, START_ID, END_ID):
                continue
            out.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return out

    # -- persistence ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "min_count": self.min_count, "size": len(self.tokens),
                "counts": {w: self.counts[w] for w in self.tokens if w in self.counts}}

    def save(self, path: str | Path) -> None:
        """Write ``vocab.json`` to a local path or a URI (``s3://...``, see :mod:`tnlbt.storage`)."""
        _write_text(path, json.dumps(self.to_dict(), ensure_ascii=False) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocab:
        tokens = data.get("tokens") if isinstance(data, Mapping) else None
        if (not isinstance(tokens, list) or len(tokens) < 4 or tokens[:3] != [PAD, START, END]
                or tokens[-1] != UNK or not all(isinstance(t, str) for t in tokens)):
            raise ValueError(
                "not a vocabulary: expected {'tokens': ['<pad>', '<start>', '<end>', ..., '<unk>']}")
        return cls(tokens[3:-1], min_count=int(data.get("min_count", 1)), counts=data.get("counts") or {})

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read ``vocab.json`` from a local path or a URI."""
        return cls.from_dict(json.loads(_read_text(path)))


def encode_recipe_text(
    vocab: Vocab, cfg: DataConfig, title: str, ingredients: list[str], instructions: list[str]
) -> dict[str, Any]:
    """Title / ingredient lines / instruction lines -> token ids with the limits of ``cfg`` (H-T rules).

    Empty lines are skipped; the first ``max_ingredients`` / ``max_instructions`` non-empty lines are kept.
    """
    ingr = [s for s in ingredients if s and s.strip()][: cfg.max_ingredients]
    instr = [s for s in instructions if s and s.strip()][: cfg.max_instructions]
    return {
        "title_ids": vocab.encode_sentence(title or "", cfg.max_title_tokens),
        "ingredient_ids": [vocab.encode_sentence(s, cfg.max_line_tokens) for s in ingr],
        "instruction_ids": [vocab.encode_sentence(s, cfg.max_line_tokens) for s in instr],
    }


def build_vocab(counts: Mapping[str, int], min_count: int) -> Vocab:
    """Keep words seen at least ``min_count`` times; order by count, then alphabetically (deterministic)."""
    kept = [(w, c) for w, c in counts.items() if c >= min_count and w not in (PAD, START, END, UNK)]
    kept.sort(key=lambda wc: (-wc[1], wc[0]))
    return Vocab([w for w, _ in kept], min_count=min_count, counts=dict(kept))


def count_words(lines: Iterable[str], counter: Counter[str] | None = None) -> Counter[str]:
    counter = Counter() if counter is None else counter
    for line in lines:
        counter.update(tokenize(line))
    return counter


def _write_text(path: str | Path, text: str) -> None:
    """Local paths as plain files (as before); URIs through :mod:`tnlbt.storage` (one object, one PUT)."""
    from tnlbt import storage

    if storage.is_remote(path):
        storage.write_text(path, text)
    else:
        Path(storage.local_path(path) or path).write_text(text, encoding="utf-8")


def _read_text(path: str | Path) -> str:
    from tnlbt import storage

    if storage.is_remote(path):
        return storage.read_text(path)
    return Path(storage.local_path(path) or path).read_text(encoding="utf-8")


# -- ingredient labels ------------------------------------------------------------------------------------
_NAME_STRIP = re.compile(r"^[\W_]+|[\W_]+$")
_NAME_SPACE = re.compile(r"[\s_]+")


def clean_ingredient_name(text: str) -> str:
    """det_ingrs.json name -> label: lowercase, '_' and space runs to one space, no edge punctuation."""
    return _NAME_STRIP.sub("", _NAME_SPACE.sub(" ", text.lower())).strip()


class IngredientVocab:
    """Cleaned ingredient names; the list index is the label id of the multi-label head."""

    def __init__(self, names: Sequence[str], *, min_count: int = 1, counts: Mapping[str, int] | None = None):
        if len(set(names)) != len(names):
            raise ValueError("ingredient names must be unique")
        self.names: list[str] = list(names)
        self.index: dict[str, int] = {n: i for i, n in enumerate(self.names)}
        self.min_count = int(min_count)
        self.counts: dict[str, int] = dict(counts) if counts else {}

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IngredientVocab) and self.names == other.names

    def __hash__(self) -> int:  # pragma: no cover
        return hash(tuple(self.names))

    def encode(self, names: Iterable[str]) -> list[int]:
        """Sorted unique label ids of the names that are in the vocabulary (unknown names are dropped)."""
        return sorted({self.index[n] for n in names if n in self.index})

    def save(self, path: str | Path) -> None:
        data = {"names": self.names, "min_count": self.min_count,
                "counts": [self.counts.get(n, 0) for n in self.names]}
        _write_text(path, json.dumps(data, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> IngredientVocab:
        data = json.loads(_read_text(path))
        names = data.get("names") if isinstance(data, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: not an ingredient vocabulary (expected {{'names': [...]}})")
        counts = data.get("counts") or []
        return cls(names, min_count=int(data.get("min_count", 1)),
                   counts=dict(zip(names, counts, strict=False)))


def build_ingredient_vocab(counts: Mapping[str, int], min_count: int) -> IngredientVocab:
    kept = [(n, c) for n, c in counts.items() if c >= min_count and n]
    kept.sort(key=lambda nc: (-nc[1], nc[0]))
    return IngredientVocab([n for n, _ in kept], min_count=min_count, counts=dict(kept))
