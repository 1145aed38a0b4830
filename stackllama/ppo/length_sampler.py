"""Response-length sampler of the recipe: ``LengthSampler(32, 128)`` draws the
``max_new_tokens`` of each generation batch uniformly from ``[min_value, max_value)``."""

from __future__ import annotations

import random

from ..errors import InputError


class LengthSampler:
    """Uniform integer in ``[min_value, max_value)`` (upper bound excluded, as in TRL)."""

    def __init__(self, min_value: int, max_value: int, seed: int | None = None) -> None:
        if max_value <= min_value:
            raise InputError(f"LengthSampler needs min_value < max_value, got [{min_value}, {max_value})")
        self.values = list(range(min_value, max_value))
        self._rng = random.Random(seed) if seed is not None else random

    def __call__(self) -> int:
        return self._rng.choice(self.values)

    def state_dict(self) -> dict:
        """Its own generator's state (for checkpoints); empty when it draws from the global
        ``random``, which the checkpoint's process RNG state already holds."""
        return {"rng": self._rng.getstate()} if isinstance(self._rng, random.Random) else {}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state and isinstance(self._rng, random.Random):
            self._rng.setstate(state["rng"])
