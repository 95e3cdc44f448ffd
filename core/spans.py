"""Aspect spans: the part of a text that carries the opinion on an aspect.

Three detectors, in the order the paper (Zhang et al. 2021, section 5 and appendix A) uses them:

1. :class:`RCSpanFinder` - an extractive question-answering (reading comprehension) model asked
   the paper's 11 templates (:data:`RC_TEMPLATES`) about the aspect;
2. :func:`clause_span` - the fallback heuristic: expand from the aspect mention to the nearest
   boundary. MAMS texts are mostly one long sentence with several aspects, so besides sentence
   ends it also stops at clause punctuation, connectives (:data:`CONNECTIVES`, "and" before
   :data:`AND_CLAUSE_STARTERS`) and a few prepositions (:data:`PHRASE_BOUNDARIES`);
3. :func:`choose_by_importance` / :func:`refine_by_importance` - paper section 3.1, Eq. 3: among
   a few candidate chunks (:func:`candidate_chunks`) pick the one whose masking lowers the
   predicted logit most. The caller supplies the logit drop; nothing here imports a classifier.

Spans are character offsets ``[start, end)`` into the instance text, with the detector that
produced them recorded in :attr:`Span.source`.
"""
from __future__ import annotations

import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from core.data import Instance

SPAN_SOURCES = ("rc", "heuristic", "importance", "manual", "whole")
"""Where a span came from: the RC model, the clause heuristic, the importance choice, a person's
correction, or the whole text (the heuristic found no narrower span, or no aspect mention)."""

RC_TEMPLATES = (
    "How is the X?",
    "How was the X?",
    "How are the X?",
    "How were the X?",
    "How do you rate the X?",
    "How would you rate the X?",
    "How do you think of the X?",
    "What do you think about the X?",
    "What do you say about the X?",
    "What happened to the X?",
    "What did the X do?",
)
"""The paper's question templates (appendix A, table 6); ``X`` is replaced by the aspect."""

WHOLE_TEXT_COVERAGE = 0.9
"""A span covering at least this share of the characters of the stripped text counts as the whole
text: an RC answer like that is a failure (paper appendix A), and :func:`span_stats` counts it as
whole. 0.9 tolerates a dropped first word or final clause fragment of a short text."""

CONNECTIVES = (
    "but", "although", "though", "whereas", "however", "yet", "except", "while", "nevertheless",
    "nonetheless", "otherwise", "unless", "because", "since", "when", "whenever", "if", "until",
)
"""Words that open a new clause and end the current one: contrastive connectives and the common
subordinators. Not "so" (mostly an intensifier: "so good"), "as" or relative pronouns (a
"which"/"who" clause usually describes the noun before it: "one waiter which is ludicrous")."""

AND_CLAUSE_STARTERS = (
    "the", "their", "our", "my", "his", "her", "its", "this", "that", "these", "those",
    "i", "we", "they", "he", "she", "it", "you", "there", "then", "also", "everything",
)
""""and" is a boundary only when one of these follows it ("... and the service was slow",
"... and then"). A bare "and" mostly joins noun phrases ("food and drinks") or adjectives."""

PHRASE_BOUNDARIES = ("with", "without", "for", "before", "after")
"""Prepositions that end a phrase, a weaker boundary than a clause's: MAMS often mentions a
second (mostly neutral) aspect in a prepositional phrase of the first one's clause ("had a good
time for dinner"). A clause that must grow (see :func:`clause_span`) grows across the weaker
boundary first, so "great for groups" stays whole for "groups"."""

_STRIP_CHARS = string.whitespace + string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026"

# Function words that do not make a clause an opinion on its own: a clause whose words outside
# the aspect mention are all in this set (e.g. "the food" in "the food, however, was great")
# is merged with its neighbour.
_FUNCTION_WORDS = frozenset(
    """a an the this that these those my our your their his her its some any all both each every
    no not of in on at to for with from by as about into over after before than then there here
    and or nor also too very so such just only even really quite i me we us you he him she it they
    them is are was were be been being am has have had do does did will would can could should
    shall may might must which who whom whose what when where why how s t one well yes oh""".split()
) | frozenset(CONNECTIVES) | frozenset(PHRASE_BOUNDARIES)

