"""Tests for core.spans: the clause heuristic, RC answers, importance choice and statistics."""
from __future__ import annotations

import os
import random
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.data import Instance  # noqa: E402
from core.spans import (  # noqa: E402
    RC_TEMPLATES,
    SPAN_SOURCES,
    WHOLE_TEXT_COVERAGE,
    RCSpanFinder,
    Span,
    candidate_chunks,
    choose_by_importance,
    clause_span,
    detect_spans,
    rc_failed,
    refine_by_importance,
    span_stats,
)

PAPER = (
    "the service was impeccable, the menu traditional but inventive and presentation for the most "
    "part excellent but the food itself came up short."
)


def mention(text: str, aspect: str, nth: int = 0) -> tuple[int, int]:
    start = -1
    for _ in range(nth + 1):
        start = text.index(aspect, start + 1)
    return start, start + len(aspect)


def clause(text: str, aspect: str) -> str:
    start, end = clause_span(text, *mention(text, aspect))
    return text[start:end]


def inst(id_: str, text: str, aspect: str, label: str = "positive", offsets: bool = True) -> Instance:
    start, end = mention(text, aspect) if offsets else (None, None)
    return Instance(id_, "train", text, aspect, label, start, end)


# ------------------------------------------------------------------------------ basics


def test_span_records_offsets_source_and_rejects_bad_values() -> None:
    span = Span(4, 11, "heuristic")
    assert span.text_of(PAPER) == "service"
    assert set(SPAN_SOURCES) == {"rc", "heuristic", "importance", "manual", "whole"}
    with pytest.raises(ValueError):
        Span(0, 3, "guess")
    with pytest.raises(ValueError):
        Span(5, 5, "rc")


def test_rc_templates_are_the_papers_eleven() -> None:
    assert len(RC_TEMPLATES) == 11 == len(set(RC_TEMPLATES))
    assert RC_TEMPLATES[0] == "How is the X?" and RC_TEMPLATES[-1] == "What did the X do?"
    assert "What do you think about the X?" in RC_TEMPLATES
    assert all(t.count("X") == 1 for t in RC_TEMPLATES)


# ---------------------------------------------------------------------------- heuristic


def test_paper_example_gives_each_aspect_its_own_clause() -> None:
    assert clause(PAPER, "service") == "the service was impeccable"
    assert clause(PAPER, "menu") == "the menu traditional"
    assert clause(PAPER, "food") == "the food itself came up short"


@pytest.mark.parametrize(
    ("text", "aspect", "expected"),
    [
        ("The decor is not special at all but their food and amazing prices make up for it.", "decor",
         "The decor is not special at all"),
        ("The decor is not special at all but their food and amazing prices make up for it.", "food",
         "their food and amazing prices make up for it"),
        ("service is good although a bit in your face, we were asked every five mins if food was ok, "
         "but better that than being ignored.", "service", "service is good"),
        ("service is good although a bit in your face, we were asked every five mins if food was ok, "
         "but better that than being ignored.", "food", "food was ok"),
        ("We loved the pasta and the waiter was rude.", "pasta", "We loved the pasta"),
        ("We loved the pasta and the waiter was rude.", "waiter", "the waiter was rude"),
        # a bare "and" joins noun phrases: no boundary
        ("The food and drinks were great; the music too loud.", "food", "The food and drinks were great"),
        # a clause with nothing but the aspect grows to the next one ...
        ("Great prices. The staff, however, was rude and slow!", "staff", "The staff, however, was rude and slow"),
        # ... across the weaker (phrase) boundary first
        ("Cheap beer, but I was disappointed with the food.", "food", "I was disappointed with the food"),
        ("Noisy room (the drinks were watered down) yet friendly bartenders.", "drinks", "the drinks were watered down"),
        ("Noisy room -- the drinks were watered down -- yet friendly bartenders.", "bartenders", "friendly bartenders"),
        ("It rained. The pizza was cold. We left.", "pizza", "The pizza was cold"),
        # "and"/"or" left at either end is stripped
        ("We asked what kind of wine they had and since nobody knew, we left.", "wine", "We asked what kind of wine they had"),
        ("We ordered wings, and salad was fresh.", "salad", "salad was fresh"),
    ],
)
def test_clause_span_on_mams_like_sentences(text: str, aspect: str, expected: str) -> None:
    assert clause(text, aspect) == expected


