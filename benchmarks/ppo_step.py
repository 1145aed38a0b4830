"""Times one PPO step of stackllama's trainer on a fixed tiny workload and prints figures.

Workload (issue 5): 16 prompts x (64 prompt + 32 response) tokens, a random 4-layer
256-wide LLaMA (vocab 4096, as configs/tiny_model), LoRA r16 on q/v, 4 PPO epochs x 4 minibatches, fp32; the
reward is a same-shape random LLaMA sequence classifier fed the token ids directly (the
"same tokenizer" fast path). Prints seconds per step split into generation / scoring /
rollout forward / optimisation, tokens/s, peak RSS, and the step's FLOPs (counted with
torch.utils.flop_counter) against this machine's measured fp32 matmul rate.

    python benchmarks/ppo_step.py [--steps 3] [--threads 2]

The same step with TRL 0.11's PPOTrainer, for comparison on the same machine at the same
time: benchmarks/trl011_ppo_step.py (in a virtual environment of its own). A figure printer,
never a pass/fail test.
"""

from __future__ import annotations

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
import argparse
import os
import resource
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, get_peft_model
from ppo_timing import IdTokenizer, median_of, print_split, time_step
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stackllama.ppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from stackllama.ppo.rollout_batch import left_pad
from stackllama.ppo.speedups.cpu_allocator import keep_freed_memory


def matmul_rate(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--bf16", action="store_true", help="PPOConfig(bf16_autocast=True)")
    ap.add_argument("--no-reuse", action="store_true", help="recompute log pi_old / V_old instead of taking them from generate")
    ap.add_argument("--dropout-in-updates", action="store_true",
                    help="PPOConfig(dropout_in_updates=True): the LoRA dropout on in the update passes (default off, as TRL 0.11)")
    ap.add_argument("--vocab", type=int, default=4096, help="4096 = the project's tiny model (configs/tiny_model)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    keep_freed_memory()  # as scripts/rl_ppo.py does (cpu_malloc_tuning, on by default)
    torch.manual_seed(0)

    B, Q, R = 16, 64, 32
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config).eval()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    policy = AutoModelForCausalLMWithValueHead(get_peft_model(base, lora))
    reward_model = LlamaForSequenceClassification(LlamaConfig(**{**config.to_dict(), "num_labels": 1})).eval()

    ppo_config = PPOConfig(batch_size=B, mini_batch_size=B // 4, ppo_epochs=4, learning_rate=1.41e-5, seed=0, bf16_autocast=args.bf16,
                           reuse_generation_logprobs=not args.no_reuse, dropout_in_updates=args.dropout_in_updates)
    trainer = PPOTrainer(ppo_config, policy, None, IdTokenizer(pad_token_id=0, eos_token_id=2))
    queries = [torch.randint(3, args.vocab, (Q,)) for _ in range(B)]
    gen_kwargs = dict(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=R, batch_size=B)

    def score(responses):
        ids = torch.stack([torch.cat([q, r]) for q, r in zip(queries, responses)]) if len({len(r) for r in responses}) == 1 else None
        if ids is None:  # ragged (an early EOS): pad on the right, read the last real token
            ids, _ = left_pad([torch.cat([q, r]) for q, r in zip(queries, responses)], trainer.pad_token_id)
        with torch.no_grad():
            return list(reward_model(input_ids=ids).logits[:, 0])

    def one_step():
        return time_step(trainer, queries, score, **gen_kwargs)

    med = median_of(one_step, args.steps)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the FLOP count's own tracing

    with FlopCounterMode(display=False) as counter:
        one_step()
    flops = counter.get_total_flops()
    rate = matmul_rate()

    print_split(f"PPO step, {B} prompts x ({Q}+{R}) tokens, 4-layer 256-wide LLaMA (vocab {args.vocab}), LoRA r16 q/v, "
                f"4 epochs x 4 minibatches, {'bf16 autocast' if args.bf16 else 'fp32'}, "
                f"dropout {'on' if args.dropout_in_updates else 'off'} in updates, {torch.get_num_threads()} threads, "
                f"median of {args.steps} steps", med)
    print(f"  tokens/s (prompt+response tokens processed per step / step time): {B * Q + med['tokens']:.0f} tok / "
          f"{med['total']:.3f} s = {(B * Q + med['tokens']) / med['total']:.0f} tok/s")
    print(f"  peak RSS: {peak_rss_mb:.0f} MB")
    print(f"  FLOPs per step: {flops / 1e9:.2f} GFLOP; measured fp32 matmul rate {rate / 1e9:.0f} GFLOP/s; "
          f"compute floor {flops / rate:.3f} s -> step at {flops / rate / med['total']:.0%} of it")


if __name__ == "__main__":
    main()
