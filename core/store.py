"""One SQLite file per workspace: results cache, span annotations, case studies, evaluation rows.

Safe for several processes (CLI jobs, browser sessions) writing at once: WAL journal, a busy
timeout, and short ``BEGIN IMMEDIATE`` write transactions (the write lock is taken up front, so
no transaction has to upgrade a read lock and fail with "database is locked"). One
:class:`Store` may be shared between threads; a lock serialises use of its connection.

The schema carries a version (table ``schema_version``); :data:`_MIGRATIONS` brings any older
file up to date, once, under the write lock. Opening switches the file to WAL only if it is not
in WAL already, and retries that switch and the migration while the file is busy (SQLite does
not run the busy handler for every lock they need), so any number of processes opening a fresh
file at once all succeed. A file that is not an SQLite database, or a damaged one, is refused
with a ``ValueError`` naming it.

Annotations are an append-only log: an entry is never deleted or changed, except that undo sets
its ``undone`` flag. All offsets are character offsets (Python ``str`` indices, i.e. code
points) into the instance's text.
"""
from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STATUSES = ("accept", "wrong", "fix")
BUSY_TIMEOUT_MS = 30_000

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # version 1
        """CREATE TABLE IF NOT EXISTS results (
            fingerprint TEXT NOT NULL, method TEXT NOT NULL, settings TEXT NOT NULL,
            test_id TEXT NOT NULL, result TEXT NOT NULL,
            depends_on_train_spans INTEGER NOT NULL CHECK (depends_on_train_spans IN (0, 1)),
            created_at TEXT NOT NULL,
            PRIMARY KEY (fingerprint, method, settings, test_id))""",
        "CREATE INDEX IF NOT EXISTS results_test ON results (test_id)",
        """CREATE TABLE IF NOT EXISTS annotations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            instance_id TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('accept', 'wrong', 'fix')),
            annotator TEXT NOT NULL, created_at TEXT NOT NULL,
            original_start INTEGER NOT NULL, original_end INTEGER NOT NULL,
            original_source TEXT NOT NULL,
            corrected_start INTEGER, corrected_end INTEGER,
            fingerprint TEXT NOT NULL,
            undone INTEGER NOT NULL DEFAULT 0 CHECK (undone IN (0, 1)))""",
        "CREATE INDEX IF NOT EXISTS annotations_instance ON annotations (instance_id, undone, id)",
        "CREATE INDEX IF NOT EXISTS annotations_annotator ON annotations (annotator, undone, id)",
        """CREATE TABLE IF NOT EXISTS cases (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            title TEXT NOT NULL, note TEXT NOT NULL, workspace TEXT NOT NULL,
            test_id TEXT NOT NULL, methods TEXT NOT NULL, k INTEGER NOT NULL,
            snapshot TEXT NOT NULL, created_at TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS eval_rows (
            run_key TEXT NOT NULL, test_id TEXT NOT NULL, row TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (run_key, test_id))""",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

@dataclass(frozen=True)
class Annotation:
    """One entry of the annotation log; offsets are character offsets into the text."""

    id: int
    instance_id: str
    status: str
    annotator: str
    created_at: str
    original_start: int
    original_end: int
    original_source: str
    corrected_start: int | None
    corrected_end: int | None
    fingerprint: str
    undone: bool

    def to_json(self) -> dict[str, Any]:
        """The entry as one JSONL record (the layout :meth:`Store.import_jsonl` reads)."""
        return asdict(self)


_ANNOTATION_COLUMNS = ", ".join(f.name for f in fields(Annotation))
_IMPORT_IGNORED = frozenset({"id"})  # written by export_jsonl; imported entries get new ids
_IMPORT_KEYS = frozenset(f.name for f in fields(Annotation)) - _IMPORT_IGNORED


@dataclass(frozen=True)
class Case:
    """A saved case study: what was looked at (test id, methods, K) and a snapshot of it."""

    id: int
    title: str
    note: str
    workspace: str
    test_id: str
    methods: list[str]
    k: int
    snapshot: dict[str, Any]
    created_at: str


