"""Flags from dataclasses, `--config file.yaml`, and one-line errors instead of tracebacks."""

import runpy
from dataclasses import dataclass, field
from pathlib import Path

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


REPO = Path(__file__).resolve().parents[1]


def test_help_shows_repository_paths_relative_and_parses_them_absolute(capsys):
    """--help reads as the docs do (`data/stackexchange/beer`), not as the machine it runs on;
    the values parsed stay the absolute defaults, and paths outside the checkout are shown as they are."""
    beer, coffee = str(REPO / "data" / "stackexchange" / "beer"), str(REPO / "data" / "stackexchange" / "coffee")
    outside = "/nowhere/scratch"  # (not inside any checkout)

    @dataclass
    class Paths:
        dump: str = field(default=beer, metadata={"help": "A dump."})
        dumps: list[str] = field(default_factory=lambda: [beer, coffee], metadata={"help": "Dumps."})
        scratch: str = field(default=outside, metadata={"help": "Scratch."})

    (args,) = parse_args([Paths], [])
    assert (args.dump, args.dumps, args.scratch) == (beer, [beer, coffee], outside)
    with pytest.raises(SystemExit):
        parse_args([Paths], ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: data/stackexchange/beer)" in out
    assert "(default: ['data/stackexchange/beer', 'data/stackexchange/coffee'])" in out
    assert f"(default: {outside})" in out
    assert str(REPO / "data") not in out


def test_display_default_takes_paths_and_sequences_of_them():
    from stackllama.cli import display_default

    assert display_default(REPO / "configs") == "configs"
    assert display_default((str(REPO / "a"), Path("/elsewhere/b"), 3)) == ("a", Path("/elsewhere/b"), 3)
    assert display_default("runs/tiny") == "runs/tiny" and display_default(None) is None


def test_help_that_states_its_default_gets_no_second_one(capsys):
    @dataclass
    class Documented:
        num_proc: int = field(default=2, metadata={"help": "Processes (default: all cores)."})
        sft_model: str | None = field(default=None, metadata={"help": "SFT policy. Default: <run>/sft."})
        eval_only: bool = field(default=False, metadata={"help": "Only evaluate (--model, default: output_dir)."})
        steps: int = field(default=3, metadata={"help": "Steps."})

    with pytest.raises(SystemExit):
        parse_args([Documented], ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Processes (default: all cores). --" in out and "(default: 2)" not in out
    assert "SFT policy. Default: <run>/sft. --" in out and "(default: None)" not in out
    # a default named for another flag mid-sentence is not this flag's: its own is still shown
    assert "(--model, default: output_dir). (default: False)" in out
    assert "Steps. (default: 3)" in out


def test_prepare_data_help_names_the_bundled_sample_without_the_machines_path(capsys):
    """The real script: its `--dumps` default is absolute paths into the checkout (see bundled_dumps)."""
    script = runpy.run_path(str(REPO / "scripts" / "prepare_data.py"))
    with pytest.raises(SystemExit):
        parse_args((script["ScriptArguments"], script["PrepareOptions"]), ["--help"], description=script["__doc__"])
    out = " ".join(capsys.readouterr().out.split())
    assert "data/stackexchange" in out and str(REPO) not in out
    assert "the slowest step (default: all cores). --" in out
