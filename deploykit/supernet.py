"""A weight-sharing supernet over a `SpaceSpec`, trained so that every channel serves the same number of widths.

One `Supernet` holds each block of the space once, at its largest shape (largest kernel, expansion
and stage width); a sub-network (`Arch`) runs on slices of those weights, as in once-for-all:
- depthwise kernel k: the centre k x k of the largest kernel;
- expansion e: `cin * e` hidden channels (e == 1: no expand conv, the depthwise filters of the input channels);
- `skip`: identity;
- stage width c of the stage's largest C: channels [0:c] (side "left") or [C-c:C] (side "right").
Every channel slice of one forward (stage widths and hidden channels) is taken from the same side.

Why two sides (BCNet, arXiv 2105.10533): with left-aligned sharing the first channels serve every
width and the last ones only the largest, so small widths are judged with better-trained weights than
large ones. `width_mode="bilateral"` trains and evaluates each width on both sides and, in training,
also the complementary width C - c (the stochastic complementary strategy): the four slices together
cover every channel of a stage exactly twice, whatever widths are sampled (`channel_usage` counts
it). `width_mode="left"` is the plain left-aligned supernet, kept for comparison.

BatchNorm: sub-networks see different channels and depths, so running statistics cannot be shared.
Training uses batch statistics only; `calibrate_bn` recomputes the running statistics of one
sub-network on training images before it is evaluated (as once-for-all and BigNAS do), and an
eval-mode forward of any other sub-network raises rather than silently using stale statistics.

`extract` copies one sub-network into the standalone `archspace.build_network` module and checks
that both compute the same outputs.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .archspace import (
    FIXED_OP,
    SKIP,
    Arch,
    Block,
    SpaceSpec,
    block_plan,
    build_network,
    check_arch,
    choice_groups,
    choices,
    parse_op,
    sample_arch,
    stage_channels,
)
from .data import DataSplit
from .errors import DeployKitError, InternalError
from .fileio import load_checkpoint_doc, save_checkpoint
from .train import logit_scores

WIDTH_MODES = ("bilateral", "left")
SIDES = ("left", "right")
CHECKPOINT_FORMAT = "deploykit-supernet-checkpoint"
CHECKPOINT_VERSION = 1
EXTRACT_TOLERANCE = 1e-4  # max abs difference of logits, relative to their scale (at least 1)


# -- sub-networks as channel counts ------------------------------------------------------------

@dataclass(frozen=True)
class SubNet:
    """A sub-network in channels rather than width ratios, because the complementary width C - c of training
    is usually not one of the space's ratios. `plan` carries the real channel counts of every block."""

    plan: tuple[Block, ...]
    resolution: int
    side: str


def _side_slice(total: int, used: int, side: str) -> slice:
    return slice(0, used) if side == "left" else slice(total - used, total)


def _ops_of_block(spec: SpaceSpec, b: Block) -> list[str]:
    return [FIXED_OP] if b.stage == 0 else [o for o in spec.ops if o != SKIP]


def largest_arch(spec: SpaceSpec) -> Arch:
    """Largest kernel and expansion everywhere, no skip, widest stages, highest resolution: the sandwich's top."""
    op = f"k{max(spec.kernel_sizes)}e{max(spec.expansions)}"
    n_ops = sum(s.depth for s in spec.stages[1:])
    return Arch(ops=(op,) * n_ops, widths=(max(spec.width_ratios),) * len(spec.stages), resolution=max(spec.resolutions))


def smallest_arch(spec: SpaceSpec) -> Arch:
    """Smallest kernel and expansion, skip wherever allowed, narrowest stages, lowest resolution: the sandwich's bottom."""
    op = f"k{min(spec.kernel_sizes)}e{min(spec.expansions)}"
    ops = [SKIP if (bi > 0 and spec.allow_skip) else op for s in spec.stages[1:] for bi in range(s.depth)]
    return Arch(ops=tuple(ops), widths=(min(spec.width_ratios),) * len(spec.stages), resolution=min(spec.resolutions))


def _with_channels(spec: SpaceSpec, plan: Sequence[Block], channels: Sequence[int]) -> tuple[Block, ...]:
    out, cin = [], spec.stem_channels
    for b in plan:
        out.append(Block(b.stage, b.index, b.op, cin, channels[b.stage], b.stride))
        cin = channels[b.stage]
    return tuple(out)