def _error_code(err: sqlite3.Error) -> int | None:
    """The primary SQLite result code of ``err`` (``None`` for errors of the sqlite3 module)."""
    code = getattr(err, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _json_default(value: Any) -> Any:
    """Let numpy scalars and arrays (anything with ``tolist``) be stored as plain JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def canonical_json(settings: Mapping[str, Any]) -> str:
    """The settings as a cache key: sorted keys, no whitespace; NaN/infinity refused."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=_json_default)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonempty_str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _check_span(start: Any, end: Any, name: str) -> None:
    if not (_is_int(start) and _is_int(end)) or not 0 <= start < end:
        raise ValueError(f"{name} span must be integers with 0 <= start < end, got ({start!r}, {end!r})")


def _validated(instance_id: Any, status: Any, annotator: Any, original: Any, corrected: Any,
               fingerprint: Any) -> tuple[str, str, str, int, int, str, int | None, int | None, str]:
    """Check one annotation; return its column values (without id, created_at, undone)."""
    _nonempty_str(instance_id, "instance_id")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    _nonempty_str(annotator, "annotator")
    if not isinstance(fingerprint, str):
        raise ValueError(f"fingerprint must be a string, got {fingerprint!r}")
    if not isinstance(original, (tuple, list)) or len(original) != 3:
        raise ValueError(f"original must be (start, end, source), got {original!r}")
    o_start, o_end, source = original
    _check_span(o_start, o_end, "original")
    _nonempty_str(source, "original source")
    if status == "fix":
        if not isinstance(corrected, (tuple, list)) or len(corrected) != 2:
            raise ValueError(f"status 'fix' needs corrected = (start, end), got {corrected!r}")
        _check_span(*corrected, "corrected")
        c_start, c_end = corrected
    elif corrected is not None:
        raise ValueError(f"status {status!r} must not carry a corrected span, got {corrected!r}")
    else:
        c_start = c_end = None
    return instance_id, status, annotator, o_start, o_end, source, c_start, c_end, fingerprint


def _record_from_json(record: Any, annotator_default: str) -> tuple[Any, ...]:
    """Validate one imported JSON record; return the row to insert (without id)."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    unknown = set(record) - _IMPORT_KEYS - _IMPORT_IGNORED
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    status = record.get("status")
    corrected = None
    if record.get("corrected_start") is not None or record.get("corrected_end") is not None:
        corrected = (record.get("corrected_start"), record.get("corrected_end"))
    values = _validated(
        record.get("instance_id"), status, record.get("annotator", annotator_default),
        (record.get("original_start"), record.get("original_end"), record.get("original_source")),
        corrected, record.get("fingerprint", ""),
    )
    created_at = record.get("created_at", _now())
    try:
        stamp = datetime.fromisoformat(created_at) if isinstance(created_at, str) else None
    except ValueError:
        stamp = None
    if stamp is None or stamp.tzinfo is None:
        raise ValueError(f"created_at must be an ISO 8601 time with a zone, got {created_at!r}")
    undone = record.get("undone", False)
    if not isinstance(undone, bool):
        raise ValueError(f"undone must be true or false, got {undone!r}")
    return (*values, stamp.astimezone(timezone.utc).isoformat(timespec="microseconds"), int(undone))


def _annotation(row: sqlite3.Row) -> Annotation:
    values = dict(row)
    values["undone"] = bool(values["undone"])
    return Annotation(**values)


def _case(row: sqlite3.Row) -> Case:
    values = dict(row)
    values["methods"] = json.loads(values["methods"])
    values["snapshot"] = json.loads(values["snapshot"])
    return Case(**values)


class Store:
    """The workspace's SQLite store. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # isolation_level=None: no implicit transactions; writes use _write's BEGIN IMMEDIATE.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._prepare()
        except BaseException as err:
            self._db.close()
            if (isinstance(err, sqlite3.DatabaseError)
                    and _error_code(err) in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)):
                raise ValueError(f"{self.path}: not a SpanLens store ({err}); "
                                 "move it away to start a new one") from None
            raise

    # -- plumbing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; the file keeps everything committed."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction holding the database's write lock from its start."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _prepare(self) -> None:
        """Put the file in WAL mode and migrate it; retry while another connection holds it.

        A journal-mode change and a connection meeting another one's WAL recovery or last-close
        checkpoint can fail with SQLITE_BUSY without the busy handler running, so such failures
        are retried after a short random pause until ``BUSY_TIMEOUT_MS`` has passed. Reading
        the mode first means files already in WAL never take the lock the change needs.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        pause = 0.002
        while True:
            try:
                if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self._db.execute("PRAGMA journal_mode = WAL")
                self._migrate()
                return
            except sqlite3.OperationalError as err:
                busy = _error_code(err) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(random.uniform(0, pause))
            pause = min(2 * pause, 0.1)

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {version} is newer than this "
                                   f"SpanLens understands ({SCHEMA_VERSION}); upgrade SpanLens")
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[number - 1]:
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))

    def schema_version(self) -> int:
        """The schema version of the file."""
        return self._read("SELECT MAX(version) FROM schema_version")[0][0]

    # -- results cache --------------------------------------------------------------------------

    def get_result(self, fingerprint: str, method: str, settings: Mapping[str, Any],
                   test_id: str) -> dict | None:
        """The cached result for this key, or ``None``."""
        rows = self._read(
            "SELECT result FROM results WHERE fingerprint = ? AND method = ? AND settings = ? "
            "AND test_id = ?", (fingerprint, method, canonical_json(settings), test_id))
        return json.loads(rows[0]["result"]) if rows else None

    def put_result(self, fingerprint: str, method: str, settings: Mapping[str, Any], test_id: str,
                   result: dict, depends_on_train_spans: bool) -> None:
        """Store (or replace) a result. JSON round trip: tuples come back as lists."""
        if not isinstance(result, dict):
            raise TypeError(f"result must be a dict, got {type(result).__name__}")
        key = canonical_json(settings)
        payload = _dumps(result)
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO results (fingerprint, method, settings, test_id, result, "
                "depends_on_train_spans, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (fingerprint, method, key, test_id, payload, int(bool(depends_on_train_spans)), _now()))

    def _delete_results(self, where: str, params: tuple[Any, ...] = ()) -> int:
        with self._write() as db:
            return db.execute(f"DELETE FROM results WHERE {where}", params).rowcount

    def invalidate_test(self, test_id: str) -> int:
        """Drop every cached result for ``test_id`` (e.g. its span changed); return how many."""
        return self._delete_results("test_id = ?", (test_id,))

    def invalidate_train_span_dependent(self) -> int:
        """Drop results that used training spans (a training span changed); return how many."""
        return self._delete_results("depends_on_train_spans = 1")

    def invalidate_fingerprint_other_than(self, fingerprint: str) -> int:
        """Drop results computed under any other workspace fingerprint; return how many."""
        return self._delete_results("fingerprint != ?", (fingerprint,))

    # -- annotations ----------------------------------------------------------------------------

    def annotate(self, instance_id: str, *, status: str, annotator: str,
                 original: tuple[int, int, str], corrected: tuple[int, int] | None,
                 fingerprint: str) -> int:
        """Append a verdict on ``instance_id``'s span; return the new entry's id.

        ``fix`` needs ``corrected = (start, end)`` with ``0 <= start < end``; ``accept`` and
        ``wrong`` must have ``corrected=None``. Checking ``end <= len(text)`` is the caller's.
        """
        values = _validated(instance_id, status, annotator, original, corrected, fingerprint)
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO annotations (instance_id, status, annotator, original_start, "
                "original_end, original_source, corrected_start, corrected_end, fingerprint, "
                "created_at, undone) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)", (*values, _now()))
            return cursor.lastrowid

    def current_annotations(self) -> dict[str, Annotation]:
        """The latest entry not undone, per instance id."""
        rows = self._read(
            f"SELECT {_ANNOTATION_COLUMNS} FROM annotations AS a WHERE undone = 0 AND id = "
            "(SELECT MAX(id) FROM annotations WHERE instance_id = a.instance_id AND undone = 0) "
            "ORDER BY id")
        return {row["instance_id"]: _annotation(row) for row in rows}

    def annotations_version(self) -> tuple[int, int]:
        """Changes whenever an annotation is added or undone: (latest id, entries undone)."""
        row = self._read("SELECT COALESCE(MAX(id), 0), COALESCE(SUM(undone), 0) FROM annotations")[0]
        return int(row[0]), int(row[1])

    def undo_last(self, annotator: str) -> Annotation | None:
        """Mark ``annotator``'s latest active entry undone and return it (``None``: nothing to undo).

        The instance's previous active entry, if any, is current again.
        """
        with self._write() as db:
            row = db.execute(
                f"SELECT {_ANNOTATION_COLUMNS} FROM annotations WHERE annotator = ? AND undone = 0 "
                "ORDER BY id DESC LIMIT 1", (annotator,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE annotations SET undone = 1 WHERE id = ?", (row["id"],))
        return Annotation(**{**dict(row), "undone": True})

    def history(self, instance_id: str) -> list[Annotation]:
        """Every entry for ``instance_id``, undone ones included, oldest first."""
        rows = self._read(f"SELECT {_ANNOTATION_COLUMNS} FROM annotations WHERE instance_id = ? "
                          "ORDER BY id", (instance_id,))
        return [_annotation(row) for row in rows]

    def wrong_test_ids(self) -> set[str]:
        """Ids whose current verdict is ``wrong`` (a ``fix`` carries a usable span, so it is not).

        The store does not know splits: callers intersect with their test ids.
        """
        return {i for i, a in self.current_annotations().items() if a.status == "wrong"}

    def export_jsonl(self, path: Path) -> int:
        """Write the whole log (undone entries too, oldest first) as JSONL; return entries written."""
        rows = self._read(f"SELECT {_ANNOTATION_COLUMNS} FROM annotations ORDER BY id")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(_annotation(row).to_json(), ensure_ascii=False) + "\n")
        tmp.replace(path)
        return len(rows)

    def import_jsonl(self, path: Path, annotator_default: str) -> int:
        """Append the entries of a JSONL file (the :meth:`export_jsonl` layout); return how many.

        Every line is checked first; any bad line raises ``ValueError`` naming its line number
        and nothing is written. Blank lines are skipped; ``id`` is ignored (entries get new ids,
        after the existing ones, so imported verdicts become current); a missing ``annotator``
        is ``annotator_default``.
        """
        _nonempty_str(annotator_default, "annotator_default")
        path = Path(path)
        records = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(_record_from_json(json.loads(line), annotator_default))
                except ValueError as err:  # json.JSONDecodeError is a ValueError
                    raise ValueError(f"{path}, line {number}: {err}") from None
        with self._write() as db:
            db.executemany(
                "INSERT INTO annotations (instance_id, status, annotator, original_start, "
                "original_end, original_source, corrected_start, corrected_end, fingerprint, "
                "created_at, undone) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", records)
        return len(records)

    # -- case studies ---------------------------------------------------------------------------

    def save_case(self, title: str, note: str, workspace: str, test_id: str, methods: list[str],
                  k: int, snapshot: dict) -> int:
        """Save a case study; return its id. ``title`` must not be blank; ``k`` >= 1."""
        title = _nonempty_str(title, "title").strip()
        if not isinstance(methods, (list, tuple)) or not all(isinstance(m, str) for m in methods):
            raise ValueError(f"methods must be a list of strings, got {methods!r}")
        if not _is_int(k) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not isinstance(snapshot, dict):
            raise ValueError(f"snapshot must be a dict, got {type(snapshot).__name__}")
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO cases (title, note, workspace, test_id, methods, k, snapshot, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (title, note or "", workspace, test_id, _dumps(list(methods)), k,
                 _dumps(snapshot), _now()))
            return cursor.lastrowid

    def list_cases(self) -> list[Case]:
        """Every case study, newest first."""
        return [_case(row) for row in self._read("SELECT * FROM cases ORDER BY id DESC")]

    def get_case(self, case_id: int) -> Case | None:
        """The case study ``case_id``, or ``None``."""
        rows = self._read("SELECT * FROM cases WHERE id = ?", (case_id,))
        return _case(rows[0]) if rows else None

    def delete_case(self, case_id: int) -> bool:
        """Delete a case study; return whether it existed."""
        with self._write() as db:
            return db.execute("DELETE FROM cases WHERE id = ?", (case_id,)).rowcount > 0

    # -- resumable evaluation -------------------------------------------------------------------

    def put_eval_row(self, run_key: str, test_id: str, row: dict) -> None:
        """Record (or replace) one test instance's result of evaluation run ``run_key``."""
        if not isinstance(row, dict):
            raise TypeError(f"row must be a dict, got {type(row).__name__}")
        payload = _dumps(row)
        with self._write() as db:
            db.execute(
                "INSERT INTO eval_rows (run_key, test_id, row, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (run_key, test_id) DO UPDATE SET row = excluded.row, "
                "created_at = excluded.created_at", (run_key, test_id, payload, _now()))

    def eval_rows(self, run_key: str) -> dict[str, dict]:
        """The rows recorded for ``run_key`` by test id, in the order first recorded."""
        rows = self._read("SELECT test_id, row FROM eval_rows WHERE run_key = ? ORDER BY rowid",
                          (run_key,))
        return {row["test_id"]: json.loads(row["row"]) for row in rows}
