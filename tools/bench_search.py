"""Benchmark: search under a budget on digits, on this machine (the search issue's targets).

  1. The space's feasible range is measured (its smallest and largest architecture); --budgets budgets are
     spread over it (evenly between 15% and 85% of the range).
  2. One latency model (kernel predictor of --device + 30 measured architectures) and one bilateral supernet
     serve every budget, as `deploykit search` would build them for each run.
  3. Per budget: evolution (BCNet prior, band 0.88-0.97 x budget, verification on the device) and, for the first
     --darts-budgets budgets, the differentiable search. The chosen network is fine-tuned as the CLI does
     (supernet weights for evolution, from scratch for differentiable) and its ONNX latency measured.
     Target 1: measured latency in [0.85, 1.0] x budget.
  4. Target 2, a fair accuracy comparison: every chosen architecture and a uniformly width-scaled baseline family
     (MobileNetV2's k3e6 block everywhere, no skip, one width multiplier for every stage, on a grid) are trained
     from scratch with one recipe (--train-epochs, --seeds seeds each, AdamW, cosine); the baseline's accuracy at
     the searched network's measured latency is interpolated along the baseline's accuracy/latency curve.
Ranking (fair vs left-aligned width sharing) is tools/bench_supernet_ranking.py; the default CLI time is timed
with `time deploykit search ...` (README).

Usage: python tools/bench_search.py [--device epyc-2c-ort-t1] [--budgets 5] [--darts-budgets 3] [--supernet-epochs 16]
       [--train-epochs 15] [--seeds 2] [--out tools/out/search]
       python tools/bench_search.py --rescore tools/out/search/bench.json --seeds 6 [--workers 2]
--rescore repeats only step 4 for an earlier run, with more seeds, and reports each delta with its standard error
and the mean delta over all rows with a 95% interval. --fitness loss runs the evolution on the supernet's
cross-entropy instead of its accuracy (an experiment; the CLI uses accuracy).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deploykit.archmlp import measure_arch
from deploykit.archspace import DIGITS_SPACE, Arch, SpaceSpec, build_network, stage_channels
from deploykit.data import load_dataset
from deploykit.pipeline import (
    differentiable_phase,
    evolution_phase,
    export_phase,
    train_phase,
    train_search_supernet,
    verify_phase,
)
from deploykit.predictor import KernelPredictor
from deploykit.profilers import get_backend
from deploykit.search import BAND, TARGET_HIGH, TARGET_LOW, build_latency_model, space_range_ms
from deploykit.train import train_network

BASELINE_OP = "k3e6"  # MobileNetV2's block
BASELINE_WIDTHS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5)


def baseline(spec: SpaceSpec, w: float) -> tuple[SpaceSpec, Arch]:
    k, e = BASELINE_OP[1:].split("e")
    s = dataclasses.replace(spec, name=f"{spec.name}-uniform", kernel_sizes=(int(k),), expansions=(int(e),),
                            allow_skip=False, width_ratios=(w,))
    n_ops = sum(st.depth for st in spec.stages[1:])
    return s, Arch(ops=(BASELINE_OP,) * n_ops, widths=(w,) * len(spec.stages), resolution=max(spec.resolutions))


def scratch_run(spec: SpaceSpec, arch: Arch, data, epochs: int, seed: int) -> float:
    """Validation accuracy of build_network(spec, arch) trained from scratch with deploykit.train's recipe."""
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(spec, arch)
    return train_network(net, data, epochs=epochs, seed=seed, progress=False)["accuracy"]


def scratch_accuracy(spec: SpaceSpec, arch: Arch, data, epochs: int, seeds: int) -> list[float]:
    return [scratch_run(spec, arch, data, epochs, seed) for seed in range(seeds)]


