"""A stage as it will run now (:class:`Step`): its command line, what its output depends on,
or why it is skipped. :func:`plan_step` builds it from the settings and the run folder's
current contents (a merge stage runs only when the stage before it saved a LoRA adapter)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..run_layout import BASE, DATA, PPO, REWARD, SFT, is_adapter, is_full_model, merged
from .arguments import PipelineArguments
from .stages import ALGORITHMS, REPO_ROOT, StageSpec, stage_spec


@dataclass
class Step:
    """One stage as it will run now: the full command, or why it is skipped."""

    spec: StageSpec
    script_args: list[str]  # flags after the script path
    config_file: str | None
    launcher: str = "python"
    skip_reason: str | None = None

    def command(self, args: PipelineArguments, for_display: bool = False) -> list[str]:
        """The launcher prefix + script + flags. `for_display` writes `python` / `accelerate` as a user types them."""
        python = "python" if for_display else sys.executable
        if self.launcher == "accelerate":
            prefix = ["accelerate", "launch"] if for_display else [_console_script("accelerate"), "launch"]
            if args.accelerate_config:
                prefix += ["--config_file", args.accelerate_config]
            if args.num_processes:
                prefix += ["--num_processes", str(args.num_processes)]
        elif self.launcher == "torchrun":
            prefix = ["torchrun" if for_display else _console_script("torchrun"),
                      "--nproc_per_node", str(args.num_processes or 1)]
        else:
            prefix = [python]
        script = self.spec.script if for_display else str(REPO_ROOT / self.spec.script)
        return prefix + [script] + self.script_args

    def fingerprint(self, upstream: str) -> str:
        """What the output depends on: the flags, the stage config's contents, the upstream outputs."""
        config_text = Path(self.config_file).read_text() if self.config_file and Path(self.config_file).is_file() else ""
        payload = json.dumps([self.spec.script, self.script_args, config_text, upstream])
        return hashlib.sha256(payload.encode()).hexdigest()


def _console_script(name: str) -> str:
    """`accelerate` / `torchrun` from this interpreter's environment, else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


def _flags(values: dict) -> list[str]:
    """{flag: value} -> ["--flag", "value"]; lists give several values, booleans `true`/`false`."""
    out: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        out.append(f"--{key}")
        if isinstance(value, bool):
            out.append("true" if value else "false")
        elif isinstance(value, (list, tuple)):
            out.extend(str(v) for v in value)
        else:
            out.append(str(value))
    return out


def _uses_peft(stage: dict) -> bool:
    """Whether a training stage will save a LoRA adapter, from its args or its config file."""
    if "use_peft" in stage.get("args", {}):
        return bool(stage["args"]["use_peft"])
    config = stage.get("config")
    if config and Path(config).is_file():
        return bool((yaml.safe_load(Path(config).read_text()) or {}).get("use_peft", False))
    return False


def _holds_adapter(folder: Path, stage: dict) -> bool:
    """A stage's output is a LoRA adapter: read from the folder once it exists, else from the stage's config."""
    if is_adapter(folder):
        return True
    if is_full_model(folder):
        return False
    return _uses_peft(stage)


def plan_step(name: str, args: PipelineArguments, settings: dict[str, dict]) -> Step:
    """The command for stage `name`, from the run folder's current contents (a merge stage looks
    at whether the stage before it saved an adapter)."""
    run = Path(args.output_dir)
    spec = stage_spec(name)
    stage = settings[name]
    base = args.model_name_or_path or str(run / BASE)

    def model_of(stage_name: str, output: str) -> str:
        """Full weights of a training stage: `<output>-merged` when it saved an adapter, else `<output>`."""
        folder = run / output
        return str(run / merged(output)) if _holds_adapter(folder, settings[stage_name]) else str(folder)

    sft_model, reward_model = model_of("sft", SFT), model_of("reward", REWARD)
    data = str(run / DATA)
    out = str(run / spec.output)
    own: dict = {}
    skip = "skip: true in the pipeline config" if stage["skip"] else None
    if name in ALGORITHMS and name not in args.algorithms:
        skip = f"not in algorithms ({', '.join(args.algorithms)})"
    if name == "prepare":
        own = {"output_dir": out, "overwrite": True}
    elif name == "tiny_model":
        own = {"data_dir": data, "output_dir": out, "overwrite": True}
        if args.model_name_or_path:
            skip = f"the base model is {args.model_name_or_path}"
    elif name == "sft":
        own = {"data_dir": data, "output_dir": out, "model_name_or_path": base, "merge": False}
    elif name == "reward":
        own = {"data_dir": data, "output_dir": out, "model_name_or_path": sft_model, "merge": False}
    elif name == "ppo":
        own = {"data_dir": data, "output_dir": out, "model_name_or_path": sft_model,
               "reward_model_name": reward_model}
    elif name == "dpo":
        own = {"data_dir": data, "output_dir": out, "model_name_or_path": sft_model}
    elif name in ("rloo", "grpo"):
        own = {"data_dir": data, "output_dir": out, "model_name_or_path": sft_model, "reward_model_name": reward_model}
    elif name == "evaluate":
        others = [a for a in args.algorithms if a != "ppo"]
        own = {"data_dir": data, "output_dir": out, "sft_model": sft_model, "ppo_model": str(run / PPO),
               "reward_model_name": reward_model, "compare_with": others or ["none"]}
    else:  # merge_<stage>: fold the stage's adapter into the full weights it was trained on
        trained = name.removeprefix("merge_")
        adapter = run / stage_spec(trained).output
        trained_on = {"sft": base, "reward": sft_model, "ppo": sft_model}[trained]
        own = {"adapter_model_name": str(adapter), "base_model_name": trained_on, "output_name": out,
               "overwrite": True}
        if not skip and not _holds_adapter(adapter, settings[trained]):
            skip = f"{adapter} holds full weights, no adapter to merge"
    launcher = (stage["launcher"] or args.launcher) if spec.distributed else (stage["launcher"] or "python")
    # the stage's own `args` come last, so they win over the driver's
    script_args = (["--config", stage["config"]] if stage["config"] else []) + _flags(own) + _flags(stage["args"])
    return Step(spec, script_args, stage["config"], launcher, skip)
