"""Numbers and text for Markdown: figures with intervals, code fences and spans that survive backticks."""

from __future__ import annotations

import math


def fmt(value, digits: int = 3, percent: bool = False) -> str:
    """A number for the report; `n/a` for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if percent:
        return f"{100 * value:.1f}%"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def fmt_ci(value, ci, digits: int = 3, percent: bool = False) -> str:
    if not ci:
        return fmt(value, digits, percent)
    return f"{fmt(value, digits, percent)} [{fmt(ci[0], digits, percent)}, {fmt(ci[1], digits, percent)}]"


def fenced(text: str, info: str = "text") -> str:
    """`text` in a code fence longer than any backtick run inside it, so nothing in it is Markdown."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def code(text: str) -> str:
    """An inline code span that survives backticks in `text`."""
    text = str(text).replace("\n", " ")
    ticks = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " […]"


def parameters(n) -> str:
    if not n:
        return "n/a"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
