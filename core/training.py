"""Training the trainable subset on the frozen-prefix cache (resumable), its checkpoints, and the
variants theta + delta_i.

Training state is kept as JSON (progress, history, the scheduler's counters, the optimiser's
hyper-parameters) and safetensors (parameters, the optimiser's moment tensors): nothing in a
workspace is unpickled, so a workspace file cannot run code.

TracIn's checkpoints end at the model being explained: the last C epochs up to and including
the epoch selected on dev (the paper's checkpoints lie on the path to theta), so training keeps
the epoch files that may still be in that window and drops the rest.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .model import (
    HiddenCache,
    Params,
    SplitModel,
    length_batches,
    load_params,
    predict,
    save_params,
    top_forward,
)
from .workspace import write_json_atomic

STATE_FILE, MOMENTS_FILE = "state.json", "optimizer.safetensors"


@dataclass
class TrainConfig:
    """Settings of the classifier training (the subset above the frozen prefix)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.06
    seed: int = 0
    checkpoints: int = 3

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> TrainConfig:
        """The config a workspace's settings ask for (``prepare``'s, or as its manifest records
        them): one config for ``prepare``'s training and for every retrain (Ral, LDS)."""
        return cls(**{name: settings[name] for name in ("epochs", "batch_size", "lr", "seed", "checkpoints")})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be positive, got {self.lr}")


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    train_loss: float
    dev_accuracy: float
    seconds: float
    dev_loss: float = float("nan")


@dataclass
class TrainState:
    """Everything needed to resume training after an interruption."""

    epoch: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_accuracy: float = -1.0
    best_loss: float = float("inf")

    def better(self, accuracy: float, loss: float) -> bool:
        """Whether an epoch beats the best so far: higher dev accuracy, ties broken by lower dev loss."""
        return (accuracy, -loss) > (self.best_accuracy, -self.best_loss)

    def checkpoint_epochs(self, count: int) -> list[int]:
        """The last ``count`` epochs up to and including the best one (TracIn's checkpoints)."""
        return list(range(max(1, self.best_epoch - count + 1), self.best_epoch + 1))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


class _Trainer:
    """The optimiser, the schedule and the saved state of one training run in ``out_dir``."""

    def __init__(self, split: SplitModel, n: int, cfg: TrainConfig, out_dir: Path):
        self.split, self.cfg, self.out_dir = split, cfg, out_dir
        params = split.top_params()
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params.values() if p.ndim > 1], "weight_decay": cfg.weight_decay},
             {"params": [p for p in params.values() if p.ndim <= 1], "weight_decay": 0.0}], lr=cfg.lr)
        self.total = math.ceil(n / cfg.batch_size) * cfg.epochs
        warmup = int(cfg.warmup * self.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _schedule(s, self.total, warmup))
        self.state = TrainState()

    def resume(self) -> None:
        """Continue from the last finished epoch, if any (parameters, optimiser, schedule)."""
        if (self.out_dir / "state.pt").exists():
            raise ValueError(f"{self.out_dir / 'state.pt'}: training state in the old pickle format is not loaded "
                             "(a pickle can run code); delete it to train again from the first epoch")
        path = self.out_dir / STATE_FILE
        if not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
            moments = load_params(self.out_dir / MOMENTS_FILE)
            state = TrainState(saved["epoch"], [EpochRecord(**r) for r in saved["history"]], saved["best_epoch"],
                               saved["best_accuracy"], saved["best_loss"])
            self.split.load_state(load_params(self.out_dir / f"epoch-{state.epoch}.safetensors"))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.out_dir}: damaged training state ({err}); delete the folder to train "
                             "again from the first epoch") from None
        groups = self.optimizer.state_dict()["param_groups"]
        slots = {int(k.split(".")[0]) for k in moments}
        self.optimizer.load_state_dict({
            "state": {i: {k.split(".", 1)[1]: v for k, v in moments.items() if k.startswith(f"{i}.")} for i in slots},
            "param_groups": [{**g, **saved["param_groups"][n]} for n, g in enumerate(groups)]})
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = state

    def save(self) -> None:
        """The state after an epoch: moments first, then the JSON that points at them."""
        opt = self.optimizer.state_dict()
        moments = {f"{i}.{k}": v.detach().reshape(v.shape) for i, slot in opt["state"].items() for k, v in slot.items()}
        save_params(moments, self.out_dir / MOMENTS_FILE)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        write_json_atomic(self.out_dir / STATE_FILE, {**asdict(self.state), "param_groups": groups,
                                                      "scheduler": self.scheduler.state_dict()})

    def prune(self) -> None:
        """Drop epoch files that can no longer be a checkpoint: outside both the window ending at
        the best epoch so far and the one ending at the current epoch (a later best)."""
        keep = set(self.state.checkpoint_epochs(self.cfg.checkpoints))
        keep |= set(range(self.state.epoch - self.cfg.checkpoints + 2, self.state.epoch + 1))
        for path in self.out_dir.glob("epoch-*.safetensors"):
            if int(path.stem.split("-")[1]) not in keep:
                path.unlink()


