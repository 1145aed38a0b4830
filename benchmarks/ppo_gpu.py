"""Times decoding and the PPO step of stackllama's trainer on one GPU, against the memory-bandwidth floor.

Why: on one H100 with the LLaMA-7B shape (bf16 base) the recipe's PPO step took 13.4 s with
the GPU busy 11-21 % of it, and decoding 64 tokens for 8 prompts took 25 ms per token, where
reading the weights once per token (the floor of a decode step) takes about 4 ms
(13 GB / 3.35 TB/s). The trainer's sampling loop can replay each decode step as one captured
CUDA graph (``stackllama/ppo/speedups/cuda_graph_decode.py``); this script says how close each
decode path comes to the floor and what the PPO step costs with it, at the recipe's batch per
GPU and bigger ones. Sections, each printed as it completes (a failing one is reported and the
next one runs; ``--time_budget_s`` skips the remaining ones once spent):

1. bandwidth: the GPU's peak memory bandwidth from a table of known GPUs (looked up from
   ``torch.cuda.get_device_name()``), and a measured one (a large device-to-device copy: reads
   n and writes n bytes). The floor uses the table's peak when the GPU is known, else the
   measured figure; the output says which.
2. decode: ms per new token on a random LLaMA of the chosen shape (built on the device, nothing
   written to disk, no Hub) for the trainer's eager sampling loop, its static-cache loop with the
   decode step replayed as a CUDA graph, and transformers' ``generate``; ``ms/token = (t(N) -
   t(1)) / (N - 1)`` (the prefill excluded; "steady" leaves out the capture and its warm-up steps
   as well), against ``weight bytes / bandwidth``. No EOS, so every step runs.
3. PPO step: the trainer on that LLaMA with LoRA r16 on q/v (dropout 0.05) on the frozen base,
   a value head, and a random LLaMA sequence classifier as reward (2 layers of the same width,
   the full shape with ``--full_reward``) fed the token ids directly (the "same tokenizer" fast
   path); seconds per step split into generation / scoring / rollout forward / optimisation
   (``ppo_timing.time_step``, median of ``--steps`` after one warm-up), at batch 8 (the
   recipe's per GPU), 32 and 64. The recipe's geometry is kept: ``mini_batch_size = B / 8`` with
   ``gradient_accumulation_steps = 8`` (at B=8 the recipe's 1 x 8): 8 forward/backward passes
   and one optimizer step per epoch whatever B. Batch 8 runs with the CUDA-graph decode and
   without (``cuda_graph_sampling=False``), so the speed-up shows; bigger batches with the
   default only. Under bf16 every pass runs under bf16 autocast, as the recipe under accelerate's
   bf16. Early stopping is off so every step runs all its epochs.

    python benchmarks/ppo_gpu.py --json runs/ppo_gpu.json     # on the GPU: LLaMA-7B shape, bf16 (~13 GB)
    python benchmarks/ppo_gpu.py --shape tiny --batch_sizes 2 --ppo_batch_sizes 2 --new_tokens 4 \\
        --prompt_len 6 --steps 1 --ppo_epochs 1                 # on CPU: the same sections, tiny
    python benchmarks/ppo_gpu.py --ppo_epochs 1 --ppo_batch_sizes 8 --no_cuda_graph   # eager baseline only

Random weights say nothing about quality: only seconds, tokens/s and memory are meaningful.
A figure printer, never a pass/fail test.
"""

from __future__ import annotations

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
import argparse
import contextlib
import gc
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
import traceback
import warnings
from typing import Callable, Optional

_START = time.perf_counter()  # the time budget counts from here: imports and model construction are part of the run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ppo_timing, when imported from elsewhere

import torch  # noqa: E402
from ppo_timing import PARTS, IdTokenizer, median_of, time_step  # noqa: E402

from stackllama.atomic import write_json  # noqa: E402

# --------------------------------------------------------------------------- the arithmetic (pure)

# Peak memory bandwidth in bytes/s by device name (vendor figures). First match wins: the more
# specific patterns first ("H100 PCIe" before "H100", "GH200" before "H200", "A100" before "A10",
# "L40S"/"L40" before "L4"). Names as torch.cuda.get_device_name() gives them, e.g.
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB".
GPU_BANDWIDTH: list[tuple[str, str, float]] = [
    (r"GH200.*144", "GH200 144GB HBM3e", 4.9e12),
    (r"GH200", "GH200 96GB HBM3", 4.0e12),
    (r"B200", "B200", 8.0e12),
    (r"H200", "H200", 4.8e12),
    (r"H100.*PCIE", "H100 PCIe", 2.0e12),
    (r"H100.*NVL", "H100 NVL", 3.9e12),
    (r"H100", "H100 SXM", 3.35e12),
    (r"H800.*PCIE", "H800 PCIe", 2.0e12),
    (r"H800", "H800 SXM", 3.35e12),
    (r"H20\b", "H20", 4.0e12),
    (r"A100.*80GB.*PCIE|A100.*PCIE.*80GB", "A100 PCIe 80GB", 1.935e12),
    (r"A100.*80GB", "A100 SXM 80GB", 2.039e12),
    (r"A100", "A100 40GB", 1.555e12),
    (r"A800.*80GB", "A800 80GB", 2.039e12),
    (r"A800", "A800 40GB", 1.555e12),
    (r"L40S", "L40S", 0.864e12),
    (r"L40\b", "L40", 0.864e12),
    (r"\bL4\b", "L4", 0.3e12),
    (r"A10G", "A10G", 0.6e12),
    (r"\bA10\b", "A10", 0.6e12),
    (r"A6000.*ADA|6000 ADA", "RTX 6000 Ada", 0.96e12),
    (r"A6000", "RTX A6000", 0.768e12),
    (r"RTX 4090", "RTX 4090", 1.008e12),
    (r"RTX 3090", "RTX 3090", 0.936e12),
    (r"V100", "V100", 0.9e12),
    (r"\bT4\b", "T4", 0.32e12),
    (r"MI300X", "MI300X", 5.3e12),
    (r"MI250", "MI250X", 3.2e12),
]


