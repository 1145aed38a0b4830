"""PPO for language models (Ziegler et al. 2019; Stiennon et al. 2020), the trainer.

Why this is hand-written: TRL removed ``PPOTrainer.step`` (0.11) and then its experimental
PPO trainer, and no maintained library offers PPO with the recipe's user-facing loop
(``generate`` -> score -> ``step``). So this project owns one, in the style of cleanRL /
lm-human-preference-details: one file that reads in the order the algorithm runs

    1. rollout      ``generate``: batched, left-padded sampling with the KV cache (the
                    trainer's own loop for pure sampling, :mod:`.sampling`), which also
                    yields ``log pi_old`` and ``V_old`` of every sampled token;
                    ``step``: one no-grad pass of the policy (log-probs + values from the
                    same trunk) and one of the reference (adapters disabled), chunked;
    2. rewards      ``r_t = -beta KL_t``, plus the score at the last response token;
    3. advantages   GAE, then whitening over the batch;
    4. updates      ``ppo_epochs`` x shuffled minibatches, clipped policy + value losses;
    5. statistics   and the KL-controller update.

The formulas themselves live once, in :mod:`stackllama.ppo.core`.

Batch layout used by every forward pass: queries left-padded to ``Q`` and responses
right-padded to ``R`` in one ``(B, Q + R)`` tensor, so the response of every row starts at
column ``Q`` and the logits that predict it are the contiguous slice ``[Q - 1, Q + R - 1)``;
the LM head is applied to that slice only (no logits for the prompt), and each chunk is
trimmed to its own longest query/response.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate import state as accelerate_state
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader

from .. import resume
from ..errors import InputError
from ..processes import process_state
from . import checkpointing as ckpt
from . import core, sampling
from .config import PPOConfig
from .cpu_allocator import keep_freed_memory
from .cpu_dropout import use_cpu_dropout
from .guards import (
    GradientGuard,
    NonFiniteError,
    check_finite,
    check_generation_kwargs,
    degenerate_mask,
    effective_generation_param,
    flatten_stop_ids,
    negative_kl_message,
    refuse_low_precision_training,
    stopped,
)
from .kl_controllers import AdaptiveKLController, FixedKLController
from .last_layer import last_layer_from
from .logprob_reuse import reuse_blocker
from .merged_lora import merged_lora
from .mixed_precision import precision_regime
from .optim import AdamTFStyle
from .value_head import AutoModelForCausalLMWithValueHead, causal_lm_logits, dropout_off

logger = logging.getLogger(__name__)

# Statistics that count what the step did: the same on every rank, so not averaged over them
_COUNTS = ("ppo/optimizer_steps", "ppo/skipped_minibatches", "ppo/epochs_run")


def default_collator(data: Sequence[dict]) -> dict:
    """The recipe's collator: a dict of lists (tensors of different lengths stay a list)."""
    return {key: [d[key] for d in data] for key in data[0]}


def tracker_config(config: PPOConfig) -> dict:
    """The config as trackers accept it: TensorBoard's hparams take only int/float/str/bool,
    so None, lists and dicts are written as strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


@dataclass
class RolloutBatch:
    """One PPO batch in the shared layout (see module docstring)."""

    input_ids: torch.Tensor  # (B, Q + R)
    attention_mask: torch.Tensor  # (B, Q + R)
    mask: torch.Tensor  # (B, R) float, 1 on response tokens
    query_lens: list
    response_lens: list
    q_width: int  # Q


def left_pad(seqs: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `seqs` aligned on the right, as `generate` needs (no Python loop)."""
    lens = torch.tensor([len(s) for s in seqs], device=seqs[0].device)
    width = int(lens.max())
    ids = torch.nn.utils.rnn.pad_sequence([s.flip(0) for s in seqs], batch_first=True, padding_value=pad_token_id).flip(1)
    mask = (torch.arange(width, device=ids.device)[None, :] >= (width - lens)[:, None]).long()
    return ids, mask


