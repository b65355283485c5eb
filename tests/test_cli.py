"""The ``leanloss`` command run as a user runs it: ``python -m leanloss tour`` / ``bench``."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import leanloss
from leanloss import bench, cli, tour

REPO = Path(__file__).resolve().parents[1]
REAL_BENCH = REPO / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _leanloss(*args, env=None, cwd=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "leanloss", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def _row(output: str, label: str) -> str:
    rows = [line for line in output.splitlines() if line.startswith("  " + label)]
    assert rows, f"no row {label!r} in the tour output"
    return rows[0]


# --------------------------------------------------------------------------------------------
# tour
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_tour():
    return _leanloss("tour")


def _seed_values():
    """(row label, torch's value) for the seed notebooks' numbers, computed by torch now."""
    y = torch.tensor([2, 3])
    t = torch.tensor([1.0, 0.0])
    return [
        ("unsure logits, y=[2, 3]", F.cross_entropy(torch.tensor(tour.UNSURE_LOGITS), y)),
        ("confident (10 on y), y=[2, 3]", F.cross_entropy(torch.tensor(tour.CONFIDENT_LOGITS), y)),
        ("bce([0.3, 0.7], [1, 0])", F.binary_cross_entropy(torch.tensor([0.3, 0.7]), t)),
        ("bce([0.9, 0.1], [1, 0])", F.binary_cross_entropy(torch.tensor([0.9, 0.1]), t)),
        ("bce_logits([-50, 50], [1, 0])", F.binary_cross_entropy_with_logits(torch.tensor([-50.0, 50.0]), t)),
        ("bce_logits([50, -50], [1, 0])", F.binary_cross_entropy_with_logits(torch.tensor([50.0, -50.0]), t)),
    ]


def test_tour_exits_zero_and_fits_100_columns(full_tour):
    assert full_tour.returncode == 0, full_tour.stdout + full_tour.stderr
    lines = full_tour.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    for number in range(1, len(tour.STEPS) + 1):
        assert any(line.startswith(f"── {number}. ") for line in lines)
    assert not [line for line in lines if line.endswith(tour.BAD)]
    assert "every value agrees with torch" in lines[-1]


@pytest.mark.parametrize("label, value", _seed_values(), ids=[s[0] for s in _seed_values()])
def test_tour_prints_seed_values_equal_to_torch(full_tour, label, value):
    row = _row(full_tour.stdout, label)
    expected = float(value)
    assert float(row[tour.TORCH_COL]) == expected  # printed with full float precision
    assert float(row[tour.LEANLOSS_COL]) == pytest.approx(expected, rel=1e-6, abs=0)
    assert float(row[tour.SEED_COL]) == pytest.approx(expected, rel=1e-6, abs=0)
    assert row.endswith(tour.OK)


def test_tour_section_runs_one_step():
    result = _leanloss("tour", "--section", "4")
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("── ")]
    assert len(headers) == 1 and headers[0].startswith("── 4. ")
    row = _row(result.stdout, "bce([0.3, 0.7], [1, 0])")
    assert float(row[tour.TORCH_COL]) == float(F.binary_cross_entropy(torch.tensor([0.3, 0.7]), torch.tensor([1.0, 0.0])))


def test_tour_rejects_unknown_section():
    with pytest.raises(SystemExit) as exc:
        cli.main(["tour", "--section", str(len(tour.STEPS) + 1)])
    assert exc.value.code == 2


def test_tour_fails_when_leanloss_disagrees_with_torch(monkeypatch, capsys):
    real = leanloss.binary_cross_entropy
    monkeypatch.setattr(leanloss, "binary_cross_entropy", lambda *a, **k: real(*a, **k) + 1e-3)
    assert tour.run(4) == 1
    out = capsys.readouterr().out
    assert tour.BAD in _row(out, "bce([0.3, 0.7], [1, 0])")
    assert "disagree with torch" in out


def test_confusion_without_warning_is_reported_not_fatal(monkeypatch, capsys):
    monkeypatch.setattr(leanloss, "cross_entropy", F.cross_entropy)  # a leanloss that never warns
    assert tour.run(6) == 0
    out = capsys.readouterr().out
    assert "NOT CAUGHT" in out and "probs into cross_entropy" in out.split("Not caught yet")[-1]
    assert tour.SILENT in _row(out, "probs into cross_entropy")


def _dense_stand_in(hidden, weight, target, **kwargs):
    return F.cross_entropy(hidden @ weight.T, target)


@pytest.mark.parametrize("available", [True, False])
def test_fused_step(monkeypatch, capsys, available):
    if not available:
        monkeypatch.delattr(leanloss, "linear_cross_entropy", raising=False)
    elif not hasattr(leanloss, "linear_cross_entropy"):
        monkeypatch.setattr(leanloss, "linear_cross_entropy", _dense_stand_in, raising=False)
    assert tour.run(7) == 0
    out = capsys.readouterr().out
    if available:
        assert _row(out, "loss").endswith(tour.OK)
        assert "peak tensor memory (MB)" in out
    else:
        assert "not available" in out


def test_peak_tensor_memory_counts_live_storage_once():
    with tour.PeakTensorMemory() as probe:
        a = torch.empty(1000, dtype=torch.float64)  # 8000 bytes
        view = a[:10]
        b = a + 1  # peak: 16000
        del a, view, b
        c = torch.empty(100, dtype=torch.float64)  # 800 bytes, below the peak
    assert probe.peak == 16000
    assert probe.current == 800
    del c


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------

FAKE_SUITE = '''
"""A tiny suite for the runner's tests: pure Python, fast children, no torch."""
from benchmarks import _harness


def cases(*, quick, vocab=None, tokens=None, hidden=None, dtype=None, only=None):
    vocabs = [vocab] if vocab else ([64, 256] if quick else [1024])
    impls = ["roofline", "torch_eager", "leanloss", "torch_compile"]
    return [dict(suite="fake", impl=impl, N=tokens or 8, D=hidden or 4, V=v, dtype=dtype or "float32",
                 repeats=2) for v in vocabs for impl in impls if only in (None, impl)]


def run_case(case):
    if case.get("crash"):
        raise RuntimeError("boom")
    base = _harness.rss_bytes()
    size = {"roofline": 1, "torch_eager": 3, "leanloss": 2, "torch_compile": 2}[case["impl"]] * case["V"]
    timing = _harness.time_fwd_bwd(lambda: sum(range(size)), case["repeats"])
    return _harness.case_result(case, time=timing, base_rss=base, grad_bytes=0, note="fake")


if __name__ == "__main__":
    _harness.main(run_case)
'''


@pytest.fixture
def fake_bench(tmp_path):
    pkg = tmp_path / "benchmarks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('SUITES = ("fake", "absent")\n')
    shutil.copy(REAL_BENCH / "_harness.py", pkg / "_harness.py")
    (pkg / "fake.py").write_text(textwrap.dedent(FAKE_SUITE))
    return pkg


RESULT_KEYS = {"suite", "impl", "N", "D", "V", "dtype", "repeats", "time_s", "times", "peak_rss_mb", "extra_mb"}


def _check_outputs(out: Path) -> dict:
    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema_version"] == bench.SCHEMA_VERSION
    assert {"created", "leanloss", "machine", "args", "results", "suites_run", "suites_missing"} <= set(doc)
    assert doc["results"], "no results"
    for row in doc["results"]:
        assert "error" not in row, row
        assert RESULT_KEYS <= set(row), row
        assert row["time_s"] > 0 and len(row["times"]) == row["repeats"]
        assert row["peak_rss_mb"] > 0
    png = (out / "bench.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    image = matplotlib.image.imread(str(out / "bench.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    table = (out / "bench.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| suite")]
    assert table[0].startswith("Machine: ") and len(rows) == len(doc["results"])
    for line, row in zip(rows, doc["results"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [row["suite"], row["impl"]] and float(cells[6]) == round(row["time_s"], 4)
    return doc


def test_bench_quick_with_fake_suite(fake_bench, tmp_path):
    out = tmp_path / "out"
    result = _leanloss("bench", "--quick", "--out", str(out), env={"LEANLOSS_BENCH_DIR": str(fake_bench)})
    assert result.returncode == 0, result.stdout + result.stderr
    doc = _check_outputs(out)
    assert doc["suites_missing"] == ["absent"] and doc["suites_run"] == ["fake"]
    assert doc["args"]["quick_skipped"] == ["torch_compile"] and "leaves out 2 case(s)" in result.stdout
    rows = {(r["impl"], r["V"]): r for r in doc["results"]}
    assert set(rows) == {(i, v) for i in ("roofline", "torch_eager", "leanloss") for v in (64, 256)}
    for v in (64, 256):
        lean, roof, eager = rows["leanloss", v], rows["roofline", v], rows["torch_eager", v]
        assert lean["x_roofline"] == pytest.approx(lean["time_s"] / roof["time_s"])
        assert lean["x_torch_eager"] == pytest.approx(lean["time_s"] / eager["time_s"])
        assert lean["note"] == "fake"
    assert "x roof" in result.stdout and "leanloss" in result.stdout


def test_bench_selection_flags(fake_bench, tmp_path):
    out = tmp_path / "sel"
    result = _leanloss("bench", "--out", str(out), "--vocab", "32,48", "--tokens", "3", "--hidden", "2",
                       "--dtype", "bfloat16", "--only", "leanloss", "--jobs", "1",
                       env={"LEANLOSS_BENCH_DIR": str(fake_bench)})
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads((out / "bench.json").read_text())
    got = sorted((r["impl"], r["N"], r["D"], r["V"], r["dtype"]) for r in doc["results"])
    assert got == [("leanloss", 3, 2, 32, "bfloat16"), ("leanloss", 3, 2, 48, "bfloat16")]


def test_run_in_subprocess_reports_errors(fake_bench):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fake_harness", fake_bench / "_harness.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    case = {"suite": "fake", "impl": "leanloss", "N": 2, "D": 2, "V": 8, "dtype": "float32", "repeats": 1}
    ok = harness.run_in_subprocess("fake", case, timeout=60)
    assert "error" not in ok and ok["V"] == 8 and ok["time_s"] >= 0
    crashed = harness.run_in_subprocess("fake", {**case, "crash": True}, timeout=60)
    assert crashed["crash"] is True and "boom" in crashed["error"]
    missing = harness.run_in_subprocess("nope", case, timeout=60)
    assert "error" in missing and missing["impl"] == "leanloss"


def test_add_ratios_groups_by_shape():
    rows = [
        {"suite": "s", "impl": "roofline", "N": 1, "D": 1, "V": 8, "dtype": "float32", "time_s": 1.0, "extra_mb": 0.0},
        {"suite": "s", "impl": "torch_eager", "N": 1, "D": 1, "V": 8, "dtype": "float32", "time_s": 4.0, "extra_mb": 8.0},
        {"suite": "s", "impl": "leanloss", "N": 1, "D": 1, "V": 8, "dtype": "float32", "time_s": 2.0, "extra_mb": 2.0},
        {"suite": "s", "impl": "leanloss", "N": 1, "D": 1, "V": 16, "dtype": "float32", "time_s": 3.0, "extra_mb": 1.0},
        {"suite": "s", "impl": "leanloss", "N": 1, "D": 1, "V": 32, "dtype": "float32", "error": "x"},
    ]
    bench.add_ratios(rows)
    assert rows[2]["x_roofline"] == 2.0 and rows[2]["x_torch_eager"] == 0.5
    assert rows[2]["mem_x_torch_eager"] == 0.25
    assert "x_roofline" not in rows[3] and "x_roofline" not in rows[4]
    header, cells = bench.table_rows(rows)
    assert "x roof" in header and "x compile" not in header
    assert cells[4][6] == "error"


def test_locate_bench_dir_errors_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLOSS_BENCH_DIR", str(tmp_path))
    with pytest.raises(bench.BenchSetupError, match="LEANLOSS_BENCH_DIR"):
        bench.locate_bench_dir()


REAL_SUITES = [s for s in ("linear_ce", "distill", "checks_cost", "hf_step") if (REAL_BENCH / f"{s}.py").exists()]


def test_bench_quick_with_the_repos_benchmarks(tmp_path):
    """The real benchmarks/ found from leanloss's install: one present suite at a tiny size, or,
    before any suite has landed, an empty run that names the missing suites."""
    out = tmp_path / "real"
    only = ["--only", f"{REAL_SUITES[0]},roofline,torch_eager,leanloss"] if REAL_SUITES else []
    result = _leanloss("bench", "--quick", "--out", str(out), *only, "--vocab", "256", "--tokens", "32",
                       "--hidden", "16", env={"LEANLOSS_BENCH_DIR": ""}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    if REAL_SUITES:
        doc = _check_outputs(out)
        assert doc["suites_run"] == [REAL_SUITES[0]]
        assert {r["V"] for r in doc["results"]} == {256}
    else:
        doc = json.loads((out / "bench.json").read_text())
        assert doc["results"] == [] and set(doc["suites_missing"]) == {"linear_ce", "distill", "checks_cost", "hf_step"}
        assert (out / "bench.png").read_bytes().startswith(PNG_MAGIC)
        assert "not present yet" in result.stdout
