"""stackllama: the StackLLaMA RLHF recipe, from Stack Exchange dumps to a PPO-tuned model."""

__version__ = "0.1.0"
