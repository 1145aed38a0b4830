"""Running a stage's script as tests need it: killed for real (SIGKILL) at a chosen point for the
resume tests, or under torchrun with several processes.

A point "inside training" or "inside a checkpoint write" is made reachable without touching
the package: `hook_env` writes a `sitecustomize.py` (run by Python at start-up in the child)
that wraps a library or package function to print a line and, optionally, pause; `kill_when`
runs the child and sends SIGKILL as soon as that line appears.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def hook_env(folder: Path, code: str, extra: dict | None = None) -> dict:
    """Environment for a child Python whose start-up runs `code` (a sitecustomize.py written in `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# A pause inside training step HOOK_STEP + 1 of any transformers/TRL Trainer, announced on stdout, for
# `hook_env(..., PAUSE_IN_TRAINING_STEP, {"HOOK_STEP": "4"})` + `kill_when(..., PAUSED_IN_STEP.format(step=5))`
PAUSE_IN_TRAINING_STEP = r'''
import os, time
import transformers

STEP = int(os.environ["HOOK_STEP"])
training_step = transformers.Trainer.training_step


def hooked_training_step(self, model, inputs, *args, **kwargs):
    if self.state.global_step == STEP:
        print(f"HOOK: paused inside training step {STEP + 1}", flush=True)
        time.sleep(120)
    return training_step(self, model, inputs, *args, **kwargs)


transformers.Trainer.training_step = hooked_training_step
'''


def weights(folder: Path) -> dict:
    """Every tensor of a folder's safetensors files, keyed `<file>:<name>`."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def max_abs_diff(a: Path, b: Path) -> float:
    """The largest |difference| between the weights saved in two folders (same tensors required)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def kill_when(command: list[str], pattern: str, env: dict | None = None, timeout: float = 600) -> str:
    """Run `command`; SIGKILL it when a line of its output matches `pattern`. Returns the output.

    Fails (AssertionError) if the process ends or the timeout passes before the line appears,
    so a test can never pass without a real kill."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    regex = re.compile(pattern)
    lines = []
    deadline = time.time() + timeout
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if regex.search(line):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                assert proc.returncode == -signal.SIGKILL
                return "".join(lines)
            if time.time() > deadline:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError(f"{pattern!r} never appeared before the process ended (exit {proc.returncode}):\n"
                         + "".join(lines[-40:]))


def run(command: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `command` to the end from the repository root; fail with its output if it fails."""
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


PYTHON = sys.executable


def run_group(command: list[str], env: dict | None = None, timeout: float = 300, what: str = "run") -> str:
    """`command` from the repository root, to the end, in a new session; returns stdout + stderr. On a
    timeout the whole session (a launcher and all its workers) is killed, so a hung collective cannot
    outlive the test. Any failure fails (no retry: a worker that used to die of "terminate called without
    an active exception" at exit now ends through `stackllama.processes.end_process`, test_launch_helpers.py)."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{what} timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        raise AssertionError(output[-4000:])
    return output


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None, timeout: float = 300) -> str:
    """`python -m torch.distributed.run --standalone --nproc_per_node <nproc> <args>` (see `run_group`)."""
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return run_group(command, env, timeout, f"{nproc}-process torchrun of {args[0]}")


def accelerate_launch(args: list[str], nproc: int = 2, env: dict | None = None, timeout: float = 300,
                      config_file: str | None = None, mixed_precision: str = "no") -> str:
    """`python -m accelerate.commands.launch --multi_gpu --num_processes <nproc> <args>` (see `run_group`),
    or with `config_file` (one of accelerate_configs/, e.g. "deepspeed_zero3.yaml") instead of
    `--multi_gpu`, with <nproc> processes in `mixed_precision` (default fp32; the configs are written for
    8 GPUs in bf16).

    `--multi_gpu` is accelerate's torch-elastic launcher, which starts <nproc> workers on a CPU-only machine
    too; `--cpu --num_processes 2` would start one process (accelerate's simple launcher)."""
    how = (["--config_file", str(REPO / "accelerate_configs" / config_file)] if config_file
           else ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"])
    command = [PYTHON, "-m", "accelerate.commands.launch", *how, "--num_processes", str(nproc),
               "--mixed_precision", mixed_precision, *args]
    return run_group(command, env, timeout, f"{nproc}-process accelerate launch of {args[0]} ({config_file or 'multi_gpu'})")


# Started in every process of a launch (the launcher too: it has no RANK and is left alone).
_RANK_RECORDER = r'''
import os

if "RANK" in os.environ and "MP_RECORD" in os.environ:
    import json
    from pathlib import Path

    import torch

    import stackllama.stage

    RECORD = Path(os.environ["MP_RECORD"])
    RANK = int(os.environ["RANK"])
    write_results = stackllama.stage.write_results

    def hooked_write_results(output_dir, filename, results):
        RECORD.mkdir(parents=True, exist_ok=True)
        with open(RECORD / f"writes{RANK}.txt", "a") as f:
            f.write(filename + "\n")
        return write_results(output_dir, filename, results)

    stackllama.stage.write_results = hooked_write_results

    def trainable(model):
        """The trainable weights, flattened in name order (to compare ranks, or a run's start and end)."""
        return torch.cat([p.detach().float().reshape(-1).cpu() for _, p in sorted(model.named_parameters())
                          if p.requires_grad])
'''


def rank_recorder(body: str) -> str:
    """`sitecustomize` code for the processes of a launch: each rank appends the results files it
    writes (`stackllama.stage.write_results`) to $MP_RECORD/writes<rank>.txt, then runs `body`,
    which sees `RECORD`, `RANK`, `json`, `Path`, `torch` and `trainable(model)`."""
    return _RANK_RECORDER + textwrap.indent(textwrap.dedent(body), "    ")
