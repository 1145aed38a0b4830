"""What every script shares: logging, `report_to` backends, the results file written by rank 0,
and the one way a script ends (:func:`run_script`).

Each stage writes its results file (`sft_results.json`, `reward_results.json`,
`ppo_results.json`, names in :mod:`stackllama.run_layout`) atomically as its very last act, so
its presence marks a completed stage.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from .atomic import write_json
from .errors import MissingDependencyError, StackLlamaError

logger = logging.getLogger(__name__)

# What a script reports as a one-line error: the project's own errors, and the ValueError /
# FileNotFoundError with which transformers, TRL and datasets reject the flags they are given.
USER_ERRORS = (StackLlamaError, ValueError, FileNotFoundError)


def setup_logging(level: int = logging.INFO) -> None:
    """`stackllama` loggers at `level`, libraries at WARNING, each repeated library warning shown once.

    In a multi-process run (torchrun / accelerate launch set RANK and WORLD_SIZE) only rank 0
    logs at `level`; the other ranks log warnings and errors only, each line naming its rank,
    as transformers' Trainer does for its replicas (`log_level_replica`)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    where = f"[rank {rank}] " if world > 1 else ""
    logging.basicConfig(format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("stackllama").setLevel(level if rank == 0 else max(level, logging.WARNING))
    seen: set[str] = set()

    def once(record: logging.LogRecord) -> bool:  # bitsandbytes warns on every 8-bit matmul
        key = f"{record.name}:{record.getMessage()}"
        if key in seen:
            return False
        seen.add(key)
        return True

    logging.getLogger("bitsandbytes.autograd._functions").addFilter(once)


def configure_reporting(training_args) -> None:
    """Check the `--report_to` backends are installed; wandb logs into the output folder, offline unless
    WANDB_API_KEY or WANDB_MODE is set (set WANDB_MODE=online after `wandb login` to sync live)."""
    import importlib.util

    report_to = training_args.report_to or []
    if isinstance(report_to, str):
        report_to = [report_to]
    for backend, module, extra in (("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")):
        if backend in report_to and importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"--report_to {backend} needs the {module} package: pip install 'stackllama[{extra}]'")
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_DIR", training_args.output_dir)  # the run's files stay in its folder
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
        if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
            logger.info("wandb: no WANDB_API_KEY and no WANDB_MODE set, logging offline (sync later with `wandb sync`)")
            os.environ["WANDB_MODE"] = "offline"


def write_results(output_dir: str | os.PathLike, filename: str, results: dict) -> Path:
    """`output_dir/filename` as JSON, written to a temporary file and renamed into place."""
    return write_json(Path(output_dir) / filename, results)


def finish_stage(accelerator, output_dir: str | os.PathLike, filename: str, results: dict, done: str) -> dict:
    """A training stage's last act, on every process: rank 0 writes the results file (the
    completion marker, so after all its other writes) and logs ``done``; then the ranks end
    together (they wait for rank 0's writes, and the trackers are closed). Returns ``results``."""
    if accelerator.is_main_process:
        path = write_results(output_dir, filename, results)
        logger.info("%s; results in %s", done, path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def run_script(main: Callable, dataclass_types: Sequence[type] | None = None, description: str | None = None,
               args: Sequence[str] | None = None) -> None:
    """A script's ``__main__``: logging, the flags (``--config`` YAML included) parsed into
    ``dataclass_types`` and passed to ``main`` (none: ``main()`` parses its own), and the end:
    a :data:`USER_ERRORS` error becomes ``<script>: error: <message>`` and exit status 1, and
    every process of a launched run ends the same way (:func:`stackllama.processes.end_process`)."""
    # deferred: both import torch, which the pipeline driver (a user of this module) runs without
    from .cli import fail, parse_args
    from .processes import end_process

    setup_logging()
    parsed = parse_args(dataclass_types, args=args, description=description) if dataclass_types else ()
    try:
        status = main(*parsed)
    except USER_ERRORS as error:
        fail(str(error))
    end_process(status if isinstance(status, int) and not isinstance(status, bool) else 0)
