"""The value-head model: one forward for logits and values, the reference via disabled
adapters, save/load of adapter + head, 8-bit / 4-bit bases."""

import warnings

import pytest
import torch
from peft import LoraConfig
from ppo_tiny import (
    make_model,
    make_policy,
    make_tokenizer,
    one_thread,  # noqa: F401  (fixture)
)

from stackllama.ppo import AutoModelForCausalLMWithValueHead

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_one_forward_gives_sliced_logits_and_values(tok):
    policy = make_policy(tok, lora=False).eval()
    ids = torch.randint(4, 30, (2, 9))
    full = policy.causal_lm(input_ids=ids).logits
    logits, values = policy(input_ids=ids, logits_start=3, logits_len=4)
    torch.testing.assert_close(logits, full[:, 3:7])
    assert values.shape == (2, 4)
    hidden = policy.causal_lm.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(values, policy.v_head(hidden)[:, 3:7])


def test_reference_is_the_base_with_adapters_disabled(tok):
    base = make_model(tok)
    expected = base(input_ids=torch.arange(4, 12)[None]).logits
    policy = make_policy(tok, lora=True)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.arange(4, 12)[None]
    with torch.no_grad():
        with policy.disable_adapter():
            ref_logits, _ = policy(input_ids=ids)
        pol_logits, _ = policy(input_ids=ids)
    torch.testing.assert_close(ref_logits, expected)
    assert (pol_logits - expected).abs().max() > 1e-3
    # no second copy of the weights: one embedding matrix in the whole module
    assert sum(1 for n, _ in policy.named_parameters() if "embed_tokens" in n) == 1


def test_lora_save_load_keeps_value_head(tok, tmp_path):
    base_dir = tmp_path / "base"
    make_model(tok).save_pretrained(base_dir)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(
        str(base_dir), peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), value_head_dropout=0.0
    )
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
        policy.v_head.summary.weight.normal_(std=1.0)
    ids = torch.randint(4, 30, (2, 7))
    policy.eval()
    before = policy(input_ids=ids)
    policy.save_pretrained(str(tmp_path / "ppo"))
    assert (tmp_path / "ppo" / "value_head.safetensors").exists()
    assert (tmp_path / "ppo" / "adapter_config.json").exists()
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "ppo"), base_model=str(base_dir)).eval()
    assert loaded.is_peft_model
    after = loaded(input_ids=ids)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_with_lora_ppo_step(tok, tmp_path, bits):
    from ppo_tiny import make_trainer, rollout, same_weights, trainable_snapshot
    from transformers import BitsAndBytesConfig

    make_model(tok).save_pretrained(tmp_path / "base")
    q = (
        BitsAndBytesConfig(load_in_8bit=True)
        if bits == 8
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = AutoModelForCausalLMWithValueHead.from_pretrained(
            str(tmp_path / "base"),
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
            quantization_config=q,
            value_head_dropout=0.0,
        )
        assert policy.is_quantized
        trainer = make_trainer(tokenizer=tok, policy=policy, ppo_epochs=1)
        snap = trainable_snapshot(trainer)
        queries, responses = rollout(trainer)
        stats = trainer.step(queries, responses, [torch.tensor(1.0)] * 4)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == base at step 0
    assert all(torch.isfinite(torch.tensor(v)) for k, v in stats.items() if isinstance(v, float))
    assert not same_weights(trainer, snap)


def test_full_model_save_load_keeps_value_head(tok, tmp_path):
    policy = make_policy(tok, lora=False).eval()
    with torch.no_grad():
        policy.v_head.summary.weight.normal_(std=1.0)
    policy.save_pretrained(str(tmp_path / "full"))
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "full")).eval()
    ids = torch.randint(4, 30, (2, 6))
    for a, b in zip(policy(input_ids=ids), loaded(input_ids=ids)):
        torch.testing.assert_close(a, b)
    assert not loaded.is_peft_model


def scaled_logits_model(tok, kind: str):
    """A tiny Cohere (logits x logit_scale) or Gemma-2 (logits soft-capped) model: their
    logits are more than the LM head's output. Scales chosen so the difference is large."""
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
    )

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    if kind == "cohere":
        return CohereForCausalLM(CohereConfig(**common, logit_scale=0.0625))
    return Gemma2ForCausalLM(Gemma2Config(**common, final_logit_softcapping=0.5))


