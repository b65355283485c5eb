"""The ``leanloss`` command run as a user runs it: ``python -m leanloss tour`` / ``bench`` /
``--version``, from a directory that is not the repository."""
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import leanloss
from leanloss import cli
from leanloss.cli import tour
from leanloss.cli.bench import harness, runner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _leanloss(*args, env=None, cwd=None, timeout=240):
    """``python -m leanloss ARGS`` in a fresh process, from ``cwd`` (a temporary directory when
    not given, so nothing depends on the repository being the working directory)."""
    env = {**os.environ, **(env or {})}
    src = str(Path(leanloss.__file__).resolve().parents[1])  # the tree under test comes first
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), src) if p)
    return subprocess.run([sys.executable, "-m", "leanloss", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or tempfile.gettempdir(), timeout=timeout)


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


def _lesson_values():
    """(row label, torch's value) for the lessons' reference values, computed by torch now."""
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


@pytest.mark.parametrize("label, value", _lesson_values(), ids=[s[0] for s in _lesson_values()])
def test_tour_prints_lesson_values_equal_to_torch(full_tour, label, value):
    row = _row(full_tour.stdout, label)
    expected = float(value)
    assert float(row[tour.TORCH_COL]) == expected  # printed with full float precision
    assert float(row[tour.LEANLOSS_COL]) == pytest.approx(expected, rel=1e-6, abs=0)
    assert float(row[tour.LESSON_COL]) == pytest.approx(expected, rel=1e-6, abs=0)
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
    with harness.PeakTensorMemory() as probe:
        a = torch.empty(1000, dtype=torch.float64)  # 8000 bytes
        view = a[:10]
        b = a + 1  # peak: 16000
        del a, view, b
        c = torch.empty(100, dtype=torch.float64)  # 800 bytes, below the peak
    assert probe.peak == 16000
    assert probe.current == 800
    del c


def test_version_names_leanloss_and_torch():
    result = _leanloss("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"leanloss {leanloss.__version__} (torch {torch.__version__}")


# --------------------------------------------------------------------------------------------
# bench: the measurement
# --------------------------------------------------------------------------------------------

needs_vmhwm = pytest.mark.skipif(not harness.reset_peak_rss(), reason="no /proc/self/clear_refs (not Linux)")


@needs_vmhwm
def test_step_memory_counts_one_steps_temporaries_not_inputs_or_grads():
    mb = 2**20
    # above glibc's largest mmap threshold (32 MiB): each buffer is mapped on allocation and
    # returned on free, whatever this process allocated before
    leaf = torch.zeros(64 * mb // 4, requires_grad=True)  # 64 MiB input, 64 MiB gradient

    def step():
        tmp = torch.ones(96 * mb // 4)  # 96 MiB alive only during the step
        leaf.grad = torch.ones_like(leaf)
        del tmp

    got = harness.step_memory(step, (leaf,))
    assert got["mem_method"] == "VmHWM"
    # the gradient is in the base (held after the warm-up step), the temporary is the extra
    assert 90 <= got["extra_mb"] <= 102, got
    assert leaf.grad is None  # cleared after the measured step


@needs_vmhwm
@pytest.mark.skipif(not harness.trim_heap(), reason="no malloc_trim (not glibc)")
def test_step_memory_counts_heap_memory_an_earlier_step_left_resident():
    mb = 2**20
    pins = []

    def step():
        # 1 MiB temporaries come from the heap once an earlier step freed one (glibc raises its
        # mmap threshold), and a small tensor kept alive above them stops glibc from trimming
        # the heap's top: freed, they stay resident, and the next step reuses them
        tmp = [torch.ones(mb // 4) for _ in range(64)]
        pins.append(torch.ones(16))
        del tmp

    # without the trims the warm-up steps' freed heap was in the baseline: 2 MB once in three runs
    got = harness.step_memory(step, warmup=2)
    assert 60 <= got["extra_mb"] <= 72, got


def test_paired_times_interleaves_step_and_reference():
    calls = []

    def step():
        calls.append("step")

    def reference():
        calls.append("ref")

    got = harness.paired_times(step, reference, rounds=3)
    assert calls == ["step", "ref"] * 3
    assert got["x_roof"] > 0 and len(got["times"]) == 3 and got["roofline_s"] > 0


def test_paired_times_median_ratio(monkeypatch):
    ticks = iter([0.0, 3.0, 3.0, 4.0,  # round 1: step 3, reference 1 -> 3
                  10.0, 12.0, 12.0, 13.0,  # round 2: step 2, reference 1 -> 2
                  20.0, 30.0, 30.0, 32.0])  # round 3: step 10, reference 2 -> 5
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(ticks))
    got = harness.paired_times(lambda: None, lambda: None, rounds=3)
    assert got["x_roof"] == 3.0 and got["time_s"] == 3.0 and got["roofline_s"] == 1.0


# --------------------------------------------------------------------------------------------
# bench: the runner, on a suite package of its own
# --------------------------------------------------------------------------------------------

FAKE_SUITE = '''
"""A tiny suite for the runner's tests: pure Python, fast children."""
from leanloss.cli.bench import harness


def cases(*, quick, vocab=None, tokens=None, hidden=None, dtype=None, only=None):
    vocabs = [vocab] if vocab else [64]
    dtypes = [dtype] if dtype else ["float32", "bfloat16"]
    impls = ["leanloss", "torch_eager"] + ([] if quick else ["torch_compile"]) + ["missing_peer"]
    out = [dict(suite="fake", impl=impl, N=tokens or 8, D=hidden or 4, V=v, dtype=dt, repeats=2)
           for v in vocabs for dt in dtypes for impl in impls if only in (None, impl)]
    for case in out:
        if case["impl"] == "missing_peer":
            case["skipped"] = "missing_peer is not installed"
    return out


def run_case(case):
    if case.get("crash"):
        raise RuntimeError("boom")
    if case.get("unavailable"):
        raise harness.Unavailable("not in this torch")
    k = {"leanloss": 2, "torch_eager": 3, "torch_compile": 2}[case["impl"]]

    def step():
        buffer = b"x" * (k * 4 * 2**20)  # k * 4 MiB, written: resident during the step
        return sum(range(k * case["V"] * 100)) + len(buffer)

    return harness.measure(case, step, reference=lambda: sum(range(case["V"] * 100)), note="fake")


if __name__ == "__main__":
    harness.main(run_case)
'''


@pytest.fixture
def fake_package(tmp_path):
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('SUITES = ("fake", "absent")\n')
    (pkg / "fake.py").write_text(textwrap.dedent(FAKE_SUITE))
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)}


RESULT_KEYS = {"suite", "impl", "N", "D", "V", "dtype", "repeats", "time_s", "times", "peak_rss_mb", "extra_mb",
               "mem_method", "x_roof", "roofline_s"}


def _check_outputs(out: Path) -> dict:
    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema_version"] == runner.SCHEMA_VERSION
    assert {"created", "leanloss", "machine", "method", "args", "results", "suites_run", "suites_missing"} <= set(doc)
    measured = [r for r in doc["results"] if "skipped" not in r]
    assert measured, "no results"
    for row in measured:
        assert "error" not in row, row
        assert RESULT_KEYS <= set(row), row
        assert row["time_s"] > 0 and len(row["times"]) == row["repeats"] and row["x_roof"] > 0
        assert row["peak_rss_mb"] > 0
    assert (out / "bench.png").read_bytes().startswith(PNG_MAGIC)
    import matplotlib.image

    image = matplotlib.image.imread(str(out / "bench.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return doc


def _md_table(out: Path):
    lines = (out / "bench.md").read_text().splitlines()
    assert lines[0].startswith("Machine: ")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    return rows[0], rows[1:]


def test_bench_quick_with_a_suite_package(fake_package, tmp_path):
    out = tmp_path / "out"
    result = _leanloss("bench", "--quick", "--package", "fakebench", "--out", str(out), env=fake_package)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = _check_outputs(out)
    assert doc["suites_missing"] == ["absent"] and doc["suites_run"] == ["fake"]
    rows = {(r["impl"], r["dtype"]): r for r in doc["results"]}
    assert set(rows) == {(i, d) for i in ("leanloss", "torch_eager", "missing_peer") for d in ("float32", "bfloat16")}
    for dt in ("float32", "bfloat16"):
        lean, eager = rows["leanloss", dt], rows["torch_eager", dt]
        assert lean["x_torch_eager"] == pytest.approx(lean["x_roof"] / eager["x_roof"])
        assert lean["mem_x_torch_eager"] == pytest.approx(lean["extra_mb"] / eager["extra_mb"])
        assert lean["note"] == "fake"
        assert rows["missing_peer", dt]["skipped"] == "missing_peer is not installed"
    assert "skipped fake missing_peer" in result.stdout and "missing_peer is not installed" in result.stdout
    # the Markdown table: float32 and bfloat16 side by side, one row per implementation
    header, cells = _md_table(out)
    assert header[:5] == ["suite", "impl", "N", "D", "V"]
    assert header[5:11] == ["fp32 x roof", "fp32 extra MB", "fp32 s", "bf16 x roof", "bf16 extra MB", "bf16 s"]
    by_impl = {c[1]: c for c in cells}
    assert set(by_impl) == {"leanloss", "torch_eager", "missing_peer"}
    assert float(by_impl["leanloss"][5]) == round(rows["leanloss", "float32"]["x_roof"], 2)
    assert float(by_impl["leanloss"][8]) == round(rows["leanloss", "bfloat16"]["x_roof"], 2)
    assert by_impl["missing_peer"][5] == "skipped"


def test_bench_selection_flags(fake_package, tmp_path):
    out = tmp_path / "sel"
    result = _leanloss("bench", "--package", "fakebench", "--out", str(out), "--vocab", "32,48", "--tokens", "3",
                       "--hidden", "2", "--dtype", "bfloat16", "--only", "leanloss,torch_compile", env=fake_package)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads((out / "bench.json").read_text())
    got = sorted((r["impl"], r["N"], r["D"], r["V"], r["dtype"]) for r in doc["results"])
    assert got == [(impl, 3, 2, v, "bfloat16") for impl in ("leanloss", "torch_compile") for v in (32, 48)]


def test_bench_unknown_package_is_a_clear_error(tmp_path):
    result = _leanloss("bench", "--package", "no_such_benchmarks", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "cannot import the benchmark package 'no_such_benchmarks'" in result.stdout


def test_run_in_subprocess_reports_errors_and_skips(fake_package, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", fake_package["PYTHONPATH"])
    case = {"suite": "fake", "impl": "leanloss", "N": 2, "D": 2, "V": 8, "dtype": "float32", "repeats": 1}
    ok = harness.run_in_subprocess("fakebench.fake", case, timeout=60)
    assert "error" not in ok and ok["V"] == 8 and ok["time_s"] >= 0 and ok["x_roof"] > 0
    crashed = harness.run_in_subprocess("fakebench.fake", {**case, "crash": True}, timeout=60)
    assert crashed["crash"] is True and "boom" in crashed["error"]
    skipped = harness.run_in_subprocess("fakebench.fake", {**case, "unavailable": True}, timeout=60)
    assert skipped["skipped"] == "not in this torch" and "error" not in skipped
    missing = harness.run_in_subprocess("fakebench.nope", case, timeout=60)
    assert "error" in missing and missing["impl"] == "leanloss"


def test_add_ratios_compares_same_process_ratios_within_a_group():
    def row(impl, v, x_roof, extra, **kw):
        return {"suite": "s", "impl": impl, "N": 1, "D": 1, "V": v, "dtype": "float32", "x_roof": x_roof,
                "time_s": 9.0, "extra_mb": extra, **kw}

    rows = [row("torch_eager", 8, 2.0, 8.0), row("leanloss", 8, 1.0, 2.0), row("torch_compile", 8, 0.5, 4.0),
            row("leanloss", 16, 3.0, 1.0), row("leanloss", 32, 0, 0, error="x"),
            row("cut_cross_entropy", 8, 0, 0, skipped="absent")]
    runner.add_ratios(rows)
    assert rows[1]["x_torch_eager"] == 0.5 and rows[1]["x_torch_compile"] == 2.0
    assert rows[1]["mem_x_torch_eager"] == 0.25 and "x_cut_cross_entropy" not in rows[1]
    assert "x_torch_eager" not in rows[3] and "x_torch_eager" not in rows[4]
    assert "x_torch_eager" not in rows[0]  # not compared with itself
    header, cells = runner.table_rows(rows)
    assert header[5:8] == ["fp32 x roof", "fp32 extra MB", "fp32 s"]
    assert [c[5] for c in cells] == ["2.00", "1.00", "0.50", "3.00", "error", "skipped"]


def _bench_file(path, rows, machine):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"created": "2026-01-01T00:00:00+00:00", "machine": machine, "results": rows}))
    return path


def test_bench_merge_joins_runs_later_file_wins_and_recomputes_ratios(tmp_path):
    def row(impl, dtype, x_roof, extra, **kw):
        return {"suite": "s", "impl": impl, "N": 1, "D": 1, "V": 8, "dtype": dtype, "x_roof": x_roof,
                "time_s": 9.0, "extra_mb": extra, **kw}

    machine = {"cpu_count": 2, "torch": "2.13.0"}
    a = _bench_file(tmp_path / "a" / "bench.json",
                    [row("leanloss", "float32", 1.5, 10.0, x_torch_eager=9.9), row("torch_eager", "float32", 3.0, 40.0)],
                    machine)
    b = _bench_file(tmp_path / "b" / "bench.json",
                    [row("leanloss", "float32", 1.2, 20.0), row("leanloss", "bfloat16", 1.1, 5.0)], machine)
    out = tmp_path / "merged"
    assert cli.main(["bench", "--merge", str(a), "--merge", str(b), "--out", str(out)]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["machine"] == machine
    assert [src["path"] for src in doc["args"]["merged_from"]] == [str(a), str(b)]
    by_case = {(r["impl"], r["dtype"]): r for r in doc["results"]}
    assert len(doc["results"]) == 3
    lean = by_case[("leanloss", "float32")]
    assert lean["x_roof"] == 1.2 and lean["x_torch_eager"] == pytest.approx(0.4) and lean["mem_x_torch_eager"] == 0.5
    assert "x_torch_eager" not in by_case[("leanloss", "bfloat16")]  # no eager row in bf16
    table = (out / "bench.md").read_text()
    assert "| s | leanloss | 1 | 1 | 8 | 1.20 | 20 |" in table


def test_bench_merge_refuses_other_machines_and_unreadable_files(tmp_path, capsys):
    a = _bench_file(tmp_path / "a.json", [], {"cpu_count": 2})
    b = _bench_file(tmp_path / "b.json", [], {"cpu_count": 16})
    assert cli.main(["bench", "--merge", str(a), "--merge", str(b), "--out", str(tmp_path / "o")]) == 2
    assert "different machines" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["bench", "--merge", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read results from" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# bench: the shipped suites, run from an install (not the repository)
# --------------------------------------------------------------------------------------------


def test_shipped_suites_list_the_benchmark_shapes():
    from leanloss.cli.bench import SUITES, distill, first_call, linear_ce, log_probs, trl

    assert SUITES == ("linear_ce", "distill", "log_probs", "checks_cost", "hf_step", "trl", "first_call")
    rows = {(c["impl"], c["N"], c["D"], c["V"], c["dtype"]) for c in trl.cases(quick=False)}
    assert rows == {(f"{side}_{kernel}", 2048, 1024, v, dt) for side in ("leanloss", "trl")
                    for kernel, v in (("logp", 131072), ("jsd", 32000)) for dt in ("float32", "bfloat16")} | {
        (f"{t}_{side}", 512, 512, 128256, dt) for t in ("sft", "grpo", "distill") for side in ("leanloss", "trl")
        for dt in ("float32", "bfloat16")}
    full = linear_ce.cases(quick=False)
    assert {(c["N"], c["D"], c["V"]) for c in full} == {(4096, 4096, 128256), (8192, 1024, 131072), (2048, 1024, 32000)}
    assert {c["dtype"] for c in full} == {"float32", "bfloat16"}
    assert {c["impl"] for c in full} == set(linear_ce.IMPLS)
    quick = linear_ce.cases(quick=True)
    assert [(c["impl"], c["N"], c["D"], c["V"], c["dtype"]) for c in quick] == [
        ("leanloss", 2048, 1024, 32000, "float32"), ("leanloss", 2048, 1024, 32000, "bfloat16")]
    assert [(c["impl"], c["dtype"]) for c in distill.cases(quick=True)] == [("leanloss", "bfloat16")]
    jsd = distill.cases(quick=False)
    assert {c["impl"] for c in jsd} == {"leanloss", "torch_eager", "torch_compile", "liger"}
    assert all(c["kind"] == "jsd" and (c["N"], c["D"], c["V"]) == (2048, 1024, 32000) for c in jsd)
    lp = log_probs.cases(quick=False)
    assert {(c["N"], c["D"], c["V"], c["temperature"]) for c in lp} == {(2048, 1024, 131072, 0.9)}
    assert {c["impl"]: c.get("softcap") for c in lp} == {"leanloss": None, "torch_eager": None, "leanloss_score": None,
                                                         "torch_eager_score": None, "leanloss_softcap": 30.0,
                                                         "torch_eager_softcap": 30.0}
    assert {c["dtype"] for c in lp} == {"float32", "bfloat16"}
    assert [(c["impl"], c["dtype"]) for c in log_probs.cases(quick=True)] == [("leanloss", "bfloat16")]
    first = first_call.cases(quick=False)
    assert {(c["impl"], c["dtype"]) for c in first} == {(i, d) for i in first_call.LOSSES for d in ("float32", "bfloat16")}
    assert {(c["N"], c["D"], c["V"]) for c in first} == {(2048, 1024, 32000)}
    assert [(c["impl"], c["dtype"]) for c in first_call.cases(quick=True)] == [("ce", "bfloat16"), ("jsd", "bfloat16")]


def test_bench_first_call_times_fresh_processes_with_an_empty_then_a_warm_cache(tmp_path):
    out = tmp_path / "first"
    result = _leanloss("bench", "--only", "first_call,ce", "--vocab", "256", "--tokens", "32", "--hidden", "16",
                       "--dtype", "float32", "--out", str(out), cwd=tmp_path, env={"LEANLOSS_KERNELS": "auto"})
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = json.loads((out / "bench.json").read_text())["results"]  # no roofline: not a speed row
    for probe in ("cold", "warm_cache"):
        assert row[f"{probe}_first_s"] > 0 and row[f"{probe}_warm_s"] > 0
        assert row[f"{probe}_stall_s"] == pytest.approx(row[f"{probe}_first_s"] - row[f"{probe}_warm_s"])
    assert row["time_s"] == row["cold_warm_s"] and row["kernel_mode"] == "auto"


def test_bench_shipped_linear_ce_from_a_temporary_directory(tmp_path):
    """The suites ship inside the package: tiny sizes, leanloss and two peers, any cwd."""
    out = tmp_path / "real"
    result = _leanloss("bench", "--quick", "--out", str(out), "--only", "linear_ce,leanloss,torch_eager,torch_chunked",
                       "--vocab", "256", "--tokens", "32", "--hidden", "16", "--dtype", "float32", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = _check_outputs(out)
    assert doc["suites_run"] == ["linear_ce"] and doc["args"]["package"] == "leanloss.cli.bench"
    rows = {r["impl"]: r for r in doc["results"]}
    assert set(rows) == {"leanloss", "torch_eager", "torch_chunked"}
    assert rows["leanloss"]["loss"] == pytest.approx(rows["torch_eager"]["loss"], rel=1e-5)
    assert rows["leanloss"]["mem_method"] == ("VmHWM" if harness.reset_peak_rss() else "ru_maxrss")
    chunked = rows["torch_chunked"]
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        assert chunked["loss"] == pytest.approx(rows["torch_eager"]["loss"], rel=1e-5)
    else:
        assert "no chunked F.linear_cross_entropy" in chunked["skipped"]


def test_bench_trl_kernels_agree_with_trl(tmp_path):
    """The trl suite's JSD rows, tiny: leanloss and TRL's kernel compute the same loss."""
    pytest.importorskip("trl")
    out = tmp_path / "trl"
    result = _leanloss("bench", "--quick", "--out", str(out), "--only", "trl,leanloss_jsd,trl_jsd", "--vocab", "300",
                       "--tokens", "24", "--hidden", "16", "--dtype", "float32", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["impl"]: r for r in _check_outputs(out)["results"]}
    assert set(rows) == {"leanloss_jsd", "trl_jsd"}
    assert rows["leanloss_jsd"]["loss"] == pytest.approx(rows["trl_jsd"]["loss"], rel=1e-5)


def test_device_check_measures_each_impl_or_reports_why_not(monkeypatch):
    """The GPU check's per-implementation loop (runnable without a GPU once the CUDA timing and
    memory readers are stubbed): a skip reason, a measured row, and an error row that does not
    stop the run."""
    from leanloss.cli.bench import device_check

    monkeypatch.setattr(device_check, "_paired", lambda step, roof: (step(), roof()) and (1.5, 0.25))
    monkeypatch.setattr(device_check, "_extra_mb", lambda step: 7.0)
    calls = []

    def broken():
        raise RuntimeError("out of memory")

    impls = {"absent": "unavailable: ImportError", "ok": lambda: calls.append("ok"), "broken": broken}
    results = []
    device_check._measure_impls(results, {"suite": "s", "n": 1}, impls,
                                lambda fn: (lambda: fn()), lambda: calls.append("roof"))
    assert results[0] == {"suite": "s", "n": 1, "impl": "absent", "skipped": "unavailable: ImportError"}
    assert results[1] == {"suite": "s", "n": 1, "impl": "ok", "x_roof": 1.5, "roofline_s": 0.25, "extra_mb": 7.0}
    assert results[2]["impl"] == "broken" and results[2]["error"] == "RuntimeError: out of memory"
    assert calls == ["ok", "roof"]
