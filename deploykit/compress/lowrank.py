"""Trained low-rank decomposition (TRP, "Trained Rank Pruning", Xu et al., arXiv 1812.02402 / 2004.14566).

During training, every `project_every` steps each decomposable layer's weight is replaced by its truncated SVD
keeping a fraction `energy` of the squared singular values, with ordinary AdamW steps in between; a nuclear-norm
regulariser is added through its sub-gradient lambda * U V^T. After training, `decompose` splits each layer at the
chosen rank into two cheaper factor layers (then the caller fine-tunes the result with deploykit.train).

A layer's matrix form depends on the scheme:
- "channel": Conv k x k (Cin -> Cout) = Conv k x k (Cin -> r, no bias) + Conv 1x1 (r -> Cout, bias); W as [Cout, Cin*kh*kw].
- "spatial" (Jaderberg et al. scheme 2): Conv (kh x 1) (Cin -> r, no bias) + Conv (1 x kw) (r -> Cout, bias);
  W permuted to [Cin*kh, Cout*kw] (rows (cin, kh), columns (cout, kw)).
- nn.Linear (in -> out), both schemes: Linear (in -> r, no bias) + Linear (r -> out, bias); W as [out, in].
Decomposable: nn.Linear and nn.Conv2d with groups == 1 (1x1 convs with the channel scheme only).
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from tqdm import tqdm

from ..data import DataSplit
from ..errors import DeployKitError
from ..fileio import save_checkpoint
from ..train import accuracy, load_training_state

SCHEMES = ("channel", "spatial")
CHECKPOINT_FORMAT = "deploykit-trp-checkpoint"
CHECKPOINT_VERSION = 1

# weight Parameter -> {(scheme, version, data_ptr, shape): Gram eigen-decomposition}: an energy search calls
# ranks_for_energy and decompose many times, and each layer's decomposition is computed once until the weight changes.
_EIGEN: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class TRPConfig:
    """Settings of trained rank pruning."""

    scheme: str = "channel"  # "channel" | "spatial"
    energy: float = 0.95  # retained energy (sum of squared singular values) of the periodic projection, in (0, 1]
    project_every: int = 20  # training steps between projections
    nuclear_weight: float = 3e-4  # lambda of the nuclear-norm sub-gradient (0 turns it off)
    exclude: tuple[str, ...] = ()  # qualified module names (and their children) left alone

    def __post_init__(self):
        _check_scheme(self.scheme)
        _check_energy(self.energy)
        if isinstance(self.project_every, bool) or not isinstance(self.project_every, int) or self.project_every < 1:
            raise DeployKitError(f"project_every must be a positive integer number of steps, got {self.project_every!r}")
        if isinstance(self.nuclear_weight, bool) or not isinstance(self.nuclear_weight, (int, float)) \
                or not math.isfinite(self.nuclear_weight) or self.nuclear_weight < 0:
            raise DeployKitError(f"nuclear_weight must be a finite number >= 0, got {self.nuclear_weight!r}")
        self.exclude = _check_exclude(self.exclude)

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "energy": float(self.energy), "project_every": self.project_every,
                "nuclear_weight": float(self.nuclear_weight), "exclude": list(self.exclude)}


# -- validation ------------------------------------------------------------------------------------------------------

def _check_scheme(scheme: object) -> str:
    if scheme not in SCHEMES:
        raise DeployKitError(f"unknown low-rank scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    return scheme  # type: ignore[return-value]


def _check_energy(energy: object) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < float(energy) <= 1.0:
        raise DeployKitError(f"energy must be a fraction in (0, 1] of the squared singular values kept, got {energy!r}")
    return float(energy)


def _check_exclude(exclude: object) -> tuple[str, ...]:
    if isinstance(exclude, str):  # a bare string would silently become a tuple of characters
        exclude = (exclude,)
    try:
        names = tuple(exclude)  # type: ignore[arg-type]
    except TypeError:
        raise DeployKitError(f"exclude must be a list of module names, got {exclude!r}") from None
    if not all(isinstance(n, str) for n in names):
        raise DeployKitError(f"exclude must be a list of module names (strings), got {exclude!r}")
    return names


# -- layers and their matrix forms -----------------------------------------------------------------------------------

def _kind(module: nn.Module, scheme: str) -> str | None:
    """The layer kind, "linear" or "conv", or None where this scheme cannot decompose it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        if scheme == "spatial" and tuple(module.kernel_size) == (1, 1):
            return None  # no spatial extent to split
        return "conv"
    return None


