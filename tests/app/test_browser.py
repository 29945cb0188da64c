"""The app in a real browser: headless Debian Chromium driven by Playwright.

Select two LoRAs, train a few gate steps, compare, look at the gates, switch an expert off; check that
the gallery, the heat-map and the toggled image appear and change. Screenshots go to test-artifacts/.
Runs on the embedded default when it is built, else on a tiny pipeline and bank.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from ui import compare_tab
from ui.session import Studio
from mole_core.image.engine import Engine
from mole_core.text.engine import DEFAULT_TEXT_MODEL, TextEngine, is_text_model
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
    text = TextEngine(limits=engine.limits) if is_text_model(DEFAULT_TEXT_MODEL) else None
    demo, url = launch(Studio(engine, text=text))
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
    """Open one of the page's own tabs (the Text tab has tabs of the same names inside it)."""
    import app
    tab_id = {title: tab_id for tab_id, title, _ in app.TABS}.get(name, name.lower())
    page.locator(f"button[role=tab][data-tab-id='{tab_id}']").click()


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
    page.wait_for_function("() => document.querySelector('#train-estimate')?.innerText.includes('Expected: about')")
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
    page.mouse.move(0, 0)
    page.screenshot(path=str(ARTIFACTS / "browser_compare.png"), full_page=True)
    check_compare_screen(page)

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


def shown_at_whole_scale(page, selector: str) -> list[dict]:
    """Each image under `selector` as the page lays it out: its size, the size it is shown at, how it is
    scaled, and its caption's box against the image's and the cell's."""
    return page.evaluate("""(sel) => Array.from(document.querySelectorAll(sel + ' .thumbnail-item')).map(cell => {
        const img = cell.querySelector('img'), cap = cell.querySelector('.caption-label');
        const i = img.getBoundingClientRect(), c = cap.getBoundingClientRect(), b = cell.getBoundingClientRect();
        return {natural: img.naturalWidth, naturalH: img.naturalHeight, shown: i.width, shownH: i.height,
                rendering: getComputedStyle(img).imageRendering, fit: getComputedStyle(img).objectFit,
                alt: img.alt, caption: cap.innerText, capTop: c.top, capBottom: c.bottom, imgBottom: i.bottom,
                cellBottom: b.bottom, clipped: cap.scrollWidth > cap.clientWidth || cap.scrollHeight > cap.clientHeight};
    })""", selector)


def check_compare_screen(page) -> None:
    """Every image at a whole multiple of its size, nearest-neighbour, uncropped; every caption whole, below
    its image, inside its cell; the model line says the factor."""
    cells = shown_at_whole_scale(page, "#results")
    assert len(cells) == len(compare_tab.DEFAULT_METHODS), cells
    for cell in cells:
        k = cell["shown"] / cell["natural"]
        assert k == int(k) >= 1 and cell["shownH"] == k * cell["naturalH"], cell       # a whole factor, uncropped
        assert cell["rendering"] == "pixelated" and cell["fit"] == "contain", cell
        assert cell["caption"] == cell["alt"] and not cell["clipped"], cell            # the whole caption text
        assert cell["imgBottom"] <= cell["capTop"] and cell["capBottom"] <= cell["cellBottom"] + 0.5, cell
    k = int(cells[0]["shown"] / cells[0]["natural"])
    if k > 1:
        assert f"{k}× larger, nearest-neighbour" in page.locator("#model-info").inner_text()


def check_heatmap_screen(page) -> None:
    """The heat-map shown is the one of the gates offered as CSV, and each of its printed rows sums to 1."""
    import csv
    import io
    import numpy as np
    import PIL.Image
    from mole_core.plots import gate_heatmap, heatmap_table
    page.wait_for_selector("#gates-csv a[href]")
    text = page.request.get(page.locator("#gates-csv a[href]").first.get_attribute("href")).text()
    rows = list(csv.DictReader(io.StringIO(text)))
    groups, experts, table = heatmap_table(rows)
    assert rows and groups and len(experts) >= 2
    for group in groups:
        assert abs(sum(round(table[(group, e)], 2) for e in experts) - 1) <= 0.01 * len(experts), (group, table)
    shown = PIL.Image.open(io.BytesIO(image_bytes(page, "#heatmap"))).convert("RGB")
    assert np.array_equal(np.asarray(shown), np.asarray(gate_heatmap(rows).convert("RGB")))