def complementary_channels(spec: SpaceSpec, channels: Sequence[int]) -> list[int]:
    """C - c per stage; a full stage (C - c == 0) stays full, which still uses every channel equally often."""
    return [C - c if c < C else C for c, C in zip(channels, spec.widest_channels())]


def subnet(spec: SpaceSpec, arch: Arch, side: str = "left") -> SubNet:
    if side not in SIDES:
        raise DeployKitError(f"side must be one of {list(SIDES)}, got {side!r}")
    return SubNet(tuple(block_plan(spec, arch)), arch.resolution, side)


def training_subnets(spec: SpaceSpec, arch: Arch, width_mode: str) -> list[SubNet]:
    """The sub-networks one sampled architecture trains: bilateral = arch and its complement, each on both sides;
    left = the arch on the left. Duplicates (a full-width network is the same on both sides) are dropped."""
    plan = block_plan(spec, arch)
    if width_mode == "left":
        return [SubNet(tuple(plan), arch.resolution, "left")]
    comp = _with_channels(spec, plan, complementary_channels(spec, stage_channels(spec, arch)))
    out, seen = [], set()
    for p in (tuple(plan), comp):
        for side in SIDES:
            sn = SubNet(p, arch.resolution, side)
            sig = _signature(spec, sn)
            if sig not in seen:
                seen.add(sig)
                out.append(sn)
    return out


def channel_usage(spec: SpaceSpec, width_mode: str) -> list[np.ndarray]:
    """Per stage, how many of the trained (width, side) slices use each channel, over every width ratio of the
    space: the fairness BCNet is about. Counted from `training_subnets`, i.e. what training really runs."""
    _check_mode(width_mode)
    counts = [np.zeros(c, dtype=np.int64) for c in spec.widest_channels()]
    for r in spec.width_ratios:
        arch = Arch(largest_arch(spec).ops, (r,) * len(spec.stages), max(spec.resolutions))
        for sn in training_subnets(spec, arch, width_mode):
            for stage, c in {b.stage: b.cout for b in sn.plan}.items():
                counts[stage][_side_slice(len(counts[stage]), c, sn.side)] += 1
    return counts


def _check_mode(width_mode: str) -> None:
    if width_mode not in WIDTH_MODES:
        raise DeployKitError(f"width_mode must be one of {list(WIDTH_MODES)}, got {width_mode!r}")


# -- the supernet ------------------------------------------------------------------------------

