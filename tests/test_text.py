"""Tokenizer, fraction fixes and vocabulary rules on real-looking Recipe1M lines."""

from __future__ import annotations

from collections import Counter

import pytest

from tnlbt.data.text import fix_fractions, tokenize
from tnlbt.data.vocab import (
    END_ID,
    PAD_ID,
    START_ID,
    IngredientVocab,
    Vocab,
    build_ingredient_vocab,
    build_vocab,
    clean_ingredient_name,
    count_words,
)


@pytest.mark.parametrize(
    ("line", "tokens"),
    [
        ("1/2 cup diced tomatoes", ["1/2", "cup", "diced", "tomatoes"]),
        ("2 tbsp. olive oil", ["2", "tbsp.", "olive", "oil"]),  # mid-line period stays (preserve_line)
        ("Season with salt.", ["season", "with", "salt", "."]),  # final period splits
        ("Mix well. Bake 20 minutes.", ["mix", "well.", "bake", "20", "minutes", "."]),
        ("Salt, pepper and 1,000 herbs", ["salt", ",", "pepper", "and", "1,000", "herbs"]),
        ("1.5 cups all-purpose flour", ["1.5", "cups", "all-purpose", "flour"]),
        (
            "Bake (covered) at 350F for 1:30; serve!",
            ["bake", "(", "covered", ")", "at", "350f", "for", "1:30", ";", "serve", "!"],
        ),
        ("Don't stir the chef's sauce", ["do", "n't", "stir", "the", "chef", "'s", "sauce"]),
        ("salt and/or pepper", ["salt", "and/or", "pepper"]),
        ('10% cream & "fresh" herbs...', ["10", "%", "cream", "&", '"', "fresh", '"', "herbs", "..."]),
        ("", []),
        ("   ", []),
    ],
)
def test_tokenize_lines(line: str, tokens: list[str]) -> None:
    assert tokenize(line) == tokens


@pytest.mark.parametrize(
    ("raw", "fixed"),
    [
        ("12 cup sugar", "1/2 cup sugar"),  # H-T's broken fraction
        ("1 12 cups flour", "1 1/2 cups flour"),  # mixed number lost its slash
        ("34 tsp salt", "3/4 tsp salt"),
        ("14 teaspoon cinnamon", "1/4 teaspoon cinnamon"),
        ("18 tsp. nutmeg", "1/8 tsp. nutmeg"),
        ("23 c. milk", "2/3 c. milk"),
        ("12 oz can tomatoes", "12 oz can tomatoes"),  # a real 12-ounce can: unchanged (H-T would break it)
        ("12 eggs", "12 eggs"),
        ("112 g butter", "112 g butter"),  # part of a larger number
        ("2/12 cup", "2/12 cup"),
        ("12 cupcakes", "12 cupcakes"),  # unit must end at a word boundary
        ("1½ cups milk", "1 1/2 cups milk"),  # unicode vulgar fraction
        ("¾ cup cream", "3/4 cup cream"),
    ],
)
def test_fraction_fixes(raw: str, fixed: str) -> None:
    assert fix_fractions(raw) == fixed


def test_tokenize_applies_lowercase_and_fractions() -> None:
    assert tokenize("12 Cup Diced TOMATOES") == ["1/2", "cup", "diced", "tomatoes"]


def test_vocab_min_count_order_and_ids() -> None:
    counts = count_words(["1/2 cup diced tomatoes", "1 cup tomatoes", "2 cups rice", "cup"])
    assert counts["cup"] == 3 and counts["tomatoes"] == 2 and counts["rice"] == 1
    vocab = build_vocab(counts, min_count=2)
    assert vocab.tokens == ["<pad>", "<start>", "<end>", "cup", "tomatoes", "<unk>"]
    assert len(vocab) == 6 and vocab.unk_id == 5
    assert vocab.encode_sentence("Tomatoes cup rice", 15) == [START_ID, 4, 3, 5, END_ID]
    # words spelled like specials are text, not control tokens
    assert vocab.encode_tokens(["<pad>", "<end>"], 10) == [START_ID, vocab.unk_id, vocab.unk_id, END_ID]


def test_vocab_ties_are_alphabetical_and_deterministic() -> None:
    a = build_vocab(Counter({"b": 3, "a": 3, "c": 5, "d": 1}), 1)
    b = build_vocab(Counter({"d": 1, "c": 5, "a": 3, "b": 3}), 1)
    assert a.tokens == b.tokens == ["<pad>", "<start>", "<end>", "c", "a", "b", "d", "<unk>"]


def test_truncation_is_after_end_like_ht() -> None:
    vocab = build_vocab(Counter({w: 1 for w in "abcdefgh"}), 1)
    ids = vocab.encode_sentence("a b c d e f g h", 5)
    assert len(ids) == 5 and ids[0] == START_ID and END_ID not in ids  # long lines lose <end>
    short = vocab.encode_sentence("a b", 5)
    assert short == [START_ID, vocab.word_id("a"), vocab.word_id("b"), END_ID]
    assert PAD_ID not in short


def test_vocab_save_load_roundtrip(tmp_path) -> None:
    vocab = build_vocab(Counter({"cup": 12, "salt": 11, "rare": 1}), 10)
    vocab.save(tmp_path / "vocab.json")
    back = Vocab.load(tmp_path / "vocab.json")
    assert back == vocab and back.min_count == 10 and back.counts["cup"] == 12
    assert back.encode_sentence("cup salt rare", 15) == vocab.encode_sentence("cup salt rare", 15)
    (tmp_path / "bad.json").write_text('{"tokens": ["a", "b"]}')
    with pytest.raises(ValueError, match="not a vocabulary"):
        Vocab.load(tmp_path / "bad.json")


def test_ingredient_names_and_labels(tmp_path) -> None:
    assert clean_ingredient_name("  Olive_Oil ") == "olive oil"
    assert clean_ingredient_name("(Tomatoes).") == "tomatoes"
    iv = build_ingredient_vocab(Counter({"salt": 5, "olive oil": 2, "saffron": 1}), 2)
    assert iv.names == ["salt", "olive oil"]
    assert iv.encode(["olive oil", "saffron", "salt", "salt"]) == [0, 1]
    iv.save(tmp_path / "ingredients.json")
    assert IngredientVocab.load(tmp_path / "ingredients.json") == iv


def test_guarded_rules_match_unguarded_twin() -> None:
    """The guard shortcut (skip a rule when its trigger is absent) vs applying every rule, on varied lines."""
    import random

    from tnlbt.data.text import normalize, word_tokenize, word_tokenize_unguarded

    pieces = [
        "1/2",
        "cup",
        "tbsp.",
        "salt.",
        "don't",
        "it's",
        "(175c)",
        "1,000",
        "a,b",
        "1:30",
        "note:",
        "...",
        "--",
        "cannot",
        "gonna",
        '"hot"',
        "'quoted'",
        "50%",
        "a&b",
        "why?",
        "yes!",
        "[x]",
        "{y}",
        "<z>",
        "chef's",
        "we'll",
        "o'clock",
        "x.",
        "9x13",
        "all-purpose",
        "1.5",
        "#2",
        "@home",
        "$5",
        ";",
    ]
    rng = random.Random(0)
    for _ in range(2000):
        line = normalize(" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))))
        assert word_tokenize(line) == word_tokenize_unguarded(line), line
