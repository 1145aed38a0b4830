"""The terminal side of `scripts/chat.py`: questions from `--question`, the terminal or stdin, each
policy's answer streamed as it is generated, then its score and length, and a table for several."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TextIO

from .answer import Answer, SamplingSettings
from .session import ChatSession

PROMPT = "Question (empty line or Ctrl-D to quit): "


def questions(question: str | None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> Iterator[str]:
    """`question` alone, else one per line from the terminal (with a prompt) or from piped stdin, until an
    empty line or end of input."""
    if question is not None:
        yield question
        return
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write(PROMPT)
            stdout.flush()
        line = stdin.readline()
        if not line or not line.strip():
            return
        yield line.strip()


def answer_all(session: ChatSession, question: str, settings: SamplingSettings, out: TextIO = sys.stdout) -> list[Answer]:
    """Every policy's answer to `question`, streamed to `out` as generated, then scored; a table when several."""
    answers = []
    many = len(session.policies) > 1
    for answer_stream in session.streams(question, settings):
        policy = answer_stream.policy
        if many:
            out.write(f"\n── {policy.name} ({policy.path})\n")
        for piece in answer_stream:
            out.write(piece)
            out.flush()
        answer = answer_stream.answer
        out.write(f"\n   [{answer.summary()}]\n")
        answers.append(answer)
    if many:
        out.write("\n" + comparison_table(answers) + "\n")
    out.flush()
    return answers


def chat(session: ChatSession, question: str | None, settings: SamplingSettings, stdin: TextIO = sys.stdin,
         out: TextIO = sys.stdout) -> int:
    """Answer `question`, or every question typed or piped in; the exit status. Ctrl-C ends the chat
    quietly (status 130, as a shell reports an interrupt), mid-answer too."""
    try:
        for asked in questions(question, stdin, out):
            answer_all(session, asked, settings, out)
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        return 130
    return 0


def comparison_table(answers: Iterable[Answer]) -> str:
    """Policy, reward score, tokens, and whether the answer ended with EOS, one row per policy."""
    rows = [("policy", "reward", "tokens", "ended with EOS")]
    for a in answers:
        rows.append((a.policy, "-" if a.score is None else f"{a.score:.3f}", str(a.tokens), "yes" if a.ended else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
