"""``leanloss bench``: run the benchmark suites, print a table, write JSON, Markdown and a plot.

The suites are modules of a package (``leanloss.cli.bench`` unless ``--package`` names another
that follows the same contract, see ``harness``); each lists its cases with ``cases(...)`` and
the runner runs every case, one at a time unless ``--jobs`` says otherwise, in a fresh child
process. Cases of a peer that is missing here are reported as skipped with the reason.

Every row carries its own ratio to the roofline (``x_roof``, timed in the row's process) and its
extra memory over inputs and gradients (``extra_mb``). Rows of the same (suite, N, D, V, dtype)
are compared through those: ``x_<peer>`` = ``x_roof`` / the peer's ``x_roof`` and
``mem_x_torch_eager`` = ``extra_mb`` / eager's ``extra_mb``; absolute seconds from different
processes are recorded but never divided.

Writes ``bench.json`` (results, machine, arguments), ``bench.md`` (the table, float32 and
bfloat16 side by side) and ``bench.png`` (ratio to the roofline and extra memory) to ``--out``.
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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import harness

SCHEMA_VERSION = 2
DEFAULT_PACKAGE = "leanloss.cli.bench"
# Peers every row is compared with (same suite, shape and dtype), in the order of the JSON keys.
PEERS = ("torch_eager", "torch_compile", "cut_cross_entropy", "torch_chunked", "liger")
GROUP_KEYS = ("suite", "N", "D", "V", "dtype", "softcap")  # rows compared as peers
ROW_KEYS = ("suite", "N", "D", "V", "impl")
DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}

Row = Dict[str, Any]


class BenchSetupError(RuntimeError):
    """The benchmark package could not be loaded (said in words the user can act on)."""


@dataclass
class Suites:
    """The loaded benchmark package: its suites, and the ones that are absent or fail to import."""

    package: str
    modules: Dict[str, ModuleType]
    missing: List[str] = field(default_factory=list)
    broken: Dict[str, str] = field(default_factory=dict)


def load_suites(package: str = DEFAULT_PACKAGE) -> Suites:
    """Import ``package`` and every suite named in its ``SUITES``; a suite whose module does not
    exist is listed in ``missing``, one that fails to import in ``broken``."""
    try:
        pkg = importlib.import_module(package)
    except ImportError as exc:
        raise BenchSetupError(f"cannot import the benchmark package {package!r}: {exc}") from exc
    names = getattr(pkg, "SUITES", None)
    if not isinstance(names, (tuple, list)):
        raise BenchSetupError(f"{package!r} is not a benchmark package: it has no SUITES tuple")
    suites = Suites(package=package, modules={})
    for name in names:
        module_name = f"{package}.{name}"
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
    suite's ``cases()`` is called once per (vocab, dtype, implementation) with single values."""

    quick: bool = False
    vocab: Optional[List[int]] = None
    tokens: Optional[int] = None
    hidden: Optional[int] = None
    dtype: Optional[List[str]] = None
    only: Optional[List[str]] = None


def _split_only(only: Optional[Sequence[str]], suite_names: Sequence[str]) -> Tuple[Optional[list], Optional[list]]:
    if not only:
        return None, None
    suites = [o for o in only if o in suite_names]
    impls = [o for o in only if o not in suite_names]
    return suites or None, impls or None


def select_cases(suites: Suites, sel: Selection) -> List[Row]:
    """Every case to run (or to report as skipped), in suite order, without duplicates."""
    only_suites, only_impls = _split_only(sel.only, list(suites.modules) + suites.missing + list(suites.broken))
    cases: List[Row] = []
    seen = set()
    for name, module in suites.modules.items():
        if only_suites and name not in only_suites:
            continue
        vocabs: List[Optional[int]] = [*sel.vocab] if sel.vocab else [None]
        dtypes: List[Optional[str]] = [*sel.dtype] if sel.dtype else [None]
        impls: List[Optional[str]] = [*only_impls] if only_impls else [None]
        for vocab in vocabs:
            for dtype in dtypes:
                for impl in impls:
                    try:
                        listed = module.cases(quick=sel.quick, vocab=vocab, tokens=sel.tokens,
                                              hidden=sel.hidden, dtype=dtype, only=impl)
                    except Exception as exc:  # noqa: BLE001
                        suites.broken[name] = f"cases() failed: {type(exc).__name__}: {exc}"
                        break
                    for case in listed:
                        case = {"suite": name, **case}
                        key = json.dumps(case, sort_keys=True)
                        if key not in seen:
                            seen.add(key)
                            cases.append(case)
    return cases


