"""benchmarks/ppo_gpu.py (decode and PPO step against the memory-bandwidth floor): its arithmetic on
fake timings, the GPU table, and the whole script end to end on CPU with the tiny shape."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "ppo_gpu.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling ppo_timing
    spec = importlib.util.spec_from_file_location("ppo_gpu_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, label, bandwidth",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 3.35e12),
        ("NVIDIA H100 PCIe", "H100 PCIe", 2.0e12),
        ("NVIDIA H100 NVL", "H100 NVL", 3.9e12),
        ("NVIDIA H200", "H200", 4.8e12),
        ("NVIDIA H200 NVL", "H200", 4.8e12),
        ("NVIDIA GH200 480GB", "GH200 96GB HBM3", 4.0e12),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB", 2.039e12),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB", 1.555e12),
        ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB", 1.935e12),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB", 1.555e12),
        ("NVIDIA A10G", "A10G", 0.6e12),
        ("NVIDIA A10", "A10", 0.6e12),
        ("NVIDIA L40S", "L40S", 0.864e12),
        ("NVIDIA L4", "L4", 0.3e12),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 1.008e12),
        ("Tesla V100-SXM2-32GB", "V100", 0.9e12),
    ],
)
def test_bandwidth_table_lookup(bench, name, label, bandwidth):
    assert bench.gpu_table_entry(name) == (label, bandwidth)
    assert bench.bandwidth_from_table(name) == bandwidth


@pytest.mark.parametrize("name", ["Some Future Accelerator 9000", "", None])
def test_bandwidth_table_unknown_is_none(bench, name):
    assert bench.bandwidth_from_table(name) is None
    assert bench.gpu_table_entry(name) is None


def test_arithmetic_on_fake_timings(bench):
    # the floor: 13 GB of weights read once per token at an H100 SXM's 3.35 TB/s
    floor = bench.floor_ms_per_token(13e9, 3.35e12)
    assert floor == pytest.approx(3.88, abs=0.005)
    assert bench.floor_ms_per_token(13e9, 4.8e12) == pytest.approx(2.71, abs=0.005)
    # 64 tokens in 1.63 s, 1 token (prefill) in 0.055 s -> 25 ms per token, 6.4 x the floor
    ms = bench.ms_per_token(1.63, 0.055, 64)
    assert ms == pytest.approx(25.0)
    assert bench.times_floor(ms, floor) == pytest.approx(25.0 / (13e9 / 3.35e12 * 1e3))
    assert bench.times_floor(ms, floor) == pytest.approx(6.44, abs=0.01)
    # between two lengths (the "steady" figure): (t(64) - t(32)) / 32
    assert bench.ms_per_token(1.0, 0.6, 64, 32) == pytest.approx(12.5)
    with pytest.raises(ValueError):
        bench.ms_per_token(1.0, 0.5, 1)
    # a copy of 1 GiB in 1 ms reads and writes it: 2 GiB / 1 ms
    assert bench.copy_bandwidth(2**30, 1e-3) == pytest.approx(2 * 2**30 / 1e-3)
    # KV read per token: LLaMA-7B, batch 8, 232 cached positions, bf16 = 0.97 GB
    kv = bench.kv_bytes_per_token(32, 32, 128, 8, bench.mean_context(200, 64), 2)
    assert kv == 2 * 32 * 32 * 128 * 8 * 232 * 2
    assert kv == pytest.approx(0.973e9, rel=1e-3)


def test_ppo_geometry_keeps_eight_passes_per_epoch(bench):
    assert bench.ppo_geometry(8) == (1, 8)  # the recipe: mini batch 1, gradient accumulation 8
    assert bench.ppo_geometry(32) == (4, 8)
    assert bench.ppo_geometry(64) == (8, 8)
    assert bench.ppo_geometry(2) == (1, 2)
    assert bench.ppo_geometry(20) == (2, 10)
    for batch in (1, 3, 8, 12, 17, 64):
        mini, accum = bench.ppo_geometry(batch)
        assert mini * accum == batch


def test_step_figures_and_tables(bench):
    med = {"generation": 2.0, "scoring": 0.5, "rollout forward": 1.0, "optimisation": 6.0,
           "other (advantages, stats)": 0.5, "total": 10.0, "tokens": 512.0}
    fig = bench.step_figures(med, 8, 200)
    assert fig["s_per_sample"] == pytest.approx(1.25)
    assert fig["tokens_per_s"] == pytest.approx((8 * 200 + 512) / 10.0)
    assert fig["sampled_tokens_per_s"] == pytest.approx(256.0)
    results = {
        "bandwidth": {"used_bytes_per_s": 3.35e12, "used_source": "table peak, H100 SXM"},
        "decode": [{"path": "CUDA-graph loop", "batch": 8, "ms_per_token": 5.0, "floor_ms": 3.88, "x_floor": 1.29},
                   {"path": "generate", "batch": 64, "error": "out of memory"}],
        "ppo": [dict(med, label="B=8 graph", **fig), {"label": "B=64 graph", "error": "out of memory"}],
        "skipped": ["PPO B=128 graph"],
    }
    text = bench.summarize(results)
    assert "CUDA-graph loop" in text and "1.3" in text and "3.350 TB/s" in text
    assert "B=8 graph" in text and "10.00" in text
    assert "B=64 graph: out of memory" in text and "generate: out of memory" in text
    assert "PPO B=128 graph" in text


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_script_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "ppo_gpu.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "tiny", "--batch_sizes", "2", "--ppo_batch_sizes", "2",
         "--new_tokens", "4", "--prompt_len", "6", "--steps", "1", "--ppo_epochs", "1", "--decode_reps", "2",
         "--threads", "1", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for heading in ("== machine:", "== 0. check", "== 1. memory bandwidth", "== model:", "== 2. decode", "== 3. PPO step", "== summary"):
        assert heading in text, text
    assert "FAILED" not in text, text

    results = json.loads(out.read_text())
    assert results["errors"] == {} and results["skipped"] == []
    assert results["header"]["torch"] and results["header"]["transformers"]
    bw = results["bandwidth"]
    assert _positive_finite(bw["measured_bytes_per_s"]) and bw["table_bytes_per_s"] is None
    assert bw["used_bytes_per_s"] == bw["measured_bytes_per_s"] and "measured" in bw["used_source"]
    assert _positive_finite(results["model"]["weight_bytes"])
    check = results["check"]
    assert check["fp32"]["max_abs_logprob_diff"] < 1e-4 and check["bf16 autocast"]["max_abs_logprob_diff"] < 0.1
    assert max(check["distribution"]["tv_by_position"]) < 0.5 and check["distribution"]["distinct_replayed_suffixes"] > 0.5

    decode = {row["path"]: row for row in results["decode"]}
    assert set(decode) == {"eager loop", "static-cache loop", "generate"}
    for row in decode.values():
        assert row["batch"] == 2 and "error" not in row, row
        for key in ("ms_per_token", "floor_ms", "x_floor", "kv_bytes_per_token", "floor_with_kv_ms", "tokens_per_s"):
            assert _positive_finite(row[key]), (key, row)
        assert row["x_floor"] == pytest.approx(row["ms_per_token"] / row["floor_ms"])
    # on CPU the static-cache loop runs eagerly, and says why
    assert decode["static-cache loop"]["decode_path"] == "eager (not on a CUDA device (cpu))"

    (ppo,) = results["ppo"]
    assert "error" not in ppo, ppo
    assert ppo["batch"] == 2 and ppo["mini_batch_size"] == 1 and ppo["gradient_accumulation_steps"] == 2
    for key in ("generation", "scoring", "rollout forward", "optimisation", "total", "s_per_sample", "tokens_per_s", "peak_gb"):
        assert _positive_finite(ppo[key]), (key, ppo)
    assert ppo["tokens"] == 2 * 4  # no EOS: every response has all its tokens
    assert ppo["sampling_loop"] == "yes"
    assert ppo["decode_path"].startswith("eager (") and "not on a CUDA device" in ppo["decode_path"]
    assert "decode eager (not on a CUDA device (cpu))" in text
