"""leanloss._docs.fill: the shared docstring entries replace the ``@doc NAME`` lines, in the
public function and in every function it wraps (``inspect.unwrap``, which documentation
generators call, reads the innermost one)."""
from __future__ import annotations

import functools
import inspect

import leanloss
import leanloss.parallel
from leanloss import _docs


def test_fill_replaces_marks_through_the_wrapped_chain():
    def inner():
        """Head.

        Args:
            @doc z_loss
        """

    @functools.wraps(inner)
    def outer():
        return inner()

    mark_line = next(line for line in inner.__doc__.splitlines() if "@doc" in line)
    indent = mark_line[: len(mark_line) - len(mark_line.lstrip())]
    filled = _docs.fill(outer)
    for fn in (filled, inspect.unwrap(filled)):
        assert "@doc" not in fn.__doc__
        # the entry, re-indented to the mark's indent
        assert indent + _docs.DOCS["z_loss"].splitlines()[0] in fn.__doc__.splitlines()


def test_public_docstrings_hold_no_unfilled_marks():
    functions = [getattr(leanloss, name) for name in leanloss.__all__]
    functions += [getattr(leanloss.parallel, name) for name in leanloss.parallel.__all__]
    for fn in functions:
        for doc in (fn.__doc__, inspect.unwrap(fn).__doc__):
            assert doc is None or "@doc " not in doc, f"{fn.__name__}'s docstring keeps an '@doc' line"
