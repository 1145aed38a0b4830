"""Timing one PPO step the same way for benchmarks/ppo_step.py (this project's trainer) and
benchmarks/trl011_ppo_step.py (TRL 0.11's): plain Python and torch only, so both virtual
environments import it. Also the id-level tokenizer the PPO benchmarks give the trainer."""

from __future__ import annotations

import statistics
import time

class IdTokenizer:
    """Just enough tokenizer for the PPO trainer on random models: ids in, ids joined as text out.
    ``eos_token_id=None``: no EOS, so every response has all its ``max_new_tokens``."""

    def __init__(self, pad_token_id: int = 0, eos_token_id=2) -> None:
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [" ".join(map(str, s.tolist())) for s in seqs]


PARTS = ("generation", "scoring", "rollout forward", "optimisation", "other (advantages, stats)")


def time_step(trainer, queries, score, **gen_kwargs) -> dict:
    """Seconds of one `generate` -> `score` -> `step`, split as the trainers report it
    (`time/ppo/forward_pass`, `time/ppo/optimize_step`), plus the response tokens."""
    t0 = time.perf_counter()
    responses = trainer.generate(queries, return_prompt=False, **gen_kwargs)
    t1 = time.perf_counter()
    scores = score(responses)
    t2 = time.perf_counter()
    stats = trainer.step(queries, responses, scores)
    t3 = time.perf_counter()
    forward, optimise = stats["time/ppo/forward_pass"], stats["time/ppo/optimize_step"]
    return {"generation": t1 - t0, "scoring": t2 - t1, "rollout forward": forward, "optimisation": optimise,
            "other (advantages, stats)": (t3 - t2) - forward - optimise, "total": t3 - t0,
            "tokens": sum(len(r) for r in responses)}


def median_of(one_step, steps: int) -> dict:
    """One warm-up step, then the median of `steps` timed ones, part by part."""
    one_step()
    runs = [one_step() for _ in range(steps)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def print_split(title: str, med: dict) -> None:
    print(title)
    for k in PARTS:
        print(f"  {k:28s} {med[k]:7.3f} s  ({100 * med[k] / med['total']:4.1f}%)")
    print(f"  {'total':28s} {med['total']:7.3f} s/step")
