"""Searchable terms of a recipe: normalised ingredient names and title words, for payload filters.

One rule, used on both sides of a filter: the indexers (split and catalog) and the live write API store
``ingredients_norm`` / ``title_terms`` computed here, and a query's ``must_include`` / ``must_exclude`` /
``title_keywords`` go through the same functions, so "Tomatoes" in a query matches "2 ripe tomatoes, diced" in
a recipe.

* :func:`ingredient_key` -- one name as a filter value: the H-T tokenizer's lowercasing
  (:func:`tnlbt.data.text.tokenize`), only alphabetic words, each word singular ("Cherry Tomatoes" ->
  ``"cherry tomato"``).
* :func:`ingredient_terms` -- the ingredient lines of a recipe -> every ingredient word and every run of up to
  three adjacent ingredient words (quantities, units, preparation words and "and"/"or" break runs). Stored as
  the ``ingredients_norm`` payload list. "2 tbsp peanut butter" gives ``peanut``, ``butter`` and
  ``peanut butter``: an exclusion of "peanut" removes it (the safe direction for allergies), an inclusion of
  "butter" finds it too (documented as such in the README).
* :func:`title_terms` -- the title's words, singular (``title_terms`` payload; ``title_keywords`` filter).

Singular forms come from a few English suffix rules (:func:`singular`), not a dictionary: what matters is that
the index and the query apply the same rule, not that every word comes out as a lexicographer would write it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tnlbt.data.text import tokenize

MAX_TERMS = 512  # per recipe: a 50-line recipe gives ~300; the cap bounds a hostile one's payload
MAX_PHRASE = 3  # words in one stored ingredient phrase ("extra virgin olive" is as long as it gets)
# Words that never name an ingredient: quantities, units, sizes, preparation, connectives. They break phrases.
_STOP = frozenset(
    """
    a an the of and or with without for to in into on at from by as plus about per each other optional
    cup cups c tablespoon tablespoons tbsp tbs tbl tblsp teaspoon teaspoons tsp t ounce ounces oz pound pounds
    lb lbs g gram grams kg kilogram kilograms ml milliliter milliliters l liter liters litre litres pint pints
    quart quarts gallon gallons stick sticks pinch pinches dash dashes clove cloves can cans jar jars package
    packages pkg bag bags box boxes bunch bunches handful sprig sprigs slice slices piece pieces inch inches
    container bottle bottles envelope head heads stalk stalks drop drops packet packets
    large small medium big little whole half halves quarter quarters thin thick fine finely coarsely roughly
    chopped diced sliced minced grated shredded crushed ground peeled seeded cored halved quartered cubed
    mashed melted softened beaten divided drained rinsed trimmed cooked uncooked fresh freshly frozen thawed
    dried canned packed heaping level room temperature taste needed more less if desired serving garnish
    cut into lightly well very extra such like good quality style type brand
    """.split()  # noqa: SIM905 - a word table reads best as text
)
_KEEP_S = frozenset({"asparagus", "couscous", "hummus", "molasses", "swiss", "brussels", "grits"})


def singular(word: str) -> str:
    """A lowercase English word in singular form by suffix rules ("tomatoes" -> "tomato", "berries" -> "berry",
    "peaches" -> "peach", "eggs" -> "egg"); words that only look plural ("asparagus", "swiss") stay."""
    w = word
    if len(w) <= 3 or w in _KEEP_S or w.endswith(("ss", "us", "is")):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith("oes") or w.endswith(("ches", "shes", "sses", "xes", "zes")):
        return w[:-2]
    if w.endswith("ves") and len(w) > 4:  # leaves, halves, loaves: "f" words; olives, chives stay "-ve"
        return w[:-3] + ("f" if w[:-3].endswith(("a", "l", "ea")) else "ve")
    if w.endswith("s"):
        return w[:-1]
    return w


def _words(text: str) -> list[str]:
    """Lowercase alphabetic words of ``text`` (H-T tokens; "all-purpose" splits into its parts)."""
    out = []
    for tok in tokenize(text or ""):
        out.extend(p for p in tok.replace("'", " ").replace("-", " ").split() if p.isalpha())
    return out


def ingredient_key(name: str) -> str:
    """One ingredient name as a filter value: its alphabetic words, singular, without the words that never
    name an ingredient ("2 chopped Tomatoes" -> "tomato"), space-joined; "" when nothing is left."""
    return " ".join(w for w in (singular(x) for x in _words(name)) if w not in _STOP)


def ingredient_terms(lines: Iterable[str]) -> list[str]:
    """Ingredient lines -> sorted unique words and phrases (up to :data:`MAX_PHRASE` adjacent words) that
    name ingredients; at most :data:`MAX_TERMS`, the shortest first (single words are kept before phrases)."""
    terms: set[str] = set()
    for line in lines:
        run: list[str] = []
        for tok in [*_split_tokens(line), ""]:  # "" flushes the last run
            w = singular(tok) if tok else ""
            if w and w not in _STOP:
                run.append(w)
                continue
            for n in range(1, MAX_PHRASE + 1):
                terms.update(" ".join(run[i : i + n]) for i in range(len(run) - n + 1))
            run = []
    return sorted(terms, key=lambda t: (t.count(" "), t))[:MAX_TERMS]


def _split_tokens(line: str) -> list[str]:
    """Tokens of one line where punctuation and numbers become "" (run breaks)."""
    out = []
    for tok in tokenize(line or ""):
        parts = tok.replace("'", " ").replace("-", " ").split()
        out.extend(p if p.isalpha() else "" for p in parts)
    return out


def title_terms(title: str) -> list[str]:
    """Sorted unique singular words of a title (stop words kept out: "with", "and", "the" filter nothing)."""
    return sorted({w for w in (singular(x) for x in _words(title)) if w not in _STOP})[:MAX_TERMS]


def recipe_terms(title: str, ingredients: Sequence[str]) -> dict[str, list[str]]:
    """The two filter payload fields of a recipe (and of each of its photos)."""
    return {"ingredients_norm": ingredient_terms(ingredients), "title_terms": title_terms(title)}
