"""Benchmarks behind ``leanloss bench``.

Each suite is a module ``benchmarks/<suite>.py`` with ``cases(...)`` (the case dicts to run) and
``run_case(case)`` (runs one case inside a fresh child process and returns
``_harness.case_result(...)``). The runner skips suites whose module does not exist yet.
"""

SUITES = ("linear_ce", "distill", "checks_cost", "hf_step", "log_probs")
