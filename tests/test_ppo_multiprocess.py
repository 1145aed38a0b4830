"""Two CPU processes (torch.distributed gloo through accelerate): DDP-wrapped policy,
gradients synchronised (same weights on every rank), global score moments."""

import json
import os

import pytest
from interrupt_helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "ppo_multiprocess_worker.py")


@pytest.mark.slow
def test_two_process_ppo_steps(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun([WORKER, str(tmp_path)], env=env, timeout=180)
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert results[0]["kl"] == pytest.approx(results[1]["kl"])  # KL averaged over ranks
    assert results[0]["kl_coef"] == pytest.approx(results[1]["kl_coef"])  # one beta everywhere
    for res in results:
        assert res["world"] == 2 and res["wrapped"] == "DistributedDataParallel"
        assert res["same_weights"] and res["moved"]
        assert res["running_mean"] == pytest.approx(2.0)  # scores 0..3 and 1..4, over both ranks
