"""Bring your own classifier in a real browser: a tiny model fine-tuned by ``transformers.Trainer``
(two checkpoints) is imported from the Workspaces page's "Import a fine-tuned model" form in
Chromium, built in the background, and a test instance is explained on Explore.

Uses test_browser's server and Chromium (the Debian ``chromium`` package; never downloaded).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from core.backend import Backend
from tests.test_browser import browser, cards, serve, settle, shoot  # noqa: F401  (browser: a fixture)
from tests.test_byom import fine_tuned

BUILD_TIMEOUT = 600_000  # ms: the import and its index, on a busy machine
METHODS = ["TracIn", "TracIn++"]  # TracIn: the Trainer's checkpoints
K = 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A data root holding a tiny fine-tuned single-text classifier (model/) and its data."""
    root = tmp_path_factory.mktemp("import-data")
    fine_tuned("bert", root / "model", "single")
    return root


def fill(page, key: str, value: str) -> None:
    """Type into the input of the widget with this key and leave it (so the form holds the value)."""
    field = page.locator(f".st-key-{key} input")
    field.fill(value)
    field.press("Tab")


def test_import_a_model_folder_and_explain_in_chromium(browser, data_root, tmp_path):  # noqa: F811
    root = tmp_path / "workspaces"
    root.mkdir()
    with serve(root, SPANLENS_DATA_ROOTS=str(data_root)) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{url}/workspaces?methods={','.join(METHODS).replace('+', '%2B')}&k={K}")
        settle(page, "document.querySelector('.st-key-imp_name input') !== null")

        fill(page, "imp_name", "mine")
        fill(page, "imp_model", str(data_root / "model"))
        fill(page, "imp_path", str(data_root / "bert.jsonl"))
        fill(page, "imp_layers", "1")
        fill(page, "imp_proj", "16")
        page.get_by_role("button", name="Import and build").click()

        # the build runs in the background; the page follows it, then reruns once it has ended and
        # shows the new workspace's manifest
        settle(page, "['Imported from ', 'Building mine failed'].some(t => document.body.innerText.includes(t))",
               timeout=BUILD_TIMEOUT)
        body = page.locator("[data-testid='stMain']").inner_text()
        assert "Building mine failed" not in body, body
        assert f"Imported from {(data_root / 'model').resolve()}: nothing retrained" in body
        assert "Checkpoints for TracIn, Control and TRAK: step 2" in body
        assert "Spans: the importance rule (paper Eq. 3)" in body
        shoot(page, "import.png")

        # Explore in the same session: the picked workspace, its first test instance explained
        test = Backend(root / "mine").instances("test")[0]
        page.locator("[data-testid='stSidebarNav'] a", has_text="Explore").click()
        settle(page, cards(len(METHODS) * K), timeout=BUILD_TIMEOUT)
        assert page.locator(".sl-review .sl-text").inner_text() == test.text
        assert page.locator(".sl-review .sl-test-span").count() >= 1
        main = page.locator("[data-testid='stMain']").inner_text()
        assert f"Id {test.id}." in main and "Spans in this workspace: the importance rule" in main
        headings = page.locator(".sl-method").all_inner_texts()  # an unavailable method would have none
        assert [h.split()[0] for h in headings] == METHODS, headings
        shoot(page, "import-explore.png")
        assert dialogs == []
        page.close()
