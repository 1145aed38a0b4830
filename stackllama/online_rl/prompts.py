"""The prompts of the RLOO and GRPO stages: the PPO stage's queries, as TRL's `prompt` column."""

from __future__ import annotations

from ..ppo.recipe import build_query_dataset


def build_prompt_dataset(data_dir: str, tokenizer, max_prompt_length: int | None = 512, subset: str = "rl",
                         max_prompts: int | None = None, unique_questions: bool = False, seed: int = 0):
    """`(dataset, dropped)`: one column `prompt` holding `format_prompt(question)` for each `subset` pair.

    The PPO stage's own builder (`stackllama.ppo.recipe.build_query_dataset`), so both stages see the same
    prompts: those over `max_prompt_length` tokens dropped and counted, then at most `max_prompts` sampled
    with `seed`. TRL 1.16's GRPO and RLOO truncate no prompt themselves. Only `prompt` is kept: TRL passes
    every other column to the reward function.
    """
    dataset, dropped = build_query_dataset(data_dir, tokenizer, max_prompt_length, subset=subset,
                                           max_queries=max_prompts, unique_questions=unique_questions, seed=seed)
    dataset.reset_format()
    return dataset.select_columns(["query"]).rename_column("query", "prompt"), dropped
