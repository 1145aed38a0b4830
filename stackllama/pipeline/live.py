"""A running stage's progress on the console, read from the tqdm bars in its own output.

Every long stage already prints tqdm bars (the Trainer's in SFT and reward training, ``PPO
steps``, the evaluation's ``Sampling`` / ``Scoring``, the data preparation's ``parse`` and
``convert + pair``), so the driver shows what they say (step k of n, rate, time left, as tqdm
computed them) instead of guessing from the clock:

- :class:`BarParser` keeps the latest bar from the raw output chunks (``\\r`` / ``\\n``, lines
  split across chunks, ANSI codes); anything that is not a bar is ignored;
- :func:`render` writes it as one short line, e.g. ``sft: 12/40 (30%), 1.43 it/s, 00:23 left``;
- :class:`LiveProgress` shows it: on a terminal, one line rewritten in place and cleared when the
  stage ends; otherwise (a log file, CI) a plain line at most every ``interval`` seconds.
"""

from __future__ import annotations

import codecs
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

# Set for every stage: a stage whose bars are off when its output is not a terminal (the data
# preparation) shows them anyway, since the driver reads them (stackllama/data/prepare.py).
BARS_ENV = "STACKLLAMA_PROGRESS_BARS"
INDENT = "    "  # the runner's indent for lines under a stage's line

_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")
_NUM = r"\d+(?:\.\d+)?[kMGTPEZY]?"  # tqdm's n_fmt / total_fmt, plain or unit-scaled (1.23M)
# tqdm's r_bar: "| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_KNOWN = re.compile(rf"(?P<n>{_NUM})/(?P<total>{_NUM}) ?\[(?P<elapsed>[\d:]+)<(?P<remaining>[\d:]+|\?),"
                    r"(?P<rate>[^,\]]*)(?:, (?P<postfix>.*))?\]$")
# tqdm's l_bar: "{desc}: {percentage:3.0f}%|" and the bar itself up to the "|" before r_bar
_LEFT = re.compile(r"(?:(?P<desc>.*?):)?\s*(?P<percent>\d+)%\|[^|]*\|?\s*")
# no total: "{desc}: {n_fmt}{unit} [{elapsed}, {rate_fmt}{postfix}]"
_UNKNOWN = re.compile(r"(?:(?P<desc>.*?): )?(?P<n>\d+(?:\.\d+)?)(?P<unit>[^\[\]\d][^\[\]]*?)? ?\[(?P<elapsed>[\d:]+),"
                      r"(?P<rate>[^,\]]*)(?:, (?P<postfix>.*))?\]$")
_RATE = re.compile(r"(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>\S.*)")


@dataclass(frozen=True)
class Bar:
    """One tqdm bar as it printed itself (strings, so unit-scaled counts like 1.23M stay as shown)."""

    desc: str
    n: str
    total: str | None  # None: a bar without a total ("12it [00:03, 3.90it/s]")
    unit: str  # with no total, what n counts ("it", "examples"); else ""
    percent: str | None
    elapsed: str
    remaining: str | None  # None while tqdm shows "?"
    rate: str | None  # "1.43 it/s", "2.10 s/it"; None while tqdm shows "?it/s"
    postfix: str


def _rate(text: str) -> str | None:
    match = _RATE.fullmatch(text.strip())
    return f"{match['value']} {match['unit']}" if match else None


def parse_bar(line: str) -> Bar | None:
    """The bar that `line` (one \\r- or \\n-separated piece of output) shows, or None when it is not a bar."""
    line = _ANSI.sub("", line).strip()
    if not line.endswith("]"):
        return None
    if known := _KNOWN.search(line):
        prefix = line[: known.start()]
        left = _LEFT.fullmatch(prefix)
        desc = (left["desc"] or "") if left else prefix.rstrip(" |:")
        return Bar(desc.strip(), known["n"], known["total"], "", left["percent"] if left else None, known["elapsed"],
                   None if known["remaining"] == "?" else known["remaining"], _rate(known["rate"]),
                   (known["postfix"] or "").strip())
    if unknown := _UNKNOWN.fullmatch(line):
        return Bar((unknown["desc"] or "").strip(), unknown["n"], None, (unknown["unit"] or "").strip(), None,
                   unknown["elapsed"], None, _rate(unknown["rate"]), (unknown["postfix"] or "").strip())
    return None


