"""The PPO trainer under DeepSpeed ZeRO-2 and ZeRO-3, two CPU processes, launched with the
project's own `accelerate_configs/deepspeed_zero{2,3}.yaml` (issue 7).

The workers (tests/ppo_deepspeed_worker.py) run two PPO steps with the ranks deliberately out of
step while sampling (rank 0 draws at most 3 new tokens, rank 1 up to 9). Under ZeRO-3 each
forward of the sharded model is a collective, so generating on the shards would hang there (the
failure StackLLaMA users reported); the trainer gathers the weights once per `generate` call, or
with `ds3_gather_for_generation=False` keeps the ranks in step with `synced_gpus`. The weights
DeepSpeed ends with must equal those of the same run under plain DDP (torchrun), which checks
that the engine is given the PPO geometry (micro-batch, accumulation, its own loss scaling), and
the policy saved from the ZeRO-3 shards must be the trained one. A checkpoint written under
ZeRO-3 resumes to the same run.

DeepSpeed runs on CPU here (its CPU accelerator, gloo; `stackllama.processes.process_state`);
needs the `deepspeed` package (in the `test` extra).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from interrupt_helpers import accelerate_launch, torchrun
from safetensors.torch import load_file

pytest.importorskip("deepspeed", reason="pip install 'stackllama[deepspeed]'")
pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).resolve().parent / "ppo_deepspeed_worker.py")


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU",
                "ACCELERATE_USE_DEEPSPEED"):
        e.pop(key, None)
    return e


def launch(out: Path, engine: str, gather: bool = True, full: bool = False, **extra_env: str) -> list[dict]:
    out.mkdir(parents=True)
    args = [WORKER, str(out), "1" if gather else "0", "1" if full else "0"]
    if engine == "ddp":
        torchrun(args, env={**env(), **extra_env}, timeout=240)
    else:
        accelerate_launch(args, env={**env(), **extra_env}, timeout=240, config_file=f"deepspeed_{engine}.yaml")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepspeed")
    loop, generate, guards = {}, {"FAST_SAMPLING": "0"}, {"GUARDS": "1"}
    cases = {"ddp": ("ddp", True, False, guards), "zero2": ("zero2", True, False, guards),
             "zero3": ("zero3", True, False, guards),
             # on the shards generate needs synced_gpus (transformers' generate); its DDP twin samples that way too
             "zero3_sharded": ("zero3", False, False, loop), "ddp_generate": ("ddp", True, False, generate),
             # no LoRA: the explicit frozen reference model is sharded too (TRL's prepare_deepspeed)
             "ddp_full": ("ddp", True, True, loop), "zero3_full": ("zero3", True, True, loop)}
    return {name: (tmp / name, launch(tmp / name, engine, gather, full, **extra))
            for name, (engine, gather, full, extra) in cases.items()}


def trained(out: Path) -> tuple[torch.Tensor, list[str]]:
    saved = torch.load(out / "trained.pt")
    return saved["flat"], saved["names"]


def lora_b_max(out: Path) -> float:
    """Largest |LoRA B| value: B starts at zero, so this is how far training moved it."""
    saved = torch.load(out / "trained.pt")
    parts = saved["flat"].split(saved["sizes"])
    return max(p.abs().max().item() for n, p in zip(saved["names"], parts) if "lora_B" in n)


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3), ("zero3_sharded", 3), ("zero3_full", 3)])
def test_deepspeed_ppo_matches_ddp(runs, name, stage):
    out, results = runs[name]
    for rank, res in enumerate(results):
        assert res["rank"] == rank and res["world"] == 2
        assert res["engine"] == "DeepSpeedEngine" and res["zero_stage"] == stage
        # the PPO geometry reached the engine: 2 sequences per micro-batch, a step every 2 of them,
        # 2 PPO steps x 2 epochs x 1 window of 4 rollouts
        assert (res["micro_batch"], res["grad_accum"], res["optimizer_steps"]) == (2, 2, 4)
        assert res["same_weights"]
    # The ranks were out of step while sampling (and yet nothing hung)
    assert max(max(lens) for lens in results[0]["lengths"]) <= 3
    assert max(max(lens) for lens in results[1]["lengths"]) > 3
    # Every rank took the same decisions: one KL, one beta, score moments over both ranks
    assert results[0]["kl"] == pytest.approx(results[1]["kl"])
    assert results[0]["kl_coefs"] == pytest.approx(results[1]["kl_coefs"])
    assert results[0]["running_mean"] == pytest.approx(2.0)  # scores 0..3 and 1..4

    # The same run under plain DDP ends with the same weights (to float reduction order)
    full = name.endswith("_full")
    ddp_out, ddp_results = runs["ddp_full" if full else "ddp_generate" if name == "zero3_sharded" else "ddp"]
    flat, names = trained(out)
    ddp_flat, ddp_names = trained(ddp_out)
    assert names == ddp_names
    if full:
        moved = (ddp_flat - torch.load(ddp_out / "initial.pt")).abs().max().item()
    else:
        moved = lora_b_max(ddp_out)
        assert lora_b_max(out) > 1e-3
    assert moved > 1e-3
    diff = (flat - ddp_flat).abs().max().item()
    print(f"\n{name}: max |DeepSpeed - DDP| over {flat.numel():,} trained values {diff:.2g} (moved by up to {moved:.3g}); "
          f"KL {results[0]['kl']:.6f} vs DDP {ddp_results[0]['kl']:.6f}")
    assert diff < (1e-4 if full else 1e-5)  # full: 78k values at lr 1e-2
    assert results[0]["kl"] == pytest.approx(ddp_results[0]["kl"], rel=1e-4)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_full"])
def test_policy_saved_from_deepspeed_is_the_trained_one(runs, name):
    """The folder `save_pretrained` wrote from the shards holds the trained weights, whole."""
    out, _ = runs[name]
    flat, names = trained(out)
    weights_file = "model.safetensors" if name.endswith("_full") else "adapter_model.safetensors"
    weights = load_file(out / "policy" / weights_file)
    head = load_file(out / "policy" / "value_head.safetensors")
    saved = []
    for n in names:
        if n.startswith("v_head."):
            saved.append(head[n[len("v_head."):]])
        else:  # pretrained_model.<name>; PEFT saves the adapter without the ".default" adapter name
            saved.append(weights[n[len("pretrained_model."):].replace(".default", "")])
    assert torch.equal(torch.cat([t.float().flatten() for t in saved]), flat)
    assert len(weights) == sum(1 for n in names if not n.startswith("v_head."))


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_ratio_skip_and_nan_gradient_stop_before_the_weights_under_each_backend(runs, name):
    """Under DeepSpeed as under DDP: a window whose minibatches all exceed ``ratio_threshold``
    does not step the optimizer (DeepSpeed's engine included), and a NaN gradient computed on
    one rank stops both ranks before any optimizer step, naming the parameter."""
    out, _ = runs[name]
    for rank in (0, 1):
        guards = json.loads((out / f"guards{rank}.json").read_text())
        assert guards["skip_optimizer_steps"] == 0 and guards["skip_engine_steps"] in (None, 0)
        assert guards["skip_same_weights"]
        assert guards["nan"] is not None
        assert f"non-finite value (NaN/inf) in the gradient of {guards['param']} (on at least one process)" in guards["nan"]
        assert guards["nan_engine_steps"] in (None, 0) and guards["nan_same_weights"]


def test_deepspeed_checkpoint_resumes_to_the_same_run(tmp_path):
    """ZeRO-3, 4 steps with a checkpoint after step 2; a second launch resumed from it ends
    with the same weights: each process wrote and reads back its optimizer shard (DeepSpeed's
    own checkpoint in checkpoint-2/deepspeed/), beside a policy folder gathered from the shards."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(straight, "zero3", PPO_STEPS="4", SAVE_AT="2")
    ckpt = straight / "checkpoint-2"
    assert (ckpt / "checkpoint_complete.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    shards = sorted(p.name for p in (ckpt / "deepspeed" / "state").iterdir())
    assert [n for n in shards if "optim_states" in n] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    launch(resumed, "zero3", PPO_STEPS="4", RESUME=str(ckpt))
    diff = (trained(resumed)[0] - trained(straight)[0]).abs().max().item()
    print(f"\nZeRO-3 resumed from checkpoint-2: max |diff| of the final trainable weights {diff:.3g}")
    assert diff == 0.0
