"""Two CPU processes (torch.distributed gloo through accelerate): DDP-wrapped policy,
gradients synchronised (same weights on every rank), global score moments; then the real
`scripts/rl_ppo.py` under torchrun and under accelerate launch (issue 7)."""

import json
import os

import pytest
import torch
from interrupt_helpers import rank_recorder, torchrun

WORKER = os.path.join(os.path.dirname(__file__), "ppo_multiprocess_worker.py")


@pytest.mark.slow
def test_two_process_ppo_steps(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun([WORKER, str(tmp_path)], env=env, timeout=180)
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert results[0]["kl"] == pytest.approx(results[1]["kl"])  # KL averaged over ranks
    assert results[0]["kl_coef"] == pytest.approx(results[1]["kl_coef"])  # one beta everywhere
    # TRL 0.11's statistics are averaged over the processes (its gather_stats): one figure on every rank
    assert results[0]["loss_total"] == results[1]["loss_total"]
    assert results[0]["mean_raw_scores"] == results[1]["mean_raw_scores"] == pytest.approx(2.0)
    for res in results:
        assert res["world"] == 2 and res["wrapped"] == "DistributedDataParallel"
        assert res["same_weights"] and res["moved"]
        assert res["running_mean"] == pytest.approx(2.0)  # scores 0..3 and 1..4, over both ranks
        assert res["samples_differ_by_rank"]  # same prompts, different samples: seed + rank


# --------------------------------------------------------------------------- the real script
# `scripts/rl_ppo.py` with two processes under each launcher. A sitecustomize hook records per
# rank the queries of every PPO step, the KL coefficient after it, the trainable weights at the
# end, and each call of `write_results`.
HOOK = rank_recorder(r'''
    import stackllama.ppo.trainer as trainer_module

    step, save_pretrained = trainer_module.PPOTrainer.step, trainer_module.PPOTrainer.save_pretrained
    steps = []

    def hooked_step(self, queries, responses, scores):
        stats = step(self, queries, responses, scores)
        steps.append({"queries": [q.tolist() for q in queries], "kl_coef": self.kl_ctl.value,
                      "kl": stats["objective/kl"], "world": self.accelerator.num_processes,
                      "wrapped": type(self.model).__name__})
        return stats

    def hooked_save_pretrained(self, directory):
        RECORD.mkdir(parents=True, exist_ok=True)
        weights = torch.cat([p.detach().reshape(-1) for _, p in sorted(self.unwrapped_model.named_parameters())
                             if p.requires_grad])
        torch.save(weights, RECORD / f"end{RANK}.pt")
        (RECORD / f"rank{RANK}.json").write_text(json.dumps(steps))
        return save_pretrained(self, directory)

    trainer_module.PPOTrainer.step = hooked_step
    trainer_module.PPOTrainer.save_pretrained = hooked_save_pretrained
''')


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_rl_script_two_processes_make_one_run(tmp_path, launcher):
    """Two processes of `scripts/rl_ppo.py` (tiny config, defaults): a global batch of both
    ranks' queries (different on each rank), one KL coefficient, the same weights on both
    ranks at the end, one set of files, and progress logged by rank 0 only."""
    from interrupt_helpers import accelerate_launch, hook_env
    from test_resume_ppo import command, make_run_folder

    run = make_run_folder(tmp_path / "run")
    out, record = run / "ppo", tmp_path / "record"  # the policy and reward model: beside output_dir
    env = hook_env(tmp_path / "hook", HOOK, {"MP_RECORD": str(record), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    args = command(run, out, "--steps", "3", "--save_freq", "2")[1:]
    output = (torchrun if launcher == "torchrun" else accelerate_launch)(args, env=env, timeout=240)

    ranks = [json.load(open(record / f"rank{r}.json")) for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    for i in range(3):
        a, b = ranks[0][i], ranks[1][i]
        assert a["world"] == b["world"] == 2 and a["wrapped"] == "DistributedDataParallel"
        # the global batch is both ranks' queries: 4 each, none shared
        assert len(a["queries"]) == len(b["queries"]) == 4
        assert not {tuple(q) for q in a["queries"]} & {tuple(q) for q in b["queries"]}
        assert a["kl_coef"] == b["kl_coef"] and a["kl"] == pytest.approx(b["kl"])
    end = [torch.load(record / f"end{r}.pt") for r in (0, 1)]
    assert torch.equal(end[0], end[1])
    # one set of files, by rank 0
    assert (record / "writes0.txt").read_text().split() == ["ppo_results.json"]
    assert not (record / "writes1.txt").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert len((out / "ppo_log.jsonl").read_text().splitlines()) == 3
    results = json.loads((out / "ppo_results.json").read_text())
    assert results["steps"] == 3
    assert output.count("PPO done") == 1 and "INFO [rank 1]" not in output
