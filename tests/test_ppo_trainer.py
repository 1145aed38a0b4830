"""PPOTrainer: TRL-0.11 numerics of the rollout layout, the fixes behind their options,
and the guards."""

import copy
import json
import logging
import math
import warnings

import pytest
import torch
from ppo_tiny import (
    make_model,
    make_policy,
    make_queries,
    make_tokenizer,
    make_trainer,
    one_thread,  # noqa: F401  (fixture)
    rollout,
    same_weights,
    trainable_snapshot,
)

from stackllama.ppo import (
    AutoModelForCausalLMWithValueHead,
    LengthSampler,
    NonFiniteError,
    PPOConfig,
    PPOTrainer,
)
from stackllama.ppo.generation import Responses
from stackllama.ppo.guards import degenerate_mask
from stackllama.ppo.optim import AdamTFStyle
from stackllama.ppo.rollout_batch import RolloutBatch

pytestmark = pytest.mark.usefixtures("one_thread")

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ones(n, v=1.0):
    return [torch.tensor(v)] * n


# ------------------------------------------------------------------------------ rollout
def test_rollout_logprobs_values_match_trl_layout(tok):
    """Per-sample, unpadded forward (TRL: logp_t = log_softmax(logits[:, :-1]) at ids[:, 1:],
    positions len(q)-1 ... len(q)-1+len(r)) equals the trainer's batched, padded one."""
    trainer = make_trainer(tokenizer=tok, lora=True)
    model = trainer.unwrapped_model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    queries = make_queries(tok, 3, seed=1)
    responses = [torch.tensor([5, 6, 7, 8]), torch.tensor([9]), torch.tensor([10, 11, tok.eos_token_id])]
    batch = RolloutBatch.build(queries, responses, trainer.pad_token_id)
    logprobs, values, ref_logprobs, kl = trainer.passes.rollout_pass(batch, 1.0)
    model.eval()
    for i, (q, r) in enumerate(zip(queries, responses)):
        ids = torch.cat([q, r])[None]
        with torch.no_grad():
            logits, v = model(input_ids=ids)
            with model.disable_adapter():
                ref_logits, _ = model(input_ids=ids)
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[0, :, 0]
        rlp = torch.log_softmax(ref_logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[0, :, 0]
        s = slice(len(q) - 1, len(q) - 1 + len(r))
        torch.testing.assert_close(logprobs[i, : len(r)], lp[s], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref_logprobs[i, : len(r)], rlp[s], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[i, : len(r)], v[0, s], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kl[i, : len(r)], lp[s] - rlp[s], atol=1e-5, rtol=1e-5)
        assert (logprobs[i, len(r) :] == 0).all() and (batch.mask[i, len(r) :] == 0).all()


def test_rollout_chunks_do_not_change_the_rollout(tok):
    """The no-grad passes run in chunks of ``rollout_chunk_size`` (default 8, at least a
    minibatch, at most the batch): one sequence per pass or all together, the same numbers."""
    from stackllama.ppo import PPOConfig

    assert PPOConfig(batch_size=64, mini_batch_size=2).rollout_chunk_size == 8
    assert PPOConfig(batch_size=64, mini_batch_size=16).rollout_chunk_size == 16
    assert PPOConfig(batch_size=4, mini_batch_size=2).rollout_chunk_size == 4
    assert PPOConfig(batch_size=64, mini_batch_size=2, rollout_batch_size=3).rollout_chunk_size == 3
    results = []
    for chunk in (1, None):
        trainer = make_trainer(tokenizer=tok, lora=True, rollout_batch_size=chunk)
        with torch.no_grad():
            for n, p in trainer.unwrapped_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
        queries = make_queries(tok, 4, seed=3)
        responses = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([10, 11]), torch.tensor([12, 13, 14, 15])]
        results.append(trainer.passes.rollout_pass(RolloutBatch.build(queries, responses, trainer.pad_token_id), 1.0))
    for one_by_one, together in zip(*results):
        torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)


