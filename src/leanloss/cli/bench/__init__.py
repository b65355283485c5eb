"""The benchmark suites behind ``leanloss bench``, shipped with the package.

Each suite is a module of this package with ``cases(quick=..., vocab=..., tokens=..., hidden=...,
dtype=..., only=...)`` (the case dicts to run) and ``run_case(case)`` (runs one case inside a fresh
child process, ``python -m leanloss.cli.bench.<suite> --case JSON``, and returns the result of
:func:`harness.measure`). :mod:`.runner` runs them, :mod:`.harness` is what they share, and
:mod:`.import_cost` measures what ``import leanloss`` costs.
"""

SUITES = ("linear_ce", "distill", "log_probs", "checks_cost", "hf_step", "trl")
