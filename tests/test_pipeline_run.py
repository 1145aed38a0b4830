"""The pipeline driver on the real stage scripts, shrunk to seconds per stage: a run that fails
at PPO, then the same run fixed, which reuses every stage before PPO and ends with the report.

This is what `make demo` does, minus the training time; it checks that the flags the driver
passes exist in every script and that the stages find each other's outputs. It runs sealed
off from the network: every process of the pipeline (the driver and each stage) starts with a
`sitecustomize` that denies DNS lookups and internet sockets and records each attempt, and
HF_HUB_OFFLINE is NOT set, so a stray Hub call fails the test instead of being skipped quietly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from interrupt_helpers import hook_env

REPO = Path(__file__).resolve().parent.parent

DENY_NETWORK = """
import os, socket

_LOG = os.environ["STACKLLAMA_NETWORK_LOG"]


def _denied(what, target):
    with open(_LOG, "a") as f:
        f.write(f"pid {os.getpid()}: {what} {target!r}\\n")
    raise OSError(f"network access denied by the offline test: {what} {target!r}")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _denied("connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _denied("connect", address)
    return _connect_ex(self, address)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.getaddrinfo = lambda host, *a, **k: _denied("getaddrinfo", host)
socket.create_connection = lambda address, *a, **k: _denied("create_connection", address)
"""


def write_config(path: Path, run: Path, ppo_extra: dict) -> Path:
    config = {
        "output_dir": str(run),
        "stages": {
            "prepare": {},
            "tiny_model": {"args": {"max_texts": 400}},
            "sft": {"config": "configs/sft/tiny.yaml",
                    "args": {"max_steps": 2, "max_length": 64, "per_device_train_batch_size": 2,
                             "max_eval_samples": 8, "logging_steps": 1, "disable_tqdm": True}},
            "merge_sft": {},
            "reward": {"config": "configs/reward/tiny.yaml",
                       "args": {"max_train_pairs": 8, "max_eval_pairs": 8, "max_length": 256,
                                "num_train_epochs": 1, "logging_steps": 1, "disable_tqdm": True}},
            "merge_reward": {},
            "ppo": {"config": "configs/ppo/tiny.yaml",
                    "args": {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "generation_batch_size": 4,
                             "ppo_epochs": 1, "output_min_length": 4, "output_max_length": 8, **ppo_extra}},
            "merge_ppo": {},
            "evaluate": {"args": {"num_prompts": 3, "samples_per_prompt": 1, "bootstrap_resamples": 50,
                                  "num_examples": 1, "max_eval_pairs": 8}},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_pipeline(config: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/run_pipeline.py", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def offline_env(tmp_path: Path) -> tuple[dict, Path]:
    """Every Python process started with this environment has no network; attempts go to the log."""
    log = tmp_path / "network_attempts.log"
    log.write_text("")
    env = hook_env(tmp_path / "offline", DENY_NETWORK, {"STACKLLAMA_NETWORK_LOG": str(log)})
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE"):
        env.pop(name, None)
    return env, log


def test_the_network_block_works(tmp_path):
    """The guard itself: a process started with it cannot reach the Hub, and the attempt is recorded."""
    env, log = offline_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import urllib.request; urllib.request.urlopen('https://huggingface.co')"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "network access denied" in proc.stderr
    assert "huggingface.co" in log.read_text()


def test_pipeline_fails_at_ppo_then_resumes_there(tmp_path):
    env, network_log = offline_env(tmp_path)
    run = tmp_path / "run"
    broken = write_config(tmp_path / "broken.yaml", run, {"reward_model_name": str(tmp_path / "no-such-model")})
    first = run_pipeline(broken, env)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "ppo" in first.stdout and "FAILED" in first.stdout and "resumes at ppo" in first.stdout
    assert "no-such-model" in first.stdout  # the stage's own one-line error, from the log's tail
    statuses = {k: v["status"] for k, v in json.loads((run / "pipeline_results.json").read_text())["stages"].items()}
    assert statuses == {"prepare": "ran", "tiny_model": "ran", "sft": "ran", "merge_sft": "skipped",
                        "reward": "ran", "merge_reward": "skipped", "ppo": "failed"}
    sft_weights = (run / "sft" / "model.safetensors").stat().st_mtime_ns

    fixed = write_config(tmp_path / "fixed.yaml", run, {})
    second = run_pipeline(fixed, env)
    assert second.returncode == 0, second.stdout + second.stderr
    statuses = {k: v["status"] for k, v in json.loads((run / "pipeline_results.json").read_text())["stages"].items()}
    assert statuses["prepare"] == statuses["tiny_model"] == statuses["sft"] == statuses["reward"] == "reused"
    assert statuses["ppo"] == statuses["evaluate"] == "ran"
    assert (run / "sft" / "model.safetensors").stat().st_mtime_ns == sft_weights  # not retrained

    # every artefact under the one run folder: the report, its plots, each stage's log
    report = (run / "report" / "report.md").read_text()
    assert "PPO" in report and "SFT" in report
    assert sorted(p.name for p in (run / "report").glob("*.png"))
    results = json.loads((run / "report" / "evaluation_results.json").read_text())
    assert results["ppo"]["mean_score"] == results["ppo"]["mean_score"]  # a number, not NaN
    assert {p.stem for p in (run / "logs").glob("*.log")} >= {"prepare", "tiny_model", "sft", "reward", "ppo", "evaluate"}
    assert "report: " in second.stdout
    assert network_log.read_text() == "", "a stage tried to reach the network:\n" + network_log.read_text()
