"""The app in a real browser: headless Debian Chromium driven by Playwright.

Select two LoRAs, train a few gate steps, compare, look at the gates, switch an expert off; check that
the gallery, the heat-map and the toggled image appear and change. Screenshots go to test-artifacts/.
Runs on the embedded default when it is built, else on a tiny pipeline and bank.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from ui import compare_tab
from mole_core.image.engine import Engine
from tests.helpers import launch
from tests.helpers import world_paths

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
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


def read_gallery(page, engine) -> list[str]:
    """The oracle's reading of every image of the Compare gallery ("caption · what the oracle sees")."""
    import io
    import PIL.Image
    from mole_core.world.pixel import Oracle
    captions = [c.strip() for c in page.locator("#results .caption-label").all_inner_texts()]
    images = [PIL.Image.open(io.BytesIO(page.request.get(img.get_attribute("src")).body())).convert("RGB")
              for img in page.locator("#results img").all()]
    oracle = Oracle.load(Path(engine.model_id) / "oracle")
    return [f"{caption}: {', '.join(f'{ident} {pos}' for pos, ident, _ in reading.objects()) or 'nothing'}"
            for caption, reading in zip(captions, oracle.read([i.resize((32, 32)) for i in images]))]


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

    # 2. Train gates: a few steps; the expected duration is stated first, the summary after
    open_tab(page, "Train gates")
    assert "Expected: about" in page.locator("#train-estimate").inner_text()
    page.locator("#train-steps input").fill("2")
    page.locator("#train-button").click()
    page.wait_for_function("() => document.querySelector('#train-status')?.innerText.includes('Trained after 2')")
    assert "Mean gates" in page.locator("#train-status").inner_text()
    page.screenshot(path=str(ARTIFACTS / "browser_train.png"), full_page=True)

    # 3. Compare: the default methods side by side on a caption built from the chosen LoRAs
    open_tab(page, "Compare")
    page.get_by_role("button", name="Caption from the chosen LoRAs").click()
    triggers = [entries[0].trigger[0], entries[1].trigger[0]]
    page.wait_for_function("(t) => document.querySelector('#prompt textarea').value.includes(t[0] + ' on the left')",
                           arg=triggers)
    page.locator("#steps input[type=number]").fill("2")
    page.locator("#compare-button").click()
    n = len(compare_tab.DEFAULT_METHODS)
    page.wait_for_function(f"() => document.querySelectorAll('#results img').length === {n}")
    # the images are really shown (loaded and decoded), not just their frames
    page.wait_for_function("() => Array.from(document.querySelectorAll('#results img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    captions = page.locator("#results").inner_text()
    assert "MoLE" in captions and "untrained" not in captions and "TIES" in captions and "Switch" in captions
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
    for label, _ in compare_tab.COMPARE_METHODS:
        if label not in ("MoLE", "base"):
            page.locator("#methods").get_by_label(label, exact=True).set_checked(False)
    page.locator("#compare-button").click()
    page.wait_for_function("() => document.querySelectorAll('#results img').length === 2")
    assert page.locator("#results img").first.get_attribute("src") != first
    assert page.locator("#used-seed input").input_value() != "0"


@pytest.mark.slow
def test_defaults_train_and_compare_on_the_first_example_prompt(served, page):
    """A newcomer's path with every default: train, Compare on the example prompt the page starts with.
    The screens say what they should: the estimate is this machine's, α is 0 beside trigger routing, the
    summary explains the loss, the curve's step axis shows whole steps, every default method renders at
    its size, the oracle finds both subjects in the MoLE image, the snippet is a named .py without settings
    a merge does not read, the Evaluate table has named headers."""
    url, engine = served
    page.goto(url)
    page.wait_for_selector("#bank-gallery img")
    open_tab(page, "Train gates")
    page.wait_for_function("() => document.querySelector('#train-estimate')?.innerText.includes('Expected')")
    estimate = page.locator("#train-estimate").inner_text()
    assert "2 LoRAs" in estimate and "this machine" in estimate, estimate
    assert page.locator("#train-alpha input").input_value() in ("0", "0.0")
    page.locator("#train-button").click()
    page.wait_for_function("() => document.querySelector('#train-status')?.innerText.includes('Trained after')")
    status = page.locator("#train-status").inner_text()
    assert "rose" not in status or "fixed batch" in status, status
    assert "fixed batch" in status, status
    ticks = [t for t in page.locator("#task-plot text").all_inner_texts() if t.strip().replace(".", "").isdigit()]
    assert ticks and all("." not in t for t in ticks), ticks           # whole steps on the step axis
    open_tab(page, "Compare")
    page.locator("#compare-button").click()
    n = len(compare_tab.DEFAULT_METHODS)
    page.wait_for_function(f"() => document.querySelectorAll('#results img').length === {n}")
    page.wait_for_function("() => Array.from(document.querySelectorAll('#results img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(ARTIFACTS / "browser_defaults_compare.png"), full_page=True)
    prompt = page.locator("#prompt textarea").input_value()
    assert prompt == compare_tab.prompt_examples(engine.bank)[0]
    if (Path(engine.model_id) / "oracle").exists():
        lines = read_gallery(page, engine)
        mole = next(line for line in lines if line.startswith("MoLE"))
        assert all(k in mole.split(":", 1)[1] for k in compare_tab.example_keys(engine.bank, prompt)), lines
    open_tab(page, "Export")
    page.get_by_role("button", name="Python for the last comparison").click()
    page.wait_for_function("() => document.querySelector('#snippet-file')?.innerText.includes('mole_compare.py')")
    code = page.locator("#snippet").inner_text()
    linear = next(line for line in code.splitlines() if "Mix('linear'" in line)
    assert "rank" not in linear and "gate" not in linear, linear
    open_tab(page, "Evaluate")
    headers = page.locator("#study-table").inner_text()
    assert "caption fidelity" in headers and "method" in headers


def decoded(png: bytes) -> list:
    import io
    import numpy as np
    import PIL.Image
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB")).tolist()


@pytest.mark.slow
def test_toggle_places_an_expert_in_a_region(served, page):
    """Toggle experts: choose 'left' for the first expert; the MoLE image re-renders placed (its caption says so),
    the coloured overlay and its legend appear; back to 'whole' gives the unplaced image again."""
    url, engine = served
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(url)
    page.wait_for_selector("#bank-gallery img")
    chosen = page.locator("#chosen input[type=checkbox]")
    for i in range(chosen.count()):
        chosen.nth(i).set_checked(i < 2)
    open_tab(page, "Toggle experts")
    page.locator("#toggle-button").click()
    src = wait_for_new_image(page, "#toggle-image", None)
    unplaced = image_bytes(page, "#toggle-image")
    page.locator("#region-0").get_by_label("left", exact=True).check()
    src = wait_for_new_image(page, "#toggle-image", src)
    page.wait_for_function("() => document.querySelector('#toggle-caption')?.innerText.includes('regions')")
    assert image_bytes(page, "#toggle-image") != unplaced
    wait_for_new_image(page, "#region-overlay", None)
    page.wait_for_function("() => document.querySelector('#region-legend')?.innerText.includes('left')")
    assert "everywhere" in page.locator("#region-legend").inner_text()        # the second expert: no region
    page.screenshot(path=str(ARTIFACTS / "browser_regions.png"), full_page=True)
    page.locator("#region-0").get_by_label("whole", exact=True).check()
    wait_for_new_image(page, "#toggle-image", src)
    page.wait_for_function("() => !document.querySelector('#toggle-caption')?.innerText.includes('regions')")
    assert decoded(image_bytes(page, "#toggle-image")) == decoded(unplaced)