@pytest.mark.parametrize(
    ("text", "aspects"),
    [
        (PAPER, ["service", "menu", "food"]),
        ("The waiter was friendly, but the steak was overcooked and the wine too warm.", ["waiter", "steak", "wine"]),
        ("Our server was attentive although the kitchen was slow; the dessert, however, made up for it.",
         ["server", "kitchen", "dessert"]),
        ("when tables opened up, the manager sat another party before us.", ["tables", "manager"]),
    ],
)
def test_clause_spans_do_not_cross_into_another_aspects_clause(text: str, aspects: list[str]) -> None:
    spans = {a: clause_span(text, *mention(text, a)) for a in aspects}
    for a, (start, end) in spans.items():
        assert start <= mention(text, a)[0] and mention(text, a)[1] <= end
        for other in aspects:
            if other != a:
                o_start, o_end = mention(text, other)
                assert o_end <= start or end <= o_start, (a, other, text[start:end])


def test_clause_span_is_never_empty_contains_the_mention_and_is_stripped() -> None:
    rng = random.Random(0)
    words = ["the", "food", "was", "good", "but", "and", "service", "however", "with", "we", "slow", "I", "for"]
    puncts = [",", ".", ";", " --", " (", ")", "!", ":", " -", "..."]
    for _ in range(400):
        tokens = [rng.choice(words) + (rng.choice(puncts) if rng.random() < 0.3 else "") for _ in range(rng.randint(1, 14))]
        text = " ".join(tokens)
        k = rng.randrange(len(tokens))
        start = len(" ".join(tokens[:k])) + (1 if k else 0)
        end = start + len(tokens[k].rstrip(string.punctuation + " ")) or start + 1
        s, e = clause_span(text, start, end)
        assert 0 <= s <= start < end <= e <= len(text), (text, start, end, s, e)
        assert text[s:e].strip(string.punctuation + string.whitespace) or s == start
        assert s == start or text[s] not in string.punctuation + string.whitespace
        assert e == end or text[e - 1] not in string.punctuation + string.whitespace
    assert clause_span("(food)", 1, 5) == (1, 5)
    with pytest.raises(ValueError):
        clause_span("   ", None, None, "food")


def test_clause_span_without_offsets_finds_the_aspect_or_returns_the_whole_text() -> None:
    text = "Great beer, but the PIZZA was soggy."
    assert text[slice(*clause_span(text, None, None, "pizza"))] == "the PIZZA was soggy"
    # "bar" is looked up as a whole word first, not inside "barely"
    text = "We barely ate; the bar was loud."
    assert text[slice(*clause_span(text, None, None, "bar"))] == "the bar was loud"
    assert clause_span("  I love it!  ", None, None, "pizza") == (2, 11)


def test_candidate_chunks_are_few_nested_and_stay_in_the_sentence() -> None:
    text = "It was late. " + PAPER + " We left."
    start, end = mention(text, "menu")
    chunks = candidate_chunks(text, start, end)
    assert 2 <= len(chunks) <= 4 and len(set(chunks)) == len(chunks)
    assert chunks[0] == clause_span(text, start, end)
    assert [c[1] - c[0] for c in chunks] == sorted(c[1] - c[0] for c in chunks)
    assert all(s <= start and end <= e for s, e in chunks)
    assert text[slice(*chunks[-1])] == PAPER.rstrip(".")  # the sentence, not the whole text
    texts = [text[s:e] for s, e in chunks]
    assert "the service was impeccable, the menu traditional" in texts
    assert candidate_chunks("Nice.", None, None, "pizza") == [(0, 4)]


# ---------------------------------------------------------------------------- rc_failed