def test_position_ids_ignore_left_padding_absolute_positions(tok):
    """GPT-2 has absolute positions: with the fix, a row's log-probs do not depend on how
    much left padding its batch needs; with TRL's arange positions they do."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def logp(fix):
        torch.manual_seed(0)
        gpt = GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
        )
        trainer = make_trainer(tokenizer=tok, policy=AutoModelForCausalLMWithValueHead(gpt, value_head_dropout=0.0), position_ids_from_attention_mask=fix)
        short, long = torch.tensor([5, 6]), torch.tensor([5, 6, 7, 8, 9, 10, 11])
        resp = [torch.tensor([12, 13]), torch.tensor([12, 13])]
        alone = trainer.passes.rollout_pass(RolloutBatch.build([short], resp[:1], trainer.pad_token_id), 1.0)[0][0]
        padded = trainer.passes.rollout_pass(RolloutBatch.build([short, long], resp, trainer.pad_token_id), 1.0)[0][0]
        return alone, padded

    alone, padded = logp(True)
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)
    alone, padded = logp(False)
    assert (alone - padded).abs().max() > 1e-3


def test_generate_left_pads_truncates_and_returns_prompt(tok):
    trainer = make_trainer(tokenizer=tok)
    queries = make_queries(tok, 5, seed=3)
    out = trainer.generate(queries, return_prompt=True, batch_size=2, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=5)
    assert len(out) == 5
    for q, o in zip(queries, out):
        assert torch.equal(o[: len(q)], q)
        r = o[len(q) :]
        assert 1 <= len(r) <= 5
        eos = (r == tok.eos_token_id).nonzero()
        if len(eos):  # cut right after the first EOS, EOS kept
            assert eos[0, 0] == len(r) - 1
    single = trainer.generate(queries[0], return_prompt=False, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=3)
    assert single.dim() == 1 and len(single) <= 3
    sampler = LengthSampler(2, 4)
    outs = trainer.generate(queries, return_prompt=False, length_sampler=sampler, do_sample=True, top_k=0, top_p=1.0)
    assert all(len(r) <= 3 for r in outs)


def test_truncation_after_first_stop_token_and_missing_eos_penalty(tok):
    dot = tok.convert_tokens_to_ids(".")
    eos = tok.eos_token_id
    trainer = make_trainer(tokenizer=tok, stop_token_ids=[dot], stop_after=2, missing_eos_penalty=1.0)
    gen = torch.tensor(
        [
            [5, dot, 6, dot, 7, 8],  # "." at 1 ignored (before stop_after), cut after the one at 3
            [5, 6, eos, 0, 0, 0],  # EOS always counts
            [5, 6, 7, 8, 9, 10],  # never stops
        ]
    )
    cut = trainer.stops.truncate(gen)
    assert [c.tolist() for c in cut] == [[5, dot, 6, dot], [5, 6, eos], [5, 6, 7, 8, 9, 10]]
    assert trainer.stops.ended(cut).tolist() == [True, True, False]
    queries = make_queries(tok, 3)
    stats = trainer.step(queries, cut, [torch.tensor(2.0)] * 3)
    assert stats["env/missing_eos_share"] == pytest.approx(1 / 3)
    assert stats["ppo/mean_raw_scores"] == pytest.approx(2.0)
    assert stats["ppo/mean_scores"] == pytest.approx(2.0 - 1 / 3)


def test_temperature_used_in_logprobs(tok):
    trainer = make_trainer(tokenizer=tok)
    queries, responses = rollout(trainer, temperature=0.5)
    assert trainer.logprob_temperature() == 0.5
    batch = RolloutBatch.build(queries, responses, trainer.pad_token_id)
    lp = trainer.passes.rollout_pass(batch, trainer.logprob_temperature())[0]
    model = trainer.unwrapped_model.eval()
    q, r = queries[0], responses[0]
    ids = torch.cat([q, r])[None]
    with torch.no_grad():
        logits = model(input_ids=ids)[0][0, len(q) - 1 : -1]
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, r[:, None])[:, 0]
    torch.testing.assert_close(lp[0, : len(r)], expected, atol=1e-5, rtol=1e-5)
    off = make_trainer(tokenizer=tok, scale_logits_by_temperature=False)
    rollout(off, temperature=0.5)
    assert off.logprob_temperature() == 1.0
    fixed = make_trainer(tokenizer=tok, temperature=0.7)
    assert fixed.logprob_temperature() == 0.7


def test_rollout_passes_always_run_with_dropout_off_and_sampling_by_option(tok):
    """TRL 0.11's rollout passes ran in eval mode (``batched_forward_pass`` calls ``model.eval()``)
    and so do these, whatever the option; ``rollout_in_eval_mode`` is about sampling, which TRL
    did in train mode after the first update (False reproduces that)."""
    def run(eval_mode):
        policy = make_policy(tok, lora=True, lora_dropout=0.5, value_head_dropout=0.5)
        trainer = make_trainer(tokenizer=tok, policy=policy, rollout_in_eval_mode=eval_mode)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.5)
        seen = {"sampling": [], "rollout": []}
        phase = ["sampling"]
        hook = policy.causal_lm.model.layers[0].register_forward_pre_hook(
            lambda m, a: seen[phase[0]].append(policy.pretrained_model.training))
        policy.train()  # as after an update
        queries, responses = rollout(trainer)
        phase[0] = "rollout"
        batch = RolloutBatch.build(queries, responses, trainer.pad_token_id)
        a = trainer.passes.rollout_pass(batch, 1.0)
        b = trainer.passes.rollout_pass(batch, 1.0)
        hook.remove()
        return a, b, seen, policy.training

    for eval_mode in (True, False):
        a, b, seen, still_training = run(eval_mode)
        assert seen["sampling"] and all(t != eval_mode for t in seen["sampling"])  # False: dropout on, as TRL
        assert seen["rollout"] and not any(seen["rollout"])
        assert still_training  # each pass restores the mode it found
        for x, y in zip(a, b):  # no dropout noise: the same numbers twice
            assert torch.equal(x, y)


def test_recipe_dropouts_with_learning_rate_zero_leave_ratio_one(tok):
    """The recipe's dropouts (LoRA 0.05, value head 0.1) and a learning rate of 0: the weights
    never move, so the update passes must compute exactly ``log pi_old`` and ``V_old``: ratio 1,
    approxkl 0, no policy or value clipping (TRL 0.11 ran its update passes in eval mode).
    ``dropout_in_updates`` turns dropout on there, and then the same step clips values."""
    def step(**overrides):
        policy = make_policy(tok, lora=True, lora_dropout=0.05, value_head_dropout=0.1)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.3)  # policy != reference
        trainer = make_trainer(tokenizer=tok, policy=policy, learning_rate=0.0, batch_size=8, mini_batch_size=2,
                               ppo_epochs=2, **overrides)
        queries, responses = rollout(trainer, n=8, max_new_tokens=8)
        snap = trainable_snapshot(trainer)
        stats = trainer.step(queries, responses, [torch.tensor(float(i)) for i in range(8)])
        assert same_weights(trainer, snap)
        return stats

    exact = step(reuse_generation_logprobs=False)  # log pi_old from a rollout pass: the same computation
    assert exact["ppo/policy/ratio_mean"] == 1.0 and exact["ppo/policy/approxkl"] == 0.0
    assert exact["ppo/policy/policykl"] == 0.0
    assert exact["ppo/policy/clipfrac"] == 0.0 and exact["ppo/val/clipfrac"] == 0.0
    reused = step()  # log pi_old from the sampling passes (fp32): equal to float rounding
    assert reused["ppo/policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert reused["ppo/policy/approxkl"] < 1e-12
    assert reused["ppo/policy/clipfrac"] == 0.0 and reused["ppo/val/clipfrac"] == 0.0
    noisy = step(dropout_in_updates=True, reuse_generation_logprobs=False)
    assert noisy["ppo/val/clipfrac"] > 0.01 and noisy["ppo/policy/approxkl"] > 1e-5


@pytest.mark.parametrize("reuse", [True, False])
def test_forward_pass_count(tok, reuse):
    """Rollout: one reference pass per chunk, plus one policy pass per chunk unless the
    policy's log-probs/values come from generate; updates: one pass per minibatch."""
    trainer = make_trainer(tokenizer=tok, batch_size=4, mini_batch_size=2, ppo_epochs=3, reuse_generation_logprobs=reuse,
                           rollout_batch_size=2)  # 2 chunks
    queries, responses = rollout(trainer)
    calls = []
    hook = trainer.unwrapped_model.causal_lm.model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    trainer.step(queries, responses, ones(4))
    assert len(calls) == (2 if reuse else 4) + 3 * 2
    calls.clear()
    trainer.step(queries, responses, ones(4))  # weights changed since generate: recomputed
    hook.remove()
    assert len(calls) == 4 + 3 * 2