class _ConvBN(nn.Module):
    """Parameter holder for conv + BN at the largest shape; the supernet slices it per sub-network."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, depthwise: bool = False, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=cout if depthwise else 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.depthwise, self.act = depthwise, act


class _MaxBlock(nn.Module):
    """One inverted residual at the largest expansion and kernel its slot offers."""

    def __init__(self, cin_max: int, cout_max: int, stride: int, k_max: int, e_max: int):
        super().__init__()
        self.cin_max, self.cout_max, self.hidden_max = cin_max, cout_max, cin_max * e_max
        self.expand = _ConvBN(cin_max, self.hidden_max, 1, 1) if e_max > 1 else None
        self.dw = _ConvBN(self.hidden_max, self.hidden_max, k_max, stride, depthwise=True)
        self.project = _ConvBN(self.hidden_max, cout_max, 1, 1, act=False)


@dataclass(frozen=True)
class _Step:
    """Where one block of a sub-network sits in its supernet block."""

    index: int  # of the block in the plan and in Supernet.blocks
    block: Block
    k: int
    e: int
    in_sl: slice
    hid_sl: slice
    out_sl: slice


def _walk(spec: SpaceSpec, sn: SubNet, stage_max: Sequence[int], hidden_max: Sequence[int]) -> Iterator[_Step]:
    """The slices of every non-skip block; forward, extract and de-duplication all follow it."""
    in_sl = slice(0, spec.stem_channels)
    for i, b in enumerate(sn.plan):
        if b.op == SKIP:
            continue
        k, e = parse_op(b.op)
        # e == 1 has no expand conv: the depthwise filters are those of the input channels themselves
        hid_sl = in_sl if e == 1 else _side_slice(hidden_max[i], b.cin * e, sn.side)
        out_sl = _side_slice(stage_max[b.stage], b.cout, sn.side)
        yield _Step(i, b, k, e, in_sl, hid_sl, out_sl)
        in_sl = out_sl


def _signature(spec: SpaceSpec, sn: SubNet, stage_max: Sequence[int] | None = None,
               hidden_max: Sequence[int] | None = None) -> tuple:
    """What a sub-network computes with which weights: two sub-networks with equal signatures are the same function."""
    stage_max = spec.widest_channels() if stage_max is None else stage_max
    hidden_max = [c * e for c, e in _block_maxima(spec)] if hidden_max is None else hidden_max
    steps = tuple((s.index, s.block.op, s.block.residual, s.in_sl.start, s.in_sl.stop, s.hid_sl.start, s.hid_sl.stop,
                   s.out_sl.start, s.out_sl.stop) for s in _walk(spec, sn, stage_max, hidden_max))
    return steps, sn.resolution


def _block_maxima(spec: SpaceSpec) -> list[tuple[int, int]]:
    """(largest input channels, largest expansion) per block."""
    plan = block_plan(spec, largest_arch(spec))
    return [(b.cin, max(parse_op(o)[1] for o in _ops_of_block(spec, b))) for b in plan]


def _sliced_weight(layer: _ConvBN, out_sl: slice, in_sl: slice, k: int | None = None) -> torch.Tensor:
    w = layer.conv.weight[out_sl] if layer.depthwise else layer.conv.weight[out_sl, in_sl]
    k_max = w.shape[-1]
    if k is not None and k < k_max:
        off = (k_max - k) // 2  # the centre of the largest kernel, as in once-for-all
        w = w[..., off:off + k, off:off + k]
    return w


class Supernet(nn.Module):
    """Weight-sharing supernet of `spec`; `forward(x, arch, side)` runs one sub-network on sliced weights."""

    def __init__(self, spec: SpaceSpec, width_mode: str = "bilateral", *, seed: int = 0):
        super().__init__()
        _check_mode(width_mode)
        self.spec, self.width_mode = spec, width_mode
        self.stage_max = spec.widest_channels()
        plan = block_plan(spec, largest_arch(spec))
        if [b.cout for b in plan] != [self.stage_max[b.stage] for b in plan]:
            raise InternalError("largest_arch does not reach the largest stage widths")
        with torch.random.fork_rng(devices=[]):  # deterministic initial weights without touching the caller's RNG
            torch.manual_seed(seed)
            self.stem = _ConvBN(3, spec.stem_channels, 3, 2)
            blocks = []
            for b in plan:
                ks_es = [parse_op(o) for o in _ops_of_block(spec, b)]
                blocks.append(_MaxBlock(b.cin, b.cout, b.stride, max(k for k, _ in ks_es), max(e for _, e in ks_es)))
            self.blocks = nn.ModuleList(blocks)
            self.head = _ConvBN(plan[-1].cout, spec.head_channels, 1, 1)
            self.classifier = nn.Linear(spec.head_channels, spec.num_classes)
        self.hidden_max = [blk.hidden_max for blk in self.blocks]
        # BatchNorm state: None = batch statistics (training) or calibrated running statistics (eval);
        # a float = the momentum of the calibration batch now running.
        self._calibration_momentum: float | None = None
        self._calibrated_for: tuple | None = None

    # -- sides ------------------------------------------------------------------------------
    def effective_side(self, side: str) -> str:
        """Left mode has one side only: whatever side is asked, the left channels are used."""
        if side not in SIDES:
            raise DeployKitError(f"side must be one of {list(SIDES)}, got {side!r}")
        return "left" if self.width_mode == "left" else side

    def subnet(self, arch: Arch, side: str = "left") -> SubNet:
        return subnet(self.spec, arch, self.effective_side(side))

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, arch: Arch, side: str = "left") -> torch.Tensor:
        """Logits of sub-network `arch`; inputs at another size are resized to `arch.resolution` (bilinear)."""
        return self.forward_subnet(x, self.subnet(arch, side))

    def forward_subnet(self, x: torch.Tensor, sn: SubNet) -> torch.Tensor:
        if not self.training and self._calibration_momentum is None and self._calibrated_for != self._key(sn):
            raise DeployKitError("the supernet's BatchNorm statistics are not calibrated for this sub-network: call "
                                 "calibrate_bn(supernet, arch, x, side) before an eval-mode forward")
        if x.shape[-2:] != (sn.resolution, sn.resolution):
            shrink = min(x.shape[-2:]) > sn.resolution
            x = F.interpolate(x, size=(sn.resolution, sn.resolution), mode="bilinear", align_corners=False, antialias=shrink)
        full_stem = slice(0, self.spec.stem_channels)
        x = self._conv_bn(self.stem, x, full_stem, slice(0, 3))
        in_sl = full_stem
        for step in _walk(self.spec, sn, self.stage_max, self.hidden_max):
            blk = self.blocks[step.index]
            h = x if step.e == 1 else self._conv_bn(blk.expand, x, step.hid_sl, step.in_sl)
            h = self._conv_bn(blk.dw, h, step.hid_sl, step.hid_sl, step.k)
            h = self._conv_bn(blk.project, h, step.out_sl, step.hid_sl)
            x = x + h if step.block.residual else h
            in_sl = step.out_sl
        x = self._conv_bn(self.head, x, slice(0, self.spec.head_channels), in_sl)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def _key(self, sn: SubNet) -> tuple:
        return _signature(self.spec, sn, self.stage_max, self.hidden_max)

    def _conv_bn(self, layer: _ConvBN, x: torch.Tensor, out_sl: slice, in_sl: slice, k: int | None = None) -> torch.Tensor:
        w = _sliced_weight(layer, out_sl, in_sl, k)
        groups = w.shape[0] if layer.depthwise else 1
        y = F.conv2d(x, w, None, layer.conv.stride, w.shape[-1] // 2, 1, groups)
        y = self._bn(layer.bn, y, out_sl)
        return F.relu6(y) if layer.act else y

    def _bn(self, bn: nn.BatchNorm2d, y: torch.Tensor, sl: slice) -> torch.Tensor:
        w, b = bn.weight[sl], bn.bias[sl]
        if self._calibration_momentum is not None:  # the slices are views: batch_norm updates the buffers in place
            return F.batch_norm(y, bn.running_mean[sl], bn.running_var[sl], w, b, True, self._calibration_momentum, bn.eps)
        if self.training:
            return F.batch_norm(y, None, None, w, b, True, 0.0, bn.eps)
        return F.batch_norm(y, bn.running_mean[sl], bn.running_var[sl], w, b, False, 0.0, bn.eps)


# -- BatchNorm calibration, evaluation, extraction ---------------------------------------------

def calibrate_bn(supernet: Supernet, arch: Arch, x: torch.Tensor, side: str = "left", batches: int | None = None, *,
                 batch_size: int = 256) -> None:
    """Recompute the running BatchNorm statistics of sub-network (`arch`, `side`) on images `x` (training images,
    never the validation split): the cumulative mean over batches of each batch's statistics, as nn.BatchNorm2d
    with momentum=None. Uses the first `batches` batches of `x` (all of them when None)."""
    sn = supernet.subnet(arch, side)
    chunks = list(torch.split(x, batch_size))[:batches]
    if not chunks or len(chunks[0]) < 2:
        raise DeployKitError(f"calibrate_bn needs at least 2 images, got {len(x)}: pass more training images")
    was_training = supernet.training
    supernet._calibrated_for = None
    try:
        with torch.no_grad():
            for i, xb in enumerate(chunks):
                supernet._calibration_momentum = 1.0 / (i + 1)
                supernet.forward_subnet(xb, sn)
    finally:
        supernet._calibration_momentum = None
        supernet.train(was_training)
    supernet._calibrated_for = supernet._key(sn)


def _sides(supernet: Supernet, arch: Arch, side: str | None) -> list[str]:
    if side is not None:
        return [supernet.effective_side(side)]
    same = supernet._key(supernet.subnet(arch, "left")) == supernet._key(supernet.subnet(arch, "right"))
    if supernet.width_mode == "left" or same:
        return ["left"]  # one side only, or a network that is the same on both sides
    return list(SIDES)


def score_arch(supernet: Supernet, arch: Arch, data: DataSplit, side: str | None = None, *, calibration_images: int = 2000,
               batch_size: int = 256) -> dict:
    """{"accuracy": top-1 in [0, 1], "loss": mean cross-entropy} of `arch` on the validation split, after calibrate_bn
    on the first `calibration_images` training images. side None: in bilateral mode the mean over the left and
    right sides, as BCNet judges a width by both sides."""
    _check_data(supernet, data)
    check_arch(supernet.spec, arch)
    was_training = supernet.training
    scores = []
    try:
        for s in _sides(supernet, arch, side):
            calibrate_bn(supernet, arch, data.train_x[:calibration_images], s, batch_size=batch_size)
            supernet.eval()
            with torch.no_grad():
                logits = torch.cat([supernet(xb, arch, s) for xb in torch.split(data.val_x, batch_size)])
            scores.append(logit_scores(logits, data.val_y))
    finally:
        supernet.train(was_training)
    return {k: float(np.mean([sc[k] for sc in scores])) for k in ("accuracy", "loss")}


def evaluate_arch(supernet: Supernet, arch: Arch, data: DataSplit, side: str | None = None, *, calibration_images: int = 2000,
                  batch_size: int = 256) -> float:
    """Top-1 validation accuracy of `arch` in [0, 1] (score_arch's "accuracy")."""
    return score_arch(supernet, arch, data, side, calibration_images=calibration_images, batch_size=batch_size)["accuracy"]


def _copy_conv_bn(dst: nn.Sequential, src: _ConvBN, out_sl: slice, in_sl: slice, k: int | None = None) -> None:
    conv, bn = dst[0], dst[1]
    conv.weight.copy_(_sliced_weight(src, out_sl, in_sl, k))
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).copy_(getattr(src.bn, name)[out_sl])
    bn.eps = src.bn.eps


