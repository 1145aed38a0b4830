"""The driver's live progress line: tqdm bars read from a stage's raw output (real tqdm output,
from a pipe, split anywhere), the line they make, and how `run_command` shows it on a terminal
(rewritten in place, cleared at the end) and off one (a line every `interval` seconds), while
the log keeps every byte."""

from __future__ import annotations

import io
import itertools
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import answer, question
from tqdm import tqdm

from stackllama.data.prepare import PrepareOptions, prepare_dataset
from stackllama.pipeline import PipelineArguments, StageSpec, Step, runner
from stackllama.pipeline.live import (
    BARS_ENV,
    Bar,
    BarParser,
    LiveProgress,
    parse_bar,
    render,
)
from stackllama.pipeline.logged_run import run_command

# A stage in miniature: noise, a bar with a postfix (as rl_ppo.py's) and one without a total (as a
# generator's), written to stderr as tqdm does; every byte is also kept in argv[1] to compare with the log.
CHILD = r"""
import sys, time
from tqdm import tqdm

class Tee:
    encoding = "utf-8"  # tqdm draws its unicode bar (multi-byte characters)

    def __init__(self, stream, record):
        self.stream, self.record = stream, record
    def write(self, text):
        self.stream.write(text); self.stream.flush(); self.record.write(text); self.record.flush()
    def flush(self):
        self.stream.flush()

record = open(sys.argv[1], "w", encoding="utf-8")
err = Tee(sys.stderr, record)
err.write("loading the model\n")
bar = tqdm(total=4, desc="PPO steps", file=err, mininterval=0)
for step in range(4):
    time.sleep(float(sys.argv[2]))
    bar.update(1)
    bar.set_postfix(reward=f"{step / 10:.3f}", kl="0.045")
    if step == 1:
        bar.write("{'loss': 0.5}", file=err)
bar.close()
for _ in tqdm(iter(range(3)), desc="Sampling (SFT)", file=err, mininterval=0):
    pass
err.write("done\n")
"""


def child_command(tmp_path: Path, pause: float = 0.0) -> tuple[list[str], Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    record = tmp_path / "written.txt"
    return [sys.executable, str(script), str(record), str(pause)], record


@pytest.fixture(scope="module")
def child_output(tmp_path_factory) -> bytes:
    """What the child writes to a pipe (stdout and stderr together), as the driver reads it."""
    command, _ = child_command(tmp_path_factory.mktemp("child"))
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True).stdout


def test_parser_follows_the_bars_of_a_pipe(child_output):
    parser, seen = BarParser(), []
    for piece in child_output.split(b"\r"):  # each update as it comes
        if parser.feed(piece + b"\r"):
            seen.append(parser.bar)
    ppo = [bar for bar in seen if bar.desc == "PPO steps"]
    assert [n for n, _ in itertools.groupby(bar.n for bar in ppo)] == ["0", "1", "2", "3", "4"]  # each step, in order
    assert {bar.total for bar in ppo} == {"4"} and ppo[-1].percent == "100"
    assert ppo[-1].postfix == "kl=0.045, reward=0.300" and ppo[-1].remaining == "00:00"
    assert ppo[0].rate is None and ppo[0].remaining is None  # tqdm's "?" before the first update
    assert ppo[-1].rate.endswith(" it/s")
    assert seen[-1].desc == "Sampling (SFT)" and seen[-1].n == "3" and seen[-1].total is None
    assert seen[-1].unit == "it"


def test_parser_takes_chunks_split_anywhere(child_output):
    """One byte at a time (lines and the bar's multi-byte characters split) ends on the same bar."""
    whole, bytewise = BarParser(), BarParser()
    whole.feed(child_output)
    for i in range(len(child_output)):
        bytewise.feed(child_output[i:i + 1])
    assert bytewise.bar == whole.bar and whole.bar.desc == "Sampling (SFT)"

    line = tqdm.format_meter(3, 10, 6.4, prefix="PPO steps", postfix="kl=0.045").encode()
    parser = BarParser()
    assert not parser.feed(b"\r" + line[:-9]) and parser.bar is None  # half a bar is not a bar
    assert parser.feed(line[-9:]) and parser.bar.n == "3"  # whole once it ends, before the next "\r"
    assert not parser.feed(b"\r")  # the same bar again: no change