def _to_matrix(weight: torch.Tensor, kind: str, scheme: str) -> torch.Tensor:
    if kind == "linear":
        return weight
    cout, cin, kh, kw = weight.shape
    if scheme == "channel":
        return weight.reshape(cout, cin * kh * kw)
    return weight.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw)  # rows (cin, kh), columns (cout, kw)


def _from_matrix(matrix: torch.Tensor, shape: torch.Size, kind: str, scheme: str) -> torch.Tensor:
    if kind == "linear":
        return matrix
    cout, cin, kh, kw = shape
    if scheme == "channel":
        return matrix.reshape(shape)
    return matrix.reshape(cin, kh, cout, kw).permute(2, 0, 1, 3)


def _full_rank(module: nn.Module, kind: str, scheme: str) -> int:
    return min(_to_matrix(module.weight, kind, scheme).shape)


def _gram_eig(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Squared singular values (descending) and singular vectors of the smaller side, from the eigen-decomposition
    of the smaller Gram matrix in float64: 20-50x faster than torch.linalg.svd on CPU, and the squared values are
    what energy is measured in (absolute accuracy ~1e-16 of the total)."""
    matrix = matrix.double()
    on_left = matrix.shape[0] <= matrix.shape[1]
    gram = matrix @ matrix.T if on_left else matrix.T @ matrix
    squares, vectors = torch.linalg.eigh(gram)
    return squares.flip(0).clamp_min(0.0), vectors.flip(1), on_left


def _low_rank_factors(matrix: torch.Tensor, rank: int, eigen=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(left [m, r], right [r, n]) float64 with left @ right the best rank-r approximation of matrix (truncated SVD),
    split evenly: left = U_r sqrt(S_r), right = sqrt(S_r) V_r^T. `eigen`: _gram_eig(matrix) if already known."""
    matrix = matrix.double()
    _, vectors, on_left = eigen if eigen is not None else _gram_eig(matrix)
    basis = vectors[:, :rank]
    if on_left:
        raw = basis.T @ matrix  # S_r V_r^T
        scale = raw.norm(dim=1).sqrt()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero direction stays zero either way
        return basis * scale, raw / scale[:, None]
    raw = matrix @ basis  # U_r S_r
    scale = raw.norm(dim=0).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return raw / scale, scale[:, None] * basis.T


def _factor_macs(module: nn.Module, kind: str, scheme: str, rank: int) -> tuple[int, int]:
    """(MACs per output position of the factorised layer, of the original layer).

    Spatial scheme: the (kh x 1) conv has only the vertical stride, so it runs at about stride_w times as many
    positions as the output; the count is per output position, which needs no input shape."""
    if kind == "linear":
        return rank * (module.in_features + module.out_features), module.in_features * module.out_features
    cout, cin, kh, kw = module.weight.shape
    if scheme == "channel":
        return rank * (cin * kh * kw + cout), cout * cin * kh * kw
    return rank * (cin * kh * module.stride[1] + cout * kw), cout * cin * kh * kw


def is_cheaper(module: nn.Module, rank: int, scheme: str = "channel") -> bool:
    """Whether factorising `module` at `rank` costs fewer MACs than the layer itself (only then does decompose split it)."""
    kind = _kind(module, _check_scheme(scheme))
    if kind is None:
        return False
    factored, original = _factor_macs(module, kind, scheme, rank)
    return factored < original


def _layers(net: nn.Module, scheme: str, exclude) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, module, kind) of every decomposable, non-excluded layer, in module order."""
    _check_scheme(scheme)
    exclude = _check_exclude(exclude)
    names = {name for name, _ in net.named_modules()}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise DeployKitError(f"exclude names {', '.join(map(repr, unknown))} are not modules of the network: "
                             f"use qualified names from net.named_modules(), e.g. 'layer1.0.conv1'")
    out = []
    for name, module in net.named_modules():
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        kind = _kind(module, scheme)
        if kind is not None and not isinstance(module.weight, nn.parameter.UninitializedParameter):
            out.append((name, module, kind))
    return out


def decomposable_layers(net: nn.Module, scheme: str = "channel", exclude=()) -> list[str]:
    """Qualified names of the layers this scheme can decompose (nn.Linear, nn.Conv2d with groups 1), minus `exclude`."""
    return [name for name, _, _ in _layers(net, scheme, exclude)]


def _eigen(module: nn.Module, kind: str, scheme: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """_gram_eig of the layer's matrix (on the CPU), cached until the weight changes (in-place edits bump _version)."""
    weight = module.weight
    key = (scheme if kind == "conv" else "linear", weight._version, weight.data_ptr(), tuple(weight.shape))
    entries = _EIGEN.get(weight)
    if entries is not None and key in entries:
        return entries[key]
    with torch.no_grad():
        eigen = _gram_eig(_to_matrix(weight.detach().cpu(), kind, scheme))
    fresh = {k: v for k, v in (entries or {}).items() if k[1:] == key[1:]}  # forget older versions of the weight
    fresh[key] = eigen
    _EIGEN[weight] = fresh
    return eigen


