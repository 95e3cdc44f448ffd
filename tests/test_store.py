"""core.store: concurrency, annotation log semantics, cache and invalidation, import/export."""
from __future__ import annotations

import json
import multiprocessing
import random
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from core.store import SCHEMA_VERSION, Store

ORIGINAL = (4, 12, "rc")


def _annotate_many(path: Path, who: str, n: int) -> None:
    """Open a Store of its own on ``path`` and append ``n`` annotations as ``who``."""
    with Store(path) as store:
        for i in range(n):
            store.annotate(f"{who}-{i}", status="accept", annotator=who, original=ORIGINAL,
                           corrected=None, fingerprint="fp")


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "ws" / "spanlens.sqlite") as s:
        yield s


def test_wal_mode_and_schema_version(store: Store) -> None:
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert store.schema_version() == SCHEMA_VERSION


def test_two_threads_two_stores_write_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    threads = [threading.Thread(target=_annotate_many, args=(path, who, 200)) for who in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with Store(path) as store:
        current = store.current_annotations()
    assert len(current) == 400
    assert {a.annotator for a in current.values()} == {"a", "b"}


def test_two_processes_create_and_write_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "fresh.sqlite"  # both processes create and migrate it at once
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_annotate_many, args=(path, who, 200)) for who in ("p1", "p2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)  # generous: CI machines can be busy
    assert [p.exitcode for p in procs] == [0, 0]
    with Store(path) as store:
        assert len(store.current_annotations()) == 400
        assert store.schema_version() == SCHEMA_VERSION
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def _open_rounds(paths: list[Path], who: str, barrier, results) -> None:
    """For each path in turn: wait for every worker, then create, write and close it.

    Puts the list of failures on ``results`` at the end.
    """
    failures = []
    for n, path in enumerate(paths):
        barrier.wait(timeout=600)  # a dead worker fails the test instead of hanging it
        try:
            _annotate_many(path, who, 1 + n % 4)  # unequal writes stagger the closes
        except Exception as err:
            failures.append(f"{path.name}, {who}: {type(err).__name__}: {err}")
    results.put(failures)


def test_many_processes_open_fresh_stores_at_once(tmp_path: Path) -> None:
    """8 processes create, migrate and write one fresh file at once, 50 times: no failures."""
    workers, rounds = 8, 50
    paths = [tmp_path / f"round-{n}.sqlite" for n in range(rounds)]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_open_rounds, args=(paths, f"w{i}", barrier, results))
             for i in range(workers)]
    for p in procs:
        p.start()
    failures = [failure for _ in procs for failure in results.get(timeout=600)]
    for p in procs:
        p.join(timeout=600)
    assert failures == [] and [p.exitcode for p in procs] == [0] * workers
    for n, path in enumerate(paths):
        db = sqlite3.connect(path)
        assert db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == workers * (1 + n % 4)
        assert db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()


def _real_store_truncated(path: Path) -> None:
    with Store(path) as store:
        for i in range(100):
            store.put_result("fp", "IF", {"k": i}, "t", {"scores": list(range(100))},
                             depends_on_train_spans=False)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage, reason", [
    (lambda path: path.write_bytes(random.Random(0).randbytes(10_000)), "file is not a database"),
    (_real_store_truncated, "database disk image is malformed"),
], ids=["random-bytes", "truncated"])
def test_corrupt_file_is_refused_with_one_line(tmp_path: Path, damage, reason: str) -> None:
    path = tmp_path / "store.sqlite"
    damage(path)
    before = path.read_bytes()
    with pytest.raises(ValueError) as raised:
        Store(path)
    assert str(raised.value) == (f"{path}: not a SpanLens store ({reason}); "
                                 "move it away to start a new one")
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert path.read_bytes() == before  # left as it was


