"""Stack Exchange dumps -> the preference dataset and the paired dataset, in three passes.

1. parse: stream every dump's rows into an on-disk `PostStore` (nothing converted yet);
2. convert + pair: for each question with >= 2 answers, convert its HTML once, score the
   answers, sample pairs (spread over `num_proc` processes, results kept in order);
3. write: preference rows and pairs go to parquet shards, pairs into the subset that the
   seeded question-level split drew for the question.

Everything is written into a temporary folder beside `output_dir` and renamed into place
at the end, so the output folder is whole or absent, never half-written.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import InputError, OutputExistsError
from .dumps import DumpError, DumpSource, iter_rows, parse_tags, resolve_dump
from .markdown import html_to_markdown
from .pairs import SUBSETS, assign_splits, sample_pairs
from .scoring import pm_score
from .store import PostStore, QuestionGroup
from .writer import (
    PAIR_SCHEMA,
    PREFERENCE_SCHEMA,
    ShardedParquetWriter,
    dataset_card,
    format_summary,
)

# Planted in every site's dump since 2024 to trace copies; they are not real posts.
FAKE_POST_IDS = frozenset({1000000001, 1000000010})
BUNDLED_DUMPS_DIR = Path(__file__).resolve().parents[2] / "data" / "stackexchange"
_INSERT_BATCH = 1_000
_GROUPS_PER_TASK = 64


def bundled_dumps() -> list[str]:
    """The sample dumps shipped with the repository (coffee, beer, matheducators)."""
    return sorted(str(p.parent) for p in BUNDLED_DUMPS_DIR.glob("*/Posts.xml"))


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class PrepareOptions:
    """How questions become rows (also the `prepare_data.py` flags: each field's help is its doc)."""

    seed: int = field(default=42, metadata={"help": "Seed of the question shuffle that draws the subsets and of "
                                                     "the pair sampling."})
    finetune_fraction: float = field(default=0.3, metadata={"help": "Share of questions in the `finetune` subset (SFT)."})
    reward_fraction: float = field(default=0.3, metadata={"help": "Share of questions in the `reward` subset "
                                                                  "(reward-model training)."})
    rl_fraction: float = field(default=0.3, metadata={"help": "Share of questions in the `rl` subset (PPO prompts)."})
    evaluation_fraction: float = field(default=0.1, metadata={"help": "Share of questions in the `evaluation` "
                                                                      "subset (held out). The four must sum to 1."})
    max_pairs_per_question: int = field(default=10, metadata={"help": "At most this many answer pairs per "
                                                                      "question, sampled without replacement."})
    question_body_only: bool = field(default=False, metadata={"help": "Question text is the body alone (as in the "
                                                                      "published dataset) instead of title + body."})
    accepted_bonus_for_negative: bool = field(default=False, metadata={
        "help": "Give the +1 accepted-answer bonus to answers with a negative score too (the published rule "
                "keeps them at -1)."})
    num_proc: int = field(default_factory=default_num_proc, metadata={
        "help": "Processes for HTML -> Markdown conversion, the slowest step (default: all cores)."})
    max_rows_per_file: int = field(default=100_000, metadata={"help": "Rows per parquet shard."})
    scratch_dir: str | None = field(default=None, metadata={
        "help": "Where the on-disk grouping database and extracted .7z files go (default: inside the temporary "
                "output folder). Needs about the size of the dumps' text."})
    progress: bool | None = field(default=None, metadata={"help": "Show progress bars (default: on a terminal only)."})

    @property
    def fractions(self) -> tuple[float, float, float, float]:
        return (self.finetune_fraction, self.reward_fraction, self.rl_fraction, self.evaluation_fraction)


@dataclass
class StepTimes:
    """Seconds spent per step (CPU seconds of the workers for convert and pair)."""

    parse: float = 0.0
    convert: float = 0.0
    pair: float = 0.0
    write: float = 0.0
    total: float = 0.0
    bodies_converted: int = 0


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


# ---------------------------------------------------------------- pass 1: parse into the store


def _load_posts(source: DumpSource, site: int, store: PostStore, skipped: Counter, dates: list[str],
                progress: bool | None) -> int:
    """Stream one Posts.xml into the store; returns rows read. Row-level problems are counted."""
    questions, answers = [], []
    rows = 0
    size = source.posts_path.stat().st_size
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"parse {source.site}", disable=not progress
              if progress is not None else None) as bar:
        for row in iter_rows(source.posts_path, on_read=bar.update):
            rows += 1
            post_type, post_id = row.get("PostTypeId"), _int_or_none(row.get("Id"))
            if post_type is None:
                skipped["row without PostTypeId"] += 1
                continue
            if post_type not in ("1", "2"):
                skipped[f"not a question or answer (PostTypeId {post_type})"] += 1
                continue
            if post_id is None:
                skipped["row without a valid Id"] += 1
                continue
            if post_id in FAKE_POST_IDS:
                skipped["planted fake post"] += 1
                continue
            body = row.get("Body", "")
            if not body.strip():
                skipped["empty body"] += 1
                continue
            created = row.get("CreationDate", "")
            if created:
                dates[0] = min(dates[0], created) if dates[0] else created
                dates[1] = max(dates[1], created)
            owner_id = _int_or_none(row.get("OwnerUserId"))
            owner_name = row.get("OwnerDisplayName", "")
            if post_type == "1":
                questions.append((site, post_id, row.get("Title", ""), body, created, owner_id, owner_name,
                                  _int_or_none(row.get("AcceptedAnswerId")),
                                  "|".join(parse_tags(row.get("Tags")))))
            else:
                if row.get("Score") is None:
                    skipped["answer without Score"] += 1
                    continue
                score, parent = _int_or_none(row["Score"]), _int_or_none(row.get("ParentId"))
                if score is None:
                    skipped["answer with a non-integer Score"] += 1
                    continue
                if parent is None:
                    skipped["answer without ParentId"] += 1
                    continue
                answers.append((site, post_id, parent, score, body, owner_id, owner_name))
            if len(questions) >= _INSERT_BATCH:
                skipped["duplicate post id"] += store.add_questions(questions)
                questions = []
            if len(answers) >= _INSERT_BATCH:
                skipped["duplicate post id"] += store.add_answers(answers)
                answers = []
    skipped["duplicate post id"] += store.add_questions(questions) + store.add_answers(answers)
    return rows


