"""Differentiable architecture search (PC-DARTS, arXiv 1907.05737) over a `SpaceSpec`, under a latency budget.

`DartsSupernet` holds every choice of the space at once and is driven by a relaxed encoding: a
vector laid out like `archspace.encode`, with weights in place of one-hot groups.
- Ops: each searchable block is a `MixedOp`, one candidate per op of its choice group (`skip` =
  identity), each an inverted residual at the stage's widest channels; its output is the weighted
  sum of the candidates' outputs.
- Partial channels (PC-DARTS): in blocks that keep the shape (stride 1, cin == cout; the non-first
  blocks of a stage) only C // K channels go through the candidates, the rest bypass them, and the
  next block samples other channels. PC-DARTS takes the first C // K and channel-shuffles after the
  concatenation; here every K-th channel is taken in place, the residue rotating from block to block
  (`MixedOp`), because a shuffle would move channels across the left-aligned width masks.
  Candidates there are residual (x + IR(x)), as in the final network. K = 1 is plain DARTS.
  PC-DARTS's edge normalisation has no role here: every block has one input, so no edges compete.
- Widths (FBNetV2): after every block, a stage's output is multiplied by a soft channel mask, the
  weighted sum of one left-aligned mask per width ratio (ones on its first spec.stage_width(stage, r) channels).
- Resolution: with several, one is sampled per step with a hard straight-through Gumbel-softmax; the
  batch is resized to it and the logits are multiplied by its weight (1 forward, a gradient backward).

The relaxation is the Gumbel-softmax of one logits vector (`arch_logits`, zeros at the start), its
temperature annealed exponentially from tau_start to tau_end over the steps after warm-up. The search
is bi-level and first-order: the training split is cut in two fixed halves; each step takes one AdamW
step of the weights on half A (cross-entropy) and one Adam step of the logits on half B
(cross-entropy + latency_weight * |log(L / (target_fraction * budget_ms))|, L the latency model on
the expected encoding, the per-group softmax of the logits). Both gradients are taken before either
step, so an interrupt mid-step has changed nothing. The latency term is bidirectional: it pulls the
expected latency towards the target from both sides. Warm-up epochs train weights only. The
validation split is never read. BatchNorm uses batch statistics only.

The expected encoding's latency is what the loss controls; the answer is the argmax of each group,
whose latency (`arch_latency_ms`) can differ (DARTS's discretisation gap): check it against the budget.

Every random draw (batch order, Gumbel noise) comes from a generator seeded by (seed, epoch, step),
so the position is the whole random state: a checkpoint needs no RNG state and a resumed run
continues exactly. Checkpoints are written atomically after every epoch and on KeyboardInterrupt.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .archmlp import relaxed_encoding
from .archspace import FIXED_OP, SKIP, Arch, SpaceSpec, choice_groups, decode, encode, encoding_size, groups, parse_op
from .data import DataSplit
from .errors import DeployKitError, InternalError
from .fileio import load_checkpoint_doc, save_checkpoint
from .zoo import InvertedResidual, conv_bn_act

CHECKPOINT_FORMAT = "deploykit-darts-checkpoint"
CHECKPOINT_VERSION = 1
ARCH_BETAS = (0.5, 0.999)  # DARTS's architecture optimiser: a short memory, the logits' target moves with the weights
ARCH_WEIGHT_DECAY = 1e-3
# What a checkpoint must share with the call resuming it: each changes the trajectory or the step positions.
RESUME_SETTINGS = ("seed", "batch_size", "budget_ms", "epochs", "warmup_epochs", "partial_channels", "lr", "weight_decay",
                   "arch_lr", "latency_weight", "target_fraction", "tau_start", "tau_end", "train_images")
INT_SETTINGS = ("seed", "batch_size", "epochs", "warmup_epochs", "partial_channels", "train_images")


# -- the search network ----------------------------------------------------------------------

class MixedOp(nn.Module):
    """One searchable block: the weighted sum of its candidate ops, on every K-th channel where the shape is kept.

    Partial channels: channels `offset::K` go through the candidates and return to their places, the others bypass
    them; the next block of the stage takes the next residue (offset + 1) mod K. This is PC-DARTS's "1/K of the
    channels, concatenate, channel shuffle" up to a fixed relabelling of channels, but no channel changes place: the
    width masks are left-aligned, and a shuffle would move live channels past a narrow width's mask and masked
    (zero) channels into it, so narrow widths would be judged with fewer channels than they have.
    """

    def __init__(self, ops: tuple[str, ...], cin: int, cout: int, stride: int, partial_channels: int, offset: int = 0):
        super().__init__()
        self.op_names = tuple(ops)
        keeps_shape = stride == 1 and cin == cout
        self.groups = partial_channels if keeps_shape else 1
        self.offset = offset % self.groups
        if cin % self.groups:
            raise InternalError(f"partial_channels={partial_channels} does not divide {cin} channels")
        part_in, part_out = (cin // self.groups, cout // self.groups) if keeps_shape else (cin, cout)
        candidates = []
        for op in self.op_names:
            if op == SKIP:
                if not keeps_shape:
                    raise InternalError(f"skip offered to a block that changes the shape ({cin}->{cout}, stride {stride})")
                candidates.append(nn.Identity())
            else:
                k, e = parse_op(op)
                candidates.append(InvertedResidual(part_in, part_out, stride, e, k))  # residual when the shape is kept
        self.candidates = nn.ModuleList(candidates)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return sum(weights[i] * op(x) for i, op in enumerate(self.candidates))
        b, c, h, w = x.shape
        lanes = x.reshape(b, c // self.groups, self.groups, h, w)  # channel i is lanes[:, i // K, i % K]
        part = lanes[:, :, self.offset]
        out = sum(weights[i] * op(part) for i, op in enumerate(self.candidates))
        parts = [out if g == self.offset else lanes[:, :, g] for g in range(self.groups)]
        return torch.stack(parts, 2).view(b, c, h, w)


def partial_channel_counts(spec: SpaceSpec) -> list[int]:
    """The channel counts of the searchable blocks that keep the shape: partial_channels must divide each."""
    widest, out = spec.widest_channels(), set()
    for si, stage in enumerate(spec.stages[1:], start=1):
        if stage.depth > 1 or (stage.stride == 1 and widest[si - 1] == widest[si]):
            out.add(widest[si])
    return sorted(out)


class DartsSupernet(nn.Module):
    """Every op, width and resolution of `spec` at once; `forward(x, encoding)` runs the mixture `encoding` weighs.

    `encoding` has `encoding_size(spec)` entries laid out like `archspace.encode`; a one-hot encoding runs one
    architecture (with partial channels, on its channel subsets). `arch_logits` is the architecture parameter.
    """

    def __init__(self, spec: SpaceSpec, partial_channels: int = 2, *, seed: int = 0):
        super().__init__()
        self.spec, self.partial_channels = spec, int(partial_channels)
        self.stage_max = spec.widest_channels()
        slices = {name: slice(start, start + size) for name, start, size in groups(spec)}
        self.width_slices = [slices[f"s{si}.width"] for si in range(len(spec.stages))]
        self.resolution_slice = slices["resolution"]
        self.block_stage: list[int] = []
        self.block_slice: list[slice | None] = []  # None: a fixed block of the first stage
        ops = {g.name: g.choices for g in choice_groups(spec)}
        with torch.random.fork_rng(devices=[]):  # initial weights a function of the seed; the caller's RNG untouched
            torch.manual_seed(seed)
            self.stem = conv_bn_act(3, spec.stem_channels, 3, 2)
            blocks: list[nn.Module] = []
            cin = spec.stem_channels
            for si, (stage, cout) in enumerate(zip(spec.stages, self.stage_max)):
                for bi in range(stage.depth):
                    stride = stage.stride if bi == 0 else 1
                    if si == 0:
                        k, e = parse_op(FIXED_OP)
                        blocks.append(InvertedResidual(cin, cout, stride, e, k))
                        self.block_slice.append(None)
                    else:
                        name = f"s{si}.b{bi}.op"
                        blocks.append(MixedOp(ops[name], cin, cout, stride, self.partial_channels, offset=bi - 1))
                        self.block_slice.append(slices[name])
                    self.block_stage.append(si)
                    cin = cout
            self.blocks = nn.ModuleList(blocks)
            self.head = conv_bn_act(cin, spec.head_channels, 1)
            self.classifier = nn.Linear(spec.head_channels, spec.num_classes)
        for si, (stage, widest) in enumerate(zip(spec.stages, self.stage_max)):
            masks = torch.zeros(len(spec.width_ratios), widest)
            for ri, r in enumerate(spec.width_ratios):
                masks[ri, :spec.stage_width(stage, r)] = 1.0  # left-aligned: width c uses channels [0:c]
            self.register_buffer(f"width_masks{si}", masks, persistent=False)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):  # batch statistics only: the search never evaluates a fixed network
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        self.arch_logits = nn.Parameter(torch.zeros(encoding_size(spec)))

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name != "arch_logits"]

    def forward(self, x: torch.Tensor, encoding: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        scale = None
        side = spec.resolutions[0]
        if len(spec.resolutions) > 1:  # a hard sample: exactly one entry is 1 in the forward pass
            res_w = encoding[self.resolution_slice]
            i = int(res_w.argmax())
            side, scale = spec.resolutions[i], res_w[i]
        if tuple(x.shape[-2:]) != (side, side):
            shrink = min(x.shape[-2:]) > side
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)
        masks = [(encoding[sl] @ getattr(self, f"width_masks{si}")).view(1, -1, 1, 1) for si, sl in enumerate(self.width_slices)]
        x = self.stem(x)
        for blk, si, sl in zip(self.blocks, self.block_stage, self.block_slice):
            x = blk(x) if sl is None else blk(x, encoding[sl])
            x = x * masks[si]
        x = self.head(x)
        logits = self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return logits if scale is None else logits * scale


# -- relaxations -----------------------------------------------------------------------------

def _gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool, generator: torch.Generator) -> torch.Tensor:
    """torch.nn.functional.gumbel_softmax with an explicit generator, so draws are a function of the step."""
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    soft = ((logits + gumbels) / tau).softmax(-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft  # straight-through: the forward sees one-hot, the backward the softmax


def sample_encoding(spec: SpaceSpec, logits: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """One relaxed architecture: a soft Gumbel-softmax sample per op and width group, a hard one for the resolution."""
    parts = [_gumbel_softmax(logits[start:start + size], tau, name == "resolution", generator)
             for name, start, size in groups(spec)]
    return torch.cat(parts)


def expected_encoding(spec: SpaceSpec, logits: torch.Tensor) -> torch.Tensor:
    """The per-group softmax: each group's probabilities, i.e. the mean one-hot encoding of Gumbel-max sampling."""
    return relaxed_encoding(spec, logits, 1.0, gumbel=False)


