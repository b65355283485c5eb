"""The ``leanloss`` command: ``leanloss tour [--section N]``, ``leanloss bench [...]``, ``--version``.

The applications of the library live in this package: the tour (:mod:`.tour`) and the
identities it teaches (:mod:`.identities`), and the benchmark runner with its suites
(:mod:`.bench`). Nothing in ``leanloss`` outside this package imports it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

DTYPES = ("float32", "bfloat16", "float16")


def _ints(text: str) -> List[int]:
    """``"32000,131072"`` -> ``[32000, 131072]``."""
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    values = _ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _flatten(groups: Optional[List[List]]) -> Optional[List]:
    if not groups:
        return None
    out: List = []
    for group in groups:
        for item in group:
            if item not in out:
                out.append(item)
    return out


def _version() -> str:
    import torch

    from .. import __version__

    return f"leanloss {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    from . import tour
    from .bench.runner import DEFAULT_PACKAGE

    parser = argparse.ArgumentParser(
        prog="leanloss",
        description="leanloss: entropy-family losses for PyTorch, exact to torch, lean, safe.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="{tour,bench}")
    sub.required = True

    p_tour = sub.add_parser("tour", help="the losses' lessons, computed live, leanloss next to torch")
    p_tour.add_argument("--section", type=int, choices=range(1, len(tour.STEPS) + 1), metavar="N",
                        help=f"run one step (1-{len(tour.STEPS)}): "
                        + "; ".join(f"{i} {t}" for i, (t, _) in enumerate(tour.STEPS, 1)))

    p_bench = sub.add_parser("bench", help="run the benchmark suites: table, bench.json, bench.md, bench.png")
    p_bench.add_argument("--quick", action="store_true",
                         help="one case per suite (N=2048, D=1024, V=32000, float32 and bfloat16), "
                         "leanloss alone: about a minute")
    p_bench.add_argument("--out", type=Path, default=Path("bench-results"),
                         help="output directory (default: ./bench-results)")
    p_bench.add_argument("--vocab", type=_ints, action="append", metavar="V[,V...]",
                         help="vocabulary sizes (repeat or comma-separate)")
    p_bench.add_argument("--tokens", type=_positive, metavar="N", help="tokens per batch")
    p_bench.add_argument("--hidden", type=_positive, metavar="D", help="hidden size")
    p_bench.add_argument("--dtype", choices=DTYPES, action="append", help="input dtype (repeatable)")
    p_bench.add_argument("--only", action="append", metavar="SUITE|IMPL",
                         help="run only this suite or implementation (repeatable, comma-separated)")
    p_bench.add_argument("--jobs", type=_positive, default=None,
                         help="cases run at once (default 1: more share the cores and blur the times)")
    p_bench.add_argument("--timeout", type=float, default=None,
                         help="seconds per case (default 300 with --quick, else 1800)")
    p_bench.add_argument("--merge", type=Path, action="append", metavar="BENCH_JSON",
                         help="run nothing: join the results of earlier runs (their bench.json files; "
                         "for a case in several, the later file wins) into --out, with the peer "
                         "ratios recomputed between rows of the same shape and dtype")
    p_bench.add_argument("--package", default=DEFAULT_PACKAGE, metavar="PKG",
                         help=f"the package of suites to run (default {DEFAULT_PACKAGE}; see its harness "
                         "module for the contract)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``leanloss`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "tour":
        from . import tour

        try:
            return tour.run(args.section)
        except BrokenPipeError:  # `leanloss tour | head`: the reader left, nothing to report
            sys.stderr.close()
            return 0
    from .bench import runner

    if args.merge:
        return runner.merge(args.merge, args.out)
    only = _flatten([[o for o in group.split(",") if o] for group in args.only]) if args.only else None
    sel = runner.Selection(quick=args.quick, vocab=_flatten(args.vocab), tokens=args.tokens,
                           hidden=args.hidden, dtype=_flatten([[d] for d in args.dtype or []]), only=only)
    return runner.run(sel, args.out, timeout=args.timeout, jobs=args.jobs, package=args.package)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
