"""Flags from dataclasses, `--config file.yaml`, and one-line errors instead of tracebacks."""

from dataclasses import dataclass, field

import pytest

from stackllama.cli import parse_args


@dataclass
class Args:
    name: str = "a"
    steps: int = 1
    ratios: list[float] = field(default_factory=lambda: [0.5])


def test_yaml_config_then_command_line_wins(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: from-yaml\nsteps: 5\nratios: [0.1, 0.2]\n")
    (args,) = parse_args([Args], ["--config", str(config), "--steps", "7"])
    assert (args.name, args.steps, args.ratios) == ("from-yaml", 7, [0.1, 0.2])


def test_unknown_config_key_names_the_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("name: x\nstpes: 5\n")
    with pytest.raises(SystemExit) as exit_:
        parse_args([Args], ["--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--stpes" in err and "Traceback" not in err


def test_missing_or_unsafe_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args([Args], ["--config", str(tmp_path / "nope.yaml")])
    assert "cannot read --config" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("name: !!python/object/apply:os.system ['echo hi']\n")  # safe_load refuses it
    with pytest.raises(SystemExit):
        parse_args([Args], ["--config", str(config)])
    assert "cannot read --config" in capsys.readouterr().err


def test_trainer_configs_default_to_fp32_without_gpu(tmp_path):
    import torch
    from trl import RewardConfig

    (args,) = parse_args([RewardConfig], ["--output_dir", str(tmp_path)])
    assert args.bf16 is (torch.cuda.is_available())
    # and on CPU, processes started by torchrun / accelerate join one run (see test_multiprocess_sft_reward.py)
    assert args.use_cpu is (not torch.cuda.is_available())
    (args,) = parse_args([RewardConfig], ["--output_dir", str(tmp_path), "--use_cpu", "false"])
    assert args.use_cpu is False  # a flag still wins
