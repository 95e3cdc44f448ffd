"""Hardening (issue 16): bad data and settings refused before work, spans past the token limit,
damaged files, crash-safe Gauss-Newton saves, concurrent index checks, the app as a server."""
from __future__ import annotations

import fcntl
import itertools
import json
import multiprocessing
import os
import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from core import catalog, jobs
from core.__main__ import main
from core.data import DataError, hash_split, load_dataset
from core.index import IndexSettings
from core.index_build import build_index
from core.instances import Instances
from core.jobs import PrepareJob
from core.model import HiddenCache, encode_pairs, load_backbone
from core.prepare import PREFIX_SHARE, prepare
from core.prepare_settings import PrepareSettings
from core.workspace import Workspace
from tests.conftest import tiny_settings
from tests.review_data import reviews, small_settings, write_jsonl

REPO = Path(__file__).resolve().parents[1]
EXACT = IndexSettings(dim=None, batch_size=8)


def all_train(n: int) -> list[dict]:
    """``n`` reviews without a split column that the 80/10/10 hash all puts in train."""
    return [r for r in reviews(20 * n, split=False) if hash_split(r["text"]) == "train"][:n]


def copy_workspace(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("store.sqlite*", ".index.lock"))
    return target


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if ``prepare`` loads a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr("core.prepare.load_backbone", refuse)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting exit 2 with one ``error:`` line on stderr; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- 1. validate before work

def test_a_small_file_without_splits_is_one_line_saying_what_to_do(tmp_path, tiny_backbone, capsys, no_model):
    data = write_jsonl(tmp_path / "eight.jsonl", all_train(8))
    ws = tmp_path / "ws"
    err = one_line_error(capsys, ["prepare", "--dataset", str(data), "--workspace", str(ws),
                                  "--model", str(tiny_backbone), "--device", "cpu"])
    assert "split is empty: give a 'split' column, or use more rows" in err
    assert "the 80/10/10 hash put none of 8 texts in" in err
    assert not ws.exists(), "nothing of the workspace is written"


def test_a_single_class_dataset_is_refused(tmp_path, tiny_backbone, no_model):
    data = write_jsonl(tmp_path / "one.jsonl", reviews(20, labels=("positive",)))
    with pytest.raises(DataError, match="a single-class dataset is refused: every score would be 0"):
        prepare(small_settings(data, tiny_backbone), tmp_path / "ws", progress=False, log=lambda _: None)
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.csv", ""),
                                           ("empty.xml", ""), ("bom.csv", "\ufeff\n")])
def test_an_empty_file_is_refused(tmp_path, tiny_backbone, name, content, no_model):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"{name}: the file is empty; expected"):
        load_dataset(str(path))
    with pytest.raises(DataError, match="the file is empty"):
        prepare(small_settings(path, tiny_backbone), tmp_path / "ws", progress=False, log=lambda _: None)
    assert not (tmp_path / "ws").exists()


def test_an_empty_split_says_how_the_splits_were_given(tmp_path, tiny_backbone, no_model):
    named = write_jsonl(tmp_path / "named.jsonl", [r for r in reviews(20) if r["split"] != "dev"])
    folder = tmp_path / "folder"
    folder.mkdir()
    for split in ("train", "test"):
        write_jsonl(folder / f"{split}.jsonl", [{**r, "split": split} for r in reviews(6)])
    conflicts = write_jsonl(tmp_path / "conflicts.jsonl", [{**r, "label": "conflict"} for r in reviews(3)])
    with pytest.raises(DataError, match=r"conflicts.jsonl: no instances to use \(3 conflict skipped\)"):
        prepare(small_settings(conflicts, tiny_backbone), tmp_path / "ws", progress=False, log=lambda _: None)
    for data, expected in ((named, "the 'split' column of"), (folder, f"add a dev file to {folder}")):
        with pytest.raises(DataError, match="the dev split is empty") as caught:
            prepare(small_settings(data, tiny_backbone), tmp_path / "ws", progress=False, log=lambda _: None)
        assert expected in str(caught.value)


