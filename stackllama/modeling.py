"""Loading models for every stage: Hub id or local path, dtype, 8/4-bit, LoRA, pad/eos.

The SFT, reward-model and PPO stages all load a base model the same way, so it lives here:

- `load_tokenizer`: `AutoTokenizer` with a padding token guaranteed (see `ensure_pad_token`);
- `load_model`: `AutoModelForCausalLM` or `AutoModelForSequenceClassification` from a Hub
  id or a folder, in the requested dtype, optionally quantized to 8 or 4 bits with
  `BitsAndBytesConfig` (placed with `device_map={"": local_process_index}` so each process
  of a multi-GPU run holds its own copy) and prepared with `prepare_model_for_kbit_training`;
- `lora_config`: the `peft.LoraConfig` described by the `--use_peft`/`--lora_*` flags.

Folding an adapter back into full weights is :mod:`stackllama.merge`, which builds on this.
The arguments are TRL's `ModelConfig` dataclass (`--model_name_or_path`, `--dtype`,
`--use_peft`, `--lora_r`, `--load_in_8bit`, ...), so every script shares the same flags.
transformers, peft and TRL are imported where they are used, so a script's `--help` does
not wait for them (torch comes with :mod:`stackllama.processes`).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from .errors import InputError, MissingDependencyError, ModelLoadError
from .library_warnings import explain_cpu_4bit_kernel
from .processes import kbit_device_map, launched_with

if TYPE_CHECKING:
    from trl import ModelConfig

logger = logging.getLogger(__name__)

Task = Literal["causal_lm", "seq_cls"]
BITSANDBYTES_HINT = "pip install 'stackllama[bitsandbytes]'"


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(
            f"--load_in_8bit / --load_in_4bit need the bitsandbytes package: {BITSANDBYTES_HINT}"
        )


def torch_dtype(name: str | None):
    """`"bfloat16"` -> `torch.bfloat16`; `"auto"` and `None` are passed through."""
    if name in (None, "auto"):
        return name
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"unknown dtype {name!r}: use auto, bfloat16, float16 or float32")
    return dtype


def is_quantized(model_args: ModelConfig) -> bool:
    return bool(model_args.load_in_8bit or model_args.load_in_4bit)


def quantization_config(model_args: ModelConfig):
    """The `BitsAndBytesConfig` for `--load_in_8bit` / `--load_in_4bit`, or None."""
    if not is_quantized(model_args):
        return None
    if model_args.load_in_8bit and model_args.load_in_4bit:
        raise InputError("--load_in_8bit and --load_in_4bit are exclusive: choose one")
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = torch_dtype(model_args.dtype)
    if compute_dtype in (None, "auto"):
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        compute_dtype = torch.bfloat16 if bf16 else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
    )


def lora_config(model_args: ModelConfig, task_type: str | None = None):
    """The `LoraConfig` from the `--lora_*` flags (None without `--use_peft`); `task_type` overrides the flag."""
    if not model_args.use_peft:
        return None
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if task_type is not None:
        config.task_type = task_type
    return config


def load_error(name: str, error: Exception) -> ModelLoadError:
    """The one-line error for a model or tokenizer that did not load, saying whether `name` was taken
    as a local folder or a Hub id."""
    where = "local folder" if Path(name).exists() else "Hub id (not a local folder)"
    hint = ""
    if not Path(name).exists():
        hint = (
            " If you meant a local folder, check the path; a Hub id needs network access "
            "(HF_HUB_OFFLINE=1 forbids it) or a copy already in the Hugging Face cache."
        )
    return ModelLoadError(f"could not load {name!r} as a {where}: {error}.{hint}")


def ensure_pad_token(tokenizer, task: Task = "causal_lm"):
    """Give `tokenizer` a padding token if it has none.

    An existing `unk` token is preferred (LLaMA's usual choice); otherwise EOS is reused, which is
    fine for causal-LM training (padded positions are masked) but makes a reward model's "last
    non-pad token" ambiguous, hence the warning for `seq_cls`.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        if task == "seq_cls":
            logger.warning(
                "the tokenizer has no pad token; using EOS (%r) as pad. A sequence-classification model then "
                "scores the first EOS/pad position; prefer a tokenizer with a distinct pad token.",
                tokenizer.eos_token,
            )
    else:
        raise InputError("the tokenizer has neither a pad nor an EOS token: set one before training")
    return tokenizer


def adapter_base(path: str) -> str:
    """The base model recorded in the LoRA adapter at ``path`` (its ``base_model_name_or_path``)."""
    # peft is slow to import: only when an adapter is loaded, not at --help
    from peft import PeftConfig

    return PeftConfig.from_pretrained(path).base_model_name_or_path


def load_tokenizer(
    name_or_path: str,
    revision: str = "main",
    trust_remote_code: bool = False,
    padding_side: str | None = None,
    task: Task = "causal_lm",
):
    """`AutoTokenizer.from_pretrained` with a padding token set (`ensure_pad_token`)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise load_error(name_or_path, error) from error
    if tokenizer.eos_token is None:
        raise InputError(f"the tokenizer of {name_or_path!r} has no EOS token; packing needs one between texts")
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return ensure_pad_token(tokenizer, task=task)


def load_model(
    model_args: ModelConfig,
    tokenizer=None,
    task: Task = "causal_lm",
    num_labels: int = 1,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict | None = None,
    name_or_path: str | None = None,
):
    """The model named by `model_args` (Hub id or folder), quantized and prepared for k-bit training if asked.

    A quantized base needs LoRA (`--use_peft`): its int8/nf4 weights cannot be trained directly.
    The pad token id of `tokenizer` is written into the model's config and generation config.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name = name_or_path or model_args.model_name_or_path
    if not name:
        raise InputError("no model given: pass --model_name_or_path (a Hub id or a local folder)")
    if is_quantized(model_args) and not model_args.use_peft:
        raise InputError(
            "--load_in_8bit / --load_in_4bit train through LoRA adapters only: add --use_peft "
            "(quantized weights cannot be updated directly)"
        )
    kwargs = dict(
        revision=model_args.model_revision,
        dtype=torch_dtype(model_args.dtype),
        trust_remote_code=trust_remote_code,
    )
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quant = quantization_config(model_args)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = kbit_device_map()
        if quant.load_in_4bit and kwargs["device_map"] == {"": "cpu"}:
            explain_cpu_4bit_kernel()  # the bitsandbytes warning held back at import concerns this run
    if task == "causal_lm":
        model_class = AutoModelForCausalLM
    elif task == "seq_cls":
        model_class = AutoModelForSequenceClassification
        kwargs["num_labels"] = num_labels
    else:
        raise InputError(f"unknown task {task!r}: expected 'causal_lm' or 'seq_cls'")
    try:
        model = model_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise load_error(name, error) from error

    if quant is not None:
        guard_cpu_4bit_packing(model, trainable=True)  # a training stage's model: gradients must pass
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            if model.generation_config.eos_token_id is None:
                model.generation_config.eos_token_id = tokenizer.eos_token_id
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
        )
    return model


