"""Two CPU processes (gloo) for the SFT and reward stages (issue 7), with the real scripts.

Each stage runs under `torchrun --nproc_per_node 2` and under `accelerate launch --multi_gpu
--num_processes 2` (accelerate's multi-process launcher; `--num_processes 2` alone or with `--cpu`
starts a single process on a machine without GPU in accelerate 1.15, unless given an mpirun
hostfile), with the scripts' defaults. A
`sitecustomize.py` started in every worker records, per rank, the trainable weights when
`Trainer.train` starts and when it returns, the unpadded input ids of every training batch, the
trainer's view of the run (world size, process index, DDP wrapper, tokens counted) and each call of
`stackllama.stage.write_results`. The tests check what only cooperating processes give: different
rows on each rank at every step (whose union is the global batch) and yet the same weights on both
ranks at the end, moved from the same start (gradients averaged: two independent runs with the same
seed and the same data would also agree, so equal weights alone prove nothing); tokens counted over
both ranks; one set of files, the results written by rank 0 only. On a machine without a GPU this
relies on the scripts defaulting to `--use_cpu true` there (stackllama/cli.py): without it,
transformers leaves accelerate single-process and each rank trains alone. Run with `-s` to see the
figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from interrupt_helpers import REPO, accelerate_launch, hook_env, rank_recorder, torchrun
from safetensors.torch import load_file
from sft_helpers import small_run_args, small_stage_inputs

pytestmark = pytest.mark.slow

HOOK = rank_recorder(r'''
    import transformers

    train, training_step = transformers.Trainer.train, transformers.Trainer.training_step
    batches = []

    def hooked_training_step(self, model, inputs, *args, **kwargs):
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        batches.append([row[m.bool()].tolist() if mask is not None else row.tolist()
                        for row, m in zip(ids, mask if mask is not None else ids)])  # without the padding
        return training_step(self, model, inputs, *args, **kwargs)

    def hooked_train(self, *args, **kwargs):
        RECORD.mkdir(parents=True, exist_ok=True)
        torch.save(trainable(self.model), RECORD / f"start{RANK}.pt")
        output = train(self, *args, **kwargs)
        torch.save(trainable(self.model), RECORD / f"end{RANK}.pt")
        import torch.distributed as dist
        info = {
            "rank": RANK,
            "process_index": self.args.process_index,
            "world_size": self.args.world_size,
            "dist_world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "accelerator_processes": self.accelerator.num_processes,
            "distributed_type": str(self.accelerator.distributed_type),
            "wrapped": type(self.model_wrapped).__name__,
            "per_device_batch": self._train_batch_size,
            "grad_accum": self.args.gradient_accumulation_steps,
            "global_step": self.state.global_step,
            "num_input_tokens_seen": self.state.num_input_tokens_seen,
            "total_train_tokens": getattr(self, "_total_train_tokens", None),  # TRL's count, gathered over ranks
            "world_process_zero": self.is_world_process_zero(),
            "batches": batches,
        }
        (RECORD / f"rank{RANK}.json").write_text(json.dumps(info))
        return output

    transformers.Trainer.train = hooked_train
    transformers.Trainer.training_step = hooked_training_step
''')

TIMEOUT = 240


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    return small_stage_inputs(tmp)


def worker_env(tmp: Path, record: Path) -> dict:
    env = hook_env(tmp / "hook", HOOK, {"MP_RECORD": str(record), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                        "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    return env


def sft_args(small, out: Path, *extra: str) -> list[str]:
    _, data, base = small
    return [str(REPO / "scripts" / "sft.py"), *small_run_args(data, out, base, "--save_strategy", "no", *extra)]


def reward_args(small, out: Path) -> list[str]:
    _, data, base = small
    # LoRA + score head, 24 pairs, 4 per device: 2 processes make a global batch of 8, 3 steps
    return [str(REPO / "scripts" / "reward_modeling.py"), "--config", str(REPO / "configs" / "reward" / "tiny.yaml"),
            "--data_dir", str(data), "--output_dir", str(out), "--model_name_or_path", str(base),
            "--use_peft", "true", "--lora_task_type", "SEQ_CLS", "--lora_r", "4", "--lora_alpha", "8",
            "--lora_target_modules", "q_proj", "v_proj", "--max_length", "128",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_steps", "3",
            "--learning_rate", "1e-2", "--warmup_steps", "0", "--logging_steps", "1", "--save_strategy", "no",
            "--eval_before_training", "false", "--disable_tqdm", "true"]


def load_record(record: Path) -> tuple[list[dict], list[torch.Tensor], list[torch.Tensor], list[list[str]]]:
    infos = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    start = [torch.load(record / f"start{r}.pt") for r in (0, 1)]
    end = [torch.load(record / f"end{r}.pt") for r in (0, 1)]
    writes = [(record / f"writes{r}.txt").read_text().split() if (record / f"writes{r}.txt").exists() else []
              for r in (0, 1)]
    return infos, start, end, writes


def rows(batch: list[list[int]], pairs: bool) -> list[tuple]:
    """The sequences of one batch; for the reward pairs (chosen rows, then rejected) the chosen ones,
    which differ from pair to pair (a question's rejected answer repeats)."""
    return [tuple(row) for row in (batch[: len(batch) // 2] if pairs else batch)]


def check_cooperation(stage: str, record: Path, out: Path, results_file: str, model_file: str, steps: int):
    infos, start, end, writes = load_record(record)
    same = (end[0] - end[1]).abs().max().item()
    moved = (end[0] - start[0]).abs().max().item()
    start_diff = (start[0] - start[1]).abs().max().item()
    print(f"\n{stage}: {end[0].numel():,} trainable values; max |rank0 - rank1| after training {same:.3g}, "
          f"moved by up to {moved:.3g}; world size {infos[0]['world_size']}, {infos[0]['distributed_type']}; "
          f"results written by rank {[r for r in (0, 1) if writes[r]]}")

    # Two processes of one run, data parallel over gloo
    for rank, info in enumerate(infos):
        assert info["process_index"] == rank and info["world_size"] == 2 and info["dist_world_size"] == 2, info
        assert info["accelerator_processes"] == 2 and info["backend"] == "gloo", info
        assert info["wrapped"] == "DistributedDataParallel", info
        assert info["world_process_zero"] == (rank == 0)
        assert info["global_step"] == steps and len(info["batches"]) == steps * info["grad_accum"]

    # Same weights on both ranks: same start, same end (gradients averaged), and training moved them
    assert start_diff == 0
    assert same == 0
    assert moved > 1e-4
    # The global batch is both ranks' data: each step, the ranks trained on different rows
    pairs = stage == "reward"
    for step in range(steps):
        a, b = rows(infos[0]["batches"][step], pairs), rows(infos[1]["batches"][step], pairs)
        assert len(a) == len(b) == infos[0]["per_device_batch"]
        assert set(a).isdisjoint(b), f"step {step + 1}: both ranks trained on the same rows"

    # One set of files, by rank 0 only
    assert writes == [[results_file], []]
    assert sorted(p.name for p in out.glob("*_results.json")) == [results_file]
    assert len(list(out.glob("*.safetensors"))) == 1 and (out / model_file).is_file()
    assert not list(out.glob("*.tmp")) and not list(out.glob("checkpoint-*"))
    return infos, json.loads((out / results_file).read_text())


def check_sft(record: Path, out: Path) -> None:
    infos, results = check_cooperation("sft", record, out, "sft_results.json", "model.safetensors", steps=2)
    # blocks of 32 tokens, 2 per device, 2 steps, 2 processes: tokens counted over both ranks (1 process: 128)
    tokens = 2 * 32 * 2 * 2
    assert infos[0]["per_device_batch"] == 2
    assert all(len(row) == 32 for info in infos for batch in info["batches"] for row in batch)
    assert infos[0]["total_train_tokens"] == infos[1]["total_train_tokens"] == tokens
    assert results["num_tokens"] == tokens and results["global_step"] == 2
    # the saved model is the trained one (every weight trains in full: same names, same order)
    saved = load_file(out / "model.safetensors")
    flat = torch.cat([saved[k].float().reshape(-1) for k in sorted(saved)])
    assert torch.equal(flat, torch.load(record / "end0.pt"))


LAUNCHERS = {"torchrun": torchrun, "accelerate": accelerate_launch}


def check_logs_from_rank0_only(output: str, done_line: str) -> None:
    """Progress lines come from rank 0 alone; the other rank logs warnings only, naming itself."""
    assert output.count(done_line) == 1, output[-3000:]
    assert "INFO [rank 0] stackllama" in output
    assert "INFO [rank 1]" not in output


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sft_two_processes_train_one_model_on_both_ranks_data(small, tmp_path, launcher):
    out, record = tmp_path / "sft", tmp_path / "record"
    output = LAUNCHERS[launcher](sft_args(small, out), nproc=2, env=worker_env(tmp_path, record), timeout=TIMEOUT)
    check_sft(record, out)
    check_logs_from_rank0_only(output, "SFT done")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_reward_two_processes_train_one_model_on_both_ranks_data(small, tmp_path, launcher):
    out, record = tmp_path / "reward", tmp_path / "record"
    output = LAUNCHERS[launcher](reward_args(small, out), nproc=2, env=worker_env(tmp_path, record), timeout=TIMEOUT)
    check_logs_from_rank0_only(output, "reward modeling done")
    infos, results = check_cooperation("reward", record, out, "reward_results.json", "adapter_model.safetensors",
                                       steps=3)
    assert infos[0]["per_device_batch"] == 4 and results["global_step"] == 3
    # 3 steps of 2 x 4 pairs: the 24 training pairs, each once, across the two ranks (1 process: 12 of them)
    chosen = [row for info in infos for batch in info["batches"] for row in rows(batch, pairs=True)]
    assert len(chosen) == len(set(chosen)) == results["train_pairs"] == 24


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_stage_under_deepspeed_zero3_trains_as_ddp_does(small, tmp_path, stage):
    """`accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml` (DeepSpeed on CPU,
    two processes, weights sharded): the model saved from the shards equals the one the same run
    trains under DDP (torchrun), and moved from the start. SFT trains every weight of the tiny
    model and also writes --merge's full-weights copy; the reward model is LoRA + score head."""
    pytest.importorskip("deepspeed", reason="pip install 'stackllama[deepspeed]'")
    make_args = sft_args if stage == "sft" else reward_args
    extra = ("--merge", "true") if stage == "sft" else ()
    ddp, ds = tmp_path / "ddp", tmp_path / "zero3"
    torchrun(make_args(small, ddp, *extra), nproc=2, env=worker_env(tmp_path, tmp_path / "record_ddp"), timeout=TIMEOUT)
    output = accelerate_launch(make_args(small, ds, *extra), nproc=2, env=worker_env(tmp_path, tmp_path / "record_ds"),
                               timeout=TIMEOUT, config_file="deepspeed_zero3.yaml")
    info = json.loads((tmp_path / "record_ds" / "rank0.json").read_text())
    assert info["distributed_type"] == "DistributedType.DEEPSPEED" and info["wrapped"] == "DeepSpeedEngine"
    assert info["world_size"] == 2
    check_logs_from_rank0_only(output, "SFT done" if stage == "sft" else "reward modeling done")

    name = "model.safetensors" if stage == "sft" else "adapter_model.safetensors"
    a, b = load_file(ddp / name), load_file(ds / name)
    assert sorted(a) == sorted(b)
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    if stage == "sft":
        start = load_file(small[2] / "model.safetensors")
        moved = max((a[k] - start[k]).abs().max().item() for k in start)
        merged = load_file(tmp_path / "zero3-merged" / "model.safetensors")
        assert all(torch.equal(merged[k], b[k]) for k in b)  # the merged copy is the gathered model, not shards
    else:
        moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)  # LoRA B starts at zero
    print(f"\n{stage} under ZeRO-3: max |DeepSpeed - DDP| of the saved weights {diff:.3g}, moved by up to {moved:.3g}")
    assert moved > 1e-4
    assert diff < 1e-5
