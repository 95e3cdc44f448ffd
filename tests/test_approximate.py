"""`explain --approximate`: FAISS candidates rescored exactly, built by `index --ann`, refused
when missing or stale (issue 15)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.__main__ import main
from core.backend import Backend
from core.index import GradientIndex


@pytest.fixture(scope="module")
def sketched(tiny_workspace, tmp_path_factory) -> Path:
    """The tiny workspace re-indexed with a 64-dimensional sketch and FAISS indexes for two methods."""
    root = Path(shutil.copytree(tiny_workspace, tmp_path_factory.mktemp("ann") / "ws",
                                ignore=shutil.ignore_patterns("store.sqlite*")))
    assert main(["index", "--workspace", str(root), "--proj-dim", "64", "--device", "cpu", "--ann", "TracIn,IF++"]) == 0
    return root


def explain(root: Path, test_id: str, method: str, *extra: str) -> tuple[int, list]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["explain", "--workspace", str(root), "--test-id", test_id, "--method", method, "--k", "5",
                     "--device", "cpu", "--json", "--opponents", *extra])
    return code, json.loads(out.getvalue()) if code == 0 else err.getvalue()


def test_approximate_lists_equal_the_exact_ones_when_every_row_is_a_candidate(sketched):
    """48 training rows, 5 x 20 candidates per matrix: the search proposes every row, so the top
    and the opponents (ids and exact scores) equal explain's, and recall@5 is 1 for both lists."""
    backend = Backend(sketched, device="cpu")
    test_id = backend.instances("test")[3].id
    for method in ("TracIn", "IF++"):
        code, got = explain(sketched, test_id, method, "--approximate", "--check-recall")
        assert code == 0, got
        exact = backend.explain(test_id, method, k=5)
        assert got[0]["recall"] == got[0]["recall_opponents"] == 1.0 and got[0]["approx"]["top_k"]["candidates"] == 20
        for key, hits in (("top", exact.top), ("opponents", exact.opponents)):
            assert [h["train_id"] for h in got[0][key]] == [h.train_id for h in hits]
            assert [h["score"] for h in got[0][key]] == pytest.approx([h.score for h in hits], rel=1e-4, abs=1e-6)


def test_approximate_refuses_missing_and_stale_faiss_indexes(sketched, tmp_path):
    root = Path(shutil.copytree(sketched, tmp_path / "ws"))
    backend = Backend(root, device="cpu")
    test_id = backend.instances("test")[0].id
    code, err = explain(root, test_id, "TracIn++", "--approximate")
    assert code == 2 and "no approximate index" in err and f"--workspace {root} --ann TracIn++" in err
    size, files = GradientIndex(root / "index").size_bytes(), len(list((root / "index").iterdir()))
    assert main(["index", "--workspace", str(root), "--device", "cpu", "--ann", "TracIn++"]) == 0
    assert len(list((root / "index").iterdir())) > files  # new FAISS files, not counted in the index's size
    assert GradientIndex(root / "index").size_bytes() == size
    code, err = explain(root, test_id, "TracIn", "--check-recall")
    assert code == 2 and "--check-recall goes with --approximate" in err

    train = backend.instances("train")[0]
    backend.annotate_span(train.id, "fix", "tester", (0, 4))
    code, err = explain(root, test_id, "IF++", "--approximate")  # IF++ reads span rows: stale
    assert code == 2 and "stale (training spans were corrected" in err and "--ann IF++" in err
    assert explain(root, test_id, "TracIn", "--approximate")[0] == 0  # whole-input rows: unchanged
    assert main(["index", "--workspace", str(root), "--device", "cpu", "--ann", "IF++"]) == 0
    code, got = explain(root, test_id, "IF++", "--approximate", "--check-recall")
    assert code == 0 and got[0]["recall"] == 1.0

    record = root / "index" / "ann.final.diff.json"  # as if built over another index
    record.write_text(json.dumps(json.loads(record.read_text()) | {"fingerprint": "0" * 16}))
    code, err = explain(root, test_id, "IF++", "--approximate")
    assert code == 2 and "stale (the index was rebuilt" in err
    assert main(["index", "--workspace", str(root), "--device", "cpu", "--proj-seed", "1"]) == 0  # a new sketch
    code, err = explain(root, test_id, "TracIn", "--approximate")  # a rebuild starts a fresh folder
    assert code == 2 and "no approximate index" in err


