"""The Gradio Blocks app: layout, the Searcher-backed callables, and a gradio_client round trip (no Ray).

The same Blocks are mounted in Serve by ``GradioUI``; that path is covered in tests/test_serve.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import free_port
from test_search import COLOURS, _jpeg, build_tiny_index, make_tiny_run


@pytest.fixture(scope="module")
def searcher(tmp_path_factory):
    from tnlbt.index.search import Searcher

    run = make_tiny_run(tmp_path_factory.mktemp("ui"))
    build_tiny_index(run)
    s = Searcher.from_run(run)
    yield run, s
    s.close()


def test_metrics_table_flattens_nested_metrics():
    from tnlbt.ui.app import _metrics_rows

    headers, rows = _metrics_rows(
        {"1k": {"im2rec": {"medR": 1.0, "R@1": 0.51234}}, "n": 3, "meta": {"checkpoint": "/x"}}
    )
    assert headers == ["metric", "value"]
    assert rows == [["1k / im2rec / medR", 1.0], ["1k / im2rec / R@1", 0.5123], ["n", 3]]
    assert _metrics_rows(None)[1] == []


def test_demo_in_process_and_via_gradio_client(searcher, tmp_path):
    from gradio_client import Client, handle_file
    from tnlbt.serve.app import load_examples, load_model_card
    from tnlbt.ui.app import build_demo, searcher_fns

    run, s = searcher
    examples = load_examples(run, 2)
    assert len(examples["text"]) == 2 and len(examples["images"]) == 2
    card = load_model_card(run)
    assert card["metrics"]["1k"]["image_to_recipe"]["medR"] == 12.0 and card["run"] == "tiny"
    text_fn, image_fn = searcher_fns(s)
    demo = build_demo(text_fn, image_fn, examples, card)
    # Blocks called as a function: no server
    gal = demo("tomato soup", "1 cup flour", "", 4, "", "", api_name="search_text")
    assert len(gal) == 4
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True
    )
    try:
        c = Client(url, verbose=False)
        named = set(c.view_api(print_info=False, return_format="dict")["named_endpoints"])
        assert {"/search_text", "/search_image"} <= named
        gal = c.predict("chocolate cake", "", "", 3, api_name="/search_text")  # the filter boxes left out: empty
        from tnlbt.index.filters import recipe_filter
        from tnlbt.inference import RecipeText

        want = [h["title"] for h in s.search_text(RecipeText("chocolate cake"), k=3)]
        assert [g["caption"].rsplit("  (", 1)[0] for g in gal] == want  # same ranking as the Searcher
        # the must include / must exclude boxes are the API's filter
        gal = c.predict("chocolate cake", "", "", 5, "", "Tomatoes, flour", api_name="/search_text")
        flt = recipe_filter(must_exclude=["tomato", "flour"])
        want = [h["title"] for h in s.search_text(RecipeText("chocolate cake"), k=5, filter=flt)]
        assert [g["caption"].rsplit("  (", 1)[0] for g in gal] == want and want
        p = tmp_path / "q.jpg"
        p.write_bytes(_jpeg(COLOURS[4]))
        tab = c.predict(handle_file(str(p)), 2, api_name="/search_image")
        want = [h["title"] for h in s.search_image(p, k=2)]
        assert [row[0] for row in tab["data"]] == want
        # empty query -> a Gradio error, not a crash
        from gradio_client.exceptions import AppError

        with pytest.raises(AppError):
            c.predict("", "", "", 3, api_name="/search_text")
        with pytest.raises(AppError, match="no ingredient word"):  # a filter term of quantities only
            c.predict("cake", "", "", 3, "2 cups", "", api_name="/search_text")
    finally:
        demo.close()


def test_ui_files_travel_as_bytes_to_the_replica(tmp_path):
    """The UI replica may run on another node than the app builder: its example photos and curves arrive as
    bytes and are written to the replica's own disk, with the same content."""
    from tnlbt.serve.app import portable_files
    from tnlbt.serve.deployments import local_files

    photo, curves = tmp_path / "abc.jpg", tmp_path / "curves.png"
    photo.write_bytes(b"\xff\xd8jpeg")
    curves.write_bytes(b"\x89PNG")
    ex = portable_files({"text": [["t", "i", "s"]], "images": [str(photo), str(tmp_path / "gone.jpg")]})
    card = portable_files({"run": "r", "curves": str(curves)})
    assert ex["images"] == [{"name": "abc.jpg", "data": b"\xff\xd8jpeg"}]  # a missing file is dropped
    assert card["curves"] == {"name": "curves.png", "data": b"\x89PNG"}
    photo.unlink()
    curves.unlink()  # the builder's files are gone: the replica must not need them
    ex2, card2 = local_files(ex), local_files(card)
    assert ex2["text"] == [["t", "i", "s"]]
    (p,) = ex2["images"]
    assert p.endswith("abc.jpg") and Path(p).read_bytes() == b"\xff\xd8jpeg"
    assert Path(card2["curves"]).read_bytes() == b"\x89PNG"
    assert local_files({"images": ["/x/y.jpg"], "curves": None}) == {"images": ["/x/y.jpg"], "curves": None}


def test_filter_boxes_reach_the_api_as_its_filter():
    """The Serve UI's callable (``ui_fns``) hands the boxes to the API's search as ``must_include`` /
    ``must_exclude`` (which validates and normalises them); empty boxes send no filter."""
    import asyncio

    from test_api_hostile import _Handle
    from tnlbt.serve.deployments import ui_fns

    api = _Handle(search_text_hits=lambda q, k, f: [], image_bytes=lambda i: None)
    text_fn, _ = ui_fns(api)
    asyncio.run(text_fn("soup", "", "", 3, "Tomatoes, basil ,", " peanut"))
    asyncio.run(text_fn("soup", "", "", 3, " , ", ""))
    (q1, k1, f1), (_, _, f2) = api.calls["search_text_hits"]
    assert q1["title"] == "soup" and k1 == 3
    assert f1 == {"must_include": ["Tomatoes", "basil"], "must_exclude": ["peanut"]} and f2 is None
