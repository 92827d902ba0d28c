"""Benchmark: does fair (bilateral) width training rank sub-networks better than left-aligned sharing?

Search-issue target: "Kendall tau between supernet accuracy and stand-alone accuracy over >= 20 sampled widths,
reported for both" (bilateral = BCNet, arXiv 2105.10533; left = plain left-aligned channel sharing).

  1. Ops are fixed: by default the space is DIGITS_SPACE reduced to one op (k3e3 everywhere, no skip), so both
     supernets share only the width dimension; with --full-space the supernets are trained on the whole
     DIGITS_SPACE (all ops, skip) and every width config is evaluated with k3e3 everywhere.
  2. --n-widths distinct per-stage width-ratio vectors are sampled (seeded) from spec.width_ratios.
  3. A bilateral and a left-aligned supernet are trained with identical settings (epochs, seed, batch, lr, data) and
     every width config is scored with evaluate_arch (bilateral: mean of the left and right sides, as BCNet).
  4. Every width config is trained stand-alone from scratch (build_network in train mode, AdamW with the supernet's
     lr / weight decay, cosine schedule, --standalone-epochs, same split), once per --standalone-seeds seed; its
     validation accuracy (mean over seeds) is the ground truth.
  5. Kendall tau (tau-b, scipy if available) between supernet and stand-alone accuracy, for both modes; and the
     same on validation loss (cross-entropy), which still separates networks whose accuracies differ by an image.

Usage: python tools/bench_supernet_ranking.py [--supernet-epochs 25] [--standalone-epochs 15] [--n-widths 20]
       [--standalone-seeds 2] [--seed 0] [--full-space] [--width-ratios 0.25,0.5,0.75,1.0]
       [--channel-scale 0.25] [--channel-divisor 1]
       [--out tools/out/supernet/ranking.json]
--width-ratios replaces the space's width choices, for a wider range of capacities. (On digits, 0.25-1.0 did
not make the stand-alone ranking repeat across seeds: the README has the runs.) --channel-scale 0.25
--channel-divisor 1 shrinks every channel count to a quarter and rounds widths to single channels, so a
stage keeps 1-16 channels: accuracy then depends on width (78-93% stand-alone) and two stand-alone seeds agree.
Prints a Markdown table; writes JSON. Runs with one torch thread (much faster than two on small CPUs).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deploykit.archspace import DIGITS_SPACE, Arch, SpaceSpec, build_network
from deploykit.data import DataSplit, load_dataset
from deploykit.supernet import Supernet, score_arch, train_supernet
from deploykit.train import train_network

FIXED = "k3e3"
LR, WEIGHT_DECAY, BATCH = 3e-3, 1e-4, 64


def kendall_tau(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """Kendall tau-b and its p-value (scipy); without scipy tau-b from pair counts and no p-value."""
    try:
        from scipy.stats import kendalltau
        res = kendalltau(a, b)
        return float(res.statistic), float(res.pvalue)
    except ImportError:
        pass
    conc = disc = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif da * db > 0:
            conc += 1
        else:
            disc += 1
    denom = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return ((conc - disc) / denom if denom else float("nan")), None


def space(full: bool, width_ratios: tuple[float, ...] | None = None, channel_scale: float = 1.0,
          channel_divisor: int | None = None) -> SpaceSpec:
    """DIGITS_SPACE, optionally with other width choices, every channel count scaled and another rounding divisor."""
    spec = DIGITS_SPACE if width_ratios is None else dataclasses.replace(DIGITS_SPACE, width_ratios=width_ratios)
    if channel_scale != 1.0 or channel_divisor is not None:
        def sc(c: int) -> int:
            return max(1, round(c * channel_scale))
        spec = dataclasses.replace(
            spec, name=f"{spec.name}-x{channel_scale:g}", stem_channels=sc(spec.stem_channels),
            head_channels=sc(spec.head_channels),
            stages=tuple(dataclasses.replace(st, channels=sc(st.channels)) for st in spec.stages),
            channel_divisor=spec.channel_divisor if channel_divisor is None else channel_divisor)
    if full:
        return spec
    k, e = FIXED[1:].split("e")
    return dataclasses.replace(spec, name=f"{spec.name}-{FIXED}", kernel_sizes=(int(k),), expansions=(int(e),), allow_skip=False)


def sample_widths(spec: SpaceSpec, n: int, seed: int) -> list[Arch]:
    """n distinct width vectors, uniform over spec.width_ratios per stage, ops fixed to FIXED."""
    total = len(spec.width_ratios) ** len(spec.stages)
    if n > total:
        raise SystemExit(f"--n-widths {n} exceeds the {total} distinct width vectors of the space")
    rng = np.random.default_rng(seed)
    n_ops = sum(s.depth for s in spec.stages[1:])
    seen, out = set(), []
    while len(out) < n:
        w = tuple(float(spec.width_ratios[int(i)]) for i in rng.integers(len(spec.width_ratios), size=len(spec.stages)))
        if w not in seen:
            seen.add(w)
            out.append(Arch(ops=(FIXED,) * n_ops, widths=w, resolution=max(spec.resolutions)))
    return out


def train_standalone(spec: SpaceSpec, arch: Arch, data: DataSplit, epochs: int, seed: int) -> tuple[float, float]:
    """Validation (accuracy, loss) of build_network(spec, arch) trained from scratch with deploykit.train's recipe."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(spec, arch)
    r = train_network(net, data, epochs=epochs, lr=LR, weight_decay=WEIGHT_DECAY, batch_size=BATCH, seed=seed, progress=False)
    return r["accuracy"], r["val_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--supernet-epochs", type=int, default=25)
    ap.add_argument("--standalone-epochs", type=int, default=15)
    ap.add_argument("--n-widths", type=int, default=20)
    ap.add_argument("--standalone-seeds", type=int, default=2, help="stand-alone runs per width config (accuracy averaged)")
    ap.add_argument("--seed", type=int, default=0, help="supernet seed, width sampling seed, first stand-alone seed")
    ap.add_argument("--full-space", action="store_true", help="train the supernets on the whole DIGITS_SPACE (all ops)")
    ap.add_argument("--width-ratios", help="comma-separated width choices replacing the space's (e.g. 0.25,0.5,0.75,1.0)")
    ap.add_argument("--channel-scale", type=float, default=1.0,
                    help="multiply every channel count of the space (stem, stages, head): < 1 makes width matter more")
    ap.add_argument("--channel-divisor", type=int, help="round stage widths to multiples of this (the space's 8 by default)")
    ap.add_argument("--calibration-images", type=int, default=1000)
    ap.add_argument("--out", default="tools/out/supernet/ranking.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.monotonic()

    ratios = tuple(float(r) for r in args.width_ratios.split(",")) if args.width_ratios else None
    spec = space(args.full_space, ratios, args.channel_scale, args.channel_divisor)
    data = load_dataset("digits", max(spec.resolutions))
    archs = sample_widths(spec, args.n_widths, args.seed)
    print(f"space {spec.name}: {len(archs)} width configs, ops {FIXED}; {len(data.train_y)} train / {len(data.val_y)} val images",
          file=sys.stderr)

    supernet_acc: dict[str, list[float]] = {}
    supernet_loss: dict[str, list[float]] = {}
    supernet_info: dict[str, dict] = {}
    for mode in ("bilateral", "left"):
        sn = Supernet(spec, mode, seed=args.seed)
        rep = train_supernet(sn, data, epochs=args.supernet_epochs, batch_size=BATCH, lr=LR, weight_decay=WEIGHT_DECAY,
                             seed=args.seed)
        t0 = time.monotonic()
        scores = [score_arch(sn, a, data, calibration_images=args.calibration_images)
                  for a in tqdm(archs, desc=f"evaluate ({mode})", file=sys.stderr, dynamic_ncols=True)]
        supernet_acc[mode] = [sc["accuracy"] for sc in scores]
        supernet_loss[mode] = [sc["loss"] for sc in scores]
        supernet_info[mode] = {"train_s": round(rep["seconds"], 1), "eval_s": round(time.monotonic() - t0, 1),
                               "final_loss": rep["final_loss"], "subnets_per_step": round(rep["subnets_per_step"], 2)}

    seeds = [args.seed + i for i in range(args.standalone_seeds)]
    t0 = time.monotonic()
    standalone_runs = np.zeros((len(archs), len(seeds)))
    standalone_loss_runs = np.zeros((len(archs), len(seeds)))
    with tqdm(total=len(archs) * len(seeds), desc="stand-alone", file=sys.stderr, dynamic_ncols=True) as bar:
        for j, s in enumerate(seeds):
            for i, a in enumerate(archs):
                standalone_runs[i, j], standalone_loss_runs[i, j] = train_standalone(spec, a, data, args.standalone_epochs, s)
                bar.update(1)
    standalone_s = time.monotonic() - t0
    standalone = standalone_runs.mean(1).tolist()
    standalone_loss = standalone_loss_runs.mean(1).tolist()

    results = {}
    for mode in ("bilateral", "left"):
        tau, p = kendall_tau(supernet_acc[mode], standalone)
        loss_tau, loss_p = kendall_tau(supernet_loss[mode], standalone_loss)
        acc = supernet_acc[mode]
        results[mode] = {"kendall_tau": tau, "p_value": p, "loss_kendall_tau": loss_tau, "loss_p_value": loss_p,
                         "supernet_acc_min": min(acc), "supernet_acc_max": max(acc),
                         "supernet_acc_mean": float(np.mean(acc)), **supernet_info[mode]}
    seed_tau = seed_loss_tau = None
    if len(seeds) > 1:  # how well two stand-alone seeds agree: a ceiling for any supernet's tau
        seed_tau = kendall_tau(standalone_runs[:, 0].tolist(), standalone_runs[:, 1].tolist())[0]
        seed_loss_tau = kendall_tau(standalone_loss_runs[:, 0].tolist(), standalone_loss_runs[:, 1].tolist())[0]
    wall = time.monotonic() - t_start

    n_val = len(data.val_y)
    print(f"\n## Supernet ranking: {len(archs)} width configs of {spec.name} (ops {FIXED}), {n_val} val images "
          f"(1 image = {100 / n_val:.2f} pp)\n")
    print(f"supernet epochs {args.supernet_epochs}, stand-alone epochs {args.standalone_epochs} x {len(seeds)} seed(s), "
          f"seed {args.seed}\n")
    print("| mode | Kendall tau, accuracy (p) | Kendall tau, val loss (p) | supernet acc min..max (mean) | "
          "stand-alone acc min..max | train s | eval s |")
    print("|---|---|---|---|---|---|---|")

    def p_(v):
        return f"{v:.3f}" if v is not None else "-"
    for mode, r in results.items():
        print(f"| {mode} | {r['kendall_tau']:.3f} ({p_(r['p_value'])}) | {r['loss_kendall_tau']:.3f} ({p_(r['loss_p_value'])}) | "
              f"{r['supernet_acc_min']:.4f}..{r['supernet_acc_max']:.4f} ({r['supernet_acc_mean']:.4f}) | "
              f"{min(standalone):.4f}..{max(standalone):.4f} | {r['train_s']} | {r['eval_s']} |")
    if seed_tau is not None:
        print(f"\nstand-alone seed-vs-seed Kendall tau: accuracy {seed_tau:.3f}, val loss {seed_loss_tau:.3f}")
    print(f"\nstand-alone training {standalone_s:.1f} s; wall time {wall:.1f} s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"args": vars(args), "space": spec.to_dict(), "fixed_op": FIXED, "n_train": len(data.train_y), "n_val": n_val,
           "optimiser": {"name": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY, "batch_size": BATCH, "schedule": "cosine"},
           "results": results, "standalone_seed_tau": seed_tau,
           "standalone_seed_loss_tau": seed_loss_tau, "standalone_s": round(standalone_s, 1), "wall_s": round(wall, 1),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "widths": [{"widths": list(a.widths), "standalone_acc": standalone[i], "standalone_runs": standalone_runs[i].tolist(),
                       "standalone_loss": standalone_loss[i], "standalone_loss_runs": standalone_loss_runs[i].tolist(),
                       **{f"supernet_{m}": supernet_acc[m][i] for m in supernet_acc},
                       **{f"supernet_loss_{m}": supernet_loss[m][i] for m in supernet_loss}} for i, a in enumerate(archs)]}
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
