"""What the RLOO and GRPO stages log beside TRL's own metrics, with the PPO stage's meanings, and the
stop on a NaN/inf reward. Written here because TRL 1.16 offers none of it:

- `objective/kl`: the mean over answers of `sum_t log pi(y_t) - log pi_ref(y_t)` over the answer's
  tokens (nats per answer), over all processes: PPO's `objective/kl` (README, "Logged statistics")
  with its default `kl_penalty` "kl". TRL logs `kl` instead, a per-token mean of its own estimator.
- `objective/kl_per_token`: the same sum over every answer of the window divided by their tokens
  (nats per token), the evaluation's `kl_from_sft_per_token`.
- `tokens_generated`: completion tokens sampled so far in the run, over all processes, kept over a
  resume (`online_rl_state.json` in each checkpoint, with the reward's text / token-id path decision).

Both KL figures average over the logging window (every answer since the last log, not the mean of
per-step means). They are computed from the trainer's own log-probs, which TRL 1.16 computes but keeps
local to its methods, so the log-prob passes are recorded as `_get_per_token_logps_and_entropies`
returns them:

- RLOO: the rollout's passes in `_generate_and_score_completions`: `log pi_old` (the first pass,
  under the weights that sampled; checked against the `old_logps` TRL returns) and `log pi_ref` (the
  last: the reference copy, or the same model with its LoRA adapters disabled). TRL's own `kl` is built
  from the same k1 terms `log pi_old - log pi_ref` (and its KL penalty from their per-answer sums).
- GRPO: `log pi_ref` from the batch (`ref_per_token_logps`, the rollout's reference pass) and `log pi`
  from `old_per_token_logps` when TRL computed it at the rollout, else from the loss pass of
  `_compute_loss` (TRL computes the old log-probs only when the weights move between sampling and the
  loss; otherwise the loss pass runs on the weights that sampled, and TRL itself uses it as `log
  pi_old`). TRL's own `kl` reads the same two tensors and turns them into `exp(r) - r - 1`, `r = log
  pi_ref - log pi`, averaged per token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .. import resume
from ..atomic import write_json
from ..errors import NonFiniteError
from .reward import TRLReward

STATE_FILE = "online_rl_state.json"  # in each checkpoint: what TRL's trainer state does not hold


class OnlineRLStatistics:
    """For TRL's `GRPOTrainer` / `RLOOTrainer` (after `AtomicCheckpointMixin`, whose `stage` names the stage in
    errors, and before the TRL class)."""

    def __init__(self, *args, **kwargs):
        self._logps_passes: list[torch.Tensor] | None = None  # recording, while a list
        self._kl_window: torch.Tensor | None = None  # [sum of per-answer KL, answers, tokens], all ranks
        self.tokens_generated = 0
        self.tokens_at_train_start = 0
        super().__init__(*args, **kwargs)

    # ---- recording the trainer's own log-probs

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._logps_passes is not None:
            self._logps_passes.append(out[0].detach())
        return out

    def _recording(self, call, *args):
        """`call(*args)` with every log-prob pass it runs recorded: `(result, passes)`."""
        self._logps_passes = []
        try:
            return call(*args), self._logps_passes
        finally:
            self._logps_passes = None

    def _record_kl(self, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> None:
        """Adds a batch's answers to the window: their summed KL, their number and their tokens, over all ranks."""
        mask = mask.to(logps.dtype)
        kl = ((logps - ref_logps) * mask).sum(-1)
        answers = (mask.sum(-1) > 0).to(logps.dtype)  # one masked out whole (mask_truncated_completions) is not counted
        stats = torch.stack([kl.sum(), answers.sum(), mask.sum()]).double()
        stats = self.accelerator.reduce(stats, reduction="sum")
        self._kl_window = stats if self._kl_window is None else self._kl_window + stats

    # ---- tokens, rewards

    def _generate(self, prompts):
        out = super()._generate(prompts)  # (prompt_ids, completion_ids, ...) in both trainers
        if self.model.training:
            count = torch.tensor(sum(len(ids) for ids in out[1]), dtype=torch.long, device=self.accelerator.device)
            self.tokens_generated += int(self.accelerator.reduce(count, reduction="sum").item())
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (gathered over all ranks, so every rank stops alike), refused when one is NaN/inf:
        TRL would take a NaN for "unscorable" and train on."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        bad = (~torch.isfinite(rewards)).any(dim=-1)
        if bool(bad.any()):
            latest = resume.latest_checkpoint(self.args.output_dir, "checkpoint")
            raise NonFiniteError(
                f"{self.stage} step {self.state.global_step + 1}: non-finite value (NaN/inf) in the reward of "
                f"{int(bad.sum())} of {len(bad)} answers; stopped before the optimizer step, nothing of this step was "
                f"applied or saved (latest complete checkpoint: {latest if latest else 'none'})")
        return rewards

    # ---- logging

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self._kl_window is not None:
            kl_sum, answers, tokens = self._kl_window.tolist()
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["objective/kl"] = [kl_sum / answers if answers else math.nan]
            self._metrics[mode]["objective/kl_per_token"] = [kl_sum / tokens if tokens else math.nan]
            self._kl_window = None
        if self.model.training:
            self._metrics["train"]["tokens_generated"] = [float(self.tokens_generated)]
        super().log(logs, start_time)

    # ---- checkpoints

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)  # into AtomicCheckpointMixin's staging folder, not yet complete
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            rewards = [f.state_dict() if isinstance(f, TRLReward) else None for f in self.reward_funcs]
            write_json(folder / STATE_FILE, {"tokens_generated": self.tokens_generated, "reward_funcs": rewards})

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """(`AtomicCheckpointMixin.train` has resolved `latest` into a complete checkpoint, or None.)"""
        path = Path(resume_from_checkpoint) / STATE_FILE if resume_from_checkpoint else None
        saved = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        self.tokens_generated = self.tokens_at_train_start = saved.get("tokens_generated", 0)
        for func, state in zip(self.reward_funcs, saved.get("reward_funcs", [])):
            if state is not None and isinstance(func, TRLReward):
                func.load_state_dict(state)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)


class RLOOStatistics(OnlineRLStatistics):
    """The KL from the rollout's passes (RLOO applies its penalty to the rewards, at the rollout)."""

    def _generate_and_score_completions(self, inputs):
        output, passes = self._recording(super()._generate_and_score_completions, inputs)
        if self.model.training:
            logps, ref_logps, mask = passes[0], passes[-1], output["completion_mask"]
            if len(passes) < 2 or not torch.equal((logps * mask).sum(1), output["old_logps"]):
                raise RuntimeError("RLOO's log-prob passes are not (policy, ..., reference) as in TRL 1.16: "
                                   "stackllama.online_rl.statistics must follow the installed TRL")
            self._record_kl(logps, ref_logps, mask)
        return output


class GRPOStatistics(OnlineRLStatistics):
    """The KL from the loss pass's tensors (GRPO applies its penalty in the loss)."""

    def _compute_loss(self, model, inputs):
        loss, passes = self._recording(super()._compute_loss, model, inputs)
        if self.model.training:
            logps = inputs.get("old_per_token_logps")
            logps = passes[0] if logps is None else logps
            mask = inputs["completion_mask"]
            mask = mask * inputs["tool_mask"] if "tool_mask" in inputs else mask
            self._record_kl(logps, inputs["ref_per_token_logps"], mask)
        return loss
