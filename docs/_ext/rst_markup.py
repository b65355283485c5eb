"""Griffe extension used by the documentation build: the docstrings' reStructuredText markup as
Markdown, so that the API reference reads as the docstrings do in ``help()``.

* ``:func:`name``` and the other cross-reference roles become code spans (``~`` keeps the last
  component, as Sphinx shows it);
* ``:math:`x``` becomes a code span and a ``.. math::`` directive a code block (the formulas
  stay in their LaTeX source: the site loads no math renderer from the network);
* a paragraph ending in ``::`` ends in ``:`` (the indented block after it is already a code
  block in Markdown).
"""
from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

__all__ = ["RstMarkup", "to_markdown"]

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj|math):`(?P<tilde>~?)(?P<text>[^`]+)`")
_MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")
_LITERAL = re.compile(r"(?<=\S)::$", re.M)


def _role(match: re.Match) -> str:
    text = match["text"]
    return f"`{text.rsplit('.', 1)[-1] if match['tilde'] else text}`"


def _math_blocks(text: str) -> str:
    """Each ``.. math::`` directive (its argument and its more-indented lines) as a fenced block."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        m = _MATH.match(lines[i])
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        indent, body = m["indent"], [m["rest"]] if m["rest"] else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        formula = textwrap.dedent("\n".join(body)).strip("\n")
        out += [f"{indent}```text", *textwrap.indent(formula, indent).splitlines(), f"{indent}```", ""]
    return "\n".join(out)


def to_markdown(text: str) -> str:
    """``text`` with the reStructuredText markup above rewritten as Markdown."""
    return _LITERAL.sub(":", _ROLE.sub(_role, _math_blocks(text)))


class RstMarkup(griffe.Extension):
    """Rewrite every docstring griffe loads with :func:`to_markdown`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
