"""The flags of `scripts/chat.py` and `scripts/demo_app.py`: which run and policies, how to sample."""

from __future__ import annotations

from dataclasses import dataclass, field

from .answer import SamplingSettings


@dataclass
class ChatArguments:
    """Which policies answer, scored by which reward model, sampled how."""

    run_dir: str = field(default="runs/tiny", metadata={
        "help": "The run folder whose trained policies answer (what `make demo` or scripts/run_pipeline.py wrote)."})
    policies: list[str] | None = field(default=None, metadata={
        "help": "Policies to ask: stage names of the run (sft, ppo, ...), model folders, LoRA adapter folders or Hub "
                "ids. Default: PPO (else the run's last-trained policy), or all of them with --compare."})
    compare: bool = field(default=False, metadata={
        "help": "Ask every trained policy of the run (SFT, PPO and any other stage's), each answer scored."})
    question: str | None = field(default=None, metadata={
        "help": "One question to answer, then exit. Default: questions are read from the terminal (or stdin) until "
                "an empty line or end of input."})
    reward_model: str | None = field(default=None, metadata={
        "help": "Reward model that scores each answer (full weights or LoRA). Default: <run_dir>/reward if it holds "
                "one; none: answers are not scored."})
    max_new_tokens: int = field(default=128, metadata={
        "help": "At most this many new tokens per answer (the recipe's output_max_length)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (the PPO stage samples at 1)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k likeliest tokens; 0 = off, as in PPO."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling; 1 = off, as in PPO."})
    do_sample: bool = field(default=True, metadata={"help": "Sample (the recipe); false = greedy decoding."})
    seed: int = field(default=0, metadata={
        "help": "Seed set before each answer: every policy draws the same random numbers, and the same seed gives "
                "the same answer again."})
    dtype: str | None = field(default="auto", metadata={
        "help": "Weights' dtype: auto (as saved), float32, bfloat16, float16."})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... Default: cuda when available."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow custom model code from the model's folder or Hub repo (off: only transformers' classes)."})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads. Default: one for a small model on a CPU (no OpenMP stalls), else torch's."})

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, do_sample=self.do_sample, seed=self.seed)


@dataclass
class DemoArguments(ChatArguments):
    """The web demo's server, on top of the chat flags (it compares every trained policy by default)."""

    compare: bool = field(default=True, metadata={
        "help": "Show every trained policy of the run side by side (false: only --policies, or the last-trained)."})
    server_name: str = field(default="127.0.0.1", metadata={
        "help": "Address to bind. The default serves this machine only; 0.0.0.0 exposes the demo to the network."})
    server_port: int | None = field(default=None, metadata={
        "help": "Port. Default: Gradio's (7860, or the next free one)."})
    share: bool = field(default=False, metadata={"help": "Ask Gradio for a public share link (needs network)."})
    num_examples: int = field(default=4, metadata={
        "help": "Example questions offered, drawn from the run's held-out `evaluation` questions."})
