"""The query side of a checkpoint: recipe text and photos -> vectors, the way the index was built.

* :class:`RecipeText` -- a recipe as a person types it, and the one rule that turns text boxes into a title
  and ingredient lines (the API, the UI and ``tnlbt search`` all use it);
* :func:`check_image` / :func:`decode_image` -- upload bytes -> format and size from the header alone /
  RGB PIL image, with the query limits (:data:`QUERY_FORMATS`, :data:`MAX_IMAGE_PIXELS`,
  :data:`MAX_DECODED_PIXELS`), decoded by the training path's decoder (:func:`tnlbt.data.images.decode_photo`);
* :class:`Encoder` -- a checkpoint loaded for inference: ``encode_texts`` / ``encode_rows`` / ``encode_images``
  (L2-normalised float32 ``(B, D)``).

The Ray Data indexing UDFs (:mod:`tnlbt.index.embed`), the Serve encoder deployments and
:class:`tnlbt.index.search.Searcher` all embed through :class:`Encoder`, so a query vector is computed exactly
the way the indexed vectors were. No Ray here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tnlbt.data.images import PhotoLimits, decode_photo, open_photo
from tnlbt.runs import resolve_checkpoint

MAX_IMAGE_PIXELS = 40_000_000  # what a photo's header may claim (uploads and stored photos)
# What one decode may materialise. A JPEG decodes at a reduced DCT scale (a 36-MP phone photo as ~0.6 MP), so
# this bounds PNG / WebP / GIF / BMP: 16 MP admits a 4608x3456 photo and costs at most ~0.25 GB (RGBA on white).
MAX_DECODED_PIXELS = 16_000_000
# Formats a query photo may have. PIL opens many more (TIFF, EPS, ICO, PSD, ...); each is a parser facing the
# internet, and none is a photo format people upload. MPO is what PIL calls most phone cameras' JPEGs.
QUERY_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP"})
# Query photos are drafted to this shorter side, the size training photos are stored at
# (DataConfig.image_short_side): the model never saw more resolution than that.
PHOTO_SHORT_SIDE = 256
QUERY_LIMITS = PhotoLimits(max_pixels=MAX_IMAGE_PIXELS, max_decoded_pixels=MAX_DECODED_PIXELS,
                           short_side=PHOTO_SHORT_SIDE, formats=QUERY_FORMATS)
_BULLETS = " -*\t"  # what people put in front of list items


def split_lines(text: str | None) -> list[str]:
    """One text box -> its non-empty lines, list bullets (``-``, ``*``) and surrounding blanks stripped."""
    return [s for s in (ln.strip(_BULLETS) for ln in (text or "").splitlines()) if s]


@dataclass
class RecipeText:
    """A recipe as a person writes it: a title and lines of ingredients and instructions (any may be
    empty)."""

    title: str = ""
    ingredients: Sequence[str] = ()
    instructions: Sequence[str] = ()

    @classmethod
    def from_free_text(cls, text: str) -> RecipeText:
        """One box of text: first line is the title, later lines (or comma parts of a one-liner)
        ingredients."""
        lines = split_lines(text.strip())
        if not lines:
            return cls()
        if len(lines) == 1:
            parts = [p.strip() for p in lines[0].split(",") if p.strip()]
            return cls(title=lines[0], ingredients=parts if len(parts) > 1 else [lines[0]])
        return cls(title=lines[0], ingredients=lines[1:])

    @classmethod
    def from_boxes(cls, title: str | None, ingredients: str | None, instructions: str | None) -> RecipeText:
        """Three text boxes (the UI's form): a title, then one ingredient / instruction a line."""
        return cls(title=title or "", ingredients=split_lines(ingredients), instructions=split_lines(instructions))

    @classmethod
    def from_query(cls, query: Mapping[str, Any]) -> RecipeText:
        """An API query: ``text`` (one box, :meth:`from_free_text`) when given, else its parts."""
        if query.get("text"):
            return cls.from_free_text(query["text"])
        return cls(
            title=query.get("title") or "",
            ingredients=list(query.get("ingredients") or []),
            instructions=list(query.get("instructions") or []),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data (what crosses to an encoder replica)."""
        return {"title": self.title, "ingredients": list(self.ingredients), "instructions": list(self.instructions)}

    def is_empty(self) -> bool:
        return not (
            self.title.strip() or any(s.strip() for s in self.ingredients) or any(s.strip() for s in self.instructions)
        )


def check_image(data: bytes, limits: PhotoLimits = QUERY_LIMITS) -> tuple[str, tuple[int, int]]:
    """The cheap check: ``(format, (width, height))`` from the header, no pixel decoded; raises
    :class:`~tnlbt.data.images.PhotoError` (a ``ValueError``) exactly when :func:`decode_image` would refuse
    the header: not an image, a format outside :data:`QUERY_FORMATS`, or over a pixel limit (``too_large``)."""
    with open_photo(data, limits) as im:
        return str(im.format), im.size


def decode_image(data: bytes, limits: PhotoLimits = QUERY_LIMITS) -> Any:
    """Photo bytes -> RGB PIL image, by the decoder training photos go through (EXIF rotation, alpha on white);
    :class:`~tnlbt.data.images.PhotoError` (a ``ValueError``) for anything that is not a decodable photo within
    ``limits`` (see :func:`check_image`)."""
    return decode_photo(data, limits)


class Encoder:
    """A checkpoint ready for inference: ``encode_texts``, ``encode_rows`` (tokenised Parquet rows) and
    ``encode_images``; all return L2-normalised float32 ``(B, D)`` arrays. ``checkpoint_dir`` may be a run,
    a checkpoint folder or a URI (fetched once per machine, :func:`tnlbt.runs.resolve_checkpoint`)."""

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu", num_threads: int = 0) -> None:
        import torch

        from tnlbt.data.vocab import Vocab
        from tnlbt.models import load_model

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.checkpoint_dir = resolve_checkpoint(checkpoint_dir)
        self.model, self.cfg, _, ingredient_names = load_model(str(self.checkpoint_dir))
        self.n_ingredients = len(ingredient_names)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.vocab = Vocab.load(str(self.checkpoint_dir / "vocab.json"))
        self.transform = self.model.image_transform(train=False)
        self.photo_short_side = int(self.cfg.data.image_short_side)  # the size its training photos were stored at
        self.photo_limits = dataclasses.replace(QUERY_LIMITS, short_side=self.photo_short_side)
        self.dim = int(self.cfg.model.embed_dim)

    def _rows_from_texts(self, texts: Sequence[RecipeText]) -> list[dict[str, Any]]:
        from tnlbt.data.vocab import encode_recipe_text

        return [
            encode_recipe_text(self.vocab, self.cfg.data, t.title, list(t.ingredients), list(t.instructions))
            for t in texts
        ]

    def encode_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Tokenised rows (Parquet columns ``title_ids, ingredient_ids, instruction_ids``) -> (B, D)."""
        import torch

        from tnlbt.data.collate import collate

        if not rows:
            return np.zeros((0, self.dim), np.float32)
        clean = [
            {
                **r,
                "has_image": False,
                "images": [],
                "image_ids": [],
                "ingredient_labels": list(r.get("ingredient_labels") or []),
            }
            for r in rows
        ]
        batch = collate(clean, n_ingredients=self.n_ingredients, image_transform=None, with_images=False)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.inference_mode():
            out = self.model.encode_recipe(batch, normalize=True)
        return out.float().cpu().numpy()

    def encode_texts(self, texts: Sequence[RecipeText]) -> np.ndarray:
        return self.encode_rows(self._rows_from_texts(texts))

    def photo_tensor(self, data: bytes) -> Any:
        """Photo bytes -> the model's input tensor (3, S, S): :func:`decode_image` drafted to the size this
        model's training photos were stored at, then the eval transform. The decoded image is dropped here, so
        only the small tensor outlives the call."""
        return self.transform(decode_image(data, self.photo_limits))

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images (RGB) -> (B, D)."""
        return self.encode_tensors([self.transform(im) for im in images])

    def encode_tensors(self, tensors: Sequence[Any]) -> np.ndarray:
        """Transformed photos (:meth:`photo_tensor`) -> (B, D)."""
        import torch

        if not tensors:
            return np.zeros((0, self.dim), np.float32)
        x = torch.stack(list(tensors)).to(self.device)
        with torch.inference_mode():
            out = self.model.encode_image(x, normalize=True)
        return out.float().cpu().numpy()
