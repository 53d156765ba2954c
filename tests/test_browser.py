"""The real page in Debian's chromium (Playwright pointed at /usr/bin/chromium; no browser download).

Goes through all five tabs on the bundled demo data, starts a tiny training run in the Train tab, reloads
the page while it runs and sees it finish, checks that the noise lab's chart changes with sigma, runs a
one-seed comparison in the Compare tab and reads its forest plot, scatter, table and downloads, fails on any
browser console error or visible error, and saves one screenshot per tab (to $HANOREC_SCREENSHOTS, default a temporary folder).

Run: `python -m pytest -m browser tests/test_browser.py` (CI installs chromium with apt first).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TRAIN_TIMEOUT_MS = 300_000

if not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true":
    pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium); required when CI=true", allow_module_level=True)
if os.environ.get("CI") != "true":
    pytest.importorskip("playwright", reason="the playwright package is not installed (requirements-dev.txt)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from app.main import build_app, make_context

    ctx = make_context([str(DEMO)], str(tmp_path_factory.mktemp("runs")), "cpu")
    demo = build_app(ctx)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    if ctx.jobs is not None:
        ctx.jobs.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("HANOREC_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.console_errors = []
        pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
        pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
        # "load", not "networkidle": the Train tab polls its jobs every second, so the network is never idle
        pg.goto(url, wait_until="load")
        pg.get_by_role("tab", name="Noise lab").wait_for(timeout=60_000)
        yield pg
        browser.close()


def no_errors(page) -> None:
    """No console error, no error toast, no component in an error state."""
    assert page.console_errors == [], page.console_errors
    toasts = [t for t in page.locator('[data-testid="toast-body"]').all_inner_texts() if "error" in t.lower()]
    assert toasts == [], toasts


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.wait_for_timeout(300)


def shoot(page, shots: Path, name: str) -> None:
    """A full-page PNG, 1280 wide, quantized to 256 colours (small enough for the README)."""
    from PIL import Image

    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)


def test_data_tab(page, shots):
    open_tab(page, "Data")
    page.get_by_text("users have a test prompt").wait_for(timeout=60_000)
    page.locator("#data-history img").first.wait_for(timeout=60_000)
    assert page.locator("#data-history img").count() >= 6
    prompt = page.locator("#data-prompt textarea").input_value()
    assert "<image>" in prompt
    page.get_by_text("colour is shown only in its image").first.wait_for(timeout=30_000)  # the demo's planted logic
    page.get_by_text("What the model sees").click()  # the accordion: chat template, image tokens expanded
    seen = page.locator("#data-seen textarea")
    seen.wait_for(timeout=30_000)
    # the user's prompt is shown first; the model's view and scores follow once the model has scored it
    page.wait_for_function("() => document.querySelector('#data-seen textarea').value.includes('<|image_pad|>')",
                           timeout=60_000)  # fmt: skip
    assert "<|image_pad|>" in seen.input_value()
    no_errors(page)
    shoot(page, shots, "data")


def test_train_tab_runs_a_tiny_training_to_the_end(page, shots):
    """Train from the lesson preset: the form shows its values (never "0: the preset's"); only the steps and the
    evaluation are shortened here. The curves show the held-out pair accuracy's panel."""
    from hanorec.presets import form_defaults

    open_tab(page, "Train")
    page.get_by_role("combobox", name="Stage", exact=True).click()
    page.get_by_role("option", name="HaNo-DPO", exact=True).click()  # SFT then HaNo-DPO in one run
    # the stage's own learning rate from the preset replaces SFT's, and HaNo-DPO's HaRS knobs appear
    page.locator("#train-hars-temperature").wait_for(state="visible", timeout=30_000)
    page.wait_for_function(f"() => Number(document.querySelector('#train-lr input').value) === {form_defaults()['pref_lr']}",
                           timeout=30_000)  # fmt: skip
    page.get_by_label("max steps (empty: epochs)", exact=True).fill("2")
    page.get_by_label("evaluation prompts (0: all)", exact=True).fill("2")
    page.locator("#train-launch").click()
    status = page.locator("#train-status")
    status.get_by_text("hano-dpo").wait_for(timeout=60_000)
    # the run goes on while the page is gone; the reloaded page follows it again
    no_errors(page)
    page.reload(wait_until="load")
    page.get_by_role("tab", name="Train").wait_for(timeout=60_000)
    page.console_errors.clear()  # leaving the page aborts its pending polls (AbortError): not an app error
    page.get_by_text("users have a test prompt").wait_for(timeout=60_000)
    open_tab(page, "Train")
    page.locator("#train-status").get_by_text("finished").wait_for(timeout=TRAIN_TIMEOUT_MS)
    page.locator("#train-curves").get_by_text("eval/pair_accuracy").first.wait_for(timeout=30_000)
    page.locator("#train-curves").get_by_text("kl/reference").first.wait_for(timeout=30_000)
    no_errors(page)
    shoot(page, shots, "train")