@pytest.mark.parametrize("fast_sampling", [True, False])
def test_generation_logprobs_match_recomputed_pass(tok, fast_sampling):
    """The log-probs/values taken from the sampling passes (the trainer's loop, or
    generate's own forwards) equal a fresh no-grad pass over the padded batch to float
    tolerance: the same positions, masks and temperature."""
    policy = make_policy(tok, lora=True, lora_dropout=0.3, value_head_dropout=0.3)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    trainer = make_trainer(tokenizer=tok, policy=policy, batch_size=6, fast_sampling=fast_sampling)
    calls = []
    policy.pretrained_model.generate = lambda *a, _g=policy.pretrained_model.generate, **k: calls.append(1) or _g(*a, **k)
    policy.train()
    queries = make_queries(tok, 6, seed=11, min_len=1, max_len=7)
    responses = trainer.generate(queries, return_prompt=False, batch_size=4, do_sample=True, top_k=0, top_p=1.0, temperature=0.7, max_new_tokens=7)
    cached = responses.old  # what generate returned with the responses
    assert cached is not None
    batch = RolloutBatch.build(queries, responses, trainer.pad_token_id)
    lp, v, _, _ = trainer.passes.rollout_pass(batch, 0.7)
    lp_c, v_c, _, _ = trainer.passes.rollout_pass(batch, 0.7, cached)
    torch.testing.assert_close(lp_c, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_c, v, atol=1e-5, rtol=1e-5)
    # What step reuses is what it is given: the responses generate returned, before any update since
    given = []
    rollout_pass = trainer.passes.rollout_pass
    trainer.passes.rollout_pass = lambda batch, t, old=None: given.append(old is not None) or rollout_pass(batch, t, old)
    scores = [torch.tensor(1.0)] * len(responses)
    trainer.step(queries, responses, scores)
    trainer.step(queries, responses, scores)  # the weights moved: recomputed
    trainer.step(queries, [r.flip(0) for r in responses], scores)  # not generate's output: recomputed
    assert given == [True, False, False]
    with_prompt = trainer.generate(queries, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=3)
    assert not isinstance(with_prompt, Responses)  # prompt + response: not what step scores
    assert bool(calls) != fast_sampling  # transformers' generate only when the loop is off


