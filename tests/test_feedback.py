"""`update_table`: a model's measured latency fed back into its device's table (real ONNX Runtime, no mocks).

The shipped table takes about 20 minutes to refit (600 calibration networks, each rebuilt and decomposed), so
these tests work on a reduced copy: 20 kernels per kind, no calibration networks (fits in seconds).
"""
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from deploykit import table as table_module
from deploykit import zoo
from deploykit.decompose import decompose
from deploykit.errors import DeployKitError
from deploykit.feedback import model_key, update_table
from deploykit.kernels import Kernel, propose_adaptive
from deploykit.onnx_io import input_specs, load_onnx
from deploykit.predictor import KernelPredictor, fit_predictor, predictor_path, table_digest
from deploykit.profile import _kernel_count
from deploykit.profilers import get_backend
from deploykit.protocol import KERNEL_PROTOCOL
from deploykit.stats import LatencyStats
from deploykit.table import LatencyTable, TableEntry, merge_tables, resolve_device

PER_KIND = 20


@pytest.fixture(scope="module")
def backend():
    return get_backend("ort-cpu", threads=1)


@pytest.fixture(scope="module")
def shipped() -> LatencyTable:
    return LatencyTable.load(resolve_device("epyc-2c-ort-t1"))


def _reduced(src: LatencyTable, path: Path, device: dict | None = None, per_kind: int = PER_KIND) -> Path:
    """The first per_kind kernels of every kind of src (no calibration networks), under src's or another device."""
    table = LatencyTable.create(path, path.stem, device or src.device, src.header.get("protocol"))
    seen: Counter = Counter()
    for e in src.entries.values():
        kind = e.kernel["kind"]
        if kind != "net" and seen[kind] < per_kind:
            seen[kind] += 1
            table.append(e)
    return path


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    """A conv net with widths and a resolution no table samples: its kernels are not all in the table."""
    net = nn.Sequential(nn.Conv2d(3, 12, 3, 1, 1), nn.BatchNorm2d(12), nn.ReLU(),
                        nn.Conv2d(12, 20, 3, 2, 1), nn.BatchNorm2d(20), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 7))
    model = load_onnx(zoo.export_onnx(net, (1, 3, 22, 22), tmp_path_factory.mktemp("net") / "small.onnx"))
    return model, input_specs(model)


@pytest.fixture(scope="module")
def measured(backend, small_net):
    model, inputs = small_net
    return backend.measure(model, inputs)


@pytest.fixture(scope="module")
def updated(tmp_path_factory, shipped, small_net, measured, backend):
    """A reduced copy of the shipped table with a fitted predictor, before and after one update_table."""
    path = _reduced(shipped, tmp_path_factory.mktemp("tables") / "dev.jsonl")
    fit_predictor(LatencyTable.load(path), progress=False).save_beside(path)
    before_bytes = path.read_bytes()
    before = LatencyTable.load(path)
    model, inputs = small_net
    report = update_table(str(path), model, inputs, measured, backend)
    return path, before_bytes, before, report


def test_update_appends_missing_kernels_and_model_entry(updated, small_net, measured):
    path, before_bytes, before, report = updated
    model, inputs = small_net
    dec = decompose(model, inputs, threads=1)
    keys = {mk.kernel.key for mk in dec.kernels}
    missing = keys - set(before.entries)
    assert missing, "the test net should have kernels the table lacks"
    assert report["kernels_added"] + report["kernels_failed"] == len(missing) and report["kernels_added"] >= 1

    after = LatencyTable.load(path)
    assert path.read_bytes().startswith(before_bytes)  # append-only: nothing before was rewritten
    assert set(after.entries) == set(before.entries) | {k for k in missing if k in after.entries}
    for key in missing & set(after.entries):
        e = after.entries[key]
        assert e.kernel == Kernel.from_key(key).to_dict() and e.stats.median_ms > 0 and e.stats.count >= 1

    sha = hashlib.sha256(model.SerializeToString()).hexdigest()[:16]
    assert report["model_entry"] == f"model:sha={sha}" == model_key(model, inputs)
    entry = after.models[report["model_entry"]]
    assert report["model_entry"] not in after.entries  # kernel consumers never see it
    assert entry.kernel["kind"] == "model" and entry.stats == measured.stats
    assert [Kernel.from_dict(k).key for k, _ in entry.kernels] == [mk.kernel.key for mk in dec.kernels]
    assert [f for _, f in entry.kernels] == [mk.fused for mk in dec.kernels]
    assert json.loads(path.read_text().splitlines()[-1])["key"] == report["model_entry"]

    assert report["table"] == str(path) and report["copied_from_shipped"] is False
    assert report["measured_ms"] == measured.latency_ms
    for when in ("before", "after"):
        pred = report[f"predicted_{when}_ms"]
        assert pred > 0 and report[f"error_{when}"] == pytest.approx((pred - measured.latency_ms) / measured.latency_ms)
    assert report["seconds"] > 0


