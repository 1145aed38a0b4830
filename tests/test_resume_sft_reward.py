"""Kill and resume for the SFT and reward stages (issue 8), with the real scripts in child processes.

Each stage runs 6 steps on the small model with a checkpoint every 2 steps, once straight
through and then SIGKILLed (a) inside training, after checkpoint-4, and (b) inside the write of
checkpoint-4, between the model/optimizer files and the RNG/trainer state; `--resume_from_checkpoint
latest` must then end with the same final weights and the same results. SFT trains in full on
packed blocks (data position); the reward model trains a LoRA adapter with dropout 0.1 over two
epochs (RNG state, epoch reshuffle). A NaN loss (SFT, child process) or an inf gradient (reward, in
process) injected at step 3 must stop the run with one line naming stage, step and tensor, with
checkpoint-2 still the latest. Run with `-s` to see the
max |diff| figures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interrupt_helpers import REPO, hook_env, kill_when, max_abs_diff
from interrupt_helpers import run as run_to_end
from sft_helpers import small_run_args, small_stage_inputs

from stackllama.hf_trainer import STAGE_STATE, NonFiniteError, NonFiniteGuard
from stackllama.resume import MARKER, checkpoints, latest_checkpoint

pytestmark = pytest.mark.slow

STEPS = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2"]

# Started in every child (sitecustomize): HOOK=train pauses before the training step after
# HOOK_STEP steps, HOOK=save inside the write of checkpoint-HOOK_STEP (after the model, optimizer
# and scheduler files, before the RNG and trainer state); HOOK=nan_loss makes the loss of the step
# after HOOK_STEP steps NaN (and so its gradients).
HOOK = r'''
import math, os, time
import transformers

MODE, STEP = os.environ["HOOK"], int(os.environ["HOOK_STEP"])
training_step, save_rng_state = transformers.Trainer.training_step, transformers.Trainer._save_rng_state


def hooked_training_step(self, model, inputs, *args, **kwargs):
    if self.state.global_step != STEP:
        return training_step(self, model, inputs, *args, **kwargs)
    if MODE == "train":
        print(f"HOOK: paused inside training step {STEP + 1}", flush=True)
        time.sleep(120)
    if MODE == "nan_loss":
        compute_loss = self.compute_loss

        def nan_loss(*a, **k):
            out = compute_loss(*a, **k)
            return (out[0] * math.nan, *out[1:]) if isinstance(out, tuple) else out * math.nan

        self.compute_loss = nan_loss
        try:
            return training_step(self, model, inputs, *args, **kwargs)
        finally:
            del self.compute_loss
    return training_step(self, model, inputs, *args, **kwargs)


def hooked_save_rng_state(self, output_dir):
    if MODE == "save" and self.state.global_step == STEP:
        print(f"HOOK: paused inside the write of {output_dir}", flush=True)
        time.sleep(120)
    return save_rng_state(self, output_dir)


transformers.Trainer.training_step = hooked_training_step
transformers.Trainer._save_rng_state = hooked_save_rng_state
'''


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    return small_stage_inputs(tmp)


def command(stage: str, small, out: Path, *extra: str) -> list[str]:
    _, data, base = small
    if stage == "sft":  # full training on packed 32-token blocks, eval before and after
        return [sys.executable, str(REPO / "scripts" / "sft.py"),
                *small_run_args(data, out, base, *STEPS, "--eval_before_training", "true", *extra)]
    # LoRA (dropout 0.1) + score head, 24 pairs in batches of 8: 3 steps per epoch, 2 epochs
    return [sys.executable, str(REPO / "scripts" / "reward_modeling.py"), "--config",
            str(REPO / "configs" / "reward" / "tiny.yaml"), "--data_dir", str(data), "--output_dir", str(out),
            "--model_name_or_path", str(base), "--use_peft", "true", "--lora_task_type", "SEQ_CLS", "--lora_r", "4",
            "--lora_alpha", "8", "--lora_dropout", "0.1", "--lora_target_modules", "q_proj", "v_proj",
            "--max_length", "128", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
            "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--use_cpu", "true",
            "--disable_dropout", "false", "--disable_tqdm", "true", *STEPS, *extra]


RESULTS = {"sft": "sft_results.json", "reward": "reward_results.json"}


@pytest.fixture(scope="module")
def uninterrupted(small):
    """Each stage's straight run (built once): its output folder."""
    done = {}

    def get(stage):
        if stage not in done:
            out = small[0] / f"{stage}-uninterrupted"
            run_to_end(command(stage, small, out))
            done[stage] = out
        return done[stage]

    return get