def _spectrum(module: nn.Module, kind: str, scheme: str) -> torch.Tensor:
    """Singular values (float32, descending) of the layer's matrix."""
    return _eigen(module, kind, scheme)[0].sqrt().float()


def _energy_rank(values: torch.Tensor, energy: float) -> int:
    """Smallest r whose r largest singular values hold `energy` of the squared sum; energy 1.0 -> full rank."""
    full = int(values.numel())
    if energy >= 1.0:
        return full
    squares = values.double() ** 2
    total = float(squares.sum())
    if total <= 0.0:
        return 1  # an all-zero weight: rank 1 is the least a layer can have
    kept = torch.cumsum(squares, 0) / total  # non-decreasing, so the rank is monotone in energy
    first = int(torch.searchsorted(kept, torch.tensor([energy], dtype=torch.float64)).item())
    return min(max(first + 1, 1), full)


def singular_values(net: nn.Module, scheme: str = "channel", exclude=()) -> dict[str, torch.Tensor]:
    """Per decomposable layer, the singular values of its matrix form (float32, descending)."""
    return {name: _spectrum(m, kind, scheme).clone() for name, m, kind in _layers(net, scheme, exclude)}


def ranks_for_energy(net: nn.Module, energy: float, scheme: str = "channel", exclude=()) -> dict[str, int]:
    """Per decomposable layer, the smallest rank keeping `energy` of the squared singular values (monotone in energy)."""
    energy = _check_energy(energy)
    return {name: _energy_rank(_spectrum(m, kind, scheme), energy) for name, m, kind in _layers(net, scheme, exclude)}


# -- decomposition ---------------------------------------------------------------------------------------------------