def train(
    split: SplitModel,
    train_cache: HiddenCache,
    train_labels: torch.Tensor,
    dev_cache: HiddenCache,
    dev_labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    out_dir: Path,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainState:
    """AdamW training of the trainable subset on the frozen-prefix cache, resumable.

    After every epoch the trainable parameters are saved as ``epoch-E.safetensors`` with the
    training state (``state.json`` + ``optimizer.safetensors``); an interrupted run continues
    from the last finished epoch. The parameters of the best epoch on dev (accuracy, ties broken
    by the dev loss) are left in the split
    (its epoch file, which pruning keeps); the epoch files of :meth:`TrainState.checkpoint_epochs` are
    kept. ``on_epoch(record)`` is called after each epoch, ``on_step(done, total)`` after each
    optimiser step (steps over all epochs, resumed ones included).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Trainer(split, len(train_cache), cfg, out_dir)
    run.resume()
    for epoch in range(run.state.epoch + 1, cfg.epochs + 1):
        started = time.perf_counter()
        lr, loss = _epoch(split, train_cache, train_labels, run, epoch, device, progress, on_step)
        split.top.eval()
        logits = predict(split, dev_cache, device=device)
        dev_acc = accuracy(logits, dev_labels)
        dev_loss = float(nn.functional.cross_entropy(logits, dev_labels)) if len(dev_labels) else float("nan")
        record = EpochRecord(epoch, lr, loss, dev_acc, time.perf_counter() - started, dev_loss)
        run.state.history.append(record)
        run.state.epoch = epoch
        save_params(split.state(), out_dir / f"epoch-{epoch}.safetensors")
        if run.state.better(dev_acc, dev_loss):
            run.state.best_accuracy, run.state.best_loss, run.state.best_epoch = dev_acc, dev_loss, epoch
        run.save()
        run.prune()
        if on_epoch is not None:
            on_epoch(record)
    split.load_state(load_params(out_dir / f"epoch-{run.state.best_epoch}.safetensors"))  # the epoch on record
    return run.state


def _epoch(split: SplitModel, cache: HiddenCache, labels: torch.Tensor, run: _Trainer, epoch: int,
           device: torch.device | str, progress: bool, on_step) -> tuple[float, float]:
    """One epoch of AdamW steps; (mean learning rate, mean loss)."""
    cfg = run.cfg
    split.top.train()
    batches = length_batches(cache.lengths(), cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)
    torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout
    lrs, losses = [], []
    bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress, unit="batch")
    for idx in bar:
        h, mask = cache.batch(idx, device)
        loss = nn.functional.cross_entropy(top_forward(split, h, mask), labels[idx].to(device))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lrs.append(run.optimizer.param_groups[0]["lr"])
        run.optimizer.step()
        run.scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(run.scheduler.last_epoch, run.total)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    return sum(lrs) / len(lrs), sum(losses) / len(losses)


@dataclass(frozen=True)
class VariantRecord:
    """How variant i was made: one SGD step from theta on these training rows."""

    index: int
    seed: int
    rows: tuple[int, ...]
    lr: float
    step_norm: float


def make_variants(
    split: SplitModel,
    train_cache: HiddenCache,
    train_labels: torch.Tensor,
    *,
    count: int = 3,
    batch_size: int = 32,
    lr: float = 1e-4,
    optimizer: str = "adamw",
    weight_decay: float = 0.01,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[list[Params], list[VariantRecord]]:
    """``theta_i = theta + delta_i``: one training step from theta on a seeded random mini-batch.

    ``optimizer="adamw"``: the first step of a fresh AdamW (the training optimiser), which moves
    every parameter by about ``lr`` along the sign of its gradient - the paper's "one-step
    training (learning rate 1e-4)". ``"sgd"``: ``delta = -lr * grad``, which at lr 1e-4 moves the
    model so little that the variants are theta to about seven digits. Dropout is off, so the
    same seed gives bitwise the same variants; theta is restored afterwards.
    """
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"variant optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    theta = split.state()
    params = split.top_params()
    variants, records = [], []
    split.top.eval()
    for i in range(1, count + 1):
        vseed = seed * 7919 + i
        rows = tuple(sorted(random.Random(vseed).sample(range(len(train_cache)), min(batch_size, len(train_cache)))))
        h, mask = train_cache.batch(rows, device)
        loss = nn.functional.cross_entropy(top_forward(split, h, mask), train_labels[list(rows)].to(device))
        grads = torch.autograd.grad(loss, list(params.values()))
        if optimizer == "sgd":
            variant = {n: (theta[n] - lr * g.detach()).clone() for n, g in zip(params, grads)}
        else:
            step = torch.optim.AdamW(
                [{"params": [p for p in params.values() if p.ndim > 1], "weight_decay": weight_decay},
                 {"params": [p for p in params.values() if p.ndim <= 1], "weight_decay": 0.0}], lr=lr)
            for p, g in zip(params.values(), grads):
                p.grad = g.detach()
            step.step()
            for p in params.values():
                p.grad = None
            variant = split.state()
            split.load_state(theta)
        norm = math.sqrt(sum(float((variant[n] - theta[n]).double().pow(2).sum()) for n in params))
        variants.append(variant)
        records.append(VariantRecord(i, vseed, rows, lr, norm))
    return variants, records


def variants_like(settings: dict, split: SplitModel, train_cache: HiddenCache, train_labels: torch.Tensor, *,
                  seed: int, device: torch.device | str = "cpu") -> tuple[list[Params], list[VariantRecord]]:
    """:func:`make_variants` with a workspace's variant settings (``prepare``'s own, and the new
    variants of later faithfulness runs), from ``seed``."""
    return make_variants(split, train_cache, train_labels, count=settings["variants"], batch_size=settings["batch_size"],
                         lr=settings["variant_lr"], optimizer=settings.get("variant_optimizer", "adamw"), seed=seed,
                         device=device)