class BarParser:
    """The latest tqdm bar in a stream of output chunks (bytes as the pipe gives them)."""

    def __init__(self, limit: int = 4096):
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode  # a character split across chunks
        self._pending = ""  # the piece after the last \r or \n: the line being written
        self._limit = limit  # a child writing one endless line costs no more than this
        self.bar: Bar | None = None

    def feed(self, chunk: bytes | str) -> bool:
        """Take the next chunk; return whether the latest bar changed."""
        text = self._decode(chunk) if isinstance(chunk, bytes) else chunk
        pieces = re.split(r"[\r\n]", self._pending + text)
        self._pending = pieces[-1][-self._limit:]
        # The piece being written counts once tqdm wrote it whole (it ends with "]"): tqdm writes
        # "\r<bar>" and the next "\r" only comes with the next update.
        for piece in reversed(pieces):
            if (bar := parse_bar(piece)) is not None:
                changed, self.bar = bar != self.bar, bar
                return changed
        return False


def render(stage: str, bar: Bar) -> str:
    """One short line: `sft: 12/40 (30%), 1.43 it/s, 00:23 left`, with the bar's description and postfix."""
    if bar.total is None:
        count = f"{bar.n} {bar.unit or 'it'}"
    else:
        count = f"{bar.n}/{bar.total}" + (f" ({bar.percent}%)" if bar.percent else "")
    head = " ".join(part for part in (f"{stage}:", bar.desc, count) if part)
    details = [bar.rate] if bar.rate else []
    details.append(f"{bar.remaining} left" if bar.remaining else f"{bar.elapsed} elapsed")
    line = ", ".join([head] + details)
    return f"{line}; {bar.postfix}" if bar.postfix else line


class LiveProgress:
    """Where a running stage's progress goes: on a terminal (`is_tty`, default `stream.isatty()`),
    one line on `stream` rewritten in place and cleared by :meth:`close`; otherwise a line through
    `out` at most every `interval` seconds (0: none), and only when it says something new."""

    def __init__(self, stage: str, out: Callable[[str], None] = print, stream: TextIO | None = None,
                 is_tty: bool | None = None, interval: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.stage, self.out, self.interval, self.clock = stage, out, interval, clock
        self.stream = stream if stream is not None else sys.stdout
        if is_tty is None:  # a dumb terminal cannot clear a line
            is_tty = self.stream.isatty() and os.environ.get("TERM") != "dumb"
        self.is_tty = is_tty
        self.parser = BarParser()
        self._shown = ""  # on a terminal: the live line on screen; otherwise: the last line printed
        self._printed_at = clock()  # a stage shorter than the interval prints no progress line

    @property
    def active(self) -> bool:
        return self.is_tty or self.interval > 0

    def feed(self, chunk: bytes) -> None:
        """The stage's next output chunk: update the live line, or print a progress line when one is due."""
        if not self.active:
            return
        changed = self.parser.feed(chunk)
        if self.parser.bar is None or self.is_tty and not changed:
            return
        line = INDENT + render(self.stage, self.parser.bar)
        if self.is_tty:
            line = line[: max(shutil.get_terminal_size().columns - 1, 20)]  # one row: no wrap on the last column
            if line != self._shown:
                self.stream.write("\r" + line + "\033[K")
                self.stream.flush()
                self._shown = line
        elif line != self._shown and self.clock() - self._printed_at >= self.interval:
            self.out(line)
            self._shown, self._printed_at = line, self.clock()

    def close(self) -> None:
        """Clear the live line, so the runner's next line starts on a clean row."""
        if self.is_tty and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = ""
