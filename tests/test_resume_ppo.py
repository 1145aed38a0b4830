"""PPO checkpoints and resume, with real SIGKILLs of `scripts/rl_ppo.py` (issue 8).

A fixed-seed CPU run killed inside a PPO update, or inside a checkpoint write, and resumed
with `--resume_from_checkpoint latest` must end with the weights, log and figures of the
run that was never stopped. The runs are mid-epoch (3 batches per epoch) and use value-head
dropout, adaptive KL, score scaling, LR annealing and a seeded length sampler, so each of
their random or stateful parts has to come back from the checkpoint.
"""

from __future__ import annotations

import json
import shutil

import ppo_tiny
import pytest
import torch
from interrupt_helpers import PYTHON, REPO, hook_env, kill_when, run
from ppo_tiny import make_model, make_policy, make_queries, make_tokenizer
from safetensors.torch import load_file
from sft_helpers import write_pairs
from test_rl_script import reward_model, rl_rows

from stackllama.resume import MARKER, checkpoints, latest_checkpoint

one_thread = ppo_tiny.one_thread  # the fixture, for the in-process test
STEPS, SAVE_FREQ = 6, 2
# 12 queries fit (two are too long): 3 batches of 4 per epoch, so checkpoints 2 and 4 fall mid-epoch
QUESTION_LENGTHS = [3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8, 30, 40]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_folder(tmp_path_factory.mktemp("resume_run"))


def make_run_folder(run_folder):
    """runs/<run>/{data,sft-merged,reward} on the tiny fixtures (as in test_rl_script)."""
    tok = make_tokenizer()
    write_pairs(run_folder / "data", rl_rows(QUESTION_LENGTHS), subset="rl")
    make_model(tok, seed=0).save_pretrained(run_folder / "sft-merged")
    tok.save_pretrained(run_folder / "sft-merged")
    reward_model(tok).save_pretrained(run_folder / "reward")
    tok.save_pretrained(run_folder / "reward")
    return run_folder


def command(run_folder, out, *extra):
    return [PYTHON, str(REPO / "scripts" / "rl_ppo.py"), "--config", str(REPO / "configs" / "ppo" / "tiny.yaml"),
            "--data_dir", str(run_folder / "data"), "--output_dir", str(out), "--steps", str(STEPS),
            "--save_freq", str(SAVE_FREQ), "--batch_size", "4", "--mini_batch_size", "2", "--generation_batch_size", "4",
            "--ppo_epochs", "2", "--max_prompt_length", "20", "--output_min_length", "3", "--output_max_length", "8",
            "--learning_rate", "1e-3", "--lr_schedule", "linear", "--use_score_scaling", "true", "--num_threads", "1",
            "--seed", "0", *extra]


@pytest.fixture(scope="module")
def uninterrupted(run_dir):
    """The reference: never stopped (keeping the newest 2 checkpoints)."""
    out = run_dir / "uninterrupted"
    run(command(run_dir, out, "--save_total_limit", "2"))
    return out


def weights(folder):
    return {**load_file(str(folder / "model.safetensors")),
            **{f"v_head.{k}": v for k, v in load_file(str(folder / "value_head.safetensors")).items()}}


def max_abs_diff(a, b) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def log_rows(folder):
    return [json.loads(line) for line in (folder / "ppo_log.jsonl").read_text().splitlines()]


