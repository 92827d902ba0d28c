import json

import pytest

from deploykit.errors import DeployKitError
from deploykit.stats import LatencyStats
from deploykit.table import FORMAT_VERSION, LatencyTable, TableEntry, merge_tables, resolve_device, shipped_tables

DEVICE = {"backend": "ort-cpu", "cpu_model": "test cpu", "threads": 1, "precision": "fp32"}


def _entry(key, median, count=10):
    return TableEntry(key=key, kernel={"kind": key.split(":")[0]},
                      stats=LatencyStats(median_ms=median, p90_ms=median * 1.1, std_ms=0.01, mean_ms=median, count=count))


def _table(path, n=3, device=DEVICE):
    t = LatencyTable.create(path, path.stem, device)
    for i in range(n):
        t.append(_entry(f"conv:i={i}", 1.0 + i))
    return t


def test_roundtrip_and_header(tmp_path):
    t = _table(tmp_path / "dev.jsonl")
    back = LatencyTable.load(t.path)
    assert back.header["format_version"] == FORMAT_VERSION and back.device == DEVICE
    assert list(back.entries) == ["conv:i=0", "conv:i=1", "conv:i=2"]
    assert back.entries["conv:i=1"].stats.median_ms == 2.0 and back.validate() == []
    # JSON Lines, no pickle: every line parses on its own
    assert all(json.loads(line) for line in t.path.read_text().splitlines())


def test_create_never_overwrites(tmp_path):
    t = _table(tmp_path / "dev.jsonl")
    before = t.path.read_bytes()
    with pytest.raises(DeployKitError, match="already exists: pass --resume"):
        LatencyTable.create(t.path, "dev", DEVICE)
    assert t.path.read_bytes() == before


def test_torn_last_line_is_tolerated_and_repaired(tmp_path):
    t = _table(tmp_path / "dev.jsonl")
    with open(t.path, "a") as f:
        f.write('{"key": "conv:i=9", "kernel": {"ki')  # killed mid-write
    back = LatencyTable.load(t.path)
    assert back.torn_tail and len(back.entries) == 3
    assert any("torn" in p for p in back.validate())
    back.append(_entry("conv:i=3", 4.0))
    again = LatencyTable.load(t.path)
    assert not again.torn_tail and list(again.entries)[-1] == "conv:i=3" and len(again.entries) == 4


def test_corrupt_middle_line_refused(tmp_path):
    t = _table(tmp_path / "dev.jsonl")
    lines = t.path.read_text().splitlines()
    lines[2] = "garbage"
    t.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DeployKitError, match="corrupt at line 3"):
        LatencyTable.load(t.path)


@pytest.mark.parametrize("header,match", [
    ('{"format": "something else"}', "not a deploykit latency table"),
    ('{"format": "deploykit-latency-table", "format_version": 99, "device": {}}', "format_version 99"),
    ("not json", "not a deploykit latency table"),
])
def test_bad_headers(tmp_path, header, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(header + "\n")
    with pytest.raises(DeployKitError, match=match):
        LatencyTable.load(p)


def test_device_mismatch(tmp_path):
    t = _table(tmp_path / "dev.jsonl")
    with pytest.raises(DeployKitError, match="another device"):
        t.check_device(dict(DEVICE, threads=4))
    t.check_device(dict(DEVICE, python="3.12"))  # not an identity field


def test_merge(tmp_path):
    a = _table(tmp_path / "a.jsonl", n=2)
    b = LatencyTable.create(tmp_path / "b.jsonl", "b", DEVICE)
    b.append(_entry("conv:i=1", 9.0, count=50))  # larger sample wins
    b.append(_entry("conv:i=7", 3.0))
    m = merge_tables([a, b], name="ab")
    assert set(m.entries) == {"conv:i=0", "conv:i=1", "conv:i=7"}
    assert m.entries["conv:i=1"].stats.median_ms == 9.0
    out = m.write(tmp_path / "ab.jsonl")
    assert len(LatencyTable.load(out).entries) == 3
    other = _table(tmp_path / "c.jsonl", device=dict(DEVICE, cpu_model="other"))
    with pytest.raises(DeployKitError, match="different devices"):
        merge_tables([a, other])
    assert len(merge_tables([a, other], force=True).entries) == 3


def test_resolve_device(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latency_tables").mkdir()
    _table(tmp_path / "latency_tables" / "mine.jsonl")
    assert resolve_device("mine").name == "mine.jsonl"
    assert resolve_device(str(tmp_path / "latency_tables" / "mine.jsonl")).is_file()
    with pytest.raises(DeployKitError, match="no latency table for device 'pixel7': run `deploykit profile --name pixel7` first"):
        resolve_device("pixel7")
    with pytest.raises(DeployKitError, match="not found"):
        resolve_device("nowhere/x.jsonl")


def test_shipped_tables_are_valid():
    tables = shipped_tables()
    assert tables, "deploykit ships at least one real table"
    for name, path in tables.items():
        t = LatencyTable.load(path)
        assert t.validate() == [], name
        assert len(t.entries) >= 1500 and t.device["backend"] == "ort-cpu"