class PPOTrainer:
    """``PPOTrainer(config, model, ref_model=None, tokenizer, dataset, data_collator)``.

    ``model``: an :class:`AutoModelForCausalLMWithValueHead`, or a causal LM / PEFT model
    (wrapped with a fresh value head). ``ref_model``: None with a PEFT model (the reference
    is the same model with adapters disabled); without PEFT, an explicit frozen model, or
    None for a frozen deep copy of ``model`` taken now.
    """

    def __init__(
        self,
        config: PPOConfig,
        model: nn.Module,
        ref_model: Optional[nn.Module] = None,
        tokenizer=None,
        dataset=None,
        data_collator: Optional[Callable] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> None:
        self.config = config
        cfg = config
        if not accelerate_state.is_initialized():
            process_state()  # on a CPU-only machine too, the launched processes join one run
        self.accelerator = Accelerator(
            log_with=cfg.log_with,
            project_config=ProjectConfiguration(**cfg.project_kwargs),
            **cfg.accelerator_kwargs,
        )
        set_seed(cfg.seed + self.accelerator.process_index)
        if self.accelerator.distributed_type == DistributedType.FSDP:
            # Every forward of an FSDP model is a collective, and the ranks sample responses of
            # different lengths: generation would hang. ZeRO-3 gathers the weights for it.
            raise InputError("the PPO trainer does not run under FSDP (generation on sharded weights would hang); "
                             "for sharded weights use accelerate_configs/deepspeed_zero3.yaml")
        self.is_deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.is_zero3 = self.is_deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if self.is_deepspeed:
            self._configure_deepspeed()
        if cfg.log_with is not None:
            self.accelerator.init_trackers(
                cfg.tracker_project_name, config=tracker_config(cfg), init_kwargs=cfg.tracker_kwargs
            )

        if not isinstance(model, AutoModelForCausalLMWithValueHead):
            model = AutoModelForCausalLMWithValueHead(model)
        self.is_peft_model = model.is_peft_model
        if ref_model is None and not self.is_peft_model:
            # An explicit frozen copy: without adapters there is nothing to switch off.
            ref_model = copy.deepcopy(model.pretrained_model)
        if ref_model is not None:
            if isinstance(ref_model, AutoModelForCausalLMWithValueHead):
                ref_model = ref_model.pretrained_model
            ref_model.requires_grad_(False)
            ref_model.eval()
            if self.is_deepspeed:  # ZeRO-3: sharded like the policy; otherwise a whole copy per process
                from trl.models.utils import (
                    prepare_deepspeed,  # imported only here: TRL costs ~250 MB of RSS
                )

                ref_model = prepare_deepspeed(ref_model, self.accelerator)
            elif not (getattr(ref_model, "is_loaded_in_8bit", False) or getattr(ref_model, "is_loaded_in_4bit", False)):
                ref_model.to(self.accelerator.device)
        self.ref_model = ref_model
        self.tokenizer = tokenizer

        named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named_params]
        if not self.is_deepspeed:
            refuse_low_precision_training(named_params)
        if optimizer is None:
            betas = (cfg.adam_beta1, cfg.adam_beta2)
            if cfg.adam_eps_tf_style:
                optimizer = AdamTFStyle(params, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
            else:
                # fused: one kernel for all parameters (the same update; about 4x faster on CPU than
                # torch's default per-parameter loop there)
                fused = all(p.device.type in ("cpu", "cuda") for p in params) and not self.is_deepspeed
                optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_eps,
                                             weight_decay=cfg.weight_decay, fused=fused or None)
        self.data_collator = data_collator or default_collator
        self.dataloader = None
        # The data order's own generator, kept so a checkpoint can restore an epoch's order.
        self._data_generator = torch.Generator().manual_seed(cfg.seed)
        if dataset is not None:
            self.dataloader = DataLoader(
                dataset,
                batch_size=cfg.batch_size,
                collate_fn=self.data_collator,
                shuffle=True,
                drop_last=True,
                generator=self._data_generator,
            )
        if self.dataloader is not None:
            self.model, self.optimizer, self.dataloader = self.accelerator.prepare(model, optimizer, self.dataloader)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.trainable_params = params
        if self.accelerator.device.type == "cpu":
            use_cpu_dropout(self.unwrapped_model)  # the same masks, drawn at half the cost (cpu_dropout.py)
            if cfg.cpu_malloc_tuning:
                keep_freed_memory()  # no page faults on every step's tensors (cpu_allocator.py)
        # One autocast regime for sampling, the rollout, reference and update passes (mixed_precision.py)
        self.precision = precision_regime(self.accelerator, cfg.bf16_autocast, [self.unwrapped_model, self.ref_model],
                                          cpu_speedups=not self.is_deepspeed)
        # log pi_old / V_old from the sampling passes only where those compute a rollout pass's numbers
        self.reuse_blocker = reuse_blocker(cfg, self.unwrapped_model, self.precision, self.is_zero3)
        logger.info("PPO passes: %s; log pi_old and V_old: %s", self.precision.name,
                    "taken from the sampling passes" if self.reuse_blocker is None
                    else f"recomputed by a rollout pass ({self.reuse_blocker})")
        # NaN/inf gradients are refused before the optimizer step, naming the parameter; under fp16
        # loss scaling an inf gradient is the scaler's business (it skips the step and lowers the scale)
        fp16_scaled = self.accelerator.scaler is not None or (self.is_deepspeed and self.model.fp16_enabled())
        self.gradient_guard = None if fp16_scaled else GradientGuard(named_params)
        self.base_lr = [g["lr"] for g in self.optimizer.param_groups]

        if cfg.adap_kl_ctrl:
            self.kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target, cfg.horizon)
        else:
            self.kl_ctl = FixedKLController(cfg.init_kl_coef)
        self.running = core.RunningMoments()
        self.current_step = 0
        self._perm_gen = torch.Generator().manual_seed(cfg.seed + 1)
        # Data position (for checkpoints): epoch, batches of it taken, generator state at its start
        self.epoch, self.batch_in_epoch = 0, 0
        self._epoch_start_state = self._data_generator.get_state()
        self._sampling_temperature = 1.0
        self._generation_cache: Optional[list] = None
        self._logged_fallbacks: set = set()
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is None:
            eos = self.unwrapped_model.generation_config.eos_token_id
        self.eos_ids = flatten_stop_ids(eos)
        self.stop_ids = flatten_stop_ids(cfg.stop_token_ids)
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_token_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    def _configure_deepspeed(self) -> None:
        """Under DeepSpeed the engine owns micro-batching, loss scaling and the optimizer step:
        give it the PPO geometry (one micro-batch = ``mini_batch_size`` sequences, a step every
        ``gradient_accumulation_steps`` of them, clipping at ``max_grad_norm``), as TRL 0.11 did.
        The trainer tells it each window's boundary and calls its step (``_backward``,
        ``_optimizer_step``), so a window skipped by ``ratio_threshold`` does not step."""
        cfg = self.config
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.mini_batch_size
        ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
        ds["train_batch_size"] = cfg.backward_batch_size * self.accelerator.num_processes
        ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0

    def _autocast(self):
        """The run's one precision regime around a forward pass (:mod:`.mixed_precision`)."""
        return self.precision()

    @property
    def _reuse_generation(self) -> bool:
        """Whether ``step`` takes ``log pi_old`` / ``V_old`` from the sampling passes (:mod:`.logprob_reuse`)."""
        return self.reuse_blocker is None

    @property
    def unwrapped_model(self) -> AutoModelForCausalLMWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    # =====================================================================================
    # 0. queries
    # =====================================================================================
    def batches(self):
        """The dataloader's batches, epoch after epoch, without end, from the current position:
        the batch after the last one taken, or after ``load_checkpoint`` the one after the
        checkpoint's (the epoch's order is replayed from its saved start and the batches
        already taken are skipped). The position is what ``save_checkpoint`` records."""
        while True:
            self._data_generator.set_state(self._epoch_start_state)
            taken = self.batch_in_epoch
            for i, batch in enumerate(self.dataloader):
                if i >= taken:
                    self.batch_in_epoch = i + 1
                    yield batch
            self.epoch += 1
            self.batch_in_epoch = 0
            self._epoch_start_state = self._data_generator.get_state()

    # =====================================================================================
    # 1. rollout: sampling
    # =====================================================================================
    @torch.no_grad()
    def generate(
        self,
        query_tensor,
        length_sampler: Optional[Callable[[], int]] = None,
        batch_size: Optional[int] = None,
        return_prompt: bool = True,
        **generation_kwargs,
    ):
        """Samples responses in batches of ``batch_size`` left-padded prompts (KV cache on),
        with the trainer's sampling loop for pure sampling (``fast_sampling``), else
        transformers' ``generate``.

        Each response is cut after its first EOS or stop token (kept; stop tokens only from
        position ``stop_after``). ``length_sampler()`` draws ``max_new_tokens`` per batch.
        Dropout is off while sampling when ``rollout_in_eval_mode``; sampling runs in the
        run's precision regime, as every pass of ``step``. The sampling temperature is
        recorded for the log-probs of the next ``step``.
        """
        single = isinstance(query_tensor, torch.Tensor) and query_tensor.dim() == 1
        queries = [query_tensor] if single else list(query_tensor)
        model = self.unwrapped_model
        gen_config = model.generation_config
        check_generation_kwargs(
            generation_kwargs, gen_config, model.config.vocab_size, self.config.allow_eos_suppression
        )
        do_sample = effective_generation_param("do_sample", generation_kwargs, gen_config, False)
        temperature = effective_generation_param("temperature", generation_kwargs, gen_config, 1.0)
        self._sampling_temperature = float(temperature) if do_sample else 1.0
        generation_kwargs.setdefault("pad_token_id", self.pad_token_id)
        batch_size = batch_size or self.config.generation_batch_size
        device = self.accelerator.device

        capture = self._reuse_generation
        cache = [] if capture else None
        outputs = []
        # DeepSpeed ZeRO-3: the whole weights are gathered once for the call (TRL's helper)
        # instead of fetched layer by layer at every new token; without gathering, every rank
        # must run as many forwards as the slowest (`synced_gpus`) or the collectives hang.
        unwrapped = contextlib.nullcontext(model)
        if self.is_deepspeed:
            from trl.models.utils import (
                unwrap_model_for_generation,  # imported only here: ~250 MB of RSS
            )

            gather = self.config.ds3_gather_for_generation
            if self.is_zero3 and not gather:
                generation_kwargs.setdefault("synced_gpus", True)
            unwrapped = unwrap_model_for_generation(self.model, self.accelerator, gather_deepspeed3_params=gather)
        own_loop = self._sampling_loop_allowed(model, generation_kwargs, length_sampler is not None)
        # as generate: an explicit eos_token_id=None in the call means no EOS stop
        eos_ids = flatten_stop_ids(generation_kwargs["eos_token_id"] if "eos_token_id" in generation_kwargs else gen_config.eos_token_id)
        merge = self.config.merge_lora_for_sampling and model.is_peft_model and not self.is_zero3
        with (unwrapped as model, dropout_off(model, enabled=self.config.rollout_in_eval_mode),
              merged_lora(model, enabled=merge)):
            for start in range(0, len(queries), batch_size):
                chunk = [q.to(device) for q in queries[start : start + batch_size]]
                kwargs = dict(generation_kwargs)
                if length_sampler is not None:
                    kwargs["max_new_tokens"] = length_sampler()
                input_ids, attention_mask = self._left_pad(chunk)
                if own_loop:
                    with self._autocast():
                        new_tokens, logprobs, hidden = sampling.sample(
                            model.causal_lm, input_ids, attention_mask, kwargs["max_new_tokens"], self._sampling_temperature,
                            eos_ids, kwargs["pad_token_id"], logprob_temperature=self._logprob_temperature() if capture else None,
                            cache_dtype=self.precision.kv_cache_dtype,
                        )
                else:
                    new_tokens, logprobs, hidden = self._transformers_generate(model, input_ids, attention_mask, capture, kwargs)
                responses = self._truncate(new_tokens)
                if capture:
                    cache.extend(self._generation_rows(model, logprobs, hidden, responses))
                for q, r in zip(chunk, responses):
                    outputs.append(torch.cat([q, r]) if return_prompt else r)
        self._generation_cache = cache
        return outputs[0] if single else outputs

    def _transformers_generate(self, model, input_ids, attention_mask, capture: bool, kwargs: dict):
        """``(new tokens, log pi_old, last hidden states)`` from transformers' ``generate``;
        the last two read off its own forwards (forward ``k`` gives the logits of new token
        ``k``) when ``capture``, else None."""
        seen = []  # per forward: (last hidden state, last logits)
        lm_head = model.causal_lm.get_output_embeddings()
        handle = lm_head.register_forward_hook(lambda m, i, o: seen.append((i[0][:, -1], o[:, -1]))) if capture else None
        try:
            with self._autocast():
                generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        new_tokens = generated[:, input_ids.shape[1] :]
        if not capture or len(seen) != new_tokens.shape[1]:  # unexpected generate internals: recomputed later
            return new_tokens, None, None
        hidden = torch.stack([h for h, _ in seen], dim=1)
        logits = torch.stack([o for _, o in seen], dim=1)
        return new_tokens, core.logprobs_from_logits(logits, new_tokens, self._logprob_temperature()), hidden

    def _sampling_loop_allowed(self, model, generation_kwargs: dict, sampled_length: bool) -> bool:
        """Whether ``generate`` samples with :mod:`.sampling`'s loop (pure sampling; not
        ZeRO-3 on the shards, which needs ``synced_gpus``) rather than transformers'
        ``generate``; a fallback is logged once."""
        if not self.config.fast_sampling:
            return False
        kwargs = dict(generation_kwargs, max_new_tokens=1) if sampled_length else generation_kwargs
        reason = sampling.unsupported_reason(model.causal_lm, kwargs)
        if reason is not None and reason not in self._logged_fallbacks:
            self._logged_fallbacks.add(reason)
            logger.info("sampling with transformers' generate (the PPO sampling loop does not handle %s)", reason)
        return reason is None

    def _generation_rows(self, model, logprobs, hidden, responses) -> list:
        """``(response, log pi_old, V_old)`` per row from the sampling passes themselves
        (None entries when they were not captured: the rollout pass recomputes them)."""
        if logprobs is None:
            return [None] * len(responses)
        values = model.v_head(hidden).float()
        return [(r, lp[: len(r)], v[: len(r)]) for r, lp, v in zip(responses, logprobs, values)]

    def _take_generation_cache(self, responses) -> Optional[list]:
        """The cached rows if ``responses`` are exactly those of the last ``generate``."""
        cache, self._generation_cache = self._generation_cache, None
        if cache is None or len(cache) != len(responses) or any(c is None for c in cache):
            return None
        for (r, _, _), resp in zip(cache, responses):
            if r.shape != resp.shape or not torch.equal(r, resp):
                return None
        return cache

    def _left_pad(self, seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(seqs, self.pad_token_id)

    def _stop_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) True where a response may stop: EOS anywhere, stop tokens from ``stop_after``."""
        stop = torch.isin(tokens, torch.tensor(self.eos_ids, device=tokens.device))
        if self.stop_ids:
            late = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= self.config.stop_after
            stop |= torch.isin(tokens, torch.tensor(self.stop_ids, device=tokens.device)) & late
        return stop

    def _truncate(self, generated: torch.Tensor) -> list[torch.Tensor]:
        """Cut each row after its first stop (vectorised search, one slice per row)."""
        stop = self._stop_mask(generated)
        has_stop = stop.any(dim=1)
        first = stop.float().argmax(dim=1)
        lengths = torch.where(has_stop, first + 1, torch.full_like(first, generated.shape[1])).tolist()
        return [row[:n] for row, n in zip(generated, lengths)]

    def _ended(self, responses: Sequence[torch.Tensor]) -> torch.Tensor:
        """Whether each response ends with EOS or a stop token (else it was cut by length)."""
        last = torch.stack([r[-1:] for r in responses])  # (B, 1)
        pos = torch.tensor([len(r) - 1 for r in responses], device=last.device)[:, None]
        stop = torch.isin(last, torch.tensor(self.eos_ids, device=last.device))
        if self.stop_ids:
            stop |= torch.isin(last, torch.tensor(self.stop_ids, device=last.device)) & (pos >= self.config.stop_after)
        return stop[:, 0]

    # =====================================================================================
    # the PPO step
    # =====================================================================================
    def step(self, queries: list, responses: list, scores: list) -> dict:
        """One PPO step on a batch of (query, response, score); returns the statistics."""
        cfg = self.config
        timing = {}
        t_start = time.perf_counter()
        device = self.accelerator.device
        if not (len(queries) == len(responses) == len(scores)) or len(queries) == 0:
            raise InputError(f"step() needs equally many queries/responses/scores, got {len(queries)}/{len(responses)}/{len(scores)}")
        if any(len(q) == 0 for q in queries) or any(len(r) == 0 for r in responses):
            raise InputError("step() got an empty query or response")
        queries = [q.to(device) for q in queries]
        responses = [r.to(device) for r in responses]
        scores = torch.stack([torch.as_tensor(s, dtype=torch.float32).reshape(()) for s in scores]).to(device)
        self._check_finite("rewards (scores passed to step)", scores, "Check the reward model / reward function output.")
        raw_scores = scores.clone()

        # --- scores: missing-EOS penalty (on the raw score), scaling / normalisation, clipping
        ended = self._ended(responses)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~ended).float()
        if cfg.use_score_scaling:
            self._update_running_moments(scores)
            scale = self.running.std + torch.finfo(scores.dtype).eps
            scores = (scores - self.running.mean) / scale if cfg.use_score_norm else scores / scale
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)

        batch = self._make_batch(queries, responses)
        mask = batch.mask
        temperature = self._logprob_temperature()

        # --- 1. rollout forward passes: pi_old log-probs, values, reference log-probs, KL
        t = time.perf_counter()
        cached = self._take_generation_cache(responses) if self._reuse_generation else None
        logprobs, values, ref_logprobs, kl = self._rollout_forward(batch, temperature, cached)
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
        train_stats = self._ppo_updates(batch, logprobs, values, advantages, returns, temperature)
        timing["time/ppo/optimize_step"] = time.perf_counter() - t

        # --- 5. statistics and the KL controller
        t = time.perf_counter()
        stats = self._record_stats(
            batch, scores, raw_scores, logprobs, ref_logprobs, kl, non_score_reward, beta, train_stats, ended, responses
        )
        stats["ppo/learning_rate"] = lr
        self.kl_ctl.update(stats["objective/kl"], len(queries) * self.accelerator.num_processes)
        timing["time/ppo/calc_stats"] = time.perf_counter() - t
        timing["time/ppo/total"] = time.perf_counter() - t_start
        stats.update(timing)
        self.current_step += 1
        return stats

    # -------------------------------------------------------------------------------------
    def _logprob_temperature(self) -> float:
        if not self.config.scale_logits_by_temperature:
            return 1.0
        return float(self.config.temperature) if self.config.temperature is not None else self._sampling_temperature

    def _check_finite(self, name: str, tensor: torch.Tensor, hint: str) -> None:
        """``check_finite`` over every process's tensor, so that all processes stop together
        (one stopping alone would leave the others waiting in the next collective)."""
        if self.accelerator.num_processes > 1:
            tensor = self.accelerator.gather(self.accelerator.pad_across_processes(tensor.reshape(-1).float()))
        check_finite(name, tensor, hint, self.current_step + 1)

    def _update_running_moments(self, scores: torch.Tensor) -> None:
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(torch.stack([scores.sum(), torch.tensor(float(scores.numel()), device=scores.device)]), "sum")
            mean = total[0] / total[1]
            sq = self.accelerator.reduce(((scores - mean) ** 2).sum(), "sum")
            self.running.update(scores, xs_mean=mean, xs_var=sq / total[1], xs_count=float(total[1]))
        else:
            self.running.update(scores)

    def _make_batch(self, queries, responses) -> RolloutBatch:
        q_lens = [len(q) for q in queries]
        r_lens = [len(r) for r in responses]
        Q, R = max(q_lens), max(r_lens)
        device = queries[0].device
        pad = self.pad_token_id
        q_ids = torch.nn.utils.rnn.pad_sequence([q.flip(0) for q in queries], batch_first=True, padding_value=pad).flip(1)
        r_ids = torch.nn.utils.rnn.pad_sequence(list(responses), batch_first=True, padding_value=pad)
        q_len_t = torch.tensor(q_lens, device=device)
        r_len_t = torch.tensor(r_lens, device=device)
        q_mask = torch.arange(Q, device=device)[None, :] >= (Q - q_len_t)[:, None]
        r_mask = torch.arange(R, device=device)[None, :] < r_len_t[:, None]
        return RolloutBatch(
            input_ids=torch.cat([q_ids, r_ids], dim=1),
            attention_mask=torch.cat([q_mask, r_mask], dim=1).long(),
            mask=r_mask.float(),
            query_lens=q_lens,
            response_lens=r_lens,
            q_width=Q,
        )

    def _forward(self, model, batch: RolloutBatch, rows, return_values: bool = True, ref: bool = False):
        """Forward of the rows ``rows``, trimmed to their longest query/response.

        Returns ``(logits, values, labels, r)``: logits (n, r, V) at the positions that
        predict the ``r`` response columns, values (n, r) or None, and those labels.
        """
        q_max = max(batch.query_lens[i] for i in rows)
        r_max = max(batch.response_lens[i] for i in rows)
        Q = batch.q_width
        idx = torch.as_tensor(rows, device=batch.input_ids.device)
        ids = batch.input_ids[idx, Q - q_max : Q + r_max]
        am = batch.attention_mask[idx, Q - q_max : Q + r_max]
        pos = core.position_ids_from_attention_mask(am) if self.config.position_ids_from_attention_mask else None
        if ref and self.ref_model is not None:
            with self._autocast():
                logits = self._reference_logits(ids, am, pos, q_max - 1, r_max)
            values = None
        else:
            with self._autocast():
                logits, values = model(
                    input_ids=ids, attention_mask=am, position_ids=pos, logits_start=q_max - 1, logits_len=r_max, return_values=return_values
                )
        return logits, values, ids[:, q_max:], r_max

    def _reference_logits(self, ids, attention_mask, position_ids, start: int, length: int) -> torch.Tensor:
        """Logits of the explicit reference model at ``[start, start + length)``: through the
        policy's own path (:func:`causal_lm_logits`) for a plain ``*ForCausalLM``, so that a
        frozen copy of the policy computes exactly the policy's numbers; any other module
        (a DeepSpeed engine, a custom wrapper) through its own forward."""
        ref = self.ref_model
        if not self.is_deepspeed and hasattr(ref, "get_decoder") and hasattr(ref, "get_output_embeddings"):
            return causal_lm_logits(ref, ids, attention_mask, position_ids, start, length)[0]
        decoder = ref.get_decoder() if hasattr(ref, "get_decoder") else None
        with last_layer_from(decoder, start):
            out = ref(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                      logits_to_keep=ids.shape[1] - start, use_cache=False)
        return out.logits[:, :length]

    @torch.no_grad()
    def _rollout_forward(self, batch: RolloutBatch, temperature: float, cached: Optional[list] = None):
        """No-grad passes in chunks, dropout off (as TRL 0.11's): ``log pi_old``, ``V_old`` (one
        trunk pass, or taken from ``generate`` when ``cached``), ``log pi_ref`` (adapters
        disabled, or the frozen reference model) and the per-token KL."""
        cfg = self.config
        B, R = batch.mask.shape
        chunk = cfg.rollout_chunk_size
        device = batch.mask.device
        logprobs = torch.zeros(B, R, device=device)
        ref_logprobs = torch.zeros(B, R, device=device)
        values = torch.zeros(B, R, device=device)
        kl = torch.zeros(B, R, device=device)
        unwrapped = self.unwrapped_model
        full = cfg.kl_penalty == "full"
        with dropout_off(unwrapped):
            for start in range(0, B, chunk):
                rows = list(range(start, min(start + chunk, B)))
                if cached is None:
                    logits, v, labels, r = self._forward(self.model, batch, rows)
                    lp = core.logprobs_from_logits(logits, labels, temperature)
                    full_lp = core.log_softmax(logits, temperature) if full else None
                    del logits
                else:
                    r = max(batch.response_lens[i] for i in rows)
                    labels = batch.input_ids[start : start + len(rows), batch.q_width : batch.q_width + r]
                    lp = torch.nn.utils.rnn.pad_sequence([cached[i][1] for i in rows], batch_first=True)
                    v = torch.nn.utils.rnn.pad_sequence([cached[i][2] for i in rows], batch_first=True)
                if self.ref_model is None:
                    with unwrapped.disable_adapter():
                        ref_logits, _, _, _ = self._forward(self.model, batch, rows, return_values=False)
                else:
                    ref_logits, _, _, _ = self._forward(self.model, batch, rows, ref=True)
                ref_lp = core.logprobs_from_logits(ref_logits, labels, temperature)
                m = batch.mask[start : start + len(rows), :r]
                if full:
                    k = core.kl_penalty(full_lp, core.log_softmax(ref_logits, temperature), "full")
                else:
                    k = core.kl_penalty(lp, ref_lp, cfg.kl_penalty)
                sl = slice(start, start + len(rows))
                logprobs[sl, :r] = lp * m
                ref_logprobs[sl, :r] = ref_lp * m
                values[sl, :r] = v.float() * m
                kl[sl, :r] = k * m
        return logprobs, values, ref_logprobs, kl

    def _set_learning_rate(self) -> float:
        cfg = self.config
        frac = 1.0
        if cfg.lr_schedule == "linear":
            frac = max(0.0, 1.0 - self.current_step / cfg.steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lr):
            group["lr"] = base * frac
        return self.base_lr[0] * frac

    # =====================================================================================
    # 4. updates
    # =====================================================================================
    def _ppo_updates(self, batch, old_logprobs, old_values, advantages, returns, temperature) -> dict:
        """``ppo_epochs`` passes of shuffled minibatches; gradients summed over
        ``gradient_accumulation_steps`` minibatches per optimizer step; early stop on the
        last minibatch's policy KL (> 1.5 x ``target_kl``) after an epoch.

        Each minibatch's forward and backward run with dropout off unless
        ``dropout_in_updates``: TRL 0.11 computed the update logits in eval mode too, so that
        ``log pi_theta`` and ``log pi_old`` differ only by what the updates changed. The model
        is left in train mode, as TRL left it (what sampling sees with ``rollout_in_eval_mode=False``)."""
        cfg = self.config
        B = batch.mask.shape[0]
        model = self.unwrapped_model
        model.train()
        if self.gradient_guard is not None:
            self.gradient_guard.reset()
        all_stats: list[dict] = []
        n_opt_steps, n_skipped, epochs_run = 0, 0, 0
        # one switch for all minibatches: their forward and backward (a checkpointed layer's rerun)
        with dropout_off(model, enabled=not cfg.dropout_in_updates):
            for _ in range(cfg.ppo_epochs):
                epochs_run += 1
                perm = torch.randperm(B, generator=self._perm_gen).tolist()
                for w0 in range(0, B, cfg.backward_batch_size):
                    window = perm[w0 : w0 + cfg.backward_batch_size]
                    micro = [window[m : m + cfg.mini_batch_size] for m in range(0, len(window), cfg.mini_batch_size)]
                    contributed = False
                    for j, rows in enumerate(micro):
                        last = j == len(micro) - 1
                        # DDP all-reduces at the window's last backward only; DeepSpeed is told the boundary itself
                        sync = contextlib.nullcontext() if last or self.is_deepspeed else self.accelerator.no_sync(self.model)
                        with sync:
                            # A skipped last minibatch must still run the gradient reduction (DDP's
                            # all-reduce, DeepSpeed's boundary) of the ones accumulated before it.
                            sync_anyway = last and contributed and (self.accelerator.num_processes > 1 or self.is_deepspeed)
                            stats, did_backward, skipped = self._train_minibatch(
                                batch, rows, old_logprobs, old_values, advantages, returns, temperature,
                                len(rows) / len(window), last, sync_anyway,
                            )
                        all_stats.append(stats)
                        contributed |= did_backward
                        n_skipped += int(skipped)
                    if contributed:
                        self._optimizer_step()
                        n_opt_steps += 1
                    self.optimizer.zero_grad(set_to_none=True)
                if cfg.early_stopping:
                    policykl = torch.tensor(all_stats[-1]["ppo/policy/policykl"], device=self.accelerator.device)
                    policykl = self.accelerator.reduce(policykl, "mean") if self.accelerator.num_processes > 1 else policykl
                    if float(policykl) > 1.5 * cfg.target_kl:
                        break
        out = {k: sum(s[k] for s in all_stats) / len(all_stats) for k in all_stats[0]}
        out["ppo/val/var_explained"] = 1 - out["ppo/val/error"] / max(out["ppo/returns/var"], 1e-12)
        out["ppo/optimizer_steps"] = n_opt_steps
        out["ppo/skipped_minibatches"] = n_skipped
        out["ppo/epochs_run"] = epochs_run
        return out

    def _train_minibatch(self, batch, rows, old_logprobs, old_values, advantages, returns, temperature, scale,
                         boundary=True, sync_anyway=False):
        """``loss = L_pg + vf_coef L_vf`` on one minibatch, backward unless skipped.
        ``scale``: this minibatch's share of its accumulation window; ``boundary``: whether it
        is the window's last."""
        cfg = self.config
        logits, vpred, labels, r = self._forward(self.model, batch, rows)
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
        flags = torch.stack([loss.detach().float(), avg_ratio_t.float()])[None]
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.gather(flags)
        check_finite("the PPO loss", flags[:, 0], "Look for NaN/inf logits or values (fp16 overflow?).", self.current_step + 1)
        avg_ratio = avg_ratio_t.item()
        skipped = flags[:, 1].max().item() > cfg.ratio_threshold
        did_backward = True
        if skipped:
            warnings.warn(
                f"mean ratio {flags[:, 1].max().item():.2f} > ratio_threshold {cfg.ratio_threshold}: minibatch skipped "
                f"({'no gradient, no optimizer step' if cfg.ratio_threshold_skips_step else 'loss zeroed as in TRL 0.11'}).",
                stacklevel=2,
            )
            if cfg.ratio_threshold_skips_step:
                did_backward = False
                if sync_anyway:
                    self._backward(loss * 0.0, boundary)
            else:
                self._backward(loss * 0.0, boundary)
        else:
            self._backward(loss * scale, boundary)

        with torch.no_grad():
            entropy = core.masked_mean(entropy, m)
            z = 0.0 if skipped else 1.0
            return (
                {
                    "ppo/loss/policy": z * pg_loss.item(),
                    "ppo/loss/value": z * vf_loss.item(),  # unscaled, as TRL logs it; the total has vf_coef
                    "ppo/loss/total": z * loss.item(),
                    "ppo/policy/entropy": entropy.item(),
                    "ppo/policy/approxkl": core.approx_kl(logprobs, old_lp, m).item(),
                    "ppo/policy/policykl": core.policy_kl(logprobs, old_lp, m).item(),
                    "ppo/policy/clipfrac": pg_clipfrac.item(),
                    "ppo/policy/advantages_mean": core.masked_mean(adv, m).item(),
                    "ppo/policy/ratio_mean": avg_ratio,
                    "ppo/returns/mean": core.masked_mean(ret, m).item(),
                    "ppo/returns/var": core.masked_var(ret, m, unbiased=m.sum() > 1).item(),
                    "ppo/val/vpred": core.masked_mean(vpred, m).item(),
                    "ppo/val/error": core.masked_mean((vpred - ret) ** 2, m).item(),
                    "ppo/val/clipfrac": vf_clipfrac.item(),
                    "ppo/val/mean": core.masked_mean(old_v, m).item(),
                    "ppo/val/var": core.masked_var(old_v, m, unbiased=m.sum() > 1).item(),
                },
                did_backward,
                skipped,
            )

    def _backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """The backend's backward. DeepSpeed's engine is called directly, told whether this
        minibatch ends its accumulation window (it reduces the gradients then), and divides by
        its ``gradient_accumulation_steps`` itself; its step waits for :meth:`_optimizer_step`,
        after the gradient check."""
        if self.is_deepspeed:
            self.model.set_gradient_accumulation_boundary(is_boundary=boundary)
            self.model.backward(loss * self.config.gradient_accumulation_steps)
        else:
            self.accelerator.backward(loss)

    def _optimizer_step(self) -> None:
        """Refuse NaN/inf gradients (naming the parameter; all processes stop together), then
        clip and step: ours, or under DeepSpeed the engine's (it clips at ``max_grad_norm``).
        A NaN/inf gradient never reaches the weights or the optimizer state."""
        if self.gradient_guard is not None:
            multi = self.accelerator.num_processes > 1
            bad = self.gradient_guard.first_nonfinite(
                self.accelerator.device, (lambda x: self.accelerator.reduce(x, "sum")) if multi else None)
            if bad is not None:
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(
                    f"{stopped(self.current_step + 1)}: non-finite value (NaN/inf) in the gradient of {bad}"
                    f"{' (on at least one process)' if multi else ''}; the gradients were discarded and the weights "
                    "and optimizer state were not updated. Look for NaN/inf in logits or values, or lower the lr."
                )
        if self.is_deepspeed:
            self.model.step()
            return
        if self.config.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.trainable_params, self.config.max_grad_norm)
        self.optimizer.step()

    # =====================================================================================
    # 5. statistics
    # =====================================================================================
    def _record_stats(self, batch, scores, raw_scores, logprobs, ref_logprobs, kl, non_score, beta, train_stats, ended, responses):
        """The step's statistics. Under TRL 0.11's keys, TRL's quantities: with several processes
        TRL averaged each of its tensor statistics over the processes (``gather_stats``), and so
        does this; the README's table lists every key."""
        cfg = self.config
        mask = batch.mask
        kl_per_seq = (kl * mask).sum(-1)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True) if self.tokenizer is not None else None
        degenerate = degenerate_mask(
            [r.cpu() for r in responses], texts, cfg.degenerate_token_share, cfg.degenerate_line_share, cfg.degenerate_min_tokens
        )
        q_lens = torch.tensor(batch.query_lens, dtype=torch.float32)
        r_lens = torch.tensor(batch.response_lens, dtype=torch.float32)

        def std(x):
            return x.std() if x.numel() > 1 else torch.zeros((), device=x.device)

        averaged = {  # per process, then averaged over the processes
            "objective/kl": kl_per_seq.mean(),
            "objective/entropy": (-logprobs * mask).sum(-1).mean(),
            "ppo/mean_non_score_reward": core.masked_mean(non_score, mask),
            "ppo/mean_scores": scores.mean(),
            "ppo/std_scores": std(scores),
            "ppo/mean_raw_scores": raw_scores.mean(),
            "env/missing_eos_share": (~ended).float().mean(),
            "env/degenerate_share": degenerate.float().mean().to(scores.device),
        }
        updates = {k: v for k, v in train_stats.items() if k not in _COUNTS}  # floats already
        values = torch.cat([torch.stack([v.double() for v in averaged.values()]),
                            torch.tensor(list(updates.values()), dtype=torch.float64, device=scores.device)])
        if self.accelerator.num_processes > 1:  # one call for all of them; one beta on every rank
            values = self.accelerator.reduce(values, "mean")
        stats = dict(zip([*averaged, *updates], values.tolist()))
        stats.update({
            "objective/kl_dist": kl_per_seq.cpu(),
            "objective/logprobs": logprobs.cpu(),
            "objective/ref_logprobs": ref_logprobs.cpu(),
            "objective/kl_coef": beta,
            "tokens/queries_len_mean": q_lens.mean().item(),
            "tokens/queries_len_std": std(q_lens).item(),
            "tokens/responses_len_mean": r_lens.mean().item(),
            "tokens/responses_len_std": std(r_lens).item(),
            **{k: train_stats[k] for k in _COUNTS},
        })
        mean_kl, degenerate_share = stats["objective/kl"], stats["env/degenerate_share"]
        if mean_kl < -cfg.negative_kl_warning:
            warnings.warn(negative_kl_message(mean_kl), stacklevel=3)
        if degenerate_share > cfg.degenerate_share_threshold:
            warnings.warn(
                f"possible reward hacking: {degenerate_share:.0%} of the responses are dominated by one repeated "
                f"token or line (threshold {cfg.degenerate_share_threshold:.0%}). Inspect samples; consider a "
                "larger KL coefficient or a reward-model fix.",
                stacklevel=3,
            )
        return stats

    def log_stats(self, stats: dict, batch: dict, rewards, columns_to_log: Sequence[str] = ("query", "response")) -> dict:
        """Logs the scalar statistics (and reward mean/std) to the trackers and to
        ``config.log_jsonl``; returns the logged dict of floats."""
        rewards = torch.stack([torch.as_tensor(r, dtype=torch.float32).reshape(()) for r in rewards]).to(self.accelerator.device)
        rewards = self.accelerator.gather(rewards) if self.accelerator.num_processes > 1 else rewards
        logs = {}
        for k, v in stats.items():
            if isinstance(v, torch.Tensor):
                if v.numel() == 1:
                    logs[k] = float(v)
            elif isinstance(v, (int, float)):
                logs[k] = float(v)
        logs["env/reward_mean"] = rewards.mean().item()
        logs["env/reward_std"] = rewards.std().item() if rewards.numel() > 1 else 0.0
        logs["env/step"] = self.current_step
        if self.config.log_with is not None:
            self.accelerator.log(logs, step=self.current_step)
        if self.config.log_jsonl and self.accelerator.is_main_process:
            row = dict(logs)
            if batch is not None and all(c in batch for c in columns_to_log):
                row["samples"] = [
                    {**{c: batch[c][i] for c in columns_to_log}, "reward": float(rewards[i])}
                    for i in range(min(len(batch[columns_to_log[0]]), rewards.numel()))
                ]
            os.makedirs(os.path.dirname(os.path.abspath(self.config.log_jsonl)), exist_ok=True)
            with open(self.config.log_jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.last_logs = logs
        return logs

    # =====================================================================================
    # saving
    # =====================================================================================
    def save_pretrained(self, save_directory: str) -> None:
        """Saves the policy (adapter or full model) with its value head, and the tokenizer."""
        self.accelerator.wait_for_everyone()
        # ZeRO-3 holds a shard of each weight per process: gather them (every process takes part)
        state_dict = self.accelerator.get_state_dict(self.model) if self.is_deepspeed else None
        if self.accelerator.is_main_process:
            self.unwrapped_model.save_pretrained(save_directory, state_dict=state_dict)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(save_directory)

    def save_checkpoint(self, output_dir: str, extra: Optional[dict] = None, save_total_limit: Optional[int] = None,
                        **stateful) -> Path:
        """Writes ``<output_dir>/checkpoint-<step>/`` with everything a resumed run needs to go on
        as if never stopped (files: :mod:`stackllama.ppo.checkpointing`), then keeps only the
        newest ``save_total_limit`` checkpoints.

        The folder is written under a staging name and renamed when complete (marker last), so
        a kill during the save leaves nothing that ``load_checkpoint`` would trust. ``extra``:
        JSON-able state of the caller (returned by ``load_checkpoint``); ``stateful``: objects
        with ``state_dict`` / ``load_state_dict`` saved per process (e.g. the length sampler).
        Call it on every process: each writes its own random state.
        """
        start = time.perf_counter()
        acc = self.accelerator
        final = ckpt.checkpoint_dir(output_dir, self.current_step)
        if acc.is_main_process:
            resume.clear_staging(final)
        acc.wait_for_everyone()
        staging = resume.staging_dir(final)
        self.save_pretrained(str(staging))  # the policy, reloadable as it is
        if acc.is_main_process and not self.is_deepspeed:
            torch.save(self.optimizer.state_dict(), staging / ckpt.OPTIMIZER_FILE)
        if self.is_deepspeed:  # the optimizer state is sharded: every process writes its part
            self.model.save_checkpoint(str(staging / ckpt.DEEPSPEED_DIR), tag=ckpt.DEEPSPEED_TAG,
                                       exclude_frozen_parameters=True)
        if acc.is_main_process:
            state = {**self.state_dict(), "num_processes": acc.num_processes, "batch_size": self.config.batch_size,
                     "data": {"epoch": self.epoch, "batch": self.batch_in_epoch,
                              "batches_per_epoch": len(self.dataloader) if self.dataloader is not None else None},
                     "extra": extra or {}}
            (staging / ckpt.TRAINER_STATE).write_text(json.dumps(state, indent=1) + "\n")
        rng = {"rng": ckpt.encode_rng(resume.rng_state()), "perm_generator": self._perm_gen.get_state(),
               "data_epoch_start": self._epoch_start_state, **{k: v.state_dict() for k, v in stateful.items()}}
        torch.save(rng, staging / ckpt.rng_file(acc.process_index))
        acc.wait_for_everyone()
        if acc.is_main_process:
            resume.finalize(staging, final, {"stage": "ppo", "step": self.current_step})
            resume.prune(output_dir, ckpt.PREFIX, save_total_limit)
            logger.info("saved %s (%.2f s)", final, time.perf_counter() - start)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, directory: str, **stateful) -> dict:
        """Restores a ``save_checkpoint`` folder into this trainer (built as for a fresh run, so
        the reference policy stays the starting model) and returns the caller's ``extra``.
        The log is cut back to the checkpoint's step. Call it last before the loop: it sets
        the random generators."""
        directory = Path(directory)
        acc = self.accelerator
        state = json.loads((directory / ckpt.TRAINER_STATE).read_text())
        batches = len(self.dataloader) if self.dataloader is not None else None
        saved = (state["num_processes"], state["batch_size"], state["data"]["batches_per_epoch"])
        if saved != (acc.num_processes, self.config.batch_size, batches):
            raise InputError(
                f"{directory} was written by {saved[0]} process(es) with batch_size {saved[1]} and {saved[2]} batches per "
                f"epoch; this run has {acc.num_processes}, {self.config.batch_size} and {batches}. Resume with the same "
                "processes, batch size and queries, or start a new run.")
        if self.is_deepspeed:  # trainable weights and optimizer shards, each process its own
            if not (directory / ckpt.DEEPSPEED_DIR).is_dir():
                raise InputError(f"{directory} was not written under DeepSpeed (no {ckpt.DEEPSPEED_DIR}/); resume it "
                                 "with the launcher that wrote it")
            self.model.load_checkpoint(str(directory / ckpt.DEEPSPEED_DIR), tag=ckpt.DEEPSPEED_TAG,
                                       load_module_strict=False, load_lr_scheduler_states=False)
        else:
            if (directory / ckpt.DEEPSPEED_DIR).is_dir():
                raise InputError(f"{directory} was written under DeepSpeed; resume it under the same DeepSpeed config")
            ckpt.load_policy_weights(self.unwrapped_model, directory)
            optimizer_state = torch.load(directory / ckpt.OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(optimizer_state)  # moved to the parameters' device
        self.load_state_dict(state)
        self.epoch, self.batch_in_epoch = state["data"]["epoch"], state["data"]["batch"]
        if self.current_step > 0:
            self.unwrapped_model.train()  # as the last update left it (matters when rollouts keep dropout)
        if self.config.log_jsonl and acc.is_main_process:
            ckpt.truncate_log(self.config.log_jsonl, self.current_step)
        rng = torch.load(directory / ckpt.rng_file(acc.process_index), map_location="cpu", weights_only=True)
        for name, obj in stateful.items():
            obj.load_state_dict(rng[name])
        self._perm_gen.set_state(rng["perm_generator"])
        self._epoch_start_state = rng["data_epoch_start"]
        resume.set_rng_state(ckpt.decode_rng(rng["rng"]))
        return state["extra"]

    def state_dict(self) -> dict:
        """Trainer state beyond the weights (for resuming): step, KL coef, score moments."""
        return {"step": self.current_step, "kl_ctl": self.kl_ctl.state_dict(), "running": self.running.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.current_step = state["step"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.running.load_state_dict(state["running"])
