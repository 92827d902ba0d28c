"""Build the calibration networks' structure cache beside a table (NAME.nets.json), in parallel.

  python tools/cache_net_structures.py --device epyc-2c-ort-t1 [--jobs 2]

`deploykit predictor fit` (and `export --update-table`) rebuild and decompose every calibration network of a
table, about 2.5 s each (600 networks: 25 minutes on one core); with the cache, a refit takes the regressors'
time only. The cache is checked against the code and torch version that made it, so a stale one is rebuilt.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _one(args):
    key, threads = args
    import torch

    from deploykit.kernels import Kernel
    from deploykit.predictor import net_structure

    torch.set_num_threads(1)
    return key, net_structure(Kernel.from_key(key), threads)


def main() -> int:
    from tqdm import tqdm

    from deploykit.fileio import atomic_write
    from deploykit.predictor import NET_CACHE_FORMAT, _structure_identity, net_cache_path
    from deploykit.table import LatencyTable, resolve_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", required=True)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    path = resolve_device(args.device)
    table = LatencyTable.load(path)
    threads = int(table.device.get("threads") or 1)
    keys = [k for k, e in table.entries.items() if e.kernel["kind"] == "net"]
    nets = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for key, structure in tqdm(pool.map(_one, [(k, threads) for k in keys]), total=len(keys), desc="nets"):
            nets[key] = structure
    out = net_cache_path(path)
    atomic_write(out, json.dumps({"format": NET_CACHE_FORMAT, "identity": _structure_identity(threads), "nets": nets},
                                 separators=(",", ":")))
    print(f"wrote {out}: {len(nets)} networks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
