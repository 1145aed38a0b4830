"""Command-line parsing shared by every script: dataclass flags, `--config file.yaml`, clear errors.

`TrlParser` reads the YAML with a safe loader and rejects unknown keys; this wrapper turns
its exceptions (missing file, bad YAML, unknown key) into the usual one-line argparse error
and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import ast
import copy
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

# the checkout (the folder holding the package): defaults inside it are shown relative to it
REPO_ROOTS = tuple(dict.fromkeys((Path(__file__).parents[1], Path(__file__).resolve().parents[1])))


def parse_args(dataclass_types: Sequence[type], args: Sequence[str] | None = None, description: str | None = None):
    """Parse `args` (default: sys.argv) into instances of `dataclass_types`, TRL-style."""
    # trl (and torch with it) is imported when flags are parsed, not when a script imports this module
    import yaml
    from trl import TrlParser

    parser = TrlParser(list(dataclass_types), description=description, formatter_class=_HelpFormatter)
    _help_from_docstrings(parser, dataclass_types)
    _cpu_defaults_without_gpu(parser)
    try:
        return parser.parse_args_and_config(args=args)
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read --config: {e}")
    except ValueError as e:
        parser.error(str(e).split(". Please remove them")[0])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag's help (as HfArgumentParser does); the script's docstring,
    with its example commands, printed as written.

    Defaults are shown as a user reads them: a path inside the checkout relative to it (the docs'
    `data/stackexchange/beer`, not the absolute path of the machine the help was printed on), and
    no second default after a help text that already says its own (`(default: all cores)`). Only
    the display changes: the parsed values are the defaults themselves."""

    def _get_help_string(self, action):
        help = action.help or ""
        if _STATES_DEFAULT.search(help):
            return help
        return super()._get_help_string(action)

    def _expand_help(self, action):
        shown = display_default(action.default)
        if shown is action.default:
            return super()._expand_help(action)
        action = copy.copy(action)
        action.default = shown
        return super()._expand_help(action)


_STATES_DEFAULT = re.compile(r"\(default|(?:^|[.;]\s*)default:", re.IGNORECASE)  # "(default: all cores)", ". Default: <run>/sft"


def display_default(value):
    """`value` with each path inside the checkout (a str or Path, alone or in a list/tuple) made
    relative to it; `value` itself when nothing changes."""
    if isinstance(value, (list, tuple)):
        shown = [display_default(item) for item in value]
        changed = any(new is not old for new, old in zip(shown, value))
        return (list(shown) if isinstance(value, list) else tuple(shown)) if changed else value
    if not isinstance(value, (str, os.PathLike)) or not os.path.isabs(value):
        return value
    for root in REPO_ROOTS:
        try:
            return str(Path(value).relative_to(root))
        except ValueError:
            continue
    return value


def field_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for dataclass fields documented the way this project does it, with
    a string literal right below the field (as ``PPOConfig``), over ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _help_from_docstrings(parser, dataclass_types: Sequence[type]) -> None:
    """Flags without a ``help`` (fields documented by a docstring instead of
    ``metadata["help"]``) get their field's docstring in ``--help``."""
    docs: dict[str, str] = {}
    for cls in dataclass_types:
        docs.update(field_docstrings(cls))
    for action in parser._actions:
        if not action.help and action.dest in docs and not any(o.startswith("--no") for o in action.option_strings):
            text = re.sub(r":\w+:`", "`", docs[action.dest]).replace("``", "`")  # Sphinx roles -> plain
            action.help = text.replace("%", "%%")


def _cpu_defaults_without_gpu(parser) -> None:
    """On a machine without a GPU: fp32 instead of TRL's `bf16=True` default (which
    `TrainingArguments` rejects there), and `use_cpu=True`, without which transformers sets up
    accelerate without `cpu=True` and the processes started by `torchrun` / `accelerate launch`
    each train alone on the same data, all writing the same folder. A config file or flag wins."""
    dests = {action.dest for action in parser._actions}
    if not dests & {"bf16", "use_cpu"}:
        return
    import torch

    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return
    parser.set_defaults(**{name: value for name, value in (("bf16", False), ("use_cpu", True)) if name in dests})


def fail(message: str, prog: str | None = None) -> None:
    """Exit with status 1 and a one-line message, the way every script reports bad input
    (through `stackllama.processes.end_process`, as every process of a run ends)."""
    from .processes import end_process  # imports torch and accelerate

    prog = prog or sys.argv[0].rsplit("/", 1)[-1]
    end_process(1, f"{prog}: error: {message}")
