"""Bring your own classifier: tiny models of each supported architecture, fine-tuned in full by
``transformers.Trainer`` (two checkpoints), imported, and every method's scores checked against
brute-force autograd on the imported model - at a checkpoint, with that checkpoint's whole model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.artifacts import bases_for, open_ekfac
from core.backend import Backend, MethodUnavailable, index_workspace
from core.engine import Engine
from core.gradients import Projector
from core.importing import ImportSettings, import_model
from core.index import IndexSettings
from core.model import HiddenCache, compute_prefix, mask_span
from core.registry import METHODS
from core.scoring import TRAK_RIDGE, ScoreSettings
from core.training_sides import StreamedSide
from core.workspace import Workspace, load_model
from tests.brute import DAMPING, brute_trak, compute_gauss_newton, sides
from tests.builders import ARCHITECTURES, finetune, finished, tiny_classifier
from tests.test_app import navigation_only  # noqa: F401  (an autouse fixture: app.py's navigation in AppTest)

LABELS = {"aspect": ["negative", "neutral", "positive"], "single": ["negative", "positive"],
          "pair": ["contradiction", "entailment", "neutral"]}
FORMATS = {"bert": "aspect", "roberta": "single", "distilbert": "pair", "deberta-v2": "single", "electra": "pair"}
LAYERS = {"deberta-v2": 2}  # trainable layers; 1 for the others (a deeper bottom, a smaller P)
N_CHECK = 8  # training instances compared against brute force
QUIET = dict(progress=False, log=lambda _: None)
FOODS = ["pasta", "pizza", "soup", "salad", "steak"]
MOODS = [("great", 0), ("awful", 1), ("fine", 2), ("cold", 1)]


def rows_of(fmt: str, n: int = 24) -> list[dict]:
    """A small data set in an input format: 16 train, 4 dev, 4 test rows (labels by index of LABELS[fmt])."""
    out = []
    for k in range(n):
        food, (word, y) = FOODS[k % 5], MOODS[k % 4]
        y = y % len(LABELS[fmt])
        split = "train" if k < 16 else "dev" if k < 20 else "test"
        text = f"The {food} was {word}, but the room {k} was quiet. We left at ten."
        row = {"aspect": {"text": text, "aspect": food}, "single": {"text": text},
               "pair": {"premise": f"A {food} that was {MOODS[(k + y) % 4][0]}.", "hypothesis": text}}[fmt]
        out.append({**row, "label": LABELS[fmt][y].upper() if k % 3 == 0 else LABELS[fmt][y], "split": split})
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model_pairs(rows: list[dict], fmt: str) -> list[tuple[str, str]]:
    """What the model reads from each row: (aspect, text), ("", text) or (premise, hypothesis)."""
    return [{"aspect": (r.get("aspect"), r.get("text")), "single": ("", r.get("text")),
             "pair": (r.get("premise"), r.get("hypothesis"))}[fmt] for r in rows]


def fine_tuned(arch: str, folder: Path, fmt: str) -> tuple[Path, Path]:
    """A tiny classifier fine-tuned in full on the train split of a data set in ``fmt``: its folder
    (checkpoint-2 and checkpoint-4 = the final model) and the data file."""
    rows = rows_of(fmt)
    folder.parent.mkdir(parents=True, exist_ok=True)
    data = write_rows(folder.parent / f"{arch}.jsonl", rows)
    train = [r for r in rows if r["split"] == "train"]
    model, tok = tiny_classifier(arch, folder, LABELS[fmt])
    finetune(model, tok, model_pairs(train, fmt), [LABELS[fmt].index(r["label"].lower()) for r in train], folder,
             steps=4, save_steps=2)
    return folder, data


@pytest.fixture(scope="module", params=ARCHITECTURES)
def imported(request, tmp_path_factory) -> tuple[str, Path]:
    """(architecture, workspace) of an imported fine-tuned model, exact index with TRAK and EK-FAC."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    folder, data = fine_tuned(arch, root / "model", FORMATS[arch])
    ws = root / "ws"
    import_model(ImportSettings(model=str(folder), dataset=str(data), trainable_layers=LAYERS.get(arch, 1),
                                batch_size=8, max_length=64, device="cpu"), ws, **QUIET)
    index_workspace(Workspace(ws), IndexSettings(dim=None, batch_size=8), device="cpu", extras=["trak", "ekfac"], **QUIET)
    return arch, ws


