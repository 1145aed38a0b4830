"""The driver's loop: each stage in order is skipped, reused, or run in its own subprocess;
a failure stops the run with the log's last lines, and the run's record goes to
``<run>/pipeline_results.json``."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from .. import stage
from ..run_layout import LOGS, PIPELINE_RESULTS, REPORT, REPORT_FILE
from .arguments import PipelineArguments
from .live import LiveProgress
from .logged_run import run_command, tail
from .plan import plan_step
from .progress import summary_line
from .reuse import completion, prepare_training_stage, upstream_token, write_state
from .stages import STAGE_NAMES


def selected(args: PipelineArguments) -> list[str]:
    """The stages this invocation considers, in order (up to --until_stage)."""
    names = list(STAGE_NAMES)
    if args.until_stage:
        names = names[: names.index(args.until_stage) + 1]
    return names


def run_pipeline(args: PipelineArguments, settings: dict[str, dict], out=print, console=None, is_tty=None) -> int:
    """Run (or, with --dry_run, print) the stages in order; return the exit code for the shell.

    Lines go through `out`; the running stage's live progress line goes to `console` (default
    sys.stdout) when it is a terminal (`is_tty`, default: ask it), else through `out` every
    --progress_interval seconds."""
    run = Path(args.output_dir)
    names = selected(args)
    width = max(len(n) for n in names)
    redo_from = names.index(args.from_stage) if args.from_stage in names else None
    upstream, timings, results = "", {}, {"output_dir": str(run), "stages": {}}
    started = time.time()
    for index, name in enumerate(names):
        step = plan_step(name, args, settings)
        head = f"[{index + 1:>{len(str(len(names)))}}/{len(names)}] {name:<{width}}"
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
            how = prepare_training_stage(step, run, fingerprint, forced) or how
        write_state(run, name, {"fingerprint": fingerprint, "status": "running", "started_at": time.time()})
        log = run / LOGS / f"{name}.log"
        out(f"{head}  running {step.spec.title} ({how}; log: {log})")
        t0 = time.time()
        try:
            progress = None if args.verbose else LiveProgress(
                name, out=out, stream=console if console is not None else sys.stdout, is_tty=is_tty,
                interval=args.progress_interval)
            code = run_command(step.command(args), log, args.verbose, progress)
        except KeyboardInterrupt:
            out(f"{head}  interrupted; run the same command again to resume at {name}")
            return 130
        seconds = time.time() - t0
        if code != 0 or not marker.is_file():
            reason = f"exit code {code}" if code != 0 else f"it exited 0 but wrote no {marker}"
            out(f"{head}  FAILED after {seconds:.0f} s ({reason}). Last lines of {log}:")
            out("\n".join("    " + line for line in tail(log).splitlines()))
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
    report = run / REPORT / REPORT_FILE
    if report.is_file():
        out(f"report: {report}")
    _write_results(run, results, started)
    return 0


def _write_results(run: Path, results: dict, started: float) -> None:
    results["wall_time_s"] = round(time.time() - started, 1)
    stage.write_results(run, PIPELINE_RESULTS, results)