def extract(supernet: Supernet, arch: Arch, side: str = "left") -> nn.Module:
    """The standalone `build_network(spec, arch)` (eval mode) with the sub-network's weights and calibrated BatchNorm
    statistics; checked to compute the supernet's outputs (InternalError otherwise). Call calibrate_bn first."""
    sn = supernet.subnet(arch, side)
    if supernet._calibrated_for != supernet._key(sn):
        raise DeployKitError("extract needs this sub-network's BatchNorm statistics: call calibrate_bn(supernet, arch, "
                             "train_x, side) with the same arch and side first")
    spec = supernet.spec
    net = build_network(spec, arch)
    in_sl = slice(0, spec.stem_channels)
    with torch.no_grad():
        _copy_conv_bn(net[0], supernet.stem, in_sl, slice(0, 3))
        for step in _walk(spec, sn, supernet.stage_max, supernet.hidden_max):
            blk, layers = supernet.blocks[step.index], net[1][step.index].block
            i = 0
            if step.e != 1:
                _copy_conv_bn(layers[0], blk.expand, step.hid_sl, step.in_sl)
                i = 1
            _copy_conv_bn(layers[i], blk.dw, step.hid_sl, step.hid_sl, step.k)
            _copy_conv_bn(layers[i + 1], blk.project, step.out_sl, step.hid_sl)
            in_sl = step.out_sl
        _copy_conv_bn(net[2], supernet.head, slice(0, spec.head_channels), in_sl)
        net[5].weight.copy_(supernet.classifier.weight)
        net[5].bias.copy_(supernet.classifier.bias)
    net.eval()
    max_abs_diff, scale = _compare(supernet, sn, net)
    if max_abs_diff > EXTRACT_TOLERANCE * scale:
        raise InternalError(f"extracted network differs from the supernet by {max_abs_diff:.3g} (logit scale {scale:.3g})")
    return net


