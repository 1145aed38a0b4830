"""`merge_adapter`: fold an adapter into its base, prove the saved result, and put it in place.

Everything is written to a staging folder beside the output and renamed into place,
`merge_results.json` last, so a half-written merge never looks like a finished one. Only one
copy of the model is held at a time (the in-memory model is freed before the saved one is
reloaded), since this runs on 7B models.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

from .. import run_layout, stage
from ..atomic import staged_dir
from ..errors import InputError, OutputExistsError
from ..model_card import write_merge_card
from ..modeling import load_tokenizer
from .adapter import (
    adapter_config,
    adapter_stage,
    adapter_task,
    local_adapter_dir,
    score_head_labels,
)
from .arguments import MergeArguments
from .base import load_base
from .staging import remove_abandoned_merges, staging_prefix
from .value_head import copy_value_head, has_value_head
from .verification import RTOL, check_logits, logits, probe_inputs, reload_logits

logger = logging.getLogger(__name__)

RESULTS_FILE = run_layout.MERGE_RESULTS  # written last: its presence marks a completed merge


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
    not say. Returns what `merge_results.json` holds. Raises InputError / MissingInputError /
    OutputExistsError on bad input, ModelLoadError / MissingDependencyError when loading fails, MergeError
    when the check fails.
    """
    start = time.time()
    if dtype not in RTOL:
        raise InputError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    if value_head not in ("keep", "drop"):
        raise InputError(f"--value_head {value_head!r}: use keep or drop")
    adapter_dir = local_adapter_dir(str(adapter))
    peft_config = adapter_config(adapter_dir)
    task = adapter_task(peft_config, task, adapter_dir)
    base = base_model or peft_config.base_model_name_or_path
    if not base:
        raise InputError(f"{adapter}: the adapter config names no base model; pass --base_model_name")
    output_dir = Path(output_dir)
    check_output(output_dir, overwrite, adapter_dir, base)

    has_head = has_value_head(adapter_dir)
    keep_head = has_head and value_head == "keep" and task == "causal_lm"
    if task == "seq_cls":
        num_labels = score_head_labels(adapter_dir) or num_labels or 1
    tokenizer_source = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=trust_remote_code, task=task)

    remove_abandoned_merges(output_dir)
    with staged_dir(output_dir, prefix=staging_prefix(output_dir)) as folder:
        probe = probe_inputs(tokenizer)
        reference, dequantized = merge_and_save(
            adapter_dir, base, folder, tokenizer, probe if verify else None,
            task=task, dtype=dtype, num_labels=num_labels, trust_remote_code=trust_remote_code,
        )
        gc.collect()  # the merged model is gone: only one copy is ever held
        results = {
            "adapter": str(adapter),
            "base_model": base,
            "task": task,
            "stage": adapter_stage(adapter_dir, task, has_head),
            "dtype": dtype,
            "dequantized_base": dequantized,
            "value_head": "kept" if keep_head else "dropped" if has_head else "none",
            "verified": False,
            "probe_tokens": int(probe["input_ids"].shape[1]),
            "max_abs_diff": None,
            "tolerance": None,
        }
        if verify:
            merged = reload_logits(folder, probe, task, dtype, trust_remote_code)
            results.update(check_logits(merged, reference, dtype, results["probe_tokens"]))
            results["verified"] = True
        else:
            logger.warning("verification skipped (--verify false): the merged weights were not checked")
        if keep_head:
            copy_value_head(adapter_dir, folder)
        results["wall_time_s"] = round(time.time() - start, 1)
        write_merge_card(folder, str(output_dir), results)
        stage.write_results(folder, RESULTS_FILE, results)
    logger.info("merged %s into %s (%s, %s): %s", adapter, base, task, dtype, output_dir)
    return results


def merge_and_save(adapter_dir: Path, base: str, folder: Path, tokenizer, probe, task: str, dtype: str,
                   num_labels: int | None, trust_remote_code: bool):
    """Load base+adapter, score `probe` (None: skip), merge, save weights and tokenizer into `folder`.

    Returns (reference logits or None, dequantized). The model lives only in this frame, so it is freed
    on return, before the saved copy is reloaded.
    """
    # deferred: peft imports transformers
    from peft import PeftModel

    model, dequantized = load_base(base, task, dtype, num_labels, trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id  # a classifier finds the last token by it
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    reference = logits(model, probe) if probe is not None else None
    try:
        model = model.merge_and_unload()
    except (AttributeError, NotImplementedError) as error:
        raise InputError(f"{adapter_dir}: this adapter type cannot be merged into full weights ({error})") from error
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return reference, dequantized


def check_output(output_dir: Path, overwrite: bool, adapter_dir: Path, base: str) -> None:
    """The output must not be (or hold) an input, and must be empty unless `overwrite`."""
    out = output_dir.resolve()
    for source in (adapter_dir, Path(base)):
        if source.exists() and (out == source.resolve() or out in source.resolve().parents):
            raise InputError(f"--output_name {output_dir} would replace its own input {source}: choose another folder")
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise OutputExistsError(f"{output_dir} exists and is not empty: pass --overwrite to replace it")
