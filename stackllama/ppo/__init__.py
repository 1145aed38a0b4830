"""The project's own PPO trainer (TRL no longer ships one). See trainer.py for the
algorithm, core.py for its formulas, config.py for the options and their defaults."""

from .config import PPOConfig
from .guards import NonFiniteError
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
    "ValueHead",
    "default_collator",
]
