"""Command-line parsing shared by every script: dataclass flags, `--config file.yaml`, clear errors.

`TrlParser` reads the YAML with a safe loader and rejects unknown keys; this wrapper turns
its exceptions (missing file, bad YAML, unknown key) into the usual one-line argparse error
and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def parse_args(dataclass_types: Sequence[type], args: Sequence[str] | None = None, description: str | None = None):
    """Parse `args` (default: sys.argv) into instances of `dataclass_types`, TRL-style."""
    import yaml
    from trl import TrlParser

    parser = TrlParser(list(dataclass_types), description=description)
    try:
        return parser.parse_args_and_config(args=args)
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read --config: {e}")
    except ValueError as e:
        parser.error(str(e).split(". Please remove them")[0])


def fail(message: str, prog: str | None = None) -> None:
    """Exit with status 1 and a one-line message, the way every script reports bad input."""
    prog = prog or sys.argv[0].rsplit("/", 1)[-1]
    sys.exit(f"{prog}: error: {message}")
