"""Request and response models of the search API (pydantic v2), with the size limits that turn bad input into
422.

Limits are module constants so the UI, the docs and the tests agree on them; the upload limit is
``ServeConfig.max_upload_bytes`` (default :data:`tnlbt.config.MAX_UPLOAD_BYTES`) because deployments may want it
larger.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

MAX_K = 100
MAX_FREE_TEXT = 2000
MAX_TITLE = 300
MAX_LINE = 500
MAX_LINES = 50
# Body limit of every non-upload request (API JSON routes, the UI's queue calls). The largest valid query is
# ~52k characters (text + title + 2 x 50 lines of 500), at most 6 bytes each as JSON \uXXXX escapes: ~310 kB,
# so 1 MiB never refuses a valid request and keeps a hostile one from costing more than that to read and parse.
MAX_JSON_BYTES = 1024 * 1024
# Multipart framing (boundaries, part headers, the k / split fields) allowed on top of the upload limit.
MULTIPART_OVERHEAD = 64 * 1024
# 422 bodies: at most this many errors, each message and location part cut to these lengths.
MAX_ERRORS = 8
MAX_ERROR_MSG = 200
MAX_LOC_PART = 64



def _unicode(s: str) -> str:
    # pydantic refuses a lone surrogate ("\ud800") in a str field but lets it through inside a list[str]; it
    # would then fail later, when the query is serialised for the encoder replica.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    return s


# Every text field of a request is one of these.
Text = Annotated[str, AfterValidator(_unicode)]
Line = Annotated[str, Field(max_length=MAX_LINE), AfterValidator(_unicode)]


MAX_FILTER_TERMS = 20
MAX_FILTER_JSON = 16_384  # the photo search's filter form field
MAX_TERM = 100
MAX_METADATA = 32
MAX_METADATA_VALUE = 200
MAX_ID = 128
Term = Annotated[str, Field(min_length=1, max_length=MAX_TERM), AfterValidator(_unicode)]
MetaKey = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
# Strings and integers only: both backends match them exactly; floats match nothing exactly, and qdrant-edge's
# MatchValue never matches a boolean (measured with qdrant-edge-py 0.9.0), so true/false go in as strings.
MetaValue = Annotated[str, Field(max_length=MAX_METADATA_VALUE), AfterValidator(_unicode)] | StrictInt


class SearchFilter(BaseModel):
    """Optional payload filter; every field given must hold (AND).

    ``must_include`` / ``must_exclude``: ingredient names, normalised like the index ("Tomatoes" = "tomato";
    quantities and units ignored); a recipe matches an include when one of its ingredient lines names it, and
    is removed by an exclude when any line names it ("peanut" removes "peanut butter" too).
    ``title_keywords``: every word must be in the title. ``metadata``: catalog fields, equality. Photo search
    (text -> photos) filters by the recipe each photo belongs to."""

    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "val", "test"] | None = None
    recipe_id: Text | None = Field(default=None, max_length=MAX_ID)
    must_include: list[Term] = Field(default_factory=list, max_length=MAX_FILTER_TERMS)
    must_exclude: list[Term] = Field(default_factory=list, max_length=MAX_FILTER_TERMS)
    title_keywords: list[Term] = Field(default_factory=list, max_length=MAX_FILTER_TERMS)
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=MAX_METADATA)

    @model_validator(mode="after")
    def _normalisable(self) -> SearchFilter:
        self.as_dict()  # an ingredient that normalises to nothing ("2 cups") is a 422 here, not an empty result
        return self

    def as_dict(self) -> dict[str, Any] | None:
        """The plain store filter (:func:`tnlbt.index.filters.recipe_filter`), ``None`` for no filter."""
        from tnlbt.index.filters import recipe_filter

        return recipe_filter(
            equals={"split": self.split, "recipe_id": self.recipe_id},
            must_include=self.must_include,
            must_exclude=self.must_exclude,
            title_keywords=self.title_keywords,
            metadata=self.metadata,
        )


class RecipeQuery(BaseModel):
    """Recipe text: either ``text`` (one box; first line = title) or any of title / ingredients /
    instructions."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "title": "Chocolate chip cookies",
                    "ingredients": ["2 cups flour", "1 cup chocolate chips"],
                    "k": 5,
                },
                {"text": "spicy tomato soup with basil", "k": 10},
            ]
        },
    )
    text: Text | None = Field(default=None, max_length=MAX_FREE_TEXT)
    title: Text = Field(default="", max_length=MAX_TITLE)
    ingredients: list[Line] = Field(default_factory=list, max_length=MAX_LINES)
    instructions: list[Line] = Field(default_factory=list, max_length=MAX_LINES)

    @model_validator(mode="after")
    def _not_empty(self) -> RecipeQuery:
        has_text = bool(self.text and self.text.strip())
        has_parts = bool(
            self.title.strip()
            or any(s.strip() for s in self.ingredients)
            or any(s.strip() for s in self.instructions)
        )
        if not (has_text or has_parts):
            raise ValueError("empty query: give text, or a title, ingredients or instructions")
        return self


class TextSearchRequest(RecipeQuery):
    k: int = Field(default=10, ge=1, le=MAX_K)
    filter: SearchFilter | None = None
    # true/false only (no "yes", 1): a typo'd option is a 422, not silently one ranking or the other
    hybrid: StrictBool | None = Field(
        default=None,
        description="rank by the dense score fused with a title/ingredient word match (true) or dense only "
        "(false); omitted: the server's default (serve config `hybrid`). Hybrid scores are fused (RRF) scores.",
    )