# ------------------------------------------------------------------------------ step
def test_step_stats_and_zero_kl_at_start(tok):
    trainer = make_trainer(tokenizer=tok, batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=2)
    queries, responses = rollout(trainer)
    snap = trainable_snapshot(trainer)
    stats = trainer.step(queries, responses, [torch.tensor(x) for x in (1.0, -1.0, 0.5, 0.0)])
    # LoRA B = 0: policy == reference; log pi_old comes from generate's KV-cached passes
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert stats["ppo/optimizer_steps"] == 2  # 2 epochs x 1 window of 2 accumulated minibatches
    assert stats["ppo/epochs_run"] == 2
    assert stats["ppo/mean_scores"] == pytest.approx(0.125)
    for key in ("ppo/loss/policy", "ppo/loss/value", "ppo/policy/entropy", "ppo/policy/approxkl", "ppo/policy/clipfrac",
                "ppo/val/var_explained", "objective/kl_coef", "env/degenerate_share", "time/ppo/total"):
        assert math.isfinite(stats[key]), key
    assert stats["objective/kl_coef"] == 0.2
    assert trainer.kl_ctl.value == pytest.approx(0.2 * (1 - 0.2 * 4 / 10000))
    assert not same_weights(trainer, snap)
    stats = trainer.step(queries, responses, ones(4))
    assert stats["objective/kl"] != 0.0


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "full"])
def test_kl_penalty_kinds_run(tok, kind):
    trainer = make_trainer(tokenizer=tok, kl_penalty=kind, ppo_epochs=1)
    queries, responses = rollout(trainer)
    trainer.step(queries, responses, ones(4))
    stats = trainer.step(queries, responses, ones(4))
    assert math.isfinite(stats["objective/kl"])
    if kind != "kl":
        assert stats["objective/kl"] >= 0


def test_score_scaling_norm_clip_and_whiten_rewards(tok):
    scores = [torch.tensor(x) for x in (1.0, 2.0, 3.0, 6.0)]
    trainer = make_trainer(tokenizer=tok, use_score_scaling=True, use_score_norm=True, ppo_epochs=1)
    queries, responses = rollout(trainer)
    stats = trainer.step(queries, responses, scores)
    assert stats["ppo/mean_scores"] == pytest.approx(0.0, abs=1e-6)
    assert stats["ppo/std_scores"] == pytest.approx(1.0, abs=1e-5)
    trainer = make_trainer(tokenizer=tok, use_score_scaling=True, ppo_epochs=1)
    stats = trainer.step(queries, responses, scores)
    assert stats["ppo/mean_scores"] == pytest.approx(3.0 / torch.tensor([1.0, 2, 3, 6]).std().item(), rel=1e-5)
    trainer = make_trainer(tokenizer=tok, score_clip=2.5, ppo_epochs=1)
    stats = trainer.step(queries, responses, scores)
    assert stats["ppo/mean_scores"] == pytest.approx((1 + 2 + 2.5 + 2.5) / 4)


def test_whiten_rewards_scales_the_per_token_rewards_to_unit_variance(tok, monkeypatch):
    """``whiten_rewards`` (TRL's, scale only): the per-token rewards GAE receives have a masked
    variance of 1 (Bessel) and keep their mean; the scores themselves are not touched."""
    from stackllama.ppo import core

    seen = []
    gae = core.gae
    monkeypatch.setattr(core, "gae", lambda rewards, values, mask, *a: seen.append((rewards, mask)) or gae(rewards, values, mask, *a))
    scores = [torch.tensor(x) for x in (1.0, 2.0, 3.0, 6.0)]
    policy = make_policy(tok)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)  # a KL penalty at every token, not only the scores
    queries = make_queries(tok, 4)
    responses = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10]), torch.tensor([11, 12, 13]), torch.tensor([14])]
    plain, whitened = {}, {}
    for whiten, out in ((False, plain), (True, whitened)):
        trainer = make_trainer(tokenizer=tok, policy=copy.deepcopy(policy), whiten_rewards=whiten, ppo_epochs=1)
        out["stats"] = trainer.step(queries, responses, scores)
        out["rewards"], out["mask"] = seen.pop()
    mask = whitened["mask"]
    assert core.masked_var(plain["rewards"], mask).item() > 2  # the scores 1..6 dominate
    assert core.masked_var(whitened["rewards"], mask).item() == pytest.approx(1.0, rel=1e-5)
    assert core.masked_mean(whitened["rewards"], mask).item() == pytest.approx(
        core.masked_mean(plain["rewards"], mask).item(), rel=1e-5)
    assert whitened["stats"]["ppo/mean_scores"] == plain["stats"]["ppo/mean_scores"] == 3.0
    assert whitened["stats"]["ppo/returns/mean"] != pytest.approx(plain["stats"]["ppo/returns/mean"], rel=1e-3)


