"""Every page of the app through streamlit's AppTest, on copies of the tiny prepared workspace."""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core import catalog, jobs
from core.backend import Backend
from core.instances import (
    InstanceFilter,
    InstanceRecord,
    filter_instances,
    option_label,
)
from core.metrics import agreement, top_k_overlap
from core.registry import METHODS
from core.scoring import ScoreSettings
from core.spanfix import check_span, review_queue, snap, token_range, word_tokens
from core.spans import Span
from core.views import escape_text
from tests.builders import finished

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 900  # seconds per script run: a guard against a hang, not a speed limit (the suite must pass starved)


@pytest.fixture(autouse=True)
def navigation_only(monkeypatch) -> None:
    """Keep app.py's st.navigation in charge of every AppTest run.

    AppTest resets Streamlit's "legacy pages/ folder" flag before each run, so every run would
    start as a legacy page run and go through the rerun of ``state.start_page`` (a real server
    does that once, on its first request), losing button clicks.
    """
    from streamlit.runtime.pages_manager import PagesManager

    class NavigationPagesManager(PagesManager):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            PagesManager.uses_pages_directory = False

    monkeypatch.setattr("streamlit.testing.v1.app_test.PagesManager", NavigationPagesManager)


def copy_workspace(source: Path, root: Path, name: str) -> Path:
    """A writable copy of a prepared workspace (without its store) under ``root``."""
    target = root / name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("store.sqlite*"))
    return target


@pytest.fixture(scope="module")
def app_root(tmp_path_factory, tiny_workspace) -> Path:
    root = tmp_path_factory.mktemp("app") / "workspaces"
    copy_workspace(tiny_workspace, root, "tiny")
    return root


def app_runner(root: Path, monkeypatch, default_page: str = "pages/explore.py") -> Callable[..., AppTest]:
    """Run the app on a page with URL query parameters, workspaces under ``root``."""
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(root))

    def run(page: str = default_page, **params: str) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.query_params.update(params)
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return run


@pytest.fixture
def open_app(app_root, monkeypatch) -> Callable[..., AppTest]:
    return app_runner(app_root, monkeypatch)


def html(at: AppTest) -> list[str]:
    return [h.value for h in at.html]


def joined(at: AppTest) -> str:
    return "\n".join(html(at))


def cards(at: AppTest) -> list[str]:
    return [card for h in html(at) for card in re.findall(r'<div class="sl-card">.*?</dl></div>', h)]


def plotly_titles(at: AppTest) -> list[str]:
    titles = []
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        layout_title = spec["layout"].get("title", {}).get("text")
        gauge_titles = [d.get("title", {}).get("text") for d in spec["data"] if d.get("type") == "indicator"]
        titles += [t for t in [layout_title, *gauge_titles] if t]
    return titles


class _Marked(HTMLParser):
    def __init__(self, cls: str) -> None:
        super().__init__(convert_charrefs=True)
        self.cls, self.stack, self.out = cls, [], []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.stack.append(self.cls in (dict(attrs).get("class") or "").split())

    def handle_endtag(self, tag: str) -> None:
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if any(self.stack):
            self.out.append(data)


def marked(fragment: str, cls: str) -> str:
    """The text inside elements of class ``cls`` in an HTML fragment."""
    parser = _Marked(cls)
    parser.feed(fragment)
    return "".join(parser.out)


def backend_for(root: Path) -> Backend:
    return Backend(root)


def tagged(fragment: str) -> dict[str, list[str]]:
    """The labels block: each label with its tags (gold, predicted, explained)."""
    rows = re.findall(r'sl-prob-label">(.*?)</span>.*?<span>(.*?)</span></div>', fragment)
    return {label: re.findall(r"sl-tag-(\w+)", tags) for label, tags in rows}


def notes(at: AppTest) -> list[str]:
    """The method headings' notes (dimension, explained label, time), in order."""
    return [unescape(n) for h in html(at) for n in re.findall(r'sl-method-note">(.*?)</span>', h)]


# ----------------------------------------------------------------------------- Explore

