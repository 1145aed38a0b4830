"""PPO for language models (Ziegler et al. 2019; Stiennon et al. 2020), the trainer.

Why this is hand-written: TRL removed ``PPOTrainer.step`` (0.11) and then its experimental
PPO trainer, and no maintained library offers PPO with the recipe's user-facing loop
(``generate`` -> score -> ``step``). So this project owns one, in the style of cleanRL /
lm-human-preference-details: ``step`` reads in the order the algorithm runs

    1. rollout      the no-grad passes: ``log pi_old`` and ``V_old`` (or those that
                    ``generate`` returned with the responses), ``log pi_ref``, the KL;
    2. rewards      ``r_t = -beta KL_t``, plus the score at the last response token;
    3. advantages   GAE, then whitening over the batch;
    4. updates      ``ppo_epochs`` x shuffled minibatches, clipped policy + value losses;
    5. statistics   and the KL-controller update.

The formulas live once, in :mod:`.core`. Around them: :mod:`.generation` samples,
:mod:`.forward` runs the passes in the :mod:`.rollout_batch` layout, :mod:`.backend` holds
what differs between one process, DDP and DeepSpeed, :mod:`.speedups` decides the speed-ups,
:mod:`.statistics` names the statistics, :mod:`.checkpointing` saves and resumes.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Callable, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate import state as accelerate_state
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader

from ..errors import InputError
from ..processes import process_state
from . import checkpointing, core, statistics
from .backend import backend_for
from .config import PPOConfig
from .forward import Passes
from .generation import Responses, Sampler
from .guards import (
    check_finite,
    check_generation_kwargs,
    effective_generation_param,
    flatten_stop_ids,
)
from .kl_controllers import AdaptiveKLController, FixedKLController
from .optim import AdamTFStyle
from .rollout_batch import RolloutBatch, StopTokens
from .speedups.plan import plan_speedups
from .value_head import AutoModelForCausalLMWithValueHead, dropout_off

logger = logging.getLogger(__name__)


def default_collator(data: Sequence[dict]) -> dict:
    """The recipe's collator: a dict of lists (tensors of different lengths stay a list)."""
    return {key: [d[key] for d in data] for key in data[0]}


