"""Worker for test_ppo_precision.py: under `accelerate launch --mixed_precision bf16` (two CPU
processes), one PPO step per case with a learning rate of 0, the recipe's dropouts (LoRA 0.05,
value head 0.1) and the policy equal to its reference:

- `lora_bf16`: LoRA on a bf16 base (configs/ppo/llama-7b.yaml's dtype; the reference is the
  same model with its adapters disabled);
- `lora_8bit`: LoRA on an 8-bit base (the recipe's, with bitsandbytes' CPU kernels);
- `full`: full fine-tuning of fp32 weights with a frozen reference copy (configs/ppo/tiny.yaml).

Each rank writes out/<case>-rank<r>.json: the step's KL, ratio and clip statistics, the
precision regime and log-prob reuse decision, and the dtypes the MLP computed in while sampling,
in the rollout passes and in the updates.

argv: <out dir> <folder of ppo_tiny's make_model(), saved>
"""

import json
import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from ppo_tiny import make_model, make_queries, make_tokenizer  # noqa: E402

from stackllama.ppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402
from stackllama.processes import end_process  # noqa: E402

out, base_dir = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
tok = make_tokenizer()


def policy(case: str) -> AutoModelForCausalLMWithValueHead:
    from peft import LoraConfig, get_peft_model

    if case == "full":
        return AutoModelForCausalLMWithValueHead(make_model(tok), value_head_dropout=0.1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, task_type="CAUSAL_LM")
    if case == "lora_bf16":
        return AutoModelForCausalLMWithValueHead(get_peft_model(make_model(tok).to(torch.bfloat16), lora),
                                                 value_head_dropout=0.1)
    from transformers import BitsAndBytesConfig

    return AutoModelForCausalLMWithValueHead.from_pretrained(  # an 8-bit base, loaded as the recipe loads it
        base_dir, peft_config=lora, quantization_config=BitsAndBytesConfig(load_in_8bit=True), value_head_dropout=0.1)


for case in ("lora_bf16", "lora_8bit", "full"):
    cfg = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=0.0, seed=0)
    trainer = PPOTrainer(cfg, policy(case), None, tok)
    rank = trainer.accelerator.process_index
    seen = {"sampling": set(), "rollout": set(), "update": set(), "reference": set()}
    phase = ["sampling"]
    mlp = trainer.unwrapped_model.causal_lm.model.layers[0].mlp
    handles = [mlp.register_forward_hook(lambda m, a, o: seen[phase[0]].add(str(o.dtype)))]
    if trainer.ref_model is not None:
        handles.append(trainer.ref_model.model.layers[0].mlp.register_forward_hook(
            lambda m, a, o: seen["reference"].add(str(o.dtype))))
    rollout_forward, ppo_updates = trainer.passes.rollout_pass, trainer.ppo_updates

    def in_phase(name, fn):
        def run(*args, **kwargs):
            phase[0] = name
            return fn(*args, **kwargs)
        return run

    trainer.passes.rollout_pass = in_phase("rollout", rollout_forward)
    trainer.ppo_updates = in_phase("update", ppo_updates)
    queries = make_queries(tok, 4, seed=rank)
    responses = trainer.generate(queries, return_prompt=False, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=6)
    stats = trainer.step(queries, responses, [torch.tensor(float(rank + i)) for i in range(4)])
    for handle in handles:
        handle.remove()
    result = {
        "world": trainer.accelerator.num_processes,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "regime": trainer.precision.name,
        "reuse_blocker": trainer.reuse_blocker,
        "dtypes": {k: sorted(v) for k, v in seen.items()},
        **{k: stats[k] for k in ("objective/kl", "ppo/policy/ratio_mean", "ppo/policy/approxkl", "ppo/policy/clipfrac",
                                 "ppo/val/clipfrac", "ppo/mean_raw_scores")},
    }
    with open(os.path.join(out, f"{case}-rank{rank}.json"), "w") as f:
        json.dump(result, f)
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
end_process()  # as the scripts end (stackllama.processes.end_process)