class Float64:
    """The training inputs' frozen-prefix states, whole and span-masked, on each point's bottom,
    computed in float64 (float32 states would leave rounding to cancel in x - x_-ij)."""

    def __init__(self, backend: Backend):
        self.loaded, tok = backend.loaded, backend.loaded.tokenizer
        rows = backend.instances("train")
        whole = [self.loaded.encode(r.aspect, r.text) for r in rows]
        self.inputs = (whole, [mask_span(e, *r.span_pair, tok.mask_token_id) if r.span else e
                               for e, r in zip(whole, rows)])
        self.done: dict[str, tuple[HiddenCache, HiddenCache]] = {}

    def pair(self, point: str) -> tuple[HiddenCache, HiddenCache]:
        bottom = self.loaded.bottom(point)
        if bottom not in self.done:
            with self.loaded.at(bottom):
                self.done[bottom] = tuple(compute_prefix(self.loaded.split, encs, self.loaded.tokenizer.pad_token_id,
                                                         progress=False) for encs in self.inputs)
        return self.done[bottom]


def engine64(ws: Path) -> Engine:
    """The streamed exact engine with the model, every point (each checkpoint's own bottom too)
    and the caches in float64."""
    own = Backend(ws, device="cpu")
    loaded = own.loaded
    loaded.split.model.double()
    for tensors in [*loaded.points.values(), *loaded.frozen.values()]:
        for name in tensors:
            tensors[name] = tensors[name].double()
    loaded.use("final")
    labels = own.train_cache()[1]
    prefixes = Float64(own)
    projector = Projector(loaded.split, None)
    side = StreamedSide(loaded, projector, *prefixes.pair("final"), labels, 8, prefixes=prefixes,
                        bases=lambda kinds: bases_for(own.ws, kinds))
    return Engine(loaded, side, projector, train_cache=lambda: (prefixes.pair("final")[0], labels),
                  ekfac=lambda: open_ekfac(own.ws))


def point_vectors(backend: Backend, point: str, rows, test) -> dict[str, dict[str, torch.Tensor]]:
    """Autograd's g and e (float64) of each row and of the test at a point, with the point's whole model."""
    model = load_model(backend.ws, point, device="cpu").double()
    tok, labels = model.spanlens_tokenizer, backend.manifest.labels
    return {r.id: sides(model, tok, r, labels.index(r.label), r.span_pair, "row") for r in [test, *rows]}


def expected(backend: Backend, spec, vectors, inverse, rows, test) -> torch.Tensor:
    """A method's score by its formula over the brute-force vectors (``inverse``: (G + lambda I)^-1
    of a test-side representation)."""
    ws = backend.ws
    points = {"final": ["final"], "checkpoints": ws.points("checkpoint"), "variants": ws.points("variant")}[spec.points]
    lrs = {r["point"]: r["lr"] for r in ws.manifest().stages["model"]["checkpoints"]}
    total = torch.zeros(len(rows), dtype=torch.float64)
    for point in points:
        t_vec = inverse[spec.test] if spec.inverse else vectors[point][test.id][spec.test]
        weight = lrs[point] if spec.weights == "lr" else 1.0
        total += weight * torch.stack([t_vec @ vectors[point][r.id][spec.train] for r in rows])
    return total


def ekfac_expected(backend: Backend, spec, rows, test) -> torch.Tensor:
    """EK-FAC influence by its definition: the factors applied to autograd's dense test side at theta."""
    model = load_model(backend.ws, "final", device="cpu").double()
    tok, labels = model.spanlens_tokenizer, backend.manifest.labels
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = sides(model, tok, test, labels.index(test.label), test.span_pair, "test")[spec.test]
    dense = {n: t.view(p.shape) for (n, p), t in zip(params, torch.split(flat, [p.numel() for _, p in params]))}
    applied = open_ekfac(backend.ws).apply(dense, DAMPING)
    t_vec = torch.cat([applied[n].flatten() for n, _ in params])
    return torch.stack([t_vec @ sides(model, tok, r, labels.index(r.label), r.span_pair, "train")[spec.train]
                        for r in rows])


