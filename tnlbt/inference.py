"""The query side of a checkpoint: recipe text and photos -> vectors, the way the index was built.

* :class:`RecipeText` -- a recipe as a person types it, and the one rule that turns text boxes into a title
  and ingredient lines (the API, the UI and ``tnlbt search`` all use it);
* :func:`decode_image` -- upload bytes -> RGB PIL image, with the decompression-bomb limit;
* :class:`Encoder` -- a checkpoint loaded for inference: ``encode_texts`` / ``encode_rows`` / ``encode_images``
  (L2-normalised float32 ``(B, D)``).

The Ray Data indexing UDFs (:mod:`tnlbt.index.embed`), the Serve encoder deployments and
:class:`tnlbt.index.search.Searcher` all embed through :class:`Encoder`, so a query vector is computed exactly
the way the indexed vectors were. No Ray here.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tnlbt.runs import resolve_checkpoint

MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard for uploads and stored photos
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


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """JPEG/PNG/... bytes -> RGB PIL image; ``ValueError`` for anything that is not a decodable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"image too large: {w}x{h} pixels (limit {max_pixels})")
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"not a decodable image: {e}") from e


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

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images (RGB) -> (B, D)."""
        import torch

        if not images:
            return np.zeros((0, self.dim), np.float32)
        x = torch.stack([self.transform(im) for im in images]).to(self.device)
        with torch.inference_mode():
            out = self.model.encode_image(x, normalize=True)
        return out.float().cpu().numpy()
