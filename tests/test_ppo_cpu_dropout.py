"""The cheaper CPU dropout of the PPO updates: its mask is Bernoulli(1 - p), kept elements are
scaled by 1 / (1 - p) as in nn.Dropout, gradients follow the same mask, and eval mode is the identity."""

import math

import pytest
import torch
from torch import nn

from stackllama.ppo.speedups.cpu_dropout import CPUDropout, keep_mask, use_cpu_dropout


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_keep_mask_drops_a_share_p(p):
    n = 1_000_000
    share = 1 - keep_mask(torch.Size([n]), p, torch.device("cpu")).float().mean().item()
    assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_follow_one_mask(dtype):
    """Each output is 0 or x / (1 - p), computed as nn.Dropout rounds it, and the gradient is
    the same mask times the scale."""
    p = 0.3
    x = torch.randn(4, 96, 256, dtype=dtype).requires_grad_()
    drop = CPUDropout(p).train()
    torch.manual_seed(0)
    y = drop(x)
    torch.manual_seed(0)
    dropped = ~keep_mask(x.shape, p, x.device)  # the same draw
    expected = (x.detach() * (1 / (1 - p))).masked_fill(dropped, 0.0)
    assert y.dtype == dtype and torch.equal(y.detach(), expected)
    assert 0.25 < dropped.float().mean().item() < 0.35
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.ones_like(x).mul(1 / (1 - p)).masked_fill(dropped, 0.0))


def test_eval_mode_and_the_swap():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.2)), nn.Dropout(0.3, inplace=True))
    assert use_cpu_dropout(model) == 2  # in-place dropout is left alone
    assert type(model[1]) is CPUDropout and model[1].p == 0.1 and type(model[3]) is nn.Dropout
    x = torch.randn(3, 8)
    model.eval()
    torch.testing.assert_close(model(x), model[0](x))
