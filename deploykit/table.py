"""Device latency tables: JSON Lines, versioned, append-only while profiling.

Line 1 is the header: {"format": "deploykit-latency-table", "format_version": 1, "name", "device"
(the fingerprint), "protocol", "created_utc", "deploykit_version"}. Every further line is one
measured kernel: {"key", "kernel", "median_ms", "p90_ms", "std_ms", "mean_ms", "count", "spread",
"noisy", "measured_utc"}. A line is appended and flushed as soon as its measurement finishes, so a
killed profile loses at most the measurement in flight; a torn last line (kill -9 during the write)
is the only damage that is tolerated, and `repair` removes just that line. See latency_tables/FORMAT.md.

Entries of kind `model` (a user's model measured end to end, `deploykit.feedback`) are not kernels: they
are kept apart in `LatencyTable.models`, so everything that reads `entries` sees kernels and `net`s only.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import __version__
from .errors import DeployKitError
from .fileio import atomic_write
from .fingerprint import mismatches
from .stats import LatencyStats

FORMAT = "deploykit-latency-table"
FORMAT_VERSION = 1
SUFFIX = ".jsonl"
LOCAL_DIR = Path("latency_tables")
MODEL_KIND = "model"  # a measured model (calibration only); never a Kernel


@dataclass
class TableEntry:
    key: str
    kernel: dict
    stats: LatencyStats
    spread: float = 0.0
    noisy: bool = False
    measured_utc: str = ""
    # calibration networks: [op_type, latency_ms, [indices of the original nodes it covers]] per node that ran
    layers: list | None = None
    # `model` entries: [kernel dict, fused] per kernel of the model's decomposition
    kernels: list | None = None

    @property
    def is_model(self) -> bool:
        return self.kernel.get("kind") == MODEL_KIND

    def to_json(self) -> dict:
        d = {"key": self.key, "kernel": self.kernel, **self.stats.to_dict(), "spread": round(self.spread, 5),
             "noisy": self.noisy, "measured_utc": self.measured_utc}
        if self.layers is not None:
            d["layers"] = self.layers
        if self.kernels is not None:
            d["kernels"] = self.kernels
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TableEntry":
        kernels = d.get("kernels")
        if kernels is not None and not all(isinstance(k, list) and len(k) == 2 and isinstance(k[0], dict) for k in kernels):
            raise ValueError("kernels must be [kernel, fused] pairs")
        return cls(key=str(d["key"]), kernel=dict(d["kernel"]), stats=LatencyStats.from_dict(d),
                   spread=float(d.get("spread", 0.0)), noisy=bool(d.get("noisy", False)),
                   measured_utc=str(d.get("measured_utc", "")), layers=d.get("layers"), kernels=kernels)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class LatencyTable:
    path: Path
    header: dict
    entries: dict[str, TableEntry] = field(default_factory=dict)  # kernels and calibration networks (`net`)
    models: dict[str, TableEntry] = field(default_factory=dict)  # measured models (kind `model`), calibration only
    torn_tail: bool = False  # the file ends in a partial line from an interrupted write

    @property
    def name(self) -> str:
        return str(self.header.get("name", self.path.stem))

    @property
    def device(self) -> dict:
        return dict(self.header.get("device", {}))

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        path = Path(path)
        if not path.is_file():
            raise DeployKitError(f"latency table not found: {path}: run `deploykit profile` to create one, or check the path")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DeployKitError(f"cannot read latency table {path}: {e.strerror}") from None
        lines = raw.split(b"\n")
        torn = False
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            # no final newline: the last line was being written when the writer died
            try:
                json.loads(lines[-1])
            except ValueError:
                lines.pop()
                torn = True
        if not lines:
            raise DeployKitError(f"latency table {path} is empty: delete it and run `deploykit profile` again")
        header = cls._parse_header(path, lines[0])
        table = cls(path=path, header=header, torn_tail=torn)
        for no, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                entry = TableEntry.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError):
                raise DeployKitError(
                    f"latency table {path} is corrupt at line {no}: restore it from a copy, or delete the line "
                    "(only a torn last line is repaired automatically)"
                ) from None
            table._store(entry)
        return table

    @staticmethod
    def _parse_header(path: Path, line: bytes) -> dict:
        try:
            header = json.loads(line)
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise DeployKitError(f"{path} is not a deploykit latency table (bad header): pass a table written by "
                                 "`deploykit profile`")
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise DeployKitError(
                f"latency table {path} has format_version {version!r}, this deploykit reads {FORMAT_VERSION}: "
                "re-profile the device or use a matching deploykit version"
            )
        if not isinstance(header.get("device"), dict):
            raise DeployKitError(f"latency table {path} has no device fingerprint: re-profile the device")
        return header

    # -- writing ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, name: str, device: dict, protocol: dict | None = None) -> "LatencyTable":
        """A new table holding only its header; refuses to replace an existing file."""
        path = Path(path)
        if path.exists():
            raise DeployKitError(f"latency table {path} already exists: pass --resume to continue it, or choose another --name")
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "device": device,
                  "protocol": protocol or {}, "created_utc": utc_now(), "deploykit_version": __version__}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(header, sort_keys=True) + "\n")
        return cls(path=path, header=header)

    def repair(self) -> None:
        """Cut a torn last line off the file (it held no finished measurement)."""
        if not self.torn_tail:
            return
        raw = self.path.read_bytes()
        with open(self.path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
        self.torn_tail = False

    def append(self, entry: TableEntry) -> None:
        if self.torn_tail:
            self.repair()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry.to_json(), sort_keys=True) + "\n")
            f.flush()  # in the kernel's hands now: survives kill -9 of this process
        self._store(entry)

    def _store(self, entry: TableEntry) -> None:
        (self.models if entry.is_model else self.entries)[entry.key] = entry

    def write(self, path: str | os.PathLike | None = None) -> Path:
        """Write the whole table atomically (merge output, rewrites)."""
        path = Path(path) if path is not None else self.path
        lines = [json.dumps(self.header, sort_keys=True)] + [json.dumps(e.to_json(), sort_keys=True)
                                                             for e in (*self.entries.values(), *self.models.values())]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, "\n".join(lines) + "\n")
        return path

    # -- checks and summaries ----------------------------------------------------------------
    def check_device(self, device: dict) -> None:
        diff = mismatches(self.device, device)
        if diff:
            raise DeployKitError(
                f"latency table {self.path} was measured on another device/config ({'; '.join(diff[:3])}): "
                "profile this device under a new --name, or match its settings"
            )

    def validate(self) -> list[str]:
        """Problems a loadable table can still have; empty when it is sound."""
        problems = []
        if self.torn_tail:
            problems.append("last line is torn (interrupted write): `deploykit profile --resume` repairs it")
        for e in self.entries.values():
            s = e.stats
            if not (s.median_ms > 0 and s.p90_ms >= 0 and s.std_ms >= 0 and s.count >= 1):
                problems.append(f"entry {e.key}: implausible latency {s.to_dict()}")
            if "kind" not in e.kernel:
                problems.append(f"entry {e.key}: kernel has no kind")
        for e in self.models.values():
            s = e.stats
            if not (s.median_ms > 0 and s.p90_ms >= 0 and s.std_ms >= 0 and s.count >= 1):
                problems.append(f"model entry {e.key}: implausible latency {s.to_dict()}")
            if not e.kernels or any("kind" not in k for k, _ in e.kernels):
                problems.append(f"model entry {e.key}: no kernel list (every kernel needs a kind)")
        if not self.entries:
            problems.append("table holds no measurements")
        return problems

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries.values():
            k = str(e.kernel.get("kind", "?"))
            out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items()))


def merge_tables(tables: list[LatencyTable], name: str | None = None, force: bool = False) -> LatencyTable:
    """One table from several of the same device; a kernel measured twice keeps the larger sample."""
    if not tables:
        raise DeployKitError("nothing to merge: pass at least two tables")
    base = tables[0]
    for t in tables[1:]:
        diff = mismatches(base.device, t.device)
        if diff and not force:
            raise DeployKitError(
                f"cannot merge {t.path} into {base.path}: different devices ({'; '.join(diff[:3])}); pass --force to merge anyway"
            )
    header = dict(base.header, name=name or base.name, created_utc=utc_now(),
                  merged_from=[str(t.path) for t in tables])
    merged = LatencyTable(path=base.path, header=header)
    for t in tables:
        for key, e in (*t.entries.items(), *t.models.items()):
            where = merged.models if e.is_model else merged.entries
            old = where.get(key)
            if old is None or (e.stats.count, e.measured_utc) > (old.stats.count, old.measured_utc):
                where[key] = e
    return merged


def shipped_tables() -> dict[str, Path]:
    root = resources.files("deploykit.latency_tables")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(SUFFIX)}


def local_tables(directory: Path = LOCAL_DIR) -> dict[str, Path]:
    return {p.stem: p for p in sorted(directory.glob(f"*{SUFFIX}"))} if directory.is_dir() else {}


def resolve_device(device: str) -> Path:
    """A table's path, or a device name looked up in ./latency_tables/ and then in the shipped tables."""
    p = Path(device)
    if p.suffix == SUFFIX or os.sep in device or p.is_file():
        if not p.is_file():
            raise DeployKitError(f"latency table not found: {p}: check the path, or run `deploykit profile` to create it")
        return p
    for found in (local_tables(), shipped_tables()):
        if device in found:
            return found[device]
    known = sorted(set(local_tables()) | set(shipped_tables()))
    raise DeployKitError(
        f"no latency table for device {device!r}: run `deploykit profile --name {device}` first"
        + (f" (known devices: {', '.join(known)})" if known else "")
    )
