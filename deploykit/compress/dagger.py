"""Dagger: learned, data-agnostic, latency-aware filter importance for structured pruning.

After "Data Agnostic Filter Gating for Efficient Deep Networks" (Su, You, et al., arXiv 2010.15041): an auxiliary
network, the Dagger module, reads the PRETRAINED WEIGHTS of every channel group (never the images) and outputs a
gate in (0, 1) per filter; forward hooks multiply the group's channels by these gates, and the Dagger module is
trained with the task loss plus a regulariser on the gated network's expected cost. Filters with small gates are
the least important. The paper regularises FLOPs; here the cost is LATENCY, from a linear model supplied by the
caller (built from the device's latency predictor):

    expected_ms = fixed_ms + sum_g ms_per_channel[g] * sum_c gate[g][c]

Choices (the paper leaves them open or differs):
- Descriptor (data-agnostic): for every layer in a group's `weights`, each filter row (weight[c] flattened) is
  summarised into [mean|w|, rms(w), max|w|, mean(w), std(w)], the first three divided by their mean over the
  layer's filters and the last two by the layer's mean rms (so layers of any scale compare), then averaged over the
  group's layers. If a BatchNorm reads a weight layer's output (found with one traced forward pass) or is itself
  listed, [|gamma|, beta] (divided by mean |gamma|) and a has-BN flag are appended: after BatchNorm a channel's
  output scale is |gamma|, not the filter norm. Every column is then standardised within the group (z-score over
  its channels), so one shared MLP serves groups of any width and depth.
- Module: logit = offset[g] + prior(x) + MLP(x) + proj[g](r), gate = sigmoid(logit / temperature). `prior` is a
  linear map initialised to the mean of the magnitude z-scores (|w| norms, |gamma|), so training starts from the
  classic norm criterion and learns corrections to it; the MLP (8 -> 32 -> 1, shared by all groups) reads the
  descriptor x; proj[g] is a per-group linear projection of the flattened filters r (every weight layer's rows
  divided by that layer's rms, concatenated), the paper's "read the whole filter", able to tell which input
  connections matter; MLP and projections start at zero output. `offset` is a learned per-group logit offset, the
  knob through which a group's latency price lowers its gates. Offsets start at logit 3 (gates ~0.95): the gated
  network starts as the pretrained one.
  Measured on a small CNN (digits, 2 networks x 3 targets x 3 seeds, no fine-tuning): keeping the top-gated filters
  beat keeping the top-L1 and the top-|gamma| filters (same per-group counts) by 12-30 accuracy points on average;
  the projection added 2-8 points over the descriptor alone. Honest caveat: where a group's flattened filters have
  at least as many weights as it has channels, the projection can express any per-channel pattern, so the gates are
  in practice the weight prior plus what the task loss teaches per channel; a control with random features in place
  of the weights did as well or slightly better on that CNN. The weights set where training starts (and all of it for channels the
  task loss does not reach).
- Regulariser: weight * |log(expected / target)|, two-sided: it pulls the expected latency down while it is above
  the target and pushes it back up if it falls below. `weight` starts at latency_weight and, because no fixed weight
  beats the task loss of every network, grows by WEIGHT_RAMP (5%) after every step that ends above the target and
  shrinks back towards latency_weight after every step below it. So the expected latency reaches the target
  whatever the task loss's pull (given enough steps: ~14 steps per doubling) and then stays within a few percent of
  it, on either side; it does not undershoot far. The ramp stops at WEIGHT_MAX_FACTOR x latency_weight (a target
  below what the gates can reach ends with the gates pushed as low as they go); latency_weight=0 turns it all off.
- Offsets learn OFFSET_LR_SCALE (10) times faster than the rest of the module: they must cross most of the logit
  range within the few epochs a run has, while prior, MLP and projections refine the ranking within a group.
- The network runs in eval mode throughout: with frozen pretrained weights, BatchNorm uses its running statistics,
  so the gates, not a re-estimation of BatchNorm statistics on gated activations, do the work (and dropout is off).
  With finetune_network=True the network's weights also train (Adam, lr / 10; parameters the caller froze stay
  frozen), still with eval-mode BatchNorm, and the descriptors are recomputed from the current weights every step.
- The paper prunes progressively (prune some filters, continue); this module only scores: one run, one gate per
  filter. The pruning engine decides how many to remove and may call it again on the pruned network.

The model is returned exactly as given: hooks removed, requires_grad and train/eval flags restored per module,
weights untouched unless finetune_network=True. The global torch RNG is not consumed.
"""
from __future__ import annotations

import math
import numbers
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import DataSplit
from ..errors import DeployKitError

