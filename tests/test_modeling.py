"""Shared model loading: LoRA on/off parameter counts, 8/4-bit configs, pad tokens, merging, errors."""

import importlib.util

import pytest
import torch
from sft_helpers import SMALL_CONFIG, build_small_model, write_pairs
from trl import ModelConfig

from stackllama.merge import merge_lora
from stackllama.modeling import (
    MissingDependencyError,
    ModelLoadError,
    count_parameters,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    lora_config,
    quantization_config,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modeling")
    return build_small_model(tmp, write_pairs(tmp / "data"))


def lora_parameters(r: int) -> int:
    """LoRA on LLaMA's default targets (q_proj, v_proj): r x (in + out) per matrix, A and B."""
    h = SMALL_CONFIG["hidden_size"]
    kv = SMALL_CONFIG["num_key_value_heads"] * SMALL_CONFIG["head_dim"]
    return SMALL_CONFIG["num_hidden_layers"] * r * ((h + h) + (h + kv))


def test_lora_off_trains_everything_lora_on_only_adapters(base):
    from peft import get_peft_model

    full = load_model(ModelConfig(model_name_or_path=str(base)))
    trainable, total = count_parameters(full)
    assert trainable == total > 0

    args = ModelConfig(model_name_or_path=str(base), use_peft=True)
    config = lora_config(args)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias, config.task_type) == (
        16, 32, 0.05, "none", "CAUSAL_LM"
    )
    peft_model = get_peft_model(load_model(args), config)
    lora_trainable, lora_total = count_parameters(peft_model)
    assert lora_trainable == lora_parameters(16)
    assert lora_total == total + lora_parameters(16)
    assert lora_config(ModelConfig()) is None
    assert lora_config(args, task_type="SEQ_CLS").task_type == "SEQ_CLS"


def test_quantization_configs():
    assert quantization_config(ModelConfig()) is None
    eight = quantization_config(ModelConfig(load_in_8bit=True))
    assert eight.load_in_8bit and not eight.load_in_4bit
    four = quantization_config(ModelConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.float32
    from stackllama.processes import kbit_device_map

    assert kbit_device_map() == {"": "cpu"}  # no accelerator here


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"pip install 'stackllama\[bitsandbytes\]'"):
        quantization_config(ModelConfig(load_in_8bit=True))


def test_quantized_base_needs_lora(base):
    with pytest.raises(ValueError, match="--use_peft"):
        load_model(ModelConfig(model_name_or_path=str(base), load_in_8bit=True))


@pytest.mark.parametrize("bits", [8, 4])
def test_kbit_model_is_quantized_and_frozen(base, bits):
    args = ModelConfig(model_name_or_path=str(base), use_peft=True, **{f"load_in_{bits}bit": True})
    model = load_model(args)
    assert getattr(model, f"is_loaded_in_{bits}bit")
    assert count_parameters(model)[0] == 0  # prepare_model_for_kbit_training froze the base
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear8bitLt" if bits == 8 else "Linear4bit")


def _tiny_4bit_source(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(SMALL_CONFIG, intermediate_size=688)  # the tiny default's width (configs/tiny_model)
    config.pop("architectures")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def test_4bit_layers_the_cpu_kernel_cannot_pack_still_run_in_eval(tmp_path):
    """The tiny default model's MLP is 688 wide: bitsandbytes' AVX512-BF16 CPU kernel repacks
    4-bit weights at the first eval-mode no-grad call and asserts on that shape. Loaded for
    inference (the merge check, a value-head model), only such layers keep the generic kernel."""
    from transformers import AutoModelForCausalLM

    from stackllama.modeling import guard_cpu_4bit_packing

    model = AutoModelForCausalLM.from_pretrained(_tiny_4bit_source(tmp_path), device_map={"": "cpu"},
                                                 quantization_config=quantization_config(
                                                     ModelConfig(load_in_4bit=True))).eval()
    mlp, attention = model.model.layers[0].mlp, model.model.layers[0].self_attn
    if attention.q_proj.support_avx512bf16_for_cpu:  # this CPU has the packed kernel
        assert guard_cpu_4bit_packing(model) == 3 * len(model.model.layers)
        assert not mlp.gate_proj.support_avx512bf16_for_cpu and not mlp.up_proj.support_avx512bf16_for_cpu
        assert not mlp.down_proj.support_avx512bf16_for_cpu  # in_features 688: not a multiple of the block
        assert attention.q_proj.support_avx512bf16_for_cpu  # the 64x64 attention layers keep it
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, SMALL_CONFIG["vocab_size"]) and torch.isfinite(logits).all()


def test_a_4bit_base_loaded_for_training_trains_after_an_eval_call(tmp_path):
    """A repacked 4-bit layer passes no gradient to its input: a LoRA layer in front of one stopped
    training after the first evaluation or rollout (the DPO stage's evaluation before training left its
    adapter at 0; so did the reward stage's). `load_model` loads for training: no layer is repacked."""
    from peft import LoraConfig, get_peft_model

    model = load_model(ModelConfig(model_name_or_path=_tiny_4bit_source(tmp_path), use_peft=True, load_in_4bit=True))
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    peft.eval()
    with torch.no_grad():
        peft(input_ids=ids)  # the evaluation before training (where bitsandbytes would repack)
    peft.train()
    peft(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in peft.named_parameters() if "lora_B" in name}
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values())


def test_place_for_evaluation_moves_only_what_the_trainer_would(monkeypatch):
    """Before the Trainer exists (the reward stage's untrained evaluation), the model goes to the
    process's device, unless it was placed at load time or DeepSpeed / FSDP will place it."""
    from types import SimpleNamespace

    from stackllama.modeling import place_for_evaluation

    def args(**kw):
        return SimpleNamespace(**{"deepspeed": None, "fsdp": [], "place_model_on_device": None,
                                  "device": torch.device("meta"), **kw})

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert place_for_evaluation(torch.nn.Linear(2, 2), args()).weight.device.type == "meta"
    assert place_for_evaluation(torch.nn.Linear(2, 2), args(deepspeed="ds.json")).weight.device.type == "cpu"
    assert place_for_evaluation(torch.nn.Linear(2, 2), args(fsdp=["full_shard"])).weight.device.type == "cpu"
    placed = torch.nn.Linear(2, 2)
    placed.hf_device_map = {"": "cpu"}
    assert place_for_evaluation(placed, args()).weight.device.type == "cpu"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert place_for_evaluation(torch.nn.Linear(2, 2), args()).weight.device.type == "cpu"


def test_missing_model_and_bad_path_errors(tmp_path):
    with pytest.raises(ValueError, match="--model_name_or_path"):
        load_model(ModelConfig())
    with pytest.raises(ModelLoadError, match="local folder"):
        load_tokenizer(str(tmp_path))


def test_ensure_pad_token_prefers_unk_then_eos(base):
    tokenizer = load_tokenizer(str(base))
    assert tokenizer.pad_token == "<pad>"  # an existing pad is kept
    tokenizer.pad_token = None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
    tokenizer.pad_token = None
    tokenizer.unk_token = "<s>"
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<s>"


def test_merge_lora_matches_adapter_outputs(base, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    args = ModelConfig(model_name_or_path=str(base), use_peft=True)
    model = get_peft_model(load_model(args), lora_config(args))
    with torch.no_grad():  # a non-zero adapter, so merging matters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    merged_dir = merge_lora(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = torch.tensor([[0, 5, 9, 13, 1]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_lora(base, tmp_path / "nothing")