def test_explore_shows_review_cards_gauges_and_curves(open_app, app_root):
    backend = backend_for(app_root / "tiny")
    wrong = [r for r in backend.instances("test") if r.pred != r.label]
    assert wrong  # a misclassified review: its predicted and gold labels differ
    test_row = wrong[0]
    at = open_app(test=test_row.id, methods="TracIn++,IF", k="3")
    body = joined(at)
    # the review with its aspect and test span, gold vs predicted with probabilities
    span, aspect = test_row.span, test_row.aspect_offsets()
    review = [h for h in html(at) if 'class="sl-review"' in h][0]
    assert marked(review, "sl-test-span") == test_row.text[span.start:span.end]
    assert aspect is not None and marked(review, "sl-aspect") == test_row.text[aspect[0]:aspect[1]]
    assert "sl-tag-gold" in body and "sl-tag-predicted" in body
    # by default the explanations explain the predicted label
    labels = [tagged(h) for h in html(at) if 'class="sl-probs"' in h][0]
    assert "gold" in labels[test_row.label] and "predicted" in labels[test_row.pred]
    assert [label for label, tags in labels.items() if "explained" in tags] == [test_row.pred]
    assert at.radio(key="w_label").value == "predicted"
    assert len(notes(at)) == 2 and all(f"explains {test_row.pred}" in n for n in notes(at))
    assert at.selectbox(key="w_test").value == test_row.id
    assert at.multiselect(key="w_methods").value == ["TracIn++", "IF"]
    assert at.slider(key="w_k").value == 3
    # three cards per method, each a training instance with its training span and label
    shown = cards(at)
    assert len(shown) == 6
    assert all("sl-train-span" in c and re.search(r'sl-label">(negative|neutral|positive)<', c) for c in shown)
    assert sum("test span" in c for c in shown) == 3  # only TracIn++ (a ++ method) shows the test span
    top = backend.explain(test_row.id, "TracIn++", k=3).top
    for hit, card in zip(top, shown[:3]):
        assert f'#{hit.rank}</span>' in card and backend.by_id[hit.train_id].aspect[:3] in card
    # Sag/Lag gauges and a K-curve for each method; the score histogram on request
    titles = plotly_titles(at)
    assert titles.count("Sag@3") == 2 and titles.count("Lag@3") == 2 and titles.count("Sag@K") == 2
    at.button_group(key="chart_TracIn++").set_value("Scores")
    at.button_group(key="chart_IF").set_value("Lag@K").run()
    titles = plotly_titles(at)
    assert "TracIn++ scores, top 3 marked" in titles and titles.count("Lag@K") == 1
    histogram = [json.loads(c.proto.spec) for c in at.get("plotly_chart")
                 if "scores, top" in json.dumps(json.loads(c.proto.spec)["layout"].get("title", {}))][0]
    assert len(histogram["data"][0]["x"]) == len(backend.train_ids)  # every training score
    assert at.query_params["test"] == test_row.id and at.query_params["k"] == "3"
    assert at.query_params["label"] == "predicted"

    # a widget change reruns from the store, and the cards follow K
    at.slider(key="w_k").set_value(5)
    at.run()
    assert len(cards(at)) == 10
    at.toggle(key="explore_opponents").set_value(True).run()
    assert len(cards(at)) == 20
    at.toggle(key="explore_opponents").set_value(False).run()

    # the label radio: explain the gold label instead; kept in the URL
    at.radio(key="w_label").set_value("gold").run()
    assert not at.exception and at.query_params["label"] == "gold"
    labels = [tagged(h) for h in html(at) if 'class="sl-probs"' in h][0]
    assert [label for label, tags in labels.items() if "explained" in tags] == [test_row.label]
    assert all(f"explains {test_row.label}" in n for n in notes(at))
    gold_top = backend.explain(backend.test_input(test_row.id, "gold"), "TracIn++", k=5).top
    for hit, card in zip(gold_top, cards(at)[:5]):
        assert f'#{hit.rank}</span> <span class="sl-score">{hit.score:.4g}</span>' in card
    # a link with the label reproduces the view
    again = open_app(test=test_row.id, methods="TracIn++", k="2", label="gold")
    assert again.radio(key="w_label").value == "gold" and all(f"explains {test_row.label}" in n for n in notes(again))


