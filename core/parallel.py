"""Running embarrassingly parallel work on Ray, optional and off by default.

A :class:`Mapper` applies a module-level function to items and yields ``(item, result)`` as
results arrive: :class:`LocalMapper` in this process, one after the other (exactly today's
behaviour, and what runs without ``--ray``); :class:`RayMapper` as Ray tasks on a local Ray
started with this machine's cores (``--ray``) or on a running cluster (``--ray-address``). A
task's function gets only small arguments (the workspace path, settings, the item) and opens
what it needs from the shared workspace path itself, once per worker process
(:func:`worker_cache`), so nothing large is pickled; its result is small (rows of one shard, the
outputs of one retrain). Work that writes files writes each one atomically and is skipped when
its file is there, so an interrupted or partly failed run resumes.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[1]
"""The folder holding ``core``: on the workers' path (a cluster's workers need SpanLens installed there)."""
PASSED_ENV = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "SPANLENS_DATA", "HF_HOME")
_WORKER_CACHE: dict[tuple, Any] = {}
WORKER_CACHE_SIZE = 4


@dataclass(frozen=True)
class RaySettings:
    """Where tasks run: ``address`` of a running cluster (None: start a local Ray with
    ``num_cpus``, default every core); ``threads`` per task (torch threads); ``gpus`` per task;
    ``device``: the tasks' device (the driver's ``--device``; None: :attr:`task_device`)."""

    address: str | None = None
    num_cpus: int | None = None
    threads: int = 1
    gpus: float = 0.0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1 or self.threads < 1 or self.gpus < 0:
            raise ValueError("num_cpus and threads must be at least 1, gpus at least 0")
        if self.gpus and (self.device or "").startswith("cpu"):
            raise ValueError(f"--device {self.device} with --ray-gpus {self.gpus:g}: the tasks would reserve GPUs "
                             "and not use them")

    @property
    def task_device(self) -> str:
        """The device each task uses. A task that reserves GPUs uses the one Ray gave it (``cuda``:
        Ray narrows the visible devices, so a driver's ``cuda:N`` means nothing there); one that
        reserves none uses the device named, else its CPU (it never takes a GPU it did not
        reserve: Ray leaves every GPU of a node visible to it)."""
        if self.gpus:
            return "cuda"
        return self.device if self.device not in (None, "", "auto") else "cpu"


class Mapper(Protocol):
    def map(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[tuple[Any, Any]]:
        """``(item, fn(item, *args))`` for every item, as the results arrive."""


class LocalMapper:
    """Every item in this process, in order."""

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[tuple[Any, Any]]:
        for item in items:
            yield item, fn(item, *args)


class RayMapper:
    """Every item as a Ray task (``threads`` CPUs and ``gpus`` GPUs each), results as they finish."""

    def __init__(self, settings: RaySettings):
        self.settings = settings

    def submit(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> dict[Any, Any]:
        """Start a task per item; {object ref: item}."""
        import ray

        remote = ray.remote(num_cpus=self.settings.threads, num_gpus=self.settings.gpus, max_retries=0)(_run)
        shared = [ray.put(a) for a in args]  # once, however many tasks read them
        return {remote.remote(fn, item, self.settings.threads, self.settings.task_device, *shared): item
                for item in items}

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[tuple[Any, Any]]:
        import ray

        pending = self.submit(fn, items, *args)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(done[0])
            yield item, ray.get(done[0])


def _run(fn: Callable[..., Any], item: Any, threads: int, device: str, *args: Any) -> Any:
    """A task's body: ``threads`` torch threads and ``device`` for what it loads, then the function."""
    import torch

    from .model import set_default_device

    torch.set_num_threads(threads)
    set_default_device(device)
    return fn(item, *args)


def worker_cache(key: tuple, make: Callable[[], Any]) -> Any:
    """What a worker process opened once (a model, caches) for later tasks with the same key; the
    least recently used of more than :data:`WORKER_CACHE_SIZE` entries is dropped (bounded memory)."""
    if key in _WORKER_CACHE:
        _WORKER_CACHE[key] = _WORKER_CACHE.pop(key)  # most recent last
    else:
        _WORKER_CACHE[key] = make()
        while len(_WORKER_CACHE) > WORKER_CACHE_SIZE:
            _WORKER_CACHE.pop(next(iter(_WORKER_CACHE)))
    return _WORKER_CACHE[key]


def forget(key: tuple) -> None:
    """Drop one entry of :func:`worker_cache` (e.g. a backend lent by the calling process)."""
    _WORKER_CACHE.pop(key, None)


@contextmanager
def mapper(settings: RaySettings | None) -> Iterator[Mapper]:
    """A :class:`LocalMapper` without settings; else a :class:`RayMapper` on a Ray session,
    started (local: loopback only) and shut down here unless one is already running."""
    if settings is None:
        yield LocalMapper()
        return
    try:
        import ray
    except ImportError as err:
        raise RuntimeError("--ray needs Ray (pip install -r requirements.txt)") from err
    started = not ray.is_initialized()
    if started:
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                       runtime_env={"env_vars": env})
        if settings.address:
            ray.init(address=settings.address, **options)
        else:  # tasks at the priority work has without --ray (Ray's default niceness of 15 starves them beside other jobs)
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=settings.num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1", **options)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if settings.gpus > gpus:
            raise RuntimeError(f"--ray-gpus {settings.gpus:g}: the Ray cluster has {gpus:g} GPUs, so no task could start")
        yield RayMapper(settings)
    finally:
        if started:
            ray.shutdown()