def _load_users(source: DumpSource, site: int, store: PostStore) -> None:
    """Display names for attribution, from Users.xml when the dump has it."""
    batch = []
    for row in iter_rows(source.users_path):
        user_id = _int_or_none(row.get("Id"))
        if user_id is not None and row.get("DisplayName"):
            batch.append((site, user_id, row["DisplayName"]))
        if len(batch) >= _INSERT_BATCH:
            store.add_users(batch)
            batch = []
    store.add_users(batch)


# ---------------------------------------------------------------- pass 2: convert and pair


@dataclass
class QuestionResult:
    preference: dict | None  # None when the question is skipped
    pairs: list[dict]
    skip_reason: str | None = None
    empty_answers: int = 0


def _convert_batch(args: tuple[list[QuestionGroup], list[str], PrepareOptions]) -> tuple[list[QuestionResult], float, float, int]:
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


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered_map(fn: Callable, tasks: Iterable, num_proc: int) -> Iterator:
    """`map(fn, tasks)` over a process pool, in order, with a bounded number of tasks in flight.

    `Pool.imap` would read the whole task iterator ahead (and so the whole dump into memory).
    """
    if num_proc <= 1:
        # Keep what is alive now (imports, the caller's objects) out of the collector's way
        # while bs4 builds its many short-lived cyclic trees: ~1.3x faster conversion, measured.
        gc.freeze()
        try:
            yield from map(fn, tasks)
        finally:
            gc.unfreeze()
        return
    import multiprocessing

    with multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(num_proc, gc.freeze) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 4 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------- the whole run


