"""``import leanloss`` stays cheap: the compiler, transformers and the CLI's libraries load only
when used; the lazy graph break still breaks the graph under ``torch.compile``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import leanloss
from leanloss._compile import graph_break
from leanloss.cli.bench.import_cost import HEAVY

SRC = str(Path(leanloss.__file__).resolve().parents[1])


def _fresh(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_import_leanloss_loads_no_heavy_module():
    code = ("import json, sys, torch\nbefore = set(sys.modules)\nimport leanloss\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules and m not in before]))")
    assert json.loads(_fresh(code)) == []


def test_eager_calls_of_the_fused_losses_load_no_compiler():
    code = ("import json, sys, torch, leanloss\n"
            "h = torch.randn(8, 4, requires_grad=True); w = torch.randn(16, 4, requires_grad=True)\n"
            "t = torch.randint(0, 16, (8,))\n"
            "leanloss.linear_cross_entropy(h, w, t).backward()\n"
            "leanloss.linear_distill_loss(h, w, h.detach(), w.detach(), t).backward()\n"
            "leanloss.parallel.vocab_parallel_cross_entropy(h @ w.T, t).backward()\n"
            "print(json.dumps('torch._dynamo' in sys.modules))")
    assert json.loads(_fresh(code)) is False


def test_graph_break_runs_the_function_eagerly_under_compile():
    seen = []

    @graph_break
    def eager_only(x):
        """doc"""
        seen.append(torch.compiler.is_compiling())
        return x.sum().item() * x  # .item() would need a graph break of its own if traced

    assert eager_only.__doc__ == "doc" and eager_only.__name__ == "eager_only"
    x = torch.arange(4.0)
    assert torch.equal(eager_only(x), 6.0 * x) and seen == [False]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda y: eager_only(y * 2) + 1)(x)
    assert explained.graph_break_count == 1
    compiled = torch.compile(lambda y: eager_only(y * 2) + 1, backend="eager")
    assert torch.equal(compiled(x), 12.0 * 2 * x + 1)
    assert seen[1:] and not any(seen[1:])  # never traced: every call ran eagerly