class ImageSearchParams(BaseModel):
    """The non-file fields of a photo search (the route takes them as form fields)."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(default=10, ge=1, le=MAX_K)
    filter: SearchFilter | None = None


class RecipeIn(BaseModel):
    """A recipe written through ``PUT /v1/recipes/{id}``: the text is embedded with the run's encoder, the
    metadata is kept as payload (filterable by ``filter.metadata``). Photos are attached separately, with
    ``PUT /v1/photos/{image_id}`` and the recipe's id."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"title": "Peanut noodles", "ingredients": ["200 g noodles", "3 tbsp peanut butter"],
                          "instructions": ["Boil the noodles.", "Stir in the sauce."], "metadata": {"cuisine": "thai"}}]
        },
    )
    title: Text = Field(default="", max_length=MAX_TITLE)
    ingredients: list[Line] = Field(default_factory=list, max_length=MAX_LINES)
    instructions: list[Line] = Field(default_factory=list, max_length=MAX_LINES)
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=MAX_METADATA)

    @model_validator(mode="after")
    def _not_empty(self) -> RecipeIn:
        if not (self.title.strip() or any(s.strip() for s in self.ingredients)):
            raise ValueError("empty recipe: give a title or ingredients")
        return self


class WriteResult(BaseModel):
    """What a write did: ``put`` (created or replaced: ``existed`` says which) or ``delete`` (``existed``
    false: there was nothing to delete, which is not an error)."""

    id: str
    kind: Literal["recipe", "photo"]
    op: Literal["put", "delete"]
    existed: bool
    took_ms: float


class PhotoHit(BaseModel):
    image_id: str
    image_url: str
    recipe_id: str
    title: str
    score: float


class RecipeHit(BaseModel):
    id: str
    title: str
    ingredients: list[str]
    instructions: str = ""
    image_ids: list[str] = Field(default_factory=list)
    score: float | None = None


class PhotoSearchResponse(BaseModel):
    hits: list[PhotoHit]
    took_ms: float


class RecipeSearchResponse(BaseModel):
    hits: list[RecipeHit]
    took_ms: float


class EmbedResponse(BaseModel):
    vector: list[float]
    dim: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    recipes: int
    photos: int


class Info(BaseModel):
    """What is live: the published index version and its lineage record (checkpoint path and sha256, its
    metrics, the data or catalog it was built from with counts, index settings, the publish gate's result,
    time); see ``tnlbt.runs.live_lineage``. ``{}`` before the first index."""

    version: str | None = None
    lineage: dict[str, Any] = Field(default_factory=dict)


class FieldError(BaseModel):
    """One reason a request was refused: where (``["body", "ingredients", 3]``) and what."""

    loc: list[str | int]
    msg: str


class ErrorBody(BaseModel):
    """Every error response: ``detail`` says what is wrong in one line. A 422 from request validation adds
    ``errors`` (at most :data:`MAX_ERRORS`, messages cut at :data:`MAX_ERROR_MSG` characters, and ``n_errors``
    how many there were); it never echoes the rejected input."""

    detail: str
    errors: list[FieldError] | None = None
    n_errors: int | None = None


_ADDRESS = re.compile(r"<[^<>]{0,120} at 0x[0-9a-fA-F]+>|0x[0-9a-fA-F]{6,}")


def _clean(s: str, n: int) -> str:
    """Printable, UTF-8-encodable (a lone surrogate becomes ``\\ud800``), no heap addresses, at most n chars."""
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    s = _ADDRESS.sub("<object>", s)
    return s if len(s) <= n else s[: n - 3] + "..."


def _error_item(e: Mapping[str, Any]) -> FieldError:
    loc = [p if isinstance(p, int) else _clean(str(p), MAX_LOC_PART) for p in list(e.get("loc") or ())[:8]]
    msg = str(e.get("msg") or "invalid")
    msg = msg.removeprefix("Value error, ")  # a validator's own ValueError reads as its message
    ctx = e.get("ctx") or {}
    if e.get("type") == "json_invalid" and isinstance(ctx.get("error"), str):
        msg = f"{msg}: {ctx['error']}"  # json's own message ("Expecting ',' delimiter"), never the document
    return FieldError(loc=loc, msg=_clean(msg, MAX_ERROR_MSG))


def _where(item: FieldError) -> str:
    # "body" is every JSON error's first part: say "ingredients.3", not "body.ingredients.3"
    parts = [str(p) for p in item.loc[1:]] if item.loc[:1] == ["body"] and len(item.loc) > 1 else map(str, item.loc)
    return ".".join(parts) or "request"


def validation_error_body(errors: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """pydantic / FastAPI error dicts -> an :class:`ErrorBody` as plain data. Reads ``type``, ``loc``, ``msg``
    (and ``ctx`` of a JSON syntax error); never ``input``: the rejected payload stays out of the answer."""
    items = [_error_item(e) for e in list(errors)[:MAX_ERRORS]]
    head = "; ".join(f"{_where(i)}: {i.msg}" for i in items[:3]) or "invalid request"
    more = len(errors) - min(3, len(items))
    detail = _clean(head + (f" (and {more} more)" if more > 0 else ""), 3 * MAX_ERROR_MSG)
    body = ErrorBody(detail=detail, errors=items, n_errors=len(errors))
    return body.model_dump()


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: Mapping[str, Any]) -> M:
    """``data`` as ``model`` (one of the request models above), or ``ValueError`` with the 422 ``detail`` of
    :func:`validation_error_body`. The routes validate their bodies with the same models; the API's plain
    methods, which the UI calls, validate with this: one set of rules for every entry point."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        raise ValueError(validation_error_body(e.errors())["detail"]) from None
