"""Loading the prepared datasets, from a local `prepare_data.py` output or from the Hub.

A local output folder holds `pairs/<subset>/*.parquet` and `preferences/*.parquet` plus a
dataset card whose `configs:` block lets `datasets.load_dataset(folder, "pairs",
split="finetune")` work as well. A Hub id is read with the published layout of
`lvwerra/stack-exchange-paired` (`data/<subset>/`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, MissingInputError
from .pairs import SUBSETS


def _check_subset(subset: str) -> None:
    if subset not in SUBSETS:
        raise InputError(f"unknown subset {subset!r}: expected one of {', '.join(SUBSETS)}")


def check_data_dir(data: str) -> None:
    """A missing local folder gets a clear error rather than a failed Hub lookup (a Hub id is `owner/name`)."""
    path = Path(data)
    looks_local = path.is_absolute() or data.startswith(".") or data.count("/") != 1
    if looks_local and not path.exists():
        raise MissingInputError(
            f"data folder {data} does not exist: create it with `python scripts/prepare_data.py --output_dir {data}` "
            "or pass --data_dir with a prepared folder or a Hub dataset id (owner/name)"
        )


def load_pairs(data: str | Path, subset: str, streaming: bool = False):
    """The paired dataset's `subset` (finetune / reward / rl / evaluation) as a `datasets` split.

    `data` is a `prepare_data.py` output folder or a Hub dataset id.
    """
    from datasets import load_dataset  # slow to import: only when a dataset is loaded

    _check_subset(subset)
    path = Path(data)
    if path.exists():
        files = path / "pairs" / subset
        if not any(files.glob("*.parquet")):
            raise MissingInputError(
                f"{files}: no parquet files; is {path} the output folder of scripts/prepare_data.py?"
            )
        return load_dataset("parquet", data_files=str(files / "*.parquet"), split="train", streaming=streaming)
    return load_dataset(str(data), data_dir=f"data/{subset}", split="train", streaming=streaming)


def load_preferences(data: str | Path, streaming: bool = False):
    """The preference dataset (one row per question, all its answers with `pm_score`)."""
    from datasets import load_dataset  # slow to import: only when a dataset is loaded

    path = Path(data)
    if path.exists():
        files = path / "preferences"
        if not any(files.glob("*.parquet")):
            raise MissingInputError(
                f"{files}: no parquet files; is {path} the output folder of scripts/prepare_data.py?"
            )
        return load_dataset("parquet", data_files=str(files / "*.parquet"), split="train", streaming=streaming)
    return load_dataset(str(data), split="train", streaming=streaming)