def test_early_stopping_on_policy_kl(tok):
    trainer = make_trainer(tokenizer=tok, early_stopping=True, target_kl=-10.0, ppo_epochs=4)  # always exceeded
    queries, responses = rollout(trainer)
    assert trainer.step(queries, responses, ones(4))["ppo/epochs_run"] == 1
    trainer = make_trainer(tokenizer=tok, early_stopping=True, target_kl=1e6, ppo_epochs=4)
    assert trainer.step(queries, responses, ones(4))["ppo/epochs_run"] == 4


def test_ratio_threshold_skip_does_not_move_weights(tok):
    for skips in (True, False):
        trainer = make_trainer(tokenizer=tok, ratio_threshold_skips_step=skips, ppo_epochs=1)
        queries, responses = rollout(trainer)
        trainer.step(queries, responses, [torch.tensor(x) for x in (1.0, -1.0, 0.5, 0.0)])  # builds Adam momentum
        trainer.config.ratio_threshold = 0.0  # every minibatch now exceeds it
        snap = trainable_snapshot(trainer)
        with pytest.warns(UserWarning, match="ratio_threshold"):
            stats = trainer.step(queries, responses, ones(4))
        assert stats["ppo/skipped_minibatches"] == 2
        if skips:
            assert stats["ppo/optimizer_steps"] == 0
            assert same_weights(trainer, snap)
        else:  # TRL 0.11: zeroed loss, but Adam stepped on its momentum
            assert not same_weights(trainer, snap)


def test_learning_rate_linear_annealing(tok):
    trainer = make_trainer(tokenizer=tok, lr_schedule="linear", steps=4, learning_rate=1e-3, ppo_epochs=1)
    queries, responses = rollout(trainer)
    lrs = [trainer.step(queries, responses, ones(4))["ppo/learning_rate"] for _ in range(3)]
    assert lrs == pytest.approx([1e-3, 0.75e-3, 0.5e-3])
    const = make_trainer(tokenizer=tok, ppo_epochs=1)
    assert const.step(queries, responses, ones(4))["ppo/learning_rate"] == 1e-3


def test_tf_style_adam_option(tok):
    trainer = make_trainer(tokenizer=tok, adam_eps_tf_style=True, adam_eps=1e-5, ppo_epochs=1)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, AdamTFStyle)
    queries, responses = rollout(trainer)
    snap = trainable_snapshot(trainer)
    trainer.step(queries, responses, ones(4))
    assert not same_weights(trainer, snap)


# ------------------------------------------------------------------------------ guards
def test_nan_reward_stops_before_weights(tok):
    trainer = make_trainer(tokenizer=tok)
    queries, responses = rollout(trainer)
    snap = trainable_snapshot(trainer)
    with pytest.raises(NonFiniteError, match="rewards"):
        trainer.step(queries, responses, [torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(0.0), torch.tensor(float("inf"))])
    assert same_weights(trainer, snap)


def test_nan_loss_and_nan_gradient_never_reach_weights(tok):
    trainer = make_trainer(tokenizer=tok)
    queries, responses = rollout(trainer)
    snap = trainable_snapshot(trainer)
    bias = trainer.unwrapped_model.v_head.summary.bias
    with torch.no_grad():
        bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="loss"):
        trainer.step(queries, responses, ones(4))
    with torch.no_grad():
        bias.copy_(snap["v_head.summary.bias"])
    assert same_weights(trainer, snap)

    # A gradient that backward computes as NaN (the hook stands for the bad arithmetic), in
    # the second minibatch of an accumulation window: caught before the step, the parameter named
    policy = make_policy(tok)
    name, lora_b = [(n, p) for n, p in policy.named_parameters() if "lora_B" in n][3]
    calls = []
    lora_b.register_hook(lambda g: calls.append(1) or (g * float("nan") if len(calls) == 2 else g))
    trainer = make_trainer(tokenizer=tok, policy=policy, gradient_accumulation_steps=2)
    snap = trainable_snapshot(trainer)
    with pytest.raises(NonFiniteError, match=f"PPO step 1 stopped: .* in the gradient of {name}; "):
        trainer.step(queries, responses, ones(4))
    assert same_weights(trainer, snap)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert len(inner.state) == 0  # the optimizer never stepped
    assert all(p.grad is None for p in trainer.trainable_params)


