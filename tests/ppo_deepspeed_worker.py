"""Worker for test_ppo_deepspeed.py: two CPU processes under `accelerate launch` with a DeepSpeed
config (ZeRO-2 or ZeRO-3), or under plain torchrun (DDP, for comparison), run PPO steps of a
LoRA policy, then save it.

argv: <out dir> <gather: 1|0> <full: 1|0 (no LoRA, an explicit reference model)>; environment:
PPO_STEPS (2), SAVE_AT (write <out>/checkpoint-<n> after step n), RESUME (a checkpoint to go on from),
FAST_SAMPLING (1: the trainer's sampling loop where it applies; 0: always transformers' generate).
Each rank samples a different number of new tokens (rank 0: 3, rank 1: 9): under ZeRO-3 every
forward of a sharded model is a collective, so generating on the shards without `synced_gpus`
would hang; the trainer must gather the weights (or sync the ranks) for it to finish.
"""

import json
import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(__file__))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from ppo_tiny import make_policy, make_queries, make_tokenizer  # noqa: E402
from stackllama.ppo import PPOConfig, PPOTrainer  # noqa: E402

out, gather, full = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
torch.set_num_threads(1)
tok = make_tokenizer()
cfg = PPOConfig(
    batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=2, learning_rate=1e-2,
    use_score_scaling=True, ds3_gather_for_generation=gather, max_grad_norm=None,
    fast_sampling=os.environ.get("FAST_SAMPLING", "1") == "1",
)
trainer = PPOTrainer(cfg, make_policy(tok, lora=not full), None, tok)
acc = trainer.accelerator
rank = acc.process_index
engine = trainer.model
queries = make_queries(tok, 4, seed=rank)


def trainable_flat() -> tuple[torch.Tensor, list[str], list[int]]:
    """The trainable weights, whole (gathered from the shards under ZeRO-3), in name order."""
    named = sorted((n, p) for n, p in trainer.unwrapped_model.named_parameters() if p.requires_grad)
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        tensors = [p.detach().float().flatten().clone() for _, p in named]
    return torch.cat(tensors), [n for n, _ in named], [t.numel() for t in tensors]


initial = trainable_flat()[0]  # every rank: under ZeRO-3 gathering is a collective
if rank == 0:
    torch.save(initial, os.path.join(out, "initial.pt"))
steps = int(os.environ.get("PPO_STEPS", "2"))
save_at = int(os.environ.get("SAVE_AT", "0"))  # write out/checkpoint-<n> after step n
if os.environ.get("RESUME"):
    trainer.load_checkpoint(os.environ["RESUME"])
kl_coefs, lengths = [], []
while trainer.current_step < steps:
    responses = trainer.generate(queries, return_prompt=False, do_sample=True, top_k=0, top_p=1.0,
                                 max_new_tokens=3 + 6 * rank, eos_token_id=None)
    lengths.append([len(r) for r in responses])
    stats = trainer.step(queries, responses, [torch.tensor(float(rank + i)) for i in range(4)])
    kl_coefs.append(trainer.kl_ctl.value)
    if trainer.current_step == save_at:
        trainer.save_checkpoint(out)

flat, names, sizes = trainable_flat()
gathered = acc.gather(flat[None])
trainer.save_pretrained(os.path.join(out, "policy"))
if rank == 0:
    torch.save({"flat": flat, "names": names, "sizes": sizes}, os.path.join(out, "trained.pt"))
result = {
    "rank": rank,
    "world": acc.num_processes,
    "zero_stage": acc.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed else None,
    "engine": type(engine).__name__,
    "micro_batch": engine.train_micro_batch_size_per_gpu() if trainer.is_deepspeed else None,
    "grad_accum": engine.gradient_accumulation_steps() if trainer.is_deepspeed else None,
    "optimizer_steps": engine.global_steps if trainer.is_deepspeed else None,
    "lengths": lengths,
    "same_weights": bool(torch.equal(gathered[0], gathered[-1])),
    "kl": stats["objective/kl"],
    "kl_coefs": kl_coefs,
    "running_mean": trainer.running.mean,
}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
acc.wait_for_everyone()
acc.end_training()  # leaves the process group together (a rank exiting alone can abort the other)
