"""The reference for benchmarks/ppo_step.py: the same PPO step with TRL 0.11's `PPOTrainer`.

Same workload as ppo_step.py (16 prompts x (64 + 32) tokens, the random 4-layer 256-wide
LLaMA with vocab 4096, LoRA r16 on q/v with dropout 0.05, 4 PPO epochs x 4 minibatches,
fp32, reward from a same-shape random LLaMA sequence classifier), so the two scripts' figures
compare on the same machine at the same time. TRL 0.11 needs an older stack than this
project, so it runs in a virtual environment of its own:

    python -m venv /tmp/trl011 && /tmp/trl011/bin/pip install torch==2.13.0 \\
        trl==0.11.4 transformers==4.46.3 peft==0.13.2 accelerate==1.1.1 datasets rich
    /tmp/trl011/bin/python benchmarks/trl011_ppo_step.py [--steps 5] [--bf16]

Our trainer changes glibc's malloc settings on CPU (stackllama/ppo/speedups/cpu_allocator.py). TRL's
step with the same settings from the environment (``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=268435456``) measured the same as without (1.54 against 1.53 s/step,
three interleaved runs each), so the comparison does not hinge on them.

A figure printer, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import resource
import warnings

import torch
from peft import LoraConfig
from ppo_timing import median_of, print_split, time_step
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer


def id_tokenizer(vocab_size: int):
    """A word-level tokenizer over "t0".."t<V-1>" (TRL 0.11 insists on a real tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2",
                                   unk_token="t3", padding_side="left")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bf16", action="store_true", help="accelerate mixed_precision='bf16' (TRL 0.11's way)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    B, Q, R, V = 16, 64, 32, 4096
    config = LlamaConfig(
        vocab_size=V, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config).eval()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora)
    reward_model = LlamaForSequenceClassification(LlamaConfig(**{**config.to_dict(), "num_labels": 1})).eval()

    ppo_config = PPOConfig(batch_size=B, mini_batch_size=B // 4, ppo_epochs=4, learning_rate=1.41e-5, seed=0,
                           accelerator_kwargs={"mixed_precision": "bf16"} if args.bf16 else {})
    trainer = PPOTrainer(ppo_config, policy, None, id_tokenizer(V))
    queries = [torch.randint(3, V, (Q,)) for _ in range(B)]
    gen_kwargs = dict(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=R, min_length=-1, pad_token_id=0,
                      eos_token_id=2)

    def score(responses):
        ids = torch.nn.utils.rnn.pad_sequence([torch.cat([q, r]) for q, r in zip(queries, responses)], batch_first=True)
        with torch.no_grad():
            return list(reward_model(input_ids=ids).logits[:, 0])

    def one_step():
        return time_step(trainer, queries, score, batch_size=B, **gen_kwargs)

    med = median_of(one_step, args.steps)
    print_split(f"TRL 0.11 PPOTrainer, {B} prompts x ({Q}+{R}) tokens, same model and LoRA, 4 epochs x 4 minibatches, "
                f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads, median of {args.steps} steps", med)
    print(f"  peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
