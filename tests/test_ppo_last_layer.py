"""The last decoder layer's MLP runs only at the positions that are read
(stackllama/ppo/speedups/last_layer.py): same outputs there, same gradients, less work."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from ppo_tiny import (
    make_model,
    make_tokenizer,
    one_thread,  # noqa: F401  (fixture)
)

from stackllama.ppo.speedups.last_layer import last_layer_from, last_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_model(seed=0):
    model = make_model(make_tokenizer(), seed=seed, layers=3)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, lora).train()


def rows_seen(mlp):
    """Records the number of positions (dim 1) of each input the MLP gets."""
    seen = []
    mlp.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    return seen


def forward_backward(model, ids, mask, start, skip):
    model.zero_grad(set_to_none=True)
    decoder = model.get_base_model().get_decoder()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if skip:
        with last_layer_from(decoder, start):
            hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    read = hidden[:, start:]
    (read.square().sum() + model.get_base_model().lm_head(read).logsumexp(-1).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return read.detach(), hidden.detach(), grads


def test_same_outputs_and_gradients_at_the_read_positions_with_less_mlp_work():
    model = lora_model()
    ids = torch.randint(4, 30, (3, 14))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    seen = rows_seen(last_mlp(model.get_base_model().get_decoder()))

    read_full, hidden_full, grads_full = forward_backward(model, ids, mask, start=9, skip=False)
    assert seen == [14]
    read, hidden, grads = forward_backward(model, ids, mask, start=9, skip=True)
    assert seen == [14, 5]  # the last MLP ran on positions 9..13 only

    torch.testing.assert_close(read, read_full, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_full.keys() and len(grads) == 12  # q/v A/B in each of the 3 layers
    for name in grads:
        torch.testing.assert_close(grads[name], grads_full[name], rtol=1e-4, atol=1e-6)
    # the positions before `start` are not the model's: reading them would be wrong
    assert (hidden[:, :9] - hidden_full[:, :9]).abs().max() > 1e-2


def test_the_hooks_are_gone_after_the_context():
    model = lora_model()
    decoder = model.get_base_model().get_decoder()
    seen = rows_seen(last_mlp(decoder))
    ids = torch.randint(4, 30, (2, 8))
    with torch.no_grad():
        with last_layer_from(decoder, 6):
            decoder(input_ids=ids)
        decoder(input_ids=ids)
    assert seen == [2, 8]


def test_gradient_checkpointing_runs_the_whole_layer():
    """With gradient checkpointing the backward re-runs the layer after the context ended:
    the MLP must then see the same shapes, so nothing is cut."""
    model = lora_model()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decoder = model.get_base_model().get_decoder()
    assert last_mlp(decoder) is None
    ids = torch.randint(4, 30, (2, 10))
    read, _, grads = forward_backward(model, ids, torch.ones_like(ids), start=6, skip=True)
    model.get_base_model().gradient_checkpointing_disable()
    read_ref, _, grads_ref = forward_backward(model, ids, torch.ones_like(ids), start=6, skip=False)
    torch.testing.assert_close(read, read_ref)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name])


def test_other_layouts():
    """GPT-2 (``h`` blocks with ``attn``/``mlp``) and a Mixture-of-Experts block are cut the
    same way; a decoder without the usual layer layout is left alone."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        MixtralConfig,
        MixtralForCausalLM,
    )

    torch.manual_seed(0)
    models = [
        GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1)),
        MixtralForCausalLM(MixtralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                         num_experts_per_tok=2)),
    ]
    ids = torch.randint(2, 40, (2, 11))
    for model in models:
        decoder = model.eval().get_decoder()
        seen = rows_seen(last_mlp(decoder))
        with torch.no_grad():
            full = decoder(input_ids=ids).last_hidden_state
            with last_layer_from(decoder, 7):
                cut = decoder(input_ids=ids).last_hidden_state
        assert seen == [11, 4], type(model).__name__
        torch.testing.assert_close(cut[:, 7:], full[:, 7:], rtol=1e-5, atol=1e-5)

    class NotADecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    assert last_mlp(NotADecoder()) is None
    with last_layer_from(NotADecoder(), 3):  # a no-op, not an error
        pass