def test_predictor_is_refit_with_the_model_as_calibration(updated, small_net):
    path, _, _, report = updated
    doc = json.loads(predictor_path(path).read_text())
    table = LatencyTable.load(path)
    assert doc["table_digest"] == table_digest(table)  # refit on the grown table: not stale
    assert report["model_entry"] in doc["overhead"]["calibration"]["nets"]
    model, inputs = small_net
    pred = KernelPredictor.for_device(str(path)).predict_onnx(model, inputs)
    assert pred.latency_ms == pytest.approx(report["predicted_after_ms"])


def test_second_update_adds_nothing(updated, small_net, backend, capsys):
    path, _, _, first = updated
    text = path.read_bytes()
    predictor_text = predictor_path(path).read_bytes()
    model, inputs = small_net
    again = backend.measure(model, inputs, KERNEL_PROTOCOL)
    report = update_table(str(path), model, inputs, again, backend)
    assert report["kernels_added"] == 0 and report["model_entry"] == first["model_entry"]
    assert report["model_entry_added"] is False
    assert path.read_bytes() == text and predictor_path(path).read_bytes() == predictor_text
    err = capsys.readouterr().err
    assert "already in" in err and "kept the first" in err
    assert report["predicted_after_ms"] == pytest.approx(first["predicted_after_ms"])


def test_model_entries_stay_out_of_kernel_consumers(updated, tmp_path):
    path, _, before, report = updated
    table = LatencyTable.load(path)
    assert table.validate() == [] and "model" not in table.kinds()
    assert _kernel_count(table) == len(table.entries)  # profile --resume counts kernels only
    have = [(Kernel.from_dict(e.kernel), e.stats.median_ms) for e in table.entries.values()]  # the adaptive sampler
    assert len(propose_adaptive(have, 3, np.random.default_rng(0), exclude_keys=set(table.entries))) == 3
    merged = merge_tables([table, before], name="m")
    assert set(merged.models) == {report["model_entry"]}
    back = LatencyTable.load(merged.write(tmp_path / "m.jsonl"))
    assert set(back.models) == {report["model_entry"]} and back.models[report["model_entry"]].kernels == \
        table.models[report["model_entry"]].kernels


def test_fit_calibrates_on_model_entries(shipped, tmp_path):
    """Model entries enter the least-squares calibration: 10 of them at 0.8 x their summed kernels + 0.02 ms."""
    path = _reduced(shipped, tmp_path / "cal.jsonl")
    base = fit_predictor(LatencyTable.load(path), progress=False)
    assert base.doc["overhead"]["calibration"]["nets"] == []
    table = LatencyTable.load(path)
    kernels = [Kernel.from_dict(e.kernel) for e in table.entries.values() if e.kernel["kind"] in ("conv", "dwconv", "add")]
    rng = np.random.default_rng(0)
    for i in range(10):
        ks = [kernels[j] for j in rng.choice(len(kernels), size=int(rng.integers(3, 12)), replace=False)]
        ms = 0.8 * float(base.kernel_ms(ks).sum()) + 0.02
        table.append(TableEntry(key=f"model:sha={i:016x}", kernel={"kind": "model", "sha": f"{i:016x}"},
                                stats=LatencyStats(median_ms=ms, p90_ms=ms, std_ms=0.0, mean_ms=ms, count=10),
                                kernels=[[k.to_dict(), False] for k in ks]))
    refit = fit_predictor(LatencyTable.load(path), progress=False)
    calib = refit.doc["overhead"]["calibration"]
    assert calib["nets"] == [f"model:sha={i:016x}" for i in range(10)] and calib["n"] == 10
    assert refit.doc["kinds"] == base.doc["kinds"]  # model entries are no kernels: the regressors are unchanged
    coef = refit.doc["overhead"]["coef"]
    assert coef["kernel"] == pytest.approx(0.8, rel=1e-3) and coef["const"] == pytest.approx(0.02, rel=1e-2)


