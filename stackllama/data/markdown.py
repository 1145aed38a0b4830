"""HTML post bodies -> Markdown, with fenced code blocks that keep their language.

Stack Exchange marks a code block's language on the `<pre>` (`class="lang-py
prettyprint-override"`) and newer posts sometimes on the `<code>` (`class="language-py"`);
both become ```` ```py ````. Everything else is markdownify's conversion; runs of blank
lines outside code blocks are collapsed to one, as in the published datasets.
"""

from __future__ import annotations

import re

from markdownify import MarkdownConverter

_LANG_PREFIXES = ("lang-", "language-")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _classes(el) -> list[str]:
    cls = el.get("class") or []
    return cls.split() if isinstance(cls, str) else list(cls)


def code_language(pre) -> str:
    """The language of a `<pre>` block from its own or its `<code>` child's class, or ''."""
    candidates = _classes(pre)
    code = pre.find("code")
    if code is not None:
        candidates += _classes(code)
    for cls in candidates:
        for prefix in _LANG_PREFIXES:
            if cls.startswith(prefix):
                lang = cls[len(prefix):]
                return "" if lang in ("none", "default") else lang
    return ""


def collapse_blank_lines(markdown: str) -> str:
    """Collapse runs of blank lines to one, except inside fenced code; strip the ends."""
    out: list[str] = []
    in_code = False
    blank_run = 0
    for line in markdown.split("\n"):
        if _FENCE.match(line):
            in_code = not in_code
        if not in_code and not line.strip():
            blank_run += 1
            if blank_run > 1:
                continue
            line = ""
        else:
            blank_run = 0
        out.append(line)
    return "\n".join(out).strip()


class HtmlToMarkdown:
    """A reusable converter (building one per post would cost more than the conversion)."""

    def __init__(self) -> None:
        self._converter = MarkdownConverter(heading_style="atx", code_language_callback=code_language)

    def __call__(self, html: str) -> str:
        if not html:
            return ""
        return collapse_blank_lines(self._converter.convert(html))


_default: HtmlToMarkdown | None = None


def html_to_markdown(html: str) -> str:
    """Convert one post body; see `HtmlToMarkdown`."""
    global _default
    if _default is None:
        _default = HtmlToMarkdown()
    return _default(html)
