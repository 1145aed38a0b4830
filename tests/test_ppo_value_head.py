"""The value-head model: one forward for logits and values, the reference via disabled
adapters, save/load of adapter + head, 8-bit / 4-bit bases."""

import warnings

import pytest
import torch
from peft import LoraConfig

from ppo_tiny import make_model, make_policy, make_tokenizer
from stackllama.ppo import AutoModelForCausalLMWithValueHead
from ppo_tiny import one_thread  # noqa: F401  (fixture)

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
    from transformers import BitsAndBytesConfig

    from ppo_tiny import make_trainer, rollout, same_weights, trainable_snapshot

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
