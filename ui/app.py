"""Gradio Blocks for the recipe search demo: "Recipe -> photos", "Photo -> recipes" and "Model card".

:func:`build_demo` only lays out components and wires the two search callables; it knows nothing about Serve,
Qdrant or the model. Serve mounts it in the ``GradioUI`` deployment (callables go to the API deployment);
tests and ``tnlbt search``-style local use pass callables built on :class:`tnlbt.index.search.Searcher`
(:func:`searcher_fns`). Named endpoints ``/search_text`` and ``/search_image`` are what gradio_client calls.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

TITLE = "TNLBT recipe search"


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
) -> Any:
    """The Blocks app.

    * ``search_text_fn(title, ingredients, instructions, k) -> [(image, caption), ...]`` (gallery items;
      ingredients / instructions arrive as one text box each, one line per item)
    * ``search_image_fn(pil_image, k) -> [[title, ingredients, score], ...]``
    * ``examples``: ``{"text": [[title, ingredients, instructions], ...], "images": [path, ...]}``
    * ``model_card``: ``{"run": str, "metrics": dict, "curves": png path, "notes": markdown}``
    """
    import gradio as gr

    examples = examples or {}
    card = model_card or {}
    with gr.Blocks(title=TITLE) as demo:
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
                inputs=[title, ingredients, instructions, k],
                outputs=gallery,
                api_name="search_text",
            )
            title.submit(
                search_text_fn,
                inputs=[title, ingredients, instructions, k],
                outputs=gallery,
                api_visibility="undocumented",
            )
        with gr.Tab("Photo -> recipes"):
            with gr.Row():
                with gr.Column(scale=1):
                    photo = gr.Image(
                        type="pil", label="Dish photo", sources=["upload", "clipboard"], elem_id="photo-input"
                    )
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

    from tnlbt.inference import RecipeText

    def text_fn(title: str, ingredients: str, instructions: str, k: float) -> list[tuple[Any, str]]:
        q = RecipeText.from_boxes(title, ingredients, instructions)
        try:
            hits = searcher.search_text(q, int(k))
        except ValueError as e:
            raise gr.Error(str(e)) from e
        out = []
        for h in hits:
            data = searcher.reader.get_image(h["image_id"])
            img = Image.open(io.BytesIO(data)).convert("RGB") if data else Image.new("RGB", (64, 64), "gray")
            out.append((img, f"{h['title']}  ({h['score']:.3f})"))
        return out

    def image_fn(image: Any, k: float) -> list[list[Any]]:
        if image is None:
            raise gr.Error("Upload a photo first.")
        hits = searcher.search_image(image, int(k))
        return [[h["title"], ", ".join(h["ingredients"][:12]), round(h["score"], 4)] for h in hits]

    return text_fn, image_fn