def test_parse_bar_on_tqdm_formats():
    bar = parse_bar(tqdm.format_meter(3, 10, 6.4, prefix="PPO steps", postfix="kl=0.045, reward=0.123"))
    assert bar == Bar("PPO steps", "3", "10", "", "30", "00:06", "00:14", "2.13 s/it", "kl=0.045, reward=0.123")
    bar = parse_bar(tqdm.format_meter(12, 40, 10.2, ncols=100))
    assert (bar.desc, bar.n, bar.total, bar.rate, bar.remaining) == ("", "12", "40", "1.18 it/s", "00:23")
    bar = parse_bar(tqdm.format_meter(1_234_567, 12_345_678, 2.0, unit="B", unit_scale=True, prefix="parse coffee"))
    assert (bar.n, bar.total, bar.rate) == ("1.23M", "12.3M", "617 kB/s")
    bar = parse_bar(tqdm.format_meter(12, None, 3.1, prefix="Sampling (SFT)"))
    assert (bar.desc, bar.n, bar.total, bar.unit, bar.rate, bar.elapsed) == \
        ("Sampling (SFT)", "12", None, "it", "3.87 it/s", "00:03")
    bar = parse_bar(tqdm.format_meter(5, None, 1.0, unit=" examples"))
    assert (bar.desc, bar.n, bar.unit) == ("", "5", "examples")
    coloured = "\x1b[32m" + tqdm.format_meter(1, 2, 1.0, prefix="Map") + "\x1b[0m\x1b[A"
    assert parse_bar(coloured).n == "1"
    for noise in ("", "loading the model", "{'loss': 0.5, 'epoch': [1]}", "Epoch 1 [done]", "step 3/10 [slow]"):
        assert parse_bar(noise) is None, noise


def test_render():
    ppo = parse_bar(tqdm.format_meter(3, 10, 6.4, prefix="PPO steps", postfix="kl=0.045, reward=0.123"))
    assert render("ppo", ppo) == "ppo: PPO steps 3/10 (30%), 2.13 s/it, 00:14 left; kl=0.045, reward=0.123"
    assert render("sft", parse_bar(tqdm.format_meter(12, 40, 10.2))) == "sft: 12/40 (30%), 1.18 it/s, 00:23 left"
    assert render("sft", parse_bar(tqdm.format_meter(0, 40, 0.0))) == "sft: 0/40 (0%), 00:00 elapsed"
    assert render("evaluate", parse_bar(tqdm.format_meter(12, None, 3.1, prefix="Sampling (SFT)"))) == \
        "evaluate: Sampling (SFT) 12 it, 3.87 it/s, 00:03 elapsed"


def test_each_bar_update_becomes_the_live_line(child_output, monkeypatch):
    """Fed the child's output one update at a time (as a pipe gives it when the stage is slow), the
    live line shows every step in turn, each once, and clears itself at the end."""
    monkeypatch.setenv("COLUMNS", "200")
    screen = io.StringIO()
    progress = LiveProgress("ppo", stream=screen, is_tty=True)
    for piece in child_output.split(b"\r"):
        progress.feed(piece + b"\r")
    progress.close()
    shown = screen.getvalue()
    assert shown.startswith("\r    ppo: PPO steps 0/4 (0%)") and shown.endswith("\033[K\r\033[K")  # cleared at the end
    writes = shown.split("\r")[1:-1]
    steps = [w.split(" (")[0] for w in writes if "PPO steps" in w]
    assert [s for s, _ in itertools.groupby(steps)] == [f"    ppo: PPO steps {n}/4" for n in range(5)]
    assert "; kl=0.045, reward=0.300" in writes[steps.index("    ppo: PPO steps 4/4") + 1]  # the postfix update
    assert len(writes) == len(set(writes))  # an unchanged line is not written again


def test_run_command_logs_every_byte_and_shows_a_live_line_on_a_terminal(tmp_path, monkeypatch):
    """Through a real pipe: updates that arrive together are shown as the latest of them (a live line
    has no use for the ones in between), so only what holds however the output is chunked is asserted."""
    monkeypatch.setenv("COLUMNS", "200")
    command, record = child_command(tmp_path)
    screen, lines = io.StringIO(), []
    progress = LiveProgress("ppo", out=lines.append, stream=screen, is_tty=True)
    assert run_command(command, tmp_path / "ppo.log", verbose=False, progress=progress) == 0
    expected = ("$ " + shlex.join(command) + "\n").encode() + record.read_bytes()
    assert (tmp_path / "ppo.log").read_bytes() == expected
    assert lines == []  # on a terminal, nothing but the live line
    shown = screen.getvalue()
    assert shown.startswith("\r    ppo: ") and shown.endswith("\033[K\r\033[K")  # cleared at the end
    writes = shown.split("\r")[1:-1]
    assert all(w.endswith("\033[K") and "\n" not in w for w in writes)
    assert writes[-1].startswith("    ppo: Sampling (SFT) 3 it")  # the stage's last state
    assert len(writes) == len(set(writes))  # an unchanged line is not written again

    monkeypatch.setenv("COLUMNS", "30")
    screen = io.StringIO()
    run_command(command, tmp_path / "ppo.log", verbose=False, progress=LiveProgress("ppo", stream=screen, is_tty=True))
    assert max(len(w.removesuffix("\033[K")) for w in screen.getvalue().split("\r")) == 29  # one row, never wrapped