def test_explore_filters_narrow_the_picker(open_app):
    at = open_app()
    tests = at.selectbox(key="w_test")
    assert "(16 of 16)" in tests.label
    at.selectbox(key="explore_outcome").set_value("wrong").run()
    wrong = len(at.selectbox(key="w_test").options)
    at.selectbox(key="explore_outcome").set_value("correct").run()
    assert wrong + len(at.selectbox(key="w_test").options) == 16
    at.selectbox(key="explore_outcome").set_value(None).run()
    first = at.selectbox(key="w_test").options[0]
    word = max(first.split(" · ")[1].split("  [")[0].rstrip("…").split()[:-1], key=len)
    at.text_input(key="explore_q").set_value(word).run()
    options = at.selectbox(key="w_test").options
    assert first in options and len(options) < 16
    at.text_input(key="explore_q").set_value("no review says zzqx").run()
    assert any("No test instance matches" in w.value for w in at.warning)


def test_explore_a_new_review(open_app):
    at = open_app(methods="TracIn++", k="2")
    at.radio(key="explore_mode").set_value("New review").run()
    assert at.info and "Type a review" in at.info[0].value
    assert at.radio(key="w_label").disabled  # a new review has no gold label: its prediction is explained
    at.text_area(key="new_text").set_value("The soup was cold, but the waiter was friendly.")
    at.text_input(key="new_aspect").set_value("waiter")
    [b for b in at.form_submit_button if b.label == "Explain"][0].click().run()
    assert not at.exception
    review = [h for h in html(at) if 'class="sl-review"' in h][0]
    assert marked(review, "sl-test-span") == "the waiter was friendly" and marked(review, "sl-aspect") == "waiter"
    assert len(cards(at)) == 2
    assert "Sag@2" in plotly_titles(at)


# ----------------------------------------------------------------------------- Compare

def test_compare_side_by_side_with_overlap_and_correlation(open_app, app_root):
    backend = backend_for(app_root / "tiny")
    test_row = backend.instances("test")[0]
    test_id = test_row.id
    at = open_app("pages/compare.py", test=test_id, methods="IF++,TracIn++,TracInF", k="4")
    assert [h for h in html(at) if 'class="sl-method"' in h].__len__() == 3
    for method in ("IF++", "TracIn++", "TracInF"):  # each heading in the registry's colour
        assert any(f'border-color:{METHODS.resolve(method).colour}' in h and f"</span>{method}" in unescape(h)
                   for h in html(at))
    labels = [tagged(h) for h in html(at) if 'class="sl-probs"' in h][0]
    assert [label for label, tags in labels.items() if "explained" in tags] == [test_row.pred]
    assert at.radio(key="w_label").value == "predicted"
    assert len(cards(at)) == 12
    overlap, rho = at.dataframe[0].value, at.dataframe[1].value
    assert list(overlap.columns) == ["IF++", "TracIn++", "TracInF"]
    assert all(overlap.loc[m, m] == 1.0 for m in overlap.columns)
    assert all(abs(rho.loc[m, m] - 1.0) < 1e-9 for m in rho.columns)
    tops = {m: [h.train_id for h in backend.explain(test_id, m, k=4).top] for m in ("IF++", "TracInF")}
    assert overlap.loc["IF++", "TracInF"] == len(set(tops["IF++"]) & set(tops["TracInF"])) / 4
    titles = plotly_titles(at)
    assert titles.count("Sag@4") == 3 and "Sag@K" in titles and "Lag@K" in titles
    assert any("No evaluation report" in c.value for c in at.caption)
    # one method is not a comparison
    at.multiselect(key="w_methods").set_value(["IF++"]).run()
    assert any("two to four" in i.value for i in at.info)
    at.radio(key="w_label").set_value("gold").run()
    assert at.query_params["label"] == "gold"
    labels = [tagged(h) for h in html(at) if 'class="sl-probs"' in h][0]
    assert [label for label, tags in labels.items() if "explained" in tags] == [test_row.label]


