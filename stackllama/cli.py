"""Command-line parsing shared by every script: dataclass flags, `--config file.yaml`, clear errors.

`TrlParser` reads the YAML with a safe loader and rejects unknown keys; this wrapper turns
its exceptions (missing file, bad YAML, unknown key) into the usual one-line argparse error
and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_args(dataclass_types: Sequence[type], args: Sequence[str] | None = None, description: str | None = None):
    """Parse `args` (default: sys.argv) into instances of `dataclass_types`, TRL-style."""
    import yaml
    from trl import TrlParser

    parser = TrlParser(list(dataclass_types), description=description, formatter_class=_HelpFormatter)
    _default_to_fp32_without_gpu(parser)
    try:
        return parser.parse_args_and_config(args=args)
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read --config: {e}")
    except ValueError as e:
        parser.error(str(e).split(". Please remove them")[0])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag's help (as HfArgumentParser does); the script's docstring,
    with its example commands, printed as written."""


def _default_to_fp32_without_gpu(parser) -> None:
    """TRL's configs default to `bf16=True`, which `TrainingArguments` rejects on a machine
    without a GPU; there the default becomes fp32 (a config file or flag still wins)."""
    if not any(action.dest == "bf16" for action in parser._actions):
        return
    import torch

    if not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())):
        parser.set_defaults(bf16=False)


def fail(message: str, prog: str | None = None) -> None:
    """Exit with status 1 and a one-line message, the way every script reports bad input."""
    prog = prog or sys.argv[0].rsplit("/", 1)[-1]
    sys.exit(f"{prog}: error: {message}")
