"""Configuration of the PPO trainer.

Field names follow TRL 0.11's ``PPOConfig`` so that the recipe's scripts read the same, and
every default reproduces TRL 0.11's ``PPOTrainer.step`` *except* the options marked
**[fix]**: those correct what the old trainer got wrong. Each fix is chosen so that it
changes nothing for the recipe's own settings when the old behaviour was already right
(temperature 1, no dropout, finite ratios) and only matters where the old one was wrong.
Options marked **[not TRL]** leave TRL 0.11's behaviour for something else that some users
want; they are off by default.

Dropout, as TRL 0.11 ran it: its rollout passes (``log pi_old``, ``V_old``, ``log pi_ref``)
and its update passes (``log pi_theta``, ``V_theta`` for the losses) all ran in eval mode
(``batched_forward_pass`` calls ``model.eval()``), so the recipe's LoRA dropout (0.05) and
value-head dropout (0.1) never touched a loss; only sampling after the first step ran in train
mode, because ``train_minibatch`` left the model there. Here every pass of ``step`` runs with
dropout off, and so does sampling (``rollout_in_eval_mode``, a fix); ``dropout_in_updates``
turns dropout on in the update passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..errors import InputError
from .core import KL_PENALTIES


@dataclass
class PPOConfig:
    # ------------------------------------------------------------------ run
    exp_name: str = "ppo"
    """Name of the run (tracker run name)."""
    seed: int = 0
    """Seed; process ``i`` samples with ``seed + i`` (LMHP; TRL used the same seed on every
    rank, which makes ranks draw correlated samples)."""
    steps: int = 20000
    """Planned number of PPO steps; the ``linear`` learning-rate schedule reaches 0 there."""
    log_with: Optional[str] = None
    """Accelerate tracker (``wandb``, ``tensorboard``...) or None."""
    tracker_project_name: str = "stackllama"
    tracker_kwargs: dict = field(default_factory=dict)
    accelerator_kwargs: dict = field(default_factory=dict)
    """Extra ``accelerate.Accelerator`` arguments, e.g. ``{"mixed_precision": "bf16"}``."""
    project_kwargs: dict = field(default_factory=dict)
    bf16_autocast: bool = False
    """Run every forward pass (sampling, rollout, reference, updates) under bf16 autocast;
    log-probs, values and losses stay fp32, and so do the trainable weights. The same regime
    applies when accelerate's ``mixed_precision`` is ``bf16`` (``accelerate launch
    --mixed_precision bf16``, every shipped accelerate config): this option is for runs
    without it. Implemented with ``torch.autocast`` around every pass, the sampling loop and
    an explicit reference model included (accelerate autocasts only the model it prepared).
    On CPU, frozen weights are cast once and attention runs in fp32
    (:mod:`stackllama.ppo.speedups.mixed_precision`). Under any autocast the rollout pass is recomputed
    rather than taken from sampling (see ``reuse_generation_logprobs``). On a GPU with LoRA, a
    bf16 base (``--dtype bfloat16``) is the cheaper way to bf16: the frozen weights are stored
    in bf16 once, the adapters stay fp32 (see benchmarks/RESULTS.md for measured steps)."""
    ds3_gather_for_generation: bool = True
    """Under DeepSpeed ZeRO-3, gather the whole weights on every process for each ``generate``
    call (fast; needs the unsharded model to fit on one device). False: generate on the
    sharded model with ``synced_gpus`` (slow, for models that only fit sharded)."""
    log_jsonl: Optional[str] = None
    """If set, ``log_stats`` appends one JSON line of scalar stats (and sample rows) here."""

    # ------------------------------------------------------------------ batch geometry
    batch_size: int = 128
    """Rollouts per PPO step and process."""
    mini_batch_size: int = 128
    """Sequences per forward/backward in the update epochs."""
    gradient_accumulation_steps: int = 1
    """Minibatches whose gradients are summed before one optimizer step."""
    ppo_epochs: int = 4
    """Passes over the rollout batch, each over freshly shuffled minibatches."""
    rollout_batch_size: Optional[int] = None
    """Sequences per no-grad rollout forward pass (``log pi_ref``, and ``log pi_old`` /
    ``V_old`` when recomputed); bounds their memory. None: ``max(mini_batch_size, 8)``, at
    most ``batch_size``: a no-grad pass keeps no activations for a backward, so 8 sequences
    in one pass need less memory than an update of one, and fewer, larger passes are faster."""
    generation_batch_size: int = 4
    """Prompts per ``generate`` call (TRL's default 4); left-padded, KV cache on."""
    fast_sampling: bool = True
    """Speed: when the generation settings are pure sampling (``do_sample``, ``top_k=0``,
    ``top_p=1``, a temperature, ``max_new_tokens``: the recipe's), sample with the
    trainer's own decode loop (:mod:`stackllama.ppo.speedups.sampling_loop`) instead of transformers'
    ``generate``: the same distribution, without ``generate``'s per-token processors and a
    vocabulary-wide ``multinomial``. Other settings, and ZeRO-3 sampling on the shards
    (``ds3_gather_for_generation=False``), use ``generate``. False: always ``generate``."""
    cuda_graph_sampling: bool = True
    """Speed, on a CUDA device: the sampling loop (``fast_sampling``) decodes with a static KV
    cache and replays each token's step as one captured CUDA graph instead of launching its
    kernels one by one (:mod:`stackllama.ppo.speedups.cuda_graph_decode`): the same distribution,
    drawn from the same formula. Not on CPU, an 8-bit base, under ZeRO-3, or with an attention
    other than ``sdpa``/``eager``; a step that fails to capture falls back to the eager loop.
    The log says which decode path ran."""
    merge_lora_for_sampling: bool = True
    """Speed: while sampling, run each LoRA-adapted ``nn.Linear`` as one matmul with
    ``W + s B A`` (a temporary copy of the adapted weights; the base is not modified) instead
    of the base matmul plus the adapter path (:mod:`stackllama.ppo.speedups.merged_lora`). Not for
    a quantized base, LoRA variants (DoRA) or under ZeRO-3, which keep the adapter path."""
    cpu_malloc_tuning: bool = True
    """Speed, on CPU: keep glibc malloc from unmapping and re-faulting the memory of each
    step's tensors (:mod:`stackllama.ppo.speedups.cpu_allocator`). Process-wide, so
    ``scripts/rl_ppo.py`` applies it before loading the models; freed memory (up to 256 MB)
    stays with the process. Off on GPU."""

    # ------------------------------------------------------------------ optimizer
    learning_rate: float = 1.41e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    adam_eps_tf_style: bool = False
    """False: PyTorch Adam (``eps`` added to ``sqrt(v_hat)``, TRL). True: TensorFlow/LMHP
    Adam, step ``lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)``: eps outside the bias
    correction, which with LMHP's eps 1e-5 damps the first updates. Default False to keep
    the recipe's optimizer."""
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    """``constant`` (TRL, the recipe's run) or ``linear``: ``lr_k = lr (1 - k / steps)``
    for PPO step ``k`` (LMHP). Default constant to reproduce the recipe."""
    max_grad_norm: Optional[float] = None
    """Clip the global gradient norm before each optimizer step (None: no clipping)."""

    # ------------------------------------------------------------------ PPO
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_unbiased: bool = True
    """Bessel-corrected variance when whitening (TRL); False = biased (LMHP)."""
    early_stopping: bool = False
    """Stop the epochs once the last minibatch's ``policy/policykl`` > 1.5 x ``target_kl``."""
    target_kl: float = 1.0
    ratio_threshold: float = 10.0
    """A minibatch whose mean ratio ``mean_m(pi / pi_old)`` exceeds this is skipped."""
    ratio_threshold_skips_step: bool = True
    """**[fix]** True: a skipped minibatch adds no gradient and, if nothing else in its
    accumulation window contributes, the optimizer does not step at all, so the weights do
    not move. False: TRL 0.11 (zeroed loss, but Adam still stepped on its momentum)."""

    # ------------------------------------------------------------------ KL
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    kl_penalty: str = "kl"
    """Per-token KL estimator: ``kl``, ``abs``, ``mse`` or ``full`` (see core.kl_penalty)."""
    target: float = 6.0
    horizon: float = 10000.0
    negative_kl_warning: float = 1e-3
    """Warn (with the likely causes) when the batch mean KL is below ``-this``. TRL warned
    only below -1; a negative mean KL is impossible for the true KL, so we warn just below 0:
    not for float rounding while the policy still equals the reference (the first step's
    KL is then about +-1e-6: the sampling pass with its KV cache against a full pass)."""

    # ------------------------------------------------------------------ scores
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: Optional[float] = None
    whiten_rewards: bool = False
    missing_eos_penalty: Optional[float] = None
    """**[fix]** Subtract this from the score of every response that never emitted EOS or
    a stop token ("EOS trick"); None: off (TRL 0.11 had no such option)."""

    # ------------------------------------------------------------------ rollouts
    scale_logits_by_temperature: bool = True
    """**[fix]** Divide logits by the sampling temperature in every log-prob (rollout,
    reference, update), so that ``pi_old`` is the distribution that was sampled. TRL 0.11
    always used temperature 1. Identical to TRL for the recipe (temperature 1)."""
    temperature: Optional[float] = None
    """Temperature of the log-probs; None: the one the last ``generate`` call sampled with
    (1.0 before any call). Set it when responses come from elsewhere."""
    rollout_in_eval_mode: bool = True
    """**[fix]** Sample with dropout off. TRL 0.11 left the model in train mode after the
    first update, so LoRA / value-head dropout was active while it sampled (its rollout
    passes, ``log pi_old`` / ``V_old`` / ``log pi_ref``, ran in eval mode, as they always do
    here). False: sample in the mode the model is in (train mode after an update, as TRL)."""
    dropout_in_updates: bool = False
    """**[not TRL]** Keep dropout on in the update passes' forward and backward (``log
    pi_theta`` and ``V_theta`` for the losses). False (TRL 0.11, and the N implementation
    details, which train without dropout): dropout off there too, so that with the weights
    unchanged the ratio is exactly 1 and the value and policy clip fractions 0; with it on,
    dropout noise alone moves the ratio and clips values before any update."""
    reuse_generation_logprobs: bool = True
    """Speed: take ``log pi_old`` and ``V_old`` of the responses from the forward passes
    sampling already ran (the last hidden state and logits at each sampled token), instead
    of a second no-grad pass of the policy, where the two compute the same numbers: fp32
    weights and no autocast (neither ``bf16_autocast`` nor accelerate's mixed precision,
    nor a bf16 DeepSpeed engine), no 4/8-bit base, no ZeRO-3, no dropout while sampling,
    not ``kl_penalty="full"`` (:mod:`stackllama.ppo.speedups.logprob_reuse`; the log says which way
    it went and why). There they agree to fp32 rounding (KV cache vs full pass; tested).
    Used only when ``step`` receives the :class:`~stackllama.ppo.generation.Responses` that
    ``generate(..., return_prompt=False)`` returned, before any update since.
    Elsewhere the two passes round differently, enough to move the reward and KL curves
    (``benchmarks/ppo_bf16_curves.py``), so the pass is recomputed."""
    position_ids_from_attention_mask: bool = True
    """**[fix]** Pass ``position_ids = cumsum(attention_mask) - 1`` in every forward pass, so
    that left padding does not shift positions (``generate`` already does this). TRL 0.11
    used ``arange`` positions, which changes models with absolute positions."""
    stop_token_ids: Optional[list[int]] = None
    """**[fix]** Extra stop tokens: responses are cut after the first EOS or stop token
    (kept). TRL cut only at EOS."""
    stop_after: int = 0
    """Stop tokens count only at response position >= this (LMHP: "." after 16 tokens).
    EOS always counts."""
    allow_eos_suppression: bool = False
    """False: ``generate`` refuses ``min_length`` / ``min_new_tokens``, which forbid EOS
    while sampling, so the sampled distribution is not the model's and the KL to the
    reference (computed on the model's probabilities) is biased, often negative.
    True: warn instead."""

    # ------------------------------------------------------------------ reward-hacking monitor
    degenerate_share_threshold: float = 0.5
    """Warn when more than this share of a batch's responses is degenerate (below)."""
    degenerate_token_share: float = 0.5
    """A response is degenerate when one token is more than this share of its tokens
    (at least ``degenerate_min_tokens`` tokens)..."""
    degenerate_line_share: float = 0.5
    """...or one non-empty line is more than this share of its (at least 3) lines."""
    degenerate_min_tokens: int = 8

    def __post_init__(self) -> None:
        if self.kl_penalty not in KL_PENALTIES:
            raise InputError(f"kl_penalty must be one of {KL_PENALTIES}, got {self.kl_penalty!r}")
        if self.lr_schedule not in ("constant", "linear"):
            raise InputError(f"lr_schedule must be 'constant' or 'linear', got {self.lr_schedule!r}")
        if self.use_score_norm and not self.use_score_scaling:
            raise InputError("use_score_norm needs use_score_scaling=True (as in TRL).")
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1")
        if self.stop_token_ids is not None:
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def rollout_chunk_size(self) -> int:
        """The effective ``rollout_batch_size``."""
        return self.rollout_batch_size or min(max(self.mini_batch_size, 8), self.batch_size)

    @property
    def backward_batch_size(self) -> int:
        """Sequences per optimizer step: ``mini_batch_size * gradient_accumulation_steps``."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
