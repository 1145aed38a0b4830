"""The merge's proof: base+adapter and the saved merged model score the same probe text.

Before merging, base+adapter's logits on a fixed probe are kept; the merged folder, once
saved, is reloaded from disk and must give the same logits within a dtype-aware tolerance.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data.template import format_example
from ..errors import MergeError
from ..modeling import torch_dtype
from .base import model_class

logger = logging.getLogger(__name__)

PROBE_TEXT = format_example(
    "How do I descale my espresso machine without damaging it?", "Run a mix of water and citric acid through it"
)
PROBE_MAX_TOKENS = 64  # a byte-level tokenizer makes the probe long; any model takes 64 positions
# max |merged - (base+adapter)| over the probe's logits must be <= RTOL[dtype] * max(1, max |base+adapter logits|).
# float32 only sees reordered sums (~1e-6 relative); 16-bit merges round every merged weight once, which
# moves logits by up to a few % of their scale, so there the check catches gross failures (wrong base,
# adapter lost, quantised merge), not rounding.
RTOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}


def probe_inputs(tokenizer):
    return tokenizer(PROBE_TEXT, return_tensors="pt", truncation=True, max_length=PROBE_MAX_TOKENS)


def logits(model, probe):
    with torch.inference_mode():
        return model(**probe).logits.float()


def reload_logits(folder: Path, probe, task: str, dtype: str, trust_remote_code: bool):
    """The probe's logits from the merged model as saved in `folder`."""
    model = model_class(task).from_pretrained(folder, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    return logits(model.eval(), probe)


def check_logits(merged, reference, dtype: str, probe_tokens: int) -> dict:
    """`max_abs_diff` and `tolerance` of the merged logits against base+adapter's; MergeError beyond it."""
    diff = float((merged - reference).abs().max())
    tolerance = RTOL[dtype] * max(1.0, float(reference.abs().max()))
    figure = f"on a {probe_tokens}-token probe (max |diff| {diff:.1e}, tolerance {tolerance:.1e})"
    if not diff <= tolerance:  # also catches NaN
        raise MergeError(f"the merged model's logits differ from base+adapter {figure}; nothing was written")
    logger.info("verified: merged logits match base+adapter %s", figure)
    return {"max_abs_diff": diff, "tolerance": tolerance}
