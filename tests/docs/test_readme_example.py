"""The README's first example (included into the documentation's home and getting-started
pages) runs as printed, its assertion holds, and the gradient it computes is torch's."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from leanloss._fused import kernels

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_section(name: str) -> str:
    """The text between the README's ``[start:name]`` and ``[end:name]`` snippet markers."""
    found = re.search(rf"\[start:{name}\][^\n]*\n(.*?)\n[^\n]*\[end:{name}\]", README.read_text(), flags=re.S)
    assert found is not None, f"README.md has no snippet section {name!r}"
    return found.group(1)


def test_readme_example_runs():
    code = re.fullmatch(r"```python\n(.*)\n```", readme_section("example"), flags=re.S)
    assert code is not None, "the README's example section is not one python code block"
    previous = kernels.get_kernel_mode()
    kernels.set_kernel_mode("eager")  # the same values as compiled, without a compile in the suite
    try:
        namespace: dict = {}
        exec(compile(code.group(1), str(README), "exec"), namespace)
    finally:
        kernels.set_kernel_mode(previous)
    loss, dense, hidden = namespace["loss"], namespace["dense"], namespace["hidden"]
    assert loss.dtype == torch.float32 and loss.ndim == 0
    # the fused gradient the example's backward left equals torch's through the dense logits
    (dense_grad,) = torch.autograd.grad(dense, hidden)
    torch.testing.assert_close(hidden.grad, dense_grad)