_NEVER_BOUNDARY_BEFORE_WHILE = re.compile(r"\b(?:a|the|little|short|long)\s+$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+(?=[\s\"')\]]|$)|\.{2,}|\n+")
_CLAUSE_PUNCT = re.compile(r"(?<!\d),|,(?!\d)|[;:()\[\]{}\u2013\u2014~|]|-{2,}|(?<=\s)-+(?=\s)")
_CONNECTIVE = re.compile(
    r"\b(?:even\s+)?(?:" + "|".join(CONNECTIVES) + r")\b"
    r"|\band(?=\s+(?:" + "|".join(AND_CLAUSE_STARTERS) + r")\b)",
    re.IGNORECASE,
)
_LEADING_CONJUNCTION = re.compile(r"(?:and|or)\s+", re.IGNORECASE)
_TRAILING_CONJUNCTION = re.compile(r"\s(?:and|or)\Z", re.IGNORECASE)
_PHRASE = re.compile(  # not before a pronoun: "make up for it" holds no other aspect
    r"\b(?:" + "|".join(PHRASE_BOUNDARIES) + r")\b(?!\s+(?:it|us|me|them|him|her|you|everything)\b)",
    re.IGNORECASE,
)
_PHRASE_CUT, _CLAUSE_CUT, _SENTENCE_CUT = 1, 2, 3
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


@dataclass(frozen=True)
class Span:
    """Character offsets ``[start, end)`` of an aspect's span in its text, and who found it."""

    start: int
    end: int
    source: str

    def __post_init__(self) -> None:
        if self.source not in SPAN_SOURCES:
            raise ValueError(f"unknown span source {self.source!r}; expected one of {SPAN_SOURCES}")
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid span offsets [{self.start}, {self.end})")

    def text_of(self, text: str) -> str:
        """The span's characters in ``text``."""
        return text[self.start:self.end]


# ----------------------------------------------------------------------------- the heuristic


@dataclass(frozen=True)
class _Segment:
    """Text between cuts; ``right_cut`` is the strength of the strongest cut before the next."""

    start: int
    end: int
    sentence: int
    right_cut: int


def _strip(text: str, start: int, end: int, keep: tuple[int, int] | None = None) -> tuple[int, int]:
    """Shrink ``[start, end)`` past surrounding whitespace, punctuation and "and"/"or", never
    into ``keep``."""
    lo_limit, hi_limit = keep if keep else (end, start)
    while True:
        while start < min(end, lo_limit) and text[start] in _STRIP_CHARS:
            start += 1
        conjunction = _LEADING_CONJUNCTION.match(text, start, end)
        if not (conjunction and conjunction.end() <= lo_limit):
            break
        start = conjunction.end()
    while True:
        while end > max(start, hi_limit) and text[end - 1] in _STRIP_CHARS:
            end -= 1
        conjunction = _TRAILING_CONJUNCTION.search(text, start, end)
        if not (conjunction and conjunction.start() >= max(start + 1, hi_limit)):
            break
        end = conjunction.start()
    return start, end


def _whole(text: str) -> tuple[int, int]:
    start, end = _strip(text, 0, len(text))
    return (start, end) if start < end else (0, len(text))


