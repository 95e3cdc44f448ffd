"""Background jobs of the app's server process: building (or importing) a workspace, running an evaluation.

A job runs in a daemon thread; pages read its ``lines``, ``state``, ``stage`` and ``fraction``
while it runs, so it survives browser reloads (not a server stop: the work resumes when started
again). Progress comes from the work's own callbacks, never from parsing its log.
"""
from __future__ import annotations

import json
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .catalog import REQUEST_FILE, index_settings_of
from .data import DataError
from .importing import ImportSettings, import_model
from .index import IndexSettings
from .prepare import prepare
from .prepare_settings import PrepareSettings
from .workspace import STAGES, Workspace, write_json_atomic

STAGE_WEIGHTS = {"data": 0.02, "spans": 0.05, "model": 0.55, "importance": 0.03, "variants": 0.05, "index": 0.30}
"""Each build stage's share of the build bar (roughly its share of the time on a CPU) with one
classifier; ``prepare --models N`` adds N - 1 more, each as long to train as the first."""
EXPECTED_ERRORS = (DataError, FileNotFoundError, KeyError, ValueError)
"""Errors in the user's data or settings: shown as one line, without a traceback."""


def stage_weights(models: int = 1) -> dict[str, float]:
    """Each stage's share of the build bar for a workspace of ``models`` classifiers (sum 1)."""
    raw = {**STAGE_WEIGHTS, "models": STAGE_WEIGHTS["model"] * (models - 1)}
    return {stage: weight / sum(raw.values()) for stage, weight in raw.items()}


class Job:
    """Work on one workspace in a background thread of the server process."""

    kind = "job"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.lines: list[str] = []
        self.state = "running"  # "running" | "done" | "error"
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self._stage, self._fraction = "starting", 0.0
        self._thread = threading.Thread(target=self._run, name=f"{self.kind} {self.root.name}", daemon=True)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def fraction(self) -> float:
        return 1.0 if self.state == "done" else min(self._fraction, 0.99)

    @property
    def stage(self) -> str:
        return self._stage

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
        except EXPECTED_ERRORS as err:  # the message says what is wrong and what to do
            self.error = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
            self.state = "error"
        except Exception as err:  # unexpected: shown with where it happened; the work resumes when started again
            self.error = f"{type(err).__name__}: {err}"
            self.lines.append(traceback.format_exc(limit=3))
            self.state = "error"
        finally:
            self.finished = time.time()


class PrepareJob(Job):
    """``prepare`` (or ``import``, given :class:`ImportSettings`) then the index build (both resume
    by themselves); the bar moves with their progress callbacks: each stage's weight times the
    fraction of it done."""

    kind = "prepare"

    def __init__(self, root: Path, settings: PrepareSettings | ImportSettings, index_settings: IndexSettings) -> None:
        super().__init__(root)
        self.settings, self.index_settings = settings, index_settings
        self._stage = "data"

    def on_progress(self, stage: str, fraction: float) -> None:
        """Where the build is: ``stage`` (one of STAGES) and the fraction of it done."""
        stages = list(STAGES)
        weights = stage_weights(getattr(self.settings, "models", 1))
        done = sum(weights[s] for s in stages[:stages.index(stage)])
        self._stage = stage
        self._fraction = max(self._fraction, done + weights[stage] * fraction)

    def begin(self) -> None:
        """Record the request, so the workspace is listed at once and resumes as asked."""
        self.root.mkdir(parents=True, exist_ok=True)
        kind = "import" if isinstance(self.settings, ImportSettings) else "prepare"
        write_json_atomic(self.root / REQUEST_FILE, {kind: asdict(self.settings), "index": asdict(self.index_settings)})

    def work(self) -> None:
        from .backend import index_workspace

        build = import_model if isinstance(self.settings, ImportSettings) else prepare
        build(self.settings, self.root, progress=False, log=self.log, on_progress=self.on_progress)
        self.on_progress("index", 0.0)
        index_workspace(Workspace(self.root), self.index_settings, device=self.settings.device, progress=False,
                        log=self.log, on_progress=lambda f: self.on_progress("index", f))


class EvalJob(Job):
    """``core.evaluate.run_evaluation`` with its own Backend (its own model copy, so Explore is
    not blocked); progress is what the evaluation reports (it resumes from its stored rows)."""

    kind = "evaluate"

    def __init__(self, root: Path, settings: Any, out_dir: Path) -> None:
        super().__init__(root)
        self.settings, self.out_dir = settings, Path(out_dir)

    def _progress(self, doing: str, fraction: float) -> None:
        """The evaluation's ``on_progress`` callback."""
        self._stage, self._fraction = doing, fraction

    def work(self) -> None:
        from .backend import Backend
        from .evaluate import run_evaluation

        run_evaluation(Backend(self.root), self.settings, self.out_dir, progress=False, log=self.log,
                       on_progress=self._progress)


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


def forget_jobs(root: Path) -> None:
    """Drop the finished jobs of ``root`` (a deleted workspace); ValueError while one runs."""
    key = Path(root).resolve()
    with _JOBS_LOCK:
        mine = {k: job for k, job in _JOBS.items() if k[1] == key}
        if any(job.running for job in mine.values()):
            raise ValueError(f"a job is still running for {root}; wait for it to end")
        for k in mine:
            del _JOBS[k]


def resume_settings(root: Path) -> tuple[PrepareSettings | ImportSettings, IndexSettings] | None:
    """The settings to finish an interrupted workspace with (request file, else manifest)."""
    request = root / REQUEST_FILE
    if request.exists():
        data = json.loads(request.read_text())
        made = ImportSettings(**data["import"]) if "import" in data else PrepareSettings(**data["prepare"])
        return made, IndexSettings(**data["index"])
    settings = Workspace(root).manifest().settings
    if not settings:
        return None
    return (ImportSettings if settings.get("imported") else PrepareSettings)(**settings), index_settings_of(root)