def test_run_command_off_a_terminal_prints_a_line_per_interval(tmp_path):
    command, record = child_command(tmp_path, pause=0.08)  # about 0.3 s of bar updates
    screen, lines = io.StringIO(), []
    progress = LiveProgress("ppo", out=lines.append, stream=screen, is_tty=False, interval=0.05)
    assert run_command(command, tmp_path / "ppo.log", verbose=False, progress=progress) == 0
    assert screen.getvalue() == ""
    assert lines and all(line.startswith("    ppo: ") for line in lines)
    assert len(lines) == len(set(lines))
    assert (tmp_path / "ppo.log").read_bytes().endswith(record.read_bytes())

    for interval in (0, 3600):  # off, and longer than the stage
        lines = []
        progress = LiveProgress("ppo", out=lines.append, stream=screen, is_tty=False, interval=interval)
        assert run_command(command, tmp_path / "ppo.log", verbose=False, progress=progress) == 0
        assert lines == [] and screen.getvalue() == ""


def test_non_terminal_lines_wait_for_the_interval():
    """With a fake clock: the first line only after `interval`, then no more often, and only when new."""
    now = [0.0]
    lines = []
    progress = LiveProgress("sft", out=lines.append, is_tty=False, interval=10, clock=lambda: now[0])

    def update(n, at):
        now[0] = at
        progress.feed(("\r" + tqdm.format_meter(n, 40, at)).encode())

    update(1, 5.0)  # before the interval: nothing
    update(2, 11.0)
    update(3, 15.0)  # 4 s after the last line: nothing
    update(4, 21.5)
    now[0] = 40.0
    progress.feed(b"{'loss': 0.5}\n")  # noise, the bar unchanged: no repeat
    assert [line.split(" (")[0] for line in lines] == ["    sft: 2/40", "    sft: 4/40"]


def test_the_driver_clears_the_live_line_before_the_stage_line(tmp_path, monkeypatch):
    """run_pipeline with one fake stage that shows a bar: its done line starts on a cleared row;
    with --verbose there is no live line, the stage's raw output instead."""
    script = tmp_path / "stage.py"
    script.write_text("import os, sys\nfrom tqdm import tqdm\n"
                      "for _ in tqdm(range(3), desc='work', mininterval=0): pass\n"
                      "print('bars env:', os.environ.get(sys.argv[2]))\n"
                      "open(sys.argv[1], 'w').write('{}')\n")
    run = tmp_path / "run"
    spec = StageSpec("one", "one", str(script), "one", "done.json")
    (run / "one").mkdir(parents=True)
    monkeypatch.setattr(runner, "STAGE_NAMES", ("one",))
    monkeypatch.setattr(runner, "plan_step", lambda *a: Step(spec, [str(run / "one" / "done.json"), BARS_ENV], None))
    monkeypatch.setenv("COLUMNS", "200")
    screen = io.StringIO()
    code = runner.run_pipeline(PipelineArguments(output_dir=str(run)), {}, out=lambda line: screen.write(line + "\n"),
                               console=screen, is_tty=True)
    assert code == 0
    shown = screen.getvalue()
    assert "\r    one: work 3/3 (100%)" in shown
    assert "\033[K\r\033[K[1/1] one  done in" in shown  # cleared, then the stage's line on a clean row
    assert "bars env: 1" in (run / "logs" / "one.log").read_text()  # the stage is told its bars are read

    screen = io.StringIO()
    args = PipelineArguments(output_dir=str(run), force=True, verbose=True)
    assert runner.run_pipeline(args, {}, out=lambda line: screen.write(line + "\n"), console=screen, is_tty=True) == 0
    assert "\033[K" not in screen.getvalue()


def test_prepare_shows_its_bars_off_a_terminal_when_the_driver_reads_them(write_dump, tmp_path, monkeypatch, capsys):
    """The data preparation's bars are on a terminal only by default; the driver's variable turns them on."""
    dump = write_dump([question(1, accepted=11), answer(10, 1, 4), answer(11, 1, 0)])
    monkeypatch.delenv(BARS_ENV, raising=False)
    prepare_dataset([str(dump)], tmp_path / "a", PrepareOptions(num_proc=1))
    assert "convert + pair" not in capsys.readouterr().err  # captured output is not a terminal
    monkeypatch.setenv(BARS_ENV, "1")
    prepare_dataset([str(dump)], tmp_path / "b", PrepareOptions(num_proc=1))
    bar = BarParser()
    bar.feed(capsys.readouterr().err.encode())
    assert bar.bar is not None and (bar.bar.desc, bar.bar.n, bar.bar.total) == ("convert + pair", "1", "1")
    prepare_dataset([str(dump)], tmp_path / "c", PrepareOptions(num_proc=1, progress=False))
    assert capsys.readouterr().err == ""  # --progress false still wins
