"""Controllers for the KL coefficient ``beta`` of the per-token penalty ``-beta * KL_t``.

Ziegler et al. (2019), section 2.2: an adaptive ``beta`` steers the policy's KL to the
reference towards a target value; a fixed one is the simpler baseline.
"""

from __future__ import annotations


class FixedKLController:
    """``beta`` stays at its initial value."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> None:
        """No-op, kept so that both controllers share one interface."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller: ``e = clip(KL / target - 1, -0.2, 0.2)`` and
    ``beta <- beta (1 + e n / horizon)``.

    ``KL`` is the batch mean of the per-sequence summed KL and ``n`` the number of
    sequences in the step (over all processes). Defaults of the recipe: init 0.2,
    target 6, horizon 10000.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current: float, n_steps: int) -> None:
        proportional_error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
