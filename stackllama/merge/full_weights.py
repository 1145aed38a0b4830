"""Full weights for the next stage, from what a training stage saved (`--merge` of the SFT and
reward scripts): its LoRA adapter merged (:func:`merge_adapter`), or its trained weights copied.

From the files, not the model in memory: under DeepSpeed ZeRO-3 a process holds only its
shards (the trainer gathered them to save).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..atomic import staged_dir
from ..errors import MissingInputError
from ..modeling import Task
from .merging import merge_adapter


def merge_lora(
    adapter_dir: str | Path,
    output_dir: str | Path,
    base_model: str | None = None,
    dtype: str = "float32",
    task: Task = "causal_lm",
    trust_remote_code: bool = False,
    num_labels: int = 1,
) -> Path:
    """Merge the LoRA adapter in `adapter_dir` into a 16/32-bit base and save full weights, replacing
    `output_dir` (:func:`merge_adapter`: verified, written atomically)."""
    merge_adapter(adapter_dir, output_dir, base_model=base_model, dtype=dtype, task=task, num_labels=num_labels,
                  overwrite=True, trust_remote_code=trust_remote_code)
    return Path(output_dir)


def save_full_weights(
    tokenizer,
    adapter_dir: str | Path,
    output_dir: str | Path,
    use_peft: bool,
    base_model: str | None = None,
    dtype: str = "float32",
    task: Task = "causal_lm",
    trust_remote_code: bool = False,
) -> Path:
    """`output_dir` replaced by full weights: the LoRA adapter saved in `adapter_dir` merged into a
    16/32-bit base and checked, or, without LoRA, the weights the trainer saved there, copied with
    their configs and `tokenizer`."""
    if use_peft:
        merge_adapter(adapter_dir, output_dir, base_model=base_model, dtype=dtype, task=task, overwrite=True,
                      trust_remote_code=trust_remote_code)
        return Path(output_dir)
    src, final = Path(adapter_dir), Path(output_dir)
    weights = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.safetensors.index.json"))
    if not weights:
        raise MissingInputError(f"{src}: no saved weights (*.safetensors) to copy into {final}")
    with staged_dir(final) as folder:
        for path in weights + [src / name for name in ("config.json", "generation_config.json") if (src / name).is_file()]:
            shutil.copy2(path, folder / path.name)
        tokenizer.save_pretrained(folder)
    return final