def test_every_method_equals_brute_force_on_the_imported_model(imported):
    """Every registered method (exact, float64 end to end) against autograd on the imported model,
    the checkpoints' vectors from each checkpoint's own whole model; the stored (float32, exact)
    index agrees up to float32 cancellation."""
    arch, ws = imported
    backend = Backend(ws, device="cpu")
    manifest = backend.manifest
    assert [r["step"] for r in manifest.stages["model"]["checkpoints"]] == [2, 4]
    assert "test_accuracy" in manifest.results and manifest.settings["imported"]
    test = backend.record(backend.instances("test")[0].id)
    rows = backend.instances("train")[:N_CHECK]
    points = ["final", *backend.ws.points("checkpoint"), *backend.ws.points("variant")]
    vectors = {p: point_vectors(backend, p, rows, test) for p in points}
    theta = load_model(ws, "final", device="cpu").double()
    gram = compute_gauss_newton(backend, theta, theta.spanlens_tokenizer)
    reps = ("full", "diff")
    solved = torch.linalg.solve(gram + DAMPING * torch.eye(len(gram), dtype=torch.float64),
                                torch.stack([vectors["final"][test.id][r] for r in reps], 1))
    inverse = dict(zip(reps, solved.T))
    specs = list(METHODS)
    settings = ScoreSettings(damping=DAMPING)
    query = [backend.test_input(test.id, "gold")]
    got = engine64(ws).scores_many(query, specs, settings)
    stored = backend.engine().scores_many(query, specs, settings)
    for spec in specs:
        if spec.inverse == "trak":
            want = brute_trak(backend, test.id, spec.train == "trak-diff", rows, TRAK_RIDGE)
        elif spec.inverse == "ekfac":
            want = ekfac_expected(backend, spec, rows, test)
        else:
            want = expected(backend, spec, vectors, inverse, rows, test)
        values = got[spec.name].values[0, :N_CHECK].double()
        assert want.abs().max() > 0, (arch, spec.name)
        rel = float((values - want).norm() / want.norm())
        assert rel < 1e-6, (arch, spec.name, rel)
        index = stored[spec.name].values[0].double()
        rel = float((index - got[spec.name].values[0].double()).norm() / index.norm())
        # x - x_masked cancels in float32; TRAK's whitened rows are kept in float16 (core.index.half_rows)
        assert rel < (1e-2 if spec.uses_spans else 5e-3 if spec.inverse == "trak" else 1e-4), (arch, spec.name, rel)


def test_a_checkpoints_own_bottom_matters(imported):
    """The checks above can tell: at checkpoint-1 the gradients on theta's bottom (the checkpoint's
    top on theta's frozen layers) differ from those of the checkpoint's whole model by far more
    than their tolerances."""
    arch, ws = imported
    backend = Backend(ws, device="cpu")
    test = backend.record(backend.instances("test")[0].id)
    label = backend.manifest.labels.index(test.label)
    own = load_model(ws, "checkpoint-1", device="cpu").double()
    mixed = load_model(ws, "final", device="cpu").double()
    with torch.no_grad():
        for name, p in mixed.named_parameters():
            if p.requires_grad:
                p.copy_(dict(own.named_parameters())[name])
    g_own = sides(own, own.spanlens_tokenizer, test, label, test.span_pair, "test")
    g_mixed = sides(mixed, mixed.spanlens_tokenizer, test, label, test.span_pair, "test")
    for rep, tolerance in (("full", 1e-4), ("diff", 1e-2)):  # the float32 index's
        assert float((g_own[rep] - g_mixed[rep]).norm() / g_own[rep].norm()) > 10 * tolerance, (arch, rep)