# ----------------------------------------------------------------------------- Case studies

def test_save_a_case_study_and_list_it(open_app, app_root):
    backend = backend_for(app_root / "tiny")
    test_row = [r for r in backend.instances("test") if r.pred != r.label][-1]  # misclassified: gold != predicted
    test_id = test_row.id
    at = open_app(test=test_id, methods="TracIn++,IF++", k="2", label="gold")  # explaining the gold label
    form_inputs = [t for t in at.text_input if t.label == "Title"]
    form_inputs[0].set_value("Helpful neighbours")
    [t for t in at.text_area if t.label == "Note"][0].set_value("the ++ methods agree")
    [b for b in at.form_submit_button if b.label == "Save case study"][0].click().run()
    assert any("Saved as case study" in s.value for s in at.success)
    cases = backend.store.list_cases()
    assert cases[0].title == "Helpful neighbours" and cases[0].methods == ["TracIn++", "IF++"]
    assert set(cases[0].snapshot["methods"]) == {"TracIn++", "IF++"}
    snap_test = cases[0].snapshot["test"]
    assert (snap_test["id"], snap_test["label"], snap_test["pred"]) == (test_id, test_row.label, test_row.pred)
    assert snap_test["explained"] == test_row.label and snap_test["span"] == list(test_row.span_pair)
    gold_top = backend.explain(backend.test_input(test_id, "gold"), "TracIn++", k=1).top[0]
    assert cases[0].snapshot["methods"]["TracIn++"]["top"][0]["id"] == gold_top.train_id

    at = open_app("pages/cases.py")
    body = joined(at)
    assert "Helpful neighbours" in unescape(body) and "the ++ methods agree" in unescape(body)
    assert body.count('class="sl-case-cell"') == 2 and "sl-test-span" in body and "sl-train-span" in body
    assert f"predicted {test_row.pred} · explained {test_row.label}" in unescape(body)
    assert any(b.label.startswith("Export all") for b in at.get("download_button"))

    # open the case in Explore: the same review, methods, K and explained label
    at.button(key=f"open_{cases[0].id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="w_test").value == test_id and at.multiselect(key="w_methods").value == ["TracIn++", "IF++"]
    assert at.slider(key="w_k").value == 2 and at.radio(key="w_label").value == "gold"
    assert all(f"explains {test_row.label}" in n for n in notes(at)) and len(cards(at)) == 4


# ----------------------------------------------------------------------------- Annotate

@pytest.fixture
def annotate_app(tmp_path, tiny_workspace, monkeypatch) -> tuple[Callable[..., AppTest], Path]:
    root = tmp_path / "workspaces"
    ws = copy_workspace(tiny_workspace, root, "tiny")
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(root))

    def run(**params: str) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.query_params.update(params)
        at.switch_page("pages/annotate.py")
        return at.run()

    return run, ws