def assert_same_results(a: Path, b: Path, stage: str) -> None:
    """Everything but timings: the untrained figures are carried over, train_loss covers the whole run."""
    ra, rb = (json.loads((folder / RESULTS[stage]).read_text()) for folder in (a, b))
    for key in ("train_runtime_s", "wall_time_s"):
        ra.pop(key, None), rb.pop(key, None)
    assert ra.keys() == rb.keys()
    for key in ra:
        if isinstance(ra[key], float):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), key
        else:
            assert rb[key] == ra[key], key


def steps(folder: Path) -> list[int]:
    return [int(path.name.split("-")[1]) for path in checkpoints(folder, "checkpoint")]


def env_for(tmp: Path, mode: str, step: int) -> dict:
    return hook_env(tmp / f"hook-{mode}", HOOK, {"HOOK": mode, "HOOK_STEP": str(step)})


# ----------------------------------------------------------------------------- kill and resume


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_straight_run_keeps_the_newest_complete_checkpoints(stage, uninterrupted):
    out = uninterrupted(stage)
    assert steps(out) == [4, 6]  # save_total_limit 2 pruned checkpoint-2
    assert not list(out.glob(".*partial"))
    state = json.loads((out / "checkpoint-6" / STAGE_STATE).read_text())
    assert state["stage"] == stage and state["global_step"] == 6
    assert state["results"]  # the untrained model's figures travel with the checkpoint


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_killed_inside_training_resumes_to_the_same_weights(stage, small, uninterrupted, tmp_path):
    out = tmp_path / stage
    kill_when(command(stage, small, out), r"HOOK: paused inside training step 5", env=env_for(tmp_path, "train", 4))
    assert steps(out) == [2, 4] and not (out / RESULTS[stage]).exists()

    resumed = run_to_end(command(stage, small, out, "--resume_from_checkpoint", "latest"))
    assert f"resuming from {out / 'checkpoint-4'}" in resumed.stderr
    diff = max_abs_diff(out, uninterrupted(stage))
    print(f"\n{stage}: killed inside training step 5, resumed from checkpoint-4: max |diff| of final weights {diff:.3g}")
    assert diff <= 1e-6
    assert max_abs_diff(out, out / "checkpoint-4") > 1e-4  # the resumed run did train on
    assert_same_results(uninterrupted(stage), out, stage)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_killed_inside_a_checkpoint_write_resumes_from_the_previous_one(stage, small, uninterrupted, tmp_path):
    """The kill leaves `.checkpoint-4.partial`; a folder named `checkpoint-4` without the completion
    marker (as a copy cut short would leave) is planted beside it. `latest` must skip both."""
    out = tmp_path / stage
    kill_when(command(stage, small, out), r"HOOK: paused inside the write of", env=env_for(tmp_path, "save", 4))
    staged = out / ".checkpoint-4.partial" / "checkpoint-4"
    assert any(staged.glob("*.safetensors")) and (staged / "optimizer.pt").is_file()
    assert not (staged / "trainer_state.json").exists() and not (staged / MARKER).exists()
    assert steps(out) == [2]
    shutil.copytree(staged, out / "checkpoint-4")  # half-written, in place
    assert steps(out) == [2] and latest_checkpoint(out, "checkpoint") == out / "checkpoint-2"

    resumed = run_to_end(command(stage, small, out, "--resume_from_checkpoint", "latest"))
    assert f"resuming from {out / 'checkpoint-2'}" in resumed.stderr
    assert not (out / ".checkpoint-4.partial").exists() and steps(out) == [4, 6]
    diff = max_abs_diff(out, uninterrupted(stage))
    print(f"\n{stage}: killed inside the write of checkpoint-4, resumed from checkpoint-2: max |diff| {diff:.3g}")
    assert diff <= 1e-6
    assert_same_results(uninterrupted(stage), out, stage)


