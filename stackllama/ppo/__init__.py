"""The project's own PPO trainer (TRL no longer ships one).

- ``trainer.py``       ``PPOTrainer``: construction, ``generate``, ``step`` in run order
- ``core.py``          the formulas, each once (log-probs, KL penalties, GAE, the losses)
- ``config.py``        ``PPOConfig``: every option, its default and what TRL 0.11 did
- ``generation.py``    sampling the responses, with ``log pi_old`` / ``V_old`` where reusable
- ``forward.py``       the policy, reference and rollout passes
- ``rollout_batch.py`` the batch layout and where a response stops
- ``backend.py``       what differs between one process, DDP and DeepSpeed
- ``statistics.py``    the statistics under TRL's keys, and their logging
- ``checkpointing.py`` saving and resuming a run exactly
- ``value_head.py``    the causal LM with a value head (saved beside adapters)
- ``guards.py``        refusals and warnings: NaN/inf, bad generation settings, reward hacking
- ``speedups/``        the speed-ups and the one place that decides which apply
- ``kl_controllers.py``, ``length_sampler.py``, ``optim.py``: small pieces of the recipe
- ``recipe.py``        the PPO stage's script pieces (queries, models, resume)
"""

from ..errors import NonFiniteError
from .config import PPOConfig
from .generation import Responses
from .kl_controllers import AdaptiveKLController, FixedKLController
from .length_sampler import LengthSampler
from .trainer import PPOTrainer, default_collator
from .value_head import AutoModelForCausalLMWithValueHead, ValueHead

__all__ = [
    "AdaptiveKLController",
    "AutoModelForCausalLMWithValueHead",
    "FixedKLController",
    "LengthSampler",
    "NonFiniteError",
    "PPOConfig",
    "PPOTrainer",
    "Responses",
    "ValueHead",
    "default_collator",
]
