"""Aspect-level instances and the loaders that make them.

One :class:`Instance` per (text, aspect) pair. Loaders read MAMS / SemEval-2014 XML,
SentiHood JSON and a plain JSONL/CSV layout; bad input raises :class:`DataError` naming the
file and the element or line.

Sources understood by :func:`load_dataset`:

* ``"mams"`` / ``"sentihood"``: the public data sets in the folder layout of :data:`LAYOUT`
  (``python -m core fetch-data --dest DIR`` downloads them).
* a file: SemEval-2014 XML (``.xml``), SentiHood JSON (``.json``), or JSONL/CSV (``.jsonl``,
  ``.csv``) with fields ``text, aspect, label`` and optional ``from, to, term, split, id`` (or
  the fields of single texts and text pairs: :mod:`core.formats`).
* a folder holding one such file per split, named ``train``/``val`` or ``dev``/``test``
  (optionally with a prefix: ``sentihood-train.json``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import formats

SPLITS = ("train", "dev", "test")


class DataError(ValueError):
    """A data file that cannot be read as asked; the message names the file and place."""


@dataclass(frozen=True)
class Instance:
    """One aspect-level example.

    ``id`` is stable across runs (derived from the dataset, split and position/ids in the file).
    ``start``/``end`` are the aspect's character offsets in ``text`` (``text[start:end]`` is the
    mention of the aspect), or ``None`` when the dataset gives none and it cannot be found.
    ``aspect`` is the first segment of the model input (the pair is (aspect, text)).
    For SentiHood, ``aspect`` is ``"location1 price"`` and ``start``/``end`` delimit the target
    mention (``LOCATION1``); ``meta`` holds ``target`` and ``category``.
    """

    id: str
    split: str
    text: str
    aspect: str
    label: str
    start: int | None = None
    end: int | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


KNOWN_LABELS = ("negative", "neutral", "positive")
"""Polarities any loader recognises; a label outside these (and ``conflict``) is an error."""
CONFLICT = "conflict"

LABELS: dict[str, tuple[str, ...]] = {
    "mams": KNOWN_LABELS,
    "sentihood": ("negative", "positive"),
}
LAYOUT: dict[str, dict[str, str]] = {
    "mams": {"train": "mams-atsa/train.xml", "dev": "mams-atsa/val.xml", "test": "mams-atsa/test.xml"},
    "sentihood": {split: f"sentihood/sentihood-{split}.json" for split in SPLITS},
}
"""Where each named data set's split files live, relative to the data folder."""
FORMATS = {"mams": "xml", "sentihood": "sentihood"}
SUFFIX_FORMATS = {".xml": "xml", ".json": "sentihood", ".jsonl": "jsonl", ".csv": "csv"}
SPLIT_ALIASES = {"train": "train", "dev": "dev", "val": "dev", "validation": "dev", "test": "test"}
HASH_NOTE = (
    "no split given: splits assigned from a hash of the text "
    "(80/10/10 train/dev/test; all aspects of one text share a split)"
)
EXPECTED = {
    "xml": "SemEval-2014 XML (<sentences> of <sentence> with <text> and <aspectTerms>)",
    "sentihood": "a JSON list of sentences with text and opinions",
    "jsonl": "one JSON object per line with text, aspect and label",
    "csv": "a header with text, aspect, label and one row per instance",
}
"""What a file of each format holds, for errors about empty files."""


@dataclass
class FileReport:
    """What one file contributed: sentences and instances read, items skipped by reason."""

    path: Path
    split: str | None  # None: the file's rows name or hash their own splits
    sentences: int = 0
    instances: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    input_format: str = "aspect"

    def summary(self) -> str:
        where = f" [{self.split}]" if self.split else ""
        line = f"{self.path}{where}: {self.instances} instances from {self.sentences} sentences"
        if self.skipped:
            line += "; skipped " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return "\n  ".join([line, *self.notes])


