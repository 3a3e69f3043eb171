"""The filter language of ``<Class>.get_all_records_where`` (§1.6).

``field "name__label" = "x" and not (field "is_a_template" = "true" or false)``: field names
use ``__`` for the datamodel's namespaces, booleans compare as ``true``/``false``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from xobackup_hypervisor_xcpng.sim.codec import XapiError

_TOKEN = re.compile(r'\s*(?:(\()|(\))|(=)|"((?:[^"\\]|\\.)*)"|([A-Za-z_]+))')

Predicate = Callable[[dict[str, Any]], bool]


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    position = 0
    expr = expr.strip()
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if not match or match.end() == position:
            raise XapiError("INTERNAL_ERROR", f"cannot parse the filter at {expr[position:]!r}")
        position = match.end()
        lparen, rparen, equals, string, word = match.groups()
        if lparen:
            out.append(("(", "("))
        elif rparen:
            out.append((")", ")"))
        elif equals:
            out.append(("=", "="))
        elif string is not None:
            out.append(("str", string.replace('\\"', '"')))
        else:
            out.append(("word", word.lower()))
        while position < len(expr) and expr[position].isspace():
            position += 1
    return out


def compile_filter(expr: str) -> Predicate:
    """A predicate on records; XapiError on a malformed expression."""
    tokens = _tokens(expr)
    position = 0

    def peek() -> tuple[str, str] | None:
        return tokens[position] if position < len(tokens) else None

    def take(kind: str, value: str | None = None) -> str:
        nonlocal position
        token = peek()
        if token is None or token[0] != kind or (value is not None and token[1] != value):
            raise XapiError("INTERNAL_ERROR", f"filter {expr!r}: expected {value or kind}")
        position += 1
        return token[1]

    def primary() -> Predicate:
        token = peek()
        if token == ("(", "("):
            take("(")
            inner = disjunction()
            take(")")
            return inner
        if token == ("word", "not"):
            take("word")
            inner = primary()
            return lambda record: not inner(record)
        if token == ("word", "true"):
            take("word")
            return lambda record: True
        if token == ("word", "false"):
            take("word")
            return lambda record: False
        take("word", "field")
        name = take("str").replace("__", "_")
        take("=")
        wanted = take("str")
        return lambda record: _as_text(record.get(name, "")) == wanted

    def conjunction() -> Predicate:
        left = primary()
        while peek() == ("word", "and"):
            take("word")
            right = primary()
            left = (lambda a, b: lambda record: a(record) and b(record))(left, right)
        return left

    def disjunction() -> Predicate:
        left = conjunction()
        while peek() == ("word", "or"):
            take("word")
            right = conjunction()
            left = (lambda a, b: lambda record: a(record) or b(record))(left, right)
        return left

    if not tokens:
        return lambda record: True
    predicate = disjunction()
    if position != len(tokens):
        raise XapiError("INTERNAL_ERROR", f"filter {expr!r}: unexpected {tokens[position][1]!r}")
    return predicate
