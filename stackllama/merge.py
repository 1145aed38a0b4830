"""Folding LoRA adapters into full weights, checked, for the stages and tools that need a plain model.

The SFT, reward and PPO stages save LoRA adapters; the next stage (or a user) wants full
weights. `merge_adapter` does it the way that works with today's libraries and proves it:

- the task comes from the adapter's own `adapter_config.json` (`CAUSAL_LM` -> a causal LM,
  `SEQ_CLS` -> a sequence classifier whose trained score head is in the adapter); a PPO
  policy's `value_head.safetensors` is kept beside the merged weights or dropped;
- the base is always loaded un-quantised in `dtype` (merging into an 8/4-bit base fails or
  loses precision); a base saved as an 8/4-bit checkpoint is dequantised first;
- before merging, base+adapter score a fixed probe text; the merged folder, once saved, is
  reloaded from disk and must give the same logits within a dtype-aware tolerance;
- everything is written to a temporary folder beside the output and renamed into place,
  `merge_results.json` last, so a half-written merge never looks like a finished one.

Only one copy of the model is held at a time (the in-memory model is freed before the
saved one is reloaded), since this runs on 7B models.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .atomic import replace_dir
from .data.template import format_example
from .errors import InputError, MergeError, MissingInputError, OutputExistsError
from .modeling import (
    BITSANDBYTES_HINT,
    MissingDependencyError,
    _load_error,
    guard_cpu_4bit_packing,
    kbit_device_map,
    load_tokenizer,
    torch_dtype,
)
from .ppo.value_head import VALUE_HEAD_CONFIG, VALUE_HEAD_FILE
from .stage import write_results

logger = logging.getLogger(__name__)

RESULTS_FILE = "merge_results.json"  # written last: its presence marks a completed merge
PROBE_TEXT = format_example(
    "How do I descale my espresso machine without damaging it?", "Run a mix of water and citric acid through it"
)
PROBE_MAX_TOKENS = 64  # a byte-level tokenizer makes the probe long; any model takes 64 positions
# max |merged - (base+adapter)| over the probe's logits must be <= RTOL[dtype] * max(1, max |base+adapter logits|).
# float32 only sees reordered sums (~1e-6 relative); 16-bit merges round every merged weight once, which
# moves logits by up to a few % of their scale, so there the check catches gross failures (wrong base,
# adapter lost, quantised merge), not rounding.
RTOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
STAGE_RESULTS = {"sft_results.json": "sft", "reward_results.json": "reward", "ppo_results.json": "ppo"}
TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls"}



@dataclass
class MergeArguments:
    """Arguments of `scripts/merge_adapters.py` (the recipe's flags plus dtype, value head and checks)."""

    adapter_model_name: str = field(
        metadata={"help": "Folder (or Hub id) of the LoRA adapter to merge: an SFT, reward-model or PPO output."}
    )
    output_name: str = field(metadata={"help": "Folder for the merged full weights (must not exist or be empty)."})
    base_model_name: str | None = field(
        default=None,
        metadata={"help": "Un-quantised base to merge into; default: base_model_name_or_path of the adapter config."},
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={"help": "dtype the base is loaded, merged and saved in: float32, bfloat16 or float16."},
    )
    value_head: Literal["keep", "drop"] = field(
        default="keep",
        metadata={
            "help": "A PPO policy's value head (value_head.safetensors): keep it beside the merged weights "
            "(AutoModelForCausalLMWithValueHead.from_pretrained loads both) or drop it."
        },
    )
    verify: bool = field(
        default=True,
        metadata={
            "help": "Reload the saved merged model and check its logits match base+adapter on a probe text; "
            "--verify false skips the check (and its second model load)."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace --output_name if it exists and is not empty."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub (only for models you trust)."}
    )


def merge_from_args(args: MergeArguments) -> dict:
    """`merge_adapter` with the script's flags."""
    return merge_adapter(
        args.adapter_model_name,
        args.output_name,
        base_model=args.base_model_name,
        dtype=args.dtype,
        value_head=args.value_head,
        verify=args.verify,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )


def merge_adapter(
    adapter: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str | None = None,
    dtype: str = "float32",
    value_head: str = "keep",
    verify: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    task: str | None = None,
    num_labels: int | None = None,
) -> dict:
    """Merge the adapter in `adapter` into its (un-quantised) base and write full weights to `output_dir`.

    `task` ("causal_lm" / "seq_cls") and `num_labels` are only fallbacks for an adapter config that does
    not say. Returns what `merge_results.json` holds. Raises ValueError / FileNotFoundError / FileExistsError
    on bad input, ModelLoadError / MissingDependencyError when loading fails, MergeError when the check fails.
    """
    start = time.time()
    if dtype not in RTOL:
        raise InputError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    if value_head not in ("keep", "drop"):
        raise InputError(f"--value_head {value_head!r}: use keep or drop")
    adapter_dir = _local_adapter_dir(str(adapter))
    peft_config = _adapter_config(adapter_dir)
    task = _task(peft_config, task, adapter_dir)
    base = base_model or peft_config.base_model_name_or_path
    if not base:
        raise InputError(f"{adapter}: the adapter config names no base model; pass --base_model_name")
    output_dir = Path(output_dir)
    _check_output(output_dir, overwrite, adapter_dir, base)

    has_head = (adapter_dir / VALUE_HEAD_FILE).is_file()
    keep_head = has_head and value_head == "keep" and task == "causal_lm"
    if task == "seq_cls":
        num_labels = _score_head_labels(adapter_dir) or num_labels or 1
    tokenizer_source = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=trust_remote_code, task=task)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_merges(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(output_dir)}{os.getpid()}-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the output private
    try:
        probe = tokenizer(PROBE_TEXT, return_tensors="pt", truncation=True, max_length=PROBE_MAX_TOKENS)
        reference, dequantized = _merge_and_save(
            adapter_dir, base, tmp, tokenizer, probe if verify else None,
            task=task, dtype=dtype, num_labels=num_labels, trust_remote_code=trust_remote_code,
        )
        gc.collect()  # the merged model is gone: only one copy is ever held
        results = {
            "adapter": str(adapter),
            "base_model": base,
            "task": task,
            "stage": _stage(adapter_dir, task, has_head),
            "dtype": dtype,
            "dequantized_base": dequantized,
            "value_head": "kept" if keep_head else "dropped" if has_head else "none",
            "verified": False,
            "probe_tokens": int(probe["input_ids"].shape[1]),
            "max_abs_diff": None,
            "tolerance": None,
        }
        if verify:
            merged = _reload_logits(tmp, probe, task, dtype, trust_remote_code)
            diff = float((merged - reference).abs().max())
            tolerance = RTOL[dtype] * max(1.0, float(reference.abs().max()))
            results.update(max_abs_diff=diff, tolerance=tolerance)
            figure = (f"on a {results['probe_tokens']}-token probe (max |diff| {diff:.1e}, "
                      f"tolerance {tolerance:.1e})")
            if not diff <= tolerance:  # also catches NaN
                raise MergeError(f"the merged model's logits differ from base+adapter {figure}; nothing was written")
            results["verified"] = True
            logger.info("verified: merged logits match base+adapter %s", figure)
        else:
            logger.warning("verification skipped (--verify false): the merged weights were not checked")
        if keep_head:
            for name in (VALUE_HEAD_FILE, VALUE_HEAD_CONFIG):
                if (adapter_dir / name).is_file():
                    shutil.copy2(adapter_dir / name, tmp / name)
        results["wall_time_s"] = round(time.time() - start, 1)
        write_model_card(tmp, str(output_dir), results)
        write_results(tmp, RESULTS_FILE, results)
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("merged %s into %s (%s, %s): %s", adapter, base, task, dtype, output_dir)
    return results


