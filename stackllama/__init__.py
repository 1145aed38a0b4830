"""stackllama: the StackLLaMA RLHF recipe, from Stack Exchange dumps to a PPO-tuned model."""

from .library_warnings import hold_back_library_warnings
from .offline import disable_telemetry

__version__ = "0.1.0"

disable_telemetry()  # no traffic the user did not ask for (see offline.py)
hold_back_library_warnings()  # no warning about what the run does not use (see library_warnings.py)
