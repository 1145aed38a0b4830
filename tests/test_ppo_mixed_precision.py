"""bf16 autocast for the PPO passes (stackllama/ppo/speedups/mixed_precision.py): the CPU speedups
change no result they claim not to change, and leave the model as they found it."""

import pytest
import torch
from ppo_tiny import (
    make_model,
    make_policy,
    make_queries,
    make_tokenizer,
    make_trainer,
    one_thread,  # noqa: F401  (fixture)
)

from stackllama.ppo.rollout_batch import left_pad
from stackllama.ppo.speedups.mixed_precision import FP32_SDPA, Bf16Autocast

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def batch(tok):
    return left_pad(make_queries(tok, 4, seed=7, min_len=2, max_len=9), make_trainer(tokenizer=tok).pad_token_id)


def test_frozen_weights_cast_once_give_bit_identical_outputs(tok):
    policy = make_policy(tok, lora=True)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    ids, mask = batch(tok)
    autocast = Bf16Autocast([policy], "cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = policy(input_ids=ids, attention_mask=mask)
    q_proj = policy.causal_lm.model.layers[0].self_attn.q_proj.base_layer
    weight = q_proj.weight
    seen = []
    hook = q_proj.register_forward_hook(lambda m, i, o: seen.append(m.weight.dtype))
    with torch.no_grad(), autocast._bf16_frozen_weights(), torch.autocast("cpu", dtype=torch.bfloat16):  # the copies only
        got, _ = policy(input_ids=ids, attention_mask=mask)
    hook.remove()
    assert seen == [torch.bfloat16]  # the bf16 copy was in use...
    assert torch.equal(got, expected)  # ...and is exactly what autocast casts to
    assert q_proj.weight is weight and weight.dtype == torch.float32  # the original is back
    copy = autocast._copies[id(weight)][2]
    lora_a = policy.causal_lm.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert id(lora_a.weight) not in autocast._copies  # trainable weights are left to autocast

    with torch.no_grad(), autocast():
        policy(input_ids=ids, attention_mask=mask)
    assert autocast._copies[id(weight)][2] is copy  # made once...
    with torch.no_grad():
        weight.mul_(2.0)
        with autocast():
            changed, _ = policy(input_ids=ids, attention_mask=mask)
    assert autocast._copies[id(weight)][2] is not copy  # ...and re-made after an in-place change
    assert not torch.equal(changed, expected)


def test_attention_runs_in_fp32_and_sdpa_is_restored(tok):
    model = make_model(tok)
    ids, mask = batch(tok)
    assert model.config._attn_implementation == "sdpa"
    autocast = Bf16Autocast([model], "cpu")
    assert autocast.kv_cache_dtype == torch.float32
    during = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a: during.append(m.config._attn_implementation))
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits  # fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(input_ids=ids, attention_mask=mask).logits
    with autocast():
        out = model(input_ids=ids, attention_mask=mask).logits
        out.float().sum().backward()  # gradients flow through the casts
    hook.remove()
    assert during == ["sdpa", "sdpa", FP32_SDPA]
    assert model.config._attn_implementation == "sdpa"
    assert model.model.embed_tokens.weight.grad is not None
    # fp32 attention: no further from the fp32 result than bf16 attention
    assert (out.float() - reference).abs().mean() <= (plain.float() - reference).abs().mean() * 1.05


def test_sampling_with_an_fp32_kv_cache_under_bf16(tok):
    """Sampling under the bf16 context with the cache in fp32 gives the log-probs a full bf16
    pass gives, to bf16 rounding."""
    from stackllama.ppo.speedups import sampling_loop as sampling

    model = make_model(tok)
    ids, mask = batch(tok)
    autocast = Bf16Autocast([model], "cpu")
    torch.manual_seed(0)
    with autocast():
        tokens, logprobs, _ = sampling.sample(model, ids, mask, 5, 1.0, [], tok.pad_token_id, logprob_temperature=1.0,
                                              cache_dtype=autocast.kv_cache_dtype)
        full = torch.cat([ids, tokens], 1)
        logits = model(input_ids=full, attention_mask=torch.cat([mask, torch.ones_like(tokens)], 1),
                       position_ids=(torch.cat([mask, torch.ones_like(tokens)], 1).cumsum(1) - 1).clamp(min=0)).logits
    expected = torch.log_softmax(logits[:, ids.shape[1] - 1 : -1].float(), -1).gather(-1, tokens[..., None])[..., 0]
    assert (logprobs - expected).abs().max() < 0.05


def test_eager_attention_and_non_cpu_devices_are_left_alone(tok):
    model = make_model(tok)
    model.config._attn_implementation = "eager"
    ids, mask = batch(tok)
    during = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a: during.append(m.config._attn_implementation))
    with torch.no_grad(), Bf16Autocast([model], "cpu")():
        model(input_ids=ids, attention_mask=mask)
    hook.remove()
    assert during == ["eager"]
    gpu_like = Bf16Autocast([model], "cpu", cpu_speedups=False)  # as on a GPU or under DeepSpeed
    with torch.no_grad(), gpu_like():
        model(input_ids=ids, attention_mask=mask)
    assert gpu_like._copies == {}


def test_reference_model_without_lora_gets_the_copies(tok):
    """Without LoRA the policy is trainable (autocast caches its casts) and the frozen
    reference copy gets the bf16 weights."""
    trainer = make_trainer(tokenizer=tok, lora=False, bf16_autocast=True, ppo_epochs=1)
    queries = make_queries(tok, 4)
    responses = trainer.generate(queries, return_prompt=False, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=4)
    trainer.step(queries, responses, [torch.tensor(1.0)] * 4)
    copied = set(trainer.precision.autocast._copies)  # ids of the weights with a bf16 copy
    assert copied and copied <= {id(p) for p in trainer.ref_model.parameters()}
