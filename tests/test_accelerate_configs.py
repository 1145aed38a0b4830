"""The shipped accelerate configs: each loads with accelerate's own reader, says when to use it,
and sets what its name promises (CI has no GPU, so this is as far as they can be run here)."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parent.parent / "accelerate_configs"

EXPECTED = {
    "single_gpu": (DistributedType.NO, 1, 1),
    "multi_gpu": (DistributedType.MULTI_GPU, 8, 1),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, 8, 1),
    "deepspeed_zero3": (DistributedType.DEEPSPEED, 8, 1),
    "fsdp": (DistributedType.FSDP, 8, 1),
    "multi_node": (DistributedType.MULTI_GPU, 24, 3),
}


def test_every_config_is_listed():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_says_when_to_use_it(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("# "), f"{path.name} must open with a comment saying when to use it"
    config = load_config_from_file(str(path))
    distributed, processes, machines = EXPECTED[name]
    assert config.distributed_type == distributed
    assert (config.num_processes, config.num_machines) == (processes, machines)
    assert config.mixed_precision == "bf16" and config.use_cpu is False
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_pretrained writes one model
    if name == "multi_node":
        assert config.main_process_ip and config.main_process_port
