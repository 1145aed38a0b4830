"""The PPO trainer's own sampling loop (stackllama/ppo/speedups/sampling_loop.py): when it is used, that it
samples what transformers' generate samples, and how rows end."""

import pytest
import torch
from ppo_tiny import (
    make_model,
    make_queries,
    make_tokenizer,
    make_trainer,
    one_thread,  # noqa: F401  (fixture)
)

from stackllama.ppo.rollout_batch import left_pad
from stackllama.ppo.speedups import sampling_loop as sampling

pytestmark = pytest.mark.usefixtures("one_thread")

PURE = dict(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=4)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_draw_follows_the_probabilities_and_never_draws_zero_probability():
    torch.manual_seed(0)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]]).repeat(40000, 1)
    counts = torch.bincount(sampling.draw(probs), minlength=5).float() / 40000
    torch.testing.assert_close(counts, probs[0], atol=0.01, rtol=0)
    assert counts[1] == 0 and counts[4] == 0
    # unnormalised rows (as after rounding) and a single certain token
    assert sampling.draw(torch.tensor([[0.0, 0.0, 2.0]] * 100)).eq(2).all()


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (PURE, None),
        (dict(PURE, temperature=0.7), None),
        (dict(PURE, top_k=50), "top_k=50"),
        ({k: v for k, v in PURE.items() if k != "top_k"}, "top_k=50"),  # transformers' default
        (dict(PURE, top_p=0.9), "top_p=0.9"),
        (dict(PURE, do_sample=False), "do_sample is off"),
        (dict(PURE, temperature=0.0), "temperature=0.0"),
        (dict(PURE, min_new_tokens=2), "min_new_tokens"),
        (dict(PURE, repetition_penalty=1.2), "repetition_penalty"),
        (dict(PURE, num_beams=2), "num_beams"),
        (dict(PURE, synced_gpus=True), "synced_gpus"),
        ({k: v for k, v in PURE.items() if k != "max_new_tokens"}, "no max_new_tokens"),
    ],
)
def test_loop_only_for_pure_sampling(tok, kwargs, reason):
    got = sampling.unsupported_reason(make_model(tok), dict(kwargs, pad_token_id=tok.pad_token_id))
    assert (got is None) if reason is None else (reason in got)


def test_loop_not_for_sliding_window_or_softcapped_models(tok):
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, sliding_window=4))
    assert "sliding-window" in sampling.unsupported_reason(mistral, dict(PURE))
    llama = make_model(tok)
    llama.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in sampling.unsupported_reason(llama, dict(PURE))


def test_trainer_falls_back_to_generate_and_logs_why(tok, caplog):
    trainer = make_trainer(tokenizer=tok)
    model = trainer.unwrapped_model
    calls = []
    original = model.pretrained_model.generate
    model.pretrained_model.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    queries = make_queries(tok, 4)
    trainer.generate(queries, return_prompt=False, **PURE)
    assert calls == []
    with caplog.at_level("INFO", logger="stackllama.ppo"):
        out = trainer.generate(queries, return_prompt=False, **dict(PURE, top_k=5))
        trainer.generate(queries, return_prompt=False, **dict(PURE, top_k=5))
    assert calls == [1, 1] and all(1 <= len(r) <= 4 for r in out)
    assert [r.getMessage() for r in caplog.records].count(
        "sampling with transformers' generate (the PPO sampling loop does not handle top_k=5)") == 1


def test_temperature_is_used_for_drawing(tok):
    """At a tiny temperature sampling is greedy: the draws are the argmax of the logits."""
    model = make_model(tok)
    queries = make_queries(tok, 6, seed=2)
    trainer = make_trainer(tokenizer=tok)
    ids, mask = left_pad(queries, trainer.pad_token_id)
    tokens, _, _ = sampling.sample(model, ids, mask, 5, temperature=1e-4, eos_token_ids=[], pad_token_id=tok.pad_token_id)
    greedy = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5, pad_token_id=tok.pad_token_id,
                            eos_token_id=None)
    assert torch.equal(tokens, greedy[:, ids.shape[1]:])