def guard_cpu_4bit_packing(model, trainable: bool = False) -> int:
    """Keeps bitsandbytes' generic 4-bit CPU kernel where its packed AVX512-BF16 kernel would fail.

    On a CPU with AVX512-BF16, bitsandbytes (0.48+) repacks a 4-bit weight for its fast kernel
    at the first eval-mode, no-grad call (an evaluation, a PPO rollout, a merge check). Two
    things go wrong there, and the affected layers are marked unsupported (the flag bitsandbytes
    itself sets from the CPU) so that they keep the generic kernel:
    - the packed kernel needs the layer's output size to be a multiple of 32 and its input size a
      multiple of the quantization block (64); the tiny default model's MLP (688 wide) is neither,
      so `--load_in_4bit` stopped there ("N must be divisible by block_n", then a reshape error);
    - a repacked layer passes no gradient to its input, so in a model that trains (`trainable`:
      every training stage loads through :func:`load_model`) an evaluation before training or a
      rollout froze every LoRA layer in front of it (grad norm 0). There every 4-bit layer is marked.
    Returns how many layers were marked.
    """
    marked = 0
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        block = getattr(quant_state, "blocksize", None) or 64
        if trainable or module.out_features % 32 or module.in_features % block:
            module.support_avx512bf16_for_cpu = False
            marked += 1
    return marked


def place_for_evaluation(model, training_args):
    """`model` on the process's device, for an evaluation that runs before transformers' Trainer exists.

    The Trainer moves the model to the GPU only when it is built. The reward stage scores the
    held-out pairs first (the untrained figures, `--eval_only`), so without this the model would
    be scored on the CPU of a GPU machine.
    Left where they are: models placed at load time (`device_map`, so 8-bit / 4-bit bases) and
    models that DeepSpeed or FSDP place themselves, as the Trainer would leave them.
    """
    if getattr(model, "hf_device_map", None) is not None or getattr(model, "is_quantized", False):
        return model
    sharded = training_args.deepspeed or training_args.fsdp or launched_with("DEEPSPEED") or launched_with("FSDP")
    if sharded or training_args.place_model_on_device is False:
        return model
    return model.to(training_args.device)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts. 4-bit weights count as stored (two values per byte);
    a DeepSpeed ZeRO-3 weight counts whole (`ds_numel`), not as the empty shell left here."""

    def numel(p) -> int:
        return getattr(p, "ds_numel", None) or p.numel()

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total

