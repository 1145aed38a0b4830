"""The flags of `scripts/evaluate.py`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvaluateScriptArguments:
    """Arguments of `scripts/evaluate.py`. Paths left empty default to the stages' outputs in the run
    folder, the parent of `--output_dir` (`runs/<run>/`)."""

    output_dir: str = field(default="runs/tiny/report", metadata={
        "help": "Where report.md, the plots, evaluation_samples.jsonl and evaluation_results.json go."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Prepared data (folder or Hub id). Default: <run>/data."})
    subset: str = field(default="evaluation", metadata={"help": "Held-out subset: its questions are the prompts "
                                                                "and its pairs measure the reward model."})
    sft_model: str | None = field(default=None, metadata={
        "help": "SFT policy (full weights or LoRA adapter). Default: <run>/sft-merged, else <run>/sft."})
    ppo_model: str | None = field(default=None, metadata={
        "help": "PPO policy (full weights or LoRA adapter; the value head is ignored). Default: <run>/ppo."})
    compare_with: list[str] | None = field(default=None, metadata={
        "help": "Other policies compared with SFT beside PPO, on the same prompts: stage names of the run (dpo, "
                "rloo, grpo) or NAME=PATH (full weights or LoRA adapter); `none` for SFT and PPO only. Default: "
                "each of <run>/dpo, <run>/rloo, <run>/grpo that holds a model."})
    reward_model_name: str | None = field(default=None, metadata={
        "help": "Reward model (full weights or LoRA). Default: <run>/reward."})
    sft_log_dir: str | None = field(default=None, metadata={
        "help": "Folder with the SFT stage's trainer_state.json / sft_results.json. Default: <run>/sft."})
    reward_log_dir: str | None = field(default=None, metadata={
        "help": "Folder with the reward stage's trainer_state.json / reward_results.json. Default: the reward "
                "model's folder."})
    ppo_log_dir: str | None = field(default=None, metadata={
        "help": "Folder with ppo_log.jsonl / ppo_results.json. Default: the PPO model's folder."})
    num_prompts: int = field(default=128, metadata={"help": "Use at most this many questions (a seeded sample)."})
    samples_per_prompt: int = field(default=4, metadata={
        "help": "Responses per question and policy. More than one narrows the intervals when few questions fit "
                "(the bootstrap resamples questions, so they are not counted as independent)."})
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "Questions longer than this many tokens are dropped (and counted). Default: the PPO run's "
                "(ppo_results.json), else 512 as in the recipe."})
    output_min_length: int | None = field(default=None, metadata={
        "help": "Response length is uniform in [min, max), drawn per (question, sample) and the same for both "
                "policies. Default: the PPO run's, if its ppo_results.json records it, else 32."})
    output_max_length: int | None = field(default=None, metadata={
        "help": "Upper bound (excluded) of the response length. Default: the PPO run's, else 128."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (PPO samples at 1.0); "
                                                              "the KL uses the same."})
    batch_size: int = field(default=32, metadata={"help": "Sequences per generation / forward batch."})
    reward_batch_size: int = field(default=32, metadata={"help": "Texts per reward-model forward pass."})
    max_length: int = field(default=512, metadata={
        "help": "Reward-model accuracy: evaluation pairs with a side longer than this are dropped (and counted)."})
    max_eval_pairs: int | None = field(default=None, metadata={
        "help": "Reward-model accuracy on at most this many evaluation pairs (default: all)."})
    bootstrap_resamples: int = field(default=2000, metadata={"help": "Resamples of the questions for the 95%% "
                                                                     "confidence intervals."})
    num_examples: int = field(default=4, metadata={"help": "Sample answers shown side by side in report.md."})
    seed: int = field(default=0, metadata={"help": "Seed of the question sample, lengths, sampling and bootstrap."})
    dtype: str = field(default="auto", metadata={"help": "dtype of the models: auto, float32, bfloat16, float16."})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads. Default: 1 on a CPU for policies under 100M parameters (more threads only "
                "stall such small models on a busy shared CPU), else torch's choice."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    report_only: bool = field(default=False, metadata={
        "help": "Rebuild report.md and the plots from the training logs and an existing evaluation_results.json "
                "in output_dir, without generating."})
