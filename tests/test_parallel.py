"""Ray (optional): retrains and index shards as Ray tasks give the same results as in one process."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.backend import Backend
from core.evaluate import EvalSettings, run_evaluation
from core.lds import LdsSettings
from core.parallel import LocalMapper, RaySettings, mapper, worker_cache

QUIET = dict(progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on loopback with 2 CPUs for the module's tests."""
    with mapper(RaySettings(num_cpus=2)) as pool:
        yield pool


@pytest.fixture
def one_thread():
    """Ray tasks run with one torch thread; so does the in-process reference (identical sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _copy(tiny_workspace: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(tiny_workspace, tmp_path / name, ignore=shutil.ignore_patterns("store.sqlite*")))


def test_mappers_apply_a_function_to_every_item(local_ray):
    assert list(LocalMapper().map(pow, [1, 2, 3], 2)) == [(1, 1), (2, 4), (3, 9)]
    assert sorted(local_ray.map(pow, [1, 2, 3], 2)) == [(1, 1), (2, 4), (3, 9)]
    assert worker_cache(("k", 1), lambda: "made") == "made" and worker_cache(("k", 1), lambda: "again") == "made"


def test_retrains_over_ray_equal_retrains_in_one_process(tiny_workspace, tmp_path, local_ray, one_thread):
    """Ral accuracies and LDS outputs, computed as Ray tasks, equal those computed here."""
    base = EvalSettings(methods=("TracIn", "TracIn++"), ks=(3,), kmax=3, test_limit=4, ral=(50,), faithfulness_runs=0,
                        lds=LdsSettings(subsets=2, alpha=0.5, seed=0))
    here = run_evaluation(Backend(_copy(tiny_workspace, tmp_path, "a"), device="cpu"), base, tmp_path / "out-a",
                          **QUIET)
    there = run_evaluation(Backend(_copy(tiny_workspace, tmp_path, "b"), device="cpu"),
                           EvalSettings(**{**base.__dict__, "ray": RaySettings()}), tmp_path / "out-b", **QUIET)
    assert here.ral.accuracy.tolist() == there.ral.accuracy.tolist()
    np.testing.assert_array_equal(here.lds_per_test.lds.to_numpy(), there.lds_per_test.lds.to_numpy())
    assert there.summary["settings"]["ray"] is not None