def _segments(text: str, start: int, end: int) -> list[_Segment]:
    """Split ``text`` at sentence ends, clause boundaries (punctuation, connectives) and phrase
    boundaries, except inside the aspect mention ``[start, end)``; the cuts belong to no
    segment, and segments without a word character (other than the mention's) are dropped."""
    cuts = [(m.start(), m.end(), _SENTENCE_CUT) for m in _SENTENCE_END.finditer(text)]
    cuts += [(m.start(), m.end(), _CLAUSE_CUT) for m in _CLAUSE_PUNCT.finditer(text)]
    cuts += [
        (m.start(), m.end(), _CLAUSE_CUT)
        for m in _CONNECTIVE.finditer(text)
        if not (m.group().lower() == "while" and _NEVER_BOUNDARY_BEFORE_WHILE.search(text, 0, m.start()))
    ]
    cuts += [(m.start(), m.end(), _PHRASE_CUT) for m in _PHRASE.finditer(text)]
    cuts = sorted(c for c in cuts if c[1] <= start or c[0] >= end)
    spans: list[tuple[int, int, int]] = []  # (start, end, sentence)
    strengths: list[int] = []  # of the cuts after each kept segment
    pos, sentence, strongest = 0, 0, 0
    for cut_start, cut_end, strength in cuts + [(len(text), len(text), _SENTENCE_CUT)]:
        if cut_start > pos and (any(c.isalnum() for c in text[pos:cut_start]) or pos < end and cut_start > start):
            if spans:
                strengths.append(strongest)
            spans.append((pos, cut_start, sentence))
            strongest = 0
        strongest = max(strongest, strength)
        pos = max(pos, cut_end)
        sentence += strength == _SENTENCE_CUT
    strengths.append(_SENTENCE_CUT)
    return [_Segment(a, b, n, cut) for (a, b, n), cut in zip(spans, strengths)]


def find_aspect(text: str, aspect: str, start: int | None = None, end: int | None = None) -> tuple[int, int] | None:
    """The aspect mention's offsets: ``(start, end)`` when valid, else the first case-insensitive
    occurrence of ``aspect`` (whole words preferred), else ``None``."""
    if start is not None and end is not None and 0 <= start < end <= len(text):
        return start, end
    needle = aspect.strip()
    if not needle:
        return None
    for pattern in (rf"(?<!\w){re.escape(needle)}(?!\w)", re.escape(needle)):
        m = re.search(pattern, text, re.IGNORECASE)
        if m:
            return m.start(), m.end()
    return None


def _has_content(text: str, lo: int, hi: int, start: int, end: int) -> bool:
    """Whether ``text[lo:hi]`` has a content word outside the aspect mention ``[start, end)``."""
    outside = text[lo:start] + " " + text[end:hi]
    return any(w.lower() not in _FUNCTION_WORDS for w in _WORD.findall(outside))


def _clause_segments(text: str, start: int, end: int) -> tuple[list[_Segment], int, int]:
    """The segments of ``text`` and the index range ``[lo, hi]`` of the aspect's clause: the
    segments under the mention, grown within the sentence until they hold a content word
    besides the aspect, each step across the weaker of the two neighbouring boundaries (the
    right one on a tie)."""
    segs = _segments(text, start, end)
    lo = hi = next(i for i, s in enumerate(segs) if s.start < end and s.end > start)

    def bounds() -> tuple[int, int]:
        return segs[lo].start, segs[hi].end

    while not _has_content(text, *bounds(), start, end):
        right = segs[hi].right_cut if hi + 1 < len(segs) else _SENTENCE_CUT
        left = segs[lo - 1].right_cut if lo > 0 else _SENTENCE_CUT
        if min(left, right) == _SENTENCE_CUT:
            break
        if right <= left:
            hi += 1
        else:
            lo -= 1
    return segs, lo, hi


def _resolve(text: str, start: int | None, end: int | None, aspect: str | None) -> tuple[int, int] | None:
    if not text.strip():
        raise ValueError("cannot find a span in an empty text")
    return find_aspect(text, aspect or "", start, end)