def _compare(supernet: Supernet, sn: SubNet, net: nn.Module) -> tuple[float, float]:
    """Max abs difference of the two networks' logits on seeded random images, and the logit scale (at least 1)."""
    x = torch.randn(4, 3, sn.resolution, sn.resolution, generator=torch.Generator().manual_seed(0))
    was_training = supernet.training
    supernet.eval()
    try:
        with torch.no_grad():
            ref, out = supernet.forward_subnet(x, sn), net(x)
    finally:
        supernet.train(was_training)
    return float((ref - out).abs().max()), max(1.0, float(ref.abs().max()))


# -- training ----------------------------------------------------------------------------------

def _check_data(supernet: Supernet, data: DataSplit) -> None:
    if data.num_classes != supernet.spec.num_classes:
        raise DeployKitError(f"dataset {data.source!r} has {data.num_classes} classes, space {supernet.spec.name!r} "
                             f"{supernet.spec.num_classes}: use a space with num_classes={data.num_classes}")
    if data.train_x.ndim != 4 or data.train_x.shape[1] != 3:
        raise DeployKitError(f"supernet inputs are (N, 3, H, W) images, got {tuple(data.train_x.shape)}: load them with "
                             "deploykit.data.load_dataset")


def sandwich_archs(spec: SpaceSpec, rng: np.random.Generator, random_archs: int) -> list[Arch]:
    """The sandwich rule: the largest and the smallest architecture bound the space, random ones fill it."""
    return [largest_arch(spec), smallest_arch(spec)] + [sample_arch(spec, rng) for _ in range(random_archs)]


