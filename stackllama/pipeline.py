"""The pipeline driver: every stage of the recipe, in order, in one run folder.

    prepare -> tiny model -> SFT -> merge -> reward model -> merge -> PPO -> merge -> evaluation

Written here because no library of the field runs a multi-stage training recipe with resume.
Each stage is a subprocess running that stage's own script with the same flags a user would
type, so a stage behaves exactly as when run by hand, and on a multi-GPU machine the training
stages are wrapped in `accelerate launch` or `torchrun`.

Resume: a stage is complete when its completion marker (the results file its script writes
last) exists and the driver's record says it was made by the same command, the same config
file contents and the same upstream outputs. Complete stages are reused, so a re-run after a
failure resumes at the failed stage; a stage whose command, config or inputs changed runs
again, and so does every stage after it. `--force` redoes everything.

A merge stage runs only when the stage before it saved a LoRA adapter; with full weights
(the tiny default trains in full) the next stages read the stage's folder directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ".pipeline"  # inside the run folder: one record per completed stage
LOG_DIR = "logs"  # inside the run folder: one log per stage
RESULTS_FILE = "pipeline_results.json"
LAUNCHERS = ("python", "accelerate", "torchrun")
STAGE_KEYS = {"config", "args", "launcher", "skip"}



@dataclass
class PipelineArguments:
    """The run: where it goes, which model starts it, how training stages are launched.

    Everything can be set in the `--config` YAML (top-level keys as below) and overridden on
    the command line. Per-stage settings live under `stages:` in the YAML (see
    configs/pipeline/tiny.yaml): each stage takes `config` (that stage's own YAML), `args`
    (extra flags for its script), `launcher` and `skip`.
    """

    output_dir: str = field(default="runs/tiny", metadata={
        "help": "The run folder: every stage writes its own sub-folder here (data/, base/, sft/, reward/, ppo/, "
                "report/), plus logs/ (one log per stage) and pipeline_results.json."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Base model (Hub id or folder) for SFT. Default: build the tiny LLaMA from the prepared data "
                "(the `tiny_model` stage)."})
    launcher: str = field(default="python", metadata={
        "help": "How the training stages (sft, reward, ppo) run: `python` (one process), `accelerate` "
                "(`accelerate launch --config_file <accelerate_config>`) or `torchrun` "
                "(`torchrun --nproc_per_node <num_processes>`). The other stages always run with python.",
        "choices": list(LAUNCHERS)})
    accelerate_config: str | None = field(default=None, metadata={
        "help": "Config file for `accelerate launch`, e.g. accelerate_configs/multi_gpu.yaml."})
    num_processes: int | None = field(default=None, metadata={
        "help": "Processes per machine for the training stages (torchrun needs it; overrides the accelerate "
                "config's)."})
    stages: dict | None = field(default=None, metadata={
        "help": "Per-stage settings (YAML only): {stage: {config: file.yaml, args: {flag: value}, launcher: ..., "
                "skip: bool}}."})
    force: bool = field(default=False, metadata={"help": "Redo every stage, even those already complete."})
    from_stage: str | None = field(default=None, metadata={
        "help": "Redo this stage and every stage after it (earlier complete stages are reused)."})
    until_stage: str | None = field(default=None, metadata={"help": "Stop after this stage."})
    dry_run: bool = field(default=False, metadata={
        "help": "Print the command of every stage (with its launcher) and whether it would run, without running."})
    verbose: bool = field(default=False, metadata={
        "help": "Stream each stage's output to the console as well as to logs/<stage>.log."})


# --------------------------------------------------------------------------- the stages


@dataclass(frozen=True)
class StageSpec:
    """A stage of the recipe: its script, its output folder and its completion marker."""

    name: str
    title: str
    script: str
    output: str  # sub-folder of the run folder
    marker: str  # file inside `output` that the script writes last
    distributed: bool = False  # a training stage: launched with accelerate/torchrun when asked


STAGES: tuple[StageSpec, ...] = (
    StageSpec("prepare", "prepare data", "scripts/prepare_data.py", "data", "summary.json"),
    StageSpec("tiny_model", "tiny model", "scripts/build_tiny_model.py", "base", "tiny_model_build.json"),
    StageSpec("sft", "SFT", "scripts/sft.py", "sft", "sft_results.json", distributed=True),
    StageSpec("merge_sft", "merge SFT adapter", "scripts/merge_adapters.py", "sft-merged", "merge_results.json"),
    StageSpec("reward", "reward model", "scripts/reward_modeling.py", "reward", "reward_results.json",
              distributed=True),
    StageSpec("merge_reward", "merge reward adapter", "scripts/merge_adapters.py", "reward-merged",
              "merge_results.json"),
    StageSpec("ppo", "PPO", "scripts/rl_ppo.py", "ppo", "ppo_results.json", distributed=True),
    StageSpec("merge_ppo", "merge PPO adapter", "scripts/merge_adapters.py", "ppo-merged", "merge_results.json"),
    StageSpec("evaluate", "evaluation report", "scripts/evaluate.py", "report", "evaluation_results.json"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


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
        import yaml

        return bool((yaml.safe_load(Path(config).read_text()) or {}).get("use_peft", False))
    return False


def _holds_adapter(folder: Path, stage: dict) -> bool:
    """A stage's output is a LoRA adapter: read from the folder once it exists, else from the stage's config."""
    if (folder / "adapter_config.json").is_file():
        return True
    if (folder / "config.json").is_file():
        return False
    return _uses_peft(stage)


# --------------------------------------------------------------------------- config


DEFAULT_CONFIG = "configs/pipeline/tiny.yaml"


def resolve_path(path: str) -> str:
    """A repository file (config) named relative to the current folder, else to the repository root,
    so the driver runs from anywhere."""
    if Path(path).exists() or Path(path).is_absolute() or not (REPO_ROOT / path).exists():
        return path
    return str(REPO_ROOT / path)


def with_default_config(argv: list[str]) -> list[str]:
    """`argv` with `--config configs/pipeline/tiny.yaml` in front when no --config is given."""
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    return ["--config", resolve_path(DEFAULT_CONFIG)] + argv


def check_config(args: PipelineArguments, source: str = "the pipeline config") -> dict[str, dict]:
    """Validate the per-stage settings; return {stage: {config, args, launcher, skip}} for every stage."""
    if args.launcher not in LAUNCHERS:
        raise PipelineError(f"launcher {args.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if args.launcher == "torchrun" and not args.num_processes:
        raise PipelineError("launcher torchrun needs num_processes (processes per machine)")
    if args.accelerate_config:
        args.accelerate_config = resolve_path(args.accelerate_config)
    if args.launcher == "accelerate" and args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise PipelineError(f"accelerate_config {args.accelerate_config} not found")
    for flag in ("from_stage", "until_stage"):
        value = getattr(args, flag)
        if value is not None and value not in STAGE_NAMES:
            raise PipelineError(f"--{flag} {value!r} is not a stage: {', '.join(STAGE_NAMES)}")
    stages = args.stages or {}
    if not isinstance(stages, dict):
        raise PipelineError(f"{source}: `stages` must be a mapping of stage name to settings")
    settings: dict[str, dict] = {}
    for name in stages:
        if name not in STAGE_NAMES:
            raise PipelineError(f"{source}: unknown stage {name!r} under `stages` (stages: {', '.join(STAGE_NAMES)})")
    for name in STAGE_NAMES:
        stage = stages.get(name) or {}
        if not isinstance(stage, dict):
            raise PipelineError(f"{source}: stages.{name} must be a mapping")
        unknown = set(stage) - STAGE_KEYS
        if unknown:
            raise PipelineError(f"{source}: unknown key stages.{name}.{sorted(unknown)[0]} "
                                f"(allowed: {', '.join(sorted(STAGE_KEYS))})")
        stage_args = stage.get("args") or {}
        if not isinstance(stage_args, dict):
            raise PipelineError(f"{source}: stages.{name}.args must be a mapping of flag to value")
        config = stage.get("config")
        if config is not None:
            config = resolve_path(config)
            if not Path(config).is_file():
                raise PipelineError(f"{source}: stages.{name}.config {config} not found")
        launcher = stage.get("launcher")
        if launcher is not None and launcher not in LAUNCHERS:
            raise PipelineError(f"{source}: stages.{name}.launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
        settings[name] = {"config": config, "args": stage_args, "launcher": launcher, "skip": bool(stage.get("skip"))}
    return settings


# --------------------------------------------------------------------------- planning


def plan_step(name: str, args: PipelineArguments, settings: dict[str, dict]) -> Step:
    """The command for stage `name`, from the run folder's current contents (a merge stage looks
    at whether the stage before it saved an adapter)."""
    run = Path(args.output_dir)
    spec = next(s for s in STAGES if s.name == name)
    stage = settings[name]
    base = args.model_name_or_path or str(run / "base")

    def model_of(stage_name: str, output: str) -> str:
        """Full weights of a training stage: `<output>-merged` when it saved an adapter, else `<output>`."""
        folder = run / output
        return str(run / f"{output}-merged") if _holds_adapter(folder, settings[stage_name]) else str(folder)

    sft_model, reward_model = model_of("sft", "sft"), model_of("reward", "reward")
    data = str(run / "data")
    out = str(run / spec.output)
    own: dict = {}
    skip = "skip: true in the pipeline config" if stage["skip"] else None
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
    elif name == "evaluate":
        own = {"data_dir": data, "output_dir": out, "sft_model": sft_model, "ppo_model": str(run / "ppo"),
               "reward_model_name": reward_model}
    else:  # merge_<stage>: fold the stage's adapter into the full weights it was trained on
        trained = name.removeprefix("merge_")
        trained_spec = next(s for s in STAGES if s.name == trained)
        adapter = run / trained_spec.output
        trained_on = {"sft": base, "reward": sft_model, "ppo": sft_model}[trained]
        own = {"adapter_model_name": str(adapter), "base_model_name": trained_on, "output_name": out,
               "overwrite": True}
        if not skip and not _holds_adapter(adapter, settings[trained]):
            skip = f"{adapter} holds full weights, no adapter to merge"
    launcher = (stage["launcher"] or args.launcher) if spec.distributed else (stage["launcher"] or "python")
    # the stage's own `args` come last, so they win over the driver's
    script_args = (["--config", stage["config"]] if stage["config"] else []) + _flags(own) + _flags(stage["args"])
    return Step(spec, script_args, stage["config"], launcher, skip)


def selected(args: PipelineArguments) -> list[str]:
    """The stages this invocation considers, in order (up to --until_stage)."""
    names = list(STAGE_NAMES)
    if args.until_stage:
        names = names[: names.index(args.until_stage) + 1]
    return names


# --------------------------------------------------------------------------- state


def _state_path(run: Path, name: str) -> Path:
    return run / STATE_DIR / f"{name}.json"


def read_state(run: Path, name: str) -> dict | None:
    path = _state_path(run, name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_state(run: Path, name: str, state: dict) -> None:
    path = _state_path(run, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def completion(step: Step, run: Path, fingerprint: str) -> tuple[bool, str]:
    """(complete?, why): the marker exists and the record matches this command and inputs."""
    marker = run / step.spec.output / step.spec.marker
    if not marker.is_file():
        return False, "not run yet" if not (run / step.spec.output).exists() else "incomplete (no " + step.spec.marker + ")"
    state = read_state(run, step.spec.name)
    if state is None:
        return True, "complete (made outside the pipeline; --force redoes it)"
    if state.get("fingerprint") != fingerprint:
        return False, "its command, config or inputs changed"
    if state.get("status", "complete") != "complete":
        return False, "its last run did not finish"
    return True, "complete"


def upstream_token(step: Step, run: Path, fingerprint: str) -> str:
    """What the next stage's fingerprint depends on: this stage's record (changes whenever it re-runs)."""
    state = read_state(run, step.spec.name)
    if state is not None:
        return f"{state.get('fingerprint')}@{state.get('finished_at')}"
    marker = run / step.spec.output / step.spec.marker
    return f"{fingerprint}@{marker.stat().st_mtime if marker.exists() else ''}"


# --------------------------------------------------------------------------- running


def _prepare_training_stage(step: Step, run: Path, fingerprint: str, forced: bool) -> str | None:
    """A training stage whose last run (same command and inputs) was interrupted resumes from its
    latest checkpoint; otherwise it starts clean, so checkpoints of an older run are never mistaken
    for this one's. Returns how the stage starts, for the progress line."""
    previous = read_state(run, step.spec.name)
    interrupted = previous is not None and previous.get("status") in ("running", "failed")
    if interrupted and previous.get("fingerprint") == fingerprint and not forced:
        step.script_args = step.script_args + ["--resume_from_checkpoint", "latest"]
        return "its last run did not finish: resuming from its latest checkpoint, if any"
    output = run / step.spec.output
    if output.exists():
        shutil.rmtree(output)
    return None