def assert_same_run(out, reference, label):
    """Final policy + value head, the log of every step and the results' figures as the reference's."""
    diff = max_abs_diff(out, reference)
    print(f"{label}: max |diff| of the final policy + value head vs the uninterrupted run = {diff:.3g}")
    assert diff <= 1e-6
    assert max_abs_diff(reference / f"checkpoint-{SAVE_FREQ * 2}", reference) > 1e-4  # the last steps did move weights
    rows, ref_rows = log_rows(out), log_rows(reference)
    assert [r["env/step"] for r in rows] == list(range(1, STEPS + 1)) == [r["env/step"] for r in ref_rows]
    for row, ref in zip(rows, ref_rows):
        assert row["env/reward_mean"] == pytest.approx(ref["env/reward_mean"], abs=1e-6)
        assert [s["reward"] for s in row["samples"]] == pytest.approx([s["reward"] for s in ref["samples"]], abs=1e-6)
        assert [s["response"] for s in row["samples"]] == [s["response"] for s in ref["samples"]]
        assert row["objective/kl_coef"] == pytest.approx(ref["objective/kl_coef"], abs=1e-9)
    results, ref_results = (json.loads((f / "ppo_results.json").read_text()) for f in (out, reference))
    for key in ("steps", "reward_first", "reward_last", "kl_last", "kl_coef_last"):
        assert results[key] == pytest.approx(ref_results[key], abs=1e-6), key
    state, ref_state = (json.loads((f / f"checkpoint-{STEPS}" / "trainer_state.json").read_text()) for f in (out, reference))
    for key in ("step", "kl_ctl", "running", "data"):
        assert state[key] == pytest.approx(ref_state[key]) if key == "running" else state[key] == ref_state[key], key


def test_uninterrupted_run_prunes_and_checkpoints_reload(uninterrupted):
    """(f) save_total_limit 2 keeps checkpoints 4 and 6; (g) a checkpoint reloads as a policy with its value head."""
    from stackllama.ppo import AutoModelForCausalLMWithValueHead

    assert [p.name for p in checkpoints(uninterrupted, "checkpoint")] == ["checkpoint-4", "checkpoint-6"]
    assert not list(uninterrupted.glob(".checkpoint-*"))  # no staging folder left
    ckpt = uninterrupted / "checkpoint-4"
    assert {"optimizer.pt", "trainer_state.json", "rng_state_0.pt", MARKER} <= {p.name for p in ckpt.iterdir()}
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(ckpt))
    saved = weights(ckpt)
    for name, tensor in model.pretrained_model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert torch.equal(model.v_head.summary.weight, saved["v_head.summary.weight"])
    # the final checkpoint is the final policy
    assert max_abs_diff(uninterrupted / f"checkpoint-{STEPS}", uninterrupted) == 0.0


@pytest.mark.usefixtures("one_thread")
def test_lora_policy_checkpoint_round_trip(tmp_path):
    """The recipe's LoRA policy, in process: a trainer built as for a fresh run and loaded from
    checkpoint-2 takes steps 3 and 4 as the trainer that never stopped (adapter, value head,
    optimizer, dropout and sampling random numbers, data position)."""
    from stackllama.ppo import LengthSampler, PPOConfig, PPOTrainer

    tok = make_tokenizer()
    data = [{"input_ids": q, "query": tok.decode(q)} for q in make_queries(tok, 12, seed=5)]

    def trainer():
        cfg = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2, steps=4, seed=0,
                        lr_schedule="linear", use_score_scaling=True)
        return PPOTrainer(cfg, make_policy(tok, lora_dropout=0.1, value_head_dropout=0.1), None, tok, dataset=data)

    def take_steps(tr, sampler, n):
        batches = tr.batches()
        for _ in range(n):
            queries = next(batches)["input_ids"]
            responses = tr.generate(queries, return_prompt=False, length_sampler=sampler, do_sample=True, top_k=0, top_p=1.0)
            tr.step(queries, responses, [(r == 5).float().sum() for r in responses])

    def trainable(tr):
        return {n: p.detach().clone() for n, p in tr.unwrapped_model.named_parameters() if p.requires_grad}

    a, sampler_a = trainer(), LengthSampler(2, 6, seed=0)
    take_steps(a, sampler_a, 2)
    saved = a.save_checkpoint(str(tmp_path), length_sampler=sampler_a)
    assert saved.name == "checkpoint-2" and (saved / "adapter_model.safetensors").is_file()
    at_2 = trainable(a)
    take_steps(a, sampler_a, 2)

    b, sampler_b = trainer(), LengthSampler(2, 6, seed=0)
    b.load_checkpoint(str(saved), length_sampler=sampler_b)
    assert all(torch.equal(p, at_2[n]) for n, p in trainable(b).items())
    take_steps(b, sampler_b, 2)
    wa, wb = trainable(a), trainable(b)
    diff = max((wa[n] - wb[n]).abs().max().item() for n in wa)
    print(f"LoRA policy resumed in process: max |diff| after 2 more steps = {diff:.3g}")
    assert diff <= 1e-6
    assert max((wa[n] - at_2[n]).abs().max().item() for n in wa if "lora_B" in n) > 1e-4  # the adapter moved
    assert (b.kl_ctl.value, b.running.state_dict(), b.current_step) == (a.kl_ctl.value, a.running.state_dict(), 4)