class PPOTrainer:
    """``PPOTrainer(config, model, ref_model=None, tokenizer, dataset, data_collator)``.

    ``model``: an :class:`AutoModelForCausalLMWithValueHead`, or a causal LM / PEFT model
    (wrapped with a fresh value head). ``ref_model``: None with a PEFT model (the reference
    is the same model with adapters disabled); without PEFT, an explicit frozen model, or
    None for a frozen deep copy of ``model`` taken now.
    """

    def __init__(self, config: PPOConfig, model: nn.Module, ref_model: Optional[nn.Module] = None, tokenizer=None,
                 dataset=None, data_collator: Optional[Callable] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        self.config = cfg = config
        if not accelerate_state.is_initialized():
            process_state()  # on a CPU-only machine too, the launched processes join one run
        self.accelerator = Accelerator(log_with=cfg.log_with, project_config=ProjectConfiguration(**cfg.project_kwargs),
                                       **cfg.accelerator_kwargs)
        set_seed(cfg.seed + self.accelerator.process_index)
        self.backend = backend_for(self.accelerator, cfg)
        if cfg.log_with is not None:
            self.accelerator.init_trackers(cfg.tracker_project_name, config=statistics.tracker_config(cfg),
                                           init_kwargs=cfg.tracker_kwargs)

        # Models: the policy with its value head, and the reference (None: adapters disabled)
        if not isinstance(model, AutoModelForCausalLMWithValueHead):
            model = AutoModelForCausalLMWithValueHead(model)
        self.is_peft_model = model.is_peft_model
        if ref_model is None and not self.is_peft_model:
            ref_model = copy.deepcopy(model.pretrained_model)  # without adapters there is nothing to switch off
        if ref_model is not None:
            if isinstance(ref_model, AutoModelForCausalLMWithValueHead):
                ref_model = ref_model.pretrained_model
            ref_model.requires_grad_(False)
            ref_model.eval()
            ref_model = self.backend.prepare_reference(ref_model)
        self.ref_model = ref_model
        self.tokenizer = tokenizer

        # Optimizer and data, prepared by accelerate
        named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.trainable_params = params = [p for _, p in named_params]
        self.backend.check_trainable(named_params)
        if optimizer is None:
            betas = (cfg.adam_beta1, cfg.adam_beta2)
            if cfg.adam_eps_tf_style:
                optimizer = AdamTFStyle(params, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_eps,
                                        weight_decay=cfg.weight_decay)
            else:
                optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_eps,
                                             weight_decay=cfg.weight_decay,
                                             fused=self.backend.fused_optimizer(params) or None)
        self.data_collator = data_collator or default_collator
        self.data_generator = torch.Generator().manual_seed(cfg.seed)  # kept: a checkpoint restores an epoch's order
        self.dataloader = None
        if dataset is not None:
            self.dataloader = DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=self.data_collator,
                                         shuffle=True, drop_last=True, generator=self.data_generator)
            self.model, self.optimizer, self.dataloader = self.accelerator.prepare(model, optimizer, self.dataloader)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.backend.attach(self.model, self.optimizer, named_params)
        self.base_lr = [g["lr"] for g in self.optimizer.param_groups]

        # Speed-ups, the passes, sampling
        self.speedups = plan_speedups(cfg, self.unwrapped_model, self.ref_model, self.accelerator, self.backend)
        self.passes = Passes(cfg, self.model, self.unwrapped_model, self.ref_model, self.speedups.precision,
                             own_reference_forward=self.backend.own_reference_forward)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        self.eos_ids = flatten_stop_ids(eos if eos is not None else self.unwrapped_model.generation_config.eos_token_id)
        self.stops = StopTokens(self.eos_ids, flatten_stop_ids(cfg.stop_token_ids), cfg.stop_after)
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_token_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.sampler = Sampler(cfg, self.backend, self.speedups, self.stops, self.pad_token_id, self.accelerator.device)

        # State that a checkpoint saves: step, KL coefficient, score moments, data position
        self.kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target, cfg.horizon) if cfg.adap_kl_ctrl
                       else FixedKLController(cfg.init_kl_coef))
        self.running = core.RunningMoments()
        self.current_step = 0
        self.perm_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch, self.batch_in_epoch = 0, 0
        self.epoch_start_state = self.data_generator.get_state()
        self.sampling_temperature = 1.0

    @property
    def unwrapped_model(self) -> AutoModelForCausalLMWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    @property
    def precision(self):
        """The run's one autocast regime (:mod:`.speedups.mixed_precision`)."""
        return self.speedups.precision

    @property
    def reuse_blocker(self) -> Optional[str]:
        """Why ``step`` recomputes ``log pi_old`` / ``V_old`` (None: taken from sampling)."""
        return self.speedups.reuse_blocker

    # =====================================================================================
    # 0. queries and 1a. sampling
    # =====================================================================================
    def batches(self):
        """The dataloader's batches, epoch after epoch, without end, from the current position:
        the batch after the last one taken, or after ``load_checkpoint`` the one after the
        checkpoint's (the epoch's order is replayed from its saved start and the batches
        already taken are skipped). The position is what ``save_checkpoint`` records."""
        while True:
            self.data_generator.set_state(self.epoch_start_state)
            taken = self.batch_in_epoch
            for i, batch in enumerate(self.dataloader):
                if i >= taken:
                    self.batch_in_epoch = i + 1
                    yield batch
            self.epoch += 1
            self.batch_in_epoch = 0
            self.epoch_start_state = self.data_generator.get_state()

    def generate(self, query_tensor, length_sampler: Optional[Callable[[], int]] = None,
                 batch_size: Optional[int] = None, return_prompt: bool = True, **generation_kwargs):
        """Samples responses in batches of ``batch_size`` left-padded prompts (:mod:`.generation`).

        Each response is cut after its first EOS or stop token (kept; stop tokens only from
        position ``stop_after``). ``length_sampler()`` draws ``max_new_tokens`` per batch. With
        ``return_prompt=False`` the result is a :class:`~.generation.Responses` list carrying the
        sampling passes' ``log pi_old`` / ``V_old`` where they may be reused: pass it to ``step``
        as it is. The sampling temperature is recorded for the log-probs of the next ``step``."""
        single = isinstance(query_tensor, torch.Tensor) and query_tensor.dim() == 1
        queries = [query_tensor] if single else list(query_tensor)
        model = self.unwrapped_model
        check_generation_kwargs(generation_kwargs, model.generation_config, model.config.vocab_size,
                                self.config.allow_eos_suppression)
        do_sample = effective_generation_param("do_sample", generation_kwargs, model.generation_config, False)
        temperature = effective_generation_param("temperature", generation_kwargs, model.generation_config, 1.0)
        self.sampling_temperature = float(temperature) if do_sample else 1.0
        generation_kwargs.setdefault("pad_token_id", self.pad_token_id)
        responses, old = self.sampler.sample(model, queries, generation_kwargs, length_sampler,
                                             batch_size or self.config.generation_batch_size,
                                             self.sampling_temperature, self.logprob_temperature())
        if return_prompt:
            outputs = [torch.cat([q.to(r.device), r]) for q, r in zip(queries, responses)]
        else:
            outputs = Responses(responses, old, self.current_step)
        return outputs[0] if single else outputs

    def logprob_temperature(self) -> float:
        """The temperature log-probs are taken at: the config's, or the last sampling's (1 when off)."""
        if not self.config.scale_logits_by_temperature:
            return 1.0
        return float(self.config.temperature) if self.config.temperature is not None else self.sampling_temperature

    # =====================================================================================
    # the PPO step
    # =====================================================================================
    def step(self, queries: list, responses: list, scores: list) -> dict:
        """One PPO step on a batch of (query, response, score); returns the statistics.
        ``responses`` as ``generate(..., return_prompt=False)`` returned them lets the rollout
        pass use the sampling passes' ``log pi_old`` / ``V_old``."""
        cfg, timing, t_start = self.config, {}, time.perf_counter()
        device = self.accelerator.device
        if not (len(queries) == len(responses) == len(scores)) or len(queries) == 0:
            raise InputError(f"step() needs equally many queries/responses/scores, got {len(queries)}/{len(responses)}/{len(scores)}")
        if any(len(q) == 0 for q in queries) or any(len(r) == 0 for r in responses):
            raise InputError("step() got an empty query or response")
        # log pi_old / V_old from the sampling passes, if they sampled with the current weights
        old = responses.old_for(self.current_step) if isinstance(responses, Responses) and self.speedups.reuse_logprobs else None
        queries = [q.to(device) for q in queries]
        responses = [r.to(device) for r in responses]
        scores = torch.stack([torch.as_tensor(s, dtype=torch.float32).reshape(()) for s in scores]).to(device)
        self._check_finite("rewards (scores passed to step)", scores, "Check the reward model / reward function output.")
        raw_scores = scores.clone()

        # --- scores: missing-EOS penalty (on the raw score), scaling / normalisation, clipping
        ended = self.stops.ended(responses)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~ended).float()
        if cfg.use_score_scaling:
            self.running.update(scores, *self.backend.moments(scores))  # over all processes' scores
            scale = self.running.std + torch.finfo(scores.dtype).eps
            scores = (scores - self.running.mean) / scale if cfg.use_score_norm else scores / scale
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        batch = RolloutBatch.build(queries, responses, self.pad_token_id)
        mask, temperature = batch.mask, self.logprob_temperature()

        # --- 1. rollout passes: log pi_old, V_old, log pi_ref, per-token KL
        t = time.perf_counter()
        logprobs, values, ref_logprobs, kl = self.passes.rollout_pass(batch, temperature, old)
        timing["time/ppo/forward_pass"] = time.perf_counter() - t
        self._check_finite("rollout log-probs", logprobs * mask, "The policy produced NaN/inf logits.")

        # --- 2. per-token rewards: r_t = -beta KL_t (+ score at the last token)
        t = time.perf_counter()
        beta = self.kl_ctl.value
        rewards, non_score_reward = core.per_token_rewards(scores, kl, mask, beta)
        timing["time/ppo/compute_rewards"] = time.perf_counter() - t

        # --- 3. advantages: GAE, then whitening over the batch
        t = time.perf_counter()
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards * mask, mask, shift_mean=False, unbiased=cfg.whiten_unbiased)
        advantages, returns = core.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = core.masked_whiten(advantages, mask, unbiased=cfg.whiten_unbiased).detach()
        values = values * mask
        timing["time/ppo/compute_advantages"] = time.perf_counter() - t

        # --- 4. epochs of minibatch updates
        t = time.perf_counter()
        lr = self._set_learning_rate()
        train_stats = self.ppo_updates(batch, logprobs, values, advantages, returns, temperature)
        timing["time/ppo/optimize_step"] = time.perf_counter() - t

        # --- 5. statistics and the KL controller
        t = time.perf_counter()
        stats = statistics.step_statistics(cfg, self.backend, self.tokenizer, batch, scores, raw_scores, logprobs,
                                           ref_logprobs, kl, non_score_reward, beta, train_stats, ended, responses)
        stats["ppo/learning_rate"] = lr
        self.kl_ctl.update(stats["objective/kl"], len(queries) * self.accelerator.num_processes)
        timing["time/ppo/calc_stats"] = time.perf_counter() - t
        timing["time/ppo/total"] = time.perf_counter() - t_start
        stats.update(timing)
        self.current_step += 1
        return stats

    def _check_finite(self, name: str, tensor: torch.Tensor, hint: str) -> None:
        """``check_finite`` over every process's tensor, so that all processes stop together
        (one stopping alone would leave the others waiting in the next collective)."""
        check_finite(name, self.backend.gather_flat(tensor), hint, self.current_step + 1)

    def _set_learning_rate(self) -> float:
        frac = max(0.0, 1.0 - self.current_step / self.config.steps) if self.config.lr_schedule == "linear" else 1.0
        for group, base in zip(self.optimizer.param_groups, self.base_lr):
            group["lr"] = base * frac
        return self.base_lr[0] * frac

    # =====================================================================================
    # 4. updates
    # =====================================================================================
    def ppo_updates(self, batch, old_logprobs, old_values, advantages, returns, temperature) -> dict:
        """``ppo_epochs`` passes of shuffled minibatches; gradients summed over
        ``gradient_accumulation_steps`` minibatches per optimizer step; early stop on the
        last minibatch's policy KL (> 1.5 x ``target_kl``) after an epoch.

        Each minibatch's forward and backward run with dropout off unless
        ``dropout_in_updates``: TRL 0.11 computed the update logits in eval mode too, so that
        ``log pi_theta`` and ``log pi_old`` differ only by what the updates changed. The model
        is left in train mode, as TRL left it (what sampling sees with ``rollout_in_eval_mode=False``)."""
        cfg, backend = self.config, self.backend
        B = batch.mask.shape[0]
        model = self.unwrapped_model
        model.train()
        backend.reset_guard()
        all_stats: list[dict] = []
        n_opt_steps, n_skipped, epochs_run = 0, 0, 0
        # one switch for all minibatches: their forward and backward (a checkpointed layer's rerun)
        with dropout_off(model, enabled=not cfg.dropout_in_updates):
            for _ in range(cfg.ppo_epochs):
                epochs_run += 1
                perm = torch.randperm(B, generator=self.perm_generator).tolist()
                for w0 in range(0, B, cfg.backward_batch_size):
                    window = perm[w0 : w0 + cfg.backward_batch_size]
                    micro = [window[m : m + cfg.mini_batch_size] for m in range(0, len(window), cfg.mini_batch_size)]
                    contributed = False
                    for j, rows in enumerate(micro):
                        last = j == len(micro) - 1
                        with backend.accumulate(boundary=last):
                            # A skipped last minibatch must still run the gradient reduction of the ones before it
                            sync_anyway = last and contributed and backend.skipped_minibatch_must_sync
                            stats, did_backward, skipped = self._train_minibatch(
                                batch, rows, old_logprobs, old_values, advantages, returns, temperature,
                                len(rows) / len(window), last, sync_anyway)
                        all_stats.append(stats)
                        contributed |= did_backward
                        n_skipped += int(skipped)
                    if contributed:
                        backend.optimizer_step(self.current_step + 1)
                        n_opt_steps += 1
                    backend.zero_grad()
                if cfg.early_stopping:
                    policykl = backend.mean(torch.tensor(all_stats[-1]["ppo/policy/policykl"], device=self.accelerator.device))
                    if float(policykl) > 1.5 * cfg.target_kl:
                        break
        out = {k: sum(s[k] for s in all_stats) / len(all_stats) for k in all_stats[0]}
        out["ppo/val/var_explained"] = 1 - out["ppo/val/error"] / max(out["ppo/returns/var"], 1e-12)
        out.update({"ppo/optimizer_steps": n_opt_steps, "ppo/skipped_minibatches": n_skipped, "ppo/epochs_run": epochs_run})
        return out

    def _train_minibatch(self, batch, rows, old_logprobs, old_values, advantages, returns, temperature, scale,
                         boundary=True, sync_anyway=False):
        """``loss = L_pg + vf_coef L_vf`` on one minibatch, backward unless skipped.
        ``scale``: this minibatch's share of its accumulation window; ``boundary``: whether it
        is the window's last."""
        cfg = self.config
        logits, vpred, labels, r = self.passes.policy_pass(batch, rows)
        idx = torch.as_tensor(rows, device=batch.mask.device)
        m = batch.mask[idx, :r]
        old_lp, old_v = old_logprobs[idx, :r], old_values[idx, :r]
        adv, ret = advantages[idx, :r], returns[idx, :r]
        logprobs, entropy = core.logprobs_and_entropy(logits, labels, temperature)
        vpred = vpred.float()

        pg_loss, pg_clipfrac, ratio = core.policy_loss(logprobs, old_lp, adv, m, cfg.cliprange)
        vf_loss, vf_clipfrac = core.value_loss(vpred, old_v, ret, m, cfg.cliprange_value)
        loss = pg_loss + cfg.vf_coef * vf_loss
        avg_ratio_t = core.masked_mean(ratio.detach(), m)
        # Decide on every process alike (a rank skipping backward alone would hang DDP):
        # the worst loss and the largest ratio over the processes.
        flags = self.backend.gather(torch.stack([loss.detach().float(), avg_ratio_t.float()])[None])
        check_finite("the PPO loss", flags[:, 0], "Look for NaN/inf logits or values (fp16 overflow?).", self.current_step + 1)
        skipped = flags[:, 1].max().item() > cfg.ratio_threshold
        did_backward = True
        if skipped:
            warnings.warn(
                f"mean ratio {flags[:, 1].max().item():.2f} > ratio_threshold {cfg.ratio_threshold}: minibatch skipped "
                f"({'no gradient, no optimizer step' if cfg.ratio_threshold_skips_step else 'loss zeroed as in TRL 0.11'}).",
                stacklevel=2,
            )
            did_backward = not cfg.ratio_threshold_skips_step
            if did_backward or sync_anyway:
                self.backend.backward(loss * 0.0, boundary)
        else:
            self.backend.backward(loss * scale, boundary)

        stats = statistics.minibatch_statistics(pg_loss, vf_loss, loss, skipped, entropy, logprobs, old_lp, m, pg_clipfrac,
                                                adv, avg_ratio_t, ret, vpred, vf_clipfrac, old_v)
        return stats, did_backward, skipped

    # =====================================================================================
    # logging, saving, resuming
    # =====================================================================================
    def log_stats(self, stats: dict, batch: dict, rewards, columns_to_log: Sequence[str] = ("query", "response")) -> dict:
        """Logs the scalar statistics (and reward mean/std) to the trackers and to
        ``config.log_jsonl``; returns the logged dict of floats."""
        rewards = torch.stack([torch.as_tensor(r, dtype=torch.float32).reshape(()) for r in rewards])
        rewards = self.backend.gather(rewards.to(self.accelerator.device))
        logs = statistics.scalar_logs(stats, rewards, self.current_step)
        if self.config.log_with is not None:
            self.accelerator.log(logs, step=self.current_step)
        if self.config.log_jsonl and self.accelerator.is_main_process:
            statistics.append_jsonl(self.config.log_jsonl, logs, batch, rewards, columns_to_log)
        self.last_logs = logs
        return logs

    def save_pretrained(self, save_directory: str) -> None:
        """Saves the policy (adapter or full model) with its value head, and the tokenizer."""
        self.accelerator.wait_for_everyone()
        state_dict = self.backend.state_dict_to_save()  # every process takes part (ZeRO-3 gathers)
        if self.accelerator.is_main_process:
            self.unwrapped_model.save_pretrained(save_directory, state_dict=state_dict)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(save_directory)

    def save_checkpoint(self, output_dir: str, extra: Optional[dict] = None, save_total_limit: Optional[int] = None,
                        **stateful):
        """``<output_dir>/checkpoint-<step>/``, complete or absent (:func:`.checkpointing.save_checkpoint`)."""
        return checkpointing.save_checkpoint(self, output_dir, extra, save_total_limit, **stateful)

    def load_checkpoint(self, directory: str, **stateful) -> dict:
        """Resume from a ``save_checkpoint`` folder (:func:`.checkpointing.load_checkpoint`); returns its ``extra``."""
        return checkpointing.load_checkpoint(self, directory, **stateful)

    def state_dict(self) -> dict:
        """Trainer state beyond the weights (for resuming): step, KL coef, score moments."""
        return {"step": self.current_step, "kl_ctl": self.kl_ctl.state_dict(), "running": self.running.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.current_step = state["step"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.running.load_state_dict(state["running"])
