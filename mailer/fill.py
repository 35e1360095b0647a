"""The fast path: a template of text and `{{ name }}` only, filled in without Jinja2.

Most newsletters are such a template. Filling in the names does what its compiled code does
(each name looked up, finalized, made a str, escaped in HTML) without Jinja2's per-render
context, generator and per-piece calls; it pays for its place (BENCHMARKS.md, "the fill fast
path"). Whatever it does not print exactly as Jinja2 would, it leaves to Jinja2 by raising
Unplain: a name not in the context (StrictUndefined's error, or a global such as `range`,
which the finalize refuses), a value that is not a str, int or float (or an int too long to
print), an output over MAX_OUTPUT (counted as it grows, so that a value printed many times is
refused before it is built whole). `self`, which Jinja2 binds to the template, is never
filled in. tests/test_fill.py checks it against Jinja2 on random templates and values.
"""

from __future__ import annotations

from typing import Any

import jinja2
import markupsafe
from jinja2 import nodes

from mailer.sandbox import MAX_OUTPUT


class Unplain(Exception):
    """A value that Fill does not print as Jinja2 would by itself (Jinja2 renders it)."""


class Fill:
    """A template of text and names: `pieces` alternate text and a name, text at both ends."""

    __slots__ = ("escape", "pieces", "text")

    def __init__(self, pieces: tuple[str, ...], escape: bool) -> None:
        self.pieces = pieces  # text, name, text, name, ..., text
        self.escape = escape
        self.text = sum(map(len, pieces[::2]))  # the template's own text, in characters

    @classmethod
    def of(cls, env: jinja2.Environment, tree: nodes.Template) -> Fill | None:
        """The parsed template as a Fill, or None if it holds more than text and names."""
        pieces = [""]
        for node in tree.body:
            if not isinstance(node, nodes.Output):
                return None
            for child in node.nodes:
                if isinstance(child, nodes.TemplateData):
                    pieces[-1] += child.data
                # `self` is Jinja2's own (the template), whatever the context holds
                elif isinstance(child, nodes.Name) and child.ctx == "load" and child.name != "self":
                    pieces += [child.name, ""]
                else:
                    return None
        return cls(tuple(pieces), env.autoescape is True)

    def fill(self, context: dict[str, Any]) -> str:
        """The template filled in, or Unplain: then Jinja2 renders it, or says what is wrong."""
        out = list(self.pieces)
        escape = self.escape
        size = self.text
        try:
            for i in range(1, len(out), 2):
                value = context[out[i]]
                kind = type(value)
                if kind is not str:
                    if kind is not int and kind is not float:
                        raise Unplain
                    value = str(value)  # (ValueError: an int of over 4,300 digits)
                if escape:
                    value = markupsafe.escape(value)
                # counted as it grows, as sandbox.render counts: a value printed many times
                # stops at the limit, not after all of it is built
                size += len(value)
                if size > MAX_OUTPUT:
                    raise Unplain
                out[i] = value
        except (KeyError, ValueError):
            raise Unplain from None
        return "".join(out)