def test_rc_failed_rules() -> None:
    text = "  The food was great but the service was slow.  "
    assert rc_failed(None, text)
    assert rc_failed((5, 5), text)
    assert rc_failed((0, len(text) + 3), text)
    assert rc_failed((46, 47), text)  # punctuation only
    assert rc_failed((2, 48), text)  # the whole stripped text
    assert rc_failed((2, 45), text)  # 97% of it: whole
    assert not rc_failed((6, 21), text)  # "food was great"
    stripped = len(text.strip())
    just_under = int(stripped * WHOLE_TEXT_COVERAGE) - 1
    assert not rc_failed((2, 2 + just_under), text)
    assert rc_failed((2, 2 + int(stripped * WHOLE_TEXT_COVERAGE) + 1), text)


# ---------------------------------------------------------------------------------- RC


@pytest.fixture(scope="module")
def tiny_qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.builders import tiny_qa

    return tiny_qa(tmp_path_factory.mktemp("tiny-qa"))


RC_INSTANCES = [
    inst("a", PAPER, "service"),
    inst("b", PAPER, "food"),
    inst("c", "Nice decor.", "decor", offsets=False),
    inst("d", "The waiter, who was from Paris, recommended a dry white wine that went well with the fish.", "wine"),
]


def test_rc_finder_with_a_random_model_returns_none_or_valid_spans(tiny_qa: Path) -> None:
    finder = RCSpanFinder(tiny_qa, batch_size=7, max_answer_tokens=5)
    answers = finder.find(RC_INSTANCES, progress=False)
    assert len(answers) == len(RC_INSTANCES)
    for instance, answer in zip(RC_INSTANCES, answers):
        if answer is not None:
            start, end = answer
            assert 0 <= start < end <= len(instance.text)
            assert not rc_failed(answer, instance.text)
            assert instance.text[start:end] == instance.text[start:end].strip()
            assert len(finder.tokenizer(instance.text[start:end], add_special_tokens=False)["input_ids"]) <= 5 + 1


class PeakModel:
    """Stands in for a QA model: start/end logits peak on the tokens of an answer chosen per row."""

    def __init__(self, tokenizer, choose) -> None:
        self.tokenizer, self.choose = tokenizer, choose

    def __call__(self, input_ids: torch.Tensor, **_: torch.Tensor) -> SimpleNamespace:
        start = torch.zeros(input_ids.shape, dtype=torch.float)
        end = torch.zeros(input_ids.shape, dtype=torch.float)
        for row, ids in enumerate(input_ids.tolist()):
            answer, height = self.choose(self.tokenizer.decode(ids))
            if answer is None:
                start[row, 0] = end[row, 0] = height
                continue
            target = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            sep = ids.index(self.tokenizer.sep_token_id)  # search the context only
            at = next(i for i in range(sep, len(ids)) if ids[i:i + len(target)] == target)
            start[row, at] = end[row, at + len(target) - 1] = height
        return SimpleNamespace(start_logits=start, end_logits=end)


def test_rc_answer_maps_to_the_exact_characters(tiny_qa: Path) -> None:
    finder = RCSpanFinder(tiny_qa, batch_size=5)
    finder.model = PeakModel(finder.tokenizer, lambda seq: ("impeccable", 8.0) if "service" in seq.split("[SEP]")[0] else ("came up short", 8.0))
    answers = finder.find(RC_INSTANCES[:2], progress=False)
    assert answers == [mention(PAPER, "impeccable"), mention(PAPER, "came up short")]


def test_rc_picks_the_best_scoring_template(tiny_qa: Path) -> None:
    finder = RCSpanFinder(tiny_qa, batch_size=4)
    finder.model = PeakModel(finder.tokenizer, lambda seq: ("inventive", 12.0) if "rate" in seq.split("[SEP]")[0] else ("traditional", 6.0))
    assert finder.find(RC_INSTANCES[:1], progress=False) == [mention(PAPER, "inventive")]


def test_rc_fails_on_null_answers_and_whole_text_answers(tiny_qa: Path) -> None:
    finder = RCSpanFinder(tiny_qa)
    finder.model = PeakModel(finder.tokenizer, lambda seq: (None, 9.0))
    assert finder.find(RC_INSTANCES, progress=False) == [None] * len(RC_INSTANCES)
    finder.model = PeakModel(finder.tokenizer, lambda seq: ("nice decor.", 9.0))
    assert finder.find([RC_INSTANCES[2]], progress=False) == [None]