def test_index_ann_refuses_bad_requests_before_building(sketched, tmp_path, capsys):
    """No method names, an index FAISS cannot serve (exact) or a projection of no dimensions stop
    `index --ann` with one line before any build."""
    root = Path(shutil.copytree(sketched, tmp_path / "ws"))
    before = (root / "index" / "meta.json").read_text()
    for extra, message in ((["--ann", "none"], "--ann needs method names"),
                           (["--ann", "TracIn", "--proj-dim", "0"], "needs a sketched gradient index"),
                           (["--ann", "TracIn", "--ann-rank", "0"], "argument --ann-rank")):
        assert main(["index", "--workspace", str(root), "--device", "cpu", *extra]) == 2
        assert message in capsys.readouterr().err
    assert (root / "index" / "meta.json").read_text() == before


def test_ann_all_means_the_methods_the_workspace_can_run(sketched):
    """`--ann all` covers every registered method whose points and artifacts the workspace has:
    here all but TRAK and EK-FAC (no `--with trak,ekfac`)."""
    from core.registry import METHODS

    available = Backend(sketched, device="cpu").available_methods()
    assert available == [n for n in METHODS.names() if n not in ("TRAK", "TRAK++", "EKFAC", "EKFAC++")]


def test_a_projection_that_keeps_little_of_the_rows_energy_is_flagged(capsys):
    """Below a third of the rows' energy the explanation carries a warning, which explain prints."""
    from core.ann import LOW_ENERGY, energy_warning
    from core.explain_output import print_table
    from core.explanations import Explanation, Hit

    assert energy_warning(LOW_ENERGY) is None and energy_warning(0.9) is None
    low = energy_warning(0.18)
    assert "keeps 18% of these rows' energy" in low and "--check-recall" in low
    test = SimpleNamespace(span=None, id="t1", aspect="food", text="x")
    backend = SimpleNamespace(by_id={"r1": SimpleNamespace(text="Good\x1b[2J food", span=None, aspect="food",
                                                           label="positive")})
    for top_k, warned in (({"energy_kept": 0.18, "warning": low}, True), ({"energy_kept": 0.9}, False)):
        exp = Explanation("TRAK", "t1", None, 10, [Hit(1, "r1", 0.5)], [], [], {"top_k": top_k}, 0.1, "positive")
        print_table(backend, test, exp, False)
        out = capsys.readouterr().out
        assert (f"  warning: {low}" in out) == warned and out.count("warning") == warned  # once, not in the JSON too
        assert "\x1b" not in out and "Good\\x1b[2J food" in out  # the terminal escape shown, never sent


def test_the_projection_rank_reaches_the_faiss_files_and_another_rank_rebuilds_them(sketched, tmp_path, capsys,
                                                                                    monkeypatch):
    """`index --ann M --ann-rank R` builds rank-R files (reported by explain), a second run with the
    same rank builds nothing, another rank rebuilds them; --ann-rank alone is refused; a file of
    an earlier FAISS layout is refused by explain with the command that rebuilds it."""
    from core.ann import ann_record, energy_warning

    root = Path(shutil.copytree(sketched, tmp_path / "ws"))
    terms = Backend(root, device="cpu").ann_terms(["TracIn"])
    for rank, built in ((16, True), (16, False), (8, True)):
        assert main(["index", "--workspace", str(root), "--device", "cpu", "--ann", "TracIn", "--ann-rank", str(rank)]) == 0
        out = capsys.readouterr().out
        assert ("full: up to date" in out) != built and all(ann_record(GradientIndex(root / "index"), *t)["rank"] == rank
                                                      for t in terms)
    code, got = explain(root, Backend(root, device="cpu").instances("test")[0].id, "TracIn", "--approximate")
    top_k = got[0]["approx"]["top_k"]
    assert code == 0 and top_k["rank"] == [8]
    kept = min(ann_record(GradientIndex(root / "index"), *t)["energy_kept"] for t in terms)  # the matrices' least
    assert top_k["energy_kept"] == kept and top_k.get("warning") == energy_warning(kept)
    monkeypatch.setattr("core.ann.LOW_ENERGY", 1.01)  # every projection flagged: the warning reaches explain
    code, got = explain(root, Backend(root, device="cpu").instances("test")[0].id, "TracIn", "--approximate")
    assert code == 0 and got[0]["approx"]["top_k"]["warning"] == energy_warning(kept)
    assert main(["index", "--workspace", str(root), "--device", "cpu", "--ann-rank", "8"]) == 2
    assert "--ann-rank goes with --ann" in capsys.readouterr().err
    record = root / "index" / f"ann.{terms[0][0]}.{terms[0][1]}.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "layout"}))
    code, err = explain(root, Backend(root, device="cpu").instances("test")[0].id, "TracIn", "--approximate")
    assert code == 2 and "earlier FAISS layout" in err and "--ann TracIn" in err