def rescore(path: Path, seeds: int, workers: int, baseline_from: str | None = None) -> None:
    """Re-run the fair comparison of an earlier bench.json with more seeds: same architectures, same measured latencies.

    Every searched network and every baseline width is trained from scratch with seeds 0..seeds-1 (the first two are
    the earlier run's); per row the delta against the baseline's envelope, with its standard error, and over all rows
    the mean delta with a t-based 95% interval. Writes rescore-<seeds>.json next to bench.json.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm
    doc = json.loads(path.read_text())
    spec = DIGITS_SPACE
    data = load_dataset("digits", max(spec.resolutions), seed=doc.get("seed", 0))  # the run's split (runs before "seed" used 0)
    accs: dict[tuple[str, int], list[float]] = {}
    if baseline_from:  # the same widths and seeds trained before (training is deterministic); latencies stay this run's
        prev = json.loads(Path(baseline_from).read_text())["baseline"]
        same_widths = [b["width"] for b in prev] == [b["width"] for b in doc["baseline"]]
        if not same_widths or any(len(b["rescore_accs"]) != seeds for b in prev):
            raise SystemExit(f"{baseline_from} holds another baseline or another number of seeds")
        accs.update({("base", i): b["rescore_accs"] for i, b in enumerate(prev)})
    jobs = [] if baseline_from else [("base", i, *baseline(spec, b["width"]), s)
                                     for i, b in enumerate(doc["baseline"]) for s in range(seeds)]
    jobs += [("row", i, spec, Arch.from_dict(r["arch"]), s) for i, r in enumerate(doc["rows"]) for s in range(seeds)]
    t0 = time.monotonic()
    with ProcessPoolExecutor(workers) as pool, tqdm(total=len(jobs), desc="from scratch", file=sys.stderr) as bar:
        futures = [(kind, i, pool.submit(scratch_run, s_, a, data, doc["train_epochs"], seed)) for kind, i, s_, a, seed in jobs]
        for kind, i, f in futures:
            accs.setdefault((kind, i), []).append(f.result())
            bar.update(1)
    n_val = len(data.val_y)
    base = [(b["measured_ms"], float(np.mean(accs[("base", i)]))) for i, b in enumerate(doc["baseline"])]
    base_se = sorted((b[0], float(np.std(accs[("base", i)], ddof=1) / np.sqrt(seeds))) for i, b in enumerate(base))
    print(f"\nfrom scratch {doc['train_epochs']} epochs x {seeds} seeds; {n_val} val images (1 image = {100 / n_val:.2f} pt); "
          f"{(time.monotonic() - t0) / 60:.1f} min\n")
    print("| budget ms | method | measured ms | searched, mean +- se | uniform baseline at same latency | delta +- se |")
    print("|---|---|---|---|---|---|")
    deltas = []
    for i, r in enumerate(doc["rows"]):
        a = accs[("row", i)]
        m, se = float(np.mean(a)), float(np.std(a, ddof=1) / np.sqrt(seeds))
        b, inside = interpolate(base, r["measured_ms"])
        # the baseline's error at that latency: the larger of its two neighbours' (a conservative stand-in)
        j = int(np.clip(np.searchsorted([ms for ms, _ in base_se], r["measured_ms"]), 1, len(base_se) - 1))
        bse = max(base_se[j - 1][1], base_se[j][1])
        d, dse = m - b, float(np.hypot(se, bse))
        deltas.append(d)
        r.update({"rescore_accs": a, "rescore_accuracy": m, "rescore_baseline": b, "rescore_delta": d, "rescore_delta_se": dse})
        print(f"| {r['budget_ms']:.4f} | {r['method']} | {r['measured_ms']:.4f} | {m:.2%} +- {100 * se:.2f} | "
              f"{b:.2%}{'' if inside else ' (extrapolated)'} | {100 * d:+.2f} +- {100 * dse:.2f} pt |")
    from scipy import stats
    mean, sem = float(np.mean(deltas)), float(stats.sem(deltas))
    half = float(stats.t.ppf(0.975, len(deltas) - 1) * sem)
    print("\n| uniform width | measured ms | from scratch, mean +- se |")
    print("|---|---|---|")
    for i, b in enumerate(doc["baseline"]):
        a = accs[("base", i)]
        print(f"| {b['width']:g} | {b['measured_ms']:.4f} | {np.mean(a):.2%} +- {100 * np.std(a, ddof=1) / np.sqrt(seeds):.2f} |")
    print(f"\nahead of the baseline: {sum(d > 0 for d in deltas)}/{len(deltas)}; mean delta {100 * mean:+.2f} pt, "
          f"95% interval {100 * (mean - half):+.2f} to {100 * (mean + half):+.2f} pt")
    out = path.with_name(f"rescore-{seeds}.json")
    out.write_text(json.dumps({"source": str(path), "seeds": seeds, "rows": doc["rows"],
                               "baseline": [{**b, "rescore_accs": accs[("base", i)]} for i, b in enumerate(doc["baseline"])],
                               "mean_delta": mean, "delta_interval_95": [mean - half, mean + half]}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


def interpolate(curve: list[tuple[float, float]], x: float) -> tuple[float, bool]:
    """Accuracy of the baseline's upper envelope at latency x (linear between points); False when x is outside."""
    pts = sorted(curve)
    xs, ys = np.array([p[0] for p in pts]), np.maximum.accumulate(np.array([p[1] for p in pts]))
    return float(np.interp(x, xs, ys)), bool(xs[0] <= x <= xs[-1])