def check_text_screens(page) -> None:
    """Text tab: the expected duration before training, radios as in the image tabs, the trained mixture
    offered for download, an expert switched off re-renders the answer without another click."""
    open_tab(page, "Text")
    page.get_by_role("tab", name="Train gates").last.click()        # the Text tab's own, after the page's
    page.wait_for_function("() => document.querySelector('#text-estimate')?.innerText.includes('Expected')")
    assert page.locator("#text-estimate").inner_text().strip()
    panel = page.locator("#text-estimate").locator("xpath=ancestor::div[contains(@class,'tabitem')][1]")
    assert panel.locator("input[type=radio]").count() >= 2 and panel.locator("select").count() == 0
    assert not page.locator("#text-mixture a[href]").count()
    steps = panel.get_by_label("Steps")
    steps.fill("3")
    page.locator("#text-train").click()
    page.wait_for_function("() => document.querySelector('#text-status')?.innerText.includes('Trained after 3')")
    page.wait_for_selector("#text-mixture a[href]")
    assert page.locator("#text-mixture").inner_text().count(".safetensors")
    page.get_by_role("tab", name="Toggle experts").last.click()
    page.locator("#text-toggle").click()
    on = page.locator("#text-on input[type=checkbox]")
    n = on.count()
    page.wait_for_function(f"() => document.querySelector('#text-caption')?.innerText.includes('{n} of {n}')")
    on.nth(0).uncheck()                                     # no click on "Answer with MoLE"
    page.wait_for_function(f"() => document.querySelector('#text-caption')?.innerText.includes('{n - 1} of {n}')")
    page.screenshot(path=str(ARTIFACTS / "browser_text_toggle.png"), full_page=True)


def check_evaluate_screen(page) -> None:
    """A one-seed, one-prompt study: its scores in one table with named headers (not the Markdown copy)."""
    open_tab(page, "Evaluate")
    tab = page.locator("#study-table").locator("xpath=ancestor::div[contains(@class,'tabitem')][1]")
    for label, value in (("Seeds", "1"), ("Prompts", "1"), ("Gate-training steps", "2")):
        tab.get_by_label(label, exact=True).fill(value)
    tab.get_by_role("button", name="Run the study").click()
    page.wait_for_function("() => Array.from(document.querySelectorAll('#study-table td'))"
                           ".some(td => td.textContent.trim().startsWith('MoLE'))")      # the study's rows are in
    findings = page.locator("#study-text").inner_text()
    assert findings.strip() and page.locator("#study-text table").count() == 0, findings   # no second table
    assert not any(line.lstrip().startswith("|") for line in findings.splitlines()), findings
    assert tab.locator("[role=grid]").count() == 1                    # one Scores table in the tab
    headers = [h.strip() for h in page.locator("#study-table th").all_inner_texts() if h.strip()]
    assert headers[:2] == ["method", "caption fidelity"], headers
    assert not any(h.isdigit() for h in headers), headers
    page.screenshot(path=str(ARTIFACTS / "browser_evaluate.png"), full_page=True)