# ---------------------------------------------------------------------------- detection


class StubRC:
    def __init__(self, answers: list[tuple[int, int] | None]) -> None:
        self.answers = answers

    def find(self, instances, progress=True):
        assert len(instances) == len(self.answers)
        return self.answers


def test_detect_spans_uses_rc_then_falls_back_to_the_heuristic() -> None:
    items = [inst("s", PAPER, "service"), inst("f", PAPER, "food"), inst("w", "Lovely patio.", "patio")]
    spans = detect_spans(items, rc=StubRC([mention(PAPER, "impeccable"), None, None]), progress=False)
    assert spans["s"] == Span(*mention(PAPER, "impeccable"), "rc")
    assert spans["f"] == Span(*clause_span(PAPER, *mention(PAPER, "food")), "heuristic")
    assert spans["w"] == Span(0, 12, "whole")
    heuristic = detect_spans(items, progress=False)
    assert heuristic["s"].source == "heuristic" and heuristic["s"].text_of(PAPER) == "the service was impeccable"


# ---------------------------------------------------------------------------- importance


def test_choose_by_importance_picks_the_largest_drop_and_shorter_on_ties() -> None:
    candidates = [(0, 10), (0, 4), (5, 8), (2, 30)]
    assert choose_by_importance(candidates, lambda c: [0.1, 0.5, 2.0, 1.9]) == (5, 8)
    assert choose_by_importance(candidates, lambda c: [1.0, 1.0, -1.0, 1.0]) == (0, 4)
    with pytest.raises(ValueError):
        choose_by_importance(candidates, lambda c: [1.0])
    with pytest.raises(ValueError):
        choose_by_importance([], lambda c: [])


def test_refine_by_importance_replaces_only_fallback_spans() -> None:
    items = [inst("h", PAPER, "menu"), inst("r", PAPER, "service"), inst("m", PAPER, "food"), inst("k", PAPER, "food")]
    spans = detect_spans(items, rc=StubRC([None, mention(PAPER, "impeccable"), None, None]), progress=False)
    spans["m"] = Span(*mention(PAPER, "came up short"), "manual")
    longest = lambda instance, cands: [float(e - s) for s, e in cands]  # noqa: E731
    refined = refine_by_importance(items, spans, longest, progress=False)
    assert refined["h"] == Span(*candidate_chunks(PAPER, *mention(PAPER, "menu"))[-1], "importance")
    assert refined["r"] == spans["r"] and refined["m"] == spans["m"]
    assert spans["h"].source == "heuristic"  # the input is not modified
    shortest = lambda instance, cands: [-float(e - s) for s, e in cands]  # noqa: E731
    assert refine_by_importance(items, spans, shortest, progress=False)["k"] == spans["k"]


# ---------------------------------------------------------------------------------- stats


class WhitespaceTokenizer:
    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [t.split() for t in texts]}


def test_span_stats_on_a_toy_set() -> None:
    items = [inst("a", PAPER, "service"), inst("b", "Lovely patio.", "patio"), inst("c", PAPER, "food")]
    spans = detect_spans(items[:2], progress=False)
    stats = span_stats(items, spans, WhitespaceTokenizer())
    assert stats["instances"] == 3 and stats["spans"] == 2 and stats["missing"] == 1
    assert stats["whole_text_share"] == 0.5
    assert stats["mean_span_tokens"] == (4 + 2) / 2
    assert stats["mean_text_tokens"] == (len(PAPER.split()) + 2) / 2
    assert stats["mean_span_text_ratio"] == pytest.approx((4 / len(PAPER.split()) + 1.0) / 2)
    assert stats["by_source"] == {"heuristic": 1, "whole": 1}


def test_category_candidates_are_every_clause_and_sentence() -> None:
    from core.spans import category_candidates

    text = "LOCATION1 is expensive but LOCATION2 is cheap. I love LOCATION2, it is safe"
    got = [text[a:b] for a, b in category_candidates(text)]
    assert {"LOCATION1 is expensive", "LOCATION2 is cheap", "I love LOCATION2", "it is safe"} <= set(got)
    assert "LOCATION1 is expensive but LOCATION2 is cheap" in got  # the first sentence
    assert text not in got  # the whole text only when nothing is smaller
    assert [b - a for a, b in category_candidates(text)] == sorted(b - a for a, b in category_candidates(text))
    assert category_candidates("Cheap") == [(0, 5)]