def test_annotate_accept_fix_undo_and_cache_invalidation(annotate_app):
    run, ws = annotate_app
    backend = backend_for(ws)
    tests = backend.instances("test")
    first, second = tests[0], tests[1]
    at = run()
    assert any("Enter your name" in i.value for i in at.info)
    assert "0 of 64 spans reviewed" in at.get("progress")[0].proto.text
    at.text_input(key="w_annotator").set_value("ada").run()
    assert first.id in joined(at)

    at.button(key="accept").click().run()
    entry = backend.store.current_annotations()[first.id]
    assert (entry.status, entry.annotator) == ("accept", "ada")
    assert (entry.original_start, entry.original_end) == (first.detected.start, first.detected.end)
    assert backend.by_id[first.id].verdict == "accept" and backend.by_id[first.id].span == first.detected
    assert "1 of 64 spans reviewed" in at.get("progress")[0].proto.text
    assert second.id in joined(at)  # moved on to the next unreviewed span

    # a cached explanation of the second test instance, then a fix of its span
    backend.explain(second.id, "TracIn++", k=3)
    cached_key = _settings(backend, second.id)
    assert backend.store.get_result(backend.fingerprint, "TracIn++", cached_key, second.id) is not None
    words = word_tokens(second.text)
    at.selectbox(key=f"first_{second.id}").set_value(0)
    at.selectbox(key=f"last_{second.id}").set_value(2).run()
    preview = [h for h in html(at) if "Preview" in h][0]
    assert marked(preview, "sl-test-span") == second.text[:words[2][1]]
    at.button(key="save_fix").click().run()
    fix = backend.store.current_annotations()[second.id]
    assert (fix.status, fix.corrected_start, fix.corrected_end) == ("fix", 0, words[2][1])
    assert backend.test_input(second.id).span == (0, words[2][1])
    assert backend.by_id[second.id].span_source == "corrected" and backend.by_id[second.id].detected == second.detected
    assert backend.store.get_result(backend.fingerprint, "TracIn++", cached_key, second.id) is None

    # undo takes back ada's latest verdict (the fix) and returns to that instance
    at.button(key="undo").click().run()
    assert backend.store.current_annotations().get(second.id) is None
    assert backend.by_id[second.id].span == second.detected
    assert second.id in joined(at)

    # character-level override
    at.toggle(key=f"chars_{second.id}").set_value(True).run()
    at.number_input(key=f"start_{second.id}").set_value(1)
    at.number_input(key=f"end_{second.id}").set_value(4).run()
    at.button(key="save_fix").click().run()
    assert backend.by_id[second.id].span_pair == (1, 4)

    # a training span marked wrong drops the results that used training spans
    at.selectbox(key="w_annotate_queue").set_value("Training only").run()
    train = backend.instances("train")
    train_id = train[0].id
    backend.store.put_result("fp", "TracIn+", {}, "t", {"x": 1}, depends_on_train_spans=True)
    at.button(key="wrong").click().run()
    assert backend.store.current_annotations()[train_id].status == "wrong"
    assert backend.store.get_result("fp", "TracIn+", {}, "t") is None
    assert any("patched into the gradient index at once" in c.value for c in at.caption)

    # a training span fix: patched into the index at once, shown (and used) on Explore at once
    fixed_id = train[1].id
    assert fixed_id in joined(at)
    tokens = word_tokens(train[1].text)
    at.selectbox(key=f"first_{fixed_id}").set_value(0)
    at.selectbox(key=f"last_{fixed_id}").set_value(1).run()
    at.button(key="save_fix").click().run()
    fixed = (0, tokens[1][1])
    assert backend.by_id[fixed_id].span_pair == fixed and backend.by_id[fixed_id].span_source == "corrected"
    assert backend.index.spans_match({fixed_id: fixed})
    explore = AppTest.from_file(APP, default_timeout=TIMEOUT)
    explore.query_params.update(test=first.id, methods="TracIn++", k=str(len(backend.train_ids)))
    explore.switch_page("pages/explore.py").run()
    assert not explore.exception, [e.value for e in explore.exception]
    shown = [c for c in cards(explore) if f"<dd>{escape_text(fixed_id)}</dd>" in c]
    assert len(shown) == 1 and "the index uses the corrected span" in shown[0]
    assert marked(shown[0], "sl-train-span") == train[1].text[fixed[0]:fixed[1]]
    marked_wrong = [c for c in cards(explore) if f"<dd>{escape_text(train_id)}</dd>" in c]
    assert len(marked_wrong) == 1 and "span marked wrong by an annotator" in marked_wrong[0]