def step_subnets(supernet: Supernet, rng: np.random.Generator, random_archs: int) -> list[tuple[SubNet, Arch | None]]:
    """Every sub-network one training step runs, without duplicates. A random (uniformly sampled) architecture's own
    left-side sub-network comes with that architecture, so its loss can be credited to its choices (`choice_losses`)."""
    out, seen = [], set()
    for i, arch in enumerate(sandwich_archs(supernet.spec, rng, random_archs)):
        for j, sn in enumerate(training_subnets(supernet.spec, arch, supernet.width_mode)):
            key = supernet._key(sn)
            if key not in seen:
                seen.add(key)
                out.append((sn, arch if i >= 2 and j == 0 else None))
    return out


CHOICE_LOSS_DECAY = 0.98  # exponential moving average: the prior should reflect the trained supernet, not its start


def _credit_choices(spec: SpaceSpec, table: dict, arch: Arch, loss: float) -> None:
    """Fold one sub-network's loss into the moving average of every choice it made (BCNet's prior statistics)."""
    for g, choice in zip(choice_groups(spec), choices(arch)):
        entry = table.setdefault(g.name, [[None] * len(g.choices), [0] * len(g.choices)])
        c = g.choices.index(choice)
        prev = entry[0][c]
        entry[0][c] = loss if prev is None else CHOICE_LOSS_DECAY * prev + (1 - CHOICE_LOSS_DECAY) * loss
        entry[1][c] += 1


