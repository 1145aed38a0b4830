"""Worker for test_ppo_deepspeed.py: two CPU processes under `accelerate launch` with a DeepSpeed
config (ZeRO-2 or ZeRO-3), or under plain torchrun (DDP, for comparison), run PPO steps of a
LoRA policy, then save it.

argv: <out dir> <gather: 1|0> <full: 1|0 (no LoRA, an explicit reference model)>; environment:
PPO_STEPS (2), SAVE_AT (write <out>/checkpoint-<n> after step n), RESUME (a checkpoint to go on from),
FAST_SAMPLING (1: the trainer's sampling loop where it applies; 0: always transformers' generate),
GUARDS (1: afterwards, a step whose minibatches all exceed ratio_threshold, then one whose backward
gives a NaN gradient on rank 1; out/guards<rank>.json says what each left).
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
from stackllama.processes import end_process  # noqa: E402

out, gather, full = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
torch.set_num_threads(1)
tok = make_tokenizer()
cfg = PPOConfig(
    batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=2, learning_rate=1e-2,
    use_score_scaling=True, ds3_gather_for_generation=gather, max_grad_norm=None,
    fast_sampling=os.environ.get("FAST_SAMPLING", "1") == "1",
)
policy = make_policy(tok, lora=not full)
# GUARDS=1: a gradient that backward computes as NaN on rank 1 only, once switched on (below)
nan_gradient = {"on": False}
guard_name, guard_param = next((n, p) for n, p in policy.named_parameters() if p.requires_grad and (full or "lora_B" in n))
guard_param.register_hook(lambda g: g * float("nan") if nan_gradient["on"] and os.environ.get("RANK") == "1" else g)
trainer = PPOTrainer(cfg, policy, None, tok)
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
    "zero_stage": acc.state.deepspeed_plugin.zero_stage if trainer.backend.is_deepspeed else None,
    "engine": type(engine).__name__,
    "micro_batch": engine.train_micro_batch_size_per_gpu() if trainer.backend.is_deepspeed else None,
    "grad_accum": engine.gradient_accumulation_steps() if trainer.backend.is_deepspeed else None,
    "optimizer_steps": engine.global_steps if trainer.backend.is_deepspeed else None,
    "lengths": lengths,
    "same_weights": bool(torch.equal(gathered[0], gathered[-1])),
    "kl": stats["objective/kl"],
    "kl_coefs": kl_coefs,
    "running_mean": trainer.running.mean,
}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)

if os.environ.get("GUARDS") == "1":  # after the run the other tests compare: what each guard leaves
    from stackllama.ppo import NonFiniteError

    def one_step():
        responses = trainer.generate(queries, return_prompt=False, do_sample=True, top_k=0, top_p=1.0,
                                     max_new_tokens=3 + 6 * rank, eos_token_id=None)
        return trainer.step(queries, responses, [torch.tensor(float(rank + i)) for i in range(4)])

    guards = {"param": guard_name}
    before = trainable_flat()[0]
    engine_steps = engine.global_steps if trainer.backend.is_deepspeed else None
    trainer.config.ratio_threshold = 0.0  # every minibatch exceeds it: skipped, no optimizer step
    guards["skip_optimizer_steps"] = one_step()["ppo/optimizer_steps"]
    guards["skip_engine_steps"] = engine.global_steps - engine_steps if trainer.backend.is_deepspeed else None
    guards["skip_same_weights"] = bool(torch.equal(trainable_flat()[0], before))
    trainer.config.ratio_threshold = 10.0
    nan_gradient["on"] = True
    try:
        one_step()
        guards["nan"] = None
    except NonFiniteError as error:
        guards["nan"] = str(error)
    guards["nan_engine_steps"] = engine.global_steps - engine_steps if trainer.backend.is_deepspeed else None
    guards["nan_same_weights"] = bool(torch.equal(trainable_flat()[0], before))
    with open(os.path.join(out, f"guards{rank}.json"), "w") as f:
        json.dump(guards, f)
acc.wait_for_everyone()
acc.end_training()
end_process()  # as the scripts end (stackllama.processes.end_process)
