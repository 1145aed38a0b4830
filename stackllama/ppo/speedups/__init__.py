"""The PPO trainer's speed-ups, each with the condition under which it applies.

Every one computes what the plain path computes (to float rounding, where said); what
each saves is measured in ``benchmarks/RESULTS.md``. :func:`plan.plan_speedups` is the one
entry point: it decides which apply to a given model, device and config, and logs it.

- :mod:`.mixed_precision`  one autocast regime for every pass; bf16 autocast's CPU specifics
- :mod:`.logprob_reuse`    ``log pi_old`` / ``V_old`` taken from the sampling passes
- :mod:`.sampling_loop`    the decode loop for pure sampling (instead of ``generate``)
- :mod:`.cuda_graph_decode` that loop's decode step replayed as a captured CUDA graph (GPU)
- :mod:`.merged_lora`      LoRA folded into the weights while sampling
- :mod:`.last_layer`       the last decoder layer run only where logits are read
- :mod:`.cpu_dropout`      dropout masks drawn at half the cost on CPU
- :mod:`.cpu_allocator`    glibc malloc settings for CPU training (process-wide: the script applies it)
"""
