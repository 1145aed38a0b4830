"""Stack Exchange dumps -> the preference dataset and the paired dataset, in three passes.

1. parse (`parse`): stream every dump's rows into an on-disk `PostStore` (nothing converted yet);
2. convert + pair (`convert`): for each question with >= 2 answers, convert its HTML once, score
   the answers, sample pairs (spread over `num_proc` processes, results kept in order);
3. write: preference rows and pairs go to parquet shards, pairs into the subset that the
   seeded question-level split drew for the question.

Everything is written into a temporary folder beside `output_dir` that replaces it at the end
(`stackllama.atomic.staged_dir`), so the output folder is whole or absent, never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import staged_dir
from ..errors import InputError, OutputExistsError
from ..run_layout import DATA_SUMMARY
from .convert import GROUPS_PER_TASK, batched, convert_batch, ordered_map
from .dumps import DumpError, resolve_dump
from .options import PrepareOptions
from .pairs import SUBSETS, assign_splits
from .parse import load_posts, load_users
from .store import PostStore
from .writer import (
    PAIR_SCHEMA,
    PREFERENCE_SCHEMA,
    ShardedParquetWriter,
    dataset_card,
    format_summary,
)

BUNDLED_DUMPS_DIR = Path(__file__).resolve().parents[2] / "data" / "stackexchange"


def bundled_dumps() -> list[str]:
    """The sample dumps shipped with the repository (coffee, beer, matheducators)."""
    return sorted(str(p.parent) for p in BUNDLED_DUMPS_DIR.glob("*/Posts.xml"))


@dataclass
class StepTimes:
    """Seconds spent per step (CPU seconds of the workers for convert and pair)."""

    parse: float = 0.0
    convert: float = 0.0
    pair: float = 0.0
    write: float = 0.0
    total: float = 0.0
    bodies_converted: int = 0


def _exists_error(output_dir: Path) -> OutputExistsError:
    return OutputExistsError(f"{output_dir} exists; pass --overwrite to replace it")


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
        raise _exists_error(output_dir)
    with staged_dir(output_dir) as tmp:
        scratch = Path(opts.scratch_dir) / f"stackllama-{os.getpid()}" if opts.scratch_dir else tmp / "_scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            summary = _prepare(dumps, tmp, scratch, opts)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if output_dir.exists() and not overwrite:  # it appeared while this run was writing
            raise _exists_error(output_dir)
    return summary


def _show_bars(progress: bool | None) -> bool | None:
    """--progress when given; unset, on a terminal only (tqdm's default), or off one too when the pipeline
    driver reads the bars from the output (it sets STACKLLAMA_PROGRESS_BARS=1: stackllama/pipeline/live.py)."""
    return True if progress is None and os.environ.get("STACKLLAMA_PROGRESS_BARS") == "1" else progress


def _prepare(dumps: list[str], out: Path, scratch: Path, opts: PrepareOptions) -> dict:
    times = StepTimes()
    progress = _show_bars(opts.progress)
    start = time.perf_counter()
    sources = [resolve_dump(d, scratch) for d in dumps]
    sites = [s.site for s in sources]
    skipped: Counter = Counter()
    dates = ["", ""]
    store = PostStore(scratch / "posts.sqlite")
    rows_read = 0
    try:
        for i, source in enumerate(sources):
            rows_read += load_posts(source, i, store, skipped, dates, progress)
            if source.users_path is not None:
                load_users(source, i, store)
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
        tasks = ((batch, sites, opts) for batch in batched(store.question_groups(), GROUPS_PER_TASK))
        index = 0
        with tqdm(total=eligible, unit="q", desc="convert + pair", disable=not progress
                  if progress is not None else None) as bar:
            for results, t_convert, t_pair, bodies in ordered_map(convert_batch, tasks, opts.num_proc):
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
    (out / DATA_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(dataset_card(summary, SUBSETS))
    return summary


__all__ = ["DumpError", "PrepareOptions", "bundled_dumps", "format_summary", "prepare_dataset"]