def annealed_tau(global_step: int, warmup_steps: int, total_steps: int, tau_start: float, tau_end: float) -> float:
    """tau_start through warm-up, then exponential decay reaching tau_end at the last step."""
    t = min(max(global_step - warmup_steps, 0) / max(total_steps - warmup_steps - 1, 1), 1.0)
    return tau_start * (tau_end / tau_start) ** t


def _cosine_lr(lr: float, step: int, total: int) -> float:
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The bi-level split of the training images: half A trains weights, half B the architecture (fixed by seed)."""
    order = np.random.default_rng([seed, n]).permutation(n)
    return np.sort(order[:n - n // 2]), np.sort(order[n - n // 2:])


# -- the search ------------------------------------------------------------------------------

@dataclass
class DartsResult:
    arch: Arch  # the largest logit of every group
    logits: np.ndarray  # final architecture logits, (encoding_size,)
    probabilities: dict[str, list[float]]  # per choice group, the softmax of its logits
    expected_latency_ms: float  # the latency model on the expected (softmax) encoding at the end
    history: list[dict]  # per epoch: epoch, train_loss, arch_loss, latency_ms, arch, arch_latency_ms, tau, seconds
    seconds: float  # of this call
    arch_latency_ms: float = math.nan  # the latency model on `arch` itself (one-hot)
    resumed_from_epoch: int = 0


def _check_inputs(spec: SpaceSpec, data: DataSplit, s: dict) -> None:
    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    budget = s["budget_ms"]
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not math.isfinite(budget) or budget <= 0:
        raise DeployKitError(f"budget_ms must be a positive, finite number of milliseconds, got {budget!r}")
    if not is_int(s["epochs"]) or s["epochs"] < 1:
        raise DeployKitError(f"epochs must be an integer >= 1, got {s['epochs']!r}")
    if not is_int(s["warmup_epochs"]) or not 0 <= s["warmup_epochs"] < s["epochs"]:
        raise DeployKitError(f"warmup_epochs must be an integer in 0..epochs-1 ({s['epochs'] - 1}), got {s['warmup_epochs']!r}: "
                             "the architecture trains only after warm-up")
    if not is_int(s["batch_size"]) or s["batch_size"] < 2:
        raise DeployKitError(f"batch_size must be an integer >= 2 (BatchNorm), got {s['batch_size']!r}")
    if not is_int(s["seed"]) or s["seed"] < 0:
        raise DeployKitError(f"seed must be a non-negative integer, got {s['seed']!r}")
    k = s["partial_channels"]
    kept = partial_channel_counts(spec)
    if not is_int(k) or k < 1 or any(c % k for c in kept):
        ok = [d for d in range(1, 9) if all(c % d == 0 for c in kept)]
        raise DeployKitError(f"partial_channels must be an integer >= 1 dividing the searched stages' widest channels {kept}, "
                             f"got {k!r}: use one of {ok}")
    for name in ("tau_start", "tau_end", "target_fraction", "lr"):
        if not math.isfinite(s[name]) or s[name] <= 0:
            raise DeployKitError(f"{name} must be positive and finite, got {s[name]!r}")
    for name in ("latency_weight", "arch_lr", "weight_decay"):
        if not math.isfinite(s[name]) or s[name] < 0:
            raise DeployKitError(f"{name} must be >= 0 and finite, got {s[name]!r}")
    if data.num_classes != spec.num_classes:
        raise DeployKitError(f"dataset {data.source!r} has {data.num_classes} classes, space {spec.name!r} {spec.num_classes}: "
                             f"use a space with num_classes={data.num_classes}")
    if data.train_x.ndim != 4 or data.train_x.shape[1] != 3:
        raise DeployKitError(f"search inputs are (N, 3, H, W) images, got {tuple(data.train_x.shape)}: load them with "
                             "deploykit.data.load_dataset")
    n = len(data.train_x)
    if n // 2 < s["batch_size"]:
        raise DeployKitError(f"the training split holds {n} images, too few for two halves of batch_size={s['batch_size']}: "
                             f"pass batch_size <= {max(n // 2, 2)} or more images")


def _latency(latency_ms: Callable[[torch.Tensor], torch.Tensor], encoding: torch.Tensor) -> torch.Tensor:
    out = latency_ms(encoding)
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise DeployKitError("latency_ms(encoding) must return one latency as a torch tensor (e.g. an ArchLatencyMLP), "
                             f"got {type(out).__name__}")
    return out.reshape(())


def _check_latency_model(latency_ms: Callable, spec: SpaceSpec, logits: torch.Tensor, needs_grad: bool) -> float:
    try:
        value = _latency(latency_ms, expected_encoding(spec, logits))
    except (RuntimeError, ValueError, IndexError) as e:  # e.g. a model of another space: a shape mismatch
        raise DeployKitError(f"latency_ms fails on an encoding of {encoding_size(spec)} entries ({type(e).__name__}): pass a "
                             f"latency model fitted on space {spec.name!r} (e.g. archmlp.fit_arch_mlp)") from None
    ms = float(value.detach())
    if not math.isfinite(ms) or ms <= 0:
        raise DeployKitError(f"latency_ms gives {ms!r} ms for the space's expected encoding: pass a latency model "
                             f"fitted on space {spec.name!r} (e.g. archmlp.fit_arch_mlp)")
    if needs_grad and not value.requires_grad:
        raise DeployKitError("latency_ms(encoding) is not differentiable in the encoding: pass a torch model such as "
                             "ArchLatencyMLP, or latency_weight=0")
    return ms


def differentiable_search(spec: SpaceSpec, data: DataSplit, latency_ms: Callable[[torch.Tensor], torch.Tensor],
                          budget_ms: float, *, epochs: int = 12, warmup_epochs: int = 2, batch_size: int = 64,
                          lr: float = 3e-3, weight_decay: float = 1e-4, arch_lr: float = 3e-3,
                          latency_weight: float = 1.0, target_fraction: float = 0.93, partial_channels: int = 2,
                          tau_start: float = 5.0, tau_end: float = 0.5, seed: int = 0, progress: bool = True,
                          checkpoint: str | os.PathLike | None = None,
                          on_epoch: Callable[[dict], None] | None = None) -> DartsResult:
    """PC-DARTS with a Gumbel-softmax relaxation and a latency loss towards target_fraction * budget_ms (see the module).

    `latency_ms(encoding)` maps a relaxed encoding (encoding_size,) to predicted ms, differentiably (an ArchLatencyMLP).
    Schedules (cosine lr, temperature) span `epochs`, so a checkpoint resumes only with the settings it was written
    with. `on_epoch(entry)` is called with each epoch's history entry after its checkpoint is saved.
    """
    settings = dict(seed=seed, batch_size=batch_size, budget_ms=budget_ms, epochs=epochs, warmup_epochs=warmup_epochs,
                    partial_channels=partial_channels, lr=lr, weight_decay=weight_decay, arch_lr=arch_lr,
                    latency_weight=latency_weight, target_fraction=target_fraction, tau_start=tau_start, tau_end=tau_end,
                    train_images=len(data.train_x))
    _check_inputs(spec, data, settings)
    settings = {k: int(v) if k in INT_SETTINGS else float(v) for k, v in settings.items()}
    t0 = time.perf_counter()
    half_a, half_b = split_halves(len(data.train_x), seed)
    steps_per_epoch = len(half_b) // batch_size  # half B is the smaller; partial batches are dropped
    total_steps, warmup_steps = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    target_ms = target_fraction * budget_ms

    model = DartsSupernet(spec, partial_channels, seed=seed)
    logits = model.arch_logits
    weight_opt = torch.optim.AdamW(model.weight_parameters(), lr=lr, weight_decay=weight_decay)
    arch_opt = torch.optim.Adam([logits], lr=arch_lr, betas=ARCH_BETAS, weight_decay=ARCH_WEIGHT_DECAY)
    state = {"epoch": 0, "step": 0, "loss_sum": 0.0, "arch_loss_sum": 0.0, "epoch_seconds": 0.0, "history": []}
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = _resume(path, spec, settings, model, weight_opt, arch_opt)
    resumed_from = state["epoch"]
    latency_now = _check_latency_model(latency_ms, spec, logits.detach(), latency_weight > 0)

    def save() -> None:
        if path is not None:
            _save_checkpoint(path, spec, settings, state, model, weight_opt, arch_opt)

    model.train()
    bar = tqdm(total=total_steps, initial=min(total_steps, state["epoch"] * steps_per_epoch + state["step"]), unit="step",
               desc=f"differentiable search {spec.name}", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    lap, updating = time.perf_counter(), False
    try:
        while state["epoch"] < epochs:
            epoch = state["epoch"]
            perm_a = np.random.default_rng([seed, epoch, 0]).permutation(half_a)
            perm_b = np.random.default_rng([seed, epoch, 1]).permutation(half_b)
            searching = epoch >= warmup_epochs
            while state["step"] < steps_per_epoch:
                step = state["step"]
                global_step = epoch * steps_per_epoch + step
                tau = annealed_tau(global_step, warmup_steps, total_steps, tau_start, tau_end)
                batch = slice(step * batch_size, (step + 1) * batch_size)

                # Both gradients before either optimiser step: until then nothing has changed, so an interrupt
                # leaves the state of the step's start to save. The architecture on half B (first order: the
                # weights as they are), with the latency loss on the expected encoding.
                arch_grad = None
                if searching:
                    idx = torch.from_numpy(perm_b[batch])
                    enc = sample_encoding(spec, logits, tau, _generator(seed, epoch, step, 1))
                    arch_ce = F.cross_entropy(model(data.train_x[idx], enc), data.train_y[idx])
                    lat = _latency(latency_ms, expected_encoding(spec, logits))
                    arch_loss = arch_ce + latency_weight * torch.log(lat / target_ms).abs()
                    # grad w.r.t. the logits only: no weight gradients computed, none left in the latency model
                    (arch_grad,) = torch.autograd.grad(arch_loss, [logits])
                # the weights on half A, the architecture held fixed
                idx = torch.from_numpy(perm_a[batch])
                enc = sample_encoding(spec, logits.detach(), tau, _generator(seed, epoch, step, 0))
                loss = F.cross_entropy(model(data.train_x[idx], enc), data.train_y[idx])
                weight_opt.zero_grad(set_to_none=True)
                loss.backward()

                updating = True  # from here to the step count, an interrupt would leave a half-done step
                for group in weight_opt.param_groups:
                    group["lr"] = _cosine_lr(lr, global_step, total_steps)
                weight_opt.step()
                state["loss_sum"] += loss.item()
                if arch_grad is not None:
                    logits.grad = arch_grad
                    arch_opt.step()
                    logits.grad = None
                    state["arch_loss_sum"] += arch_ce.item()
                    latency_now = float(lat.detach())
                state["step"] += 1
                updating = False
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", latency_ms=f"{latency_now:.3g}", tau=f"{tau:.2f}")
            latency_now, arch, arch_latency = _latencies(spec, logits.detach(), latency_ms)
            now = time.perf_counter()
            entry = {"epoch": epoch + 1, "train_loss": state["loss_sum"] / steps_per_epoch,
                     "arch_loss": state["arch_loss_sum"] / steps_per_epoch if searching else None,
                     "latency_ms": latency_now, "arch": arch.to_dict(), "arch_latency_ms": arch_latency,
                     "tau": annealed_tau((epoch + 1) * steps_per_epoch - 1, warmup_steps, total_steps, tau_start, tau_end),
                     "seconds": state["epoch_seconds"] + now - lap}
            lap = now
            state.update(epoch=epoch + 1, step=0, loss_sum=0.0, arch_loss_sum=0.0, epoch_seconds=0.0,
                         history=[*state["history"], entry])
            save()
            if on_epoch is not None:
                on_epoch(entry)
    except KeyboardInterrupt:
        if not updating:  # else the checkpoint on disk (an earlier, consistent position) stands: resuming stays exact
            state["epoch_seconds"] += time.perf_counter() - lap
            save()
        raise
    finally:
        bar.close()
    return _result(spec, model, latency_ms, state["history"], time.perf_counter() - t0, resumed_from)


def _latencies(spec: SpaceSpec, logits: torch.Tensor, latency_ms: Callable) -> tuple[float, Arch, float]:
    """(latency of the expected encoding, the argmax architecture, its latency): the gap between the two latencies is
    the discretisation error of the relaxation."""
    arch = decode(spec, logits.numpy())
    with torch.no_grad():
        expected = float(_latency(latency_ms, expected_encoding(spec, logits)))
        discrete = float(_latency(latency_ms, torch.as_tensor(encode(spec, arch))))
    return expected, arch, discrete


def _result(spec: SpaceSpec, model: DartsSupernet, latency_ms: Callable, history: list[dict], seconds: float,
            resumed_from: int) -> DartsResult:
    logits = model.arch_logits.detach().clone()
    expected, arch, discrete = _latencies(spec, logits, latency_ms)
    probabilities = {name: torch.softmax(logits[start:start + size], 0).tolist() for name, start, size in groups(spec)}
    return DartsResult(arch=arch, logits=logits.numpy(), probabilities=probabilities, expected_latency_ms=expected,
                       history=list(history), seconds=seconds, arch_latency_ms=discrete, resumed_from_epoch=resumed_from)


# -- checkpoints -----------------------------------------------------------------------------

def _save_checkpoint(path: Path, spec: SpaceSpec, settings: dict, state: dict, model: DartsSupernet,
                     weight_opt: torch.optim.Optimizer, arch_opt: torch.optim.Optimizer) -> None:
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "spec": spec.to_dict(),
                           **settings, **state, "model": model.state_dict(), "weight_optimizer": weight_opt.state_dict(),
                           "arch_optimizer": arch_opt.state_dict()})


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A search checkpoint as a dict (settings, position, history, state dicts); DeployKitError if unreadable or foreign."""
    if not Path(path).exists():
        raise DeployKitError(f"search checkpoint not found: {path}: search with checkpoint={str(path)!r} to write it")
    return load_checkpoint_doc(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "differentiable-search checkpoint",
                               "delete it to start the search over")


def _resume(path: Path, spec: SpaceSpec, settings: dict, model: DartsSupernet, weight_opt: torch.optim.Optimizer,
            arch_opt: torch.optim.Optimizer) -> dict:
    doc = load_checkpoint(path)
    fix = "pass another checkpoint path or delete it to start over"
    if SpaceSpec.from_dict(doc["spec"]) != spec:
        raise DeployKitError(f"checkpoint {path} belongs to space {doc['spec'].get('name')!r}, not this {spec.name!r} "
                             f"space: {fix}")
    for name in RESUME_SETTINGS:
        if doc.get(name) != settings[name]:
            raise DeployKitError(f"checkpoint {path} was written with {name}={doc.get(name)!r}, not {settings[name]!r}: "
                                 f"pass {name}={doc.get(name)!r} to resume, or {fix}")
    model.load_state_dict(doc["model"])
    weight_opt.load_state_dict(doc["weight_optimizer"])
    arch_opt.load_state_dict(doc["arch_optimizer"])
    return {k: doc[k] for k in ("epoch", "step", "loss_sum", "arch_loss_sum", "epoch_seconds", "history")}
