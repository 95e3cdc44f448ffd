"""Ray (optional): retrains and index shards as Ray tasks give the same results as in one process."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch

from core import index_shards
from core.artifacts import build_ekfac
from core.backend import Backend
from core.evaluate import EvalSettings, run_evaluation
from core.index import IndexSettings
from core.index_build import build_index
from core.lds import LdsSettings
from core.parallel import LocalMapper, RayMapper, RaySettings, mapper, worker_cache
from core.workspace import Workspace

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


def test_evaluation_over_ray_equals_the_evaluation_in_one_process(tiny_workspace, tmp_path, local_ray, one_thread):
    """Sag/Lag curves, Ral accuracies and LDS outputs, computed as Ray tasks, equal those computed here;
    so do the faithfulness run's, whose new variants' training rows are streamed in shards."""
    base = EvalSettings(methods=("TracIn", "TracIn++"), ks=(3,), kmax=3, test_limit=4, ral=(50,), faithfulness_runs=2,
                        lds=LdsSettings(subsets=2, alpha=0.5, seed=0))
    here = run_evaluation(Backend(_copy(tiny_workspace, tmp_path, "a"), device="cpu"), base, tmp_path / "out-a",
                          **QUIET)
    there = run_evaluation(Backend(_copy(tiny_workspace, tmp_path, "b"), device="cpu"),
                           EvalSettings(**{**base.__dict__, "ray": RaySettings()}), tmp_path / "out-b", **QUIET)
    assert here.ral.accuracy.tolist() == there.ral.accuracy.tolist()
    pd.testing.assert_frame_equal(here.per_test_curves, there.per_test_curves)  # Sag/Lag batches as tasks
    assert here.per_test.top1.tolist() == there.per_test.top1.tolist()
    np.testing.assert_array_equal(here.lds_per_test.lds.to_numpy(), there.lds_per_test.lds.to_numpy())
    runs = [frame[frame.run == 1].set_index(["test_id", "method"]).spearman.sort_index()
            for frame in (here.faithfulness, there.faithfulness)]
    assert runs[0].notna().all() and len(runs[0].loc[:, "TracIn++"]) == 4  # TracIn++ reads new variants
    pd.testing.assert_series_equal(*runs, rtol=1e-6)  # shards' batches differ from one pass's: rounding only
    assert there.summary["settings"]["ray"] is not None


def test_a_sharded_side_equals_a_streamed_side(tiny_workspace):
    """Training rows streamed as tasks over shards (here in this process) give a streamed
    pass's inner products, each shard in its place, with progress over every row."""
    from core.model import HiddenCache
    from core.training_sides import ShardedSide, StreamedSide

    backend = Backend(tiny_workspace, device="cpu")
    engine, loaded = backend.engine(), backend.loaded
    full, labels = backend.train_cache()
    masked = HiddenCache.load(backend.index.root / "prefix-masked.safetensors")
    params = {n: t + 0.01 * torch.randn_like(t) for n, t in loaded.points["final"].items()}  # a point the index lacks
    loaded.points["elsewhere"] = params
    test = backend.test_input(backend.instances("test")[0].id, "gold")
    requests = {kind: (kind, engine.test_vectors([test], "final", kind)) for kind in ("full", "diff")}
    try:
        expected = StreamedSide(loaded, engine.projector, full, masked, labels, backend.index.settings.batch_size
                                ).dot_many("elsewhere", requests)
    finally:
        loaded.points.pop("elsewhere")
    done: list[int] = []
    side = ShardedSide(LocalMapper(), (str(tiny_workspace), backend.fingerprint), {"elsewhere": params}, len(full),
                       progress=done.append, shard_rows=len(full) // 3)
    got = side.dot_many("elsewhere", requests)
    assert len(side.shards) >= 3 and sum(done) == len(full) == got["full"].shape[1]
    for kind in requests:
        assert expected[kind].abs().max() > 0
        # float32 sums over batches of other lengths (other padding): rounding of a few 1e-6 of the largest
        torch.testing.assert_close(got[kind], expected[kind], rtol=1e-4, atol=1e-5 * float(expected[kind].abs().max()))
    with pytest.raises(ValueError, match="Gauss-Newton"):
        side.gauss_newton()


class KilledMidBuild(RayMapper):
    """Ray tasks whose workers are killed (force-cancelled) once the first result is in."""

    def map(self, fn, items, *args):
        pending = self.submit(fn, items, *args)
        done, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(done[0]), ray.get(done[0])
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.wait(list(pending), num_returns=len(pending))  # every cancelled task ended: no late writes
        raise RuntimeError("workers killed mid-build")


class Counting(RayMapper):
    """Ray tasks, the items submitted recorded."""

    def __init__(self, settings: RaySettings):
        super().__init__(settings)
        self.items: list = []

    def submit(self, fn, items, *args):
        items = list(items)
        self.items += items
        return super().submit(fn, items, *args)


def _index_files(root: Path) -> dict[str, np.ndarray]:
    """Every matrix of an index: rows (.npy) and sums (.npz), by file and key."""
    out = {p.name: np.load(p) for p in sorted(root.glob("*.npy"))}
    for path in sorted(root.glob("*.npz")):
        with np.load(path) as data:
            out.update({f"{path.name}:{key}": data[key] for key in data.files})
    return out


def test_a_sharded_build_equals_the_single_process_index_and_resumes_after_a_kill(
        tiny_workspace, tmp_path, local_ray, one_thread, monkeypatch):
    """The index built as shard tasks on Ray holds the single-process index's rows bit for bit
    (every point and kind, TRAK rows, EK-FAC's rows in its eigenbasis and CLS embeddings
    included) and equal sums; killing the workers mid-build and running again completes it,
    reusing the shards that were done."""
    monkeypatch.setattr(index_shards, "SHARD_BATCHES", 2)
    settings = IndexSettings(dim=32, seed=3, batch_size=16)
    built = {}
    for name in ("single", "sharded"):
        ws = _copy(tiny_workspace, tmp_path, name)
        shutil.rmtree(ws / "index")
        built[name] = Workspace(ws)
        build_ekfac(built[name], batch_size=16, progress=False, log=lambda _: None)
    groups = ("grad", "trak", "ekfac")
    build_index(built["single"], settings, groups=groups, **QUIET)
    with pytest.raises(RuntimeError, match="killed"):
        build_index(built["sharded"], settings, groups=groups, mapper=KilledMidBuild(RaySettings()), **QUIET)
    shards = built["sharded"].root / "index" / "shards"
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.npz") if ".tmp" not in p.name}
    assert kept  # the shard that finished before the kill
    counting = Counting(RaySettings())
    build_index(built["sharded"], settings, groups=groups, mapper=counting, **QUIET)
    assert not shards.exists()  # assembled and removed
    single, sharded = (_index_files(built[n].root / "index") for n in ("single", "sharded"))
    assert single.keys() == sharded.keys() and any(k.startswith("checkpoint-") for k in single)
    assert "final.ekfac-diff.npy" in single
    for name, rows in single.items():
        if ".npz:" in name:  # sums: added shard by shard instead of batch by batch
            np.testing.assert_allclose(sharded[name], rows, rtol=1e-10, err_msg=name)
        else:
            np.testing.assert_array_equal(sharded[name], rows, err_msg=name)
    meta = json.loads((built["sharded"].root / "index" / "meta.json").read_text())
    assert meta["done"] and set(meta["progress"].values()) == {3}  # 48 rows / 16 = 3 batches in every pass
    assert len(counting.items) == 2 * len(meta["progress"]) - len(kept)  # 2 shards a pass; the kept ones reused


def test_ray_options_reach_the_task_settings(tmp_path, capsys):
    """--ray-cpus and --ray-gpus (a share of a GPU reserved per task) reach RaySettings; no flag, no
    Ray; --ray-gpus alone is refused before any work."""
    from core.__main__ import build_parser, main
    from core.cli_options import ray_settings

    parse = build_parser().parse_args
    assert ray_settings(parse(["index", "--workspace", "w", "--ray", "--ray-cpus", "2", "--ray-gpus", "0.25"])) == \
        RaySettings(num_cpus=2, gpus=0.25)
    assert ray_settings(parse(["evaluate", "--workspace", "w", "--ray-address", "auto"])) == RaySettings(address="auto")
    assert ray_settings(parse(["index", "--workspace", "w"])) is None
    with_device = ray_settings(parse(["evaluate", "--workspace", "w", "--ray", "--device", "cuda:1"]))
    assert with_device == RaySettings(device="cuda:1") and with_device.task_device == "cuda:1"
    assert (RaySettings().task_device, RaySettings(device="auto").task_device) == ("cpu", "cpu")
    assert RaySettings(gpus=0.5).task_device == RaySettings(gpus=0.5, device="cuda:1").task_device == "cuda"
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            parse(["index", "--workspace", "w", "--ray", "--ray-gpus", bad])
    target = tmp_path / "never-made"
    assert main(["prepare", "--dataset", "mams", "--workspace", str(target), "--ray-gpus", "1"]) == 2
    assert "--ray-gpus goes with --ray" in capsys.readouterr().err and not target.exists()
    assert main(["prepare", "--dataset", "mams", "--workspace", str(target), "--ray", "--ray-gpus", "1",
                 "--device", "cpu"]) == 2
    assert "reserve GPUs and not use them" in capsys.readouterr().err and not target.exists()


def test_tasks_use_the_device_the_settings_name(local_ray):
    """A task's unnamed device is its settings' (the driver's --device; else CPU without reserved
    GPUs), not whatever the worker's node has."""
    from core.model import pick_device

    assert list(RayMapper(RaySettings(device="meta")).map(pick_device, [None])) == [(None, torch.device("meta"))]
    assert list(local_ray.map(pick_device, [None])) == [(None, torch.device("cpu"))]
    assert pick_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")  # this process untouched


def test_asking_for_more_gpus_than_the_cluster_has_is_refused(local_ray):
    """Tasks that reserve GPUs a cluster lacks could never start: refused instead of waiting forever."""
    with pytest.raises(RuntimeError, match="the Ray cluster has 0 GPUs"), mapper(RaySettings(num_cpus=2, gpus=0.5)):
        pass
