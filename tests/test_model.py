"""Backbone split, trainable subset, span masking, training resume and variants."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from core.model import (
    HiddenCache,
    collate,
    compute_prefix,
    encode_pairs,
    load_backbone,
    mask_span,
    span_token_positions,
    split_model,
    top_forward,
)
from core.training import TrainConfig, TrainState, make_variants, train
from tests.builders import roberta_tokenizer, tiny_bert, tiny_deberta, tiny_roberta

LABELS = ["negative", "neutral", "positive"]
PAIRS = [
    ("food", "The decor is not special at all but their food and amazing prices make up for it."),
    ("manager", "when tables opened up, the manager sat another party before us."),
    ("service", "service is good although a bit in your face, we were asked every five mins"),
]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {"bert": tiny_bert(root / "bert"), "roberta": tiny_roberta(root / "roberta"), "deberta": tiny_deberta(root / "deberta")}


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta"])
def test_top_of_bottom_equals_full_model(backbones, family):
    model, tok = load_backbone(str(backbones[family]), LABELS, seed=1)
    split = split_model(model, 2)
    batch = collate(encode_pairs(tok, PAIRS), tok.pad_token_id)
    with torch.no_grad():
        full = model(**batch).logits
        hidden = split.bottom(**batch).last_hidden_state
        top = top_forward(split, hidden, batch["attention_mask"])
    assert torch.allclose(full, top, atol=1e-5), (full - top).abs().max()


@pytest.mark.parametrize("family,n", [("bert", 1), ("bert", 2), ("roberta", 2), ("deberta", 2), ("deberta", 3)])
def test_trainable_subset_is_last_layers_pooler_and_head(backbones, family, n):
    model, _ = load_backbone(str(backbones[family]), LABELS)
    split = split_model(model, n)
    depth = model.config.num_hidden_layers
    layers = {int(m.group(1)) for name in split.trainable if (m := re.search(r"encoder\.layer\.(\d+)\.", name))}
    assert layers == set(range(depth - n, depth))
    assert not any("embeddings" in name for name in split.trainable)
    assert any(name.startswith("classifier") for name in split.trainable)
    head_and_pooler = [n for n in split.trainable if "encoder.layer" not in n]
    assert all("pooler" in n or n.startswith("classifier") for n in head_and_pooler)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert set(frozen).isdisjoint(split.trainable) and len(frozen) + len(split.trainable) == len(list(model.parameters()))


def test_trainable_layers_out_of_range(backbones):
    model, _ = load_backbone(str(backbones["bert"]), LABELS)
    with pytest.raises(ValueError, match="1..3"):
        split_model(model, 4)


def _check_masking(tok, aspect: str, text: str, start: int, end: int) -> None:
    enc = encode_pairs(tok, [(aspect, text)])[0]
    masked = mask_span(enc, start, end, tok.mask_token_id)
    assert len(masked) == len(enc)
    pos = span_token_positions(enc, start, end)
    assert pos, "the span covers at least one token"
    changed = [k for k, (a, b) in enumerate(zip(enc.input_ids, masked.input_ids)) if a != b]
    assert changed == pos
    assert all(masked.input_ids[k] == tok.mask_token_id for k in pos)
    covered = tok.decode([enc.input_ids[k] for k in pos]).strip().lower()
    assert covered == text[start:end].lower()
    # the aspect segment is never masked, even when the span's words also appear there
    aspect_positions = [k for k, off in enumerate(enc.text_offsets) if off is None]
    assert all(masked.input_ids[k] == enc.input_ids[k] for k in aspect_positions)


def test_masking_bert_tokenizer(backbones):
    _, tok = load_backbone(str(backbones["bert"]), LABELS)
    text = PAIRS[0][1]
    start = text.index("their food")
    _check_masking(tok, "food", text, start, start + len("their food and amazing prices"))


def test_masking_roberta_tokenizer(tmp_path):
    tok = roberta_tokenizer(tmp_path)
    assert tok.mask_token == "<mask>"
    text = "the food was great but the service was slow"
    start = text.index("the service")
    _check_masking(tok, "service", text, start, len(text))


def test_empty_span_masks_nothing(backbones):
    _, tok = load_backbone(str(backbones["bert"]), LABELS)
    enc = encode_pairs(tok, [PAIRS[1]])[0]
    assert mask_span(enc, 5, 5, tok.mask_token_id) == enc


def _caches(backbone, n=24):
    model, tok = load_backbone(str(backbone), LABELS, seed=0)
    split = split_model(model, 2)
    texts = [(a, f"{t} number {i}") for i in range(n) for a, t in [PAIRS[i % 3]]]
    cache = compute_prefix(split, encode_pairs(tok, texts), tok.pad_token_id, progress=False)
    labels = torch.tensor([i % 3 for i in range(n)])
    return split, cache, labels


def test_variants_reproducible_from_seed(backbones):
    split, cache, labels = _caches(backbones["bert"])
    theta = split.state()
    a, rec_a = make_variants(split, cache, labels, count=3, batch_size=4, seed=7)
    b, rec_b = make_variants(split, cache, labels, count=3, batch_size=4, seed=7)
    c, _ = make_variants(split, cache, labels, count=3, batch_size=4, seed=8)
    assert rec_a == rec_b
    assert all(torch.equal(a[i][n], b[i][n]) for i in range(3) for n in a[i])
    assert any(not torch.equal(a[0][n], c[0][n]) for n in a[0])
    assert len({r.rows for r in rec_a}) == 3, "each variant has its own mini-batch"
    step = torch.cat([(a[0][n] - theta[n]).flatten() for n in theta])
    assert float(step.norm()) == pytest.approx(rec_a[0].step_norm, rel=1e-3)
    assert all(torch.equal(split.state()[n], theta[n]) for n in theta), "theta is restored"
    # AdamW's first step moves (nearly) every parameter by about lr, whatever its gradient's size
    moved = step.abs()
    assert float((moved > 0.5e-4).float().mean()) > 0.9 and float(moved.max()) < 1.1e-4 + 1e-6
    # plain SGD moves by lr * grad: far less
    sgd, rec_sgd = make_variants(split, cache, labels, count=1, batch_size=4, seed=7, optimizer="sgd")
    assert rec_sgd[0].rows == rec_a[0].rows and 0 < rec_sgd[0].step_norm < rec_a[0].step_norm / 10


class Interrupt(Exception):
    pass


def test_training_resumes_to_the_same_parameters(backbones, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, checkpoints=2)
    split, cache, labels = _caches(backbones["bert"])
    start = split.state()
    state = train(split, cache, labels, cache, labels, cfg, out_dir=tmp_path / "straight", progress=False)
    straight = split.state()
    assert [r.epoch for r in state.history] == [1, 2, 3]
    kept = set(state.checkpoint_epochs(2)) | {3}  # the window ending at the selected epoch, and the last
    assert sorted(p.name for p in (tmp_path / "straight").glob("epoch-*")) == [f"epoch-{e}.safetensors" for e in sorted(kept)]
    assert not list((tmp_path / "straight").glob("*.pt"))  # nothing pickled

    split.load_state(start)

    def stop_after_two(record):
        if record.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(split, cache, labels, cache, labels, cfg, out_dir=tmp_path / "resumed", progress=False, on_epoch=stop_after_two)
    split.load_state(start)  # a fresh process would start from the backbone again
    state = train(split, cache, labels, cache, labels, cfg, out_dir=tmp_path / "resumed", progress=False)
    assert [r.epoch for r in state.history] == [1, 2, 3]
    resumed = split.state()
    assert all(torch.allclose(straight[n], resumed[n], atol=1e-6) for n in straight)


def test_hidden_cache_round_trip(backbones, tmp_path):
    _, cache, _ = _caches(backbones["bert"], n=5)
    cache.save(tmp_path / "c.safetensors")
    again = HiddenCache.load(tmp_path / "c.safetensors")
    assert again.lengths() == cache.lengths()
    assert all(torch.equal(a, b) for a, b in zip(cache.states, again.states))


def test_checkpoints_end_at_the_selected_epoch():
    state = TrainState(epoch=6, best_epoch=3)
    assert state.checkpoint_epochs(3) == [1, 2, 3]
    assert TrainState(epoch=6, best_epoch=1).checkpoint_epochs(3) == [1]
    assert TrainState(epoch=6, best_epoch=6).checkpoint_epochs(2) == [5, 6]


def test_a_pickled_training_state_is_never_loaded(backbones, tmp_path):
    """A workspace file must not run code: the old pickle format is refused, unread."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('the pickle ran')",))

    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, checkpoints=1)
    split, cache, labels = _caches(backbones["bert"])
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.pt").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="old pickle format is not loaded"):
        train(split, cache, labels, cache, labels, cfg, out_dir=out, progress=False)
    (out / "state.pt").unlink()
    train(split, cache, labels, cache, labels, cfg, out_dir=out, progress=False)
    (out / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged training state"):
        train(split, cache, labels, cache, labels, TrainConfig(epochs=2, batch_size=8, lr=1e-3, checkpoints=1),
              out_dir=out, progress=False)


def test_prepare_and_retrains_read_one_training_config(tiny_workspace):
    """Ral and LDS retrain with the config prepare trained with: both read it from the settings."""
    from core.prepare_settings import PrepareSettings
    from core.workspace import Workspace

    recorded = Workspace(tiny_workspace).manifest().settings
    retrain = TrainConfig.from_settings(recorded)
    assert retrain == TrainConfig.from_settings(dataclasses.asdict(PrepareSettings(**recorded)))
    assert (retrain.epochs, retrain.batch_size, retrain.lr, retrain.checkpoints) == (3, 8, 1e-3, 2)
    with pytest.raises(KeyError, match="checkpoints"):
        TrainConfig.from_settings({k: v for k, v in recorded.items() if k != "checkpoints"})