def summary_line(step: Step, run: Path) -> str:
    """The stage's headline figures from its results file, or '' when they are not there."""
    path = run / step.spec.output / step.spec.marker
    try:
        r = json.loads(path.read_text())
        name = step.spec.name
        if name == "prepare":
            return f"{r['preference_rows']:,} questions with 2+ answers, {r['pairs']:,} pairs"
        if name == "tiny_model":
            return f"{r['parameters'] / 1e6:.1f}M parameters, vocabulary {r['vocab_size']:,}"
        if name == "sft":
            return f"eval loss {r['eval_loss_before']:.3f} -> {r['eval_loss']:.3f}"
        if name == "reward":
            return (f"evaluation accuracy {r['eval_before']['accuracy']:.3f} -> {r['eval_after']['accuracy']:.3f} "
                    f"(longer-answer baseline {r['eval_after']['longer_answer_baseline']:.3f})")
        if name == "ppo":
            return (f"mean reward {r['reward_first']:.3f} -> {r['reward_last']:.3f}, KL {r['kl_last']:.2f}, "
                    f"{r['seconds_per_step']:.2f} s/step")
        if name.startswith("merge_"):
            return f"merged logits match base+adapter (max |diff| {r['max_abs_diff']:.1e})"
        if name == "evaluate":
            return str(r.get("verdict_headline", ""))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ""


