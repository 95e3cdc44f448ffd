"""`prepare`: stages, manifest, resume after interruption, stale-part invalidation, presets."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from core.model import load_params
from core.prepare import prepare
from core.importing import ImportSettings
from core.prepare_settings import PrepareSettings, preset_defaults, sample_seed
from core.workspace import Workspace, load_model
from tests.conftest import tiny_settings


def test_workspace_holds_every_part(tiny_workspace):
    ws = Workspace(tiny_workspace)
    manifest = ws.manifest()
    assert all(manifest.stages[s]["done"] for s in ("data", "spans", "model", "importance", "variants"))
    assert manifest.stages["data"]["counts"] == {"train": 48, "dev": 16, "test": 16}
    assert {"python", "torch", "transformers"} <= set(manifest.versions)
    assert 0.0 <= manifest.results["test_accuracy"] <= 1.0
    assert [r["epoch"] for r in manifest.stages["model"]["checkpoints"]] == [2, 3]
    assert ws.points("checkpoint") == ["checkpoint-1", "checkpoint-2"]
    assert ws.points("variant") == ["variant-1", "variant-2", "variant-3"]
    rows = ws.load_instances()
    assert len(rows) == 80 and all(r["span"] and r["span"]["start"] < r["span"]["end"] for r in rows)
    assert all("pred" in r for r in rows if r["split"] in ("dev", "test"))


def test_load_model_returns_each_point_as_hf_model(tiny_workspace):
    ws = Workspace(tiny_workspace)
    row = next(r for r in ws.load_instances() if r["split"] == "test")
    logits = {}
    for point in ("final", "checkpoint-1", "variant-2"):
        model = load_model(ws, point, device="cpu")
        tok = model.spanlens_tokenizer
        with torch.no_grad():
            logits[point] = model(**tok(row["aspect"], row["text"], return_tensors="pt")).logits[0]
        saved = load_params(ws.point_path(point))
        name = next(iter(saved))
        assert torch.equal(dict(model.named_parameters())[name].detach(), saved[name])
    probs = logits["final"].softmax(-1)
    assert probs.tolist() == pytest.approx(row["probs"], abs=2e-3)
    assert not torch.allclose(logits["final"], logits["checkpoint-1"])
    # a variant is one small step away from theta
    assert torch.allclose(logits["final"], logits["variant-2"], atol=1e-2)
    with pytest.raises(ValueError, match="unknown parameter point"):
        load_model(ws, "epoch-3")


class Interrupt(Exception):
    pass


def test_interrupted_prepare_resumes_to_the_same_model(tmp_path, data_dir, tiny_backbone, tiny_workspace):
    settings = tiny_settings(data_dir, tiny_backbone)
    lines: list[str] = []

    def stop_at_epoch_two(line: str) -> None:
        lines.append(line)
        if "epoch 2:" in line:
            raise Interrupt

    with pytest.raises(Interrupt):
        prepare(settings, tmp_path / "ws", progress=False, log=stop_at_epoch_two)
    assert not Workspace(tmp_path / "ws").manifest().stages["model"]["done"]
    lines.clear()
    prepare(settings, tmp_path / "ws", progress=False, log=lines.append)
    assert "[data] up to date" in " ".join(lines) and any(l.startswith("[model] resuming") for l in lines)
    assert not any("epoch 1:" in l or "epoch 2:" in l for l in lines), "finished epochs are not trained again"
    resumed = load_params(Workspace(tmp_path / "ws").point_path("final"))
    straight = load_params(Workspace(tiny_workspace).point_path("final"))
    assert all(torch.allclose(resumed[n], straight[n], atol=1e-6) for n in straight)


def test_changed_setting_never_reuses_stale_parts(tmp_path, data_dir, tiny_backbone):
    root = tmp_path / "ws"
    settings = tiny_settings(data_dir, tiny_backbone, epochs=2)
    prepare(settings, root, progress=False, log=lambda _: None)
    before = load_params(Workspace(root).point_path("final"))
    variant_before = load_params(Workspace(root).point_path("variant-1"))

    lines: list[str] = []
    prepare(settings, root, progress=False, log=lines.append)
    assert all("up to date" in l for l in lines if l.startswith("[")), lines

    lines.clear()
    prepare(tiny_settings(data_dir, tiny_backbone, epochs=2, lr=5e-3), root, progress=False, log=lines.append)
    joined = "\n".join(lines)
    assert "[data] up to date" in joined and "[spans] up to date" in joined
    changed = next(l for l in lines if l.startswith("[settings] changed since this workspace was last prepared: "))
    assert "prepared: lr 0.001 -> 0.005; the stages whose" in changed and "device" not in changed and "seed" not in changed, changed
    assert "[model] up to date" not in joined and "[variants] up to date" not in joined
    after = load_params(Workspace(root).point_path("final"))
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert any(not torch.equal(variant_before[n], load_params(Workspace(root).point_path("variant-1"))[n]) for n in before)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["settings"]["lr"] == 5e-3

    lines.clear()
    prepare(tiny_settings(data_dir, tiny_backbone, epochs=2, lr=5e-3, train_limit=40), root, progress=False, log=lines.append)
    assert "[data] up to date" not in "\n".join(lines)
    assert Workspace(root).manifest().stages["data"]["counts"]["train"] == 40


def test_a_data_seed_keeps_the_slice_while_the_classifier_seed_changes(tmp_path, data_dir, tiny_backbone,
                                                                      tiny_workspace):
    root = tmp_path / "seed1"
    lines: list[str] = []
    prepare(tiny_settings(data_dir, tiny_backbone, seed=1, data_seed=0), root, progress=False, log=lines.append)
    ids = lambda ws: [r["id"] for r in Workspace(ws).load_instances()]  # noqa: E731
    assert ids(root) == ids(tiny_workspace)  # the tiny workspace: seed 0, no data seed
    assert "samples drawn with seed 0" in "\n".join(lines)
    first, other = (load_params(Workspace(ws).point_path("final")) for ws in (tiny_workspace, root))
    assert any(not torch.equal(first[n], other[n]) for n in first)  # another classifier on the same slice
    prepare(tiny_settings(data_dir, tiny_backbone, seed=1, epochs=1), tmp_path / "drawn", progress=False,
            log=lambda _: None)
    assert ids(tmp_path / "drawn") != ids(tiny_workspace)  # without it, --seed draws the slice too
    assert sample_seed(PrepareSettings(seed=3)) == 3 and sample_seed(PrepareSettings(seed=3, data_seed=0)) == 0
    assert sample_seed(ImportSettings(model="m", dataset="mams", seed=4)) == 4  # import draws its samples with its seed


def test_presets_and_overrides():
    paper = PrepareSettings.from_preset("paper", dataset="sentihood")
    assert (paper.model, paper.batch_size, paper.lr, paper.epochs) == ("roberta-large", 100, 1e-4, 100)
    assert PrepareSettings.from_preset("paper", dataset="mams").batch_size == 200
    assert PrepareSettings.from_preset("paper", dataset="mams", batch_size=16, lr=None).batch_size == 16
    demo = PrepareSettings.from_preset("demo")
    assert demo.model == "minilm" and demo.trainable_layers == 2 and demo.variants == 3
    # the help texts state the defaults from the presets themselves
    assert preset_defaults("epochs") == "default 6; paper preset 100"
    assert preset_defaults("batch_size") == "default 32; paper preset 200 on mams, 100 on sentihood"
    assert preset_defaults("variants") == "default 3"
    with pytest.raises(ValueError, match="unknown preset"):
        PrepareSettings.from_preset("fast")


def test_new_texts_get_the_spans_of_a_span_importance_workspace(tmp_path, data_dir, tiny_backbone):
    """With --span-importance on MAMS, every span is chosen among the chunks around its aspect; the
    same text typed in again (explain --test-text, the app's new review) gets the span prepare chose."""
    from core.backend import Backend
    from core.prepare import prepare
    from core.spans import candidate_chunks
    from core.workspace import Workspace
    from tests.conftest import tiny_settings

    settings = tiny_settings(data_dir, tiny_backbone, train_limit=24, eval_limit=8, epochs=1, checkpoints=1,
                             span_importance=True)
    prepare(settings, tmp_path / "ws", progress=False, log=lambda _: None)
    rows = Workspace(tmp_path / "ws").load_instances()
    chosen = [r for r in rows if r["span"]["source"] == "importance"]
    assert len(chosen) >= 3
    backend = Backend(tmp_path / "ws", device="cpu")
    for row in chosen[:4]:
        span = (row["span"]["start"], row["span"]["end"])
        assert span in candidate_chunks(row["text"], row["start"], row["end"], row["aspect"])
        assert backend.new_input(row["text"], row["aspect"]).span == span


def test_category_aspects_get_spans_chosen_by_importance(tmp_path, data_dir, tiny_backbone):
    """SentiHood's aspects are categories: their spans are the most important clause or sentence of
    the text for that aspect, and the manifest compares them with the target-anchored ones."""
    from core.backend import Backend
    from core.prepare import prepare
    from core.spans import category_candidates, clause_span
    from core.workspace import Workspace
    from tests.conftest import tiny_settings

    settings = tiny_settings(data_dir, tiny_backbone, dataset="sentihood", train_limit=24, eval_limit=8, epochs=1)
    lines: list[str] = []
    manifest = prepare(settings, tmp_path / "ws", progress=False, log=lines.append)
    # one epoch cannot give the 2 checkpoints asked: said, not silently shortened
    assert len(manifest.stages["model"]["checkpoints"]) == 1
    assert any("warning: 2 checkpoints asked, 1 kept" in line for line in lines)
    stats = manifest.stages["importance"]["category"]
    rows = Workspace(tmp_path / "ws").load_instances()
    assert stats["instances"] == len(rows) and stats["conflicting_pairs"] >= stats["conflicting_pairs_sharing_a_span_chosen"]
    assert stats["mean_importance_chosen"] >= stats["mean_importance_anchored"]  # the chosen one is the most important
    for row in rows:
        span = (row["span"]["start"], row["span"]["end"])
        assert row["span"]["source"] in ("importance", "heuristic", "whole")
        if row["span"]["source"] == "importance":
            assert span in category_candidates(row["text"])
    # a new text with a category aspect, written as the dataset writes them (any case), gets the span prepare gave
    backend = Backend(tmp_path / "ws", device="cpu")
    chosen = [r for r in rows if r["span"]["source"] == "importance"][:3]
    assert chosen
    for row in chosen:
        new = backend.new_input(row["text"], row["aspect"].upper(), label="POSITIVE")
        assert new.span == (row["span"]["start"], row["span"]["end"]) and new.aspect == row["aspect"]
        assert new.label == "positive"  # label names are matched whatever their case
    text = "LOCATION1 is very cheap, but the streets of LOCATION1 are dangerous at night."
    with pytest.raises(ValueError, match=r"does not occur in the review.*a target \(location1, location2\) and a category \(.*price.*\)"):
        backend.new_input(text, "location1 weather")
    with pytest.raises(ValueError, match="the target 'location2' of the aspect 'location2 price' does not occur"):
        backend.new_input(text, "location2 price")
    with pytest.raises(ValueError, match="a new review has no gold label"):
        backend.new_input(text, "location1 price", label="Gold")
    anchored = prepare(dataclasses.replace(settings, category_spans="anchored"), tmp_path / "ws", progress=False,
                       log=lambda _: None)
    assert anchored.stages["importance"]["category"] == {}
    assert all(r["span"]["source"] != "importance" for r in Workspace(tmp_path / "ws").load_instances())
    anchored_rows = {r["id"]: r for r in Workspace(tmp_path / "ws").load_instances()}
    backend = Backend(tmp_path / "ws", device="cpu")
    for row in chosen:  # the target's clause now, as prepare anchored them, not the span importance chose
        again = anchored_rows[row["id"]]
        span = backend.new_input(row["text"], row["aspect"]).span
        assert span == (again["span"]["start"], again["span"]["end"]) == clause_span(row["text"], row["start"], row["end"])
        assert span != (row["span"]["start"], row["span"]["end"])
