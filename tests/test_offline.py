"""Sealed off by default: no telemetry traffic, YAML read safely, no remote code unless asked.

The pipeline itself runs with sockets denied in tests/test_pipeline_run.py; these tests pin
the settings that make that true.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROBE = ("import datasets, huggingface_hub.constants as hub; import stackllama; "
         "print(hub.HF_HUB_DISABLE_TELEMETRY, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS)")


def probe(**env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_TELEMETRY", "HF_UPDATE_DOWNLOAD_COUNTS")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def test_importing_stackllama_turns_telemetry_off_even_after_the_libraries():
    """The libraries are imported first (as the scripts do), and still end up opted out."""
    assert probe() == ["True", "False"]


def test_a_users_own_setting_wins():
    assert probe(HF_HUB_DISABLE_TELEMETRY="0", HF_UPDATE_DOWNLOAD_COUNTS="1") == ["False", "True"]


def test_yaml_configs_are_read_with_a_safe_loader(tmp_path):
    """A config that would run code under yaml.load is refused and runs nothing."""
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"output_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    proc = subprocess.run([sys.executable, "scripts/prepare_data.py", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "cannot read --config" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("script", ["sft.py", "reward_modeling.py", "rl_ppo.py", "merge_adapters.py", "evaluate.py"])
def test_remote_code_is_off_unless_asked(script):
    """Every script that loads a model has --trust_remote_code, and it defaults to false."""
    help_text = subprocess.run([sys.executable, f"scripts/{script}", "--help"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout
    options = help_text[help_text.index("\noptions:"):]
    entry = re.search(r"\n  --trust_remote_code.*?(?=\n  -|\Z)", options, re.S)
    assert entry is not None, f"{script} has no --trust_remote_code"
    assert "(default: False)" in " ".join(entry.group(0).split())