@pytest.mark.parametrize("field, value", [
    ("train_limit", 0), ("eval_limit", -5), ("epochs", 0), ("batch_size", 0), ("checkpoints", 0), ("variants", 0),
    ("trainable_layers", 0), ("lr", 0.0), ("variant_lr", -1e-4), ("lr", float("nan")), ("max_length", 7),
    ("seed", -1), ("data_seed", -1), ("data_seed", 0.5), ("epochs", 1.5), ("batch_size", True), ("variant_optimizer", "adam"),
])
def test_prepare_settings_are_range_checked(field, value):
    with pytest.raises(ValueError, match=f"^{field} \\(--{field.replace('_', '-')}\\) must be"):
        PrepareSettings(**{field: value})


def test_prepare_settings_edges_are_accepted():
    PrepareSettings(train_limit=1, eval_limit=1, epochs=1, batch_size=1, checkpoints=1, variants=1,
                    trainable_layers=1, lr=1e-9, variant_lr=1, max_length=8, seed=0, variant_optimizer="sgd")


def test_an_app_job_shows_a_data_error_as_one_line_with_the_report(tmp_path, tiny_backbone):
    data = write_jsonl(tmp_path / "one.jsonl", reviews(20, labels=("negative",)) + [
        {"text": "the tea was fine and bad", "aspect": "tea", "label": "conflict", "split": "train"}])
    job = jobs.start_job(PrepareJob(tmp_path / "ws", small_settings(data, tiny_backbone), EXACT))
    job._thread.join()
    assert job.state == "error" and job.error.startswith("a single-class dataset is refused")
    assert not any("Traceback" in line for line in job.lines)
    assert any("skipped 1 conflict" in line for line in job.lines), job.lines
    assert any(line.startswith("  used: train 14, dev 3, test 3") for line in job.lines), job.lines


# ----------------------------------------------------------------------------- 2, 5. spans past the limit; the data report

def test_spans_past_the_token_limit_are_counted_marked_and_warned(tmp_path, tiny_backbone):
    rows = reviews(20)
    for n in (0, 3, 15):  # two training instances and a dev one: their aspect's clause after 30 words
        rows[n] = reviews(20, filler=10)[n]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    lines: list[str] = []
    manifest = prepare(small_settings(data, tiny_backbone, max_length=24), tmp_path / "ws", progress=False,
                       log=lines.append)
    past = manifest.stages["spans"]["stats"]["past_token_limit"]
    assert (past["train"], past["dev"], past["test"], past["max_length"]) == (2, 1, 0, 24)
    warning = [line for line in lines if line.startswith("[spans] warning:")]
    assert len(warning) == 1 and "2 training, 1 dev and 0 test instances" in warning[0]
    records = Instances(Workspace(tmp_path / "ws").load_instances(), {})
    flagged = sorted(r.text.split()[-1] for r in records.records if r.span_truncated)
    assert flagged == ["0", "15", "3"]
    # the data report: files read, the split assignment, what is used
    assert any(line.startswith("[data] long: 20 instances read") for line in lines)
    assert any("instances per split: train 14, dev 3, test 3" in line for line in lines)
    # up to date: no recount, no second warning, the flags stay
    lines.clear()
    prepare(small_settings(data, tiny_backbone, max_length=24), tmp_path / "ws", progress=False, log=lines.append)
    assert not any("warning" in line for line in lines)
    assert sum(r.get("span_truncated", False) for r in Workspace(tmp_path / "ws").load_instances()) == 3


# ----------------------------------------------------------------------------- 3. an aspect longer than the limit