def factorize_layer(layer: nn.Module, rank: int, scheme: str = "channel") -> nn.Sequential:
    """The two factor layers of `layer` at `rank` (clipped to the full rank), whether or not that is cheaper.

    At full rank the factorisation reproduces the layer exactly (up to float rounding)."""
    kind = _kind(layer, _check_scheme(scheme))
    if kind is None:
        raise DeployKitError(f"cannot factorise a {type(layer).__name__} with the {scheme} scheme: only nn.Linear and "
                             f"nn.Conv2d with groups=1 (kernel larger than 1x1 for the spatial scheme)")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise DeployKitError(f"rank must be a positive integer, got {rank!r}")
    weight = layer.weight.detach()
    with torch.no_grad():
        matrix = _to_matrix(weight.double().cpu(), kind, scheme)
        r = min(rank, min(matrix.shape))
        left, right = _low_rank_factors(matrix, r, _eigen(layer, kind, scheme))  # [rows, r], [r, columns]
        bias = layer.bias is not None
        if kind == "linear":
            first = nn.Linear(layer.in_features, r, bias=False)
            second = nn.Linear(r, layer.out_features, bias=bias)
            first_w, second_w = right, left
        else:
            cout, cin, kh, kw = weight.shape
            if scheme == "channel":
                first = nn.Conv2d(cin, r, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                                  dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode)
                second = nn.Conv2d(r, cout, 1, bias=bias)
                first_w, second_w = right.reshape(r, cin, kh, kw), left.reshape(cout, r, 1, 1)
            else:
                # W[o, i, a, b] = M[(i, a), (o, b)] = sum_r left[(i, a), r] right[r, (o, b)]: the vertical (kh x 1)
                # filters come from the left factor, the horizontal (1 x kw) ones from the right factor
                pad = layer.padding
                pad_v, pad_h = (pad, pad) if isinstance(pad, str) else ((pad[0], 0), (0, pad[1]))
                first = nn.Conv2d(cin, r, (kh, 1), stride=(layer.stride[0], 1), padding=pad_v,
                                  dilation=(layer.dilation[0], 1), bias=False, padding_mode=layer.padding_mode)
                second = nn.Conv2d(r, cout, (1, kw), stride=(1, layer.stride[1]), padding=pad_h,
                                   dilation=(1, layer.dilation[1]), bias=bias, padding_mode=layer.padding_mode)
                first_w = left.reshape(cin, kh, r).permute(2, 0, 1)[..., None]
                second_w = right.reshape(r, cout, kw).permute(1, 0, 2)[:, :, None, :]
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if bias:
            second.bias.copy_(layer.bias.detach().double())
    seq = nn.Sequential(first, second).to(device=weight.device, dtype=weight.dtype)
    return seq.train(layer.training)


def decompose(net: nn.Module, ranks: dict[str, int], scheme: str = "channel", *, only_cheaper: bool = True) -> nn.Module:
    """A deep copy of `net` with each layer named in `ranks` replaced by nn.Sequential(first factor, second factor).

    With only_cheaper (the default) a layer is replaced only where its factorisation costs fewer MACs, else it is kept
    as is. The input net is untouched; the result is an ordinary nn.Module (exportable to ONNX)."""
    layers = {name: (module, kind) for name, module, kind in _layers(net, scheme, ())}
    bad = [name for name in ranks if name not in layers]
    if bad:
        raise DeployKitError(f"layers {', '.join(map(repr, bad))} are not decomposable with the {scheme} scheme: "
                             f"take the names from decomposable_layers(net, {scheme!r})")
    out = copy.deepcopy(net)
    for name, rank in ranks.items():
        module, _ = layers[name]  # factorised from the input net's layer: its decomposition is cached there
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise DeployKitError(f"rank of layer {name!r} must be a positive integer, got {rank!r}")
        rank = min(int(rank), _full_rank(module, layers[name][1], scheme))
        if only_cheaper and not is_cheaper(module, rank, scheme):
            continue
        if not name:  # the net itself is one layer
            return factorize_layer(module, rank, scheme)
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, factorize_layer(module, rank, scheme))
    return out


def _macs_by_layer(net: nn.Module, example_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs per image of every Conv2d and Linear, measured with forward hooks on one zero input."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name):
        def count(module, inputs, output):
            per_position = module.in_features if isinstance(module, nn.Linear) else \
                module.in_channels // module.groups * math.prod(module.kernel_size)
            macs[name] = macs.get(name, 0) + output.numel() // output.shape[0] * per_position
        return count

    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = net.training
    param = next(net.parameters(), None)
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, *example_shape[1:], device=param.device if param is not None else "cpu"))
    except RuntimeError as e:  # shape mismatch inside the net
        raise DeployKitError(f"example_shape {tuple(example_shape)} does not fit the network ({str(e).splitlines()[0]}): "
                             f"give the (N, C, H, W) shape the network takes") from None
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    return macs


