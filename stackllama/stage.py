"""What every training stage's script shares: logging, `report_to` backends, the results file.

Each stage writes its results file (`sft_results.json`, `reward_results.json`,
`ppo_results.json`) atomically as its very last act, so its presence marks a completed stage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .modeling import MissingDependencyError

logger = logging.getLogger(__name__)


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


def run_dir(output_dir: str | os.PathLike) -> Path:
    """The run folder that holds every stage's output (`runs/<run>/`): the parent of a stage's
    `output_dir`. Stages find their inputs there by default (`sft-merged`, `reward`, ...)."""
    return Path(output_dir).resolve().parent


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename the finished folder `new` to `final`. An older `final` is moved aside first and deleted
    after, so `final` is at every moment either the old complete folder or the new one."""
    new, final = Path(new), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    had_old = final.exists() or final.is_symlink()
    if had_old:
        os.replace(final, old)
    os.replace(new, final)
    if had_old:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return final


def write_results(output_dir: str | os.PathLike, filename: str, results: dict) -> Path:
    """`output_dir/filename` as JSON, written to a temporary file and renamed into place."""
    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
