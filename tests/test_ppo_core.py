"""The PPO formulas of stackllama.ppo.core against hand-computed tensors."""

import math

import ppo_tiny  # noqa: F401  (sets HF_HUB_OFFLINE)
import pytest
import torch
from ppo_tiny import one_thread  # noqa: F401  (fixture)

from stackllama.ppo import core
from stackllama.ppo.kl_controllers import AdaptiveKLController, FixedKLController
from stackllama.ppo.length_sampler import LengthSampler
from stackllama.ppo.optim import AdamTFStyle

pytestmark = pytest.mark.usefixtures("one_thread")


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=tol)


def test_logprobs_from_logits_with_and_without_temperature():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 0]])
    lse = math.log(math.e**1 + math.e**2 + math.e**3)
    close(core.logprobs_from_logits(logits, labels), [[3 - lse, -math.log(3)]])
    lse_t = math.log(math.e**0.5 + math.e**1.0 + math.e**1.5)
    close(core.logprobs_from_logits(logits, labels, temperature=2.0), [[1.5 - lse_t, -math.log(3)]])
    # fp32 even for bf16 logits
    assert core.logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32


def test_logprobs_and_entropy_share_one_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    for t in (1.0, 0.7):
        lp, h = core.logprobs_and_entropy(logits, labels, t)
        torch.testing.assert_close(lp, core.logprobs_from_logits(logits, labels, t))
        torch.testing.assert_close(h, core.entropy_from_logits(logits, t))
        assert lp.requires_grad and not h.requires_grad
        g, = torch.autograd.grad(lp.sum(), logits)
        g_ref, = torch.autograd.grad(core.logprobs_from_logits(logits, labels, t).sum(), logits)
        torch.testing.assert_close(g, g_ref)


def test_entropy_from_logits():
    close(core.entropy_from_logits(torch.zeros(1, 2, 4)), [[math.log(4), math.log(4)]])
    p = [0.7, 0.2, 0.1]
    logits = torch.tensor([[[math.log(x) for x in p]]])
    close(core.entropy_from_logits(logits), [[-sum(x * math.log(x) for x in p)]])


def test_masked_mean_var_whiten():
    x = torch.tensor([[2.0, 4.0], [6.0, 100.0]])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    close(core.masked_mean(x, m), 4.0)
    close(core.masked_mean(x, m, axis=1), [3.0, 6.0])
    close(core.masked_var(x, m), 4.0)  # (4 + 0 + 4) / 2
    close(core.masked_var(x, m, unbiased=False), 8.0 / 3.0)
    w = core.masked_whiten(x, m)
    close(w * m, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), tol=1e-4)
    w = core.masked_whiten(x, m, shift_mean=False)
    close(w * m, torch.tensor([[3.0, 4.0], [5.0, 0.0]]), tol=1e-4)
    wb = core.masked_whiten(x, m, unbiased=False)
    close(wb[0, 0], (2 - 4) / math.sqrt(8 / 3 + 1e-8))
    with pytest.raises(ValueError):
        core.masked_var(x, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_kl_penalties():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    close(core.kl_penalty(lp, ref, "kl"), [0.5, -1.0])
    close(core.kl_penalty(lp, ref, "abs"), [0.5, 1.0])
    close(core.kl_penalty(lp, ref, "mse"), [0.125, 0.5])
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    close(core.kl_penalty(p, q, "full"), [0.5 * math.log(2) + 0.5 * math.log(2 / 3)])
    with pytest.raises(ValueError):
        core.kl_penalty(lp, ref, "k3")


def test_per_token_rewards_score_at_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, non_score = core.per_token_rewards(torch.tensor([1.0, 2.0]), kl, mask, beta=0.5)
    close(rewards, [[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]])
    close(non_score, [[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]])


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 99.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: deltas -0.3, -0.1, 0.9 ; row 1 (last position masked): 0.1, 0.6, 0
    a0 = [-0.3 + 0.95 * (-0.1 + 0.95 * 0.9), -0.1 + 0.95 * 0.9, 0.9]
    a1 = [0.1 + 0.95 * 0.6, 0.6, 0.0]
    close(adv, [a0, a1])
    close(ret, [[a0[0] + 0.5, a0[1] + 0.2, a0[2] + 0.1], [a1[0] + 0.3, a1[1] + 0.4, 0.0]])


def test_gae_matches_backward_recursion():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = (torch.arange(7)[None] < torch.tensor([7, 5, 3, 1])[:, None]).float()
    gamma, lam = 0.9, 0.8
    v, r = values * mask, rewards * mask
    last, rev = 0.0, []
    for t in reversed(range(7)):  # TRL 0.11's loop
        nv = v[:, t + 1] if t < 6 else 0.0
        last = r[:, t] + gamma * nv - v[:, t] + gamma * lam * last
        rev.append(last)
    ref_adv = torch.stack(rev[::-1], 1)
    adv, ret = core.gae(rewards, values, mask, gamma, lam)
    close(adv, ref_adv)
    close(ret, ref_adv + v)


def test_policy_loss_clipped():
    logp, old = torch.tensor([[0.1, -0.5]]), torch.zeros(1, 2)
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    loss, clipfrac, ratio = core.policy_loss(logp, old, adv, mask, cliprange=0.2)
    close(ratio, [[math.exp(0.1), math.exp(-0.5)]])
    # max(-A r, -A clip(r)): [-e^0.1, max(e^-0.5, 0.8) = 0.8]
    close(loss, (-math.exp(0.1) + 0.8) / 2)
    close(clipfrac, 0.5)


def test_value_loss_clipped():
    vpred, old = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.1]])
    ret, mask = torch.tensor([[2.0, 0.0]]), torch.ones(1, 2)
    loss, clipfrac = core.value_loss(vpred, old, ret, mask, cliprange_value=0.2)
    # clipped preds [0.7, 0.0]; errors unclipped [1, 0], clipped [1.69, 0]
    close(loss, 0.5 * (1.69 + 0.0) / 2)
    close(clipfrac, 0.5)


