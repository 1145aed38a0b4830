"""Dropout with a cheaper random mask on CPU.

PyTorch's CPU dropout draws its mask with ``bernoulli_``, about 4 ns per element here; in
the PPO updates of the benchmark (``benchmarks/ppo_step.py``: LoRA dropout 0.05 on q/v,
value-head dropout 0.1) the masks took about a tenth of each minibatch. This module draws
the same Bernoulli(1 - p) mask from 64-bit random integers, two 32-bit uniforms each,
compared with ``round((1 - p) 2^32)``: the keep probability is exact to 2^-32 (``torch.rand``
floats resolve 2^-24) at under half the cost. Kept elements are scaled by ``1 / (1 - p)``
as in ``nn.Dropout``.

Only CPU tensors take this path: CUDA's fused dropout is already cheap.
"""

from __future__ import annotations

import torch
from torch import nn


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool tensor of ``shape``, True with probability ``1 - p`` (independently per element)."""
    n = int(torch.Size(shape).numel())
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), None)
    uniform32 = bits.view(torch.int32)[:n].view(shape)  # uniform on [-2^31, 2^31)
    return uniform32 < round((1.0 - p) * 2**32) - 2**31


class CPUDropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from :func:`keep_mask` for CPU tensors in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.p == 1.0 or x.device.type != "cpu":
            return super().forward(x)
        keep = keep_mask(x.shape, self.p, x.device)
        scale = 1.0 / (1.0 - self.p)
        if x.dtype == torch.float32:
            # x times a {0, 1/(1-p)} tensor: the same values as scaling then masked_fill, and the
            # backward is one multiplication (masked_fill's is slower)
            return x * keep.to(x.dtype).mul_(scale)
        # other dtypes as before: the scale is applied in the multiplication's fp32 arithmetic (a bf16
        # mask would round 1/(1-p) to bf16 first, as nn.Dropout's does)
        return (x * scale).masked_fill_(~keep, 0.0)


def use_cpu_dropout(model: nn.Module, device: torch.device | None = None) -> int:
    """Turns the ``nn.Dropout`` modules of ``model`` into :class:`CPUDropout` (same ``p``,
    same state; nothing to save) when ``device`` is the CPU (or not given). Returns how many."""
    if device is not None and torch.device(device).type != "cpu":
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Dropout and not module.inplace:
            module.__class__ = CPUDropout
            n += 1
    return n