def clause_span(text: str, start: int | None, end: int | None, aspect: str | None = None) -> tuple[int, int]:
    """The clause around the aspect mention ``text[start:end]``: paper appendix A (expand to
    the nearest boundary) with clause boundaries added to sentence ends - ``, ; : ( ) [ ] -- -``,
    :data:`CONNECTIVES`, "and" before :data:`AND_CLAUSE_STARTERS` - and the weaker
    :data:`PHRASE_BOUNDARIES`. A clause with no word besides the aspect and function words
    ("the food" in "the food, however, was great") takes in its neighbour within the sentence,
    across the weaker boundary (the right one on a tie), until it has one. Surrounding
    whitespace, punctuation and a leading "and"/"or" are stripped; the result is never empty
    and always contains the mention. Without valid offsets the mention is looked up from
    ``aspect`` (case-insensitively); failing that the whole (stripped) text is returned.
    """
    mention = _resolve(text, start, end, aspect)
    if mention is None:
        return _whole(text)
    start, end = mention
    segs, lo, hi = _clause_segments(text, start, end)
    return _strip(text, segs[lo].start, segs[hi].end, keep=mention)


def candidate_chunks(text: str, start: int | None, end: int | None, aspect: str | None = None) -> list[tuple[int, int]]:
    """At most four candidate spans around the aspect, for :func:`choose_by_importance`: its
    clause (:func:`clause_span`), the clause joined with the preceding segment, with the
    following one (both within the sentence), and the sentence; duplicates removed, shortest
    first."""
    mention = _resolve(text, start, end, aspect)
    if mention is None:
        return [_whole(text)]
    start, end = mention
    segs, lo, hi = _clause_segments(text, start, end)
    sentence = segs[lo].sentence
    in_sentence = [i for i, s in enumerate(segs) if s.sentence == sentence]
    ranges = [
        (lo, hi),
        (max(lo - 1, in_sentence[0]), hi),
        (lo, min(hi + 1, in_sentence[-1])),
        (in_sentence[0], in_sentence[-1]),
    ]
    chunks = {_strip(text, segs[a].start, segs[b].end, keep=mention) for a, b in ranges}
    return sorted(chunks, key=lambda c: (c[1] - c[0], c[0]))


def category_candidates(text: str) -> list[tuple[int, int]]:
    """Candidate spans for an aspect that is a category, not a mention (SentiHood's "price" of
    LOCATION1): every clause and every sentence of the text, duplicates removed, shortest first;
    the whole text only when there is nothing smaller. :func:`choose_by_importance` then picks the
    one the model's decision on that aspect depends on most."""
    segs = _segments(text, len(text), len(text))
    if not segs:
        return [_whole(text)]
    clauses, sentences = [[segs[0]]], {}
    for prev, seg in zip(segs, segs[1:]):
        if prev.right_cut >= _CLAUSE_CUT:
            clauses.append([seg])
        else:
            clauses[-1].append(seg)
    for seg in segs:
        sentences.setdefault(seg.sentence, []).append(seg)
    ranges = [(group[0].start, group[-1].end) for group in [*clauses, *sentences.values()]]
    chunks = {_strip(text, a, b) for a, b in ranges}
    chunks = {c for c in chunks if c[0] < c[1] and any(ch.isalnum() for ch in text[c[0]:c[1]])}
    smaller = {c for c in chunks if coverage(c, text) < WHOLE_TEXT_COVERAGE}
    return sorted(smaller or chunks or {_whole(text)}, key=lambda c: (c[1] - c[0], c[0]))


# ------------------------------------------------------------------------------- RC answers


def coverage(span: tuple[int, int], text: str) -> float:
    """Share of the stripped text's characters that ``span`` covers."""
    lo, hi = _whole(text)
    return max(0, min(span[1], hi) - max(span[0], lo)) / max(hi - lo, 1)


def rc_failed(answer: tuple[int, int] | None, text: str) -> bool:
    """The paper's failure rule for an RC answer: no span (``None``, empty, outside the text or
    only whitespace/punctuation), or the whole text (coverage >= :data:`WHOLE_TEXT_COVERAGE`)."""
    if answer is None:
        return True
    start, end = answer
    if not 0 <= start < end <= len(text) or not any(c.isalnum() for c in text[start:end]):
        return True
    return coverage(answer, text) >= WHOLE_TEXT_COVERAGE