def test_approx_and_policy_kl():
    lp, old, m = torch.tensor([[0.0, -1.0, 5.0]]), torch.tensor([[-0.5, -0.5, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    close(core.approx_kl(lp, old, m), 0.5 * (0.25 + 0.25) / 2)
    close(core.policy_kl(lp, old, m), (-0.5 + 0.5) / 2)


def test_running_moments_match_concatenation():
    rm = core.RunningMoments()
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0])
    batch_mean, batch_std = rm.update(a)
    close(batch_mean, 2.5)
    close(batch_std, a.std())
    rm.update(b)
    both = torch.cat([a, b])
    close(rm.mean, both.mean())
    close(rm.std, both.std(), tol=1e-4)  # unbiased
    close(rm.var, both.var(unbiased=False), tol=1e-4)


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert core.position_ids_from_attention_mask(mask).tolist() == [[0, 0, 0, 1, 1], [0, 1, 2, 3, 4]]


def test_kl_controllers():
    ctl = AdaptiveKLController(0.2, target=6, horizon=10000)
    ctl.update(current=12.0, n_steps=256)  # error clipped to +0.2
    close(ctl.value, 0.2 * (1 + 0.2 * 256 / 10000))
    ctl = AdaptiveKLController(0.2, target=6, horizon=10000)
    ctl.update(current=5.4, n_steps=100)  # error -0.1
    close(ctl.value, 0.2 * (1 - 0.1 * 100 / 10000))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


def test_length_sampler_range():
    s = LengthSampler(32, 35, seed=0)
    draws = {s() for _ in range(200)}
    assert draws == {32, 33, 34}
    with pytest.raises(ValueError):
        LengthSampler(5, 5)


def test_adam_tf_style_hand_computed_and_equivalence():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = AdamTFStyle([p], lr=0.1, betas=(0.9, 0.999), eps=1e-5)
    p.grad = torch.tensor([0.5])
    opt.step()
    m, v = 0.1 * 0.5, 0.001 * 0.25
    step = 0.1 * math.sqrt(1 - 0.999) / (1 - 0.9)
    close(p.detach(), [1.0 - step * m / (math.sqrt(v) + 1e-5)], tol=1e-7)
    # Same as PyTorch Adam whose eps is divided by sqrt(1 - b2^t) at each step.
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, generator=g) for _ in range(5)]
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt_tf = AdamTFStyle([a], lr=0.01, eps=1e-3)
    opt_pt = torch.optim.Adam([b], lr=0.01, eps=1e-3)
    for t, grad in enumerate(grads, start=1):
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_pt.param_groups[0]["eps"] = 1e-3 / math.sqrt(1 - 0.999**t)
        opt_tf.step()
        opt_pt.step()
    close(a.detach(), b.detach(), tol=1e-6)
    # and it differs from plain PyTorch Adam with the same eps
    c = torch.nn.Parameter(torch.ones(3))
    opt_c = torch.optim.Adam([c], lr=0.01, eps=1e-3)
    for grad in grads:
        c.grad = grad.clone()
        opt_c.step()
    assert (c - a).abs().max() > 1e-5