def test_one_store_shared_by_threads(store: Store) -> None:
    def work(who: str) -> None:
        for i in range(50):
            store.annotate(f"{who}-{i}", status="wrong", annotator=who, original=ORIGINAL,
                           corrected=None, fingerprint="fp")
            store.put_eval_row("run", f"{who}-{i}", {"i": i})

    threads = [threading.Thread(target=work, args=(f"t{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.wrong_test_ids()) == 200
    assert len(store.eval_rows("run")) == 200


def test_undo_restores_previous_entry(store: Store) -> None:
    first = store.annotate("x", status="accept", annotator="ann", original=ORIGINAL,
                           corrected=None, fingerprint="fp")
    second = store.annotate("x", status="fix", annotator="ann", original=ORIGINAL,
                            corrected=(5, 9), fingerprint="fp")
    store.annotate("y", status="wrong", annotator="bob", original=ORIGINAL, corrected=None,
                   fingerprint="fp")
    current = store.current_annotations()
    assert current["x"].id == second and (current["x"].corrected_start, current["x"].corrected_end) == (5, 9)

    undone = store.undo_last("ann")
    assert undone is not None and undone.id == second and undone.undone
    current = store.current_annotations()
    assert current["x"].id == first and current["x"].status == "accept"
    assert current["y"].annotator == "bob"  # another annotator's entry is untouched

    assert store.undo_last("ann").id == first
    assert "x" not in store.current_annotations()
    assert store.undo_last("ann") is None
    assert "y" in store.current_annotations()

    history = store.history("x")  # nothing lost: both entries kept, flagged undone
    assert [(a.id, a.status, a.undone) for a in history] == [(first, "accept", True),
                                                             (second, "fix", True)]
    assert history[0].created_at.endswith("+00:00")


def test_wrong_test_ids_uses_current_status(store: Store) -> None:
    def note(iid: str, status: str, corrected: tuple[int, int] | None = None) -> None:
        store.annotate(iid, status=status, annotator="a", original=ORIGINAL, corrected=corrected,
                       fingerprint="fp")

    note("wrong", "wrong")
    note("fixed", "wrong")
    note("fixed", "fix", (0, 3))  # a fix has a usable span: not wrong
    note("accepted", "accept")
    note("wrong-again", "accept")
    note("wrong-again", "wrong")
    note("undone", "wrong")
    store.undo_last("a")  # undoes "undone"
    assert store.wrong_test_ids() == {"wrong", "wrong-again"}


@pytest.mark.parametrize("status, corrected, message", [
    ("fix", None, "needs corrected"),
    ("fix", (5, 5), "0 <= start < end"),
    ("fix", (-1, 3), "0 <= start < end"),
    ("fix", (True, 3), "integers"),
    ("accept", (1, 2), "must not carry"),
    ("wrong", (1, 2), "must not carry"),
    ("maybe", None, "status must be one of"),
])
def test_annotate_validates(store: Store, status: str, corrected, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store.annotate("x", status=status, annotator="a", original=ORIGINAL, corrected=corrected,
                       fingerprint="fp")
    assert store.history("x") == []


def test_annotate_validates_original_and_annotator(store: Store) -> None:
    with pytest.raises(ValueError, match="original"):
        store.annotate("x", status="accept", annotator="a", original=(3, 1, "rc"),
                       corrected=None, fingerprint="fp")
    with pytest.raises(ValueError, match="annotator"):
        store.annotate("x", status="accept", annotator=" ", original=ORIGINAL, corrected=None,
                       fingerprint="fp")


def test_result_cache_round_trip(store: Store) -> None:
    settings = {"k": 10, "ihvp": {"mode": "fast", "damping": 0.01}}
    result = {"scores": np.array([0.5, -1.25]), "top": [3, 1], "sag": float("nan"), "note": "é😀"}
    assert store.get_result("fp", "IF", settings, "t1") is None
    store.put_result("fp", "IF", settings, "t1", result, depends_on_train_spans=False)

    same_settings = {"ihvp": {"damping": 0.01, "mode": "fast"}, "k": 10}  # key order irrelevant
    got = store.get_result("fp", "IF", same_settings, "t1")
    assert got["scores"] == [0.5, -1.25] and got["top"] == [3, 1] and got["note"] == "é😀"
    assert got["sag"] != got["sag"]  # NaN survives
    assert store.get_result("fp", "IF", {**settings, "k": 11}, "t1") is None
    assert store.get_result("fp", "IF+", settings, "t1") is None
    assert store.get_result("other", "IF", settings, "t1") is None

    store.put_result("fp", "IF", settings, "t1", {"v": 2}, depends_on_train_spans=True)
    assert store.get_result("fp", "IF", settings, "t1") == {"v": 2}
    with pytest.raises(ValueError):
        store.put_result("fp", "IF", {"x": float("nan")}, "t1", {}, depends_on_train_spans=False)


def test_invalidation_counts(store: Store) -> None:
    def put(fp: str, method: str, test_id: str, dep: bool) -> None:
        store.put_result(fp, method, {}, test_id, {"m": method}, depends_on_train_spans=dep)

    put("fp", "TracIn", "t1", False)
    put("fp", "TracIn+", "t1", True)
    put("fp", "TracIn++", "t2", True)
    put("fp", "IF", "t2", False)
    put("old", "IF", "t3", False)
    put("older", "IF+", "t3", True)

    assert store.invalidate_test("t1") == 2
    assert store.get_result("fp", "TracIn", {}, "t1") is None
    assert store.invalidate_test("t1") == 0
    assert store.invalidate_train_span_dependent() == 2  # fp/TracIn++/t2, older/IF+/t3
    assert store.get_result("fp", "IF", {}, "t2") == {"m": "IF"}
    assert store.invalidate_fingerprint_other_than("fp") == 1  # old/IF/t3
    assert store.get_result("fp", "IF", {}, "t2") == {"m": "IF"}
    assert store.invalidate_fingerprint_other_than("fp") == 0


def _line(**fields) -> str:
    record = {"instance_id": "i", "status": "accept", "original_start": 0, "original_end": 4,
              "original_source": "heuristic", "fingerprint": "fp"}
    record.update(fields)
    return json.dumps(record)


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 3"),
    (_line(status="fix"), "line 3: .*needs corrected"),
    (_line(corrected_start=1, corrected_end=3), "line 3: .*must not carry"),
    (_line(status="fix", corrected_start=4, corrected_end=2), "line 3: .*0 <= start < end"),
    (_line(colour="red"), "line 3: unknown keys: colour"),
    (_line(created_at="yesterday"), "line 3: created_at"),
    (_line(undone="no"), "line 3: undone"),
    ("[1, 2]", "line 3: not a JSON object"),
])
def test_import_is_all_or_nothing(store: Store, tmp_path: Path, bad: str, message: str) -> None:
    store.annotate("kept", status="accept", annotator="a", original=ORIGINAL, corrected=None,
                   fingerprint="fp")
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([_line(instance_id="i1"), "", bad, _line(instance_id="i4")]) + "\n",
                    encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        store.import_jsonl(path, annotator_default="importer")
    assert list(store.current_annotations()) == ["kept"]
    assert store.history("i1") == []


def test_export_import_round_trip(store: Store, tmp_path: Path) -> None:
    store.annotate("t-1", status="wrong", annotator="a", original=(0, 5, "rc"), corrected=None,
                   fingerprint="fp")
    store.annotate("t-1", status="fix", annotator="a", original=(0, 5, "rc"), corrected=(2, 7),
                   fingerprint="fp")
    store.annotate("t-2", status="accept", annotator="b", original=(3, 9, "importance"),
                   corrected=None, fingerprint="fp")
    store.annotate("t-3", status="wrong", annotator="a", original=(1, 2, "rc"), corrected=None,
                   fingerprint="fp")
    store.undo_last("a")  # t-3 undone: exported with its flag
    out = tmp_path / "export.jsonl"
    assert store.export_jsonl(out) == 4

    lines = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[1])["corrected_start"] == 2 and json.loads(lines[3])["undone"] is True

    with Store(tmp_path / "other.sqlite") as other:
        assert other.import_jsonl(out, annotator_default="nobody") == 4
        mine = {k: (a.status, a.annotator, a.original_start, a.original_end, a.original_source,
                    a.corrected_start, a.corrected_end, a.created_at)
                for k, a in store.current_annotations().items()}
        theirs = {k: (a.status, a.annotator, a.original_start, a.original_end, a.original_source,
                      a.corrected_start, a.corrected_end, a.created_at)
                  for k, a in other.current_annotations().items()}
        assert mine == theirs and set(mine) == {"t-1", "t-2"}
        assert [a.undone for a in other.history("t-3")] == [True]


def test_import_fills_default_annotator(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(_line(instance_id="z") + "\n", encoding="utf-8")
    assert store.import_jsonl(path, annotator_default="importer") == 1
    assert store.current_annotations()["z"].annotator == "importer"


def test_cases(store: Store) -> None:
    first = store.save_case("Pizza", "IF ranks opponents first", "ws1", "t9", ["IF", "TracIn++"],
                            5, {"top": [[1, 0.5]]})
    second = store.save_case("  Second  ", "", "ws1", "t3", ["IF++"], 3, {})
    assert [c.id for c in store.list_cases()] == [second, first]
    case = store.get_case(first)
    assert case.methods == ["IF", "TracIn++"] and case.k == 5 and case.snapshot == {"top": [[1, 0.5]]}
    assert store.get_case(second).title == "Second"
    with pytest.raises(ValueError, match="title"):
        store.save_case("   ", "", "ws1", "t1", ["IF"], 5, {})
    with pytest.raises(ValueError, match="k must be"):
        store.save_case("t", "", "ws1", "t1", ["IF"], 0, {})
    assert store.delete_case(first) is True
    assert store.delete_case(first) is False
    assert store.get_case(first) is None
    assert [c.id for c in store.list_cases()] == [second]


def test_eval_rows_resume(store: Store) -> None:
    store.put_eval_row("run-a", "t2", {"sag": 0.1})
    store.put_eval_row("run-a", "t1", {"sag": 0.2})
    store.put_eval_row("run-b", "t1", {"sag": 0.9})
    store.put_eval_row("run-a", "t2", {"sag": 0.3})  # replaced in place
    assert store.eval_rows("run-a") == {"t2": {"sag": 0.3}, "t1": {"sag": 0.2}}
    assert list(store.eval_rows("run-a")) == ["t2", "t1"]
    assert store.eval_rows("run-b") == {"t1": {"sag": 0.9}}
    assert store.eval_rows("none") == {}


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        store.put_result("fp", "IF", {"k": 1}, "t", {"r": 1}, depends_on_train_spans=True)
        store.annotate("t", status="fix", annotator="a", original=ORIGINAL, corrected=(1, 2),
                       fingerprint="fp")
        case_id = store.save_case("c", "n", "ws", "t", ["IF"], 2, {"s": 1})
        store.put_eval_row("run", "t", {"lag": 1.0})
    with Store(path) as store:
        assert store.get_result("fp", "IF", {"k": 1}, "t") == {"r": 1}
        assert store.current_annotations()["t"].corrected_end == 2
        assert store.get_case(case_id).snapshot == {"s": 1}
        assert store.eval_rows("run") == {"t": {"lag": 1.0}}
        assert store.schema_version() == SCHEMA_VERSION
    db = sqlite3.connect(path)  # migrations ran once, not on every open
    assert db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(path)