@pytest.mark.parametrize("kind", ["cohere", "gemma2"])
def test_models_that_scale_their_logits_get_the_models_own_logits(tok, kind):
    """The value-head forward gives the logits the model's own forward gives, scaling or
    soft-capping included (the LM head alone differs by up to 0.9 here), and the values of
    the same hidden states."""
    from stackllama.ppo.value_head import logits_transform

    model = scaled_logits_model(tok, kind).eval()
    policy = AutoModelForCausalLMWithValueHead(model).eval()
    assert logits_transform(model.config) == {"cohere": "logit_scale", "gemma2": "final_logit_softcapping"}[kind]
    ids = torch.randint(4, 30, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 5:9]
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, 5:9]
        logits, values = policy(ids, mask, pos, logits_start=5, logits_len=4)
    assert (model.get_output_embeddings()(hidden) - expected).abs().max() > 0.05  # the LM head alone is not it
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(values, policy.v_head(hidden))


def test_scaled_logits_model_with_a_frozen_reference_starts_at_zero_kl(tok):
    """Policy == reference at the first step, so the KL is 0; with the LM head's unscaled
    logits for the policy and the model's scaled ones for the reference it was not."""
    import copy

    from ppo_tiny import make_trainer, rollout

    model = scaled_logits_model(tok, "cohere")
    ref = copy.deepcopy(model)
    trainer = make_trainer(tokenizer=tok, policy=AutoModelForCausalLMWithValueHead(model, value_head_dropout=0.0),
                           ref_model=ref, ppo_epochs=1)
    assert not trainer.speedups.reuse_logprobs  # generate's captured LM-head output lacks the scaling
    queries, responses = rollout(trainer)
    stats = trainer.step(queries, responses, [torch.tensor(1.0)] * 4)
    assert abs(stats["objective/kl"]) < 1e-5


@pytest.mark.parametrize("gpu, local_rank, expected", [(False, 0, {"": "cpu"}), (True, 5, {"": 5})])
def test_quantized_base_is_placed_on_this_process_device(tmp_path, monkeypatch, gpu, local_rank, expected):
    """An 8/4-bit base goes to the process's own device (``device_map={"": local_process_index}``, as
    stackllama.processes.kbit_device_map does for every stage): with eight ranks, TRL's ``{"": "cuda"}`` put all eight
    copies on GPU 0. The map is checked as requested from transformers (no GPU here)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from stackllama import processes

    class Rank:
        local_process_index = local_rank

    monkeypatch.setattr(processes, "accelerator_available", lambda: gpu)
    monkeypatch.setattr(processes, "PartialState", Rank)
    requested = []

    def from_pretrained(name, **kwargs):
        requested.append(kwargs.get("device_map"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(RuntimeError, match="stop here"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path), quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert requested == [expected]


def test_dropout_off_keeps_gradient_checkpointing_and_restores_modes(tok):
    """``dropout_off`` (every pass of the PPO step): no dropout module in training mode, but a
    layer with gradient checkpointing keeps its training flag, since transformers checkpoints
    only layers in training mode; every flag comes back after."""
    import contextlib

    from torch import nn

    from stackllama.ppo.value_head import dropout_off

    policy = make_policy(tok, lora=True, lora_dropout=0.5, value_head_dropout=0.5)
    policy.gradient_checkpointing_enable({"use_reentrant": False})
    ids = torch.randint(4, 30, (2, 7))

    def saved_tensors(context) -> int:
        """Tensors the forward keeps for backward outside checkpointed layers (few when checkpointing)."""
        packed = []
        with context, torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
            policy(input_ids=ids)
        return len(packed)

    policy.train()
    before = {name: m.training for name, m in policy.named_modules()}
    layer = policy.causal_lm.model.layers[0]
    with dropout_off(policy):
        assert layer.training and not layer.mlp.training and not policy.v_head.training
        assert not any(m.training for m in policy.modules() if isinstance(m, nn.Dropout))
        a, b = policy(input_ids=ids)[1], policy(input_ids=ids)[1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # no dropout noise
    assert {name: m.training for name, m in policy.named_modules()} == before
    checkpointed = saved_tensors(dropout_off(policy))
    assert checkpointed <= saved_tensors(contextlib.nullcontext())  # as in train mode (less the dropout masks)
    policy.eval()
    assert saved_tensors(contextlib.nullcontext()) > 3 * checkpointed  # plain eval(): no checkpointing
