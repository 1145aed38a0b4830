"""Acceptance: PPO on a tiny random LLaMA with a programmatic reward (the share of one
chosen token in the response) raises the mean reward clearly within a few dozen CPU steps
while the KL to the reference stays finite."""

import math
import warnings

import pytest
import torch
from ppo_tiny import (
    make_policy,
    make_queries,
    make_tokenizer,
    one_thread,  # noqa: F401  (fixture)
)

from stackllama.ppo import PPOConfig, PPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ppo_raises_programmatic_reward():
    torch.manual_seed(0)
    tok = make_tokenizer()
    target = tok.convert_tokens_to_ids("```")
    # Full fine-tuning (explicit frozen reference copy): a random model's LM head is too
    # small for LoRA on q/v to move its near-uniform distribution in a few steps.
    policy = make_policy(tok, lora=False)
    # The score is a share (gains of 1/8 per token), so the recipe's KL coefficient 0.2
    # would drown it; beta starts at 0.01 and stays adaptive (target 6, horizon 10000).
    config = PPOConfig(batch_size=16, mini_batch_size=8, ppo_epochs=4, learning_rate=3e-3, init_kl_coef=0.01, seed=0)
    trainer = PPOTrainer(config, policy, None, tok)
    prompts = make_queries(tok, 64, seed=0)
    rewards, kls = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reward-hacking monitor rightly fires here
        for step in range(30):
            queries = prompts[(16 * step) % 64 :][:16]
            responses = trainer.generate(queries, return_prompt=False, max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0, batch_size=16)
            scores = [(r == target).float().mean() for r in responses]
            stats = trainer.step(queries, responses, scores)
            rewards.append(stats["ppo/mean_scores"])
            kls.append(stats["objective/kl"])
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"mean reward first 3 steps {first:.3f}, last 3 steps {last:.3f}; KL last {kls[-1]:.2f}; kl_coef {trainer.kl_ctl.value:.4f}")
    assert first < 0.1
    assert last > 0.5 and last > first + 0.4
    assert all(math.isfinite(k) for k in kls)
    assert stats["env/degenerate_share"] > 0.5  # and the monitor sees the hack