def decomposed_report(original: nn.Module, decomposed: nn.Module, example_shape: tuple[int, ...] | None = None) -> dict:
    """Parameters (and, with example_shape (N, C, H, W), MACs per image of convs and linears) before and after, and the
    replaced layers with their ranks."""
    def params(net: nn.Module) -> int:
        return sum(p.numel() for p in net.parameters())

    macs_before = _macs_by_layer(original, example_shape) if example_shape is not None else None
    macs_after = _macs_by_layer(decomposed, example_shape) if example_shape is not None else None
    after_modules = dict(decomposed.named_modules())
    layers = []
    for name, module in original.named_modules():
        new = after_modules.get(name) if name else None
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or not isinstance(new, nn.Sequential) or len(new) != 2 \
                or not all(type(m) is type(module) for m in new):
            continue
        first, second = new[0], new[1]
        if isinstance(module, nn.Linear):
            scheme, rank, full = "linear", first.out_features, min(module.in_features, module.out_features)
        else:
            scheme = "channel" if tuple(second.kernel_size) == (1, 1) else "spatial"
            rank, full = first.out_channels, _full_rank(module, "conv", scheme)
        row = {"name": name, "type": type(module).__name__, "scheme": scheme, "rank": rank, "full_rank": full,
               "params_before": params(module), "params_after": params(new)}
        if macs_before is not None:
            row["macs_before"] = macs_before.get(name, 0)
            row["macs_after"] = macs_after.get(f"{name}.0", 0) + macs_after.get(f"{name}.1", 0)
        layers.append(row)
    report = {"params_before": params(original), "params_after": params(decomposed),
              "macs_before": sum(macs_before.values()) if macs_before is not None else None,
              "macs_after": sum(macs_after.values()) if macs_after is not None else None,
              "example_shape": list(example_shape) if example_shape is not None else None, "layers": layers}
    report["params_ratio"] = report["params_after"] / max(report["params_before"], 1)
    report["macs_ratio"] = report["macs_after"] / max(report["macs_before"], 1) if macs_before is not None else None
    return report


# -- training --------------------------------------------------------------------------------------------------------

