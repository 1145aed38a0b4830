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


def test_fields_documented_by_docstrings_get_them_in_help(capsys):
    import dataclasses

    from stackllama.cli import field_docstrings
    from stackllama.ppo import PPOConfig

    @dataclasses.dataclass
    class Base:
        alpha: int = 1
        """The alpha, in ``units`` (50% of it)."""

    @dataclasses.dataclass
    class Child(Base):
        beta: bool = False
        """Whether to :mod:`beta`.

        Second paragraph."""
        delta: float = dataclasses.field(default=0.0, metadata={"help": "from metadata"})
        """A docstring that metadata wins over."""

    assert field_docstrings(Child) == {"alpha": "The alpha, in ``units`` (50% of it).",
                                       "beta": "Whether to :mod:`beta`. Second paragraph.",
                                       "delta": "A docstring that metadata wins over."}
    with pytest.raises(SystemExit):
        parse_args((Child, PPOConfig), ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "The alpha, in `units` (50% of it)." in out and "Whether to `beta`. Second paragraph." in out
    assert "from metadata" in out and "metadata wins over" not in out
    assert "sample with the trainer's own decode loop" in out  # PPOConfig.fast_sampling
