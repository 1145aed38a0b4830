"""The pipeline driver: resume at the failed stage, reuse, --force / --from_stage, changed inputs,
config errors, the dry run of the multi-GPU config.

The resume logic is tested with fast fake stage scripts (each counts its runs and writes its
completion marker); tests/test_pipeline_run.py runs the real scripts end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stackllama import pipeline
from stackllama.pipeline import (
    PipelineArguments,
    PipelineError,
    StageSpec,
    Step,
    check_config,
    run_pipeline,
    runner,
)
from stackllama.run_layout import PIPELINE_RESULTS

REPO = Path(__file__).resolve().parent.parent

FAKE_STAGE = """
import argparse, os, sys
p = argparse.ArgumentParser()
p.add_argument("--out"); p.add_argument("--marker"); p.add_argument("--value", default="")
p.add_argument("--resume_from_checkpoint")
a = p.parse_args()
os.makedirs(a.out, exist_ok=True)
with open(a.out + ".runs.txt", "a") as f:  # beside the stage folder: survives its clean-up
    f.write(f"{a.resume_from_checkpoint}\\n")
open(os.path.join(a.out, "output.txt"), "a").write("x")
print("working on", a.out)
if os.path.exists(a.out + ".FAIL"):
    print("something went wrong in", a.out, file=sys.stderr)
    sys.exit(3)
if not os.path.exists(a.out + ".NO_MARKER"):
    with open(os.path.join(a.out, a.marker), "w") as f:
        f.write('{"value": "%s"}' % a.value)
"""

NAMES = ("one", "two", "three")


@pytest.fixture
def fake_pipeline(tmp_path, monkeypatch):
    """Three fake stages `one` -> `two` -> `three` in tmp_path/run; returns (run, runs_of, invoke)."""
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE)
    run = tmp_path / "run"
    values = {name: "a" for name in NAMES}

    def plan(name, args, settings):  # `two` is a training stage: resumes after a failure, else starts clean
        spec = StageSpec(name, name, str(script), name, "done.json", distributed=name == "two")
        return Step(spec, ["--out", str(run / name), "--marker", "done.json", "--value", values[name]], None)

    monkeypatch.setattr(runner, "STAGE_NAMES", NAMES)
    monkeypatch.setattr(runner, "plan_step", plan)

    def runs_of(name):
        path = run / f"{name}.runs.txt"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def invoke(**flags):
        lines = []
        args = PipelineArguments(output_dir=str(run), **flags)
        code = run_pipeline(args, {}, out=lines.append)
        return code, "\n".join(lines)

    return run, runs_of, invoke, values


def test_resumes_at_the_failed_stage(fake_pipeline):
    run, runs_of, invoke, _ = fake_pipeline
    (run / "two" / "checkpoint-9").mkdir(parents=True)  # left by an older run: a fresh start must not see it
    (run / "two.FAIL").touch()  # stage two fails until this is removed
    code, out = invoke()
    assert code == 1
    assert [runs_of(n) for n in NAMES] == [1, 1, 0]  # stopped at two; three never started
    assert "FAILED" in out and "exit code 3" in out and "resumes at two" in out
    assert "something went wrong" in out  # the log's last lines are shown
    assert not (run / "two" / "done.json").exists()
    assert not (run / "two" / "checkpoint-9").exists()  # a training stage starts clean...
    results = json.loads((run / PIPELINE_RESULTS).read_text())
    assert results["stages"]["two"]["status"] == "failed"

    (run / "two.FAIL").unlink()
    code, out = invoke()
    assert code == 0, out
    assert [runs_of(n) for n in NAMES] == [1, 2, 1]  # one reused, two and three ran
    # ... and a re-run of the same failed command resumes from its checkpoints, keeping its folder
    assert (run / "two.runs.txt").read_text().splitlines() == ["None", "latest"]
    assert (run / "two" / "output.txt").read_text() == "xx"
    assert "resuming from its latest checkpoint" in out
    assert "reused" in out.splitlines()[0]
    assert (run / "logs" / "two.log").read_text().startswith("$ ")

    code, out = invoke()  # everything complete: nothing runs
    assert code == 0 and [runs_of(n) for n in NAMES] == [1, 2, 1]


def test_force_and_from_stage(fake_pipeline):
    run, runs_of, invoke, _ = fake_pipeline
    assert invoke()[0] == 0
    assert invoke(force=True)[0] == 0
    assert [runs_of(n) for n in NAMES] == [2, 2, 2]
    assert (run / "two" / "output.txt").read_text() == "x"  # redone from a clean folder, not resumed
    assert (run / "one" / "output.txt").read_text() == "xx"  # other stages overwrite their own outputs
    assert invoke(from_stage="two")[0] == 0
    assert [runs_of(n) for n in NAMES] == [2, 3, 3]
    assert invoke(until_stage="one", force=True)[0] == 0
    assert [runs_of(n) for n in NAMES] == [3, 3, 3]


def test_changed_stage_reruns_it_and_everything_after(fake_pipeline):
    run, runs_of, invoke, values = fake_pipeline
    assert invoke()[0] == 0
    values["two"] = "b"  # its flags changed
    code, out = invoke()
    assert code == 0
    assert [runs_of(n) for n in NAMES] == [1, 2, 2]
    assert "changed" in out
    # an upstream stage re-run by itself (e.g. --until_stage) makes the later ones stale
    assert invoke(until_stage="one", force=True)[0] == 0
    assert invoke()[0] == 0
    assert [runs_of(n) for n in NAMES] == [2, 3, 3]


def test_killed_driver_between_stages_does_not_reuse_stale_outputs(fake_pipeline):
    """Stage one re-ran (new record) but the driver died before two: two's old output is stale."""
    run, runs_of, invoke, _ = fake_pipeline
    assert invoke()[0] == 0
    state = json.loads((run / pipeline.STATE_DIR / "one.json").read_text())
    state["finished_at"] += 1  # what a later re-run of stage one alone leaves behind
    (run / pipeline.STATE_DIR / "one.json").write_text(json.dumps(state))
    assert invoke()[0] == 0
    assert [runs_of(n) for n in NAMES] == [1, 2, 2]