# --------------------------------------------------------------------------- the adapter


def _local_adapter_dir(name: str) -> Path:
    """A local folder as is; anything else is taken as a Hub id and fetched (or found in the cache)."""
    if Path(name).exists():
        if not Path(name).is_dir():
            raise MissingInputError(f"{name} is a file; pass the folder that holds adapter_config.json")
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as error:  # offline, unknown repo, bad id: all mean "not found"
        raise _load_error(name, error) from error


def _adapter_config(adapter_dir: Path):
    from peft import PeftConfig

    if not (adapter_dir / "adapter_config.json").is_file():
        if (adapter_dir / "config.json").is_file():
            raise MissingInputError(
                f"{adapter_dir} holds full weights (config.json, no adapter_config.json): nothing to merge, use it as is"
            )
        raise MissingInputError(f"{adapter_dir}: no adapter_config.json, so no adapter to merge")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if getattr(config, "is_prompt_learning", False):
        raise InputError(f"{adapter_dir}: a {config.peft_type} adapter has no weights to merge (LoRA and the like do)")
    return config


def _task(peft_config, fallback: str | None, adapter_dir: Path) -> str:
    task_type = getattr(peft_config.task_type, "value", peft_config.task_type)
    if task_type is None:
        if fallback is not None:
            return fallback
        return "seq_cls" if _score_head_labels(adapter_dir) else "causal_lm"
    if task_type not in TASKS:
        raise InputError(f"{adapter_dir}: task_type {task_type} is not supported: CAUSAL_LM or SEQ_CLS adapters only")
    task = TASKS[task_type]
    if fallback is not None and fallback != task:
        raise InputError(f"{adapter_dir} is a {task_type} adapter, not {fallback}")
    return task