def test_old_tables_load_and_fit_as_before(shipped, tmp_path):
    # the shipped table (no model entries) keeps its digest: its predictor is not reported stale
    doc = json.loads(predictor_path(resolve_device("epyc-2c-ort-t1")).read_text())
    assert shipped.models == {} and doc["table_digest"] == table_digest(shipped)
    h = hashlib.sha256()  # the digest as it was computed before model entries existed
    for key in sorted(shipped.entries):
        h.update(f"{key}={shipped.entries[key].stats.median_ms:.9g}\n".encode())
    assert table_digest(shipped) == h.hexdigest()[:16]
    path = _reduced(shipped, tmp_path / "old.jsonl", per_kind=12)
    old = LatencyTable.load(path)
    assert old.models == {} and old.validate() == []
    assert old.write(tmp_path / "again.jsonl").read_bytes() == path.read_bytes()
    fitted = fit_predictor(old, progress=False)
    assert set(fitted.doc["kinds"]) == set(old.kinds()) and fitted.doc["overhead"]["calibration"]["nets"] == []


def test_shipped_table_is_copied_not_written(shipped, small_net, measured, backend, tmp_path, monkeypatch, capsys):
    package = tmp_path / "package"
    src = _reduced(shipped, package / "tiny.jsonl", per_kind=12)
    fit_predictor(LatencyTable.load(src), progress=False).save_beside(src)
    originals = {p: p.read_bytes() for p in package.iterdir()}
    monkeypatch.setattr(table_module, "shipped_tables", lambda: {"tiny": src})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model, inputs = small_net
    report = update_table("tiny", model, inputs, measured, backend)
    assert {p: p.read_bytes() for p in package.iterdir()} == originals  # the package is never written
    copy = Path("latency_tables") / "tiny.jsonl"
    assert report["copied_from_shipped"] is True and Path(report["table"]) == copy
    assert resolve_device("tiny") == copy  # the local copy now wins the lookup
    assert report["model_entry"] in LatencyTable.load(copy).models and predictor_path(copy).exists()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "shipped" in ln]
    assert len(lines) == 1 and str(copy) in lines[0]


def test_shipped_table_in_its_own_folder_is_refused(shipped, small_net, measured, backend, tmp_path, monkeypatch):
    """Run from a source checkout, ./latency_tables/ is the package folder: there is nowhere to copy to."""
    src = _reduced(shipped, tmp_path / "latency_tables" / "tiny.jsonl", per_kind=2)
    before = src.read_bytes()
    monkeypatch.setattr(table_module, "shipped_tables", lambda: {"tiny": src})
    monkeypatch.chdir(tmp_path)
    model, inputs = small_net
    with pytest.raises(DeployKitError, match="shipped inside deploykit.*run from another directory"):
        update_table("tiny", model, inputs, measured, backend)
    assert src.read_bytes() == before and not predictor_path(src).exists()


def test_table_of_another_device_is_refused(shipped, small_net, measured, backend, tmp_path):
    path = _reduced(shipped, tmp_path / "other.jsonl", device={**shipped.device, "cpu_model": "Some Other CPU"}, per_kind=2)
    before = path.read_bytes()
    model, inputs = small_net
    with pytest.raises(DeployKitError, match="another device"):
        update_table(str(path), model, inputs, measured, backend)
    assert path.read_bytes() == before and not predictor_path(path).exists()


def test_export_update_table_feeds_a_missed_prediction_back(tmp_path, shipped):
    """`deploykit export --update-table` on this machine's (reduced) table: a prediction off by more than 10% is fed
    back (the model's kernels and a model entry land in the table), one within 10% leaves the table alone."""
    from tests.conftest import run_cli

    path = _reduced(shipped, tmp_path / "dev.jsonl")
    fit_predictor(LatencyTable.load(path), progress=False).save_beside(path)
    before = path.read_bytes()
    proc = run_cli("export", "--model", "tests.export_models:resnet_basic", "--example-shape", "1,3,32,32",
                   "--device", path, "--update-table", "--verify-inputs", "2", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["device"]["table"] == "dev" and m["predicted_latency_ms"] is not None
    update = m["table_update"]
    if abs(m["prediction_error"]) > 0.10:
        table = LatencyTable.load(path)
        assert update["model_entry"] in table.models and update["table"] == str(path)
        assert len(table.entries) == len(LatencyTable.load(path).entries) >= update["kernels_added"]
        assert path.read_bytes().startswith(before)  # appended, never rewritten
    else:
        assert "skipped" in update and path.read_bytes() == before
