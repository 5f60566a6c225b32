"""The playground page in a real browser: headless Chromium (Debian's package) driven by Playwright against serve.py
with two tiny checkpoints. Load the page, type a prompt, generate, watch the text stream in both columns, hover a
token and read its alternatives; the screenshot goes to tests/artifacts/playground.png.

Skipped only when no Chromium is installed (`apt-get install -y chromium`; CI's .ci/run installs it) or without
Playwright's Python package. Playwright's own browser download is not used: it drives the system Chromium."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import REPO

pytest.importorskip("fastapi", reason="serve.py needs the serve extra: uv sync --extra serve")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with Playwright")

from test_serve import make_models, running, served  # noqa: E402

import serve  # noqa: E402

ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = os.environ.get("PAIR_CHROMIUM") or next(
    (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def url(tmp_path_factory, shakespeare_path):
    runs = make_models(tmp_path_factory.mktemp("models"), shakespeare_path.read_text(encoding="utf-8"))
    with running(serve.create_app(served(runs), serve.Limits(workers=2, queue=8))) as base:
        yield base


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{url}/")
        yield page
        browser.close()
        assert not errors, errors  # no JavaScript exceptions


def test_the_page_streams_coloured_tokens_and_shows_alternatives_on_hover(page):
    expect = sync_api.expect
    columns = page.locator(".column")
    expect(columns).to_have_count(2)  # two checkpoints: side by side
    expect(columns.nth(0).locator("select")).to_have_value("alpha")
    expect(columns.nth(1).locator("select")).to_have_value("beta")

    page.fill("#prompt", "ROMEO:\n")
    page.fill("#max_tokens", "120")
    page.fill("#seed", "3")
    page.click("#generate")

    for i in range(2):  # the streamed text appears in both columns, one coloured span per token
        tokens = columns.nth(i).locator(".output .token")
        expect(tokens).to_have_count(120, timeout=20_000)
        expect(columns.nth(i).locator(".stats")).to_contain_text("finish: length")
    expect(page.locator("#generate")).to_be_enabled()
    assert columns.nth(0).locator(".output").inner_text().startswith("ROMEO:\n")
    assert columns.nth(0).locator(".output").inner_text() != columns.nth(1).locator(".output").inner_text()
    colour = columns.nth(0).locator(".token").first.evaluate("e => getComputedStyle(e).backgroundColor")
    assert colour not in ("", "rgba(0, 0, 0, 0)")

    token = columns.nth(0).locator(".token").nth(5)
    token.hover()
    tip = page.locator("#tip")
    expect(tip).to_be_visible()
    expect(tip.locator(".alt")).not_to_have_count(0)
    expect(tip).to_contain_text("chosen:")
    assert "%" in tip.locator(".alt").first.inner_text()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)


def test_the_same_seed_gives_the_same_text_again(page):
    first = page.locator(".column").nth(1).locator(".output").inner_text()
    page.click("#generate")
    tokens = page.locator(".column").nth(1).locator(".output .token")
    sync_api.expect(page.locator(".column").nth(1).locator(".stats")).to_contain_text("finish: length", timeout=20_000)
    assert tokens.count() == 120
    assert page.locator(".column").nth(1).locator(".output").inner_text() == first


def test_a_bad_setting_shows_the_servers_error(page):
    page.fill("#top_p", "1.5")
    page.click("#generate")
    sync_api.expect(page.locator(".column").first.locator(".error")).to_contain_text("top_p must be above 0")
    page.fill("#top_p", "1")
