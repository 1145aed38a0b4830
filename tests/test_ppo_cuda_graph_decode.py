"""The sampling loop's CUDA-graph decode path (stackllama/ppo/speedups/cuda_graph_decode.py), on CPU.

No GPU here: CUDA's three calls (warm-up on a side stream, recording, replay) are replaced by
`CpuGraphs`, whose recording returns the step itself, so everything around them runs as on a
GPU: the static KV cache, the step that is captured, the warm-up / capture / replay order, the
fallback when capture fails, the plan's decision and what the trainer gets back. What a CUDA
graph adds on a GPU (kernels replayed, the generator's offsets) is measured by
benchmarks/ppo_gpu.py, not tested here. The step must never wait for the device (a captured
graph cannot hold a host read): `HostReads` checks that op by op.
"""

import logging

import pytest
import torch
from ppo_tiny import (
    make_model,
    make_policy,
    make_queries,
    make_tokenizer,
    make_trainer,
    one_thread,  # noqa: F401  (fixture)
)
from torch.utils._python_dispatch import TorchDispatchMode

from stackllama.ppo.rollout_batch import RolloutBatch, left_pad
from stackllama.ppo.speedups import cuda_graph_decode as graphed
from stackllama.ppo.speedups import sampling_loop as eager
from stackllama.ppo.speedups.merged_lora import merged_lora
from stackllama.ppo.speedups.mixed_precision import Bf16Autocast

pytestmark = pytest.mark.usefixtures("one_thread")


class CpuGraphs(graphed.CudaGraphs):
    """The run's capturer with CUDA's calls replaced: the warm-up runs the step, recording returns
    it (a replay is a call), or raises ``fail``. ``calls`` records the order."""

    def __init__(self, fail=None):
        super().__init__()
        self.fail, self.calls = fail, []

    def pool(self):
        return None

    def warmup(self, step):
        self.calls.append("warmup")
        step()

    def _record(self, step, pool):
        self.calls.append("capture")
        if self.fail:
            raise self.fail if isinstance(self.fail, Exception) else RuntimeError(self.fail)

        def replay():
            self.calls.append("replay")
            step()

        return replay


class HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's value on the host or builds a tensor from host data:
    on a GPU each is a synchronisation (or a host-to-device copy), which stream capture refuses."""

    NAMES = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "lift_fresh",
             "unique", "_unique2", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.NAMES:
            self.seen.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()):
            self.seen.append(f"{name} with a boolean mask")  # its output's size is read on the host
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def prompts(tok, n=5, seed=3):
    return left_pad(make_queries(tok, n, seed=seed, min_len=1, max_len=7), tok.pad_token_id)


def both_loops(model, ids, mask, graphs, n_new=9, temperature=1.0, logprob_temperature=1.0, eos=(), pad=0, **kw):
    torch.manual_seed(0)
    want = eager.sample(model, ids, mask, n_new, temperature, list(eos), pad, logprob_temperature=logprob_temperature, **kw)
    torch.manual_seed(0)
    got = graphed.sample(model, ids, mask, n_new, temperature, list(eos), pad, logprob_temperature=logprob_temperature,
                         graphs=graphs, **kw)
    return got, want


@pytest.mark.parametrize("graphs", [None, "cpu"], ids=["eager static steps", "warm-up, capture, replay"])
@pytest.mark.parametrize("temperature, logprob_temperature", [(1.0, 1.0), (0.7, 1.0), (1.3, None)])
def test_same_tokens_log_probs_and_hidden_states_as_the_eager_loop(tok, graphs, temperature, logprob_temperature):
    """Same seed, same draws: the static cache attends to the whole cache under a causal mask
    instead of a growing slice, which changes only float rounding."""
    model = make_model(tok)
    ids, mask = prompts(tok)
    (tokens, lp, hidden), (tokens_e, lp_e, hidden_e) = both_loops(
        model, ids, mask, CpuGraphs() if graphs else None, temperature=temperature,
        logprob_temperature=logprob_temperature, pad=tok.pad_token_id)
    assert torch.equal(tokens, tokens_e) and tokens.shape == (5, 9)
    if logprob_temperature is None:
        assert lp is None and hidden is None
    else:
        torch.testing.assert_close(lp, lp_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden, hidden_e, atol=1e-5, rtol=1e-5)


def test_warm_up_then_one_capture_then_a_replay_per_token(tok):
    model = make_model(tok)
    ids, mask = prompts(tok)
    graphs = CpuGraphs()
    tokens, _, _ = graphed.sample(model, ids, mask, 7, 1.0, [], tok.pad_token_id, graphs=graphs)
    # token 0 from the prefill, tokens 1-2 from the warm-up, token 3 onward from replays of the captured step
    assert graphs.calls == ["warmup", "warmup", "capture"] + ["replay"] * 4 and tokens.shape[1] == 7
    graphs.calls.clear()
    graphed.sample(model, ids, mask, 3, 1.0, [], tok.pad_token_id, graphs=graphs)
    assert graphs.calls == ["warmup", "warmup"]  # nothing left to replay: no capture


def test_the_loop_ends_where_the_eager_loop_ends(tok):
    """Rows padded after their EOS, and the loop stopped once every row has ended, at the same token."""
    model = make_model(tok)
    eos = tok.eos_token_id
    model.lm_head.register_forward_hook(lambda m, a, logits: logits.index_add_(
        -1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), 3.0)))  # p(EOS) about 0.4
    ids, mask = prompts(tok, n=6, seed=5)
    graphs = CpuGraphs()
    (tokens, lp, _), (tokens_e, lp_e, _) = both_loops(model, ids, mask, graphs, n_new=40, eos=[eos], pad=tok.pad_token_id)
    assert torch.equal(tokens, tokens_e) and tokens.shape[1] < 40
    assert "replay" in graphs.calls
    torch.testing.assert_close(lp, lp_e, atol=1e-5, rtol=1e-5)


def test_a_failed_capture_finishes_the_batch_eagerly_and_is_remembered(tok, caplog):
    from stackllama.ppo.speedups.plan import Speedups
    from stackllama.ppo.speedups.mixed_precision import PrecisionRegime

    model = make_model(tok)
    ids, mask = prompts(tok)
    graphs = CpuGraphs(fail="operation not permitted when stream is capturing\nmore detail")
    with caplog.at_level(logging.WARNING, logger="stackllama.ppo"):
        (tokens, lp, _), (tokens_e, lp_e, _) = both_loops(model, ids, mask, graphs, pad=tok.pad_token_id)
    assert torch.equal(tokens, tokens_e) and tokens.shape[1] == 9
    torch.testing.assert_close(lp, lp_e, atol=1e-5, rtol=1e-5)
    assert graphs.failed == "RuntimeError: operation not permitted when stream is capturing"
    assert "could not be captured as a CUDA graph (RuntimeError: operation not permitted" in caplog.text
    assert graphs.capture(lambda: None, None) is None and graphs.calls.count("capture") == 1  # not tried again
    plan = Speedups(PrecisionRegime("no autocast"), None, False, True, cuda_graph_blocker=None, cuda_graphs=graphs)
    assert plan.graphs_for_loop() is None
    assert plan.decode_path == "eager (CUDA graph capture failed: RuntimeError: operation not permitted when stream is capturing)"


def test_out_of_memory_in_a_capture_costs_that_batch_only(tok, caplog):
    model = make_model(tok)
    ids, mask = prompts(tok)
    graphs = CpuGraphs(fail=torch.OutOfMemoryError("CUDA out of memory"))
    with caplog.at_level(logging.WARNING, logger="stackllama.ppo"):
        (tokens, _, _), (tokens_e, _, _) = both_loops(model, ids, mask, graphs, pad=tok.pad_token_id)
    assert torch.equal(tokens, tokens_e)
    assert graphs.failed is None and "out of memory capturing" in caplog.text
    graphs.fail = None
    graphed.sample(model, ids, mask, 5, 1.0, [], tok.pad_token_id, graphs=graphs)
    assert graphs.calls.count("capture") == 2 and graphs.calls[-1] == "replay"  # the next batch is captured


def test_host_reads_are_detected():
    """The detector itself: each of these would break a capture."""
    x = torch.arange(4)
    with HostReads() as reads:
        x.sum().item()
        bool(x.any())
        x[x > 1]
        torch.tensor([1, 2])
    assert set(reads.seen) == {"_local_scalar_dense", "lift_fresh", "index with a boolean mask"}


def _step_host_reads(causal_lm, ids, mask, eos=(2,), logprob_temperature=1.0):
    with torch.inference_mode():
        decode = graphed.StaticDecode(causal_lm, ids, mask, 6, 0.9, list(eos), 0, logprob_temperature, None)
        decode.prefill()
        decode.step()  # the warm-up
        with HostReads() as reads:
            decode.step()  # what is captured
    return reads.seen


def test_the_captured_step_never_reads_the_device_from_the_host(tok):
    ids, mask = prompts(tok)
    assert _step_host_reads(make_model(tok), ids, mask) == []
    assert _step_host_reads(make_model(tok), ids, mask, eos=(), logprob_temperature=None) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_captured_step_never_reads_the_device_in_the_recipes_setting(tok, dtype):
    """LoRA (dropout 0.05) merged for sampling, or left unmerged with its dropout drawing masks
    (``rollout_in_eval_mode=False``), under bf16 autocast as on a GPU (and fp16, accelerate's other one)."""
    policy = make_policy(tok, lora=True, lora_dropout=0.05, value_head_dropout=0.1)
    ids, mask = prompts(tok)
    gpu_like = (Bf16Autocast([policy], "cpu", cpu_speedups=False) if dtype == torch.bfloat16
                else (lambda: torch.autocast("cpu", dtype=torch.float16)))
    policy.eval()
    with merged_lora(policy) as merged, gpu_like():
        assert merged == 4
        assert _step_host_reads(policy.causal_lm, ids, mask) == []
    policy.train()
    with gpu_like():
        assert _step_host_reads(policy.causal_lm, ids, mask) == []


def test_static_cache_layer_stores_in_the_cache_dtype():
    layer = graphed._StaticLayer(6, torch.float32)
    k, v = torch.randn(2, 3, 4, 8, dtype=torch.bfloat16), torch.randn(2, 3, 4, 8, dtype=torch.bfloat16)
    keys, values = layer.update(k, v)
    assert keys.dtype == torch.float32 and keys.shape == (2, 3, 6, 8)
    assert torch.equal(keys[:, :, :4], k.float()) and torch.equal(values[:, :, :4], v.float())
    assert int(layer.get_seq_length()) == 4


def test_capture_blocker(tok):
    model = make_model(tok)
    assert graphed.capture_blocker(model, torch.device("cuda", 0), sharded=False) is None
    assert graphed.capture_blocker(model, torch.device("cpu"), sharded=False) == "not on a CUDA device (cpu)"
    assert "ZeRO-3" in graphed.capture_blocker(model, "cuda", sharded=True)
    model.is_loaded_in_8bit = True
    assert "8-bit base" in graphed.capture_blocker(model, "cuda", sharded=False)
    del model.is_loaded_in_8bit
    model.config._attn_implementation = "flash_attention_2"
    assert "'flash_attention_2'" in graphed.capture_blocker(model, "cuda", sharded=False)


def test_the_plan_says_which_decode_path_runs(tok, caplog):
    with caplog.at_level(logging.INFO, logger="stackllama.ppo"):
        trainer = make_trainer(tokenizer=tok)
    assert trainer.speedups.decode_path == "eager (not on a CUDA device (cpu))"
    assert trainer.speedups.graphs_for_loop() is None
    assert "decode: eager (not on a CUDA device (cpu))" in caplog.text
    assert make_trainer(tokenizer=tok, cuda_graph_sampling=False).speedups.decode_path == "eager (cuda_graph_sampling=False)"
    assert make_trainer(tokenizer=tok, fast_sampling=False).speedups.decode_path == "eager (fast_sampling=False)"


def _trainer(tok, graphs, **config):
    """LoRA dropout 0.05 and value-head dropout 0.1 as in the recipe, adapters moved off zero so that
    merging them for sampling matters; ``graphs``: the plan's capturer (None: the eager loop)."""
    policy = make_policy(tok, lora=True, lora_dropout=0.05, value_head_dropout=0.1)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    trainer = make_trainer(tokenizer=tok, policy=policy, batch_size=6, ppo_epochs=1, **config)
    if graphs is not None:
        trainer.speedups.cuda_graph_blocker, trainer.speedups.cuda_graphs = None, graphs
    policy.train()
    return trainer


QUERY_SETTINGS = dict(return_prompt=False, batch_size=3, do_sample=True, top_k=0, top_p=1.0, temperature=0.7,
                      max_new_tokens=8)


def _generate_both(tok, **config):
    queries = make_queries(tok, 6, seed=11, min_len=1, max_len=7)
    out = {}
    for name, graphs in (("eager", None), ("graphs", CpuGraphs())):
        trainer = _trainer(tok, graphs, **config)
        torch.manual_seed(0)
        out[name] = trainer, trainer.generate(queries, **QUERY_SETTINGS), graphs
    trainer, responses, graphs = out["graphs"]
    assert graphs.calls.count("capture") == 2 and graphs.calls.count("replay") == 2 * 5  # two batches of 3
    assert all(torch.equal(a, b) for a, b in zip(responses, out["eager"][1]))
    return queries, trainer, responses, out["eager"][1]


def test_trainer_hands_step_the_log_probs_and_values_a_rollout_pass_gives(tok):
    """In fp32 ``step`` reuses the sampling passes' ``log pi_old`` and ``V_old``: through the graph
    path they are those of the eager loop and of a recomputed rollout pass."""
    queries, trainer, responses, eager_responses = _generate_both(tok)
    assert trainer.speedups.reuse_logprobs and responses.old is not None
    batch = RolloutBatch.build(queries, responses, trainer.pad_token_id)
    lp, v, _, _ = trainer.passes.rollout_pass(batch, 0.7)
    for i, ((lp_old, v_old), (lp_e, v_e)) in enumerate(zip(responses.old, eager_responses.old)):
        n = len(lp_old)
        torch.testing.assert_close(lp_old, lp_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_old, v_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lp_old, lp[i, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_old, v[i, :n], atol=1e-5, rtol=1e-5)
    stats = trainer.step(queries, responses, [torch.tensor(1.0)] * 6)
    assert stats["ppo/policy/approxkl"] >= 0


def test_graph_path_under_bf16_autocast_samples_what_a_rollout_pass_scores(tok):
    """Under bf16 autocast (the recipe's ``--mixed_precision bf16``) the rollout pass recomputes the
    log-probs; the ones the graph path reports for its tokens still agree with it to bf16 rounding."""
    queries, trainer, responses, _ = _generate_both(tok, bf16_autocast=True)
    assert responses.old is None  # not reused under autocast (logprob_reuse.py)
    stats = trainer.step(queries, responses, [torch.tensor(1.0)] * 6)
    assert stats["ppo/policy/approxkl"] >= 0
    policy = trainer.unwrapped_model
    policy.eval()
    ids, mask = left_pad(queries, trainer.pad_token_id)
    torch.manual_seed(1)
    with merged_lora(policy), trainer.precision():
        tokens, lp_loop, _ = graphed.sample(policy.causal_lm, ids, mask, 8, 0.7, [tok.eos_token_id], tok.pad_token_id,
                                            logprob_temperature=0.7, cache_dtype=trainer.precision.kv_cache_dtype,
                                            graphs=CpuGraphs())
    batch = RolloutBatch.build(queries, trainer.stops.truncate(tokens), trainer.pad_token_id)
    lp, _, _, _ = trainer.passes.rollout_pass(batch, 0.7)
    for i, n in enumerate(batch.response_lens):
        torch.testing.assert_close(lp_loop[i, :n], lp[i, :n], atol=0.05, rtol=0)
