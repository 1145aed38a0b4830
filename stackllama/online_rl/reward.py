"""The reward of the RLOO and GRPO stages: this project's reward, behind TRL's reward-function interface.

TRL calls a reward function as `f(prompts, completions, completion_ids=..., **columns) -> list[float]`;
the PPO stage calls `stackllama.reward_scoring.RewardFunction` as `reward_fn(texts, query_ids,
response_ids)`. TRL can load a reward model itself (`reward_funcs="<path>"`), but it tokenizes
`prompt + completion` without special tokens, so with no EOS, where this project's reward model reads
its score (it was trained on `...<eos>`). `TRLReward` hands `RewardFunction` what `scripts/rl_ppo.py` hands it, so both
stages score alike:

- `texts`: `prompt + completion`, the completion decoded with `skip_special_tokens=True` (TRL's
  `completions`, PPO's `batch_decode(..., skip_special_tokens=True)`);
- `query_ids`: the prompt tokenized as TRL tokenized it for sampling (`tokenizer(prompts)`), the same call
  that makes PPO's query ids (`stackllama.ppo.recipe.build_query_dataset`);
- `response_ids`: the sampled ids, up to and including the EOS when the answer ended with one (TRL cuts
  each completion after its first EOS, as PPO's trainer cuts its responses).

`RewardFunction` then appends EOS (text path: to a text that never holds it; fast path: unless the
response ends with it) and picks the text or the token-id path exactly as in PPO, including `auto`'s
decision on the first batch. Any other `score(texts, query_ids, response_ids)` callable (the tests'
programmatic rewards) goes through the same path. `auto`'s decision is saved with each checkpoint
(`state_dict`), so a resumed run scores as the uninterrupted one did, as in PPO.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Score = Callable[[Sequence[str], Sequence[torch.Tensor], Sequence[torch.Tensor]], Sequence[float]]


class TRLReward:
    """`TRLReward(score, tokenizer)(prompts, completions, completion_ids)` -> `score(texts, query_ids, response_ids)`.

    `name` is what TRL logs the reward under (`rewards/<name>/mean`); TRL's `reward` is the same number
    when this is the only reward function."""

    def __init__(self, score: Score, tokenizer, name: str = "reward_model") -> None:
        self.score = score
        self.tokenizer = tokenizer
        self.__name__ = name  # TRL names a callable by its __name__

    def inputs(self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]]):
        """`(texts, query_ids, response_ids)` as `scripts/rl_ppo.py` passes them to its reward function."""
        prompts, completions = list(prompts), list(completions)
        texts = [p + c for p, c in zip(prompts, completions)]
        query_ids = [torch.tensor(ids, dtype=torch.long) for ids in self.tokenizer(prompts)["input_ids"]]
        response_ids = [torch.as_tensor(ids, dtype=torch.long).reshape(-1) for ids in completion_ids]
        return texts, query_ids, response_ids

    def state_dict(self) -> dict:
        """What a resumed run must reuse: `RewardFunction`'s path, which `auto` decides on the run's first batch."""
        return {"use_fast_path": getattr(self.score, "use_fast_path", None)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("use_fast_path") is not None and hasattr(self.score, "use_fast_path"):
            self.score.use_fast_path = state["use_fast_path"]

    def __call__(self, prompts, completions, completion_ids=None, **columns) -> list[float]:
        if completion_ids is None:
            raise TypeError("TRLReward needs the completion ids TRL passes as completion_ids=")
        if completions and not isinstance(completions[0], str):
            raise TypeError("TRLReward scores plain-text prompts (`Question: ...\\n\\nAnswer: `), not conversations")
        return [float(s) for s in self.score(*self.inputs(prompts, completions, completion_ids))]
