"""Export the held-out evaluation networks (`deploykit.netfamilies.eval_specs()`) as ONNX files.

Usage: python tools/make_eval_set.py --out DIR [--families a,b] [--limit N] [--overwrite]

Writes DIR/<spec.name>.onnx (input 1x3xRxR, opset 17, BatchNorm folded), keeping files already there unless
--overwrite. Each new file is checked: ONNX Runtime's output on a random input must match PyTorch's; the
command exits 1 when one does not. A bad --families or --limit: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deploykit import zoo
from deploykit.errors import DeployKitError
from deploykit.netfamilies import FAMILIES, EvalSpec, eval_specs

CHECK_TOL = 1e-3  # max |onnxruntime - torch|, relative to the largest |torch| output


def select(families: str | None, limit: int | None) -> list[EvalSpec]:
    specs = eval_specs()
    if families is not None:
        names = [f.strip() for f in families.split(",") if f.strip()]
        unknown = [n for n in names if n not in FAMILIES]
        if unknown or not names:
            raise DeployKitError(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(map(repr, unknown))} in "
                                 f"--families: choose from {', '.join(FAMILIES)}")
        specs = [s for s in specs if s.family in names]
    if limit is not None:
        if limit < 1:
            raise DeployKitError(f"--limit must be at least 1, got {limit}")
        specs = specs[:limit]
    return specs


def export_checked(spec: EvalSpec, path: Path) -> float:
    """Export `spec` to `path`; returns ONNX Runtime's error relative to the output scale."""
    import onnxruntime as ort

    model = spec.build()
    zoo.export_onnx(model, spec.input_shape, path)
    x = torch.randn(*spec.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the .onnx files")
    ap.add_argument("--families", help=f"comma-separated subset of: {', '.join(FAMILIES)}")
    ap.add_argument("--limit", type=int, help="export only the first N selected networks")
    ap.add_argument("--overwrite", action="store_true", help="re-export files that already exist")
    args = ap.parse_args(argv)
    try:
        specs = select(args.families, args.limit)
    except DeployKitError as e:
        print(f"make_eval_set: error: {e}", file=sys.stderr)
        return e.exit_code

    out = Path(args.out)
    t0 = time.monotonic()
    written, skipped, failed, worst = 0, 0, [], 0.0
    torch.set_num_threads(1)
    for spec in tqdm(specs, desc="exporting", unit="net", file=sys.stderr):
        path = out / f"{spec.name}.onnx"
        if path.exists() and not args.overwrite:
            skipped += 1
            continue
        err = export_checked(spec, path)
        worst = max(worst, err)
        written += 1
        if not err <= CHECK_TOL:
            failed.append(f"{spec.name} ({err:.2g})")
    check = f"; worst onnxruntime vs torch error {worst:.1e} (relative)" if written else ""
    print(f"{out}: {written} exported, {skipped} already there, {len(specs)} selected of {len(eval_specs())} "
          f"in {time.monotonic() - t0:.0f} s{check}")
    if failed:
        print(f"make_eval_set: onnxruntime disagrees with torch beyond {CHECK_TOL:g}: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