def _replace_dir(tmp: Path, output_dir: Path, overwrite: bool) -> None:
    """Move the finished `tmp` into `output_dir`; an old output is removed only after that."""
    old = None
    if output_dir.exists():
        if not overwrite:
            raise OutputExistsError(f"{output_dir} exists; pass --overwrite to replace it")
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.rename(output_dir, old)
    os.rename(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_dataset(dumps: list[str], output_dir: str | os.PathLike, options: PrepareOptions | None = None,
                    overwrite: bool = False) -> dict:
    """Prepare the preference and paired datasets from `dumps` into `output_dir`; returns the summary.

    Raises `DumpError` for a file-level problem (missing, malformed, truncated input) and
    `FileExistsError` when `output_dir` exists and `overwrite` is false; in both cases
    nothing is left behind.
    """
    opts = options or PrepareOptions()
    if not dumps:
        raise InputError("no dumps given")
    if opts.max_pairs_per_question < 1:
        raise InputError(f"max_pairs_per_question must be >= 1, got {opts.max_pairs_per_question}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise OutputExistsError(f"{output_dir} exists; pass --overwrite to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    scratch = Path(opts.scratch_dir) / f"stackllama-{os.getpid()}" if opts.scratch_dir else tmp / "_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        summary = _prepare(dumps, tmp, scratch, opts)
        shutil.rmtree(scratch, ignore_errors=True)
        _replace_dir(tmp, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return summary


def _prepare(dumps: list[str], out: Path, scratch: Path, opts: PrepareOptions) -> dict:
    times = StepTimes()
    start = time.perf_counter()
    sources = [resolve_dump(d, scratch) for d in dumps]
    sites = [s.site for s in sources]
    skipped: Counter = Counter()
    dates = ["", ""]
    store = PostStore(scratch / "posts.sqlite")
    rows_read = 0
    try:
        for i, source in enumerate(sources):
            rows_read += _load_posts(source, i, store, skipped, dates, opts.progress)
            if source.users_path is not None:
                _load_users(source, i, store)
        store.finish_loading()
        orphans = store.count_orphan_answers()
        if orphans:
            skipped["answer whose question is absent"] = orphans
        n_questions = store.count("SELECT count(*) FROM questions")
        n_answers = store.count("SELECT count(*) FROM answers")
        few, eligible = store.count_questions_by_answers()
        times.parse = time.perf_counter() - start

        split_of = assign_splits(eligible, opts.fractions, opts.seed)
        preferences = ShardedParquetWriter(out / "preferences", PREFERENCE_SCHEMA, opts.max_rows_per_file)
        writers = {s: ShardedParquetWriter(out / "pairs" / s, PAIR_SCHEMA, opts.max_rows_per_file) for s in SUBSETS}
        per_subset = {s: {"questions": 0, "pairs": 0} for s in SUBSETS}
        tasks = ((batch, sites, opts) for batch in _batched(store.question_groups(), _GROUPS_PER_TASK))
        index = 0
        with tqdm(total=eligible, unit="q", desc="convert + pair", disable=not opts.progress
                  if opts.progress is not None else None) as bar:
            for results, t_convert, t_pair, bodies in _ordered_map(_convert_batch, tasks, opts.num_proc):
                times.convert += t_convert
                times.pair += t_pair
                times.bodies_converted += bodies
                t0 = time.perf_counter()
                for result in results:
                    subset = SUBSETS[split_of[index]]
                    index += 1
                    if result.empty_answers:
                        skipped["empty body"] += result.empty_answers
                    if result.preference is None:
                        skipped[result.skip_reason] += 1
                        continue
                    preferences.write(result.preference)
                    if result.pairs:
                        per_subset[subset]["questions"] += 1
                        per_subset[subset]["pairs"] += len(result.pairs)
                        for pair in result.pairs:
                            writers[subset].write(pair)
                times.write += time.perf_counter() - t0
                bar.update(len(results))
        t0 = time.perf_counter()
        preferences.close()
        for w in writers.values():
            w.close()
        times.write += time.perf_counter() - t0
    finally:
        store.close()
    times.total = time.perf_counter() - start

    summary = {
        "sites": sites,
        "dumps": [s.origin for s in sources],
        "rows_read": rows_read,
        "questions": n_questions,
        "answers": n_answers,
        "questions_with_fewer_than_2_answers": few,
        "questions_with_2_answers": eligible,
        "preference_rows": preferences.rows_written,
        "pairs": sum(c["pairs"] for c in per_subset.values()),
        "subsets": per_subset,
        "skipped": {k: v for k, v in sorted(skipped.items()) if v},
        "first_post_date": dates[0][:10],
        "last_post_date": dates[1][:10],
        "seed": opts.seed,
        "fractions": dict(zip(SUBSETS, opts.fractions)),
        "max_pairs_per_question": opts.max_pairs_per_question,
        "question_body_only": opts.question_body_only,
        "accepted_bonus_for_negative": opts.accepted_bonus_for_negative,
        "seconds": asdict(times),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(dataset_card(summary, SUBSETS))
    return summary


__all__ = ["DumpError", "PrepareOptions", "bundled_dumps", "format_summary", "prepare_dataset"]
