"""Training and scoring a standalone network on a `DataSplit`: the last step of a search (fine-tune or train the
chosen architecture) and the baselines a search is compared with.

One recipe everywhere, so that comparisons are fair: AdamW, cosine learning rate over all steps, batches of
`batch_size` drawn from a permutation that depends only on (seed, epoch), the last partial batch dropped.
With `checkpoint`, the state is saved atomically after every epoch and on Ctrl-C, and a later call with the
same settings resumes from it exactly.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import DataSplit
from .errors import DeployKitError
from .fileio import load_checkpoint_doc, save_checkpoint

CHECKPOINT_FORMAT = "deploykit-train-checkpoint"
CHECKPOINT_VERSION = 1


def logit_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"accuracy": top-1 in [0, 1], "loss": mean cross-entropy} of class logits against labels.
    The loss tells apart networks whose accuracies differ by an image or two."""
    return {"accuracy": float((logits.argmax(1) == labels).float().mean()), "loss": float(F.cross_entropy(logits, labels))}


def validation_scores(net: nn.Module, data: DataSplit, batch_size: int = 256) -> dict:
    """logit_scores of `net` (put in eval mode) on the validation split."""
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(xb) for xb in torch.split(data.val_x, batch_size)])
    return logit_scores(logits, data.val_y)


def accuracy(net: nn.Module, data: DataSplit, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of `net` (put in eval mode) on the validation split."""
    return validation_scores(net, data, batch_size)["accuracy"]


def _cosine(lr: float, step: int, total: int) -> float:
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _save(path: Path, net: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state,
                           "model": net.state_dict(), "optimizer": opt.state_dict()})


def load_training_state(path: Path, net: nn.Module, opt: torch.optim.Optimizer, settings: dict, *,
                        fmt: str = CHECKPOINT_FORMAT, version: int = CHECKPOINT_VERSION, what: str = "training checkpoint",
                        max_epochs: int | None = None) -> dict:
    """A per-epoch checkpoint's document, after checking it was written with `settings` (and holds at most
    `max_epochs` epochs) and loading its model and optimizer state into `net` and `opt`."""
    fix = "delete it to train from the start"
    doc = load_checkpoint_doc(path, fmt, version, what, fix)
    for name, value in settings.items():
        if doc.get(name) != value:
            raise DeployKitError(f"{what} {path} was written with {name}={doc.get(name)!r}, not {value!r}: "
                                 f"pass the same settings to resume, or {fix}")
    if max_epochs is not None and doc["epoch"] > max_epochs:
        raise DeployKitError(f"{what} {path} already holds {doc['epoch']} epochs, more than epochs={max_epochs}: "
                             f"pass epochs >= {doc['epoch']}, or {fix}")
    try:
        net.load_state_dict(doc["model"])
    except RuntimeError:
        raise DeployKitError(f"{what} {path} holds another network: {fix}") from None
    opt.load_state_dict(doc["optimizer"])
    return doc


def _resume(path: Path, net: nn.Module, opt: torch.optim.Optimizer, settings: dict) -> dict:
    doc = load_training_state(path, net, opt, settings)
    return {"epoch": doc["epoch"], "epoch_losses": list(doc["epoch_losses"])}


def train_network(net: nn.Module, data: DataSplit, *, epochs: int, lr: float = 3e-3, weight_decay: float = 1e-4,
                  batch_size: int = 64, seed: int = 0, progress: bool = True, desc: str = "train",
                  checkpoint: str | os.PathLike | None = None) -> dict:
    """Train `net` in place for `epochs` epochs and score it on the validation split.

    Returns {"accuracy", "val_loss", "epochs", "epoch_losses", "seconds", "resumed_from_epoch"}; the net is left
    in eval mode.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise DeployKitError(f"epochs must be a non-negative integer, got {epochs!r}")
    n = len(data.train_x)
    if n < 2 or batch_size < 2:
        raise DeployKitError(f"training needs at least 2 images and batch_size >= 2 (BatchNorm), got {n} and {batch_size}")
    steps = max(1, n // batch_size)
    total = epochs * steps
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    settings = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed}
    state = {"epoch": 0, "epoch_losses": []}
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = _resume(path, net, opt, settings)
    start = state["epoch"]
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=start * steps, unit="step", desc=desc, disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        while state["epoch"] < epochs:
            epoch = state["epoch"]
            perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
            net.train()
            loss_sum = 0.0
            for s in range(steps):
                idx = perm[s * batch_size:(s + 1) * batch_size]
                for g in opt.param_groups:
                    g["lr"] = _cosine(lr, epoch * steps + s, total)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(data.train_x[idx]), data.train_y[idx])
                loss.backward()
                opt.step()
                loss_sum += loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            state = {"epoch": epoch + 1, "epoch_losses": [*state["epoch_losses"], loss_sum / steps]}
            if path is not None:
                _save(path, net, opt, {**settings, **state})
    finally:  # on Ctrl-C the interrupted epoch is lost: the checkpoint holds the last finished one
        bar.close()
    scores = validation_scores(net, data)
    return {"accuracy": scores["accuracy"], "val_loss": scores["loss"], "epochs": state["epoch"],
            "epoch_losses": state["epoch_losses"],
            "seconds": time.perf_counter() - t0, "resumed_from_epoch": start}