# --------------------------------------------------------------------------------------------
# running and comparing
# --------------------------------------------------------------------------------------------


def run_cases(suites: Suites, cases: List[Row], timeout: float, jobs: int,
              progress: Optional[Callable[[Row, Row], None]] = None) -> List[Row]:
    """Run every case in a fresh child (``jobs`` at a time); a case that carries ``skipped`` is
    not run. Results keep the cases' order."""
    results: List[Row] = [{} for _ in cases]

    def one(i: int) -> None:
        case = cases[i]
        if "skipped" in case:
            results[i] = dict(case)
        else:
            start = time.perf_counter()
            results[i] = harness.run_in_subprocess(f"{suites.package}.{case['suite']}", case, timeout)
            results[i]["child_wall_s"] = round(time.perf_counter() - start, 3)
        if progress is not None:
            progress(case, results[i])

    if jobs <= 1:
        for i in range(len(cases)):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, range(len(cases))))
    return results


def measured(row: Row) -> bool:
    return "error" not in row and "skipped" not in row


def group_key(row: Row) -> tuple:
    return tuple(row.get(k) for k in GROUP_KEYS)


def add_ratios(results: List[Row]) -> List[Row]:
    """Add ``x_<peer>`` (ratio of the two rows' ``x_roof``) and ``mem_x_torch_eager`` (ratio of
    extra memory) to every measured row whose group holds that peer."""
    peers: Dict[tuple, Dict[str, Row]] = {}
    for row in results:
        if measured(row) and row.get("impl") in PEERS:
            peers.setdefault(group_key(row), {})[row["impl"]] = row
    for row in results:
        if not measured(row):
            continue
        found = peers.get(group_key(row), {})
        for impl in PEERS:
            peer = found.get(impl)
            if peer is not None and peer is not row and peer.get("x_roof") and row.get("x_roof"):
                row[f"x_{impl}"] = row["x_roof"] / peer["x_roof"]
        eager = found.get("torch_eager")
        if eager is not None and eager.get("extra_mb", 0) > 0 and "extra_mb" in row:
            row["mem_x_torch_eager"] = row["extra_mb"] / eager["extra_mb"]
    return results


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


def _machine() -> Dict[str, Any]:
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


