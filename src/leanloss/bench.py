"""``leanloss bench``: run the suites of ``benchmarks/``, print a table, write JSON and a plot.

The suites follow the benchmark contract (``benchmarks/_harness.py``): each suite module lists
its cases with ``cases(quick=..., vocab=..., tokens=..., hidden=..., dtype=..., only=...)``
and the runner runs every case in a fresh child process (``_harness.run_in_subprocess``), so
each case's peak memory is its own. Results are grouped by (suite, N, D, V, dtype); each row
gets its ratio to the ``roofline`` (the matmuls alone) and ``torch_eager`` rows of its group,
and to ``torch_compile`` and ``cut_cross_entropy`` where those ran.

Writes ``bench.json`` (the results and how they were obtained) and ``bench.png`` (time and
extra memory against vocabulary size, one line per implementation) to ``--out``.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence

SCHEMA_VERSION = 1
# Baselines each row is compared with, in the order of the table's ratio columns.
BASELINES = (
    ("roofline", "x roof"),
    ("torch_eager", "x eager"),
    ("torch_compile", "x compile"),
    ("cut_cross_entropy", "x cce"),
)
GROUP_KEYS = ("suite", "N", "D", "V", "dtype")
# Implementations whose children spend most of their time compiling: left out of --quick (a
# smoke test that must finish in a minute on 2 cores) unless --only names them.
QUICK_SKIPS = ("torch_compile", "cut_cross_entropy")


class BenchSetupError(RuntimeError):
    """The benchmarks could not be found or loaded (said in words the user can act on)."""


# --------------------------------------------------------------------------------------------
# finding and loading the suites
# --------------------------------------------------------------------------------------------


def locate_bench_dir() -> Path:
    """The ``benchmarks/`` package: ``$LEANLOSS_BENCH_DIR``, else ``<repo>/benchmarks`` next to
    the source tree of this (editable) install, else ``./benchmarks``."""
    env = os.environ.get("LEANLOSS_BENCH_DIR")
    if env:
        path = Path(env).resolve()
        if not (path / "__init__.py").is_file():
            raise BenchSetupError(
                f"LEANLOSS_BENCH_DIR={env!r} is not a benchmarks package (no __init__.py there)"
            )
        return path
    import leanloss

    candidates = [Path(leanloss.__file__).resolve().parents[2] / "benchmarks", Path.cwd() / "benchmarks"]
    for path in candidates:
        if (path / "__init__.py").is_file() and (path / "_harness.py").is_file():
            return path
    raise BenchSetupError(
        "cannot find the benchmarks/ directory: looked in "
        + ", ".join(str(p) for p in candidates)
        + ". Run from a clone of the leanloss repository (pip install -e .), or set "
        "LEANLOSS_BENCH_DIR to its benchmarks/ directory."
    )


def _import_package(bench_dir: Path) -> ModuleType:
    if bench_dir.name != "benchmarks":
        raise BenchSetupError(f"the benchmarks directory must be named 'benchmarks', got {bench_dir}")
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent != bench_dir:
        for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
            del sys.modules[name]
    root = str(bench_dir.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("benchmarks")


@dataclass
class Suites:
    """The loaded benchmark package: its harness, the suites present, and the ones that are not."""

    harness: ModuleType
    modules: Dict[str, ModuleType]
    missing: List[str] = field(default_factory=list)
    broken: Dict[str, str] = field(default_factory=dict)


def load_suites(bench_dir: Optional[Path] = None) -> Suites:
    """Import ``benchmarks`` and every suite in ``benchmarks.SUITES``; a suite whose module does
    not exist yet is listed in ``missing``, one that fails to import in ``broken``."""
    bench_dir = locate_bench_dir() if bench_dir is None else bench_dir
    package = _import_package(bench_dir)
    harness = importlib.import_module("benchmarks._harness")
    suites = Suites(harness=harness, modules={})
    for name in getattr(package, "SUITES", ()):
        module_name = f"benchmarks.{name}"
        try:
            suites.modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                suites.missing.append(name)
            else:
                suites.broken[name] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - one broken suite must not stop the others
            suites.broken[name] = f"{type(exc).__name__}: {exc}"
    return suites


# --------------------------------------------------------------------------------------------
# selecting cases
# --------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """What the command line asked for. ``vocab``/``dtype`` may hold several values: each
    suite's ``cases()`` is called once per (vocab, dtype) with single values."""

    quick: bool = False
    vocab: Optional[List[int]] = None
    tokens: Optional[int] = None
    hidden: Optional[int] = None
    dtype: Optional[List[str]] = None
    only: Optional[List[str]] = None


