"""`evaluation_samples.jsonl`: one row per (prompt, sample) with every policy's answers, scores and
response figures, so every number of the report can be traced to the answers behind it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .. import run_layout

SAMPLES_FILE = run_layout.EVALUATION_SAMPLES


def sample_rows(items: Sequence[tuple[int, int]], queries: Sequence[str], lengths: Sequence[int], texts: dict,
                scores: dict, stats: dict, kl: dict) -> list[dict]:
    """The rows of `items` (prompt, sample); `texts`, `scores`, `stats` are keyed by policy name (`SFT`,
    `PPO`, then any other compared), `kl` by the name of each policy but SFT: KL(policy || SFT) of each of
    its responses. A policy's columns are prefixed with its name in lower case (`ppo_response`, ...)."""
    rows = []
    for n, (p, j) in enumerate(items):
        row = {"prompt": p, "sample": j, "query": queries[n], "length_limit": lengths[n]}
        for name in texts:
            key = name.lower()
            row.update({
                f"{key}_response": texts[name][n], f"{key}_score": scores[name][n],
                f"{key}_tokens": stats[name]["length"][n], f"{key}_ended": stats[name]["ended"][n],
                f"{key}_degenerate": stats[name]["degenerate"][n],
            })
        row.update({f"{name.lower()}_kl_from_sft": values[n] for name, values in kl.items()})
        rows.append(row)
    return rows


def write_samples(path: str | Path, samples: Sequence[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    return path


def read_samples(path: str | Path) -> list[dict]:
    """Rows of `evaluation_samples.jsonl`; [] when absent."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