class RCSpanFinder:
    """Spans from an extractive question-answering model (``AutoModelForQuestionAnswering``).

    ``model`` is a local path or a hub id; it needs a fast tokenizer (for offset mappings).
    Contexts longer than the model's input are truncated (``only_second``): an answer past the
    cut cannot be found.
    """

    def __init__(self, model: str | Path, *, device: str = "cpu", batch_size: int = 32, max_answer_tokens: int = 30) -> None:
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{model}: RC spans need a fast tokenizer (offset mappings)")
        self.model = AutoModelForQuestionAnswering.from_pretrained(str(model)).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_answer_tokens = max_answer_tokens
        self.max_length = min(self.tokenizer.model_max_length, 512)

    def find(self, instances: Sequence[Instance], progress: bool = True) -> list[tuple[int, int] | None]:
        """The best answer over the templates for each instance, as character offsets into its
        text, or ``None`` when every template's answer fails (:func:`rc_failed`)."""
        pairs = [(i, t.replace("X", inst.aspect)) for i, inst in enumerate(instances) for t in RC_TEMPLATES]
        best: list[tuple[float, tuple[int, int]] | None] = [None] * len(instances)
        batches = range(0, len(pairs), self.batch_size)
        for b in tqdm(batches, desc="RC spans", unit="batch", disable=not progress, file=sys.stderr):
            chunk = pairs[b:b + self.batch_size]
            texts = [instances[i].text for i, _ in chunk]
            for (i, _), answer in zip(chunk, self._answer([q for _, q in chunk], texts)):
                if answer is not None and not rc_failed(answer[1], instances[i].text):
                    if best[i] is None or answer[0] > best[i][0]:
                        best[i] = answer
        return [b[1] if b else None for b in best]

    def _answer(self, questions: list[str], contexts: list[str]) -> list[tuple[float, tuple[int, int]] | None]:
        """Per question/context pair: (log-probability score, char span) of the best span, or
        ``None`` when the null answer (the first token) scores higher (SQuAD 2.0 rule)."""
        import torch

        enc = self.tokenizer(
            questions, contexts, truncation="only_second", max_length=self.max_length,
            padding=True, return_offsets_mapping=True, return_tensors="pt",
        )
        inputs = {k: enc[k].to(self.device) for k in self.tokenizer.model_input_names if k in enc}
        with torch.inference_mode():
            out = self.model(**inputs)
        start_logits, end_logits = out.start_logits.float().cpu(), out.end_logits.float().cpu()
        n_tokens = start_logits.shape[1]
        band = torch.ones(n_tokens, n_tokens, dtype=torch.bool).triu().tril(self.max_answer_tokens - 1)
        answers: list[tuple[float, tuple[int, int]] | None] = []
        for row, context in enumerate(contexts):
            in_context = torch.tensor([sid == 1 for sid in enc.sequence_ids(row)])
            allowed = in_context.clone()
            allowed[0] = True  # the null answer
            s = start_logits[row].masked_fill(~allowed, float("-inf")).log_softmax(-1)
            e = end_logits[row].masked_fill(~allowed, float("-inf")).log_softmax(-1)
            scores = (s[:, None] + e[None, :]).masked_fill(~(band & in_context[:, None] & in_context[None, :]), float("-inf"))
            flat = int(scores.argmax())
            i, j = divmod(flat, n_tokens)
            best = float(scores[i, j])
            if best == float("-inf") or float(s[0] + e[0]) > best:
                answers.append(None)
                continue
            offsets = enc["offset_mapping"][row]
            char_start, char_end = _strip(context, int(offsets[i][0]), int(offsets[j][1]))
            answers.append((best, (char_start, char_end)) if char_start < char_end else None)
        return answers


# ------------------------------------------------------------------------------ importance


