"""Pure helpers behind the app's pages (no Streamlit here).

Workspaces under a root folder and background jobs (prepare, evaluate); filtering instances; Sag/Lag of
one ranked list with its random baseline (via core.metrics); agreement between methods; word tokens for span
fixing; case-study snapshots and the standalone HTML report.
"""
from __future__ import annotations

import html
import json
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .data import LAYOUT, default_data_dir
from .backend import index_workspace
from .index import IndexSettings, saved_settings
from .prepare import PrepareSettings, prepare
from .spans import find_aspect
from .views import Html, Mark, card_html, escape_text, highlight_html
from .workspace import STAGES, Workspace, write_json_atomic

WORKSPACES_ENV = "SPANLENS_WORKSPACES"
REQUEST_FILE = "prepare-request.json"
"""The settings a workspace was created with from the app, so an interrupted build resumes as asked."""

SIZE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny slice": {"train_limit": 300, "eval_limit": 60, "epochs": 3},
    "demo": {"train_limit": 2000, "eval_limit": 300},
    "full": {},
}
"""Dataset sizes offered by the app, as overrides of the ``demo`` prepare preset."""

_STAGE_WEIGHT = {"data": 0.02, "spans": 0.05, "model": 0.55, "importance": 0.03, "variants": 0.05, "index": 0.30}
_STAGE_LINE = re.compile(r"^\[(\w+)\] (done|up to date|built)")
_EPOCH_LINE = re.compile(r"^\s*epoch (\d+):")


# --------------------------------------------------------------------------- workspaces

def workspaces_root() -> Path:
    """The folder holding workspaces: ``$SPANLENS_WORKSPACES`` or ``./workspaces``."""
    return Path(os.environ.get(WORKSPACES_ENV) or "workspaces").expanduser()


def index_settings_of(root: Path) -> IndexSettings:
    """The settings the workspace's index was built (or requested) with; the default otherwise."""
    return saved_settings(root / "index" / "meta.json") or saved_settings(root / REQUEST_FILE, "index") or IndexSettings()


