"""The adapter folder: where it is, what it is (task, stage) and whether it can be merged."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from .. import run_layout
from ..errors import InputError, MissingInputError
from ..modeling import load_error

TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls"}  # peft task type -> the model class the merge loads


def local_adapter_dir(name: str) -> Path:
    """A local folder as is; anything else is taken as a Hub id and fetched (or found in the cache)."""
    if Path(name).exists():
        if not Path(name).is_dir():
            raise MissingInputError(f"{name} is a file; pass the folder that holds adapter_config.json")
        return Path(name)
    try:
        # deferred: only a Hub id needs it
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as error:  # offline, unknown repo, bad id: all mean "not found"
        raise load_error(name, error) from error


def adapter_config(adapter_dir: Path):
    """The adapter's `PeftConfig`; an error for a folder without one or an adapter with no weights."""
    # deferred: peft imports transformers
    from peft import PeftConfig

    if not run_layout.is_adapter(adapter_dir):
        if run_layout.is_full_model(adapter_dir):
            raise MissingInputError(
                f"{adapter_dir} holds full weights (config.json, no adapter_config.json): nothing to merge, use it as is"
            )
        raise MissingInputError(f"{adapter_dir}: no adapter_config.json, so no adapter to merge")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if getattr(config, "is_prompt_learning", False):
        raise InputError(f"{adapter_dir}: a {config.peft_type} adapter has no weights to merge (LoRA and the like do)")
    return config


def adapter_task(peft_config, fallback: str | None, adapter_dir: Path) -> str:
    """"causal_lm" or "seq_cls", from the config's task type; `fallback` (else the weights) when it names none."""
    task_type = getattr(peft_config.task_type, "value", peft_config.task_type)
    if task_type is None:
        if fallback is not None:
            return fallback
        return "seq_cls" if score_head_labels(adapter_dir) else "causal_lm"
    if task_type not in TASKS:
        raise InputError(f"{adapter_dir}: task_type {task_type} is not supported: CAUSAL_LM or SEQ_CLS adapters only")
    task = TASKS[task_type]
    if fallback is not None and fallback != task:
        raise InputError(f"{adapter_dir} is a {task_type} adapter, not {fallback}")
    return task


def score_head_labels(adapter_dir: Path) -> int | None:
    """Number of outputs of the score/classifier head saved in the adapter (`modules_to_save`), if any."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.endswith(("score.weight", "classifier.weight")):
                return int(f.get_slice(key).get_shape()[0])
    return None


def adapter_stage(adapter_dir: Path, task: str, has_head: bool) -> str:
    """The stage that produced the adapter: its results file, else the stage its model card names (a stage's
    own `--merge` runs before its results file is written), else what its contents say. Nothing else
    depends on the name: a DPO (RLOO, GRPO) adapter is a causal-LM adapter and merges as an SFT one does."""
    for filename, stage in run_layout.STAGE_RESULTS.items():
        if (adapter_dir / filename).is_file():
            return stage
    return card_stage(adapter_dir) or ("ppo" if has_head else "reward" if task == "seq_cls" else "sft")


def card_stage(adapter_dir: Path) -> str | None:
    """The policy stage (dpo, rloo, grpo) named by a tag in the front matter of the adapter's README.md."""
    card = adapter_dir / "README.md"
    text = card.read_text(errors="replace") if card.is_file() else ""
    if not text.startswith("---"):
        return None
    import yaml  # deferred: only a card needs it

    try:
        metadata = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return None
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return next((stage for stage in (run_layout.DPO, run_layout.RLOO, run_layout.GRPO) if stage in (tags or [])), None)