def choose_by_importance(candidates: Sequence[tuple[int, int]], logit_drop: Callable[[list[tuple[int, int]]], Sequence[float]]) -> tuple[int, int]:
    """The candidate with the largest importance, paper Eq. 3: imp(x_ij) = logit_y(x) -
    logit_y(x_-ij). ``logit_drop`` maps the candidates to those values (the caller masks each
    span and runs its model). Ties go to the shorter span, then the earlier one."""
    spans = list(candidates)
    if not spans:
        raise ValueError("no candidate spans to choose from")
    drops = list(logit_drop(spans))
    if len(drops) != len(spans):
        raise ValueError(f"logit_drop returned {len(drops)} values for {len(spans)} candidates")
    best = max(range(len(spans)), key=lambda k: (drops[k], -(spans[k][1] - spans[k][0]), -spans[k][0]))
    return spans[best]


def among_clauses(inst: Instance, whole_text: bool, category_spans: str) -> bool:
    """Whether ``prepare`` chooses ``inst``'s span by importance among every clause and sentence of
    its text: single texts and pairs (``whole_text``), and category aspects (``meta["category"]``)
    unless prepared with ``--category-spans anchored``."""
    return whole_text or (category_spans == "importance" and bool(inst.meta.get("category")))


def importance_candidates(inst: Instance, *, whole_text: bool, category_spans: str,
                          span_importance: bool) -> list[tuple[int, int]] | None:
    """The candidates among which ``prepare``'s importance rule (Eq. 3) picks ``inst``'s span:
    its text's clauses and sentences (:func:`among_clauses`), else the chunks around its aspect
    with ``--span-importance``; None where the detected span stays as it is."""
    if among_clauses(inst, whole_text, category_spans):
        return category_candidates(inst.text)
    return candidate_chunks(inst.text, inst.start, inst.end, inst.aspect) if span_importance else None


def refine_by_importance(
    instances: Sequence[Instance],
    spans: dict[str, Span],
    logit_drop_for_instance: Callable[[Instance, list[tuple[int, int]]], Sequence[float]],
    progress: bool = True,
    *,
    replace_sources: Collection[str] = ("heuristic", "whole"),
    candidates_for: Callable[[Instance], list[tuple[int, int]]] | None = None,
) -> dict[str, Span]:
    """A copy of ``spans`` where each span whose source is in ``replace_sources`` (by default
    the heuristic and whole-text fallbacks; RC answers and manual corrections are kept) is
    replaced by the most important of its candidates (``candidates_for(instance)``, by default
    :func:`candidate_chunks`) and itself; a span that changes gets the source ``"importance"``."""
    refined = dict(spans)
    for inst in tqdm(instances, desc="importance spans", unit="instance", disable=not progress, file=sys.stderr):
        current = spans.get(inst.id)
        if current is None or current.source not in replace_sources:
            continue
        candidates = (candidates_for(inst) if candidates_for is not None
                      else candidate_chunks(inst.text, inst.start, inst.end, inst.aspect))
        if (current.start, current.end) not in candidates:
            candidates.append((current.start, current.end))
        chosen = choose_by_importance(candidates, lambda c, inst=inst: logit_drop_for_instance(inst, c))
        if chosen != (current.start, current.end):
            refined[inst.id] = Span(*chosen, "importance")
    return refined


# ---------------------------------------------------------------------------- detection


def whole_span(text: str) -> Span:
    """The whole (stripped) text as a span, source ``"whole"``."""
    return Span(*_whole(text), "whole")


def heuristic_span(inst: Instance) -> Span:
    """The clause heuristic's span for ``inst``; source ``"whole"`` when it covers the whole
    text (coverage >= :data:`WHOLE_TEXT_COVERAGE`), ``"heuristic"`` otherwise."""
    start, end = clause_span(inst.text, inst.start, inst.end, inst.aspect)
    whole = coverage((start, end), inst.text) >= WHOLE_TEXT_COVERAGE
    return Span(start, end, "whole" if whole else "heuristic")