def test_eos_suppression_refused_or_warned(tok):
    trainer = make_trainer(tokenizer=tok)
    queries = make_queries(tok, 2)
    with pytest.raises(ValueError, match="suppresses EOS"):
        trainer.generate(queries, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=4, min_new_tokens=3)
    trainer.config.allow_eos_suppression = True
    with pytest.warns(UserWarning, match="suppresses EOS"):
        trainer.generate(queries, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=4, min_new_tokens=3)
    with pytest.warns(UserWarning, match="never stop"):
        trainer.generate(queries, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=4, eos_token_id=100_000)
    with pytest.warns(UserWarning, match="top_k"):
        trainer.generate(queries, do_sample=True, max_new_tokens=4)  # transformers' default top_k=50


def test_no_negative_kl_warning_for_rounding_at_the_first_step(tok):
    """Policy == reference at the first step: the KL is rounding noise of either sign, not a
    warning (the tiny pipeline's first PPO step warned of a KL of -0.0000)."""
    import warnings as w

    trainer = make_trainer(tokenizer=tok, lora=False, ppo_epochs=1)
    queries, responses = rollout(trainer)
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        stats = trainer.step(queries, responses, ones(4))
    assert abs(stats["objective/kl"]) < 1e-4
    assert not [c for c in caught if "negative" in str(c.message)]  # the warning itself: test_negative_kl_warning


def test_negative_kl_warning(tok):
    """Responses the reference likes far more than the policy: the k1 KL goes negative."""
    favourite = tok.convert_tokens_to_ids("w3")

    class LovesFavourite(torch.nn.Module):  # the reference puts +5 on the favourite's logit
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **kwargs):
            out = self.model(**kwargs)
            out.logits[..., favourite] += 5.0
            return out

    ref = LovesFavourite(make_model(tok))
    trainer = make_trainer(tokenizer=tok, lora=False, ref_model=ref, ppo_epochs=1)
    queries = make_queries(tok, 4)
    responses = [torch.full((5,), favourite)] * 4
    with pytest.warns(UserWarning, match="KL to the reference is negative"):
        stats = trainer.step(queries, responses, ones(4))
    assert stats["objective/kl"] < 0


def test_reward_hacking_monitor(tok):
    fence = tok.convert_tokens_to_ids("```")
    trainer = make_trainer(tokenizer=tok, degenerate_min_tokens=4, ppo_epochs=1)
    queries = make_queries(tok, 4)
    responses = [torch.full((6,), fence)] * 3 + [torch.tensor([5, 6, 7, 8, 9, 10])]
    with pytest.warns(UserWarning, match="reward hacking"):
        stats = trainer.step(queries, responses, ones(4))
    assert stats["env/degenerate_share"] == 0.75
    flags = degenerate_mask([torch.tensor([1, 2, 3])] * 2, ["```\n```\n```\nok", "a\nb\nc"])
    assert flags.tolist() == [True, False]


# ------------------------------------------------------------------------------ loop
def test_user_facing_loop_dataloader_log_stats_and_save(tok, tmp_path):
    data = [
        {"input_ids": q, "query": tok.decode(q)} for q in make_queries(tok, 8, seed=5)
    ]
    cfg = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3, log_jsonl=str(tmp_path / "log.jsonl"))
    ppo_trainer = PPOTrainer(cfg, make_policy(tok), None, tok, dataset=data)
    output_length_sampler = LengthSampler(2, 5)
    generation_kwargs = {"top_k": 0, "top_p": 1.0, "do_sample": True, "pad_token_id": tok.pad_token_id}
    reward_baseline = 0.0

    def reward_fn(texts):
        return [float(t.count("w1")) for t in texts]

    tokenizer = tok
    n = 0
    for batch in ppo_trainer.dataloader:
        query_tensors = batch["input_ids"]
        response_tensors = ppo_trainer.generate(query_tensors, return_prompt=False, length_sampler=output_length_sampler, **generation_kwargs)
        batch["response"] = tokenizer.batch_decode(response_tensors, skip_special_tokens=True)
        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        rewards = [torch.tensor(s - reward_baseline) for s in reward_fn(texts)]
        stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
        logs = ppo_trainer.log_stats(stats, batch, rewards)
        n += 1
    assert n == 2
    assert "env/reward_mean" in logs
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(rows) == 2 and len(rows[0]["samples"]) == 4 and "query" in rows[0]["samples"][0]
    ppo_trainer.save_pretrained(str(tmp_path / "ppo"))
    assert (tmp_path / "ppo" / "value_head.safetensors").exists()
    assert (tmp_path / "ppo" / "tokenizer_config.json").exists()


