"""End to end in a real browser: headless Chromium types a recipe and uploads a photo in the Gradio demo.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``) and the
``selenium`` package (pure Python; ``pip install --no-deps selenium websocket-client``). Skips cleanly when
any of them is missing. Screenshots go to ``tests/_artifacts/browser/`` (git-ignored).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import free_port
from test_search import COLOURS, _jpeg, build_tiny_index, make_tiny_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent / "_artifacts" / "browser"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def ui_url(tmp_path_factory):
    from tnlbt.serve.app import load_examples, load_model_card
    from tnlbt.ui.app import build_demo, searcher_fns

    from tnlbt.index.search import Searcher

    run = make_tiny_run(tmp_path_factory.mktemp("browser"))
    build_tiny_index(run)
    s = Searcher.from_run(run)
    demo = build_demo(*searcher_fns(s), load_examples(run, 2), load_model_card(run))
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True
    )
    yield url, run
    demo.close()
    s.close()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
    ):
        opts.add_argument(a)
    d = webdriver.Chrome(options=opts, service=Service(DRIVER))
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _wait(fn, timeout: float = 60.0, what: str = "condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # element not there yet / stale while Gradio re-renders
            last = e
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} ({last})")


def test_search_by_text_and_by_photo_in_chromium(ui_url, browser):
    from selenium.webdriver.common.by import By

    url, run = ui_url
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    d = browser
    d.get(url)
    title = _wait(
        lambda: d.find_element(By.CSS_SELECTOR, "textarea[data-testid='textbox'], input[type='text']"),
        what="the title box",
    )
    title.send_keys("tomato basil soup")
    d.find_element(By.ID, "search-text-btn").click()
    imgs = _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#photo-gallery img"), what="gallery images")
    assert len(imgs) >= 1
    _wait(lambda: "(" in d.find_element(By.ID, "photo-gallery").text or len(imgs) >= 8, what="captions")
    text_png = ARTIFACTS / "ui_recipe_to_photos.png"
    d.save_screenshot(str(text_png))

    # second tab: upload a photo
    tab = _wait(
        lambda: next(b for b in d.find_elements(By.CSS_SELECTOR, "button[role='tab']") if "Photo" in b.text),
        what="the photo tab",
    )
    tab.click()
    photo = run.parent / "upload.jpg"
    photo.write_bytes(_jpeg(COLOURS[5], size=96))
    file_input = _wait(
        lambda: d.find_element(By.CSS_SELECTOR, "#photo-input input[type='file']"), what="the upload input"
    )
    file_input.send_keys(str(photo))
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#photo-input img"), what="the uploaded preview")
    d.find_element(By.ID, "search-image-btn").click()

    def table_has_titles() -> bool:
        t = d.find_element(By.ID, "recipe-table").text
        return (
            any(w in t for w in ("tomato", "cake", "soup", "pasta", "milk", "egg", "rice", "salt"))
            and t.count("0.") >= 1
        )

    _wait(table_has_titles, what="recipe rows in the table")
    photo_png = ARTIFACTS / "ui_photo_to_recipes.png"
    d.save_screenshot(str(photo_png))
    assert text_png.stat().st_size > 10_000 and photo_png.stat().st_size > 10_000
    print(f"screenshots: {text_png} {photo_png}")
