"""One precision regime in every PPO pass, under `accelerate launch --mixed_precision bf16` (the
precision of every shipped accelerate config), two CPU processes.

Accelerate autocasts only calls through the model it prepared; the trainer's sampling loop and
an explicit reference model are called directly, and so ran in fp32 beside bf16 rollout and
update passes: a KL of 3e-3 per sequence at the first step with the policy equal to its frozen
copy, ratios off 1 before any update. The worker (tests/ppo_precision_worker.py) runs one step
with a learning rate of 0 and the policy equal to its reference, for LoRA on a bf16 base (the
reference: adapters disabled), LoRA on an 8-bit base (the recipe) and full fine-tuning with a
frozen reference copy (configs/ppo/tiny.yaml).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from interrupt_helpers import accelerate_launch

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).resolve().parent / "ppo_precision_worker.py")
CASES = ("lora_bf16", "lora_8bit", "full")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from ppo_tiny import make_model, make_tokenizer

    out = tmp_path_factory.mktemp("precision")
    make_model(make_tokenizer()).save_pretrained(out / "base")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION"):
        env.pop(key, None)
    accelerate_launch([WORKER, str(out), str(out / "base")], env=env, timeout=300, mixed_precision="bf16")
    return {case: [json.loads((out / f"{case}-rank{r}.json").read_text()) for r in (0, 1)] for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_policy_equal_to_reference_has_zero_kl_and_ratio_one(results, case):
    for res in results[case]:
        assert res["world"] == 2 and res["mixed_precision"] == "bf16"
        assert res["regime"] == "bf16 autocast (accelerate mixed_precision=bf16)"
        # sampling, the rollout passes, the reference and the updates: one dtype
        dtypes = res["dtypes"]
        assert dtypes["sampling"] == dtypes["rollout"] == dtypes["update"]
        if case != "lora_8bit":  # bitsandbytes' int8 matmul returns fp32 under autocast, in every pass alike
            assert dtypes["sampling"] == ["torch.bfloat16"]
        if case == "full":
            assert dtypes["reference"] == ["torch.bfloat16"]
        assert res["objective/kl"] == 0.0
        assert res["ppo/policy/ratio_mean"] == 1.0 and res["ppo/policy/approxkl"] == 0.0
        assert res["ppo/policy/clipfrac"] == 0.0 and res["ppo/val/clipfrac"] == 0.0
        # the sampling passes round differently from a full one under autocast: recomputed, and said why
        assert "bf16 autocast" in res["reuse_blocker"]
        assert res["ppo/mean_raw_scores"] == 2.0  # TRL's stats are averaged over the ranks (1.5 and 2.5)
