"""Folding LoRA adapters into full weights, checked, for the stages and tools that need a plain model.

The SFT, reward and PPO stages save LoRA adapters; the next stage (or a user) wants full
weights. `merge_adapter` does it the way that works with today's libraries and proves it:

- adapter.py: the task comes from the adapter's own `adapter_config.json` (`CAUSAL_LM` -> a
  causal LM, `SEQ_CLS` -> a sequence classifier whose trained score head is in the adapter);
- base.py: the base is always loaded un-quantised in `dtype` (merging into an 8/4-bit base
  fails or loses precision); a base saved as an 8/4-bit checkpoint is dequantised first;
- verification.py: base+adapter and the saved, reloaded merged model score a probe text alike;
- value_head.py: a PPO policy's `value_head.safetensors` is kept beside the merged weights or dropped;
- staging.py: the staging folder beside the output, and the clean-up of those a killed merge left;
- merging.py: `merge_adapter` itself, written atomically with `merge_results.json` last;
- full_weights.py: the training stages' `--merge` (`save_full_weights`, `merge_lora`);
- arguments.py: the flags of `scripts/merge_adapters.py`.
"""

from ..errors import MergeError
from .arguments import MergeArguments
from .base import load_base
from .full_weights import merge_lora, save_full_weights
from .merging import RESULTS_FILE, merge_adapter, merge_from_args
from .staging import remove_abandoned_merges
from .verification import PROBE_TEXT, RTOL

__all__ = ["MergeArguments", "MergeError", "PROBE_TEXT", "RESULTS_FILE", "RTOL", "load_base", "merge_adapter",
           "merge_from_args", "merge_lora", "remove_abandoned_merges", "save_full_weights"]