def detect_spans(instances: Sequence[Instance], *, rc: RCSpanFinder | None = None, progress: bool = True) -> dict[str, Span]:
    """A span for every instance, keyed by instance id: the RC answer when ``rc`` is given and
    it succeeds, the clause heuristic otherwise (:func:`heuristic_span`)."""
    answers = rc.find(instances, progress=progress) if rc is not None else [None] * len(instances)
    return {
        inst.id: Span(*answer, "rc") if answer is not None else heuristic_span(inst)
        for inst, answer in zip(instances, answers)
    }


def span_stats(instances: Sequence[Instance], spans: dict[str, Span], tokenizer: Any) -> dict[str, Any]:
    """Summary of ``spans`` over ``instances``: how many there are, the share that cover the
    whole text (coverage >= :data:`WHOLE_TEXT_COVERAGE`, whatever their source), mean length
    of spans and texts in ``tokenizer`` tokens (no special tokens), the mean per-instance
    span/text token ratio, and counts by source. Instances without a span are counted apart."""
    covered = [inst for inst in instances if inst.id in spans]
    if not covered:
        return {"instances": len(instances), "spans": 0, "missing": len(instances), "by_source": {}}
    span_texts = [spans[i.id].text_of(i.text) for i in covered]
    span_lens = [len(ids) for ids in tokenizer(span_texts, add_special_tokens=False)["input_ids"]]
    text_lens = [len(ids) for ids in tokenizer([i.text for i in covered], add_special_tokens=False)["input_ids"]]
    whole = [coverage((spans[i.id].start, spans[i.id].end), i.text) >= WHOLE_TEXT_COVERAGE for i in covered]
    n = len(covered)
    return {
        "instances": len(instances),
        "spans": n,
        "missing": len(instances) - n,
        "whole_text_share": sum(whole) / n,
        "mean_span_tokens": sum(span_lens) / n,
        "mean_text_tokens": sum(text_lens) / n,
        "mean_span_text_ratio": sum(s / max(t, 1) for s, t in zip(span_lens, text_lens)) / n,
        "by_source": dict(Counter(spans[i.id].source for i in covered)),
    }


def category_span_quality(instances: Sequence[Instance], anchored: dict[str, Span], chosen: dict[str, Span],
                          drops: dict[tuple[str, tuple[int, int]], float]) -> dict[str, Any]:
    """How the spans chosen for category aspects compare with the target-anchored ones: how many
    changed; their mean importance (the predicted class's logit drop when the span is masked,
    Eq. 3); and, over pairs of instances of one text with different labels, how many get the
    very same span (one span cannot explain two opposite sentiments)."""
    if not instances:
        return {}

    def pair(spans: dict[str, Span], inst: Instance) -> tuple[int, int]:
        return spans[inst.id].start, spans[inst.id].end

    by_text: dict[str, list[Instance]] = {}
    for inst in instances:
        by_text.setdefault(inst.text, []).append(inst)
    conflicts = [(a, b) for group in by_text.values() for k, a in enumerate(group) for b in group[k + 1:]
                 if a.label != b.label]

    def mean_drop(spans: dict[str, Span]) -> float | None:
        values = [drops[i.id, pair(spans, i)] for i in instances if (i.id, pair(spans, i)) in drops]
        return round(sum(values) / len(values), 4) if values else None

    return {"instances": len(instances), "changed": sum(pair(anchored, i) != pair(chosen, i) for i in instances),
            "mean_importance_anchored": mean_drop(anchored), "mean_importance_chosen": mean_drop(chosen),
            "conflicting_pairs": len(conflicts),
            "conflicting_pairs_sharing_a_span_anchored": sum(pair(anchored, a) == pair(anchored, b) for a, b in conflicts),
            "conflicting_pairs_sharing_a_span_chosen": sum(pair(chosen, a) == pair(chosen, b) for a, b in conflicts)}