def test_annotations_import_from_an_export(annotate_app, tmp_path):
    run, ws = annotate_app
    backend = backend_for(ws)
    test_id, train_id = backend.instances("test")[3].id, backend.instances("train")[0].id
    backend.annotate_span(test_id, "fix", "carl", (0, 5))
    backend.annotate_span(train_id, "wrong", "carl", None)
    export = tmp_path / "export.jsonl"
    backend.store.export_jsonl(export)
    backend.undo_span_annotation("carl")
    backend.undo_span_annotation("carl")
    backend.explain(test_id, "TracIn++", k=3)
    cached_key = _settings(backend, test_id)
    assert backend.store.get_result(backend.fingerprint, "TracIn++", cached_key, test_id) is not None
    at = run()
    at.text_input(key="w_annotator").set_value("ada").run()
    assert any(b.label == "Export all annotations" for b in at.get("download_button"))
    at.file_uploader(key="import_file").set_value(("bad.jsonl", b'{"status": "maybe"}\n', "application/jsonl"))
    at.run()
    at.button(key="import").click().run()
    assert any("Nothing imported" in e.value for e in at.error) and "line 1" in at.code[0].value
    at.file_uploader(key="import_file").set_value(("export.jsonl", export.read_bytes(), "application/jsonl"))
    at.run()
    at.button(key="import").click().run()
    assert any("Imported 2 verdicts" in s.value for s in at.success)
    current = backend.store.current_annotations()
    assert current[test_id].status == "fix" and current[train_id].status == "wrong"
    assert backend.test_input(test_id).span == (0, 5)
    assert backend.store.get_result(backend.fingerprint, "TracIn++", cached_key, test_id) is None


def _settings(backend: Backend, test_id: str) -> dict:
    """The cache-key settings of Backend.explain for a dataset test instance and TracIn++ (its span now)."""
    return backend.result_settings(backend.test_input(test_id), METHODS.resolve("TracIn++"), ScoreSettings())


def test_annotations_survive_a_new_session_and_two_annotators(annotate_app):
    run, ws = annotate_app
    backend = backend_for(ws)
    first = backend.instances("test")[0].id
    one, two = run(), run()
    one.text_input(key="w_annotator").set_value("ada").run()
    two.text_input(key="w_annotator").set_value("bob").run()
    one.button(key="accept").click().run()
    two.button(key="wrong").click().run()  # bob saw the same first item before ada's verdict
    history = backend.store.history(first)
    assert [(h.annotator, h.status) for h in history] == [("ada", "accept"), ("bob", "wrong")]
    again = run(item=first)
    assert "Current verdict: **wrong**" in " ".join(c.value for c in again.caption)


# ----------------------------------------------------------------------------- Evaluate

def test_evaluate_runs_a_subset_and_shows_the_report(tmp_path, tiny_workspace, monkeypatch):
    root = tmp_path / "workspaces"
    ws = copy_workspace(tiny_workspace, root, "tiny")
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(root))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("pages/evaluate.py").run()
    assert any("python -m core evaluate" in c.value for c in at.code)
    at.multiselect(key="eval_methods").set_value(["IF++", "TracIn++"])
    at.number_input(key="eval_limit").set_value(4)
    at.multiselect(key="eval_ks").set_value([5])
    at.form_submit_button[0].click().run()
    finished(jobs.job_for("evaluate", ws))
    at.run()
    table = at.dataframe[0].value
    assert list(table.columns) == ["IF++", "TracIn++", "random"] and list(table.index) == ["Sag@5", "Lag@5"]
    assert {"Sag@K v. K on 4 test instances", "Lag@K v. K on 4 test instances"} <= set(plotly_titles(at))
    # each cell with its interval, and a paired test of two chosen methods read as a - b
    ci = next(d.value for d in at.dataframe if list(d.value.columns) == ["IF++", "TracIn++"])
    assert list(ci.index) == ["Sag@5", "Lag@5"]
    assert ci.loc["Lag@5", "TracIn++"].startswith(f"{table.loc['Lag@5', 'TracIn++']:.2f} [")
    per_test = next(d.value for d in at.dataframe if "test_id" in d.value.columns)
    wide = per_test.pivot(index="test_id", columns="method", values="sag@5")

    def paired(a: str, b: str) -> pd.DataFrame:
        at.selectbox(key="pair_t3_a").set_value(a).run()
        at.selectbox(key="pair_t3_b").set_value(b).run()
        return next(d.value for d in at.dataframe if "a - b" in d.value.columns)

    forward, backward = paired("TracIn++", "IF++"), paired("IF++", "TracIn++")
    assert list(forward.index) == ["Sag@5", "Lag@5"]
    assert forward.loc["Sag@5", "a - b"] == pytest.approx(100 * (wide["TracIn++"] - wide["IF++"]).mean())
    assert forward["a - b"].tolist() == pytest.approx((-backward["a - b"]).tolist())
    assert forward["95% CI low"].tolist() == pytest.approx((-backward["95% CI high"]).tolist())
    assert (forward["p"] == backward["p"]).all() and (forward["tests"] == 4).all()
    at.switch_page("pages/compare.py").run()
    assert any(list(d.value.index) == ["Sag@5", "Lag@5"] for d in at.dataframe)


