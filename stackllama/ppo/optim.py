"""Adam with the epsilon applied TensorFlow-style, as in lm-human-preference-details.

PyTorch's Adam steps ``lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)``; TensorFlow's
(and OpenAI's original RLHF code) steps ``lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``,
i.e. eps is not bias-corrected. The two differ only through eps, and noticeably so in the
first steps with LMHP's eps = 1e-5. No maintained optimizer offers the TF variant, hence
these few lines.
"""

from __future__ import annotations

import math

import torch


class AdamTFStyle(torch.optim.Optimizer):
    """``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``p <- p - lr sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)`` (decoupled weight decay
    ``p <- p (1 - lr wd)`` first, when ``weight_decay > 0``)."""

    def __init__(self, params, lr: float = 1e-5, betas=(0.9, 0.999), eps: float = 1e-5, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
        return loss