def _split_only(only: Optional[Sequence[str]], suite_names: Sequence[str]):
    if not only:
        return None, None
    suites = [o for o in only if o in suite_names]
    impls = [o for o in only if o not in suite_names]
    return suites or None, impls or None


def select_cases(suites: Suites, sel: Selection, skipped: Optional[List[dict]] = None) -> List[dict]:
    """Every case to run, in suite order, without duplicates; cases of ``QUICK_SKIPS`` that
    ``--quick`` leaves out are appended to ``skipped``."""
    only_suites, only_impls = _split_only(sel.only, list(suites.modules) + suites.missing + list(suites.broken))
    skipped = [] if skipped is None else skipped
    cases: List[dict] = []
    seen = set()
    for name, module in suites.modules.items():
        if only_suites and name not in only_suites:
            continue
        for vocab in sel.vocab or [None]:
            for dtype in sel.dtype or [None]:
                only = only_impls[0] if only_impls and len(only_impls) == 1 else None
                try:
                    listed = module.cases(quick=sel.quick, vocab=vocab, tokens=sel.tokens,
                                          hidden=sel.hidden, dtype=dtype, only=only)
                except Exception as exc:  # noqa: BLE001
                    suites.broken[name] = f"cases() failed: {type(exc).__name__}: {exc}"
                    break
                for case in listed:
                    case = {"suite": name, **case}
                    if only_impls and case.get("impl") not in only_impls:
                        continue
                    if sel.quick and case.get("impl") in QUICK_SKIPS and not only_impls:
                        skipped.append(case)
                        continue
                    key = json.dumps(case, sort_keys=True)
                    if key not in seen:
                        seen.add(key)
                        cases.append(case)
    return cases


# --------------------------------------------------------------------------------------------
# running and reporting
# --------------------------------------------------------------------------------------------


def group_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in GROUP_KEYS)


def add_ratios(results: List[dict]) -> List[dict]:
    """Add ``x_<baseline>`` (time ratio) and ``mem_x_torch_eager`` (extra-memory ratio) to every
    successful row whose group holds that baseline."""
    baselines: Dict[tuple, Dict[str, dict]] = {}
    for row in results:
        if "error" not in row and row.get("impl") in dict(BASELINES):
            baselines.setdefault(group_key(row), {})[row["impl"]] = row
    for row in results:
        if "error" in row:
            continue
        found = baselines.get(group_key(row), {})
        for impl, _ in BASELINES:
            base = found.get(impl)
            if base and base.get("time_s"):
                row[f"x_{impl}"] = row["time_s"] / base["time_s"]
        eager = found.get("torch_eager")
        if eager and eager.get("extra_mb", 0) > 0 and "extra_mb" in row:
            row["mem_x_torch_eager"] = row["extra_mb"] / eager["extra_mb"]
    return results


def run_cases(harness: ModuleType, cases: List[dict], timeout: float, jobs: int, progress=None) -> List[dict]:
    """Run every case in a fresh child (``jobs`` at a time); results keep the cases' order."""
    results: List[Optional[dict]] = [None] * len(cases)

    def one(i: int) -> None:
        start = time.perf_counter()
        results[i] = harness.run_in_subprocess(cases[i]["suite"], cases[i], timeout)
        results[i]["child_wall_s"] = round(time.perf_counter() - start, 3)
        if progress is not None:
            progress(cases[i], results[i])

    if jobs <= 1:
        for i in range(len(cases)):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, range(len(cases))))
    return [r for r in results if r is not None]