# ----------------------------------------------------------------------------- Workspaces

def write_reviews(path: Path) -> Path:
    """A small JSONL data set (40 instances over three splits)."""
    foods = ["pasta", "pizza", "soup", "salad", "steak"]
    moods = [("great", "positive"), ("awful", "negative"), ("fine", "neutral"), ("cold", "negative")]
    rows = []
    for n in range(40):
        food, (word, label) = foods[n % 5], moods[n % 4]
        text = f"The {food} was {word} and the room number {n} was quiet."
        split = "train" if n < 28 else "dev" if n < 34 else "test"
        rows.append({"text": text, "aspect": food, "label": label, "split": split})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_workspaces_lists_shows_manifest_and_creates_one(tmp_path, tiny_workspace, tiny_backbone, monkeypatch):
    root = tmp_path / "workspaces"
    copy_workspace(tiny_workspace, root, "tiny")
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(root))
    monkeypatch.setenv("SPANLENS_DATA_ROOTS", str(tmp_path))  # the data below lies under tmp_path
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("pages/workspaces.py").run()
    listing = at.dataframe[0].value
    assert listing.loc[0, "workspace"] == "tiny" and listing.loc[0, "status"] == "ready"
    assert (listing.loc[0, "train"], listing.loc[0, "dev"], listing.loc[0, "test"]) == (48, 16, 16)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["train instances"] == "48" and metrics["test accuracy"] != "–" and "MiB" in metrics["index size"]

    # a named data set whose files are missing: say how to fetch it
    at.text_input(key="new_name").set_value("broken")
    at.text_input(key="new_data_dir").set_value(str(tmp_path / "nodata"))
    at.form_submit_button[0].click().run()
    assert any("Data not found" in e.value for e in at.error)
    assert any("python -m core fetch-data --dest DIR" in c.value for c in at.code)
    at.text_input(key="new_name").set_value("tiny")
    at.form_submit_button[0].click().run()
    assert any("already exists" in e.value for e in at.error)

    # create one from a file with the tiny backbone: a background job with live progress
    data = write_reviews(tmp_path / "reviews.jsonl")
    at.radio(key="new_dataset").set_value("file").run()
    at.text_input(key="new_name").set_value("mine")
    at.text_input(key="new_path").set_value(str(data))
    at.text_input(key="new_backbone").set_value(str(tiny_backbone))
    at.selectbox(key="new_size").set_value("tiny slice")
    at.number_input(key="new_proj").set_value(4)
    at.form_submit_button[0].click().run()
    job = jobs.job_for("prepare", root / "mine")
    assert job is not None
    assert at.selectbox(key="w_workspace").value == "mine"
    status = at.get("status")[0].proto
    assert status.label.startswith(("Building mine", "mine is ready"))
    assert status.state == status.State.RUNNING or job.state != "running"
    finished(job)
    assert any(line.startswith("[index] built") for line in job.lines) and job.fraction == 1.0
    assert job.stage == "index" and job.error is None  # progress from the build's callbacks, to its last stage
    at.run()
    listing = at.dataframe[0].value.set_index("workspace")
    assert listing.loc["mine", "status"] == "ready" and listing.loc["mine", "train"] == 28
    assert (root / "mine" / catalog.REQUEST_FILE).exists()


def test_an_interrupted_workspace_offers_to_resume(tmp_path, tiny_workspace, monkeypatch):
    root = tmp_path / "workspaces"
    ws = copy_workspace(tiny_workspace, root, "half")
    shutil.rmtree(ws / "index")
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(root))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("pages/workspaces.py").run()
    assert at.dataframe[0].value.loc[0, "status"] == "needs index"
    assert any("Resuming continues from the last finished stage" in w.value for w in at.warning)
    assert at.button(key="resume")
    at.switch_page("pages/explore.py").run()
    assert any("not ready" in w.value for w in at.warning)