def test_exit_zero_without_marker_is_a_failure(fake_pipeline):
    run, runs_of, invoke, _ = fake_pipeline
    run.mkdir(parents=True)
    (run / "one.NO_MARKER").touch()
    code, out = invoke()
    assert code == 1 and "wrote no" in out
    assert runs_of("two") == 0


def test_dry_run_runs_nothing(fake_pipeline):
    run, runs_of, invoke, _ = fake_pipeline
    code, out = invoke(dry_run=True)
    assert code == 0
    assert [runs_of(n) for n in NAMES] == [0, 0, 0]
    assert out.count("would run") == 3 and "fake_stage.py --out" in out


def test_merge_stage_follows_the_adapter(tmp_path):
    """A merge stage runs only after a stage that saved an adapter; the next stage reads its output."""
    run = tmp_path / "run"
    args = PipelineArguments(output_dir=str(run))
    settings = check_config(args)
    (run / "sft").mkdir(parents=True)
    (run / "sft" / "config.json").write_text("{}")
    assert pipeline.plan_step("merge_sft", args, settings).skip_reason
    reward = pipeline.plan_step("reward", args, settings)
    assert reward.script_args[reward.script_args.index("--model_name_or_path") + 1] == str(run / "sft")

    (run / "sft" / "config.json").unlink()
    (run / "sft" / "adapter_config.json").write_text("{}")
    merge = pipeline.plan_step("merge_sft", args, settings)
    assert merge.skip_reason is None
    assert merge.script_args[merge.script_args.index("--output_name") + 1] == str(run / "sft-merged")
    reward = pipeline.plan_step("reward", args, settings)
    assert reward.script_args[reward.script_args.index("--model_name_or_path") + 1] == str(run / "sft-merged")


def test_stage_args_override_and_launchers(tmp_path):
    args = PipelineArguments(output_dir=str(tmp_path), launcher="torchrun", num_processes=2,
                             stages={"sft": {"args": {"max_steps": 5, "use_peft": True, "lora_target_modules": ["q", "v"]}}})
    settings = check_config(args)
    step = pipeline.plan_step("sft", args, settings)
    command = step.command(args, for_display=True)
    assert command[:4] == ["torchrun", "--nproc_per_node", "2", "scripts/sft.py"]
    assert command[-7:] == ["--max_steps", "5", "--use_peft", "true", "--lora_target_modules", "q", "v"]
    # a non-training stage ignores the launcher
    assert pipeline.plan_step("prepare", args, settings).command(args, for_display=True)[0] == "python"


