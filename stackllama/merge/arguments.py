"""The flags of `scripts/merge_adapters.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