def gpu_table_entry(name: Optional[str]) -> Optional[tuple[str, float]]:
    """``(label, peak bytes/s)`` of the first table entry matching ``name``, or None."""
    if not name:
        return None
    upper = name.upper()
    for pattern, label, bandwidth in GPU_BANDWIDTH:
        if re.search(pattern, upper):
            return label, bandwidth
    return None


def bandwidth_from_table(name: Optional[str]) -> Optional[float]:
    """Peak memory bandwidth (bytes/s) of the GPU called ``name``, None when unknown."""
    entry = gpu_table_entry(name)
    return None if entry is None else entry[1]


def copy_bandwidth(nbytes: float, seconds: float) -> float:
    """Bytes/s moved by a copy of ``nbytes`` in ``seconds``: it reads n bytes and writes n."""
    return 2 * nbytes / seconds


def floor_ms_per_token(weight_bytes: float, bandwidth: float) -> float:
    """The decode floor: every weight read once per new token, in ms."""
    return 1e3 * weight_bytes / bandwidth


def ms_per_token(t_n: float, t_1: float, n: int, m: int = 1) -> float:
    """ms per new token between a run of ``m`` new tokens (``t_1``, s) and one of ``n`` (``t_n``, s):
    with m = 1 the prefill (and the first token drawn with it) is left out."""
    if n <= m:
        raise ValueError(f"need n > m, got n={n}, m={m}")
    return 1e3 * (t_n - t_1) / (n - m)


def times_floor(measured_ms: float, floor_ms: float) -> float:
    """How many times the floor a measured per-token time is."""
    return measured_ms / floor_ms


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, batch: int, context: float, bytes_per_elem: int) -> float:
    """Bytes of KV cache one decode step reads (keys and values of every layer) at ``context`` positions."""
    return 2 * layers * kv_heads * head_dim * batch * context * bytes_per_elem


def mean_context(prompt_len: int, new_tokens: int) -> float:
    """Mean number of cached positions a decode step attends to over ``new_tokens`` new tokens
    (steps 1..N-1 attend to prompt + 1 .. prompt + N - 1 positions)."""
    return prompt_len + new_tokens / 2


