"""The preference score of an answer, as in the published StackLLaMA datasets."""

from __future__ import annotations

import math


def pm_score(score: int, accepted: bool, accepted_bonus_for_negative: bool = False) -> int:
    """`-1` if `score < 0`, else `round(log2(1 + score))`, plus 1 for the accepted answer.

    This is the rule of `HuggingFaceH4/stack-exchange-preferences`: a negative answer that
    was accepted keeps `-1` there. `accepted_bonus_for_negative=True` gives it the +1 too.
    `log2(1 + score)` is never exactly a half for an integer score, so `round` has no ties:
    0 -> 0, 1 -> 1, 2..4 -> 2, 5..10 -> 3, 11..21 -> 4.
    """
    if score < 0:
        return -1 + (1 if accepted and accepted_bonus_for_negative else 0)
    return round(math.log2(1 + score)) + (1 if accepted else 0)