def _cosine_lr(lr: float, step: int, total: int) -> float:
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _save_checkpoint(path: Path, supernet: Supernet, opt: torch.optim.Optimizer, state: dict) -> None:
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "spec": supernet.spec.to_dict(),
                           "width_mode": supernet.width_mode, **state, "model": supernet.state_dict(),
                           "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()})


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A supernet checkpoint as a dict (model and optimiser state dicts, epoch, step, seed, losses); DeployKitError if bad."""
    if not Path(path).exists():
        raise DeployKitError(f"supernet checkpoint not found: {path}: train with checkpoint={str(path)!r} to write it")
    return load_checkpoint_doc(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "supernet checkpoint",
                               "delete it to start training over")


def _resume(path: Path, supernet: Supernet, opt: torch.optim.Optimizer, seed: int, batch_size: int) -> dict:
    doc = load_checkpoint(path)
    fix = "pass another checkpoint path or delete it to start over"
    if SpaceSpec.from_dict(doc["spec"]) != supernet.spec or doc["width_mode"] != supernet.width_mode:
        raise DeployKitError(f"checkpoint {path} belongs to space {doc['spec'].get('name')!r} in {doc['width_mode']!r} mode, "
                             f"not {supernet.spec.name!r} in {supernet.width_mode!r} mode: {fix}")
    for name, value in (("seed", seed), ("batch_size", batch_size)):
        if doc[name] != value:  # the step position inside an epoch depends on both
            raise DeployKitError(f"checkpoint {path} was trained with {name}={doc[name]}, not {value}: pass {name}={doc[name]} "
                                 f"to resume, or {fix}")
    supernet.load_state_dict(doc["model"])
    opt.load_state_dict(doc["optimizer"])
    torch.set_rng_state(doc["torch_rng"])
    out = {k: doc[k] for k in ("epoch", "step", "loss_sum", "epoch_losses", "seed", "batch_size")}
    out["choice_losses"] = doc.get("choice_losses", {})
    return out


def train_supernet(supernet: Supernet, data: DataSplit, *, epochs: int, batch_size: int = 64, lr: float = 3e-3,
                   weight_decay: float = 1e-4, random_archs: int = 2, seed: int = 0, progress: bool = True,
                   checkpoint: str | os.PathLike | None = None, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train all sub-networks at once: per step the sandwich (largest, smallest, `random_archs` random architectures),
    each expanded by `training_subnets` (bilateral: both sides and the complementary widths), gradients of the mean
    cross-entropy over those sub-networks, one AdamW step, cosine learning rate over `epochs`.

    Every random choice is a function of (seed, epoch, step), so the position is the RNG state and a resumed run
    continues exactly. With `checkpoint`, the state is saved atomically after each epoch and on KeyboardInterrupt
    (then re-raised), and training resumes from an existing checkpoint (same space, mode, seed and batch size).
    `on_step(info)` is called after every step (info: epoch, step, loss), e.g. to log or to stop.
    Returns a report: epochs done, where it resumed, epochs and steps run now, seconds, per-epoch mean losses, and
    `choice_losses` {group name: [per choice the moving-average loss of random sub-networks that made it (None if
    never sampled), per choice the count]}: the statistics of BCNet's prior initial population (`search.choice_prior`)."""
    _check_data(supernet, data)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise DeployKitError(f"epochs must be a non-negative integer, got {epochs!r}")
    if batch_size < 2 or random_archs < 0:
        raise DeployKitError(f"batch_size must be at least 2 (BatchNorm) and random_archs >= 0, got {batch_size}, {random_archs}")
    n = len(data.train_x)
    if n < 2:
        raise DeployKitError(f"the training split holds {n} image(s): give a dataset with more images")
    steps_per_epoch = max(1, n // batch_size)  # the last, partial batch is dropped: batches stay equally noisy
    opt = torch.optim.AdamW(supernet.parameters(), lr=lr, weight_decay=weight_decay)
    state = {"epoch": 0, "step": 0, "loss_sum": 0.0, "epoch_losses": [], "seed": seed, "batch_size": batch_size,
             "choice_losses": {}}
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = _resume(path, supernet, opt, seed, batch_size)
    start_epoch, start_step = state["epoch"], state["step"]
    total_steps = epochs * steps_per_epoch
    supernet._calibrated_for = None  # weights are about to change
    supernet.train()
    t0, steps_run, subnets_run = time.perf_counter(), 0, 0
    bar = tqdm(total=total_steps, initial=min(total_steps, start_epoch * steps_per_epoch + start_step), unit="step",
               desc=f"supernet {supernet.spec.name} ({supernet.width_mode})", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        while state["epoch"] < epochs:
            perm = torch.from_numpy(np.random.default_rng([seed, state["epoch"]]).permutation(n))
            while state["step"] < steps_per_epoch:
                idx = perm[state["step"] * batch_size:(state["step"] + 1) * batch_size]
                x, y = data.train_x[idx], data.train_y[idx]
                subnets = step_subnets(supernet, np.random.default_rng([seed, state["epoch"], state["step"]]), random_archs)
                for group in opt.param_groups:
                    group["lr"] = _cosine_lr(lr, state["epoch"] * steps_per_epoch + state["step"], total_steps)
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for sn, arch in subnets:
                    loss = F.cross_entropy(supernet.forward_subnet(x, sn), y)
                    (loss / len(subnets)).backward()
                    step_loss += loss.item() / len(subnets)
                    if arch is not None:
                        _credit_choices(supernet.spec, state["choice_losses"], arch, loss.item())
                opt.step()
                state["step"] += 1
                state["loss_sum"] += step_loss
                steps_run += 1
                subnets_run += len(subnets)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", subnets=len(subnets))
                if on_step is not None:
                    on_step({"epoch": state["epoch"], "step": state["step"], "loss": step_loss})
            state["epoch_losses"] = [*state["epoch_losses"], state["loss_sum"] / steps_per_epoch]
            state.update(epoch=state["epoch"] + 1, step=0, loss_sum=0.0)
            if path is not None:
                _save_checkpoint(path, supernet, opt, state)
    except KeyboardInterrupt:
        if path is not None:
            _save_checkpoint(path, supernet, opt, state)
        raise
    finally:
        bar.close()
    return {"epochs": state["epoch"], "resumed_from_epoch": start_epoch, "resumed_from_step": start_step,
            "epochs_run": state["epoch"] - start_epoch, "steps_run": steps_run, "seconds": time.perf_counter() - t0,
            "subnets_per_step": subnets_run / max(steps_run, 1), "epoch_losses": list(state["epoch_losses"]),
            "final_loss": state["epoch_losses"][-1] if state["epoch_losses"] else None,
            "choice_losses": state["choice_losses"]}