def ppo_geometry(batch: int, updates: int = 8) -> tuple[int, int]:
    """``(mini_batch_size, gradient_accumulation_steps)`` for ``batch`` rollouts per step keeping the
    recipe's ``updates`` forward/backward passes and one optimizer step per epoch (B=8: 1 x 8)."""
    mini = max(1, batch // updates)
    while batch % mini:
        mini -= 1
    return mini, batch // mini


def step_figures(med: dict, batch: int, prompt_len: int) -> dict:
    """Per-step derived figures from a ``time_step`` median: s/sample and tokens/s."""
    tokens = batch * prompt_len + med["tokens"]
    return {"s_per_sample": med["total"] / batch, "tokens_per_s": tokens / med["total"],
            "sampled_tokens_per_s": med["tokens"] / med["generation"] if med["generation"] > 0 else float("nan")}


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows as an aligned text table; ``columns``: (key, header, format spec). Missing values print '-'."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                line.append("-")
            else:
                line.append(format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for r in cells:
        out.append("  " + "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


DECODE_COLUMNS = [("path", "path", ""), ("batch", "batch", "d"), ("ms_per_token", "ms/token", ".2f"),
                  ("steady_ms_per_token", "steady", ".2f"), ("floor_ms", "floor ms", ".2f"),
                  ("x_floor", "x floor", ".1f"), ("floor_with_kv_ms", "floor+KV", ".2f"),
                  ("tokens_per_s", "tok/s", ".0f")]

PPO_COLUMNS = [("label", "step", ""), ("generation", "gen s", ".2f"), ("scoring", "score s", ".2f"),
               ("rollout forward", "rollout s", ".2f"), ("optimisation", "updates s", ".2f"),
               ("total", "total s", ".2f"), ("s_per_sample", "s/sample", ".3f"), ("tokens_per_s", "tok/s", ".0f"),
               ("peak_gb", "peak GB", ".2f")]


def summarize(results: dict) -> str:
    """The closing summary: the decode and PPO tables of ``results``."""
    parts = []
    check = results.get("check") or {}
    if check.get("distribution"):
        dist = check["distribution"]
        parts.append("check (CUDA-graph decode vs a recomputation and the eager loop): "
                     + "; ".join(f"{k} {v['path']}, log-prob max |diff| {v['max_abs_logprob_diff']:.1e}"
                                 for k, v in check.items() if k != "distribution")
                     + f"; total variation to the eager loop at most {max(dist['tv_by_position']):.3f} "
                     f"(eager vs eager {max(dist['tv_eager_vs_eager']):.3f})")
    bw = results.get("bandwidth") or {}
    if bw.get("used_bytes_per_s"):
        parts.append(f"bandwidth for the floor: {bw['used_bytes_per_s'] / 1e12:.3f} TB/s ({bw.get('used_source')})")
    decode = [r for r in results.get("decode", []) if "ms_per_token" in r]
    if decode:
        parts.append("decode (ms per new token; floor = weight bytes / bandwidth):\n" + format_table(decode, DECODE_COLUMNS))
    ppo = [r for r in results.get("ppo", []) if "total" in r]
    if ppo:
        parts.append("PPO step (median):\n" + format_table(ppo, PPO_COLUMNS))
    failed = [f"{r.get('label', r.get('path'))}: {r['error']}" for r in results.get("decode", []) + results.get("ppo", [])
              if "error" in r]
    failed += [f"section {k}: {v}" for k, v in results.get("errors", {}).items()]
    if failed:
        parts.append("not measured:\n" + "\n".join(f"  {f}" for f in failed))
    if results.get("skipped"):
        parts.append("skipped (time budget): " + ", ".join(results["skipped"]))
    return "\n".join(parts)


# --------------------------------------------------------------------------- the run

SHAPES = {
    # LLaMA-7B: 32 x 4096, MLP 11008, 32 heads, vocab 32000 (6.7B parameters, 13.5 GB in bf16)
    "7b": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "tiny": dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=4, vocab=512),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PAD_ID = 0


def say(*args) -> None:
    print(*args, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama_config(shape: dict, num_labels: Optional[int] = None, layers: Optional[int] = None):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=layers or shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=None, attention_dropout=0.0,
        attn_implementation="sdpa",  # what the recipe runs (and what the static-cache decode needs), whatever else is installed
    )
    if num_labels is not None:
        kw["num_labels"] = num_labels
    return LlamaConfig(**kw)


def build_on_device(cls, config, dtype: torch.dtype, device: torch.device):
    """``cls(config)`` with its weights made on ``device`` in ``dtype`` (random init, nothing on disk)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = None
        gen.pad_token_id = PAD_ID
    return model


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Budget:
    """Skips the sections (and items) that would start after ``seconds`` of the run."""

    def __init__(self, seconds: float, results: dict, start: Optional[float] = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self.seconds, self.results = seconds, results

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, what: str) -> bool:
        if self.elapsed() <= self.seconds:
            return True
        say(f"[time budget] {self.elapsed():.0f} s > --time_budget_s {self.seconds:.0f}: skipping {what}")
        self.results.setdefault("skipped", []).append(what)
        return False


def error_text(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out of memory"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:400]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def header(args, device: torch.device) -> dict:
    import peft
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    info = {"device": str(device), "device_name": name,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gb"] = props.total_memory / 2**30
        info["gpu_sms"] = props.multi_processor_count
    info["args"] = vars(args)
    say(f"== machine: {info['device_name']} ({device})"
        + (f", {info['gpu_memory_gb']:.0f} GiB, {info['gpu_sms']} SMs" if device.type == "cuda"
           else f", {info['cpu_threads']} threads"))
    say(f"   torch {info['torch']} (CUDA {info['cuda']}), transformers {info['transformers']}, peft {info['peft']}, "
        f"python {info['python']}")
    shape = SHAPES[args.shape]
    say(f"   shape {args.shape} ({args.layers_override or shape['layers']} layers x {shape['hidden']}), "
        f"{args.dtype}, prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"decode batches {args.batch_sizes}, PPO batches {args.ppo_batch_sizes}, {args.ppo_epochs} PPO epochs, "
        f"{args.steps} timed steps, time budget {args.time_budget_s:.0f} s")
    return info


# --------------------------------------------------------------------------- 1. bandwidth

def measure_copy_bandwidth(device: torch.device, nbytes: int, reps: int = 5, inner: int = 1) -> float:
    """Median bytes/s of ``inner`` back-to-back copies of an ``nbytes`` buffer, after warm-up."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            dst.copy_(src)
        sync(device)
        times.append((time.perf_counter() - t) / inner)
    del src, dst
    return copy_bandwidth(nbytes, statistics.median(times))


def bandwidth_section(args, device: torch.device, results: dict) -> None:
    say("\n== 1. memory bandwidth")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    entry = gpu_table_entry(name)
    nbytes = int(args.copy_mb * 2**20)
    measured = measure_copy_bandwidth(device, nbytes, reps=5, inner=10 if device.type == "cuda" else 2)
    out = {"device_name": name, "table_entry": entry[0] if entry else None, "table_bytes_per_s": entry[1] if entry else None,
           "copy_bytes": nbytes, "measured_bytes_per_s": measured}
    if entry:
        say(f"   table peak: {entry[1] / 1e12:.3f} TB/s ({entry[0]}, from {name!r})")
    else:
        say(f"   table peak: unknown for {name or 'a CPU'!r}")
    say(f"   measured: {measured / 1e12:.3f} TB/s ({'device-to-device' if device.type == 'cuda' else 'memory'} copy of "
        f"{nbytes / 2**20:.0f} MiB: 2 x bytes / time, median of 5)"
        + (f" = {measured / entry[1]:.0%} of the table's peak" if entry else ""))
    if entry:
        out["used_bytes_per_s"], out["used_source"] = entry[1], f"table peak, {entry[0]}"
    else:
        out["used_bytes_per_s"], out["used_source"] = measured, "measured copy (GPU not in the table)"
    say(f"   floor uses: {out['used_bytes_per_s'] / 1e12:.3f} TB/s ({out['used_source']})")
    results["bandwidth"] = out


# --------------------------------------------------------------------------- 0. check

def total_variation(a: torch.Tensor, b: torch.Tensor, vocab: int) -> float:
    """Total-variation distance between the empirical distributions of two 1-D token samples."""
    p = torch.bincount(a.flatten().cpu(), minlength=vocab).double()
    q = torch.bincount(b.flatten().cpu(), minlength=vocab).double()
    return 0.5 * float((p / p.sum() - q / q.sum()).abs().sum())


def recomputed_logprobs(model, ids, mask, tokens, autocast: Callable) -> torch.Tensor:
    """``log pi(token)`` of sampled ``tokens`` (B, n) after left-padded prompts, from one full forward."""
    from stackllama.ppo import core

    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    with torch.inference_mode(), autocast():
        logits = model(input_ids=torch.cat([ids, tokens], 1), attention_mask=full_mask,
                       position_ids=core.position_ids_from_attention_mask(full_mask)).logits
    return core.logprobs_from_logits(logits[:, ids.shape[1] - 1 : -1], tokens)


def check_section(args, device: torch.device, results: dict) -> None:
    """Whether the CUDA-graph decode samples what the eager loop samples, on a small random LLaMA:
    the path that ran, the log-probs it reports against a full recomputation (fp32 and bf16 autocast),
    token distributions of replayed steps against the eager loop's (many rows, one prompt), and rows
    that differ from each other (the generator advances at each replay)."""
    from transformers import LlamaForCausalLM

    from stackllama.ppo.rollout_batch import left_pad
    from stackllama.ppo.speedups import cuda_graph_decode, sampling_loop

    say("\n== 0. check: the CUDA-graph decode against the eager loop (small random LLaMA)")
    shape = dict(layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=64)
    model = build_on_device(LlamaForCausalLM, llama_config(shape), torch.float32, device)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked distributions: a wrong one shows
    out: dict = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompts = [torch.randint(3, shape["vocab"], (n,), generator=gen) for n in (5, 9, 3, 12)]
    ids, mask = left_pad([p.to(device) for p in prompts], PAD_ID)
    bf16 = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)  # noqa: E731
    for name, autocast in (("fp32", contextlib.nullcontext), ("bf16 autocast", bf16)):
        graphs = cuda_graph_decode.CudaGraphs() if device.type == "cuda" else None
        with autocast():
            tokens, lp, _ = cuda_graph_decode.sample(model, ids, mask, 16, 1.0, [], PAD_ID, logprob_temperature=1.0,
                                                     graphs=graphs)
            tokens_e, lp_e, _ = sampling_loop.sample(model, ids, mask, 16, 1.0, [], PAD_ID, logprob_temperature=1.0)
        sync(device)
        diff = float((lp - recomputed_logprobs(model, ids, mask, tokens, autocast)).abs().max())
        diff_eager = float((lp_e - recomputed_logprobs(model, ids, mask, tokens_e, autocast)).abs().max())
        path = graphs.path if graphs is not None else "eager (not on a CUDA device)"
        out[name] = {"path": path, "max_abs_logprob_diff": diff, "eager_max_abs_logprob_diff": diff_eager}
        say(f"   {name}: path {path}; reported log-probs vs a full recomputation: max |diff| {diff:.2e} "
            f"(the eager loop's: {diff_eager:.2e})")
    rows = 4096 if device.type == "cuda" else 256
    one = torch.randint(3, shape["vocab"], (1, 7), generator=gen).to(device)
    ids1, mask1 = one.expand(rows, -1).contiguous(), torch.ones(rows, 7, dtype=torch.long, device=device)
    graphs = cuda_graph_decode.CudaGraphs() if device.type == "cuda" else None
    torch.manual_seed(1)
    ours = cuda_graph_decode.sample(model, ids1, mask1, 8, 1.0, [], PAD_ID, graphs=graphs)[0]
    torch.manual_seed(2)
    theirs = sampling_loop.sample(model, ids1, mask1, 8, 1.0, [], PAD_ID)[0]
    torch.manual_seed(3)
    again = sampling_loop.sample(model, ids1, mask1, 8, 1.0, [], PAD_ID)[0]
    tv = [total_variation(ours[:, k], theirs[:, k], shape["vocab"]) for k in range(8)]
    tv_noise = [total_variation(again[:, k], theirs[:, k], shape["vocab"]) for k in range(8)]
    distinct = len({tuple(r) for r in ours[:, 3:].tolist()}) / rows
    distinct_eager = len({tuple(r) for r in theirs[:, 3:].tolist()}) / rows
    out["distribution"] = {"rows": rows, "path": graphs.path if graphs is not None else "eager",
                           "tv_by_position": tv, "tv_eager_vs_eager": tv_noise,
                           "distinct_replayed_suffixes": distinct, "distinct_eager": distinct_eager}
    say(f"   {rows} rows of one prompt, 8 tokens (positions 3-7 from replays): total variation to the eager loop "
        f"by position {' '.join(f'{x:.3f}' for x in tv)}; eager vs eager (noise) {' '.join(f'{x:.3f}' for x in tv_noise)}")
    say(f"   distinct suffixes (positions 3-7): {distinct:.3f} of rows (eager {distinct_eager:.3f})")
    results["check"] = out


# --------------------------------------------------------------------------- 2. decode

def decode_runners(model, device: torch.device, autocast: Callable, logprob_temperature: Optional[float]):
    """``[(path label, run(ids, mask, n) -> new tokens, report() -> decode path)]``; the trainer's loops
    capture ``log pi`` and hidden states when ``logprob_temperature`` is given (the trainer does when it
    reuses them: fp32, no autocast)."""
    from stackllama.ppo.speedups import cuda_graph_decode, sampling_loop

    def eager(ids, mask, n):
        with autocast():
            return sampling_loop.sample(model, ids, mask, n, 1.0, [], PAD_ID, logprob_temperature=logprob_temperature)[0]

    blocker = cuda_graph_decode.capture_blocker(model, device, sharded=False)
    graphs = cuda_graph_decode.CudaGraphs() if blocker is None else None

    def static(ids, mask, n):
        with autocast():
            return cuda_graph_decode.sample(model, ids, mask, n, 1.0, [], PAD_ID, logprob_temperature=logprob_temperature,
                                            graphs=graphs)[0]

    def generate(ids, mask, n):
        with torch.inference_mode(), autocast():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=PAD_ID)
        return out[:, ids.shape[1]:]

    static_label = "CUDA-graph loop" if graphs is not None else "static-cache loop"
    return [
        ("eager loop", eager, lambda: "eager (sampling_loop.sample)"),
        (static_label, static, lambda: graphs.path if graphs is not None else f"eager ({blocker})"),
        ("generate", generate, lambda: "transformers generate (do_sample, top_k=0, top_p=1)"),
    ]


def time_decode(run, ids, mask, lengths: list[int], reps: int, device: torch.device) -> dict:
    """Median seconds per length, after one warm-up round; checks each run made n tokens."""
    times: dict[int, list[float]] = {n: [] for n in lengths}
    for rep in range(reps + 1):
        for n in lengths:
            sync(device)
            t = time.perf_counter()
            out = run(ids, mask, n)
            sync(device)
            dt = time.perf_counter() - t
            if out.shape[1] != n:
                raise RuntimeError(f"asked for {n} new tokens, got {out.shape[1]}")
            if rep:
                times[n].append(dt)
    return {n: statistics.median(v) for n, v in times.items()}


def decode_section(args, device: torch.device, model, bandwidth: float, results: dict, budget: Budget,
                   save: Callable[[], None]) -> None:
    say("\n== 2. decode: ms per new token vs the floor (weight bytes / bandwidth)")
    cfg = model.config
    wbytes = weight_bytes(model)
    floor = floor_ms_per_token(wbytes, bandwidth)
    elem = next(model.parameters()).element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    N, Q = args.new_tokens, args.prompt_len
    half = N // 2
    lengths = sorted({1, N} | ({half} if 1 < half < N else set()))
    use_autocast = args.dtype == "bf16"
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if use_autocast else contextlib.nullcontext
    say(f"   model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {wbytes / 1e9:.3f} GB of weights "
        f"({args.dtype}) -> floor {floor:.3f} ms/token at {bandwidth / 1e12:.3f} TB/s; prompts {Q} random ids, "
        f"{N} new tokens, no EOS; median of {args.decode_reps} after a warm-up"
        + ("; under bf16 autocast as the trainer's passes" if use_autocast else ""))
    say("   ms/token = (t(N) - t(1)) / (N - 1); steady = (t(N) - t(N/2)) / (N - N/2): without the prefill, the "
        "graph's capture and its warm-up steps")
    results["model"] = {"parameters": sum(p.numel() for p in model.parameters()), "weight_bytes": wbytes,
                        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}
    rows = results.setdefault("decode", [])
    gen = torch.Generator(device="cpu").manual_seed(0)
    for B in args.batch_sizes:
        if not budget.allows(f"decode batch {B}"):
            continue
        ids = torch.randint(3, cfg.vocab_size, (B, Q), generator=gen).to(device)
        mask = torch.ones_like(ids)
        kv = kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, B, mean_context(Q, N), elem)
        kv_static = kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, B, Q + N, elem)
        say(f"   batch {B}: KV cache read per token {kv / 1e9:.3f} GB at the mean context {mean_context(Q, N):.0f} "
            f"(the static cache reads all {Q + N} positions: {kv_static / 1e9:.3f} GB); "
            f"floor with KV {floor_ms_per_token(wbytes + kv, bandwidth):.3f} ms")
        for label, run, report in decode_runners(model, device, autocast, None if use_autocast else 1.0):
            row = {"path": label, "batch": B}
            try:
                med = time_decode(run, ids, mask, lengths, args.decode_reps, device)
                ms = ms_per_token(med[N], med[1], N)
                row.update(ms_per_token=ms, floor_ms=floor, x_floor=times_floor(ms, floor),
                           kv_bytes_per_token=kv, floor_with_kv_ms=floor_ms_per_token(wbytes + kv, bandwidth),
                           tokens_per_s=B * 1e3 / ms if ms > 0 else float("nan"),
                           seconds={str(n): t for n, t in med.items()}, decode_path=report())
                if half in med and half != 1:
                    row["steady_ms_per_token"] = ms_per_token(med[N], med[half], N, half)
                say(f"   {label:18s} batch {B:3d}: {ms:8.3f} ms/token"
                    + (f" (steady {row['steady_ms_per_token']:.3f})" if "steady_ms_per_token" in row else "")
                    + f" = {row['x_floor']:5.1f} x floor {floor:.3f} ms; {row['tokens_per_s']:.0f} tok/s; "
                    f"prefill+1 token {med[1] * 1e3:.1f} ms; path: {row['decode_path']}")
            except Exception as exc:  # noqa: BLE001 - report and go on
                row["error"] = error_text(exc)
                row["decode_path"] = report()
                say(f"   {label:18s} batch {B:3d}: FAILED {row['error']} (path: {row['decode_path']})")
                traceback.print_exc(limit=3, file=sys.stdout)
                sys.stdout.flush()
            rows.append(row)
            free_memory(device)
        del ids, mask
        free_memory(device)
        save()


