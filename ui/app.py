"""Gradio Blocks for the recipe search demo: "Recipe -> photos", "Photo -> recipes" and "Model card".

:func:`build_demo` only lays out components and wires the two search callables; it knows nothing about Serve,
Qdrant or the model. Serve mounts it in the ``GradioUI`` deployment (callables go to the API deployment);
tests and ``tnlbt search``-style local use pass callables built on :class:`tnlbt.index.search.Searcher`
(:func:`searcher_fns`). Named endpoints ``/search_text`` and ``/search_image`` are what gradio_client calls.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tnlbt.config import MAX_UPLOAD_BYTES

TITLE = "TNLBT recipe search"
# Gradio keeps every upload and every result image under its cache folder, by default forever: every 5 minutes,
# delete those older than 15 (example photos are kept).
DELETE_CACHE = (300, 900)


@functools.cache
def _photo_input_class() -> type:
    """``gr.Image`` that hands the function the uploaded file's *path*, after checking the header only.

    With ``type="pil"`` Gradio decodes every upload in the UI process (an 81-MP PNG of 250 kB is 250 MB of
    pixels there, before any limit of ours), and re-encoding it for the API decodes it twice more. Here the file
    is never decoded: its header must be a photo format within the query limits
    (:func:`tnlbt.inference.check_image`), and a ``data:`` URL (Gradio's other way in, which it would decode
    and re-encode) is written out as its bytes. Defined lazily: importing this module does not import Gradio.
    """
    from unittest import mock

    import gradio as gr
    import gradio.component_meta

    from tnlbt.data.images import PhotoError
    from tnlbt.inference import check_image

    # Gradio's component metaclass writes a ``.pyi`` stub next to the module of every component subclass (a
    # tool for authors of custom components): into the source tree, or into site-packages, where it may be
    # read-only. Not for this class.
    with mock.patch.object(gradio.component_meta, "create_or_modify_pyi", lambda *_a, **_k: None):
        return _define_photo_input(gr, PhotoError, check_image)


def _define_photo_input(gr: Any, PhotoError: type[Exception], check_image: Any) -> type:
    class PhotoInput(gr.Image):
        # Rendered by the frontend's "image" component. No __init__ of its own: Gradio builds the component's
        # frontend config from the signature of ``__init__``. Make it with type="filepath", image_mode=None.
        is_template = True
        max_bytes = MAX_UPLOAD_BYTES

        def preprocess(self, payload: Any) -> str | None:
            if payload is None:
                return None
            if payload.url and payload.url.startswith("data:"):
                # bounded by the request's body limit (the JSON limit), so at most ~0.75 MiB of bytes
                data = base64.b64decode(payload.url.partition(",")[2], validate=False)
                folder = Path(self.GRADIO_CACHE) / hashlib.sha256(data).hexdigest()[:20]
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / "pasted"
                path.write_bytes(data)
                self.temp_files.add(str(path))  # so DELETE_CACHE removes it too
            elif payload.path:
                path = Path(payload.path)
            else:
                return None
            if path.stat().st_size > self.max_bytes:
                raise gr.Error(f"That photo is larger than {self.max_bytes} bytes.")
            try:
                check_image(path.read_bytes())
            except PhotoError as e:
                raise gr.Error(f"That file can't be searched with: {e}") from None
            return str(path)

    return PhotoInput


def _metrics_rows(metrics: Any) -> tuple[list[str], list[list[Any]]]:
    """``metrics_test.json`` in a few shapes -> (headers, rows) for a table.

    Accepts ``{"1k": {"im2recipe": {"medR":..}, ..}, ..}``-style nesting or a flat ``{name: value}`` dict;
    nested keys are joined with " / " so any layout the eval step writes shows up readable.
    """
    rows: list[list[Any]] = []

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix} / {k}" if prefix else str(k), v)
        elif isinstance(x, int | float | str | bool) or x is None:
            rows.append([prefix, round(x, 4) if isinstance(x, float) else x])

    # "meta" (checkpoint path, timings, skipped ids) is provenance, not a metric
    walk("", {k: v for k, v in (metrics or {}).items() if k != "meta"})
    return ["metric", "value"], rows


def build_demo(
    search_text_fn: Callable,
    search_image_fn: Callable,
    examples: dict[str, Any] | None = None,
    model_card: dict[str, Any] | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> Any:
    """The Blocks app.

    * ``search_text_fn(title, ingredients, instructions, k, include, exclude) -> [(image, caption), ...]``
      (gallery items; ingredients / instructions arrive as one text box each, one line per item; include /
      exclude as one box each of comma-separated ingredient names: :func:`tnlbt.index.filters.split_terms`)
    * ``search_image_fn(photo_path, k) -> [[title, ingredients, score], ...]``: the uploaded file, undecoded,
      its header already checked (a photo format, within the pixel limits, at most ``max_upload_bytes``)
    * ``examples``: ``{"text": [[title, ingredients, instructions], ...], "images": [path, ...]}``
    * ``model_card``: ``{"run": str, "metrics": dict, "curves": png path, "notes": markdown}``
    """
    import gradio as gr

    examples = examples or {}
    card = model_card or {}
    with gr.Blocks(title=TITLE, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(
            f"# {TITLE}\nType a recipe and see matching dishes, or upload a food photo and get recipes."
        )
        k = gr.Slider(1, 30, value=8, step=1, label="results (k)")
        with gr.Tab("Recipe -> photos"):
            with gr.Row():
                with gr.Column(scale=1):
                    title = gr.Textbox(
                        label="Title", placeholder="e.g. chocolate chip cookies", max_length=300
                    )
                    ingredients = gr.Textbox(label="Ingredients (one per line)", lines=5)
                    instructions = gr.Textbox(label="Instructions (one per line)", lines=4)
                    # the API's filter (must_include / must_exclude), normalised like the index: "Tomatoes" = "tomato"
                    with gr.Row():
                        # value="": an API client that sends only the first four inputs (as before these
                        # boxes) gets no filter instead of "missing argument"
                        include = gr.Textbox(value="", label="Must include (comma separated)",
                                             placeholder="e.g. chicken, garlic", max_length=2000)
                        exclude = gr.Textbox(value="", label="Must exclude (comma separated)",
                                             placeholder="e.g. peanut", max_length=2000)
                    text_btn = gr.Button("Search photos", variant="primary", elem_id="search-text-btn")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(
                        label="Dishes", columns=4, height="auto", object_fit="cover", elem_id="photo-gallery"
                    )
            if examples.get("text"):
                gr.Examples(
                    examples["text"], inputs=[title, ingredients, instructions], label="From the test split"
                )
            text_btn.click(
                search_text_fn,
                inputs=[title, ingredients, instructions, k, include, exclude],
                outputs=gallery,
                api_name="search_text",
            )
            title.submit(
                search_text_fn,
                inputs=[title, ingredients, instructions, k, include, exclude],
                outputs=gallery,
                api_visibility="undocumented",
            )
        with gr.Tab("Photo -> recipes"):
            with gr.Row():
                with gr.Column(scale=1):
                    # type="filepath", image_mode=None: Gradio passes the file on without opening it
                    photo = _photo_input_class()(
                        type="filepath", image_mode=None, label="Dish photo", sources=["upload", "clipboard"],
                        elem_id="photo-input",
                    )
                    photo.max_bytes = max_upload_bytes
                    img_btn = gr.Button("Find recipes", variant="primary", elem_id="search-image-btn")
                with gr.Column(scale=2):
                    table = gr.Dataframe(
                        headers=["title", "ingredients", "score"],
                        label="Recipes",
                        wrap=True,
                        interactive=False,
                        elem_id="recipe-table",
                    )
            if examples.get("images"):
                gr.Examples([[p] for p in examples["images"]], inputs=[photo], label="Test-split photos")
            img_btn.click(search_image_fn, inputs=[photo, k], outputs=table, api_name="search_image")
        with gr.Tab("Model card"):
            gr.Markdown(f"### Run `{card.get('run', 'unknown')}`\n{card.get('notes', '')}")
            headers, rows = _metrics_rows(card.get("metrics"))
            if rows:
                gr.Dataframe(value=rows, headers=headers, label="Test metrics (medR, R@K)", interactive=False)
            else:
                gr.Markdown("_No metrics yet: run `tnlbt eval --run RUN`._")
            curves = card.get("curves")
            if curves and Path(curves).exists():
                gr.Image(value=str(curves), label="Training curves", interactive=False)
    return demo


def searcher_fns(searcher: Any) -> tuple[Callable, Callable]:
    """UI callables over an in-process :class:`tnlbt.index.search.Searcher` (same code path as the CLI)."""
    import gradio as gr
    from PIL import Image

    from tnlbt.index.filters import recipe_filter, split_terms
    from tnlbt.inference import RecipeText

    def text_fn(title: str, ingredients: str, instructions: str, k: float, include: str = "",
                exclude: str = "") -> list[tuple[Any, str]]:
        q = RecipeText.from_boxes(title, ingredients, instructions)
        try:
            flt = recipe_filter(must_include=split_terms(include), must_exclude=split_terms(exclude))
            hits = searcher.search_text(q, int(k), flt)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        out = []
        for h in hits:
            data = searcher.reader.get_image(h["image_id"])
            img = Image.open(io.BytesIO(data)).convert("RGB") if data else Image.new("RGB", (64, 64), "gray")
            out.append((img, f"{h['title']}  ({h['score']:.3f})"))
        return out

    def image_fn(path: str | None, k: float) -> list[list[Any]]:
        if not path:
            raise gr.Error("Upload a photo first.")
        hits = searcher.search_image(Path(path), int(k))
        return [[h["title"], ", ".join(h["ingredients"][:12]), round(h["score"], 4)] for h in hits]

    return text_fn, image_fn