def test_no_lora_uses_frozen_reference_copy(tok):
    trainer = make_trainer(tokenizer=tok, lora=False, ppo_epochs=1)
    assert trainer.ref_model is not None
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    queries, responses = rollout(trainer)
    ref_before = {n: p.clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.step(queries, responses, ones(4))
    stats = trainer.step(queries, responses, ones(4))
    assert stats["objective/kl"] != 0.0
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())


def test_one_update_matches_trl_formulas_end_to_end(tok):
    """One epoch, one minibatch = the batch, SGD(lr=1): the weight change equals minus the
    gradient of TRL 0.11's loss built by hand from unpadded per-sample forwards:
    rewards -beta*kl + score at the last token, GAE(1, 0.95), whitened advantages,
    loss = pg + 0.1 vf."""
    from stackllama.ppo import core

    policy = make_policy(tok, lora=True)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)  # policy != reference, so the KL term is not zero
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    cfg = PPOConfig(batch_size=3, mini_batch_size=3, ppo_epochs=1, seed=0)
    trainer = PPOTrainer(cfg, policy, None, tok, optimizer=opt)
    queries = make_queries(tok, 3, seed=7)
    responses = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10]), torch.tensor([11, 12, tok.eos_token_id])]
    scores = torch.tensor([1.0, -0.5, 2.0])

    # --- by hand, per sample, no padding at all
    beta, R = 0.2, 4
    mask = torch.zeros(3, R)
    old_lp, ref_lp, old_v = torch.zeros(3, R), torch.zeros(3, R), torch.zeros(3, R)
    policy.eval()
    with torch.no_grad():
        for i, (q, r) in enumerate(zip(queries, responses)):
            ids = torch.cat([q, r])[None]
            logits, v = policy(input_ids=ids)
            with policy.disable_adapter():
                ref_logits, _ = policy(input_ids=ids)
            s = slice(len(q) - 1, len(q) - 1 + len(r))
            old_lp[i, : len(r)] = torch.log_softmax(logits[0, s], -1).gather(-1, r[:, None])[:, 0]
            ref_lp[i, : len(r)] = torch.log_softmax(ref_logits[0, s], -1).gather(-1, r[:, None])[:, 0]
            old_v[i, : len(r)] = v[0, s]
            mask[i, : len(r)] = 1
    rewards = -beta * (old_lp - ref_lp) * mask
    for i, r in enumerate(responses):
        rewards[i, len(r) - 1] += scores[i]
    old_v = old_v * mask
    adv, ret = core.gae(rewards, old_v, mask, 1.0, 0.95)
    adv = core.masked_whiten(adv, mask)
    policy.train()
    lp, vp = torch.zeros(3, R), torch.zeros(3, R)
    rows_lp, rows_v = [], []
    for i, (q, r) in enumerate(zip(queries, responses)):
        ids = torch.cat([q, r])[None]
        logits, v = policy(input_ids=ids)
        s = slice(len(q) - 1, len(q) - 1 + len(r))
        pad = R - len(r)
        rows_lp.append(torch.nn.functional.pad(torch.log_softmax(logits[0, s], -1).gather(-1, r[:, None])[:, 0], (0, pad)))
        rows_v.append(torch.nn.functional.pad(v[0, s], (0, pad)))
    lp, vp = torch.stack(rows_lp), torch.stack(rows_v)
    pg, _, _ = core.policy_loss(lp, old_lp, adv, mask, 0.2)
    vf, _ = core.value_loss(vp, old_v, ret, mask, 0.2)
    loss = pg + 0.1 * vf
    grads = torch.autograd.grad(loss, params)
    before = [p.detach().clone() for p in params]

    stats = trainer.step(queries, responses, list(scores))
    assert stats["ppo/loss/total"] == pytest.approx(loss.item(), abs=1e-5)
    for p, b, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach() - b, -g, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_option(tok):
    trainer = make_trainer(tokenizer=tok, bf16_autocast=True, ppo_epochs=1)
    dtypes = []
    mlp = trainer.unwrapped_model.causal_lm.model.layers[0].mlp.up_proj
    handle = mlp.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    queries, responses = rollout(trainer)
    snap = trainable_snapshot(trainer)
    stats = trainer.step(queries, responses, ones(4))
    handle.remove()
    assert set(dtypes) == {torch.bfloat16}  # sampling, rollout and update passes
    assert stats["objective/kl"] == 0.0  # policy and reference passes are the same computation
    assert math.isfinite(stats["ppo/loss/total"])
    assert not same_weights(trainer, snap)
    assert all(p.dtype == torch.float32 for p in trainer.trainable_params)  # master weights stay fp32
    assert mlp.weight.dtype == torch.float32  # frozen weights restored after every pass


