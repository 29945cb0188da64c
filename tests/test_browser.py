"""The app in a real browser: headless Debian Chromium driven by Playwright.

Select two LoRAs, train a few gate steps, compare, look at the gates, switch an expert off; check that
the gallery, the heat-map and the toggled image appear and change. Screenshots go to test-artifacts/.
Runs on the embedded default when it is built, else on a tiny pipeline and bank.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mole_core.engine import Engine
from tests.test_api import launch
from tests.test_app import world_paths

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 300_000  # per wait; generous because the CI machine is shared and slow


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    """(url, engine) of the app running on localhost."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run does it)")
    engine = Engine(*world_paths(request.config, tmp_path_factory, prefer_default=True))
    demo, url = launch(engine)
    yield url, engine
    demo.close()


@pytest.fixture
def page(served):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def image_bytes(page, selector: str) -> bytes:
    """The bytes of the image an <img> inside `selector` shows (fetched as the browser would)."""
    src = page.locator(f"{selector} img").first.get_attribute("src")
    return page.request.get(src).body()


def wait_for_new_image(page, selector: str, old_src: str | None) -> str:
    page.wait_for_function(
        """([sel, old]) => { const img = document.querySelector(sel + ' img');
                             return img && img.complete && img.naturalWidth > 0 && img.src !== old; }""",
        arg=[selector, old_src or ""])
    return page.locator(f"{selector} img").first.get_attribute("src")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_select_train_compare_toggle_inspect(served, page):
    url, engine = served
    entries = [e for e in engine.bank.entries if not e.error]
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(url)

    # 1. Bank: the gallery shows every LoRA; pick exactly the first two
    page.wait_for_selector("#bank-gallery img")
    assert page.locator("#bank-gallery img").count() == len(engine.bank.entries)
    chosen = page.locator("#chosen input[type=checkbox]")
    for i in range(chosen.count()):
        chosen.nth(i).set_checked(i < 2)
    assert sum(chosen.nth(i).is_checked() for i in range(chosen.count())) == 2
    page.screenshot(path=str(ARTIFACTS / "browser_bank.png"), full_page=True)

    # 2. Train gates: a few steps, the status reports them and a mixture can be downloaded
    open_tab(page, "Train gates")
    page.locator("#train-steps input").fill("2")
    page.locator("#train-button").click()
    page.wait_for_function("() => document.querySelector('#train-status')?.innerText.includes('Trained after 2')")
    page.screenshot(path=str(ARTIFACTS / "browser_train.png"), full_page=True)

    # 3. Compare: four methods side by side, each captioned with its time
    open_tab(page, "Compare")
    page.locator("#prompt textarea").fill(" ".join(entries[0].trigger + entries[1].trigger))
    page.locator("#steps input[type=number]").fill("2")
    page.locator("#compare-button").click()
    page.wait_for_function("() => document.querySelectorAll('#results img').length === 4")
    # the four images are really shown (loaded and decoded), not just their frames
    page.wait_for_function("() => Array.from(document.querySelectorAll('#results img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    captions = page.locator("#results").inner_text()
    assert "MoLE" in captions and "untrained" not in captions and " s" in captions
    page.screenshot(path=str(ARTIFACTS / "browser_compare.png"), full_page=True)

    # 4. Inspect: the heat-map of the MoLE image is there
    open_tab(page, "Inspect gates")
    heatmap_src = wait_for_new_image(page, "#heatmap", None)
    heatmap_before = image_bytes(page, "#heatmap")

    # 5. Toggle: render with every expert on, then switch the first off; the image and the gates change
    open_tab(page, "Toggle experts")
    page.locator("#toggle-button").click()
    src = wait_for_new_image(page, "#toggle-image", None)
    all_on = image_bytes(page, "#toggle-image")
    page.locator("#switch-0 input[type=checkbox]").uncheck()
    wait_for_new_image(page, "#toggle-image", src)
    page.wait_for_function("() => document.querySelector('#toggle-caption')?.innerText.includes('1 of 2')")
    assert image_bytes(page, "#toggle-image") != all_on
    page.screenshot(path=str(ARTIFACTS / "browser_toggle.png"), full_page=True)
    open_tab(page, "Inspect gates")
    wait_for_new_image(page, "#heatmap", heatmap_src)
    assert image_bytes(page, "#heatmap") != heatmap_before
    page.screenshot(path=str(ARTIFACTS / "browser_inspect.png"), full_page=True)

    # 6. Compare again with a random seed and two methods: the gallery changes, the used seed is shown
    open_tab(page, "Compare")
    first = page.locator("#results img").first.get_attribute("src")
    page.get_by_label("Randomise seed").check()
    for method in ("linear", "SVD"):
        page.locator("#methods").get_by_label(method, exact=True).uncheck()
    page.locator("#compare-button").click()
    page.wait_for_function("() => document.querySelectorAll('#results img').length === 2")
    assert page.locator("#results img").first.get_attribute("src") != first
    assert page.locator("#used-seed input").input_value() != "0"