def test_an_aspect_longer_than_the_token_limit_is_one_line(tiny_backbone, tiny_workspace, tmp_path, capsys):
    _, tokenizer = load_backbone(str(tiny_backbone), ["negative", "positive"])
    aspect = " ".join(["pasta"] * 70)
    with pytest.raises(ValueError, match=r"has 70 tokens, but the token limit of 64 leaves room for 60"):
        encode_pairs(tokenizer, [("soup", "good soup"), (aspect, f"the {aspect} was good")], 64)
    assert len(encode_pairs(tokenizer, [(" ".join(["pasta"] * 60), "good food")], 64)[0]) == 64
    ws = copy_workspace(tiny_workspace, tmp_path / "ws")
    err = one_line_error(capsys, ["explain", "--workspace", str(ws), "--test-text", f"The {aspect} was good.",
                                  "--aspect", aspect, "--method", "TracIn", "--device", "cpu"])
    assert "has 70 tokens" in err and "shorten the aspect" in err


# ----------------------------------------------------------------------------- 4. damaged prefix caches

@pytest.mark.parametrize("relative, command", [("prefix/train.safetensors", "python -m core prepare"),
                                               ("index/prefix-masked.safetensors", "python -m core index")])
def test_a_truncated_prefix_cache_names_the_file_and_the_command(tiny_workspace, tmp_path, relative, command):
    source = (tiny_workspace / relative).read_bytes()
    target = tmp_path / "ws" / relative
    target.parent.mkdir(parents=True)
    for damaged in (source[: len(source) // 2], source[:5], b"not a safetensors file at all"):
        target.write_bytes(damaged)
        with pytest.raises(ValueError) as caught:
            HiddenCache.load(target)
        message = str(caught.value)
        assert message.startswith(f"{target}: unreadable frozen-prefix cache") and command in message
        assert f"--workspace {tmp_path / 'ws'}" in message and "\n" not in message
    target.write_bytes(source)
    assert len(HiddenCache.load(target)) > 0


def test_the_index_command_on_a_truncated_prefix_cache_is_one_line(tiny_workspace, tmp_path, capsys):
    ws = copy_workspace(tiny_workspace, tmp_path / "ws")
    shutil.rmtree(ws / "index")
    cache = ws / "prefix" / "train.safetensors"
    cache.write_bytes(cache.read_bytes()[:1000])
    err = one_line_error(capsys, ["index", "--workspace", str(ws), "--proj-dim", "0", "--device", "cpu"])
    assert f"{cache}: unreadable frozen-prefix cache" in err and "python -m core prepare" in err


def test_prepare_rebuilds_a_removed_prefix_cache(tiny_workspace, tmp_path, data_dir, tiny_backbone):
    ws = copy_workspace(tiny_workspace, tmp_path / "ws")
    (ws / "prefix" / "dev.safetensors").unlink()
    lines: list[str] = []
    prepare(tiny_settings(data_dir, tiny_backbone), ws, progress=False, log=lines.append)
    assert all("up to date" in line for line in lines if line.startswith("[")), lines
    rebuilt = HiddenCache.load(ws / "prefix" / "dev.safetensors").states
    original = HiddenCache.load(tiny_workspace / "prefix" / "dev.safetensors").states
    assert len(rebuilt) == len(original) and all(torch.equal(a, b) for a, b in zip(rebuilt, original))


# ----------------------------------------------------------------------------- the Gauss-Newton save

class Kill(KeyboardInterrupt):
    """A simulated kill -9 at one moment of the index build."""


class GaussNewtonKiller:
    """Raises :class:`Kill` at one window of the flush after the ``batch``-th batch at theta
    (counted from the start of the current run): writing the Gauss-Newton file (a truncated
    temporary file is left), renaming it, writing meta.json (half a temporary file is left), or
    renaming that."""

    def __init__(self, monkeypatch, index_root: Path) -> None:
        import core.index_build as index_mod
        import core.index_shards as passes

        self.root, self.plan, self.batches, self.fired = index_root, None, 0, []
        real_batch, real_savez, real_replace = passes.gauss_newton_batch, np.savez, os.replace
        real_json = index_mod.write_json_atomic

        def batch(*args):
            self.batches += 1
            return real_batch(*args)

        def savez(path, **arrays):
            real_savez(path, **arrays)
            if self._due("savez"):
                Path(path).write_bytes(Path(path).read_bytes()[:100])
                raise Kill

        def replace(src, dst):
            name = Path(dst).name
            if Path(dst).parent == self.root and self._due({"ggn.npz": "ggn-replace", "meta.json": "meta-replace"}.get(name)):
                raise Kill
            real_replace(src, dst)

        def write_json(path, data):
            if Path(path).name == "meta.json" and self._due("meta-write"):
                Path(path).with_name("meta.json.tmp").write_text(json.dumps(data)[:50])
                raise Kill
            real_json(path, data)

        monkeypatch.setattr(passes, "gauss_newton_batch", batch)
        monkeypatch.setattr(np, "savez", savez)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(index_mod, "write_json_atomic", write_json)

    def arm(self, window: str, batch: int) -> None:
        self.plan, self.batches = (window, batch), 0

    def _due(self, window: str | None) -> bool:
        if self.plan is None or self.plan != (window, self.batches):
            return False
        self.fired.append(self.plan)
        self.plan = None
        return True


def test_a_kill_in_every_window_of_the_gauss_newton_save_resumes_to_the_same_bytes(tiny_workspace, tmp_path,
                                                                                   monkeypatch):
    import core.index_build as index_mod

    ws = copy_workspace(tiny_workspace, tmp_path / "ws")
    shutil.rmtree(ws / "index")
    monkeypatch.setattr(index_mod, "FLUSH_EVERY", 1)
    killer = GaussNewtonKiller(monkeypatch, ws / "index")
    plan = [("savez", 2), ("ggn-replace", 2), ("meta-write", 1), ("meta-replace", 1), ("savez", 1),
            ("ggn-replace", 2)]  # six batches at theta: the last kill is in the flush of the last batch
    for window, batch in plan:
        killer.arm(window, batch)
        with pytest.raises(Kill):
            build_index(Workspace(ws), EXACT, progress=False, log=lambda _: None)
    assert killer.fired == plan
    build_index(Workspace(ws), EXACT, progress=False, log=lambda _: None)
    reference, resumed = tiny_workspace / "index", ws / "index"
    names = sorted(p.name for p in reference.iterdir() if p.suffix in (".npy", ".safetensors"))
    assert names == sorted(p.name for p in resumed.iterdir() if p.suffix in (".npy", ".safetensors"))
    for name in names:
        assert (reference / name).read_bytes() == (resumed / name).read_bytes(), name
    with np.load(reference / "ggn.npz") as want, np.load(resumed / "ggn.npz") as got:
        assert want["sum"].tobytes() == got["sum"].tobytes()
        assert (int(want["rows"]), int(want["batches"])) == (int(got["rows"]), int(got["batches"]))
    assert not list(resumed.glob("*.tmp*"))


# ----------------------------------------------------------------------------- explain never builds; shared checks

def test_a_missing_index_meta_makes_explain_refuse_with_the_index_command(tiny_workspace, tmp_path, capsys):
    ws = copy_workspace(tiny_workspace, tmp_path / "ws")
    (ws / "index" / "meta.json").unlink()
    test_id = next(r["id"] for r in Workspace(ws).load_instances() if r["split"] == "test")
    err = one_line_error(capsys, ["explain", "--workspace", str(ws), "--test-id", test_id, "--method", "TracIn",
                                  "--device", "cpu"])
    assert f"python -m core index --workspace {ws}" in err
    assert not (ws / "index" / "meta.json").exists(), "explain built nothing"


def test_explain_after_an_interrupted_prepare_says_to_run_prepare_again(tiny_workspace, tmp_path, capsys):
    """A prepare stopped before its variants (no index yet): explain sends the user to prepare,
    which resumes, not to `index`, which would refuse."""
    ws = copy_workspace(tiny_workspace, tmp_path / "ws")
    shutil.rmtree(ws / "index")
    manifest = json.loads((ws / "manifest.json").read_text())
    manifest["stages"]["variants"]["done"] = False
    (ws / "manifest.json").write_text(json.dumps(manifest))
    test_id = next(r["id"] for r in Workspace(ws).load_instances() if r["split"] == "test")
    err = one_line_error(capsys, ["explain", "--workspace", str(ws), "--test-id", test_id, "--method", "TracIn",
                                  "--device", "cpu"])
    assert "is not fully prepared" in err and "run the same `python -m core prepare` command again" in err
    assert "core index" not in err


def _reorder_training_rows(ws: Path) -> None:
    lines = (ws / "instances.jsonl").read_text().splitlines()
    train = [n for n, line in enumerate(lines) if json.loads(line)["split"] == "train"]
    lines[train[0]], lines[train[1]] = lines[train[1]], lines[train[0]]
    (ws / "instances.jsonl").write_text("\n".join(lines) + "\n")


def _drop_last_training_row(ws: Path) -> None:
    lines = (ws / "instances.jsonl").read_text().splitlines()
    last = max(n for n, line in enumerate(lines) if json.loads(line)["split"] == "train")
    (ws / "instances.jsonl").write_text("\n".join(lines[:last] + lines[last + 1:]) + "\n")


def _meta_without_ids(ws: Path) -> None:
    meta = json.loads((ws / "index" / "meta.json").read_text())
    del meta["ids"]
    (ws / "index" / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (_reorder_training_rows, r"instances.jsonl: its \d+ training instances are not the \d+ the index was built on, "
                             r"in the same order \(first difference at training row 0\).*restore it as prepare wrote it"),
    (_drop_last_training_row, r"instances.jsonl: its \d+ training instances are not the \d+ the index"),
    (_meta_without_ids, r"index/meta.json: damaged \(no ids\); rebuild the index"),
    (lambda ws: (ws / "manifest.json").write_text("[]"), r"manifest.json: not a JSON object"),
])
def test_a_changed_instances_file_or_damaged_meta_is_refused_before_any_score(tiny_workspace, tmp_path, capsys,
                                                                               damage, message):
    """An edited instances file would attach the index's rows (and cached scores) to other reviews:
    explain refuses, in one line naming the file, even for a result the store already holds."""
    ws = copy_workspace(tiny_workspace, tmp_path / "ws")
    test_id = next(r["id"] for r in Workspace(ws).load_instances() if r["split"] == "test")
    argv = ["explain", "--workspace", str(ws), "--test-id", test_id, "--method", "TracIn", "--device", "cpu"]
    assert main(argv) == 0  # the result is now in the store
    capsys.readouterr()
    damage(ws)
    assert re.search(message, one_line_error(capsys, argv))


def check_index_at_once(root: str, barrier, results) -> None:
    """Child process: wait for the other checker, then check the (up-to-date) index."""
    barrier.wait()
    try:
        index = build_index(Workspace(root), EXACT, progress=False, log=lambda _: None)
        results.put(("ok", index.meta["fingerprint"]))
    except Exception as err:  # reported to the parent, which fails the test with it
        results.put(("error", f"{type(err).__name__}: {err}"))


def test_two_processes_checking_an_up_to_date_index_both_succeed(tiny_workspace, tmp_path):
    ws = copy_workspace(tiny_workspace, tmp_path / "ws")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=check_index_at_once, args=(str(ws), barrier, results)) for _ in range(2)]
    with open(ws / ".index.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # a third checker holds its shared lock all along
        for child in children:
            child.start()
        outcomes = [results.get(timeout=600) for _ in children]
        for child in children:
            child.join(timeout=600)
    fingerprint = json.loads((ws / "index" / "meta.json").read_text())["fingerprint"]
    assert outcomes == [("ok", fingerprint)] * 2 and [c.exitcode for c in children] == [0, 0]


# ----------------------------------------------------------------------------- the build bar

def test_the_build_bar_rises_at_every_training_step(tmp_path, tiny_backbone):
    data = write_jsonl(tmp_path / "reviews.jsonl", reviews(40))
    settings = small_settings(data, tiny_backbone, epochs=3)
    job = PrepareJob(tmp_path / "ws", settings, EXACT)
    seen: list[tuple[str, float, float]] = []

    def follow(stage: str, fraction: float) -> None:
        job.on_progress(stage, fraction)
        seen.append((stage, fraction, job.fraction))

    prepare(settings, job.root, progress=False, log=job.log, on_progress=follow)
    training = [bar for stage, raw, bar in seen if stage == "model" and round(raw, 9) > PREFIX_SHARE]
    training = training[:training.index(max(training)) + 1]
    steps = 3 * -(-28 // 4)  # epochs x batches of the 28 training instances
    assert len(training) == steps
    assert all(a < b for a, b in itertools.pairwise(training)), training
    bars = [bar for _, _, bar in seen]
    assert all(a <= b for a, b in itertools.pairwise(bars))


# ----------------------------------------------------------------------------- 6. the app as a server

def test_the_app_config_serves_privately():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["browser"]["gatherUsageStats"] is False
    assert config["server"]["address"] == "127.0.0.1"
    assert config["server"]["fileWatcherType"] == "none"
    assert config["client"]["showErrorDetails"] == "none"


def test_data_paths_must_resolve_under_a_data_root(tmp_path, monkeypatch):
    data, private = tmp_path / "data", tmp_path / "private"
    data.mkdir()
    private.mkdir()
    (data / "mine.jsonl").write_text("{}\n")
    (private / "secret.csv").write_text("text,aspect,label\n")
    (data / "link.csv").symlink_to(private / "secret.csv")
    (data / "folder-link").symlink_to(private, target_is_directory=True)
    monkeypatch.setenv(catalog.DATA_ROOTS_ENV, f"{data}{os.pathsep}{tmp_path / 'other'}")
    assert catalog.data_roots() == [data.resolve(), (tmp_path / "other").resolve()]
    assert catalog.allowed_data_path(str(data / "mine.jsonl")) == (data / "mine.jsonl").resolve()
    assert catalog.allowed_data_path(str(data / "sub" / ".." / "new.jsonl")) == (data / "new.jsonl").resolve()
    answers = set()
    for outside in (private / "secret.csv", private / "missing.csv", data / ".." / "private" / "secret.csv",
                    data / "link.csv", data / "folder-link" / "secret.csv", "/etc/passwd", "", "~"):
        with pytest.raises(ValueError) as caught:
            catalog.allowed_data_path(str(outside))
        answers.add(str(caught.value))
    assert len(answers) == 1 and "private" not in answers.pop()
    monkeypatch.delenv(catalog.DATA_ROOTS_ENV)
    monkeypatch.setenv(catalog.WORKSPACES_ENV, str(tmp_path / "ws"))
    monkeypatch.setenv("SPANLENS_DATA", str(data))
    assert catalog.data_roots() == [data.resolve(), (tmp_path / "ws").resolve()]


def test_uploads_are_saved_with_a_clean_name(tmp_path):
    path = catalog.save_upload(tmp_path / "mine", "../../my reviews (1).JSONL", b'{"a": 1}\n')
    assert path == tmp_path / "mine" / "data" / "my_reviews_1.jsonl" and path.read_bytes() == b'{"a": 1}\n'
    with pytest.raises(ValueError, match="upload a .jsonl, .csv, .xml file"):
        catalog.save_upload(tmp_path / "mine", "model.pt", b"")


@pytest.fixture
def workspaces_app(tmp_path, monkeypatch):
    """Run the app's Workspaces page with workspaces under tmp/workspaces and one data root, tmp/data."""
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.testing.v1 import AppTest

    class NavigationPagesManager(PagesManager):  # as tests/test_app.py: app.py's navigation in charge
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            PagesManager.uses_pages_directory = False

    monkeypatch.setattr("streamlit.testing.v1.app_test.PagesManager", NavigationPagesManager)
    (tmp_path / "data").mkdir()
    (tmp_path / "workspaces").mkdir()
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(tmp_path / "workspaces"))
    monkeypatch.setenv("SPANLENS_DATA_ROOTS", str(tmp_path / "data"))

    def run() -> AppTest:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
        at.switch_page("pages/workspaces.py").run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return run


def submit_file(at, name: str, path: str = "", upload: tuple | None = None):
    at.radio(key="new_dataset").set_value("file").run()
    at.text_input(key="new_name").set_value(name)
    at.text_input(key="new_path").set_value(path)
    if upload is not None:
        at.file_uploader(key="new_upload").set_value(upload)
    at.form_submit_button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    return [e.value for e in at.error]


def test_the_app_refuses_paths_outside_the_data_roots_alike(workspaces_app, tmp_path, monkeypatch):
    started: list[PrepareJob] = []
    monkeypatch.setattr(jobs, "start_job", started.append)
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.csv").write_text("text,aspect,label\nmy secret,secret,positive\n")
    at = workspaces_app()
    existing = submit_file(at, "mine", str(private / "secret.csv"))
    missing = submit_file(at, "mine", str(private / "missing.csv"))
    escaping = submit_file(at, "mine", str(tmp_path / "data" / ".." / "private" / "secret.csv"))
    assert existing == missing == escaping and len(existing) == 1
    assert "data root" in existing[0] and "private" not in existing[0] and "secret" not in existing[0]
    at.radio(key="new_dataset").set_value("mams").run()
    at.text_input(key="new_data_dir").set_value(str(private))
    at.form_submit_button[0].click().run()
    assert [e.value for e in at.error] == existing
    # inside a root, a missing file is simply not found
    assert submit_file(at, "mine", str(tmp_path / "data" / "none.jsonl")) == ["Data not found."]
    assert not started and not (tmp_path / "workspaces" / "mine").exists()


def test_the_app_builds_from_an_upload(workspaces_app, tmp_path, monkeypatch):
    started: list[PrepareJob] = []
    monkeypatch.setattr(jobs, "start_job", started.append)
    content = write_jsonl(tmp_path / "r.jsonl", reviews(20)).read_bytes()
    at = workspaces_app()
    assert submit_file(at, "up", upload=("my reviews.jsonl", content, "application/jsonl")) == []
    saved = tmp_path / "workspaces" / "up" / "data" / "my_reviews.jsonl"
    assert saved.read_bytes() == content
    assert len(started) == 1 and started[0].settings.dataset == str(saved) and started[0].root.name == "up"


def test_a_failed_build_can_be_deleted_from_the_page(workspaces_app, tmp_path, tiny_backbone):
    data = write_jsonl(tmp_path / "data" / "eight.jsonl", all_train(8))
    root = tmp_path / "workspaces"
    job = jobs.start_job(PrepareJob(root / "bad", small_settings(data, tiny_backbone), EXACT))
    job._thread.join()
    at = workspaces_app()
    assert at.dataframe[0].value.loc[0, "status"] == "unfinished"
    assert at.get("status")[0].proto.label == "Building bad failed"
    assert any("the dev split is empty" in c.value for c in at.code)
    assert any("build failed" in w.value for w in at.warning) and at.button(key="resume")
    assert at.button(key="delete").disabled
    at.checkbox(key="delete_confirm").check().run()
    at.button(key="delete").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not (root / "bad").exists() and jobs.job_for("prepare", root / "bad") is None
    assert any("No workspace yet" in i.value for i in at.info)


def test_the_workspaces_page_shows_the_data_report(workspaces_app, tmp_path, tiny_workspace):
    copy_workspace(tiny_workspace, tmp_path / "workspaces" / "tiny")
    at = workspaces_app()
    report = [c.value for c in at.code if "instances from" in c.value]
    assert len(report) == 1 and "train.xml [train]: 11186 instances from 4297 sentences" in report[0]


def test_explain_says_when_k_is_past_the_training_set(tiny_workspace, tmp_path, capsys):
    """--k larger than the training set lists every training instance, and says so."""
    ws = copy_workspace(tiny_workspace, tmp_path / "ws")
    rows = Workspace(ws).load_instances()
    test_id, n = next(r["id"] for r in rows if r["split"] == "test"), sum(r["split"] == "train" for r in rows)
    assert main(["explain", "--workspace", str(ws), "--test-id", test_id, "--method", "TracIn", "--device", "cpu",
                 "--k", str(n + 50), "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)[0]["top"]) == json.loads(out)[0]["k"] == n
    assert f"note: --k {n + 50} is past the workspace's {n} training instances: all of them are listed" in err
    assert main(["explain", "--workspace", str(ws), "--test-id", test_id, "--method", "TracIn", "--device", "cpu",
                 "--k", str(n), "--json"]) == 0
    assert "note:" not in capsys.readouterr().err  # the whole training set asked for: nothing to say


def test_a_deleted_parameter_point_is_an_error_naming_the_file(tiny_workspace, tmp_path, capsys):
    """Points come from the manifest: a missing variant file stops explain with the file and the
    command that rebuilds it (it never runs on fewer variants than the workspace was built with)."""
    root = Path(shutil.copytree(tiny_workspace, tmp_path / "ws", ignore=shutil.ignore_patterns("store.sqlite*")))
    (root / "model" / "variant-2.safetensors").unlink()
    test_id = json.loads((root / "instances.jsonl").read_text().splitlines()[-1])["id"]
    assert main(["explain", "--workspace", str(root), "--test-id", test_id, "--method", "TracIn++",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "variant-2.safetensors is missing" in err and "python -m core prepare" in err


def test_spanlens_debug_shows_the_traceback_instead_of_one_line(tiny_workspace, tmp_path, monkeypatch, capsys):
    """Errors are one line with a hint; with SPANLENS_DEBUG set the exception propagates."""
    root = Path(shutil.copytree(tiny_workspace, tmp_path / "ws", ignore=shutil.ignore_patterns("store.sqlite*")))
    (root / "model" / "variant-2.safetensors").unlink()
    test_id = json.loads((root / "instances.jsonl").read_text().splitlines()[-1])["id"]
    argv = ["explain", "--workspace", str(root), "--test-id", test_id, "--method", "TracIn++", "--device", "cpu"]
    assert main(argv) == 2
    assert "SPANLENS_DEBUG=1 shows the traceback" in capsys.readouterr().err
    monkeypatch.setenv("SPANLENS_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="variant-2.safetensors"):
        main(argv)


def test_a_build_is_refused_only_while_another_build_holds_the_lock(tiny_workspace, tmp_path, monkeypatch):
    """A process checking the index (its shared lock) makes a build wait, then run, instead of
    failing; a build that meets another build (the window after its check, reached here by
    skipping the check's wait) gets a clear error at once."""
    import contextlib
    import threading

    import core.index_build as index_mod

    ws = copy_workspace(tiny_workspace, tmp_path / "ws")
    shutil.rmtree(ws / "index")
    (ws / "index").mkdir()
    quiet = dict(progress=False, log=lambda _: None)
    with open(ws / ".index.lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_SH)  # a check in progress
        outcome: list = []
        small = IndexSettings(dim=16, batch_size=16)
        builder = threading.Thread(target=lambda: outcome.append(build_index(Workspace(ws), small, **quiet)))
        builder.start()
        fcntl.flock(holder, fcntl.LOCK_UN)
        builder.join()
        assert len(outcome) == 1 and outcome[0].meta["done"]
        shutil.rmtree(ws / "index")
        (ws / "index").mkdir()
        fcntl.flock(holder, fcntl.LOCK_EX)  # another build
        holder.write("build")
        holder.flush()
        monkeypatch.setattr(index_mod, "_shared_lock", lambda root: contextlib.nullcontext())
        with pytest.raises(RuntimeError, match="being built by another process"):
            build_index(Workspace(ws), small, **quiet)