@dataclass
class LoadReport:
    """Per-file :class:`FileReport` records of one :func:`load_dataset` call."""

    files: list[FileReport] = field(default_factory=list)

    @property
    def instances(self) -> int:
        return sum(f.instances for f in self.files)

    @property
    def skipped(self) -> Counter[str]:
        """Skipped items by reason, over all files."""
        return sum((f.skipped for f in self.files), Counter())

    def summary(self) -> str:
        return "\n".join(f.summary() for f in self.files)


@dataclass
class Dataset:
    """Instances by split (the keys of :data:`SPLITS`), label set, load report, input format."""

    name: str
    labels: tuple[str, ...]
    splits: dict[str, list[Instance]]
    report: LoadReport
    input_format: str = "aspect"

    def all(self) -> list[Instance]:
        """Every instance: train, then dev, then test."""
        return [inst for split in SPLITS for inst in self.splits.get(split, [])]

    def by_id(self) -> dict[str, Instance]:
        """A fresh id -> instance map (build it once, not per lookup)."""
        return {inst.id: inst for inst in self.all()}

    def split(self, name: str) -> list[Instance]:
        """Instances of split ``name`` (``val``/``validation`` mean ``dev``)."""
        key = SPLIT_ALIASES.get(name.lower())
        if key is None:
            raise KeyError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return self.splits[key]


class _File:
    """Reading context for one file: place-naming errors, the label policy, the input format."""

    def __init__(self, path: Path, split: str | None, labels: tuple[str, ...] | None, conflict: str,
                 input_format: str = "auto", open_labels: bool = False):
        self.path = path
        self.split = split
        self.labels = labels
        self.conflict = conflict
        self.input_format = input_format
        self.open_labels = open_labels
        self.report = FileReport(path, split)

    def error(self, where: str, message: str) -> DataError:
        return DataError(f"{self.path}: {where}: {message}")

    def label(self, raw: Any, where: str) -> str | None:
        """The normalised label, or None when the item is skipped under ``conflict='skip'``."""
        if not isinstance(raw, str) or not raw.strip():
            raise self.error(where, f"missing or empty polarity ({raw!r})")
        label = raw.strip().lower()
        allowed = self.labels if self.labels is not None else KNOWN_LABELS
        if label in allowed or (self.open_labels and label != CONFLICT):
            return label
        if label != CONFLICT and label not in KNOWN_LABELS:
            raise self.error(where, f"unknown polarity {raw!r} (expected one of {', '.join(allowed)})")
        reason = CONFLICT if label == CONFLICT else f"label {label!r} not in label set"
        self.skip(where, reason, f"polarity {label!r} is not in the label set ({', '.join(allowed)})")
        return None

    def skip(self, where: str, reason: str, message: str) -> None:
        """Count a skipped label-policy item, or raise under ``conflict='error'``."""
        if self.conflict == "error":
            raise self.error(where, f"{message}; pass conflict='skip' to drop such items")
        self.report.skipped[reason] += 1

    def split_of(self, text: str) -> str:
        if self.split is not None:
            return self.split
        if HASH_NOTE not in self.report.notes:
            self.report.notes.append(HASH_NOTE)
        return hash_split(text)


Found = list[tuple[Instance, str]]  # instances with the place they came from, for messages