def _cosine(lr: float, step: int, total: int) -> float:
    """The learning-rate schedule of deploykit.train.train_network."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _nuclear_subgradient(layers: list[tuple[str, nn.Module, str]], scheme: str, weight: float) -> None:
    """Add weight * U V^T (sub-gradient of the nuclear norm of each layer's matrix) to the weight's gradient."""
    with torch.no_grad():
        for _, module, kind in layers:
            grad = module.weight.grad
            if grad is None:
                continue
            w = module.weight.detach()
            matrix = _to_matrix(w.double(), kind, scheme)
            squares, vectors, on_left = _gram_eig(matrix)
            values = squares.sqrt()
            k = int((values > values[0] * 1e-6).sum()) if values[0] > 0 else 0  # (near-)zero directions: sub-gradient 0
            if not k:
                continue
            basis = vectors[:, :k] / values[:k]
            direction = basis @ (vectors[:, :k].T @ matrix) if on_left else (matrix @ basis) @ vectors[:, :k].T  # U V^T
            grad.add_(_from_matrix(direction, w.shape, kind, scheme).to(grad.dtype), alpha=weight)


def _project(layers: list[tuple[str, nn.Module, str]], scheme: str, energy: float) -> None:
    """Replace each layer's weight by its truncated SVD keeping `energy` of the squared singular values."""
    with torch.no_grad():
        for _, module, kind in layers:
            w = module.weight
            matrix = _to_matrix(w.detach().double(), kind, scheme)
            squares, vectors, on_left = _gram_eig(matrix)
            r = _energy_rank(squares.sqrt(), energy)
            if r < squares.numel():
                basis = vectors[:, :r]  # U_r U_r^T M (or M V_r V_r^T) is the truncated SVD
                low = basis @ (basis.T @ matrix) if on_left else (matrix @ basis) @ basis.T
                w.copy_(_from_matrix(low, w.shape, kind, scheme).to(w.dtype))


def _resume(path: Path, net: nn.Module, opt: torch.optim.Optimizer, settings: dict, epochs: int) -> dict:
    doc = load_training_state(path, net, opt, settings, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                              what="TRP checkpoint", max_epochs=epochs)
    return {"epoch": doc["epoch"], "epoch_losses": list(doc["epoch_losses"]), "projections": doc["projections"]}


def trp_train(net: nn.Module, data: DataSplit, *, epochs: int, config: TRPConfig, lr: float = 3e-3,
              weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0, progress: bool = True,
              checkpoint: str | os.PathLike | None = None) -> dict:
    """Train `net` in place with trained rank pruning: the recipe of deploykit.train.train_network (AdamW, cosine,
    batches from a permutation of (seed, epoch)) plus the nuclear-norm sub-gradient every step and the energy
    projection every `config.project_every` steps.

    With `checkpoint`, the state is saved atomically after every epoch; a later call with the same settings resumes
    from it, and may ask for more epochs than were trained (the cosine schedule then spans the new total).
    Returns {"accuracy", "epochs", "epoch_losses", "seconds", "ranks", "resumed_from_epoch", "projections"}, where
    ranks are the energy ranks (at config.energy) of the trained layers; the net is left in eval mode.
    """
    if not isinstance(config, TRPConfig):
        raise DeployKitError(f"config must be a TRPConfig, got {type(config).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise DeployKitError(f"epochs must be a non-negative integer, got {epochs!r}")
    n = len(data.train_x)
    if n < 2 or batch_size < 2:
        raise DeployKitError(f"training needs at least 2 images and batch_size >= 2 (BatchNorm), got {n} and {batch_size}")
    layers = _layers(net, config.scheme, config.exclude)
    if not layers:
        raise DeployKitError(f"the network has no layer the {config.scheme} scheme can decompose (after exclude): "
                             f"nothing to train for low rank; check exclude or use plain training")
    steps = max(1, n // batch_size)
    total = epochs * steps
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    settings = {"lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed, "trp": config.to_dict()}
    state = {"epoch": 0, "epoch_losses": [], "projections": 0}
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = _resume(path, net, opt, settings, epochs)
    start = state["epoch"]
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=start * steps, unit="step", desc="trp", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        while state["epoch"] < epochs:
            epoch = state["epoch"]
            perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
            net.train()
            loss_sum = 0.0
            projections = state["projections"]
            for s in range(steps):
                idx = perm[s * batch_size:(s + 1) * batch_size]
                for g in opt.param_groups:
                    g["lr"] = _cosine(lr, epoch * steps + s, total)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(data.train_x[idx]), data.train_y[idx])
                loss.backward()
                if config.nuclear_weight > 0:
                    _nuclear_subgradient(layers, config.scheme, config.nuclear_weight)
                opt.step()
                if (epoch * steps + s + 1) % config.project_every == 0:  # global step count: same points after resume
                    _project(layers, config.scheme, config.energy)
                    projections += 1
                loss_sum += loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            state = {"epoch": epoch + 1, "epoch_losses": [*state["epoch_losses"], loss_sum / steps],
                     "projections": projections}
            if path is not None:
                save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **settings,
                                       **state, "model": net.state_dict(), "optimizer": opt.state_dict()})
    finally:  # on Ctrl-C the interrupted epoch is lost: the checkpoint holds the last finished one
        bar.close()
    return {"accuracy": accuracy(net, data), "epochs": state["epoch"], "epoch_losses": state["epoch_losses"],
            "seconds": time.perf_counter() - t0, "ranks": ranks_for_energy(net, config.energy, config.scheme, config.exclude),
            "resumed_from_epoch": start, "projections": state["projections"]}