def write_json(path: Path, results: List[Row], suites: Suites, args: Dict[str, Any],
               machine: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``bench.json``; ``machine`` defaults to this one's."""
    import leanloss

    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "leanloss": leanloss.__version__,
        "machine": machine if machine is not None else _machine(),
        "method": harness.__doc__,
        "args": args,
        "suites_run": sorted({r["suite"] for r in results if measured(r)}),
        "suites_missing": suites.missing,
        "suites_broken": suites.broken,
        "results": results,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


# Suite-specific figures shown in the "notes" column when a row has them (the peer ratios
# x_<peer> are in the JSON; in the table the x roof columns compare the rows).
NOTE_KEYS = (("value_checks_pct", ".3f"), ("overhead_pct", ".1f"), ("cold_first_s", ".2f"),
             ("warm_cache_first_s", ".2f"))


def _notes(r: Row) -> str:
    label = DTYPE_LABELS.get(r.get("dtype", ""), r.get("dtype", ""))
    notes = " ".join(f"{k}={format(r[k], f)}" for k, f in NOTE_KEYS if isinstance(r.get(k), (int, float)))
    return f"{label}: {notes}" if notes else ""


def _num(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _dtypes(results: List[Row]) -> List[str]:
    order = list(DTYPE_LABELS)
    found = {r.get("dtype") for r in results}
    return [d for d in order if d in found] + sorted(d for d in found if d not in order and d is not None)


def table_rows(results: List[Row]) -> Tuple[List[str], List[List[str]]]:
    """Header and cells of the results table: one row per (suite, N, D, V, impl), and per dtype
    three columns: ratio to the roofline, extra MB, seconds (the median step)."""
    dtypes = _dtypes(results)
    header = ["suite", "impl", "N", "D", "V"]
    for dt in dtypes:
        label = DTYPE_LABELS.get(dt, dt)
        header += [f"{label} x roof", f"{label} extra MB", f"{label} s"]
    by_row: Dict[tuple, Dict[Optional[str], Row]] = {}
    for r in results:
        by_row.setdefault(tuple(r.get(k) for k in ROW_KEYS), {})[r.get("dtype")] = r
    notes = {key: "; ".join(n for n in (_notes(r) for r in rows.values()) if n) for key, rows in by_row.items()}
    notes_col = any(notes.values())
    header += ["notes"] if notes_col else []
    cells = []
    for key, rows in by_row.items():
        suite, n, d, v, impl = key
        row = [str(suite), str(impl), str(n), str(d), str(v)]
        for dt in dtypes:
            one = rows.get(dt)
            if one is None:
                row += ["", "", ""]
            elif "error" in one:
                row += ["error", "", ""]
            elif "skipped" in one:
                row += ["skipped", "", ""]
            else:
                row += [_num(one.get("x_roof"), ".2f"), _num(one.get("extra_mb"), ".0f"), _num(one.get("time_s"), ".3f")]
        if notes_col:
            row.append(notes[key])
        cells.append(row)
    return header, cells


def _reasons(results: List[Row]) -> List[str]:
    lines = []
    for r in results:
        what = f"{r.get('suite')} {r.get('impl')} N={r.get('N')} D={r.get('D')} V={r.get('V')} {r.get('dtype')}"
        if "error" in r:
            lines.append(f"error in {what}: {r['error']}")
        elif "skipped" in r:
            lines.append(f"skipped {what}: {r['skipped']}")
    return lines


def print_table(console: Any, results: List[Row]) -> None:
    from rich.markup import escape
    from rich.table import Table

    header, cells = table_rows(results)
    table = Table(title="leanloss bench: forward + backward; x roof = time / the matmuls alone, same process",
                  show_lines=False)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 or name == "notes" else "right", no_wrap=name != "notes")
    for row in cells:
        table.add_row(*row)
    console.print(table)
    for line in _reasons(results):
        style = "red" if line.startswith("error") else "yellow"
        console.print(f"[{style}]{escape(line)}[/{style}]", highlight=False)


def write_markdown(path: Path, results: List[Row], machine: Dict[str, Any]) -> None:
    """The results table as Markdown (for docs/ and the README), with the machine it ran on."""
    header, cells = table_rows(results)
    lines = [f"Machine: {', '.join(f'{k}={v}' for k, v in machine.items())}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if c else " " for c in row) + " |" for row in cells]
    reasons = _reasons(results)
    if reasons:
        lines += [""] + [f"- {line}" for line in reasons]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, results: List[Row]) -> None:
    """Two panels of horizontal bars, one bar per dtype for each (suite, shape, impl): the ratio
    to the roofline and the extra memory."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ok = [r for r in results if measured(r)]
    labels = list(dict.fromkeys(f"{r['suite']} N={r.get('N')} D={r.get('D')} V={r.get('V')}  {r.get('impl')}"
                                for r in ok)) or ["(no results)"]
    dtypes = _dtypes(ok)
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.32 * len(labels) * max(1, len(dtypes))), squeeze=False)
    height = 0.8 / max(1, len(dtypes))
    for panel, (key, title) in zip(axes[0], (("x_roof", "time / the matmuls alone (same process)"),
                                             ("extra_mb", "extra memory over inputs + grads (MiB)"))):
        for j, dt in enumerate(dtypes):
            ys, xs = [], []
            for r in ok:
                if r.get("dtype") == dt and isinstance(r.get(key), (int, float)):
                    label = f"{r['suite']} N={r.get('N')} D={r.get('D')} V={r.get('V')}  {r.get('impl')}"
                    ys.append(labels.index(label) + j * height)
                    xs.append(r[key])
            panel.barh(ys, xs, height=height, label=DTYPE_LABELS.get(dt, dt))
        panel.set_yticks([i + height * (len(dtypes) - 1) / 2 for i in range(len(labels))], labels, fontsize=8)
        panel.invert_yaxis()
        panel.set_title(title, fontsize=10)
        panel.grid(True, axis="x", alpha=0.3)
        if key == "x_roof":
            panel.axvline(1.0, color="black", linewidth=0.8)
        if dtypes:
            panel.legend(fontsize=8)
    axes[0][1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CASE_KEYS = ("suite", "impl") + GROUP_KEYS[1:]


def merge(paths: Sequence[Path], out: Path) -> int:
    """``leanloss bench --merge A/bench.json B/bench.json ... --out DIR``: the results of earlier
    runs in one table. Each row keeps the figures of the process that measured it (its ratio to
    the roofline was taken there); for a case present in several files the later file wins.
    Peer ratios (``x_<peer>``) are recomputed between the merged rows of one shape and dtype."""
    rows: Dict[tuple, Row] = {}
    sources = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
            results = doc["results"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"leanloss bench --merge: cannot read results from {path}: {exc}", file=sys.stderr)
            return 2
        sources.append({"path": str(path), "created": doc.get("created"), "machine": doc.get("machine")})
        for row in results:
            row = {k: v for k, v in row.items() if not k.startswith("x_") or k == "x_roof"}
            row.pop("mem_x_torch_eager", None)
            rows[tuple(row.get(k) for k in CASE_KEYS)] = row
    results = add_ratios(list(rows.values()))
    machines = [src["machine"] for src in sources if src["machine"]]
    if machines and any(m != machines[0] for m in machines):
        print("leanloss bench --merge: the files come from different machines; their figures do not "
              "compare", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", results, Suites("merged", {}), {"merged_from": sources},
               machine=machines[0] if machines else None)
    write_markdown(out / "bench.md", results, machines[0] if machines else _machine())
    try:
        write_plot(out / "bench.png", results)
    except ImportError:
        print("leanloss bench --merge: no matplotlib, bench.png not written", file=sys.stderr)
    print(f"merged {len(results)} rows from {len(paths)} file(s) into {out}")
    return 0


def run(sel: Selection, out: Path, *, timeout: Optional[float] = None, jobs: Optional[int] = None,
        package: str = DEFAULT_PACKAGE) -> int:
    """``leanloss bench``: returns the exit status (1 when a case or suite failed)."""
    try:
        import matplotlib  # noqa: F401 - needed at the end, for the plot: fail before running anything
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        print("leanloss bench needs rich and matplotlib: pip install 'leanloss[bench]'", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        suites = load_suites(package)
    except BenchSetupError as exc:
        console.print(f"[red]leanloss bench:[/red] {exc}")
        return 2
    cases = select_cases(suites, sel)
    for name in suites.missing:
        console.print(f"suite {name}: no module {package}.{name}, skipped")
    for name, why in suites.broken.items():
        console.print(f"[red]suite {name} failed to load:[/red] {why}")
    if not cases:
        console.print("[yellow]no benchmark cases selected[/yellow]")
    timeout = timeout if timeout is not None else (300.0 if sel.quick else 1800.0)
    jobs = 1 if jobs is None else jobs
    with Progress(TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("benchmarks", total=len(cases))

        def advance(case: Row, result: Row) -> None:
            status = ("failed" if "error" in result else "skipped" if "skipped" in result
                      else f"x roof {result.get('x_roof', float('nan')):.2f}")
            label = f"{case['suite']} {case.get('impl')} {DTYPE_LABELS.get(case.get('dtype', ''), '')}: {status}"
            progress.update(task, advance=1, description=label[:48])

        results = run_cases(suites, cases, timeout, jobs, advance)
    add_ratios(results)
    print_table(console, results)
    out.mkdir(parents=True, exist_ok=True)
    args = {"quick": sel.quick, "vocab": sel.vocab, "tokens": sel.tokens, "hidden": sel.hidden,
            "dtype": sel.dtype, "only": sel.only, "jobs": jobs, "timeout_s": timeout, "package": package}
    write_json(out / "bench.json", results, suites, args)
    write_plot(out / "bench.png", results)
    write_markdown(out / "bench.md", results, _machine())
    console.print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'}")
    if jobs > 1:
        console.print(f"({jobs} cases ran at a time: they shared the cores, so times and ratios are rough)")
    failed = [r for r in results if "error" in r]
    if failed:
        console.print(f"[red]{len(failed)} case(s) failed[/red]")
    return 1 if failed or suites.broken else 0
