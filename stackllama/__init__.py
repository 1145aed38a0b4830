"""stackllama: the StackLLaMA RLHF recipe, from Stack Exchange dumps to a PPO-tuned model."""

from .offline import disable_telemetry

__version__ = "0.1.0"

disable_telemetry()  # no traffic the user did not ask for (see offline.py)