@pytest.mark.parametrize("imported", ["roberta", "distilbert"], indirect=True)  # a single-text and a pair workspace
def test_an_imported_workspace_explains_and_evaluates(imported, tmp_path):
    """The CLI on an imported workspace: explain a test instance and a new text; evaluate without
    retraining (Ral and LDS refused with the reason)."""
    from core.__main__ import main

    arch, ws = imported
    backend = Backend(ws, device="cpu")
    record = backend.instances("test")[0]
    test_id = record.id
    # typed in again as a new text (a pair with its first text), it gets the span import chose for it
    assert backend.new_input(record.text, record.aspect).span == record.span_pair
    assert main(["explain", "--workspace", str(ws), "--test-id", test_id, "--method", "TracIn,IF++", "--k", "3",
                 "--device", "cpu"]) == 0
    extra = ["--text-a", "A pizza that was awful."] if backend.input_format == "pair" else []
    assert main(["explain", "--workspace", str(ws), "--test-text", "The soup was great. We left.", *extra,
                 "--method", "TracIn++", "--k", "2", "--device", "cpu", "--json"]) == 0
    assert main(["evaluate", "--workspace", str(ws), "--methods", "IF++,TracIn++,TracIn", "--k", "3",
                 "--test-limit", "3", "--faithfulness-runs", "1", "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    assert (tmp_path / "eval" / "report.md").exists()
    assert main(["evaluate", "--workspace", str(ws), "--ral", "20", "--test-limit", "2", "--out",
                 str(tmp_path / "ral"), "--quiet"]) == 2


def test_a_model_without_checkpoints_shows_checkpoint_methods_unavailable(tmp_path):
    folder, data = fine_tuned("bert", tmp_path / "model", "single")
    for checkpoint in folder.glob("checkpoint-*"):
        for path in sorted(checkpoint.iterdir()):
            path.unlink()
        checkpoint.rmdir()
    ws = tmp_path / "ws"
    import_model(ImportSettings(model=str(folder), dataset=str(data), trainable_layers=1, max_length=64,
                                device="cpu"), ws, **QUIET)
    index_workspace(Workspace(ws), IndexSettings(dim=16, batch_size=8), device="cpu", **QUIET)
    backend = Backend(ws, device="cpu")
    for name in ("TracIn", "Control", "TRAK"):
        with pytest.raises(MethodUnavailable, match=r"checkpoints: .*has no checkpoint-\* folders"):
            backend.check_methods([METHODS.resolve(name)])
    backend.check_methods([METHODS.resolve(n) for n in ("TracInF", "TracIn++", "IF++", "GroundTruth")])
    assert backend.explain(backend.instances("test")[0].id, "TracIn++", k=3).top


def test_label_mismatch_and_unsupported_architectures_are_clear_errors(tmp_path):
    from transformers import AlbertConfig, AlbertForSequenceClassification

    folder, data = fine_tuned("distilbert", tmp_path / "model", "single")
    other = write_rows(tmp_path / "topics.jsonl", [{**r, "label": "sports" if k % 2 else "negative"}
                                                    for k, r in enumerate(rows_of("single"))])
    with pytest.raises(ValueError) as err:
        import_model(ImportSettings(model=str(folder), dataset=str(other), device="cpu"), tmp_path / "ws", **QUIET)
    message = str(err.value)
    assert "dataset's labels (negative, sports)" in message and "the model's (negative, positive" in message
    assert not (tmp_path / "ws").exists()  # refused before anything was written
    albert = tmp_path / "albert"
    AlbertForSequenceClassification(AlbertConfig(vocab_size=100, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32)).save_pretrained(albert)
    with pytest.raises(ValueError, match=r"AlbertForSequenceClassification \(model type 'albert'\) is not supported: "
                                         r"SpanLens splits BERT, RoBERTa, .*DistilBERT"):
        import_model(ImportSettings(model=str(albert), dataset=str(data), device="cpu"), tmp_path / "ws2", **QUIET)


# ----------------------------------------------------------------------------- the app

@pytest.mark.parametrize("imported", ["roberta", "distilbert"], indirect=True)
def test_explore_page_on_single_text_and_pair_workspaces(imported, tmp_path, monkeypatch):
    """The Explore page (AppTest) on an imported single-text and a text-pair workspace: cards,
    no aspect filter, the pair's first text shown, the new-text form of the format."""
    import shutil

    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP, TIMEOUT, cards, joined

    arch, ws = imported
    fmt = FORMATS[arch]
    root = tmp_path / "workspaces"
    shutil.copytree(ws, root / "mine", ignore=shutil.ignore_patterns("store.sqlite*"))
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(root))
    test = Backend(root / "mine").instances("test")[0]
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(workspace="mine", test=test.id, methods="TracIn,TracIn++", k="3")
    at.switch_page("pages/explore.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(cards(at)) == 6 and ("Test span from importance" in joined(at) or "Test span from whole" in joined(at))
    assert not [s for s in at.selectbox if s.key == "explore_aspect"]  # no aspect to filter by
    assert ("First text&#58; A " in joined(at)) == (fmt == "pair")  # the caption escapes ':' (no emoji codes)
    assert ("<dt>first text</dt>" in joined(at)) == (fmt == "pair") and "<dt>aspect</dt>" not in joined(at)
    at.radio(key="explore_mode").set_value("New review").run()
    assert bool([t for t in at.text_input if t.key == "new_aspect"]) == (fmt == "pair")
    if fmt == "pair":
        at.text_input(key="new_aspect").set_value("A pizza that was great.")
    at.text_area(key="new_text").set_value("The soup was cold. The room was quiet.")
    at.form_submit_button[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(cards(at)) == 6


def test_import_form_checks_paths_and_builds(tmp_path, monkeypatch):
    """The Workspaces page's import form: a model folder outside the data roots and an unsupported
    model are refused at once; a supported one is imported in the background and listed ready,
    its span source and checkpoints shown."""

    from streamlit.testing.v1 import AppTest

    from core import jobs
    from tests.test_app import APP, TIMEOUT

    data_root = tmp_path / "data"
    folder, data = fine_tuned("electra", data_root / "model", "single")
    root = tmp_path / "workspaces"
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(root))
    monkeypatch.setenv("SPANLENS_DATA_ROOTS", str(data_root))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("pages/workspaces.py").run()
    at.text_input(key="imp_name").set_value("imported")
    at.text_input(key="imp_model").set_value(str(tmp_path))  # outside the data roots
    at.text_input(key="imp_path").set_value(str(data))
    at.form_submit_button(key="FormSubmitter:import-Import and build").click().run()
    assert any("must lie under a data root" in e.value for e in at.error)
    at.text_input(key="imp_model").set_value(str(data_root))  # under the root, but no model
    at.form_submit_button(key="FormSubmitter:import-Import and build").click().run()
    assert any("no model weights" in e.value or "config.json" in e.value for e in at.error)
    at.text_input(key="imp_model").set_value(str(folder))
    at.number_input(key="imp_layers").set_value(1)
    at.number_input(key="imp_proj").set_value(16)
    at.form_submit_button(key="FormSubmitter:import-Import and build").click().run()
    finished(jobs.job_for("prepare", root / "imported"))
    at.run()
    listing = at.dataframe[0].value.set_index("workspace")
    assert listing.loc["imported", "status"] == "ready"
    captions = joined_captions(at)
    assert "Spans: the importance rule (paper Eq. 3) over each text's clauses and sentences" in captions
    assert "Checkpoints for TracIn, Control and TRAK: step 2" in captions


def joined_captions(at) -> str:
    from html import unescape

    return unescape(" ".join(h.value for h in at.html))


def test_rc_span_model_is_chosen_in_the_app_and_shown(tmp_path, monkeypatch):
    """The RC span model field of both Workspaces forms: refused outside the data roots and when the
    folder is not an extractive QA model; an import of (aspect, text) data with a local QA folder
    builds, and the Workspaces and Explore pages say that its spans come from that model."""

    from streamlit.testing.v1 import AppTest

    from core import jobs
    from tests.builders import tiny_qa
    from tests.test_app import APP, TIMEOUT

    data_root = tmp_path / "data"
    folder, data = fine_tuned("bert", data_root / "model", "aspect")
    qa = tiny_qa(data_root / "qa")
    root = tmp_path / "workspaces"
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(root))
    monkeypatch.setenv("SPANLENS_DATA_ROOTS", str(data_root))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("pages/workspaces.py").run()
    submit = "FormSubmitter:import-Import and build"

    def import_error(rc: str, fmt: str = "auto") -> str:
        at.text_input(key="imp_rc").set_value(rc)
        at.selectbox(key="imp_format").set_value(fmt)
        at.form_submit_button(key=submit).click().run()
        return " ".join(e.value for e in at.error)

    at.text_input(key="imp_name").set_value("rc")
    at.text_input(key="imp_model").set_value(str(folder))
    at.text_input(key="imp_path").set_value(str(data))
    at.number_input(key="imp_layers").set_value(1)
    at.number_input(key="imp_proj").set_value(16)
    assert "must lie under a data root" in import_error(str(tmp_path))
    assert "not an extractive question-answering model" in import_error(str(folder))  # a classifier
    assert "single texts and text pairs have none" in import_error(str(qa), "single")
    assert jobs.job_for("prepare", root / "rc") is None  # nothing started on a refusal
    at.radio(key="new_dataset").set_value("file").run()  # the create form checks the field the same way
    at.text_input(key="new_name").set_value("created")
    at.text_input(key="new_path").set_value(str(data))
    at.text_input(key="new_rc").set_value(str(folder))
    at.form_submit_button(key="FormSubmitter:create-Create and build").click().run()
    assert any("Span model" in e.value and "not an extractive question-answering model" in e.value for e in at.error)
    assert jobs.job_for("prepare", root / "created") is None

    assert not import_error(str(qa), "aspect")
    finished(jobs.job_for("prepare", root / "rc"))
    source = f"reading comprehension with the QA model {qa.resolve()} (the clause heuristic where it fails)"
    assert Workspace(root / "rc").manifest().settings["rc_model"] == str(qa.resolve())
    at.run()
    assert at.dataframe[0].value.set_index("workspace").loc["rc", "status"] == "ready"
    assert f"Spans: {source}" in joined_captions(at)
    at.switch_page("pages/explore.py").run()  # the session's workspace: the one just imported
    assert not at.exception, [e.value for e in at.exception]
    captions = joined_captions(at)
    assert "Test span from " in captions and f"Spans in this workspace: {source}." in captions