def evolution_by_loss(spec: SpaceSpec, data, latency, band, supernet, choice_losses, *, seed: int, log_dir: Path) -> dict:
    """evolution_phase with the supernet's validation loss (cross-entropy, lower is better) as the fitness in place of
    its accuracy: on ~290 held-out digits, accuracies of good candidates tie within an image or two."""
    from deploykit.pipeline import FITNESS_CALIBRATION_IMAGES, search_split
    from deploykit.search import choice_prior, evolutionary_search
    from deploykit.supernet import score_arch
    fitness_data = search_split(data, seed)

    def fitness(arch: Arch) -> float:
        return -score_arch(supernet, arch, fitness_data, calibration_images=FITNESS_CALIBRATION_IMAGES)["loss"]

    result = evolutionary_search(spec, fitness, latency.predict_ms, *band, population=16, generations=6,
                                 prior=choice_prior(spec, choice_losses), seed=seed, progress=True,
                                 log_path=log_dir / "evolution-loss.jsonl")
    ranked = sorted(result.candidates, key=lambda c: (-c.accuracy, c.predicted_ms))  # c.accuracy holds -loss here
    return {"arch": ranked[0].arch.to_dict(), "predicted_ms": ranked[0].predicted_ms, "supernet_accuracy": None,
            "supernet_loss": -ranked[0].accuracy, "ranked": [c.to_dict() for c in ranked]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="epyc-2c-ort-t1")
    ap.add_argument("--budgets", type=int, default=5)
    ap.add_argument("--darts-budgets", type=int, default=3)
    ap.add_argument("--supernet-epochs", type=int, default=16)
    ap.add_argument("--darts-epochs", type=int, default=12)
    ap.add_argument("--finetune-epochs", type=int, default=10, help="evolution's fine-tuning (CLI default)")
    ap.add_argument("--darts-train-epochs", type=int, default=20, help="differentiable's training from scratch (CLI default)")
    ap.add_argument("--train-epochs", type=int, default=15, help="the fair comparison's from-scratch training")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="tools/out/search")
    ap.add_argument("--fitness", choices=("accuracy", "loss"), default="accuracy",
                    help="evolution's fitness: the supernet's held-out accuracy (the CLI's) or its cross-entropy")
    ap.add_argument("--rescore", metavar="BENCH_JSON",
                    help="skip the search: re-run an earlier run's fair comparison with --seeds seeds (e.g. 6)")
    ap.add_argument("--workers", type=int, default=2, help="--rescore: training processes (one thread each)")
    ap.add_argument("--baseline-from", metavar="RESCORE_JSON",
                    help="--rescore: take the baseline's accuracies from an earlier rescore with as many seeds "
                         "(same widths; its latencies stay the ones measured in BENCH_JSON's run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.rescore:
        return rescore(Path(args.rescore), args.seeds, args.workers, args.baseline_from)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    spec = DIGITS_SPACE
    data = load_dataset("digits", max(spec.resolutions), seed=args.seed)
    predictor = KernelPredictor.for_device(args.device)
    backend = get_backend("ort-cpu", threads=int(predictor.device.get("threads") or 1))
    lo, hi, how = space_range_ms(spec, predictor, backend)
    budgets = [float(lo + q * (hi - lo)) for q in np.linspace(0.15, 0.85, args.budgets)]
    print(f"feasible range {lo:.4f}-{hi:.4f} ms ({how}); budgets {[round(b, 4) for b in budgets]}", file=sys.stderr)
    latency = build_latency_model(spec, predictor, out / "latency_model.json", backend=backend,
                                  measurements=out / "latency_measurements.jsonl", seed=args.seed)
    supernet, trained = train_search_supernet(spec, data, width_mode="bilateral", epochs=args.supernet_epochs, seed=args.seed,
                                              progress=True, checkpoint=out / "supernet.ckpt")

    rows = []
    for i, budget in enumerate(budgets):
        band = (BAND[0] * budget, BAND[1] * budget)
        methods = ["evolution"] + (["differentiable"] if i < args.darts_budgets else [])
        for method in methods:
            run_dir = out / f"{method}-{i}"
            run_dir.mkdir(exist_ok=True)
            t0 = time.monotonic()
            if method == "evolution" and args.fitness == "loss":
                found = evolution_by_loss(spec, data, latency, band, supernet, trained["choice_losses"], seed=args.seed,
                                          log_dir=run_dir)
            elif method == "evolution":
                found = evolution_phase(spec, data, latency, band, supernet, trained["choice_losses"], population=16,
                                        generations=6, seed=args.seed, progress=True, log_dir=run_dir)
            else:
                found = differentiable_phase(spec, data, latency, budget, band, epochs=args.darts_epochs, latency_weight=1.0,
                                             seed=args.seed, progress=True, checkpoint=run_dir / "search.ckpt")
            verified = verify_phase(spec, found, latency, backend, budget, band, progress=True)
            arch = Arch.from_dict(verified["arch"])
            net, rep = train_phase(spec, data, arch, supernet=supernet if method == "evolution" else None,
                                   epochs=args.finetune_epochs if method == "evolution" else args.darts_train_epochs,
                                   seed=args.seed, progress=True,
                                   checkpoint=run_dir / f"finetune-{hashlib.sha1(arch.key.encode()).hexdigest()[:10]}.ckpt")
            exported = export_phase(run_dir, spec, arch, net, data, backend)
            m = exported["measured"]["latency_ms"]
            rows.append({"budget_ms": budget, "method": method, "arch": arch.to_dict(),
                         "predicted_ms": float(latency.predict_ms([arch])[0]), "measured_ms": m,
                         "ratio": m / budget, "in_target": bool(TARGET_LOW * budget <= m <= TARGET_HIGH * budget),
                         "candidates_measured": len(verified["tried"]), "cli_accuracy": rep["accuracy"],
                         "supernet_accuracy": found.get("supernet_accuracy"), "seconds": time.monotonic() - t0})
            print(json.dumps(rows[-1]), file=sys.stderr)

    # the fair comparison: everything from scratch with one recipe
    base_rows = []
    seen = set()
    for w in BASELINE_WIDTHS:
        s, a = baseline(spec, w)
        key = tuple(stage_channels(s, a))
        if key in seen:
            continue
        seen.add(key)
        ms = measure_arch(s, a, backend).latency_ms
        accs = scratch_accuracy(s, a, data, args.train_epochs, args.seeds)
        base_rows.append({"width": w, "channels": list(key), "measured_ms": ms, "accuracy": float(np.mean(accs)), "accs": accs})
        print(json.dumps(base_rows[-1]), file=sys.stderr)
    curve = [(b["measured_ms"], b["accuracy"]) for b in base_rows]
    for r in rows:
        accs = scratch_accuracy(spec, Arch.from_dict(r["arch"]), data, args.train_epochs, args.seeds)
        r["scratch_accuracy"], r["scratch_accs"] = float(np.mean(accs)), accs
        r["baseline_accuracy"], r["baseline_interpolated"] = interpolate(curve, r["measured_ms"])
        r["delta"] = r["scratch_accuracy"] - r["baseline_accuracy"]

    result = {"device": args.device, "host": platform.node(), "seed": args.seed, "range_ms": [lo, hi], "budgets_ms": budgets,
              "rows": rows, "baseline": base_rows, "latency_model": latency.info, "supernet_epochs": args.supernet_epochs,
              "train_epochs": args.train_epochs, "seeds": args.seeds, "seconds": time.monotonic() - t_start}
    (out / "bench.json").write_text(json.dumps(result, indent=1))

    print(f"\nfeasible range {lo:.4f}-{hi:.4f} ms ({how}); val images {len(data.val_y)}; from-scratch recipe "
          f"{args.train_epochs} epochs x {args.seeds} seeds\n")
    print("| budget ms | method | predicted ms | measured ms | measured / budget | in [0.85, 1.0] | accuracy (CLI recipe) "
          "| from scratch | uniform baseline at same latency | delta |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget_ms']:.4f} | {r['method']} | {r['predicted_ms']:.4f} | {r['measured_ms']:.4f} | {r['ratio']:.3f} | "
              f"{'yes' if r['in_target'] else 'NO'} | {r['cli_accuracy']:.2%} | {r['scratch_accuracy']:.2%} | "
              f"{r['baseline_accuracy']:.2%}{'' if r['baseline_interpolated'] else ' (extrapolated)'} | "
              f"{100 * r['delta']:+.2f} pt |")
    print("\n| uniform width | stage channels | measured ms | from scratch |")
    print("|---|---|---|---|")
    for b in base_rows:
        print(f"| {b['width']:g} | {b['channels']} | {b['measured_ms']:.4f} | {b['accuracy']:.2%} |")
    hits = sum(r["in_target"] for r in rows)
    wins = sum(r["delta"] > 0 for r in rows)
    print(f"\nin target band: {hits}/{len(rows)}; beat the uniform baseline: {wins}/{len(rows)}; "
          f"total {result['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