@pytest.mark.parametrize("stages, message", [
    ({"sfft": {}}, "unknown stage 'sfft'"),
    ({"sft": {"confg": "x.yaml"}}, "unknown key stages.sft.confg"),
    ({"sft": {"config": "no/such.yaml"}}, "stages.sft.config no/such.yaml not found"),
    ({"sft": {"args": ["--max_steps", "5"]}}, "stages.sft.args must be a mapping"),
    ({"sft": {"launcher": "mpirun"}}, "stages.sft.launcher 'mpirun'"),
])
def test_config_errors_name_the_key(stages, message):
    with pytest.raises(PipelineError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_config(PipelineArguments(stages=stages), source="p.yaml")


def test_launcher_errors():
    with pytest.raises(PipelineError, match="torchrun needs num_processes"):
        check_config(PipelineArguments(launcher="torchrun"))
    with pytest.raises(PipelineError, match="--from_stage 'rl'"):
        check_config(PipelineArguments(from_stage="rl"))


def test_script_dry_run_of_the_recipe_config(tmp_path):
    """The 8-GPU config prints the accelerate commands of the recipe and creates nothing."""
    out = subprocess.run(
        [sys.executable, "scripts/run_pipeline.py", "--config", "configs/pipeline/llama-7b.yaml", "--dry_run",
         "--output_dir", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    assert not (tmp_path / "run").exists()
    lines = out.splitlines()
    assert any(line.strip().startswith(
        "accelerate launch --config_file accelerate_configs/multi_gpu.yaml scripts/sft.py --config configs/sft/llama-7b.yaml"
    ) for line in lines)
    assert "--model_name_or_path huggyllama/llama-7b" in out
    assert "tiny_model    skipped" in out
    # the recipe saves adapters, so every merge runs and the next stage reads the merged weights
    assert "scripts/merge_adapters.py --adapter_model_name" in out and "skipped: " + str(tmp_path) not in out
    assert f"--reward_model_name {tmp_path}/run/reward-merged" in out
    assert out.count("accelerate launch") == 3  # sft, reward, ppo; the rest in one process


def test_script_rejects_unknown_top_level_key(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text("output_dir: x\nlaunchr: python\n")
    proc = subprocess.run([sys.executable, "scripts/run_pipeline.py", "--config", str(config), "--dry_run"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "launchr" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_other_algorithms_are_opt_in_and_compared(tmp_path):
    """Default: PPO only (make demo as fast as before), the evaluation told to compare nothing else;
    compare.yaml: DPO, RLOO and GRPO from the same SFT (and reward) model, all four compared."""
    def dry_run(config):
        return subprocess.run([sys.executable, "scripts/run_pipeline.py", "--config", config, "--dry_run",
                               "--output_dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout

    out = dry_run("configs/pipeline/tiny.yaml")
    for name in ("dpo", "rloo", "grpo"):
        assert f"] {name:<12}  skipped: not in algorithms (ppo)" in out
    assert out.rstrip().endswith("--compare_with none")
    out = dry_run("configs/pipeline/compare.yaml")
    run = tmp_path / "run"
    assert f"scripts/dpo.py --config configs/dpo/tiny.yaml --data_dir {run}/data --output_dir {run}/dpo " \
           f"--model_name_or_path {run}/sft" in out
    for name in ("rloo", "grpo"):
        assert (f"scripts/{name}.py --config configs/{name}/tiny.yaml --data_dir {run}/data --output_dir {run}/{name} "
                f"--model_name_or_path {run}/sft --reward_model_name {run}/reward") in out
    assert out.rstrip().endswith("--compare_with dpo rloo grpo")
    assert "skipped: not in algorithms" not in out


@pytest.mark.parametrize("algorithms, message", [
    (["ppo", "sac"], "'sac' is not one"), (["dpo"], "must include ppo")])
def test_algorithm_errors(algorithms, message):
    with pytest.raises(PipelineError, match=message):
        check_config(PipelineArguments(algorithms=algorithms))