def _machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: Path, results: List[dict], suites: Suites, args: dict) -> dict:
    import leanloss

    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "leanloss": leanloss.__version__,
        "machine": _machine(),
        "args": args,
        "suites_run": sorted({r["suite"] for r in results}),
        "suites_missing": suites.missing,
        "suites_broken": suites.broken,
        "results": results,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _series(rows: List[dict]) -> Dict[str, List[dict]]:
    """Lines of one suite's plot: one per implementation (and per N/D/dtype when those vary)."""
    varying = [k for k in ("N", "D", "dtype") if len({r.get(k) for r in rows}) > 1]
    lines: Dict[str, List[dict]] = {}
    for r in rows:
        label = r.get("impl", "?") + "".join(f" {k}={r.get(k)}" for k in varying)
        lines.setdefault(label, []).append(r)
    for pts in lines.values():
        pts.sort(key=lambda r: r.get("V") or 0)
    return lines


def write_plot(path: Path, results: List[dict]) -> None:
    """Time and extra memory against vocabulary size, one row of two panels per suite."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r and "time_s" in r]
    suites = list(dict.fromkeys(r["suite"] for r in ok)) or ["(no results)"]
    fig, axes = plt.subplots(len(suites), 2, figsize=(11, 3.6 * len(suites)), squeeze=False)
    for row_axes, suite in zip(axes, suites):
        rows = [r for r in ok if r["suite"] == suite]
        t_ax, m_ax = row_axes
        for label, pts in _series(rows).items():
            vs = [p.get("V") or 0 for p in pts]
            t_ax.plot(vs, [p["time_s"] for p in pts], marker="o", label=label)
            m_ax.plot(vs, [p.get("extra_mb", float("nan")) for p in pts], marker="o", label=label)
        t_ax.set_title(f"{suite}: time (fwd+bwd, median)")
        t_ax.set_ylabel("seconds")
        m_ax.set_title(f"{suite}: extra memory over inputs + grads")
        m_ax.set_ylabel("MiB")
        for ax in row_axes:
            ax.set_xlabel("vocab size V")
            vs = sorted({r.get("V") or 0 for r in rows})
            if vs and min(vs) > 0 and max(vs) / min(vs) >= 4:
                ax.set_xscale("log", base=2)
            if vs:
                ax.set_xticks(vs, [str(v) for v in vs])
                ax.minorticks_off()
            ax.grid(True, alpha=0.3)
            if rows:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Suite-specific figures shown in a last "notes" column when a row has them.
NOTE_KEYS = (("x_roof_paired", ".3f"), ("value_checks_pct", ".3f"), ("overhead_pct", ".1f"),
             ("matmuls4_s", ".3f"))


def _notes(r: dict) -> str:
    return " ".join(f"{k}={format(r[k], f)}" for k, f in NOTE_KEYS if isinstance(r.get(k), (int, float)))


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def table_rows(results: List[dict]) -> (List[str], List[List[str]]):
    """Header and cells of the results table; ratio columns appear only when some row has them."""
    ratio_cols = [(impl, title) for impl, title in BASELINES if any(f"x_{impl}" in r for r in results)]
    mem_col = any("mem_x_torch_eager" in r for r in results)
    header = ["suite", "impl", "N", "D", "V", "dtype", "time s", "peak MB", "extra MB"]
    header += [title for _, title in ratio_cols] + (["mem x eager"] if mem_col else [])
    notes_col = any(_notes(r) for r in results)
    header += ["notes"] if notes_col else []
    cells = []
    for r in results:
        row = [str(r.get("suite", "")), str(r.get("impl", "")), str(r.get("N", "")), str(r.get("D", "")),
               str(r.get("V", "")), str(r.get("dtype", ""))]
        if "error" in r:
            row += ["error"] + [""] * (len(header) - len(row) - 1)
        else:
            row += [_num(r.get("time_s"), ".4f"), _num(r.get("peak_rss_mb"), ".1f"), _num(r.get("extra_mb"), ".1f")]
            row += [_num(r.get(f"x_{impl}"), ".2f") for impl, _ in ratio_cols]
            if mem_col:
                row.append(_num(r.get("mem_x_torch_eager"), ".3f"))
            if notes_col:
                row.append(_notes(r))
        cells.append(row)
    return header, cells


def print_table(console, results: List[dict]) -> None:
    from rich.table import Table

    header, cells = table_rows(results)
    table = Table(title="leanloss bench", show_lines=False)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 or name == "dtype" else "right", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    console.print(table)
    from rich.markup import escape

    for r in results:
        if "error" in r:
            console.print(f"[red]error[/red] in {r.get('suite')} {r.get('impl')} V={r.get('V')}: "
                          + escape(str(r["error"])), highlight=False)


def write_markdown(path: Path, results: List[dict], machine: dict) -> None:
    """The results table as Markdown (for docs/ and the README), with the machine it ran on."""
    header, cells = table_rows(results)
    lines = [f"Machine: {', '.join(f'{k}={v}' for k, v in machine.items())}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if c else " " for c in row) + " |" for row in cells]
    path.write_text("\n".join(lines) + "\n")


def run(sel: Selection, out: Path, *, timeout: Optional[float] = None, jobs: Optional[int] = None) -> int:
    """``leanloss bench``: returns the exit status (1 when a case or suite failed)."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        print("leanloss bench needs rich and matplotlib: pip install 'leanloss[bench]'", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        suites = load_suites()
    except BenchSetupError as exc:
        console.print(f"[red]leanloss bench:[/red] {exc}")
        return 2
    skipped: List[dict] = []
    cases = select_cases(suites, sel, skipped)
    for name in suites.missing:
        console.print(f"suite {name}: not present yet (benchmarks/{name}.py), skipped")
    for name, why in suites.broken.items():
        console.print(f"[red]suite {name} failed to load:[/red] {why}")
    if skipped:
        impls = sorted({c["impl"] for c in skipped})
        console.print(f"--quick leaves out {len(skipped)} case(s) of {', '.join(impls)} (compile time); "
                      f"name them with --only to run them")
    if not cases:
        console.print("[yellow]no benchmark cases selected[/yellow]")
    timeout = timeout if timeout is not None else (120.0 if sel.quick else 1800.0)
    jobs = jobs if jobs is not None else (min(2, os.cpu_count() or 1) if sel.quick else 1)
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("benchmarks", total=len(cases))

        def advance(case: dict, result: dict) -> None:
            status = "failed" if "error" in result else f"{result.get('time_s', 0):.3f} s"
            label = f"{case['suite']} {case.get('impl')} V={case.get('V')}: {status}"
            progress.update(task, advance=1, description=label[:40])

        results = run_cases(suites.harness, cases, timeout, jobs, advance)
    add_ratios(results)
    print_table(console, results)
    out.mkdir(parents=True, exist_ok=True)
    args = {"quick": sel.quick, "vocab": sel.vocab, "tokens": sel.tokens, "hidden": sel.hidden,
            "dtype": sel.dtype, "only": sel.only, "jobs": jobs, "timeout_s": timeout,
            "quick_skipped": sorted({c["impl"] for c in skipped})}
    write_json(out / "bench.json", results, suites, args)
    write_plot(out / "bench.png", results)
    write_markdown(out / "bench.md", results, _machine())
    console.print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'}")
    if sel.quick and jobs > 1:
        console.print(f"(--quick runs {jobs} cases at a time: a smoke test, not a measurement)")
    failed = [r for r in results if "error" in r]
    if failed:
        console.print(f"[red]{len(failed)} case(s) failed[/red]")
    return 1 if failed or suites.broken else 0