def test_which_checkpoint_a_run_starts_from(uninterrupted, tmp_path):
    """`latest` takes the newest complete checkpoint (none: a fresh start); a named folder must be
    complete; a fresh start refuses a folder holding an earlier run's checkpoints."""
    from stackllama.ppo.recipe import checkpoint_to_resume
    from stackllama.resume import CheckpointError

    assert checkpoint_to_resume("latest", uninterrupted) == uninterrupted / "checkpoint-6"
    assert checkpoint_to_resume(str(uninterrupted / "checkpoint-4"), uninterrupted) == uninterrupted / "checkpoint-4"
    assert checkpoint_to_resume("latest", tmp_path) is None and checkpoint_to_resume(None, tmp_path) is None
    with pytest.raises(ValueError, match="checkpoints of an earlier run .checkpoint-6.*--resume_from_checkpoint latest"):
        checkpoint_to_resume(None, uninterrupted)
    half = tmp_path / "checkpoint-8"
    half.mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        checkpoint_to_resume(str(half), tmp_path)


def test_recipe_config_checkpoints():
    from test_rl_script import parse

    script, _, _ = parse("--config", str(REPO / "configs" / "ppo" / "llama-7b.yaml"))
    assert (script.save_freq, script.save_total_limit, script.resume_from_checkpoint) == (100, 3, None)


KILL_IN_UPDATE = """
import time
from stackllama.ppo import backend as _backend

_step = _backend.SingleProcess.optimizer_step

def _hooked(self, step):
    _step(self, step)
    if step == 5:  # step 5 is running and has moved the weights once
        print("HOOK inside the update of step 5", flush=True)
        time.sleep(60)

_backend.SingleProcess.optimizer_step = _hooked
"""


def test_killed_inside_training_resumes_to_the_same_run(run_dir, uninterrupted, tmp_path):
    """(b) SIGKILL in the middle of step 5's update; resume from checkpoint-4."""
    out = run_dir / "killed_in_update"
    kill_when(command(run_dir, out), r"HOOK inside the update of step 5", hook_env(tmp_path / "hook", KILL_IN_UPDATE))
    assert latest_checkpoint(out, "checkpoint").name == "checkpoint-4"
    assert len(log_rows(out)) == 4  # killed before step 5's log row
    proc = run(command(run_dir, out, "--resume_from_checkpoint", "latest"))
    assert "resumed from" in proc.stdout + proc.stderr and "checkpoint-4" in proc.stdout + proc.stderr
    assert_same_run(out, uninterrupted, "killed inside step 5's update")


KILL_IN_SAVE = """
import time
from stackllama.ppo import value_head as _value_head

_save = _value_head.AutoModelForCausalLMWithValueHead.save_pretrained

def _hooked(self, save_directory, **kwargs):
    _save(self, save_directory, **kwargs)
    if str(save_directory).endswith(".checkpoint-4.partial"):  # weights written, trainer state and marker not yet
        print("HOOK checkpoint-4 weights written", flush=True)
        time.sleep(60)

_value_head.AutoModelForCausalLMWithValueHead.save_pretrained = _hooked
"""