def test_hardness_tab(page, shots):
    open_tab(page, "Hardness")
    page.locator("#hardness-refresh").click()  # the run trained above appears among the models
    page.locator("#hardness-model input").click()
    page.get_by_role("option", name="hano_dpo").first.click()
    page.locator("#hardness-run").click()
    page.locator("#hardness-summary").get_by_text("training pairs").wait_for(timeout=120_000)
    page.get_by_text("mean of the 3 aligned distances").wait_for(timeout=60_000)
    page.locator("#hardness-stats").click()
    page.locator("#hardness-stats-text").get_by_text("reward accuracy").wait_for(timeout=120_000)
    page.get_by_label("pair #", exact=True).fill("1")
    page.locator("#hardness-pair-prompt").click()
    page.locator("#hardness-prompt-images img").first.wait_for(timeout=60_000)
    no_errors(page)
    shoot(page, shots, "hardness")


def test_noise_lab_chart_changes_with_sigma(page, shots):
    open_tab(page, "Noise lab")
    summary = page.locator("#noise-summary")
    chart = page.locator("#noise-scores")

    def run(sigma: str) -> str:
        box = page.locator("#noise-sigma input[type=number]")
        box.fill(sigma)
        box.press("Enter")
        page.locator("#noise-run").click()
        summary.get_by_text(f"sigma = {sigma} on the lora").wait_for(timeout=120_000)
        chart.locator(".main-svg").first.wait_for(timeout=30_000)
        page.wait_for_timeout(500)
        return chart.inner_html()

    small = run("0.01")
    large = run("0.1")
    assert small != large
    page.locator("#noise-sweep").click()
    page.locator("#noise-sweep-plot .main-svg").first.wait_for(timeout=180_000)
    no_errors(page)
    shoot(page, shots, "noise")


def test_compare_tab_launches_a_comparison_and_reads_it(page, shots):
    """A one-seed, one-method comparison through the job queue, then its forest plot, scatter and table."""
    open_tab(page, "Compare")
    page.locator("#compare-seeds textarea").fill("0")
    page.locator("#compare-methods").get_by_label("HaNo-DPO", exact=True).uncheck()
    page.get_by_label("SFT max steps", exact=True).fill("2")
    page.get_by_label("preference max steps", exact=True).fill("2")
    page.get_by_label("catalogue items (0: every unseen item)", exact=True).fill("20")
    page.get_by_label("test prompts (0: all)", exact=True).fill("8")
    page.locator("#compare-launch").click()
    status = page.locator("#compare-status")
    status.get_by_text("-compare:").wait_for(timeout=60_000)
    status.get_by_text("finished").wait_for(timeout=TRAIN_TIMEOUT_MS)
    assert page.locator("#compare-progress progress").get_attribute("value") == "1.0000"
    page.locator("#compare-refresh").click()
    page.wait_for_timeout(1000)
    page.locator("#compare-folder input").click()
    page.get_by_role("option").first.click()
    page.locator("#compare-open").click()
    page.locator("#compare-forest .main-svg").first.wait_for(timeout=120_000)
    page.locator("#compare-scatter .main-svg").first.wait_for(timeout=60_000)
    page.locator("#compare-forest-text").get_by_text("DPO").first.wait_for(timeout=30_000)
    assert "±" in page.locator("#compare-forest-text").inner_text()
    page.locator("#compare-readout").get_by_text("What this means").wait_for(timeout=30_000)
    assert "SFT" in page.locator("#compare-readout").inner_text()
    table = page.locator("#compare-table").inner_text()
    assert "chance" in table and "SFT" in table and "DPO" in table
    files = page.locator("#compare-files").inner_text()
    assert ".csv" in files and ".tex" in files
    no_errors(page)
    shoot(page, shots, "compare")
