"""The base an adapter is merged into: always un-quantised, on the CPU, in the merge's dtype.

Merging into quantised layers is what the libraries get wrong, so a quantised base never
reaches the merge: a base saved as an 8/4-bit checkpoint is loaded and dequantised first.
"""

from __future__ import annotations

import importlib.util
import logging

from ..errors import InputError, MissingDependencyError
from ..modeling import (
    BITSANDBYTES_HINT,
    guard_cpu_4bit_packing,
    load_error,
    torch_dtype,
)
from ..processes import kbit_device_map

logger = logging.getLogger(__name__)


def model_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


def load_base(base: str, task: str, dtype: str, num_labels: int | None = None, trust_remote_code: bool = False):
    """The base un-quantised in `dtype`, on the CPU; a saved 8/4-bit checkpoint is dequantised.

    Returns (model, dequantized).
    """
    from transformers import AutoConfig

    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    if task == "seq_cls":
        kwargs["num_labels"] = num_labels or 1
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise load_error(base, error) from error
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        method = getattr(method, "value", method)
        retry = "or pass the original un-quantised base with --base_model_name"
        if method != "bitsandbytes":
            raise InputError(f"{base} is a {method}-quantised checkpoint, which cannot be dequantised here: {retry}")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependencyError(
                f"{base} is a saved 8/4-bit checkpoint; dequantising it for the merge needs bitsandbytes "
                f"({BITSANDBYTES_HINT}), {retry}"
            )
        kwargs["device_map"] = kbit_device_map()
    try:
        model = model_class(task).from_pretrained(base, **kwargs)
    except (OSError, ValueError) as error:
        raise load_error(base, error) from error
    if quant is None:
        return model, False
    guard_cpu_4bit_packing(model)  # the merge check runs the model in eval mode
    logger.warning(
        "%s is a saved 8/4-bit checkpoint: dequantising it to %s for the merge (what the adapter was trained "
        "against); pass the original un-quantised base with --base_model_name to merge into that instead", base, dtype,
    )
    return dequantize(model, dtype), True


def dequantize(model, dtype: str):
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
