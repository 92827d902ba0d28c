"""Numerical verification of an exported artifact against its source model, with thresholds per precision.

Per output, over all verification inputs:
  max_abs_error   max |artifact - reference|
  max_rel_error   max_abs_error / max |reference| (relative to the output's scale; an element-wise ratio explodes
                  on outputs near zero and says nothing)
  cosine          the lowest cosine similarity of artifact and reference over the inputs (each input flattened)
  top1_agreement  for classifier outputs ([batch, classes], classes > 1): fraction of rows with the same argmax
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Per precision: max_abs_error may reach `abs` x max(1, max |reference|) (absolute for outputs within +-1, relative
# beyond: float32 reassociation errors grow with magnitude); cosine and top-1 have floors. FP32's `abs` is the export
# target of 1e-4. INT8 is held to the agreement that matters for a quantized classifier, not to bit-closeness.
THRESHOLDS = {
    "fp32": {"abs": 1e-4, "cosine": 0.99999, "top1": None},
    "fp16": {"abs": 2e-2, "cosine": 0.999, "top1": 0.95},
    "int8": {"abs": None, "cosine": 0.98, "top1": 0.90},
}


@dataclass
class OutputCheck:
    name: str
    shape: list[int]
    max_abs_error: float
    max_rel_error: float
    cosine: float
    top1_agreement: float | None
    reference_max_abs: float
    failures: list[str]
    badness: float  # the worst metric's distance past (or towards) its threshold: the ranking for "worst output"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Verification:
    precision: str
    inputs: int
    passed: bool
    outputs: list[OutputCheck]
    thresholds: dict

    @property
    def worst(self) -> OutputCheck:
        return max(self.outputs, key=lambda o: o.badness)

    @property
    def max_abs_error(self) -> float:
        return max(o.max_abs_error for o in self.outputs)

    def summary(self) -> str:
        w = self.worst
        parts = [f"max_abs_error {w.max_abs_error:.3g}", f"max_rel_error {w.max_rel_error:.3g}", f"cosine {w.cosine:.6f}"]
        if w.top1_agreement is not None:
            parts.append(f"top-1 agreement {w.top1_agreement:.1%}")
        return f"output '{w.name}' ({', '.join(parts)})"

    def to_dict(self) -> dict:
        return {"precision": self.precision, "inputs": self.inputs, "passed": self.passed, "thresholds": self.thresholds,
                "max_abs_error": self.max_abs_error, "worst_output": self.worst.name,
                "outputs": [o.to_dict() for o in self.outputs]}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def compare(reference: list[list[np.ndarray]], artifact: list[list[np.ndarray]], names: list[str],
            precision: str) -> Verification:
    """`reference[i][j]`, `artifact[i][j]`: output j on input i. Shapes must agree (a mismatch fails that output)."""
    limits = THRESHOLDS[precision]
    checks = []
    for j, name in enumerate(names):
        refs = [r[j] for r in reference]
        arts = [a[j] for a in artifact]
        shape = list(refs[0].shape)
        if any(r.shape != a.shape for r, a in zip(refs, arts)):
            got = next(a.shape for r, a in zip(refs, arts) if r.shape != a.shape)
            checks.append(OutputCheck(name, shape, float("inf"), float("inf"), 0.0, None, 0.0,
                                      [f"shape {list(got)} != {shape}"], float("inf")))
            continue
        ref_max = max(float(np.abs(r).max()) if r.size else 0.0 for r in refs)
        max_abs = max(float(np.abs(a.astype(np.float64) - r).max()) if r.size else 0.0 for r, a in zip(refs, arts))
        if not np.isfinite(max_abs):
            max_abs = float("inf")
        cos = min(_cosine(a, r) for r, a in zip(refs, arts))
        top1 = None
        if refs[0].ndim == 2 and refs[0].shape[1] > 1:
            rows = [(r.argmax(1) == a.argmax(1)) for r, a in zip(refs, arts)]
            top1 = float(np.concatenate(rows).mean())
        failures, badness = [], []
        if limits["abs"] is not None:
            bound = limits["abs"] * max(1.0, ref_max)
            badness.append(max_abs / bound - 1.0)
            if not max_abs <= bound:
                failures.append(f"max_abs_error {max_abs:.3g} > {bound:.3g}")
        floor = limits["cosine"]
        badness.append((1.0 - cos) / (1.0 - floor) - 1.0)
        if not cos >= floor:
            failures.append(f"cosine {cos:.6f} < {floor}")
        if limits["top1"] is not None and top1 is not None:
            badness.append((1.0 - top1) / (1.0 - limits["top1"]) - 1.0)
            if top1 < limits["top1"]:
                failures.append(f"top-1 agreement {top1:.1%} < {limits['top1']:.0%}")
        checks.append(OutputCheck(name, shape, max_abs, max_abs / ref_max if ref_max > 0 else max_abs, cos, top1,
                                  ref_max, failures, max(badness)))
    return Verification(precision, len(reference), all(not c.failures for c in checks), checks, dict(limits))


def verification_inputs(shape: tuple[int, ...], n: int, *, images: np.ndarray | None = None, seed: int = 0,
                        extra_batch: int | None = None) -> list[np.ndarray]:
    """`n` inputs of `shape`: the user's images where given (the first n), else seeded standard-normal noise; plus
    one batch of `extra_batch` (a dynamic-batch artifact must handle batches other than the example's)."""
    rng = np.random.default_rng(seed)
    b = shape[0]
    if images is not None and len(images):
        xs = [np.ascontiguousarray(images[np.arange(i * b, (i + 1) * b) % len(images)], dtype=np.float32) for i in range(n)]
    else:
        xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]
    if extra_batch:
        rows = np.concatenate(xs, axis=0)
        xs.append(np.ascontiguousarray(rows[np.arange(extra_batch) % len(rows)]))
    return xs