# --------------------------------------------------------------------------- 3. PPO step

def ppo_section(args, device: torch.device, base, results: dict, budget: Budget, save: Callable[[], None]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    from stackllama.ppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    from stackllama.ppo.speedups import sampling_loop

    say("\n== 3. PPO step: generation / scoring / rollout passes / updates")
    dtype = DTYPES[args.dtype]
    Q, R = args.prompt_len, args.new_tokens
    shape = SHAPES[args.shape]
    # LoRA r16 on q/v on the frozen base, as configs/ppo/llama-7b.yaml (adapters kept in fp32 by peft)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    reward_layers = None if args.full_reward else 2
    reward_model = build_on_device(LlamaForSequenceClassification, llama_config(shape, num_labels=1, layers=reward_layers or
                                                                                 args.layers_override), dtype, device)
    autocast = args.dtype == "bf16"
    say(f"   policy: the model above + LoRA r16 q/v (dropout 0.05) + value head; reward: random "
        f"{reward_model.config.num_hidden_layers}-layer LLaMA classifier ({weight_bytes(reward_model) / 1e9:.2f} GB) "
        f"fed the ids; "
        f"{'bf16 autocast' if autocast else args.dtype}; {args.ppo_epochs} epoch(s); mini_batch_size B/8 x "
        f"gradient_accumulation_steps 8 (8 forward/backward passes, 1 optimizer step per epoch; below B=8: 1 x B); "
        f"generation batch = B; early stopping off; median of {args.steps} steps after 1 warm-up")

    variants = []
    for i, B in enumerate(args.ppo_batch_sizes):
        if args.no_cuda_graph:
            variants.append((B, False))
        else:
            variants.append((B, True))
            if i == 0 and device.type == "cuda" and not args.graph_only:
                variants.append((B, False))  # the eager baseline at the recipe's batch
    rows = results.setdefault("ppo", [])
    gen = torch.Generator(device="cpu").manual_seed(1)

    for B, graph in variants:
        label = f"B={B} {'graph' if graph else 'eager'}" if device.type == "cuda" else f"B={B}"
        if not budget.allows(f"PPO {label}"):
            continue
        mini, accum = ppo_geometry(B)
        row = {"label": label, "batch": B, "mini_batch_size": mini, "gradient_accumulation_steps": accum,
               "cuda_graph_sampling": graph, "ppo_epochs": args.ppo_epochs}
        trainer = policy_lm = None
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            config = PPOConfig(batch_size=B, mini_batch_size=mini, gradient_accumulation_steps=accum,
                               ppo_epochs=args.ppo_epochs, generation_batch_size=B, learning_rate=1.4e-5, seed=0,
                               early_stopping=False, init_kl_coef=0.2, adap_kl_ctrl=True, target=6.0, horizon=10000.0,
                               bf16_autocast=autocast, cuda_graph_sampling=graph)
            # fresh adapters, value head and optimizer per size (the trainer hooks the adapters' gradients)
            policy_lm = get_peft_model(base, lora)
            trainer = PPOTrainer(config, AutoModelForCausalLMWithValueHead(policy_lm), None,
                                 IdTokenizer(pad_token_id=PAD_ID, eos_token_id=None))
            queries = [torch.randint(3, shape["vocab"], (Q,), generator=gen).to(device) for _ in range(B)]
            gen_kwargs = dict(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=R, batch_size=B)
            loop_reason = sampling_loop.unsupported_reason(
                trainer.unwrapped_model.causal_lm,
                {k: v for k, v in gen_kwargs.items() if k != "batch_size"} | {"pad_token_id": PAD_ID})
            row["sampling_loop"] = "yes" if loop_reason is None else f"no ({loop_reason})"

            def score(responses):
                with torch.no_grad():
                    out = []
                    for s in range(0, len(responses), 16):  # reward_batch_size 16, as the recipe
                        ids = torch.stack([torch.cat([q, r.to(q.device)]) for q, r in
                                           zip(queries[s : s + 16], responses[s : s + 16])])
                        out.extend(reward_model(input_ids=ids).logits[:, 0].float())
                sync(device)
                return out

            med = median_of(lambda: time_step(trainer, queries, score, **gen_kwargs), args.steps)
            row.update({k: med[k] for k in (*PARTS, "total", "tokens")})
            row.update(step_figures(med, B, Q))
            row["decode_path"] = trainer.speedups.decode_path
            row["precision"] = trainer.speedups.precision.name
            row["logprobs"] = ("from sampling" if trainer.speedups.reuse_logprobs
                               else f"recomputed ({trainer.speedups.reuse_blocker})")
            if device.type == "cuda":
                row["peak_memory_gb"] = row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            else:
                row["peak_rss_gb"] = row["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            if med["tokens"] != B * R:
                row["note"] = f"responses shorter than {R} tokens: {med['tokens']:.0f} of {B * R}"
            say(f"   {label}: mini_batch_size {mini} x gradient_accumulation_steps {accum}; sampling loop "
                f"{row['sampling_loop']}; decode {row['decode_path']}; {row['precision']}; log pi_old {row['logprobs']}")
            for k in PARTS:
                say(f"     {k:28s} {med[k]:8.3f} s  ({100 * med[k] / med['total']:4.1f}%)")
            memory = (f"peak GPU memory {row['peak_memory_gb']:.1f} GiB" if "peak_memory_gb" in row
                      else f"peak RSS {row['peak_rss_gb']:.2f} GiB")
            say(f"     {'total':28s} {med['total']:8.3f} s/step; {row['s_per_sample']:.3f} s/sample; "
                f"{row['tokens_per_s']:.0f} tok/s (prompt+response); {row['sampled_tokens_per_s']:.0f} sampled tok/s; {memory}"
                + (f"; NOTE {row['note']}" if "note" in row else ""))
        except Exception as exc:  # noqa: BLE001 - out of memory or anything else: report, next size
            row["error"] = error_text(exc)
            if trainer is not None:
                row["decode_path"] = trainer.speedups.decode_path
            say(f"   {label}: FAILED {row['error']}")
            if row["error"] != "out of memory":
                traceback.print_exc(limit=4, file=sys.stdout)
                sys.stdout.flush()
        rows.append(row)
        trainer = None
        if policy_lm is not None:
            policy_lm.unload()  # the base without LoRA layers again, for the next size
            policy_lm = None
        free_memory(device)
        save()
    graph_row = next((r for r in rows if r.get("cuda_graph_sampling") and "total" in r), None)
    eager_row = next((r for r in rows if r.get("cuda_graph_sampling") is False and "total" in r
                      and graph_row is not None and r["batch"] == graph_row["batch"]), None)
    if graph_row and eager_row:
        results["ppo_graph_speedup"] = {"batch": graph_row["batch"], "step": eager_row["total"] / graph_row["total"],
                                        "generation": eager_row["generation"] / graph_row["generation"]}
        say(f"   CUDA-graph decode at B={graph_row['batch']}: step {eager_row['total']:.2f} -> {graph_row['total']:.2f} s "
            f"(x{results['ppo_graph_speedup']['step']:.2f}), generation {eager_row['generation']:.2f} -> "
            f"{graph_row['generation']:.2f} s (x{results['ppo_graph_speedup']['generation']:.2f})")


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 7b on CUDA, tiny on CPU")
    ap.add_argument("--layers", dest="layers_override", metavar="N", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--prompt_len", type=int, default=None, help="default: 200 on CUDA, 16 on CPU")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                    help="decode batches (default: 8 32 64 on CUDA, 8 on CPU)")
    ap.add_argument("--decode_reps", type=int, default=3, help="timed repetitions per decode length (after a warm-up)")
    ap.add_argument("--ppo_batch_sizes", type=int, nargs="+", default=None,
                    help="PPO batches per GPU (default: 8 32 64 on CUDA, 8 on CPU)")
    ap.add_argument("--ppo_epochs", type=int, default=4, help="the recipe: 4")
    ap.add_argument("--steps", type=int, default=2, help="timed PPO steps per batch size (after one warm-up step)")
    ap.add_argument("--no_cuda_graph", action="store_true", help="PPO steps with cuda_graph_sampling=False only")
    ap.add_argument("--graph_only", action="store_true", help="no eager baseline step at the first PPO batch size")
    ap.add_argument("--full_reward", action="store_true", help="reward model of the full shape (default: 2 layers)")
    ap.add_argument("--copy_mb", type=float, default=None, help="bandwidth copy buffer (default: 1024 MiB on CUDA, 32 on CPU)")
    ap.add_argument("--sections", nargs="+", default=["check", "bandwidth", "decode", "ppo"],
                    choices=["check", "bandwidth", "decode", "ppo"])
    ap.add_argument("--time_budget_s", type=float, default=480, help="skip the sections/items that would start later than this")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write every figure here (atomically, after each section)")
    args = ap.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    args.shape = args.shape or ("7b" if on_cuda else "tiny")
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.prompt_len = args.prompt_len or (200 if on_cuda else 16)
    args.batch_sizes = args.batch_sizes or ([8, 32, 64] if on_cuda else [8])
    args.ppo_batch_sizes = args.ppo_batch_sizes or ([8, 32, 64] if on_cuda else [8])
    args.copy_mb = args.copy_mb or (1024 if on_cuda else 32)
    if args.new_tokens < 2:
        ap.error("--new_tokens must be at least 2 (ms/token is t(N) - t(1) over N - 1)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    results: dict = {"errors": {}, "skipped": []}
    budget = Budget(args.time_budget_s, results, start=_START)

    def save() -> None:
        results["elapsed_s"] = budget.elapsed()
        if args.json:
            try:
                write_json(args.json, results)
            except OSError as exc:
                say(f"[json] could not write {args.json}: {exc}")

    def section(name: str, fn: Callable[[], None]) -> None:
        if name not in args.sections or not budget.allows(f"section {name}"):
            return
        t = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - report, next section
            results["errors"][name] = error_text(exc)
            say(f"   section {name} FAILED: {results['errors'][name]}")
            traceback.print_exc(limit=6, file=sys.stdout)
            sys.stdout.flush()
        say(f"   ({name}: {time.perf_counter() - t:.1f} s; {budget.elapsed():.0f} s into the run)")
        save()

    results["header"] = header(args, device)
    save()
    section("check", lambda: check_section(args, device, results))
    section("bandwidth", lambda: bandwidth_section(args, device, results))

    state: dict = {}

    def bandwidth_for_floor() -> float:
        bw = results.get("bandwidth", {}).get("used_bytes_per_s")
        if bw:
            return bw
        entry = bandwidth_from_table(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        if entry:
            return entry
        say("   (no bandwidth figure: measuring one now)")
        return measure_copy_bandwidth(device, int(args.copy_mb * 2**20))

    def build_policy_base() -> None:
        from transformers import LlamaForCausalLM

        t = time.perf_counter()
        shape = SHAPES[args.shape]
        model = build_on_device(LlamaForCausalLM, llama_config(shape, layers=args.layers_override), DTYPES[args.dtype], device)
        sync(device)
        state["base"] = model
        results["build_s"] = time.perf_counter() - t
        say(f"\n== model: random LLaMA ({model.config.num_hidden_layers} x {model.config.hidden_size}, MLP "
            f"{model.config.intermediate_size}, {model.config.num_attention_heads} heads, vocab {model.config.vocab_size}) "
            f"in {args.dtype} on {device}, built in {results['build_s']:.1f} s; attention "
            f"{getattr(model.config, '_attn_implementation', None)}")

    if ("decode" in args.sections or "ppo" in args.sections) and budget.allows("model construction"):
        try:
            build_policy_base()
        except Exception as exc:  # noqa: BLE001 - nothing else can run
            results["errors"]["model"] = error_text(exc)
            say(f"   model construction FAILED: {results['errors']['model']}")
            traceback.print_exc(limit=6, file=sys.stdout)
    if "base" in state:
        section("decode", lambda: decode_section(args, device, state["base"], bandwidth_for_floor(), results, budget, save))
        free_memory(device)
        section("ppo", lambda: ppo_section(args, device, state["base"], results, budget, save))

    say("\n== summary")
    say(summarize(results))
    say(f"   total {budget.elapsed():.0f} s")
    save()
    if args.json:
        say(f"   figures in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