def test_killed_inside_a_checkpoint_write_resumes_from_the_previous_one(run_dir, uninterrupted, tmp_path):
    """(c) SIGKILL while checkpoint-4 is being written; (d) a checkpoint folder without its
    marker is skipped too: resume picks checkpoint-2."""
    out = run_dir / "killed_in_save"
    kill_when(command(run_dir, out), r"HOOK checkpoint-4 weights written", hook_env(tmp_path / "hook", KILL_IN_SAVE))
    staging = out / ".checkpoint-4.partial"
    assert (staging / "model.safetensors").is_file() and not (staging / MARKER).exists()
    assert not (staging / "trainer_state.json").exists()
    assert [p.name for p in checkpoints(out, "checkpoint")] == ["checkpoint-2"]
    assert len(log_rows(out)) == 4  # steps 3 and 4 are logged but not checkpointed: resume redoes them
    # a half-copied checkpoint: named like one, no marker; trusted, it would end the run at once
    fake = out / "checkpoint-6"
    shutil.copytree(out / "checkpoint-2", fake)
    (fake / MARKER).unlink()
    assert latest_checkpoint(out, "checkpoint").name == "checkpoint-2"

    proc = run(command(run_dir, out, "--resume_from_checkpoint", "latest"))
    output = proc.stdout + proc.stderr
    assert "resumed from" in output and "checkpoint-2 at step 2" in output
    assert not staging.exists()  # the next save of step 4 cleared it
    assert_same_run(out, uninterrupted, "killed inside the checkpoint-4 write")


NAN_AT_STEP_3 = """
from stackllama import reward_scoring as _reward_function

_call = _reward_function.RewardFunction.__call__
_calls = [0]

def _hooked(self, *args, **kwargs):
    scores = list(_call(self, *args, **kwargs))
    _calls[0] += 1
    if _calls[0] == 3:
        scores[1] = float("nan")
    return scores

_reward_function.RewardFunction.__call__ = _hooked
"""


def test_nan_reward_stops_with_one_line_and_keeps_the_last_good_checkpoint(run_dir, tmp_path):
    """(e) a NaN reward at step 3: one-line error naming PPO, the step and the tensor, exit 1,
    checkpoint-2 stays the latest and nothing of step 3 is saved."""
    import subprocess

    out = run_dir / "nan"
    proc = subprocess.run(command(run_dir, out), cwd=REPO, env=hook_env(tmp_path / "hook", NAN_AT_STEP_3),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rl_ppo.py: error: PPO step 3 stopped: 1 non-finite value(s) (NaN/inf) in rewards"), last
    assert latest_checkpoint(out, "checkpoint").name == "checkpoint-2"
    assert [p.name for p in out.iterdir() if "checkpoint" in p.name] == ["checkpoint-2"]
    assert len(log_rows(out)) == 2


@pytest.mark.slow
def test_two_processes_resume_to_the_same_run(run_dir):
    """Two CPU processes (gloo): each writes its own random state into the shared checkpoint;
    resuming from checkpoint-2 in the same folder redoes steps 3-4 exactly (and replaces
    checkpoint-4 and the log rows of steps 3-4)."""
    import os

    from interrupt_helpers import torchrun

    out = run_dir / "two_processes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def launch(*extra):
        return torchrun(command(run_dir, out, "--steps", "4", *extra)[1:], env=env)

    launch()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= {p.name for p in (out / "checkpoint-2").iterdir()}
    reference, reference_log = weights(out), log_rows(out)

    output = launch("--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert output.count("resumed from") == 1  # logged by rank 0 (both resume: rng_state_1.pt is read)
    resumed = weights(out)
    diff = max((resumed[k] - reference[k]).abs().max().item() for k in reference)
    print(f"two processes, resumed from checkpoint-2: max |diff| of the final policy + value head = {diff:.3g}")
    assert diff <= 1e-6
    rows = log_rows(out)
    assert [r["env/step"] for r in rows] == [1, 2, 3, 4]
    assert [r["env/reward_mean"] for r in rows] == pytest.approx([r["env/reward_mean"] for r in reference_log], abs=1e-6)
