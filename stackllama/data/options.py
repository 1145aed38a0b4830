"""How questions become rows: the options of a preparation run (also `prepare_data.py`'s flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


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