# ----------------------------------------------------------------------------- NaN / inf


def test_a_nan_loss_stops_the_script_in_one_line_and_keeps_the_last_good_checkpoint(small, tmp_path):
    out = tmp_path / "sft"
    env = env_for(tmp_path, "nan_loss", 2)
    proc = subprocess.run(command("sft", small, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    message = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(message) == 1, proc.stderr[-3000:]
    assert "sft step 3: non-finite value (NaN/inf) in the loss;" in message[0]
    assert f"latest complete checkpoint: {out / 'checkpoint-2'}" in message[0]
    assert steps(out) == [2] and latest_checkpoint(out, "checkpoint") == out / "checkpoint-2"
    assert not list(out.glob(".*partial")) and not (out / RESULTS["sft"]).exists()


def test_a_nan_gradient_stops_the_reward_step_before_clipping(small, tmp_path, monkeypatch):
    """In process (the script's main), a NaN in one gradient of step 3: the error names that
    parameter (checked before clipping, which would spread it to all), checkpoint-2 stays the latest."""
    import transformers

    out = tmp_path / "reward"
    training_step = transformers.Trainer.training_step
    poisoned = []

    def poison(self, model, inputs, *args, **kwargs):
        loss = training_step(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 2:
            with_grad = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
            name, param = with_grad[-1]  # the last: a check after clipping would name the first
            param.grad.view(-1)[0] = float("nan")  # clipping by a NaN norm makes every gradient NaN
            poisoned.extend([name, with_grad[0][0]])
        return loss

    monkeypatch.setattr(transformers.Trainer, "training_step", poison)
    script = load_script("reward_modeling.py")
    from trl import ModelConfig, RewardConfig

    from stackllama.cli import parse_args
    from stackllama.reward_modeling import RewardScriptArguments

    args = parse_args((RewardScriptArguments, RewardConfig, ModelConfig), args=command("reward", small, out)[2:])
    with pytest.raises(NonFiniteError) as error:
        script.main(*args)
    message = str(error.value)
    assert "\n" not in message and message.startswith("reward step 3: non-finite value (NaN/inf) in the gradient of ")
    assert f"the gradient of {poisoned[0]};" in message and poisoned[0] != poisoned[1]
    assert f"latest complete checkpoint: {out / 'checkpoint-2'}" in message
    assert steps(out) == [2] and not list(out.glob(".*partial")) and not (out / RESULTS["reward"]).exists()


def load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_guard_names_the_tensor_and_passes_finite_steps():
    from types import SimpleNamespace

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model(torch.ones(1, 3)).sum().backward()
    guard = NonFiniteGuard("sft")
    guard.record_loss(torch.tensor(0.5))
    guard.check(model, SimpleNamespace(global_step=0))  # finite: nothing happens

    model[1].bias.grad[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^sft step 8: .* in the gradient of 1\.bias;"):
        guard.check(model, SimpleNamespace(global_step=7))
    guard.record_loss(torch.tensor(float("inf")))
    with pytest.raises(NonFiniteError, match=r"^sft step 9: .* in the loss;"):
        guard.check(model, SimpleNamespace(global_step=8))


def test_resume_from_a_named_incomplete_checkpoint_is_a_one_line_error(small, tmp_path):
    from sft_helpers import load_sft_script, parse_sft_args

    from stackllama.resume import CheckpointError

    half = tmp_path / "out" / "checkpoint-2"
    half.mkdir(parents=True)
    args = parse_sft_args(*small_run_args(small[1], tmp_path / "out", small[2], "--resume_from_checkpoint", str(half)))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_sft_script().main(*args)