def hash_split(text: str) -> str:
    """Deterministic 80/10/10 train/dev/test split from the text's SHA-256."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if bucket < 80 else "dev" if bucket < 90 else "test"


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def _span(f: _File, where: str, text: str, term: str, start: Any, end: Any) -> tuple[int, int]:
    """Validated offsets with ``text[start:end] == term`` (exact match)."""
    s, e = _as_int(start), _as_int(end)
    if s is None or e is None:
        raise f.error(where, f"offsets must be integers (from={start!r}, to={end!r})")
    if not 0 <= s < e <= len(text):
        raise f.error(where, f"offsets from={s} to={e} out of range for a text of {len(text)} characters")
    if text[s:e] != term:
        raise f.error(where, f"offsets from={s} to={e} give {text[s:e]!r}, not the term {term!r}")
    return s, e


def _find(text: str, needle: str) -> tuple[int | None, int | None]:
    """Offsets of the first case-insensitive occurrence of ``needle``, or (None, None)."""
    match = re.search(re.escape(needle), text, re.IGNORECASE)
    return (match.start(), match.end()) if match else (None, None)


def _read_text(f: _File) -> str:
    try:
        with open(f.path, encoding="utf-8-sig", newline="") as fh:  # keep line endings verbatim
            return fh.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{f.path}: not UTF-8 text (byte {err.start}): {err.reason}") from err
    except OSError as err:
        raise DataError(f"{f.path}: cannot read: {err.strerror or err}") from err


def _read_xml(f: _File, name: str) -> Found:
    """SemEval-2014 layout: sentences/sentence[@id]/text + aspectTerms/aspectTerm."""
    try:
        root = ET.parse(f.path).getroot()  # bytes in: the XML declaration names the encoding
    except ET.ParseError as err:
        raise DataError(f"{f.path}: broken XML: {err}") from err
    except OSError as err:
        raise DataError(f"{f.path}: cannot read: {err.strerror or err}") from err
    if root.tag != "sentences":
        raise f.error("root element", f"expected <sentences>, found <{root.tag}>")
    sentences = root.findall("sentence")
    if not sentences:
        raise f.error("root element", "no <sentence> elements")
    found: Found = []
    for i, sentence in enumerate(sentences):
        sid = sentence.get("id")
        where = f"sentence {i}" + (f" (id={sid})" if sid is not None else "")
        f.report.sentences += 1
        terms = sentence.findall("aspectTerms/aspectTerm")
        if not terms:
            f.report.skipped["no aspect terms"] += 1
            continue
        text = sentence.findtext("text")
        if not text or not text.strip():
            raise f.error(where, "missing or empty <text>")
        for j, element in enumerate(terms):
            at = f"{where}, aspectTerm {j}"
            missing = [a for a in ("term", "from", "to", "polarity") if element.get(a) is None]
            if missing:
                raise f.error(at, f"missing attribute(s) {', '.join(missing)}")
            term = element.get("term", "")
            if not term.strip():
                raise f.error(at, "empty term")
            start, end = _span(f, at, text, term, element.get("from"), element.get("to"))
            label = f.label(element.get("polarity"), at)
            if label is None:
                continue
            split = f.split_of(text)
            key = sid if sid is not None else i
            found.append((Instance(f"{name}/{split}/{key}/{j}", split, text, term, label, start, end),
                          f"{f.path}: {at}"))
    return found


def _read_sentihood(f: _File, name: str) -> Found:
    """SentiHood JSON: a list of {id, text, opinions: [{target_entity, aspect, sentiment}]}."""
    try:
        data = json.loads(_read_text(f))
    except json.JSONDecodeError as err:
        raise DataError(f"{f.path}: broken JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(data, list):
        raise f.error("top level", "expected a JSON list of sentences")
    found: Found = []
    for i, sentence in enumerate(data):
        if not isinstance(sentence, dict):
            raise f.error(f"sentence {i}", "expected a JSON object")
        sid = sentence.get("id", i)
        where = f"sentence {i} (id={sid})"
        missing = [k for k in ("text", "opinions") if k not in sentence]
        if missing:
            raise f.error(where, f"missing field(s) {', '.join(missing)}")
        f.report.sentences += 1
        opinions = sentence["opinions"]
        if not isinstance(opinions, list):
            raise f.error(where, "'opinions' must be a list")
        if not opinions:
            f.report.skipped["no opinions"] += 1
            continue
        text = sentence["text"]
        if not isinstance(text, str) or not text.strip():
            raise f.error(where, "missing or empty text")
        text = text.strip()
        found += _sentihood_opinions(f, name, sid, where, text, opinions)
    return found


def _sentihood_opinions(f: _File, name: str, sid: object, where: str, text: str, opinions: list) -> Found:
    """One SentiHood sentence's opinions as instances: one per (target, category) pair; a pair
    with contradictory sentiments is skipped as a conflict, a repeated one as a duplicate."""
    parsed = []  # (j, place, target, category, label)
    for j, opinion in enumerate(opinions):
        at = f"{where}, opinion {j}"
        if not isinstance(opinion, dict):
            raise f.error(at, "expected a JSON object")
        missing = [k for k in ("target_entity", "aspect", "sentiment") if k not in opinion]
        if missing:
            raise f.error(at, f"missing field(s) {', '.join(missing)}")
        target, category = opinion["target_entity"], opinion["aspect"]
        if not all(isinstance(v, str) and v.strip() for v in (target, category)):
            raise f.error(at, "empty target_entity or aspect")
        label = f.label(opinion["sentiment"], at)
        if label is not None:
            parsed.append((j, at, target.strip(), category.strip(), label))
    by_pair: dict[tuple[str, str], set[str]] = {}
    for _, _, target, category, label in parsed:
        by_pair.setdefault((target.lower(), category.lower()), set()).add(label)
    found: Found = []
    done: set[tuple[str, str]] = set()
    for j, at, target, category, label in parsed:
        pair = (target.lower(), category.lower())
        if len(by_pair[pair]) > 1:
            f.skip(at, CONFLICT, f"contradictory sentiments {sorted(by_pair[pair])} for {target} {category}")
            continue
        if pair in done:
            f.report.skipped["duplicate opinion"] += 1
            continue
        done.add(pair)
        split = f.split_of(text)
        start, end = _find(text, target)
        found.append((
            Instance(f"{name}/{split}/{sid}/{j}", split, text, f"{target} {category}".lower(), label,
                     start, end, meta={"target": target, "category": category}),
            f"{f.path}: {at}",
        ))
    return found


def _jsonl_rows(f: _File) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(_read_text(f).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise f.error(f"line {n}, column {err.colno}", f"broken JSON: {err.msg}") from err
        if not isinstance(row, dict):
            raise f.error(f"line {n}", "expected a JSON object")
        rows.append((n, row))
    return rows


def _csv_rows(f: _File) -> list[tuple[int, dict]]:
    """Rows with their 1-based first line (the header is line 1)."""
    reader = csv.DictReader(io.StringIO(_read_text(f), newline=""))
    rows = []
    try:
        if not reader.fieldnames:
            raise f.error("line 1", "empty file; expected a header with text, aspect, label")
        reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
        fmt = formats.detect(reader.fieldnames) if f.input_format == "auto" else f.input_format
        missing = [c for c in formats.required(fmt, reader.fieldnames) if c not in reader.fieldnames]
        if missing:
            raise f.error("line 1", f"missing column(s) {', '.join(missing)} in the header")
        for row in reader:
            first = reader.line_num - sum(v.count("\n") for v in row.values() if isinstance(v, str))
            if None in row:
                raise f.error(f"line {first}", "more fields than the header has columns")
            rows.append((first, row))
    except csv.Error as err:
        raise f.error(f"line {reader.line_num}", f"broken CSV: {err}") from err
    return rows


def _read_records(f: _File, name: str, rows: list[tuple[int, dict]]) -> Found:
    """JSONL/CSV rows (:mod:`core.formats`) and optional from, to, term (aspect format), split, id."""
    has_split = any(row.get("split") not in (None, "") for _, row in rows)
    fmt = f.input_format if f.input_format != "auto" else formats.detect(rows[0][1].keys() if rows else ())
    f.report.input_format, f.open_labels = fmt, f.open_labels or fmt != "aspect"  # other tasks: any labels
    if fmt != "aspect":
        f.report.notes.append(f"input format: {formats.DESCRIPTIONS[fmt]}")
    found: Found = []
    for n, row in rows:
        where = f"line {n}"
        try:
            aspect, text = formats.inputs(row, fmt)
        except ValueError as err:
            raise f.error(where, str(err)) from None
        start, end = row.get("from"), row.get("to")
        if fmt != "aspect":
            start = end = None  # no aspect mention
        elif start in (None, "") and end in (None, ""):
            start, end = _find(text, aspect)
        elif start in (None, "") or end in (None, ""):
            raise f.error(where, "give both 'from' and 'to', or neither")
        else:
            term = row.get("term") or aspect
            start, end = _span(f, where, text, term, start, end)
        label = f.label(row["label"], where)
        if label is None:
            continue
        raw_split = row.get("split")
        if raw_split in (None, ""):
            if has_split:
                raise f.error(where, "empty split (other rows name theirs)")
            split = f.split_of(text)
        else:
            split = SPLIT_ALIASES.get(str(raw_split).strip().lower(), "")
            if not split:
                raise f.error(where, f"unknown split {raw_split!r} (expected train, dev/val or test)")
            if f.split is not None and split != f.split:
                raise f.error(where, f"split {raw_split!r} disagrees with the file's split {f.split!r}")
        raw_id = row.get("id")
        iid = str(raw_id) if raw_id not in (None, "") else f"{name}/{split}/{n}"
        found.append((Instance(iid, split, text, aspect, label, start, end), f"{f.path}: {where}"))
    f.report.sentences = len({formats.inputs(row, fmt)[1] for _, row in rows})
    return found


_READERS: dict[str, Callable[[_File, str], Found]] = {
    "xml": _read_xml,
    "sentihood": _read_sentihood,
    "jsonl": lambda f, name: _read_records(f, name, _jsonl_rows(f)),
    "csv": lambda f, name: _read_records(f, name, _csv_rows(f)),
}


def _format(path: Path) -> str:
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type; expected {', '.join(SUFFIX_FORMATS)}")
    return fmt


def _is_blank(path: Path) -> bool:
    """Whether ``path`` holds nothing but white space (and a byte-order mark); False if unreadable."""
    try:
        size = path.stat().st_size
        return size == 0 or (size <= 4096 and not path.read_bytes().removeprefix(b"\xef\xbb\xbf").strip())
    except OSError:
        return False  # the reader says why it cannot read it


def _collect(files: Iterable[tuple[Path, str | None, str]], name: str, labels: tuple[str, ...] | None,
             conflict: str, input_format: str = "auto",
             open_labels: bool = False) -> tuple[dict[str, list[Instance]], LoadReport]:
    """Read ``files`` (path, split or None, format), checking that ids are unique, one input format."""
    if conflict not in ("skip", "error"):
        raise ValueError(f"conflict must be 'skip' or 'error', not {conflict!r}")
    splits: dict[str, list[Instance]] = {split: [] for split in SPLITS}
    report = LoadReport()
    seen: dict[str, str] = {}
    for path, split, fmt in files:
        if _is_blank(path):
            raise DataError(f"{path}: the file is empty; expected {EXPECTED[fmt]}")
        if fmt in ("xml", "sentihood") and formats.check_format(input_format) not in ("auto", "aspect"):
            raise DataError(f"{path}: holds (aspect, text) pairs; input format {input_format!r} needs JSONL/CSV")
        f = _File(path, split, labels, conflict, input_format, open_labels)
        per_split: Counter[str] = Counter()
        for inst, where in _READERS[fmt](f, name):
            if inst.id in seen:
                raise DataError(f"duplicate id {inst.id!r}: {seen[inst.id]} and {where}")
            seen[inst.id] = where
            splits[inst.split].append(inst)
            per_split[inst.split] += 1
        if report.files and f.report.input_format != report.files[0].input_format:
            raise DataError(f"{path} holds {formats.DESCRIPTIONS[f.report.input_format]}, but "
                            f"{report.files[0].path} holds {formats.DESCRIPTIONS[report.files[0].input_format]}")
        f.report.instances = sum(per_split.values())
        if split is None:
            f.report.notes.append("instances per split: " + ", ".join(f"{s} {per_split[s]}" for s in SPLITS))
        report.files.append(f.report)
    return splits, report


def read_file(path: str | Path, split: str | None = None, *, name: str | None = None,
              fmt: str | None = None, labels: Sequence[str] | None = None,
              conflict: str = "skip") -> tuple[list[Instance], FileReport]:
    """Read one file (format from the suffix unless ``fmt`` is one of xml/sentihood/jsonl/csv).

    ``split`` None lets rows name their split or hashes them into one; ``name`` (default: the
    file's stem) prefixes generated ids.
    """
    path = Path(path)
    splits, report = _collect([(path, split, fmt or _format(path))], name or path.stem,
                              tuple(label.lower() for label in labels) if labels else None, conflict)
    return [inst for s in SPLITS for inst in splits[s]], report.files[0]


def default_data_dir() -> Path:
    """``$SPANLENS_DATA`` if set, else ``../shared/data`` relative to the working directory."""
    env = os.environ.get("SPANLENS_DATA")
    return Path(env) if env else Path.cwd().parent / "shared" / "data"


def _split_files(folder: Path) -> list[tuple[Path, str | None, str]]:
    """One file per split in ``folder``: stems ending in train, val/dev/validation or test."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in SUFFIX_FORMATS:
            continue
        split = SPLIT_ALIASES.get(re.split(r"[-_.]", path.stem.lower())[-1])
        if split is None:
            continue
        if split in found:
            raise DataError(f"{folder}: two files for split {split!r}: {found[split].name} and {path.name}")
        found[split] = path
    if not found:
        raise DataError(f"{folder}: no train/dev(val)/test files ({', '.join(SUFFIX_FORMATS)}) found")
    return [(found[s], s, _format(found[s])) for s in SPLITS if s in found]


def load_dataset(source: str, data_dir: str | Path | None = None, *, conflict: str = "skip",
                 labels: Sequence[str] | None = None, input_format: str = "auto",
                 open_labels: bool = False) -> Dataset:
    """Load ``"mams"``, ``"sentihood"``, a data file or a folder of split files.

    ``data_dir`` (default :func:`default_data_dir`) is where the named data sets live; it is not
    used for file or folder sources. ``labels`` overrides the label set (default: fixed for named
    data sets, the known polarities present for user files). Items whose label is ``conflict`` or
    a known polarity outside the label set are dropped and counted (``conflict="skip"``) or raise
    (``conflict="error"``); any other label raises :class:`DataError`. With ``open_labels`` (and
    for single texts and text pairs) every label is read as it is (but an unlisted ``conflict``),
    and the label set is the labels present. ``input_format`` (:mod:`core.formats`): how JSONL/CSV
    rows are read; ``auto`` from their columns.
    """
    label_set = tuple(label.lower() for label in labels) if labels else None
    if source in LAYOUT:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        missing = [str(root / rel) for rel in LAYOUT[source].values() if not (root / rel).is_file()]
        if missing:
            raise DataError(
                f"{source} data not found (missing {', '.join(missing)}); download it with "
                f"`python -m core fetch-data --dest DIR`, then pass --data-dir DIR (data_dir=DIR in Python) or set SPANLENS_DATA=DIR"
            )
        files = [(root / rel, split, FORMATS[source]) for split, rel in LAYOUT[source].items()]
        name, label_set = source, label_set or LABELS[source]
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files, name = _split_files(path), path.name
        elif path.is_file():
            files, name = [(path, None, _format(path))], path.stem
        else:
            raise DataError(f"{source}: no such file or folder, and not a known data set "
                            f"({', '.join(LAYOUT)})")
    splits, report = _collect(files, name, label_set, conflict, input_format, open_labels)
    fmt = report.files[0].input_format if report.files else "aspect"
    present = {inst.label for part in splits.values() for inst in part}
    if label_set is None or open_labels:
        known = [label for label in KNOWN_LABELS if label in present]
        label_set = tuple(known + sorted(present - set(known)))
    return Dataset(name, label_set, splits, report, fmt)


def save_instances(instances: Iterable[Instance], path: str | Path) -> Path:
    """Write instances as JSONL or CSV (by suffix) in the layout :func:`load_dataset` reads back.

    Columns: id, split, text, aspect, label, from, to, term (``text[from:to]``, which differs
    from ``aspect`` for SentiHood).
    """
    path = Path(path)
    rows = [{"id": i.id, "split": i.split, "text": i.text, "aspect": i.aspect, "label": i.label,
             "from": i.start, "to": i.end, "term": i.text[i.start:i.end] if i.start is not None else None}
            for i in instances]
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix.lower() == ".csv":
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["id", "text", "aspect", "label"])
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    else:
        raise ValueError(f"{path}: save_instances writes .jsonl or .csv")
    return path