FEATURE_DIM = 8  # [l1, l2, max, mean, std] of the filter rows + [|gamma|, beta, has_bn]
MAGNITUDE_COLUMNS = (0, 1, 2, 5)  # l1, l2, max|w|, |gamma|: the columns the norm prior reads
HIDDEN = 32
PRIOR_SCALE = 1.0  # total weight of the norm prior on the magnitude z-scores
LOGIT_LIMIT = 12.0  # |logit / temperature| is soft-clipped here: gates within [6e-6, 1 - 6e-6], never exactly 0 or 1
INIT_LOGIT = 3.0  # sigmoid(3) ~ 0.95: start from (nearly) the pretrained network
OFFSET_LR_SCALE = 10.0
FINETUNE_LR_SCALE = 0.1
WEIGHT_RAMP = 0.05  # per step above the target, the latency weight grows by 5% (x2 in ~14 steps)
WEIGHT_MAX_FACTOR = 1e4  # ... up to this multiple of latency_weight (an unreachable target must not overflow the loss)
_EPS = 1e-8
_Z_CLIP = 6.0


@dataclass
class GateSpec:
    """One channel group, the same fields as `prune.Group` (any object with these attributes is accepted)."""

    id: int
    channels: int
    producers: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    channel_dim: int = 1  # dim of the producers' outputs holding the channels (prune.Group's; -1: Linear over [..., C])


@dataclass
class DaggerConfig:
    epochs: int = 3
    lr: float = 1e-2             # for the Dagger module parameters
    latency_weight: float = 2.0  # lambda of the latency regulariser
    temperature: float = 1.0
    finetune_network: bool = False  # whether the network's own weights also train during gating (default frozen: gates only)
    batch_size: int = 64
    seed: int = 0


@dataclass
class DaggerResult:
    importance: dict[int, torch.Tensor]      # per group id, float tensor [channels]: the learned gate values (higher = keep)
    expected_latency_ms: list[float]         # per epoch (at its end), the gated network's expected latency
    target_latency_ms: float
    task_loss: list[float]                   # per epoch, mean cross-entropy of the gated network
    seconds: float


class DaggerModule(nn.Module):
    """Weights -> gates: logit[g][c] = offset[g] + prior(x[g][c]) + MLP(x[g][c]) + proj[g](r[g][c]),
    gate = sigmoid(soft_clip(logit / temperature)), soft_clip(z) = LOGIT_LIMIT * tanh(z / LOGIT_LIMIT).

    x[g] is the group's [channels, FEATURE_DIM] descriptor (`filter_features`), shared prior and MLP read it;
    r[g] the group's [channels, K] normalised flattened filters (`filter_features`), read by a per-group linear projection
    (zero at the start); offset is one learned scalar per group.
    """

    def __init__(self, row_dims: dict[int, int], feature_dim: int = FEATURE_DIM, hidden: int = HIDDEN,
                 init_logit: float = INIT_LOGIT):
        super().__init__()
        self.group_ids = [int(g) for g in row_dims]
        self._index = {g: i for i, g in enumerate(self.group_ids)}
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)  # starts as the prior alone
        nn.init.zeros_(self.mlp[2].bias)
        self.prior = nn.Linear(feature_dim, 1, bias=False)
        with torch.no_grad():
            self.prior.weight.zero_()
            for col in MAGNITUDE_COLUMNS:
                if col < feature_dim:
                    self.prior.weight[0, col] = PRIOR_SCALE / len(MAGNITUDE_COLUMNS)
        self.proj = nn.ModuleDict({str(g): nn.Linear(max(1, int(k)), 1, bias=False) for g, k in row_dims.items()})
        for lin in self.proj.values():
            nn.init.zeros_(lin.weight)
        self.offset = nn.Parameter(torch.full((len(self.group_ids),), float(init_logit)))

    def forward(self, features: dict[int, torch.Tensor], rows: dict[int, torch.Tensor],
                temperature: float = 1.0) -> dict[int, torch.Tensor]:
        gates = {}
        for g, x in features.items():
            logit = (self.offset[self._index[g]] + self.prior(x).squeeze(-1) + self.mlp(x).squeeze(-1)
                     + self.proj[str(g)](rows[g]).squeeze(-1))
            z = logit / temperature
            gates[g] = torch.sigmoid(LOGIT_LIMIT * torch.tanh(z / LOGIT_LIMIT))  # soft clip: strictly inside (0, 1)
        return gates


# -- descriptors ------------------------------------------------------------------------------------------------------

