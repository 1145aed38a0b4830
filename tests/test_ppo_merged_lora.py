"""LoRA folded into temporary weights while sampling (stackllama/ppo/speedups/merged_lora.py): the
same function without the adapter path, and the base weights untouched afterwards."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from ppo_tiny import (
    make_model,
    make_tokenizer,
    make_trainer,
    one_thread,  # noqa: F401  (fixture)
    rollout,
)

from stackllama.ppo.rollout_batch import RolloutBatch
from stackllama.ppo.speedups.merged_lora import _mergeable, merged_lora
from stackllama.ppo.speedups.mixed_precision import Bf16Autocast

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_lora_model(**lora_kwargs):
    model = make_model(make_tokenizer(), layers=2)
    config = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, LoraConfig(**{**config, **lora_kwargs})).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: give the adapters something to add
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return model


def adapter_calls(model):
    calls = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


def test_same_outputs_without_the_adapter_path_and_the_weights_untouched():
    model = trained_lora_model()
    ids = torch.randint(4, 30, (3, 10))
    bases = {n: m.base_layer for n, m in model.named_modules() if hasattr(m, "base_layer") and "lora" not in n.split(".")[-1]}
    weights = {n: (b.weight, b.weight.detach().clone()) for n, b in bases.items()}
    calls = adapter_calls(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert len(calls) == 4  # q and v in 2 layers
        with merged_lora(model) as n:
            merged = model(input_ids=ids).logits
        assert n == 4 and len(calls) == 4  # no adapter ran inside the context
        after = model(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, expected)
    for name, (param, value) in weights.items():
        assert bases[name].weight is param and torch.equal(param, value), name  # the same tensor, unchanged
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_layers_that_keep_their_adapter_path():
    dora = trained_lora_model(use_dora=True)
    assert not any(_mergeable(m) for m in dora.modules())
    plain = trained_lora_model()
    with plain.disable_adapter():
        assert not any(_mergeable(m) for m in plain.modules())
    assert sum(bool(_mergeable(m)) for m in plain.modules()) == 4
    plain.train()  # LoRA dropout 0.1 active: the adapter path is not W + sBA
    assert not any(_mergeable(m) for m in plain.modules())
    with merged_lora(plain, enabled=False) as n:
        assert n == 0


def test_bf16_copies_follow_the_swapped_weights():
    """Bf16Autocast's cast-once copies are per weight tensor: the merged weights get their
    own, and afterwards the original weights' copies are used again (not stale merged ones)."""
    model = trained_lora_model()
    with torch.no_grad():  # each base weight at tensor version 1, as a merged weight's (clone, += delta)
        for module in model.modules():
            if hasattr(module, "base_layer"):
                module.base_layer.weight = torch.nn.Parameter(module.base_layer.weight.detach().clone(), requires_grad=False)
                module.base_layer.weight.add_(0.0)
    autocast = Bf16Autocast([model], "cpu")
    ids = torch.randint(4, 30, (2, 8))
    with torch.no_grad():
        fp32 = model(input_ids=ids).logits
        with autocast():
            before = model(input_ids=ids).logits
            with model.disable_adapter():
                base_only = model(input_ids=ids).logits
        with merged_lora(model), autocast():
            merged = model(input_ids=ids).logits
        with autocast():
            after = model(input_ids=ids).logits
    assert torch.equal(after, before)
    # the adapters are in the merged bf16 pass (a stale copy of W would give base_only)
    off = lambda x: (x - fp32).abs().max().item()  # noqa: E731
    assert off(merged) < off(base_only) / 5 and off(before) < off(base_only) / 5, (off(merged), off(before), off(base_only))


def test_trainer_samples_merged_and_the_reference_stays_put():
    """Over PPO steps with merged sampling, the reference (adapters off) is bitwise the same
    function, and the log-probs taken from sampling match a recomputed pass."""
    trainer = make_trainer(ppo_epochs=1)
    assert trainer.config.merge_lora_for_sampling and trainer.speedups.reuse_logprobs
    model = trainer.unwrapped_model
    probe = torch.randint(4, 30, (2, 7))
    with torch.no_grad(), model.disable_adapter():
        ref_before = model.causal_lm(input_ids=probe).logits
    calls = adapter_calls(model)
    for step in range(2):
        queries, responses = rollout(trainer, seed=step)
        assert not calls  # sampling ran without the adapter path
        cached = [lp for lp, _ in responses.old]
        batch = RolloutBatch.build(queries, responses, trainer.pad_token_id)
        recomputed, *_ = trainer.passes.rollout_pass(batch, 1.0)
        for i, lp in enumerate(cached):
            torch.testing.assert_close(lp, recomputed[i, : len(lp)], rtol=1e-4, atol=1e-5)
        trainer.step(queries, responses, [torch.tensor(1.0)] * len(queries))
        calls.clear()
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model.causal_lm(input_ids=probe).logits, ref_before)
