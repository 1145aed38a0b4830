"""A stage's subprocess: its output goes to the stage's log (and, with --verbose, the console),
and its progress bars to the console's live line (:mod:`.live`)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from .live import BARS_ENV, LiveProgress


def run_command(command: list[str], log: Path, verbose: bool, progress: LiveProgress | None = None) -> int:
    """Run `command` with its output in `log` (and on the console with `verbose`); return its exit code.

    Every byte the command writes goes to the log unchanged; `progress` sees the same chunks and
    its live line is cleared when the command ends, however it ends."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{BARS_ENV: "1"})
    with open(log, "wb") as sink:
        sink.write(("$ " + shlex.join(command) + "\n").encode())
        sink.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(1 << 16):
                sink.write(chunk)
                if verbose:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                if progress is not None:
                    progress.feed(chunk)
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        finally:
            if progress is not None:
                progress.close()


def tail(log: Path, lines: int = 25) -> str:
    """The last lines of a log, progress-bar carriage returns collapsed."""
    try:
        text = log.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""
    rows = [row.rsplit("\r", 1)[-1] for row in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([row for row in rows if row.strip()][-lines:])
