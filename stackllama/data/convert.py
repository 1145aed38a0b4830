"""Pass 2 of the preparation: for each question with >= 2 answers, convert its HTML once,
score the answers and sample pairs, in batches spread over worker processes, results in order."""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .markdown import html_to_markdown
from .options import PrepareOptions
from .pairs import sample_pairs
from .scoring import pm_score
from .store import QuestionGroup

GROUPS_PER_TASK = 64


@dataclass
class QuestionResult:
    preference: dict | None  # None when the question is skipped
    pairs: list[dict]
    skip_reason: str | None = None
    empty_answers: int = 0


def convert_batch(args: tuple[list[QuestionGroup], list[str], PrepareOptions]) -> tuple[list[QuestionResult], float, float, int]:
    """Convert and pair a batch of questions (runs in a worker process)."""
    groups, sites, opts = args
    results, t_convert, t_pair, bodies = [], 0.0, 0.0, 0
    for g in groups:
        t0 = time.perf_counter()
        site_url = f"https://{sites[g.site]}"
        body = html_to_markdown(g.body)
        texts = [html_to_markdown(a.body) for a in g.answers]
        bodies += 1 + len(g.answers)
        t1 = time.perf_counter()
        t_convert += t1 - t0
        question = body if opts.question_body_only or not g.title else f"{g.title}\n\n{body}".strip()
        if not question:
            results.append(QuestionResult(None, [], "question with an empty body"))
            continue
        answers = []
        for a, text in zip(g.answers, texts):
            if not text:
                continue
            selected = a.id == g.accepted_id
            answers.append({
                "answer_id": a.id,
                "author": a.owner_name,
                "author_id": a.owner_id,
                "author_profile": f"{site_url}/users/{a.owner_id}" if a.owner_id is not None else "",
                "pm_score": pm_score(a.score, selected, opts.accepted_bonus_for_negative),
                "selected": selected,
                "text": text,
                "score": a.score,
            })
        empty = len(g.answers) - len(answers)
        if len(answers) < 2:
            results.append(QuestionResult(None, [], "fewer than 2 answers left after empty bodies", empty))
            continue
        date = g.created[:10].replace("-", "/")
        metadata = [f"{site_url}/questions/{g.id}", site_url,
                    f"{site_url}/users/{g.owner_id}" if g.owner_id is not None else ""]
        preference = {"qid": g.id, "question": question, "answers": answers, "date": date, "metadata": metadata,
                      "tags": g.tags.split("|") if g.tags else []}
        chosen = sample_pairs([a["pm_score"] for a in answers], opts.max_pairs_per_question, opts.seed,
                              f"{sites[g.site]}:{g.id}")
        pairs = [{"qid": g.id, "question": question, "date": date, "metadata": metadata,
                  "response_j": answers[j]["text"], "response_k": answers[k]["text"],
                  "pm_score_j": answers[j]["pm_score"], "pm_score_k": answers[k]["pm_score"]} for j, k in chosen]
        t_pair += time.perf_counter() - t1
        results.append(QuestionResult(preference, pairs, None, empty))
    return results, t_convert, t_pair, bodies


def batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def ordered_map(fn: Callable, tasks: Iterable, num_proc: int) -> Iterator:
    """`map(fn, tasks)` over a process pool, in order, with a bounded number of tasks in flight.

    `Pool.imap` would read the whole task iterator ahead (and so the whole dump into memory).
    """
    if num_proc <= 1:
        # Keep what is alive now (imports, the caller's objects) out of the collector's way
        # while bs4 builds its many short-lived cyclic trees, which makes the conversion faster.
        gc.freeze()
        try:
            yield from map(fn, tasks)
        finally:
            gc.unfreeze()
        return
    with multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(num_proc, gc.freeze) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 4 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