def _score_head_labels(adapter_dir: Path) -> int | None:
    """Number of outputs of the score/classifier head saved in the adapter (`modules_to_save`), if any."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.endswith(("score.weight", "classifier.weight")):
                return int(f.get_slice(key).get_shape()[0])
    return None


def _stage(adapter_dir: Path, task: str, has_head: bool) -> str:
    """The stage that produced the adapter: its results file, else what its contents say."""
    for filename, stage in STAGE_RESULTS.items():
        if (adapter_dir / filename).is_file():
            return stage
    return "ppo" if has_head else "reward" if task == "seq_cls" else "sft"


def _staging_prefix(output_dir: Path) -> str:
    """Name start of the folder a merge writes into before renaming it to ``output_dir``;
    the host and process id follow, so a later merge can tell an abandoned one."""
    import socket

    return f".{output_dir.name}.merging-{socket.gethostname()}-"


def remove_abandoned_merges(output_dir: Path) -> list[Path]:
    """Deletes the staging folders of merges into ``output_dir`` whose process is gone.

    A merge killed before its rename (SIGKILL, out of memory) leaves a hidden folder of the
    model's size beside the output (13 GB for a 7B model in bf16). Only folders made on this
    host by a process that no longer runs are removed; others are left to their owner.
    """
    prefix = _staging_prefix(output_dir)
    removed = []
    for path in output_dir.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not (path.is_dir() and pid.isdigit()) or _process_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed %s, left by an interrupted merge (process %s)", path, pid)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# --------------------------------------------------------------------------- loading, merging, checking


def _model_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


def load_base(base: str, task: str, dtype: str, num_labels: int | None = None, trust_remote_code: bool = False):
    """The base un-quantised in `dtype`, on the CPU; a saved 8/4-bit checkpoint is dequantised.

    Returns (model, dequantized). Merging into quantised layers is what the libraries get wrong, so
    a quantised base never reaches the merge.
    """
    from transformers import AutoConfig

    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    if task == "seq_cls":
        kwargs["num_labels"] = num_labels or 1
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error(base, error) from error
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        method = getattr(method, "value", method)
        retry = "or pass the original un-quantised base with --base_model_name"
        if method != "bitsandbytes":
            raise InputError(f"{base} is a {method}-quantised checkpoint, which cannot be dequantised here: {retry}")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependencyError(
                f"{base} is a saved 8/4-bit checkpoint; dequantising it for the merge needs bitsandbytes "
                f"({BITSANDBYTES_HINT}), {retry}"
            )
        kwargs["device_map"] = kbit_device_map()
    try:
        model = _model_class(task).from_pretrained(base, **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(base, error) from error
    if quant is None:
        return model, False
    guard_cpu_4bit_packing(model)  # the merge check runs the model in eval mode
    logger.warning(
        "%s is a saved 8/4-bit checkpoint: dequantising it to %s for the merge (what the adapter was trained "
        "against); pass the original un-quantised base with --base_model_name to merge into that instead", base, dtype,
    )
    return _dequantize(model, dtype), True


def _dequantize(model, dtype: str):
    """`model.dequantize()`, plus the clean-up transformers 5 leaves out: the quantizer's weight conversions
    stay attached (save_pretrained then fails trying to re-quantise) and `is_loaded_in_8bit` stays True."""
    quantizer = getattr(model, "hf_quantizer", None)
    try:
        load_ops = tuple(quantizer.get_load_operations().values()) if quantizer is not None else ()
    except Exception:  # an older quantizer API: nothing to filter
        load_ops = ()
    model = model.dequantize()
    conversions = getattr(model, "_weight_conversions", None)
    if conversions and load_ops:
        model._weight_conversions = [
            c for c in conversions if not any(isinstance(op, load_ops) for op in getattr(c, "operations", ()))
        ]
    for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return model.to(device="cpu", dtype=torch_dtype(dtype))


def _merge_and_save(adapter_dir: Path, base: str, folder: Path, tokenizer, probe, task: str, dtype: str,
                    num_labels: int | None, trust_remote_code: bool):
    """Load base+adapter, score `probe` (None: skip), merge, save weights and tokenizer into `folder`.

    Returns (reference logits or None, dequantized). The model lives only in this frame, so it is freed
    on return, before the saved copy is reloaded.
    """
    from peft import PeftModel

    model, dequantized = load_base(base, task, dtype, num_labels, trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id  # a classifier finds the last token by it
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    reference = _logits(model, probe) if probe is not None else None
    try:
        model = model.merge_and_unload()
    except (AttributeError, NotImplementedError) as error:
        raise InputError(f"{adapter_dir}: this adapter type cannot be merged into full weights ({error})") from error
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return reference, dequantized


def _reload_logits(folder: Path, probe, task: str, dtype: str, trust_remote_code: bool):
    model = _model_class(task).from_pretrained(folder, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    return _logits(model.eval(), probe)


def _logits(model, probe):
    import torch

    with torch.inference_mode():
        return model(**probe).logits.float()


# --------------------------------------------------------------------------- output


def _check_output(output_dir: Path, overwrite: bool, adapter_dir: Path, base: str) -> None:
    out = output_dir.resolve()
    for source in (adapter_dir, Path(base)):
        if source.exists() and (out == source.resolve() or out in source.resolve().parents):
            raise InputError(f"--output_name {output_dir} would replace its own input {source}: choose another folder")
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise OutputExistsError(f"{output_dir} exists and is not empty: pass --overwrite to replace it")


def write_model_card(folder: Path, output_dir: str, results: dict) -> Path:
    """README.md of the merged model (to be moved to `output_dir`): what it was merged from, in which dtype,
    and the check's figure."""
    from huggingface_hub import ModelCard, ModelCardData

    base, task, stage = results["base_model"], results["task"], results["stage"]
    head = results["value_head"] == "kept"
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base if not Path(base).exists() else None,
        tags=["stackllama", stage, "merged-lora"],
        pipeline_tag="text-classification" if task == "seq_cls" else "text-generation",
    )
    if results["verified"]:
        check = (f"verified: logits of the saved model match base+adapter on a {results['probe_tokens']}-token "
                 f"probe (max |diff| {results['max_abs_diff']:.1e}, tolerance {results['tolerance']:.1e})")
    else:
        check = "not verified (`--verify false`)"
    if head:
        load = ("from stackllama.ppo import AutoModelForCausalLMWithValueHead\n"
                f"model = AutoModelForCausalLMWithValueHead.from_pretrained({output_dir!r})  # policy + value head")
    else:
        cls = "AutoModelForSequenceClassification" if task == "seq_cls" else "AutoModelForCausalLM"
        load = f"from transformers import {cls}\nmodel = {cls}.from_pretrained({output_dir!r})"
    dequantized = " (a saved 8/4-bit checkpoint, dequantised)" if results["dequantized_base"] else ""
    body = f"""
# {Path(output_dir).name}: StackLLaMA {stage} model, LoRA merged into full weights

- Base model: `{base}`{dequantized}
- Adapter: `{results["adapter"]}` ({stage} stage, {task})
- dtype: {results["dtype"]}
- Value head: {results["value_head"]}
- Check: {check}

## Usage

```python
{load}
```
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    path = Path(folder) / "README.md"
    card.save(path)
    return path


__all__ = ["MergeArguments", "MergeError", "PROBE_TEXT", "RESULTS_FILE", "RTOL", "load_base", "merge_adapter",
           "merge_from_args", "write_model_card"]
