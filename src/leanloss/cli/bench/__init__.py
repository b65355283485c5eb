"""The benchmark suites behind ``leanloss bench``, shipped with the package.

Each suite is a module of this package with ``cases(quick=..., vocab=..., tokens=..., hidden=...,
dtype=..., only=...)`` (the case dicts to run) and ``run_case(case)`` (runs one case inside a fresh
child process, ``python -m leanloss.cli.bench.<suite> --case JSON``, and returns the result of
:func:`harness.measure`). :mod:`.runner` runs them, :mod:`.harness` is what they share, and
:mod:`.import_cost` measures what ``import leanloss`` costs; :mod:`.first_call` measures what the
first fused call of a process costs beyond a warm one.
"""

SUITES = ("linear_ce", "distill", "log_probs", "checks_cost", "hf_step", "trl", "first_call")
