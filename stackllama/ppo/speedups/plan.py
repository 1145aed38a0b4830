"""Which speed-ups a PPO run uses: :func:`plan_speedups`, called once by the trainer.

Each speed-up's condition lives in its own module (:func:`~.logprob_reuse.reuse_blocker`,
:func:`~.merged_lora.merge_applies`, :func:`~.sampling_loop.unsupported_reason`,
:func:`~.cuda_graph_decode.capture_blocker`,
:func:`~.cpu_dropout.use_cpu_dropout`, :func:`~.mixed_precision.precision_regime`); this
module asks each of them and logs the answers, so the first lines of a run say what runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from .cpu_dropout import use_cpu_dropout
from .cuda_graph_decode import CudaGraphs, capture_blocker
from .logprob_reuse import reuse_blocker
from .merged_lora import merge_applies
from .mixed_precision import PrecisionRegime, precision_regime
from .sampling_loop import unsupported_reason

logger = logging.getLogger(__name__)


@dataclass
class Speedups:
    """The speed-ups of one run, decided at construction (sampling loop: per ``generate`` call)."""

    precision: PrecisionRegime
    """The autocast regime of every pass (sampling, rollout, reference, updates)."""
    reuse_blocker: Optional[str]
    """Why ``log pi_old`` / ``V_old`` are recomputed by a rollout pass; None: taken from sampling."""
    merge_lora_for_sampling: bool
    """Whether sampling runs with the LoRA adapters folded into the weights."""
    sampling_loop: bool
    """Whether pure sampling may use the PPO sampling loop (``fast_sampling``)."""
    cuda_graph_blocker: Optional[str] = "not planned"
    """Why the sampling loop's decode step is not replayed as a CUDA graph; None: it is."""
    cpu_dropout_layers: int = 0
    """How many dropout layers draw their masks the CPU way."""
    cuda_graphs: Optional[CudaGraphs] = None
    """The run's graph capturer when ``cuda_graph_blocker`` is None (it remembers a failed capture)."""
    _logged: set = field(default_factory=set)

    @property
    def reuse_logprobs(self) -> bool:
        return self.reuse_blocker is None

    @property
    def decode_path(self) -> str:
        """How the sampling loop decodes, for logs and benchmarks: ``CUDA graph`` or ``eager (<why>)``."""
        if self.cuda_graphs is not None:
            return self.cuda_graphs.path
        return f"eager ({self.cuda_graph_blocker})"

    def graphs_for_loop(self) -> Optional[CudaGraphs]:
        """The capturer for the next call of the sampling loop, or None to decode eagerly."""
        graphs = self.cuda_graphs
        return graphs if graphs is not None and graphs.failed is None else None

    def use_sampling_loop(self, causal_lm, generation_kwargs: dict, sampled_length: bool) -> bool:
        """Whether this ``generate`` call samples with the PPO loop (pure sampling) rather than
        transformers' ``generate``; each fallback reason is logged once."""
        if not self.sampling_loop:
            return False
        kwargs = dict(generation_kwargs, max_new_tokens=1) if sampled_length else generation_kwargs
        reason = unsupported_reason(causal_lm, kwargs)
        if reason is not None and reason not in self._logged:
            self._logged.add(reason)
            logger.info("sampling with transformers' generate (the PPO sampling loop does not handle %s)", reason)
        return reason is None


def plan_speedups(config, model, ref_model, accelerator, backend) -> Speedups:
    """The speed-ups for ``model`` (the unwrapped value-head policy after ``accelerator.prepare``,
    so DeepSpeed's dtype is seen) and ``ref_model`` (None: adapters disabled) on ``accelerator``'s
    device under ``backend``; applies the ones that change modules (CPU dropout) and logs all."""
    sharded = backend.is_zero3
    cpu_dropout = use_cpu_dropout(model, accelerator.device)
    graph_blocker = ("fast_sampling=False" if not config.fast_sampling
                     else "cuda_graph_sampling=False" if not config.cuda_graph_sampling
                     else capture_blocker(model.causal_lm, accelerator.device, sharded))
    # DeepSpeed casts the weights itself: bf16 autocast's CPU weight caching would fight it
    precision = precision_regime(accelerator, config.bf16_autocast, [model, ref_model],
                                 cpu_speedups=not backend.is_deepspeed)
    plan = Speedups(
        precision=precision,
        reuse_blocker=reuse_blocker(config, model, precision, sharded),
        merge_lora_for_sampling=merge_applies(model, config.merge_lora_for_sampling, sharded),
        sampling_loop=config.fast_sampling,
        cuda_graph_blocker=graph_blocker,
        cpu_dropout_layers=cpu_dropout,
        cuda_graphs=CudaGraphs() if graph_blocker is None else None,
    )
    logger.info("PPO passes: %s; log pi_old and V_old: %s", precision.name,
                "taken from the sampling passes" if plan.reuse_logprobs
                else f"recomputed by a rollout pass ({plan.reuse_blocker})")
    logger.info("PPO speed-ups: sampling loop %s (decode: %s), LoRA merged for sampling %s, CPU dropout in %d layers",
                "on" if plan.sampling_loop else "off", plan.decode_path,
                "on" if plan.merge_lora_for_sampling else "off", cpu_dropout)
    return plan