def _filter_rows(name: str, module: nn.Module, channels: int) -> torch.Tensor:
    """[channels, K]: row c is output channel c's filter."""
    w = module.weight.detach().float()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # stored [in, out / groups, *k]
        g = module.groups
        w = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2).reshape(g * w.shape[1], -1)
    if w.shape[0] != channels:
        raise DeployKitError(f"weight layer {name!r} has {w.shape[0]} output filters but its group has {channels} channels: "
                             "list only layers whose output channels are the group's channels")
    return w.reshape(channels, -1)


def _rel(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x / (scale + _EPS)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardise every column over the group's channels; a constant column becomes zeros."""
    mean = x.mean(0, keepdim=True)
    std = x.std(0, unbiased=False, keepdim=True)
    z = torch.where(std > 1e-6, (x - mean) / std.clamp_min(1e-6), torch.zeros_like(x))
    return z.clamp(-_Z_CLIP, _Z_CLIP)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))


def filter_features(model: nn.Module, groups: list,
                    bn_of: dict[str, str] | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per group id, the data-agnostic inputs of the Dagger module (see the module docstring): the [channels,
    FEATURE_DIM] descriptor of its filters, and its [channels, K] flattened filters (every weight layer's rows divided
    by that layer's rms, concatenated).

    `bn_of` maps a weight layer's name to the BatchNorm that reads its output (`find_batchnorms`).
    """
    modules = dict(model.named_modules())
    bn_of = bn_of or {}
    descriptors, flat = {}, {}
    for grp in groups:
        c = int(grp.channels)
        conv_feats, norm_feats, conv_rows = [], [], []
        norm_names = []
        for name in grp.weights:
            m = modules[name]
            if _is_norm(m) and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                norm_names.append(name)
                continue
            rows = _filter_rows(name, m, c)
            a = rows.abs()
            l1, l2, mx = a.mean(1), rows.pow(2).mean(1).sqrt(), a.amax(1)
            mu, sd = rows.mean(1), rows.std(1, unbiased=False)
            scale = l2.mean()
            conv_rows.append(_rel(rows, scale))
            conv_feats.append(torch.stack([_rel(l1, l1.mean()), _rel(l2, scale), _rel(mx, mx.mean()),
                                           _rel(mu, scale), _rel(sd, scale)], 1))
            if name in bn_of:
                norm_names.append(bn_of[name])
        for name in grp.producers:
            if _is_norm(modules[name]):
                norm_names.append(name)
        for name in dict.fromkeys(norm_names):  # de-duplicated, in order
            m = modules[name]
            if getattr(m, "weight", None) is None or m.weight.numel() != c:
                continue  # an affine-free or differently shaped norm says nothing per channel
            gamma = m.weight.detach().float().abs()
            beta = m.bias.detach().float() if getattr(m, "bias", None) is not None else torch.zeros(c)
            norm_feats.append(torch.stack([_rel(gamma, gamma.mean()), _rel(beta, gamma.mean())], 1))
        filt = torch.stack(conv_feats).mean(0) if conv_feats else torch.zeros(c, 5)
        if norm_feats:
            norm = torch.cat([torch.stack(norm_feats).mean(0), torch.ones(c, 1)], 1)
        else:
            norm = torch.zeros(c, 3)
        x = torch.cat([filt, norm], 1)
        x[:, :7] = _zscore(x[:, :7])
        descriptors[int(grp.id)] = x
        flat[int(grp.id)] = torch.cat(conv_rows, 1) if conv_rows else torch.zeros(c, 1)
    return descriptors, flat


def find_batchnorms(model: nn.Module, weight_names: list[str], example: torch.Tensor) -> dict[str, str]:
    """Which BatchNorm reads each weight layer's output directly: traced by one forward pass on `example`."""
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    found: dict[str, str] = {}
    handles = []

    def record(name):
        def hook(_m, _inp, out):
            outputs[name] = out
        return hook

    def match(name):
        def hook(_m, inp, _out):
            if inp and isinstance(inp[0], torch.Tensor):
                for wname, t in outputs.items():
                    if inp[0] is t and wname not in found:
                        found[wname] = name
        return hook

    flags = {name: m.training for name, m in modules.items()}
    try:
        for name in dict.fromkeys(weight_names):
            handles.append(modules[name].register_forward_hook(record(name)))
        for name, m in modules.items():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                handles.append(m.register_forward_hook(match(name)))
        model.eval()
        with torch.no_grad():
            try:
                model(example)
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DeployKitError(f"the model cannot run on the data's images {tuple(example.shape)}: {first}: give data "
                                     "at the resolution and channel count the model was trained on") from None
    finally:
        for h in handles:
            h.remove()
        for name, m in modules.items():
            m.training = flags[name]
    return found


# -- validation -------------------------------------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _check_config(cfg: DaggerConfig) -> None:
    if isinstance(cfg.epochs, bool) or not isinstance(cfg.epochs, int) or cfg.epochs < 1:
        raise DeployKitError(f"DaggerConfig.epochs must be a positive integer, got {cfg.epochs!r}")
    for name in ("lr", "temperature"):
        v = getattr(cfg, name)
        if not (_is_number(v) and v > 0):
            raise DeployKitError(f"DaggerConfig.{name} must be a positive number, got {v!r}")
    if not (_is_number(cfg.latency_weight) and cfg.latency_weight >= 0):
        raise DeployKitError(f"DaggerConfig.latency_weight must be a non-negative number, got {cfg.latency_weight!r}")
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise DeployKitError(f"DaggerConfig.batch_size must be a positive integer, got {cfg.batch_size!r}")


def _check_groups(model: nn.Module, groups: list) -> None:
    if not groups:
        raise DeployKitError("no channel groups given: Dagger needs at least one prunable group")
    modules = dict(model.named_modules())
    seen = set()
    for grp in groups:
        missing = [a for a in ("id", "channels", "producers", "weights") if not hasattr(grp, a)]
        if missing:
            raise DeployKitError(f"channel group {grp!r} lacks {missing}: pass prune.Group or GateSpec objects")
        if grp.id in seen:
            raise DeployKitError(f"channel group id {grp.id} appears twice: give every group a unique id")
        seen.add(grp.id)
        if isinstance(grp.channels, bool) or not isinstance(grp.channels, int) or grp.channels < 1:
            raise DeployKitError(f"channel group {grp.id} has channels={grp.channels!r}: it must be a positive integer")
        if not grp.producers:
            raise DeployKitError(f"channel group {grp.id} has no producers: name the modules whose output carries its channels")
        if not grp.weights:
            raise DeployKitError(f"channel group {grp.id} has no weight layers: name the conv/linear layers whose filters "
                                 "are its channels (Dagger reads them)")
        for kind, names in (("producer", grp.producers), ("weight layer", grp.weights)):
            for name in names:
                if name not in modules:
                    raise DeployKitError(f"channel group {grp.id}: {kind} {name!r} is not a module of the model: use names "
                                         "from model.named_modules()")
                if kind == "weight layer" and not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
                    raise DeployKitError(f"channel group {grp.id}: weight layer {name!r} has no weight tensor: list "
                                         "conv/linear layers")


def _check_latency(groups: list, ms_per_channel: dict, fixed_ms: float, target_ms: float) -> None:
    for name, v in (("fixed_ms", fixed_ms), ("target_ms", target_ms)):
        if not _is_number(v) or v < 0:
            raise DeployKitError(f"{name} must be a finite non-negative number of milliseconds, got {v!r}")
    if target_ms <= fixed_ms:
        raise DeployKitError(f"target_ms={target_ms:g} is not above fixed_ms={fixed_ms:g}, the latency no pruning removes: "
                             "raise the target or check the latency model")
    for grp in groups:
        if grp.id not in ms_per_channel:
            raise DeployKitError(f"ms_per_channel has no entry for channel group {grp.id}: give every group its "
                                 "milliseconds per channel")
        v = ms_per_channel[grp.id]
        if not _is_number(v) or v < 0:
            raise DeployKitError(f"ms_per_channel[{grp.id}] must be a finite non-negative number, got {v!r}")


# -- training ---------------------------------------------------------------------------------------------------------

def expected_latency(gates: dict[int, torch.Tensor], ms_per_channel: dict[int, float], fixed_ms: float) -> torch.Tensor:
    """fixed_ms + sum_g ms_per_channel[g] * sum(gates[g]), differentiable in the gates."""
    total = None
    for g, gate in gates.items():
        term = float(ms_per_channel[g]) * gate.sum()
        total = term if total is None else total + term
    return float(fixed_ms) + total


def _gate_hook(gid: int, channels: int, channel_dim: int, name: str, current: dict):
    def hook(_m, _inp, out):
        ok = isinstance(out, torch.Tensor) and out.dim() >= 2 and -out.dim() <= channel_dim < out.dim()
        if not ok or out.shape[channel_dim] != channels:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DeployKitError(f"producer {name!r} of channel group {gid} outputs {shape}, without its {channels} "
                                 f"channels on dim {channel_dim}: producers must output exactly the group's channels")
        view = [1] * out.dim()
        view[channel_dim] = channels
        return out * current[gid].view(view).to(out.dtype)
    return hook


def _features_on(model, groups, bn_of, device) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    features, rows = filter_features(model, groups, bn_of)
    return {g: x.to(device) for g, x in features.items()}, {g: r.to(device) for g, r in rows.items()}


def dagger_importance(model: nn.Module, groups: list, data: DataSplit, *, ms_per_channel: dict[int, float],
                      fixed_ms: float, target_ms: float, config: DaggerConfig | None = None,
                      progress: bool = True) -> DaggerResult:
    """Train a Dagger module on `model`'s weights under a latency target; the final gates are the filters' importance."""
    cfg = config or DaggerConfig()
    _check_config(cfg)
    _check_groups(model, groups)
    _check_latency(groups, ms_per_channel, fixed_ms, target_ms)
    n = len(data.train_x)
    if n < 1:
        raise DeployKitError("the training split is empty: Dagger needs images to compute the task loss")
    batch = min(cfg.batch_size, n)
    steps = max(1, n // batch)

    t0 = time.perf_counter()
    modules = dict(model.named_modules())
    flags = {name: m.training for name, m in modules.items()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    weight_names = [w for grp in groups for w in grp.weights]
    bn_of = find_batchnorms(model, weight_names, data.train_x[:1].to(device))
    features, rows = _features_on(model, groups, bn_of, device)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(cfg.seed)
        dagger = DaggerModule({g: r.shape[1] for g, r in rows.items()}).to(device)
    param_groups = [{"params": [dagger.offset], "lr": cfg.lr * OFFSET_LR_SCALE},
                    {"params": [p for p in dagger.parameters() if p is not dagger.offset], "lr": cfg.lr}]
    if cfg.finetune_network:
        param_groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr * FINETUNE_LR_SCALE})
    opt = torch.optim.Adam(param_groups)

    current: dict[int, torch.Tensor] = {}
    weight = float(cfg.latency_weight)
    handles = []
    lat_hist: list[float] = []
    loss_hist: list[float] = []
    bar = tqdm(total=cfg.epochs * steps, desc="dagger", unit="step", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for grp in groups:
            for name in grp.producers:
                hook = _gate_hook(grp.id, grp.channels, int(getattr(grp, "channel_dim", 1)), name, current)
                handles.append(modules[name].register_forward_hook(hook))
        model.eval()  # running BatchNorm statistics: the gates, not re-estimated statistics, change the activations
        if not cfg.finetune_network:
            for p in model.parameters():
                p.requires_grad_(False)
        for epoch in range(cfg.epochs):
            perm = torch.from_numpy(np.random.default_rng([cfg.seed, epoch]).permutation(n))
            loss_sum = 0.0
            for s in range(steps):
                idx = perm[s * batch:(s + 1) * batch]
                xb, yb = data.train_x[idx].to(device), data.train_y[idx].to(device)
                if cfg.finetune_network:  # the module reads the weights as they are now
                    features, rows = _features_on(model, groups, bn_of, device)
                gates = dagger(features, rows, cfg.temperature)
                current.clear()
                current.update(gates)
                logits = model(xb)
                if logits.dim() != 2 or logits.shape[0] != len(yb) or logits.shape[1] < data.num_classes:
                    raise DeployKitError(f"the model outputs {tuple(logits.shape)} for {len(yb)} images: Dagger needs "
                                         f"classification logits (N, {data.num_classes}) for this data")
                task = F.cross_entropy(logits, yb)
                lat = expected_latency(gates, ms_per_channel, fixed_ms)
                loss = task + weight * torch.log(lat / target_ms).abs()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += task.item()
                # above target the weight ramps up until the task loss can no longer hold the latency there
                if lat.item() > target_ms:
                    weight = min(weight * (1.0 + WEIGHT_RAMP), float(cfg.latency_weight) * WEIGHT_MAX_FACTOR)
                else:
                    weight = max(float(cfg.latency_weight), weight / (1.0 + WEIGHT_RAMP))
                bar.update(1)
                bar.set_postfix(loss=f"{task.item():.3f}", ms=f"{lat.item():.3g}")
            with torch.no_grad():
                gates = dagger(features, rows, cfg.temperature)
            lat_hist.append(float(expected_latency(gates, ms_per_channel, fixed_ms)))
            loss_hist.append(loss_sum / steps)
        with torch.no_grad():
            if cfg.finetune_network:
                features, rows = _features_on(model, groups, bn_of, device)
            final = dagger(features, rows, cfg.temperature)
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])
        for name, m in modules.items():
            m.training = flags[name]
    importance = {g: v.detach().float().cpu() for g, v in final.items()}
    return DaggerResult(importance=importance, expected_latency_ms=lat_hist, target_latency_ms=float(target_ms),
                        task_loss=loss_hist, seconds=time.perf_counter() - t0)