def _index_meta(root: Path) -> dict:
    try:
        return json.loads((root / "index" / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def index_done(root: Path) -> bool:
    """Whether the workspace has a finished gradient index."""
    return bool(_index_meta(root).get("done"))


def index_fingerprint_of(root: Path) -> str:
    """The fingerprint of the workspace's finished index ('-' while there is none)."""
    meta = _index_meta(root)
    return meta.get("fingerprint", "-") if meta.get("done") else "-"


@dataclass(frozen=True)
class WorkspaceInfo:
    """A folder under the root and how far it was built."""

    name: str
    path: Path
    status: str  # "ready" | "needs index" | "unfinished" | "empty"
    stages_done: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return self.status == "ready"


def workspace_info(path: Path) -> WorkspaceInfo:
    """The build state of the workspace at ``path``."""
    manifest = Workspace(path).manifest()
    done = tuple(s for s in STAGES if manifest.stages.get(s, {}).get("done"))
    prepared = all(s in done for s in STAGES[:-1])
    if prepared and index_done(path):
        status = "ready"
    elif prepared:
        status = "needs index"
    elif manifest.stages or (path / REQUEST_FILE).exists():
        status = "unfinished"
    else:
        status = "empty"
    return WorkspaceInfo(path.name, path, status, done + (("index",) if index_done(path) else ()))


def list_workspaces(root: Path) -> list[WorkspaceInfo]:
    """Workspaces (folders with a manifest or a creation request) under ``root``, by name."""
    if not root.is_dir():
        return []
    return [workspace_info(p) for p in sorted(root.iterdir())
            if p.is_dir() and ((p / "manifest.json").exists() or (p / REQUEST_FILE).exists())]


WORKSPACE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_workspace_name(root: Path, name: str) -> str | None:
    """Why ``name`` cannot be a new workspace under ``root`` (``None``: it can)."""
    if not WORKSPACE_NAME.match(name):
        return "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    if (root / name).exists():
        return f"{root / name} already exists"
    return None


def missing_data(dataset: str, data_dir: str | None) -> list[str]:
    """Files a named dataset needs that are not in ``data_dir``; for a path, the path if absent."""
    if dataset in LAYOUT:
        folder = Path(data_dir) if data_dir else default_data_dir()
        return [str(folder / rel) for rel in LAYOUT[dataset].values() if not (folder / rel).is_file()]
    return [] if Path(dataset).expanduser().exists() else [dataset]


def settings_for(dataset: str, data_dir: str | None, backbone: str, size: str, **overrides: Any) -> PrepareSettings:
    """Prepare settings: the demo preset, the size preset, then the user's choices."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZE_PRESETS)}")
    return PrepareSettings.from_preset("demo", dataset=dataset, data_dir=data_dir or None, model=backbone or None,
                                       **SIZE_PRESETS[size], **overrides)


def manifest_summary(root: Path) -> dict[str, Any]:
    """What the Workspaces page shows: sizes, accuracy, span stats, index, timings, settings."""
    ws = Workspace(root)
    manifest = ws.manifest()
    stages, results = manifest.stages, manifest.results
    index_meta: dict[str, Any] = {}
    meta_path = root / "index" / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        size = sum(p.stat().st_size for p in (root / "index").iterdir() if p.is_file())
        index_meta = {"done": bool(meta.get("done")), "dim": meta.get("dim"), "seconds": meta.get("seconds"),
                      "bytes": size, "points": meta.get("points", []), "projection": meta.get("projection"),
                      "examples_per_second": meta.get("examples_per_second")}
    timings = {s: stages[s]["seconds"] for s in STAGES if "seconds" in stages.get(s, {})}
    if index_meta.get("seconds") is not None:
        timings["index"] = index_meta["seconds"]
    return {
        "counts": stages.get("data", {}).get("counts", {}),
        "labels": manifest.labels,
        "accuracy": {k: results[k] for k in ("train_accuracy", "dev_accuracy", "test_accuracy") if k in results},
        "best_epoch": results.get("best_epoch"),
        "history": results.get("history", []),
        "span_stats": stages.get("spans", {}).get("stats", {}),
        "index": index_meta,
        "timings": timings,
        "settings": manifest.settings,
        "versions": manifest.versions,
    }


class Job:
    """Work on one workspace in a background thread of the server process.

    Pages read ``lines``, ``state`` and ``fraction`` while it runs; it survives browser reloads
    (not a server stop: the work it does resumes when started again).
    """

    kind = "job"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.lines: list[str] = []
        self.state = "running"  # "running" | "done" | "error"
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"{self.kind} {self.root.name}", daemon=True)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def fraction(self) -> float:
        return 1.0 if self.state == "done" else 0.0

    @property
    def stage(self) -> str:
        return self.kind

    def log(self, line: str) -> None:
        self.lines.append(line)

    def begin(self) -> None:
        """Runs before the thread starts (in the caller's thread)."""

    def work(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            self.work()
            self.state = "done"
        except Exception as err:  # shown on the page; the work resumes when started again
            self.error = f"{type(err).__name__}: {err}"
            self.lines.append(traceback.format_exc(limit=3))
            self.state = "error"
        finally:
            self.finished = time.time()


class PrepareJob(Job):
    """``prepare`` then ``index_workspace`` (both resume by themselves), with a progress estimate
    from the log lines (stage weights; epochs within training)."""

    kind = "prepare"

    def __init__(self, root: Path, settings: PrepareSettings, index_settings: IndexSettings) -> None:
        super().__init__(root)
        self.settings, self.index_settings = settings, index_settings
        self._stage, self.epoch = "data", 0

    @property
    def stage(self) -> str:
        return self._stage

    def log(self, line: str) -> None:
        """The ``log`` callback of prepare and the index build: keep the line, track the stage."""
        super().log(line)
        stages = list(STAGES)
        if (m := _STAGE_LINE.match(line)) and m.group(1) in stages:
            at = stages.index(m.group(1)) + 1
            self._stage, self.epoch = stages[min(at, len(stages) - 1)], 0
        elif m := _EPOCH_LINE.match(line):
            self._stage, self.epoch = "model", int(m.group(1))

    @property
    def fraction(self) -> float:
        if self.state == "done":
            return 1.0
        stages = list(STAGES)
        done = sum(_STAGE_WEIGHT[s] for s in stages[:stages.index(self._stage)])
        if self._stage == "model":
            done += _STAGE_WEIGHT["model"] * min(self.epoch / max(self.settings.epochs, 1), 1.0)
        return min(done, 0.99)

    def begin(self) -> None:
        """Record the request, so the workspace is listed at once and resumes as asked."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / REQUEST_FILE, {"prepare": asdict(self.settings), "index": asdict(self.index_settings)})

    def work(self) -> None:
        prepare(self.settings, self.root, progress=False, log=self.log)
        index_workspace(Workspace(self.root), self.index_settings, device=self.settings.device, progress=False,
                        log=self.log)


class EvalJob(Job):
    """``core.evaluate.run_evaluation`` with its own Backend (its own model copy, so Explore is
    not blocked); progress is what the evaluation reports (it resumes from its stored rows)."""

    kind = "evaluate"

    def __init__(self, root: Path, settings: Any, out_dir: Path) -> None:
        super().__init__(root)
        self.settings, self.out_dir = settings, Path(out_dir)
        self._stage, self._fraction = "starting", 0.0

    @property
    def stage(self) -> str:
        """What the evaluation reports it is doing, e.g. ``Sag/Lag: 40/200 tests``."""
        return self._stage

    @property
    def fraction(self) -> float:
        return 1.0 if self.state == "done" else min(self._fraction, 0.99)

    def _progress(self, doing: str, fraction: float) -> None:
        """The evaluation's ``on_progress`` callback."""
        self._stage, self._fraction = doing, fraction

    def work(self) -> None:
        from .backend import Backend
        from .evaluate import run_evaluation

        backend = Backend(self.root, index_settings=index_settings_of(self.root))
        run_evaluation(backend, self.settings, self.out_dir, progress=False, log=self.log, on_progress=self._progress)


_JOBS: dict[tuple[str, Path], Job] = {}
_JOBS_LOCK = threading.Lock()


def start_job(job: Job) -> Job:
    """Start ``job`` unless one of its kind already runs for its workspace (then return that one)."""
    key = (job.kind, job.root.resolve())
    with _JOBS_LOCK:
        current = _JOBS.get(key)
        if current is None or not current.running:
            current = _JOBS[key] = job
            job.begin()
            job._thread.start()
        return current


def job_for(kind: str, root: Path) -> Job | None:
    """The latest job of this kind for ``root`` in this server process, if any."""
    with _JOBS_LOCK:
        return _JOBS.get((kind, Path(root).resolve()))


def resume_settings(root: Path) -> tuple[PrepareSettings, IndexSettings] | None:
    """The settings to finish an interrupted workspace with (request file, else manifest)."""
    request = root / REQUEST_FILE
    if request.exists():
        data = json.loads(request.read_text())
        return PrepareSettings(**data["prepare"]), IndexSettings(**data["index"])
    settings = Workspace(root).manifest().settings
    return (PrepareSettings(**settings), index_settings_of(root)) if settings else None


# --------------------------------------------------------------------------- instances

def aspect_offsets(row: Mapping[str, Any]) -> tuple[int, int] | None:
    """The aspect mention's offsets in the row's text (given, else looked up)."""
    return find_aspect(row["text"], row["aspect"], row.get("start"), row.get("end"))


def span_of(row: Mapping[str, Any]) -> tuple[int, int] | None:
    """The row's stored span as ``(start, end)``."""
    span = row.get("span")
    return (span["start"], span["end"]) if span else None


def marks_for(text: str, aspect: tuple[int, int] | None, span: tuple[int, int] | None, kind: str) -> list[Mark]:
    """Marks for a review: its span as ``kind`` and its aspect mention, where valid."""
    marks = []
    for offsets, mark_kind in ((span, kind), (aspect, "aspect")):
        if offsets and 0 <= offsets[0] < offsets[1] <= len(text):
            marks.append(Mark(offsets[0], offsets[1], mark_kind))
    return marks


@dataclass(frozen=True)
class InstanceFilter:
    """What the instance picker narrows by; empty fields do not filter."""

    query: str = ""
    aspect: str | None = None
    gold: str | None = None
    predicted: str | None = None
    outcome: str | None = None  # "correct" | "wrong"
    source: str | None = None  # a span source, or "corrected"


def effective_source(row: Mapping[str, Any], statuses: Mapping[str, str]) -> str:
    """The span's source, ``corrected`` when a person fixed it."""
    if statuses.get(row["id"]) == "fix":
        return "corrected"
    return (row.get("span") or {}).get("source", "none")


def filter_instances(rows: Iterable[Mapping[str, Any]], f: InstanceFilter,
                     statuses: Mapping[str, str] | None = None) -> list[Mapping[str, Any]]:
    """Rows matching every set field of ``f`` (``query``: case-insensitive substring of text,
    aspect or id); ``statuses`` maps ids to their current annotation status."""
    query = f.query.strip().lower()
    statuses = statuses or {}
    out = []
    for row in rows:
        if query and query not in row["text"].lower() and query not in row["aspect"].lower() and query not in row["id"].lower():
            continue
        if f.aspect and row["aspect"] != f.aspect:
            continue
        if f.gold and row["label"] != f.gold:
            continue
        if f.predicted and row.get("pred") != f.predicted:
            continue
        if f.outcome and ("pred" not in row or (row["pred"] == row["label"]) != (f.outcome == "correct")):
            continue
        if f.source and effective_source(row, statuses) != f.source:
            continue
        out.append(row)
    return out


_SPACES = re.compile(r"\s+")


def option_label(row: Mapping[str, Any], width: int = 90) -> str:
    """A one-line plain-text label for a picker: aspect, then the start of the text."""
    text = _SPACES.sub(" ", row["text"]).strip()
    if len(text) > width:
        text = text[:width - 1] + "…"
    return f"{_SPACES.sub(' ', row['aspect']).strip()} · {text}"


# --------------------------------------------------------------------------- metrics

@dataclass
class Agreement:
    """Sag@K and Lag@K of one ranked list for K = 1..kmax, with the random-ranking baseline
    (``*_random``: mean, low, high per K; ``*_expected``: its analytic expectation)."""

    ks: list[int]
    sag: list[float]
    lag: list[float]
    sag_random: tuple[list[float], list[float], list[float]]
    lag_random: tuple[list[float], list[float], list[float]]
    sag_expected: float
    lag_expected: float

    def at(self, k: int) -> dict[str, float]:
        """Sag, Lag and a random ranking's expectation of each, at ``k`` (clipped to the curve)."""
        i = min(max(k, 1), len(self.ks)) - 1
        return {"sag": self.sag[i], "lag": self.lag[i], "sag_random": self.sag_expected,
                "lag_random": self.lag_expected}


def agreement(ranked_rows: Sequence[int], cosines: Sequence[float], train_labels: Sequence[str], gold: str,
              kmax: int, draws: int = 100) -> Agreement:
    """Sag/Lag K-curves (core.metrics) of a ranking given as row indices into the training set."""
    kmax = min(kmax, len(ranked_rows))
    cos = np.asarray(cosines, dtype=np.float64)
    match = metrics.label_agreement(np.asarray(train_labels), np.asarray(gold))
    base = {name: metrics.random_baseline(values, kmax, draws=draws) for name, values in (("sag", cos), ("lag", match))}
    band = {name: (b.mean.tolist(), b.low.tolist(), b.high.tolist()) for name, b in base.items()}
    ranked = np.asarray(ranked_rows[:kmax])
    return Agreement(list(range(1, kmax + 1)), metrics.k_curve(ranked, cos, kmax).tolist(),
                     metrics.k_curve(ranked, match, kmax).tolist(), band["sag"], band["lag"],
                     base["sag"].expected, base["lag"].expected)


def top_k_overlap(a: Sequence[str], b: Sequence[str], k: int) -> float:
    """|top-K(a) & top-K(b)| / K."""
    return len(set(a[:k]) & set(b[:k])) / k if k else 0.0


def pairwise(methods: Sequence[str], fn: Callable[[str, str], float]) -> list[list[float]]:
    """The square matrix ``fn(row method, column method)``."""
    return [[fn(a, b) for b in methods] for a in methods]


# --------------------------------------------------------------------------- span fixing

_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def word_tokens(text: str) -> list[tuple[int, int]]:
    """Character offsets of the text's words and punctuation marks (one token each)."""
    return [(m.start(), m.end()) for m in _TOKEN.finditer(text)]


def token_range(tokens: Sequence[tuple[int, int]], span: tuple[int, int] | None) -> tuple[int, int]:
    """Indices of the first and last tokens overlapping ``span`` (all tokens when none do)."""
    inside = [i for i, (a, b) in enumerate(tokens) if span and a < span[1] and b > span[0]]
    return (inside[0], inside[-1]) if inside else (0, max(len(tokens) - 1, 0))


def snap(tokens: Sequence[tuple[int, int]], first: int, last: int) -> tuple[int, int]:
    """The character span from the start of token ``first`` to the end of token ``last``."""
    first, last = sorted((first, last))
    return tokens[first][0], tokens[last][1]


def check_span(text: str, start: int, end: int) -> str | None:
    """Why ``[start, end)`` is not a usable span of ``text`` (``None``: it is)."""
    if not 0 <= start < end <= len(text):
        return f"need 0 <= start < end <= {len(text)}, got start {start}, end {end}"
    if not text[start:end].strip():
        return "the span holds only whitespace"
    return None


def review_queue(rows: Sequence[Mapping[str, Any]], statuses: Mapping[str, str], splits: Sequence[str],
                 unreviewed_only: bool) -> list[Mapping[str, Any]]:
    """Instances whose spans to review: by split in the order given (test first), file order within."""
    order = {s: i for i, s in enumerate(splits)}
    picked = [r for r in rows if r["split"] in order and not (unreviewed_only and r["id"] in statuses)]
    return sorted(picked, key=lambda r: order[r["split"]])


# --------------------------------------------------------------------------- case studies

def snapshot_instance(row: Mapping[str, Any], span: tuple[int, int] | None) -> dict[str, Any]:
    """The parts of an instance a case study keeps (self-contained: the text travels with it)."""
    return {"id": row.get("id"), "text": row["text"], "aspect": row["aspect"], "label": row.get("label"),
            "aspect_span": list(aspect_offsets(row) or []) or None, "span": list(span) if span else None}


def case_html(title: str, note: str, snapshot: Mapping[str, Any], meta: Mapping[str, str]) -> Html:
    """One case study like the paper's table 5: the test review, then each method's top-1."""
    test = snapshot["test"]
    review = highlight_html(test["text"], marks_for(test["text"], _pair(test["aspect_span"]), _pair(test["span"]), "test-span"))
    facts = " · ".join(f"{escape_text(k)}: {escape_text(str(v))}" for k, v in meta.items())
    label = f"gold {escape_text(str(test.get('label') or '-'))} · predicted {escape_text(str(test.get('pred') or '-'))}"
    cells = []
    for method, entry in snapshot["methods"].items():
        head = f'<div class="sl-case-method">{escape_text(method)}</div>'
        if not entry.get("top"):
            cells.append(f'<div class="sl-case-cell">{head}<p>no training instance</p></div>')
            continue
        hit = entry["top"][0]
        text = highlight_html(hit["text"], marks_for(hit["text"], _pair(hit["aspect_span"]), _pair(hit["span"]), "train-span"))
        extra = {"aspect": hit["aspect"], "train id": hit["id"]}
        if "sag" in entry:
            extra[f"Sag@{snapshot['k']} / Lag@{snapshot['k']}"] = f"{entry['sag']:.3f} / {entry['lag']:.3f}"
        cells.append(f'<div class="sl-case-cell">{head}{card_html(1, hit["score"], hit["label"], text, extra)}</div>')
    return Html(
        f'<section class="sl-case"><h2>{escape_text(title)}</h2>'
        f'<p class="sl-case-meta">{facts}</p>'
        + (f'<p class="sl-case-note">{escape_text(note)}</p>' if note else "")
        + f'<div class="sl-case-test"><div class="sl-case-aspect">aspect: {escape_text(test["aspect"])} · {label}</div>'
        f'{review}</div><div class="sl-case-grid">{"".join(cells)}</div></section>')


def _pair(value: Any) -> tuple[int, int] | None:
    return (int(value[0]), int(value[1])) if value else None


def report_html(sections: Sequence[Html], css: str, title: str = "SpanLens case studies") -> str:
    """A standalone HTML document (inline CSS, no scripts) of case-study sections."""
    if "</style" in css.lower():
        raise ValueError("the style sheet must not close its <style> element")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{css}</style></head>"
            f"<body class=\"sl-report\"><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")
