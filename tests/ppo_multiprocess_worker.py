"""Worker for test_ppo_multiprocess.py: two CPU processes (gloo DDP) run two PPO steps."""

import json
import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from ppo_tiny import make_policy, make_queries, make_tokenizer  # noqa: E402

from stackllama.ppo import PPOConfig, PPOTrainer  # noqa: E402
from stackllama.processes import end_process  # noqa: E402

torch.set_num_threads(1)
tok = make_tokenizer()
cfg = PPOConfig(
    batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=2, learning_rate=1e-3,
    early_stopping=True, target_kl=10.0, use_score_scaling=True,
)
trainer = PPOTrainer(cfg, make_policy(tok), None, tok)
rank = trainer.accelerator.process_index
queries = make_queries(tok, 4, seed=rank)
for _ in range(2):
    responses = trainer.generate(queries, return_prompt=False, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=5)
    stats = trainer.step(queries, responses, [torch.tensor(float(rank + i)) for i in range(4)])
# The same prompts on both ranks: the samples must differ (process i samples with seed + i)
same = trainer.generate(make_queries(tok, 4, seed=123), return_prompt=False, do_sample=True, top_k=0, top_p=1.0,
                        max_new_tokens=8)
padded = torch.stack([torch.nn.functional.pad(r, (0, 8 - len(r)), value=-1) for r in same])  # cut at EOS
samples = trainer.accelerator.gather(padded[None])
lora_b = torch.cat([p.detach().flatten() for n, p in trainer.unwrapped_model.named_parameters() if "lora_B" in n])
gathered = trainer.accelerator.gather(lora_b[None])
result = {
    "rank": rank,
    "world": trainer.accelerator.num_processes,
    "wrapped": type(trainer.model).__name__,
    "same_weights": bool(torch.allclose(gathered[0], gathered[-1])),
    "moved": bool(lora_b.abs().sum() > 0),
    "running_mean": trainer.running.mean,
    "kl": stats["objective/kl"],
    "loss_total": stats["ppo/loss/total"],
    "mean_raw_scores": stats["ppo/mean_raw_scores"],
    "kl_coef": trainer.kl_ctl.value,
    "samples_differ_by_rank": not torch.equal(samples[0], samples[1]),
}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
end_process()  # as the scripts end (stackllama.processes.end_process)
