"""The app in a real browser: `streamlit run app.py` driven by Chromium through Playwright.

Opens a deep link on a fresh server, picks a review on Explore and times the (cached) top-K,
checks cards, highlighted spans and gauges, annotates a span and sees it persist after a
reload, and shows hostile review text literally without running it. Screenshots go to
test-artifacts/. Needs the Debian `chromium` package: without it the test fails (never skips).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

from core.backend import Backend
from tests.test_injection import build_hostile_workspace

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
METHODS = ["TracIn++", "IF++"]
K = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_workspace, data_dir, tiny_backbone) -> Path:
    root = tmp_path_factory.mktemp("browser") / "workspaces"
    shutil.copytree(tiny_workspace, root / "tiny", ignore=shutil.ignore_patterns("store.sqlite*"))
    build_hostile_workspace(root, data_dir, tiny_backbone)
    for name in ("tiny", "hostile"):  # explanations and profiles in the store: the browser sees cached views
        backend = Backend(root / name)
        for row in backend.instances("test")[:3]:
            test = backend.test_input(row.id)
            backend.profile(test)
            for method in METHODS:
                backend.explain(test, method, k=100)
    return root


@contextmanager
def serve(root: Path, **env: str) -> Iterator[str]:
    """``streamlit run app.py`` on a free port with its workspaces under ``root`` (and ``env``);
    yields its URL once it answers, stops it afterwards. Its log is ``root``'s sibling streamlit.log."""
    port = free_port()
    env = {**os.environ, "SPANLENS_WORKSPACES": str(root), "HF_HUB_OFFLINE": "1", **env}
    log_path = root.parent / "streamlit.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"streamlit did not start: {log_path.read_text()}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def server(root) -> Iterator[str]:
    with serve(root) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium chromium-driver` "
                    "(the browser test never downloads a browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def settle(page, condition: str = "true", arg: object = None, timeout: float = 120_000) -> None:
    """Wait until the page shows what ``condition`` (a JavaScript expression of ``arg``) checks and
    no script run is going."""
    page.wait_for_function(f"arg => ({condition})", arg=arg, timeout=timeout)
    page.wait_for_selector(IDLE, timeout=timeout)


def cards(n: int) -> str:
    return f"document.querySelectorAll('.sl-card').length === {n}"


def progress(text: str) -> str:
    return ("[...document.querySelectorAll(\"[data-testid='stProgress']\")].some(e => e.textContent.includes(%r))"
            % text)


def shoot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_explore_annotate_and_hostile_text_in_chromium(server, browser, root):
    tiny = Backend(root / "tiny")
    first, second = tiny.instances("test")[:2]
    page = browser.new_page(viewport={"width": 1400, "height": 2600})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    # a deep link on a fresh server goes through app.py's navigation and restores the view
    page.goto(f"{server}/explore?workspace=tiny&test={quote(first.id, safe='')}&methods="
              f"{quote(','.join(METHODS))}&k={K}")
    settle(page, cards(2 * K))
    nav = page.locator("[data-testid='stSidebarNav']").inner_text()
    assert "Annotate spans" in nav and "common" not in nav
    assert page.get_by_text("Page not found").count() == 0
    assert page.locator(".sl-card").count() == 2 * K

    # choose another review: the top-K of both methods render from the store
    picker = page.get_by_role("combobox", name="Test review (16 of 16)")
    picker.click()
    picker.fill(second.id)
    page.keyboard.press("Enter")
    settle(page, cards(2 * K) + " && [...document.querySelectorAll('.sl-caption')].some(e => "
           "e.textContent.includes(arg))", second.id)
    assert quote(second.id, safe="") in page.url or second.id in page.url
    assert "label=predicted" in page.url  # the explained label is part of the view's link
    assert page.locator(".sl-probs .sl-tag-explained").count() == 1
    assert page.locator(".sl-review .sl-test-span").count() >= 1
    assert page.locator(".sl-card .sl-train-span").count() >= 2 * K - 2  # nearly every card has a span
    gauges = page.locator(".js-plotly-plot .indicatorlayer .trace")
    assert gauges.count() == 2 * len(METHODS)
    assert page.locator("text=Sag@5").count() >= 1 and page.locator("text=Lag@5").count() >= 1
    shoot(page, "explore.png")

    # annotate the first test span; it survives a reload (a new session)
    page.locator("[data-testid='stSidebarNav'] a", has_text="Annotate spans").click()
    settle(page, progress("0 of 64 spans reviewed"))
    name = page.get_by_label("Your name (saved with every verdict)")
    name.fill("browser")
    name.press("Enter")
    settle(page, "document.querySelector('.st-key-accept button') !== null")
    page.locator(".st-key-accept button").click()
    settle(page, progress("1 of 64 spans reviewed"))
    shoot(page, "annotate.png")
    page.reload()
    settle(page, progress("1 of 64 spans reviewed"))
    entry = tiny.store.current_annotations()[first.id]
    assert (entry.status, entry.annotator) == ("accept", "browser")

    # hostile text: literal, highlighted, never executed
    hostile = Backend(root / "hostile")
    for n, row in enumerate(hostile.instances("test")[:3:2]):  # "$price$ ... [too] high_ok", "<script>..."
        page.goto(f"{server}/explore?workspace=hostile&test={quote(row.id, safe='')}&methods="
                  f"{quote(','.join(METHODS))}&k={K}")
        settle(page, cards(2 * K))
        assert page.locator(".sl-review .sl-text").inner_text() == row.text
        span = row.text[row.span.start:row.span.end]
        assert "".join(page.locator(".sl-review .sl-test-span").all_inner_texts()) == span
        assert page.locator(".sl-review .sl-aspect").inner_text() == row.aspect
        assert page.locator(".sl-card").count() == 2 * K
        assert page.locator("[data-testid='stMain'] script, .sl-text img, .sl-text b").count() == 0
        assert page.locator(".katex").count() == 0  # "$...$" is not typeset
        shoot(page, f"hostile-{n}.png")
    assert dialogs == []
    page.close()