def test_outputs_can_enter_autograd(tok):
    """The loop runs under inference_mode; what it returns must still be usable where
    autograd saves tensors for the backward (tokens as gather indices, log-probs, hidden)."""
    model = make_model(tok)
    trainer = make_trainer(tokenizer=tok)
    ids, mask = left_pad(make_queries(tok, 3, seed=4), trainer.pad_token_id)
    tokens, logprobs, hidden = sampling.sample(model, ids, mask, 4, 1.0, [], tok.pad_token_id, logprob_temperature=1.0)
    assert not any(t.is_inference() for t in (tokens, logprobs, hidden))
    w = torch.ones(hidden.shape[-1], len(tok), requires_grad=True)
    loss = ((hidden @ w).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1) * logprobs).sum()
    loss.backward()  # raises for inference tensors ("cannot be saved for backward")
    assert w.grad is not None


def test_rows_are_padded_after_eos_and_the_loop_stops_when_all_ended(tok):
    model = make_model(tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def likelier_eos(module, args, logits):  # p(EOS) about 0.4 at every token
        logits[..., eos] += 3.0
        return logits

    ids, mask = left_pad(make_queries(tok, 64, seed=4), make_trainer(tokenizer=tok).pad_token_id)
    calls = []
    hooks = [model.lm_head.register_forward_hook(likelier_eos),
             model.model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)]
    torch.manual_seed(0)
    tokens, _, _ = sampling.sample(model, ids, mask, 50, 1.0, [eos], pad)
    for h in hooks:
        h.remove()
    ended = tokens == eos
    assert ended.any(dim=1).all()
    first = ended.float().argmax(dim=1)
    for row, f in zip(tokens, first.tolist()):
        assert (row[f + 1 :] == pad).all()  # padded after its first EOS
    assert tokens.shape[1] == int(first.max()) + 1 < 50  # the loop stopped at the last row's EOS
    assert len(calls) == tokens.shape[1]  # the prompt pass, then one pass per further token


def test_same_distribution_as_generate_for_a_left_padded_row(tok):
    """The marginal of the second sampled token after a left-padded and an unpadded prompt,
    from the loop and from transformers' generate, 4000 draws each: the same distribution.
    The LM head is sharpened so that the temperature matters: with temperature 1 instead
    of 0.8 the distance is about 0.12; two runs of generate differ by about 0.03."""
    model = make_model(tok, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    trainer = make_trainer(tokenizer=tok)
    short, long = torch.tensor([5, 6]), torch.tensor([7, 8, 9, 10, 11, 12])
    ids, mask = left_pad([short, long] * 4000, trainer.pad_token_id)
    torch.manual_seed(1)
    ours, _, _ = sampling.sample(model, ids, mask, 2, 0.8, [], tok.pad_token_id)
    torch.manual_seed(2)
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=0.8,
                            max_new_tokens=2, pad_token_id=tok.pad_token_id, eos_token_id=None)[:, ids.shape[1]:]
    V = len(tok)
    for row in (0, 1):
        p = torch.bincount(ours[row::2, 1], minlength=V).float() / 4000
        q = torch.bincount(theirs[row::2, 1], minlength=V).float() / 4000
        assert 0.5 * (p - q).abs().sum() < 0.07


def test_preallocated_cache_layer_returns_what_dynamic_layer_returns():
    from transformers.cache_utils import DynamicLayer

    ours, theirs, fp32 = sampling.PreallocatedLayer(9), DynamicLayer(), sampling.PreallocatedLayer(9, torch.float32)
    torch.manual_seed(0)
    for n in (5, 1, 1, 2):
        k, v = torch.randn(2, 3, n, 4, dtype=torch.bfloat16), torch.randn(2, 3, n, 4, dtype=torch.bfloat16)
        got, want, wide = ours.update(k, v), theirs.update(k, v), fp32.update(k, v)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert wide[0].dtype == torch.float32 and torch.equal(wide[0], want[0].float())
    assert ours.get_seq_length() == theirs.get_seq_length() == 9