def test_bf16_recomputes_rollout_logprobs(tok):
    """Under bf16 the sampling passes' log-probs round differently from a full pass (which
    moved the learning curves, see reuse_generation_logprobs): they are not reused."""
    trainer = make_trainer(tokenizer=tok, bf16_autocast=True)
    queries, responses = rollout(trainer)
    assert responses.old is None and not trainer.speedups.reuse_logprobs


def test_fsdp_is_refused_with_the_alternative(tok, monkeypatch):
    """Under FSDP every forward is a collective and the ranks sample different lengths, so
    generation would hang: the trainer refuses it and names the ZeRO-3 config instead."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    import stackllama.ppo.trainer as trainer_module

    class FSDPAccelerator(Accelerator):
        @property
        def distributed_type(self):
            return DistributedType.FSDP

    monkeypatch.setattr(trainer_module, "Accelerator", FSDPAccelerator)
    with pytest.raises(ValueError, match="does not run under FSDP.*deepspeed_zero3.yaml"):
        PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), make_policy(tok), None, tok)


def test_stats_under_trl_keys_mean_what_trl_logs(tok):
    """``ppo/loss/value`` is TRL's unscaled value loss (the total adds ``vf_coef`` times it) and
    ``ppo/mean_non_score_reward`` the mean of ``-beta KL_t`` over all response tokens (TRL's
    ``masked_mean``), not over rows of per-row sums."""
    policy = make_policy(tok)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    trainer = make_trainer(tokenizer=tok, policy=policy, batch_size=3, mini_batch_size=3, ppo_epochs=1)
    queries = make_queries(tok, 3, seed=2)
    responses = [torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([9]), torch.tensor([11, 12, tok.eos_token_id])]
    stats = trainer.step(queries, responses, [torch.tensor(x) for x in (2.0, -1.0, 0.5)])
    assert stats["ppo/loss/value"] > 1e-3
    assert stats["ppo/loss/total"] == pytest.approx(stats["ppo/loss/policy"] + 0.1 * stats["ppo/loss/value"], rel=1e-5)
    lengths = torch.tensor([len(r) for r in responses])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).float()
    kl = (stats["objective/logprobs"] - stats["objective/ref_logprobs"]) * mask
    per_token = (-0.2 * kl).sum() / mask.sum()
    assert stats["ppo/mean_non_score_reward"] == pytest.approx(per_token.item(), rel=1e-5)
    assert abs((-0.2 * kl).sum(-1).mean() - per_token) > 1e-3  # the two meanings differ here


def test_logprob_reuse_follows_the_computation(tok, caplog):
    """``log pi_old`` / ``V_old`` come from the sampling passes only where those compute a rollout
    pass's numbers (fp32, no autocast, no dropout while sampling); the log says which way and why."""
    from peft import LoraConfig, get_peft_model

    with caplog.at_level(logging.INFO, logger="stackllama.ppo"):
        fp32 = make_trainer(tokenizer=tok)
    assert fp32.reuse_blocker is None
    assert "PPO passes: no autocast; log pi_old and V_old: taken from the sampling passes" in caplog.text
    caplog.clear()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    bf16_base = AutoModelForCausalLMWithValueHead(get_peft_model(make_model(tok).to(torch.bfloat16), lora))
    with caplog.at_level(logging.INFO, logger="stackllama.ppo"):
        trainer = make_trainer(tokenizer=tok, policy=bf16_base)
    assert "recomputed by a rollout pass (the policy's weights are bfloat16" in caplog.text
    _, responses = rollout(trainer)
    assert responses.old is None  # nothing captured to be reused
    assert "bf16 autocast (PPOConfig.bf16_autocast)" in make_trainer(tokenizer=tok, bf16_autocast=True).reuse_blocker
    dropout = make_policy(tok, lora_dropout=0.1)
    assert "dropout" in make_trainer(tokenizer=tok, policy=dropout, rollout_in_eval_mode=False).reuse_blocker
    assert make_trainer(tokenizer=tok, policy=make_policy(tok, lora_dropout=0.1)).reuse_blocker is None
    assert make_trainer(tokenizer=tok, rollout_in_eval_mode=False).reuse_blocker is None  # no dropout anywhere


def test_bf16_trainable_weights_are_refused_outside_deepspeed(tok):
    """Adam on bf16 parameters without an fp32 master copy: steps of the learning rate's size
    round away. Refused, naming the ways that train in bf16 correctly."""
    policy = make_policy(tok, lora=False).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"bfloat16 .*no fp32 master copy.*--bf16_autocast.*--use_peft.*deepspeed_zero2"):
        make_trainer(tokenizer=tok, policy=policy)
