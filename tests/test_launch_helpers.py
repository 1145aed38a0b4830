"""The multi-process tests' launcher helper: it runs a launch again only after the known native
abort, and only when told which folders to reset; every other failure fails the test."""

import sys

import pytest
from interrupt_helpers import NATIVE_ABORT, run_group


def flaky_command(tmp_path, message: str):
    """A run that writes into out/, then fails with `message` the first time and succeeds after
    (when out/ was reset: a leftover of the first attempt fails it)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import pathlib, sys\n"
        f"count, out = pathlib.Path({str(tmp_path / 'count')!r}), pathlib.Path({str(tmp_path / 'out')!r})\n"
        "n = int(count.read_text()) + 1 if count.exists() else 1\n"
        "count.write_text(str(n))\n"
        "if (out / 'partial').exists():\n"
        "    sys.exit('a leftover of the first attempt')\n"
        "out.mkdir(exist_ok=True)\n"
        "(out / 'partial').write_text('x')\n"
        "if n == 1:\n"
        f"    print({message!r}, file=sys.stderr)\n"
        "    sys.exit(1)\n"
        "print('done')\n"
    )
    return [sys.executable, str(script)]


def test_the_native_abort_is_retried_once_from_reset_folders(tmp_path):
    with pytest.warns(UserWarning, match="aborted"):
        output = run_group(flaky_command(tmp_path, NATIVE_ABORT), fresh=(tmp_path / "out",))
    assert "done" in output and (tmp_path / "count").read_text() == "2"


def test_other_failures_and_unnamed_folders_are_not_retried(tmp_path):
    with pytest.raises(AssertionError, match="boom"):
        run_group(flaky_command(tmp_path, "boom"), fresh=(tmp_path / "out",))
    assert (tmp_path / "count").read_text() == "1"

    other = tmp_path / "second"
    other.mkdir()
    with pytest.raises(AssertionError, match="terminate called"):
        run_group(flaky_command(other, NATIVE_ABORT))  # no folders named: nothing to reset, no retry
    assert (other / "count").read_text() == "1"