@pytest.mark.slow
def test_the_first_hour_screens(served, page):
    """A newcomer's path with every default, reading the screens issue 25 names: the What-is-MoLE panel
    explains the methods offered; the estimate is this machine's; α is 0 beside trigger routing; the summary
    explains the loss; the curve's step axis shows whole steps; Compare shows every default method at a
    whole multiple of its size with its caption whole, and the oracle finds both subjects in the MoLE
    image; the heat-map's rows sum to 1; the snippet is a named .py without settings a merge does not
    read; the Evaluate table appears once with named headers; the Text tab states its duration, offers the
    mixture and re-renders when an expert is switched."""
    url, engine = served
    ARTIFACTS.mkdir(exist_ok=True)
    engine.calibrate()                        # as `python app.py` does before it serves
    page.goto(url)
    page.wait_for_selector("#bank-gallery img")
    page.get_by_text("What is MoLE?").click()
    about = page.locator("#about").inner_text()
    for word in ("trigger routing", "SVD merge", "TIES merge", "DARE merge"):
        assert word in about, about

    open_tab(page, "Train gates")
    page.wait_for_function("() => document.querySelector('#train-estimate')?.innerText.includes('Expected')")
    estimate = page.locator("#train-estimate").inner_text()
    assert "2 LoRAs" in estimate and "timed on this machine" in estimate, estimate
    assert page.locator("#train-alpha input").input_value() in ("0", "0.0")
    assert "α = 0" in page.locator("#train-alpha").inner_text() or "routing" in page.locator("#train-alpha").inner_text()
    page.locator("#train-button").click()
    page.wait_for_function("() => document.querySelector('#train-status')?.innerText.includes('Trained after')")
    status = page.locator("#train-status").inner_text()
    assert "fixed batch" in status and ("rose" not in status or "moves little" in status), status
    axes = page.locator("#task-plot g.role-axis").evaluate_all("gs => gs.map(g => [g.getAttribute('aria-label'), "
                                                          "Array.from(g.querySelectorAll('.role-axis-label text'))"
                                                          ".map(t => t.textContent)])")
    steps = next((labels for name, labels in axes if (name or "").startswith("X-axis")), None)
    assert steps and all(t.replace(",", "").isdigit() for t in steps), axes    # whole steps on the step axis
    page.screenshot(path=str(ARTIFACTS / "browser_defaults_train.png"), full_page=True)

    open_tab(page, "Compare")
    page.locator("#compare-button").click()
    n = len(compare_tab.DEFAULT_METHODS)
    page.wait_for_function(f"() => document.querySelectorAll('#results img').length === {n}")
    page.wait_for_function("() => Array.from(document.querySelectorAll('#results img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    page.mouse.move(0, 0)
    page.screenshot(path=str(ARTIFACTS / "browser_defaults_compare.png"), full_page=True)
    check_compare_screen(page)
    prompt = page.locator("#prompt textarea").input_value()
    assert prompt == compare_tab.prompt_examples(engine.bank)[0]
    if (Path(engine.model_id) / "oracle").exists():
        lines = read_gallery(page, engine)
        mole = next(line for line in lines if line.startswith("MoLE"))
        assert all(k in mole.split(":", 1)[1] for k in compare_tab.example_keys(engine.bank, prompt)), lines

    open_tab(page, "Inspect gates")
    check_heatmap_screen(page)
    page.screenshot(path=str(ARTIFACTS / "browser_defaults_inspect.png"), full_page=True)

    open_tab(page, "Export")
    page.get_by_role("button", name="Python for the last comparison").click()
    page.wait_for_selector("#snippet-file a[href]")
    href = page.locator("#snippet-file a[href]").first.get_attribute("href")
    assert href.endswith("/mole_compare.py"), href
    code = page.request.get(href).text()
    assert "Mix(" in code and code.splitlines()[0] in page.locator("#snippet").inner_text()
    for merge in ("linear", "svd", "ties", "dare"):
        row = next(line for line in code.splitlines() if f"Mix('{merge}'" in line or f'Mix("{merge}"' in line)
        assert "gate" not in row and "granularity" not in row and (merge != "linear" or "rank" not in row), row
    compile(code, "mole_compare.py", "exec")

    check_evaluate_screen(page)
    if engine.model_id and served_text(page):
        check_text_screens(page)


def served_text(page) -> bool:
    return page.get_by_role("tab", name="Text").count() > 0


@pytest.fixture(scope="module")
def sdxl_app(tmp_path_factory):
    """(url, PLAIN, NAMED) of `python app.py --model <tiny SDXL folder> --bank <its bank>` in its own process:
    the bank's triggers are split by the SDXL tokenizers (tests.image.test_routing_families)."""
    import subprocess
    import sys
    import time
    import urllib.request
    from tests.helpers import free_port
    from tests.image.test_routing_families import NAMED, PLAIN, family_dir, make_bank
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    root = tmp_path_factory.mktemp("browser_sdxl")
    model_dir = family_dir("sdxl", root)
    bank = make_bank(root / "bank", model_dir, "sdxl")
    port, log = free_port(), open(root / "app.log", "w")
    repo = Path(__file__).resolve().parents[2]
    server = subprocess.Popen([sys.executable, str(repo / "app.py"), "--model", str(model_dir), "--bank", str(bank),
                               "--host", "127.0.0.1", "--port", str(port)], cwd=repo, stdout=log,
                              stderr=subprocess.STDOUT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert server.poll() is None, (root / "app.log").read_text()
                time.sleep(0.5)
        yield url, PLAIN, NAMED
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def gallery_pixels(page) -> dict:
    """{caption: pixels} of the Compare gallery."""
    import io
    import numpy as np
    import PIL.Image
    out = {}
    for cell in page.locator("#results .thumbnail-item").all():
        src = cell.locator("img").get_attribute("src")
        image = PIL.Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")
        out[cell.locator(".caption-label").inner_text()] = np.asarray(image, dtype=np.int16)
    return out


def compare_in_browser(page, prompt: str) -> tuple:
    """Compare MoLE (the default, routed gate) beside the base model on `prompt`: (mole caption, MoLE pixels,
    base pixels, notes)."""
    page.locator("#prompt textarea").fill(prompt)
    old = page.locator("#results img").first.get_attribute("src") if page.locator("#results img").count() else ""
    page.locator("#compare-button").click()
    page.wait_for_function("""(old) => { const i = document.querySelectorAll('#results img');
        return i.length === 2 && i[0].src !== old && Array.from(i).every(x => x.complete && x.naturalWidth > 0); }""",
                           arg=old)
    images = gallery_pixels(page)
    mole = next(c for c in images if c.startswith("MoLE"))
    base = next(c for c in images if c.startswith("Base"))
    return mole, images[mole], images[base], page.locator("#compare-notes").inner_text()


@pytest.mark.slow
def test_sdxl_folder_routes_in_compare_and_toggle(sdxl_app, page):
    """Issue 22: the app opened on a tiny SDXL folder (`--model`) composes with the default gate: Compare's
    caption and notes say trigger routing ran; a prompt without triggers gives the base image, one naming a
    trigger another; Toggle renders the same image, and with that expert off the base image."""
    import numpy as np
    url, plain, named = sdxl_app
    page.goto(url)
    page.wait_for_selector("#bank-gallery img")
    page.wait_for_function("() => document.querySelector('#model-info')?.innerText.includes('Model:')")
    assert "XL" in page.locator("#model-info").inner_text()
    chosen = page.locator("#chosen input[type=checkbox]")
    for i in range(chosen.count()):
        chosen.nth(i).set_checked(True)
    open_tab(page, "Compare")
    page.locator("#steps input[type=number]").fill("2")
    for label, value in compare_tab.COMPARE_METHODS:
        page.locator("#methods").get_by_label(label, exact=True).set_checked(value in ("mole", "base"))
    caption, mole, base, notes = compare_in_browser(page, plain)
    assert "trigger-routed" in caption and "routing off" not in caption, caption
    assert "each LoRA acts where the prompt names its trigger" in notes, notes
    assert np.array_equal(mole, base), "no trigger named: the base image"
    caption, mole_named, base_named, _ = compare_in_browser(page, named)
    assert "trigger-routed" in caption and not np.array_equal(mole_named, base_named), caption
    page.mouse.move(0, 0)
    page.screenshot(path=str(ARTIFACTS / "browser_sdxl_compare.png"), full_page=True)

    open_tab(page, "Toggle experts")
    page.locator("#toggle-button").click()
    src = wait_for_new_image(page, "#toggle-image", None)
    page.wait_for_function("() => document.querySelector('#toggle-caption')?.innerText.includes('trigger-routed')")
    toggled = pixels(image_bytes(page, "#toggle-image"))
    assert np.array_equal(toggled, mole_named), "Toggle renders what Compare did"
    page.locator("#switch-0 input[type=checkbox]").uncheck()
    wait_for_new_image(page, "#toggle-image", src)
    page.wait_for_function("() => document.querySelector('#toggle-caption')?.innerText.includes('1 of 2')")
    assert "trigger-routed" in page.locator("#toggle-caption").inner_text()
    assert np.array_equal(pixels(image_bytes(page, "#toggle-image")), base_named), "a's expert off: the base"
    page.screenshot(path=str(ARTIFACTS / "browser_sdxl_toggle.png"), full_page=True)


def pixels(data: bytes):
    import io
    import numpy as np
    import PIL.Image
    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


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
