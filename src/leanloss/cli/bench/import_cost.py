"""What ``import leanloss`` costs beyond ``import torch``: ``python -m leanloss.cli.bench.import_cost``.

Each sample is a fresh Python process that imports torch, then leanloss, and reports the wall
time and the resident-set growth of the second import, and which heavy modules it pulled in beyond
those ``import torch`` loads (``torch._dynamo``, transformers, rich, matplotlib must not be among
them: they load when used).
Prints the median of ``--runs`` samples (default 5) and, with ``--json``, the raw samples.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional

HEAVY = ("torch._dynamo", "torch._inductor", "sympy", "transformers", "rich", "matplotlib")

_CHILD = """
import json, os, sys, time
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); r1 = rss()
before = set(sys.modules)
import leanloss
t2 = time.perf_counter(); r2 = rss()
print(json.dumps({"torch_s": t1 - t0, "torch_rss_mb": r1 / 2**20, "leanloss_s": t2 - t1,
                  "leanloss_rss_mb": (r2 - r1) / 2**20,
                  "heavy_loaded": [m for m in %r if m in sys.modules and m not in before]}))
""" % (HEAVY,)


def sample() -> Dict[str, Any]:
    """One fresh process: import torch, then leanloss."""
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True)
    result: Dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(runs: int = 5) -> Dict[str, Any]:
    samples: List[Dict[str, Any]] = [sample() for _ in range(runs)]
    summary: Dict[str, Any] = {k: statistics.median(s[k] for s in samples)
                               for k in ("torch_s", "torch_rss_mb", "leanloss_s", "leanloss_rss_mb")}
    summary["heavy_loaded"] = sorted({m for s in samples for m in s["heavy_loaded"]})
    summary["runs"] = runs
    summary["samples"] = samples
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes to sample (default 5)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = measure(args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"import torch:    {result['torch_s']:.3f} s, {result['torch_rss_mb']:.0f} MB RSS "
              f"(median of {args.runs} fresh processes)")
        print(f"import leanloss: {result['leanloss_s']:.3f} s, {result['leanloss_rss_mb']:.1f} MB RSS beyond torch")
        print(f"heavy modules loaded by it: {', '.join(result['heavy_loaded']) or 'none'}")
    return 0 if not result["heavy_loaded"] else 1


if __name__ == "__main__":
    sys.exit(main())