def test_category_span_quality_counts_spans_shared_by_opposite_labels() -> None:
    from core.spans import Span, category_span_quality

    text = "LOCATION1 is expensive but LOCATION2 is cheap"
    a = Instance("a", "train", text, "location1 price", "negative", 0, 9, meta={"category": "price"})
    b = Instance("b", "train", text, "location2 price", "positive", 27, 36, meta={"category": "price"})
    whole = Span(0, len(text), "heuristic")
    anchored = {"a": whole, "b": whole}  # one clause for both: it cannot explain opposite labels
    chosen = {"a": Span(0, 22, "importance"), "b": Span(27, len(text), "importance")}
    drops = {("a", (0, len(text))): 1.0, ("b", (0, len(text))): 1.0, ("a", (0, 22)): 3.0, ("b", (27, len(text))): 2.0}
    stats = category_span_quality([a, b], anchored, chosen, drops)
    assert stats == {"instances": 2, "changed": 2, "mean_importance_anchored": 1.0, "mean_importance_chosen": 2.5,
                     "conflicting_pairs": 1, "conflicting_pairs_sharing_a_span_anchored": 1,
                     "conflicting_pairs_sharing_a_span_chosen": 0}


def test_new_texts_read_category_aspects_as_the_dataset_writes_them():
    from core.new_inputs import CategoryAspects, new_span, resolve_aspect
    from core.spans import candidate_chunks, category_candidates, clause_span

    rows = [{"split": "train", "meta": {"target": "LOCATION1", "category": "price"}},
            {"split": "train", "meta": {"target": "LOCATION2", "category": "transit-location"}},
            {"split": "test", "meta": {"target": "LOCATION3", "category": "safety"}}]  # not a training row
    known = CategoryAspects.of(rows)
    assert known == CategoryAspects(frozenset({"location1", "location2"}), frozenset({"price", "transit-location"}))
    text = "LOCATION1 price is high, but the nightlife of LOCATION2 is great."
    aspect = resolve_aspect(text, "LOCATION1 Price", known)  # occurs literally too: still the category aspect
    assert (aspect.aspect, aspect.at, aspect.category) == ("location1 price", (0, 9), True)
    plain = resolve_aspect(text, "the nightlife", known)  # an ordinary phrase: not split into target + category
    assert not plain.category and text[slice(*plain.at)] == "the nightlife"
    assert resolve_aspect(text, "location2  TRANSIT-location", known).aspect == "location2 transit-location"
    with pytest.raises(ValueError, match="the target 'location2' of the aspect 'location2 price' does not occur"):
        resolve_aspect("LOCATION1 is cheap", "location2 price", known)
    with pytest.raises(ValueError, match=r"give a word or phrase of it, or a target \(location1, location2\)"):
        resolve_aspect(text, "safety", known)
    with pytest.raises(ValueError, match=r"give a word or phrase of it$"):
        resolve_aspect(text, "safety", CategoryAspects(frozenset(), frozenset()))

    seen: list[list[tuple[int, int]]] = []

    def longest(spans: list[tuple[int, int]]) -> list[float]:  # importance = span length
        seen.append(list(spans))
        return [float(b - a) for a, b in spans]

    importance, anchored = {"category_spans": "importance"}, {"category_spans": "anchored"}
    assert new_span(text, aspect, importance, longest) in category_candidates(text) + [clause_span(text, 0, 9)]
    assert set(category_candidates(text)) <= set(seen[-1])
    assert new_span(text, aspect, anchored, longest) == clause_span(text, 0, 9)  # no model call
    calls = len(seen)
    assert new_span(text, plain, {}, longest) == clause_span(text, *plain.at, "the nightlife") and len(seen) == calls
    chosen = new_span(text, plain, {"span_importance": True}, longest)  # --span-importance: the chunks around it
    assert set(seen[-1]) >= set(candidate_chunks(text, *plain.at, "the nightlife")) and chosen in seen[-1]
