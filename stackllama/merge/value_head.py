"""A PPO policy's value head: saved beside its adapter, kept beside the merged weights or dropped.

`AutoModelForCausalLMWithValueHead.from_pretrained` on the merged folder then loads the
policy and its head together.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..ppo.value_head import VALUE_HEAD_CONFIG, VALUE_HEAD_FILE


def has_value_head(adapter_dir: Path) -> bool:
    return (adapter_dir / VALUE_HEAD_FILE).is_file()


def copy_value_head(adapter_dir: Path, folder: Path) -> None:
    """The head's weights and config, copied from the adapter folder into the merged one."""
    for name in (VALUE_HEAD_FILE, VALUE_HEAD_CONFIG):
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, folder / name)