def _tail(log: Path, lines: int = 25) -> str:
    """The last lines of a log, progress-bar carriage returns collapsed."""
    try:
        text = log.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""
    rows = [row.rsplit("\r", 1)[-1] for row in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([row for row in rows if row.strip()][-lines:])


def run_command(command: list[str], log: Path, verbose: bool) -> int:
    """Run `command` with its output in `log` (and on the console with `verbose`); return its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as sink:
        sink.write(("$ " + shlex.join(command) + "\n").encode())
        sink.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(1 << 16):
                sink.write(chunk)
                if verbose:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise


def run_pipeline(args: PipelineArguments, settings: dict[str, dict], out=print) -> int:
    """Run (or, with --dry_run, print) the stages in order; return the exit code for the shell."""
    run = Path(args.output_dir)
    names = selected(args)
    width = max(len(n) for n in names)
    redo_from = names.index(args.from_stage) if args.from_stage in names else None
    upstream, timings, results = "", {}, {"output_dir": str(run), "stages": {}}
    started = time.time()
    for index, name in enumerate(names):
        step = plan_step(name, args, settings)
        head = f"[{index + 1}/{len(names)}] {name:<{width}}"
        if step.skip_reason:
            out(f"{head}  skipped: {step.skip_reason}")
            results["stages"][name] = {"status": "skipped", "why": step.skip_reason}
            continue
        fingerprint = step.fingerprint(upstream)
        complete, why = completion(step, run, fingerprint)
        forced = args.force or (redo_from is not None and index >= redo_from)
        if args.dry_run:
            action = "would reuse" if complete and not forced else "would run"
            out(f"{head}  {action} ({'forced' if forced else why})")
            out("    " + shlex.join(step.command(args, for_display=True)))
            upstream = upstream_token(step, run, fingerprint) if complete and not forced else f"{fingerprint}@planned"
            continue
        if complete and not forced:
            note = "" if why == "complete" else f" ({why})"
            out(f"{head}  reused{note}: {summary_line(step, run)}".rstrip(": "))
            results["stages"][name] = {"status": "reused"}
            upstream = upstream_token(step, run, fingerprint)
            continue
        marker = run / step.spec.output / step.spec.marker
        marker.unlink(missing_ok=True)  # a failed re-run must not leave the old marker looking complete
        how = "forced" if forced else why
        if step.spec.distributed:
            how = _prepare_training_stage(step, run, fingerprint, forced) or how
        write_state(run, name, {"fingerprint": fingerprint, "status": "running", "started_at": time.time()})
        log = run / LOG_DIR / f"{name}.log"
        out(f"{head}  running {step.spec.title} ({how}; log: {log})")
        t0 = time.time()
        try:
            code = run_command(step.command(args), log, args.verbose)
        except KeyboardInterrupt:
            out(f"{head}  interrupted; run the same command again to resume at {name}")
            return 130
        seconds = time.time() - t0
        if code != 0 or not marker.is_file():
            reason = f"exit code {code}" if code != 0 else f"it exited 0 but wrote no {marker}"
            out(f"{head}  FAILED after {seconds:.0f} s ({reason}). Last lines of {log}:")
            out("\n".join("    " + line for line in _tail(log).splitlines()))
            out(f"Fix the cause and run the same command again: completed stages are reused and the run "
                f"resumes at {name}.")
            write_state(run, name, {"fingerprint": fingerprint, "status": "failed", "finished_at": time.time()})
            results["stages"][name] = {"status": "failed", "seconds": round(seconds, 1), "log": str(log)}
            _write_results(run, results, started)
            return 1
        write_state(run, name, {"fingerprint": fingerprint, "status": "complete", "finished_at": time.time(),
                                "seconds": round(seconds, 1), "command": step.command(args, for_display=True)})
        upstream = upstream_token(step, run, fingerprint)
        timings[name] = seconds
        out(f"{head}  done in {seconds:.0f} s: {summary_line(step, run)}".rstrip(": "))
        results["stages"][name] = {"status": "ran", "seconds": round(seconds, 1), "log": str(log)}
    if args.dry_run:
        return 0
    total = time.time() - started
    out(f"pipeline complete in {total:.0f} s ({', '.join(f'{n} {s:.0f} s' for n, s in timings.items()) or 'all reused'})")
    report = run / "report" / "report.md"
    if report.is_file():
        out(f"report: {report}")
    _write_results(run, results, started)
    return 0


def _write_results(run: Path, results: dict, started: float) -> None:
    from .stage import write_results

    results["wall_time_s"] = round(time.time() - started, 1)
    write_results(run, RESULTS_FILE, results)
