"""Do PPO's reward and KL curves under ``bf16_autocast`` match fp32 within run-to-run noise?

Runs the same small PPO problem (a random 2-layer LLaMA over a 64-token vocabulary, full
fine-tuning, reward = share of one chosen token in the 8-token response, as in
tests/test_ppo_acceptance.py) for ``--steps`` steps with ``--seeds`` seeds, in fp32 and in
bf16, and prints, per block of steps, the mean reward and KL over the seeds for each
precision. "Within noise" is judged against the seed-to-seed spread: the gap between the
fp32 and bf16 seed means of a block, against the standard error of that gap.

    python benchmarks/ppo_bf16_curves.py [--steps 30] [--seeds 10] [--against bf16|fp32-recompute]

A figure printer, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ppo_timing import IdTokenizer

from stackllama.ppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

VOCAB, TARGET, PAD, EOS = 64, 40, 0, 1


def run(seed: int, variant: str, steps: int) -> tuple[list[float], list[float]]:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2,
                         tie_word_embeddings=False)
    policy = AutoModelForCausalLMWithValueHead(LlamaForCausalLM(config).eval(), value_head_dropout=0.0)
    ppo = PPOConfig(batch_size=16, mini_batch_size=8, ppo_epochs=4, learning_rate=3e-3, init_kl_coef=0.01, seed=seed,
                    bf16_autocast=variant.startswith("bf16"), reuse_generation_logprobs=variant != "fp32-recompute")
    trainer = PPOTrainer(ppo, policy, None, IdTokenizer(pad_token_id=PAD, eos_token_id=EOS))
    g = torch.Generator().manual_seed(1234)  # the same prompts for every run
    prompts = [torch.randint(3, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g) for _ in range(64)]
    rewards, kls = [], []
    for step in range(steps):
        queries = prompts[(16 * step) % 64 :][:16]
        responses = trainer.generate(queries, return_prompt=False, max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0,
                                     batch_size=16)
        stats = trainer.step(queries, responses, [(r == TARGET).float().mean() for r in responses])
        rewards.append(stats["ppo/mean_scores"])
        kls.append(stats["objective/kl"])
    return rewards, kls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--block", type=int, default=5, help="steps averaged per printed row")
    ap.add_argument("--against", default="bf16", choices=["bf16", "fp32-recompute"],
                    help="compare fp32 (default settings) with bf16_autocast, or with reuse_generation_logprobs=False")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    other = args.against
    curves = {(p, s): run(s, p, args.steps) for p in ("fp32", other) for s in range(args.seeds)}

    def block(p, s, k, start):
        return statistics.fmean(curves[(p, s)][k][start : start + args.block])

    print(f"PPO, {args.seeds} seeds x {args.steps} steps: reward (share of the target token) and KL, mean over seeds "
          f"[gap {other} - fp32 / its standard error from the seed spread]")
    for k, name in ((0, "reward"), (1, "KL")):
        print(f"  {name}")
        for start in range(0, args.steps, args.block):
            per = {p: [block(p, s, k, start) for s in range(args.seeds)] for p in ("fp32", other)}
            m = {p: statistics.fmean(v) for p, v in per.items()}
            se = (sum(statistics.variance(v) / len(v) for v in per.values())) ** 0.5 if args.seeds > 1 else float("nan")
            gap = m[other] - m["fp32"]
            print(f"    steps {start:3d}-{start + args.block - 1:3d}: fp32 {m['fp32']:8.4f}  {other} {m[other]:8.4f}  "
                  f"[gap {gap:+.4f} = {gap / se if se else float('nan'):+.2f} s.e.]")


if __name__ == "__main__":
    main()