def test_an_edited_instances_file_is_an_error_naming_it_not_wrong_results(tmp_path, tiny_workspace, monkeypatch):
    root = tmp_path / "workspaces"
    ws = copy_workspace(tiny_workspace, root, "edited")
    lines = (ws / "instances.jsonl").read_text().splitlines()
    (ws / "instances.jsonl").write_text("\n".join(reversed(lines)) + "\n")  # the training rows reordered
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(root))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("pages/explore.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("instances.jsonl: its" in e.value and "restore it as prepare wrote it" in e.value for e in at.error)
    assert not at.get("plotly_chart") and not at.get("arrow_data_frame"), "no explanation is shown"


def test_no_workspace_says_where_to_start(tmp_path, monkeypatch):
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(tmp_path / "empty"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()  # the landing page: Workspaces
    assert any("No workspace yet" in i.value for i in at.info) and at.get("form")
    assert any("create one on the Workspaces page" in c.value for c in at.sidebar.caption)
    at.switch_page("pages/explore.py").run()
    assert any("Pick a workspace" in i.value for i in at.info)


# ----------------------------------------------------------------------------- pure helpers (core.spanfix, core.instances, core.metrics)

def test_word_tokens_snap_and_span_checks():
    text = "Pizza 🍕 was $5, *great*!"
    tokens = word_tokens(text)
    assert [text[a:b] for a, b in tokens] == ["Pizza", "🍕", "was", "$", "5", ",", "*", "great", "*", "!"]
    assert snap(tokens, 7, 2) == (tokens[2][0], tokens[7][1])
    assert token_range(tokens, (8, 12)) == (2, 2) and token_range(tokens, (8, 13)) == (2, 3)
    assert check_span(text, 3, 3) and check_span(text, 0, 99) and check_span(text, 5, 6)
    assert check_span(text, 0, 5) is None


def test_filters_queue_and_agreement():
    verdicts = {"t1": "accept", "t2": "fix"}
    records = []
    for i in range(6):
        detected = Span(0, 4, "heuristic")
        span = Span(1, 5, "manual") if verdicts.get(f"t{i}") == "fix" else detected
        records.append(InstanceRecord(f"t{i}", "test" if i < 3 else "train", f"text {i}", "a" if i % 2 else "b",
                                      "positive", span, detected, verdicts.get(f"t{i}"),
                                      "positive" if i else "negative"))
    assert [r.id for r in filter_instances(records, InstanceFilter(outcome="wrong"))] == ["t0"]
    assert len(filter_instances(records, InstanceFilter(query="TEXT 1", aspect="a"))) == 1
    assert [r.id for r in filter_instances(records, InstanceFilter(predicted="negative"))] == ["t0"]
    fixed = filter_instances(records, InstanceFilter(source="corrected"))
    assert [r.id for r in fixed] == ["t2"] and fixed[0].span_pair == (1, 5) and fixed[0].detected.source == "heuristic"
    assert len(filter_instances(records, InstanceFilter(source="heuristic"))) == 5
    queue = review_queue(list(reversed(records)), ["test", "train"], unreviewed_only=True)
    assert [r.id for r in queue] == ["t0", "t5", "t4", "t3"]
    everything = review_queue(list(reversed(records)), ["test", "train"], unreviewed_only=False)
    assert [r.id for r in everything] == ["t2", "t1", "t0", "t5", "t4", "t3"]
    assert option_label(records[1]) == "a · text 1"
    assert records[0].test_input().label == "negative" and records[0].test_input("gold").label == "positive"
    agree = agreement([2, 0, 1], [0.0, 0.5, 1.0], ["x", "y", "x"], "x", 3)
    assert agree.sag == [1.0, 0.5, 0.5] and agree.lag == [1.0, 1.0, 2 / 3]
    assert agree.at(2)["lag_random"] == pytest.approx(2 / 3) and agree.at(2)["sag_random"] == pytest.approx(0.5)
    assert top_k_overlap(["a", "b", "c"], ["c", "a", "d"], 2) == 0.5
