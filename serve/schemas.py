"""Request and response models of the search API (pydantic v2), with the size limits that turn bad input into
422.

Limits are module constants so the UI, the docs and the tests agree on them; the upload limit is
``ServeConfig.max_upload_bytes`` (default :data:`tnlbt.config.MAX_UPLOAD_BYTES`) because deployments may want it
larger.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_K = 100
MAX_FREE_TEXT = 2000
MAX_TITLE = 300
MAX_LINE = 500
MAX_LINES = 50

Line = Field(max_length=MAX_LINE)


class SearchFilter(BaseModel):
    """Optional payload filter; fields combine with AND."""

    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "val", "test"] | None = None
    recipe_id: str | None = Field(default=None, max_length=128)

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


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
    text: str | None = Field(default=None, max_length=MAX_FREE_TEXT)
    title: str = Field(default="", max_length=MAX_TITLE)
    ingredients: list[str] = Field(default_factory=list, max_length=MAX_LINES)
    instructions: list[str] = Field(default_factory=list, max_length=MAX_LINES)

    @model_validator(mode="after")
    def _not_empty(self) -> RecipeQuery:
        for name in ("ingredients", "instructions"):
            for line in getattr(self, name):
                if len(line) > MAX_LINE:
                    raise ValueError(f"{name}: a line is longer than {MAX_LINE} characters")
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


class ErrorBody(BaseModel):
    detail: str
