"""Bad input: row-level problems are skipped and counted, file-level ones stop the run with
a one-line message naming the file and position, and never leave a partial output."""

import subprocess
import sys

import pytest
from conftest import REPO, answer, posts_xml, question

from stackllama.data.dumps import DumpError
from stackllama.data.prepare import PrepareOptions, prepare_dataset

GOOD = [question(1), answer(2, 1, 1), answer(3, 1, 8)]


def run(dumps, out, **kw):
    return prepare_dataset([str(d) for d in dumps], out, PrepareOptions(num_proc=1, **kw))


def test_row_level_problems_are_skipped_and_counted(write_dump, tmp_path):
    rows = GOOD + [
        answer(4, 1, 2, body=""),  # empty body
        answer(5, 1, 2, body="<p>  </p>"),  # empty once converted
        {"Id": 6, "PostTypeId": 2, "ParentId": 1, "Body": "<p>no score</p>"},
        {"Id": 7, "Body": "<p>no type</p>", "Score": 1},
        answer(8, 1, "abc"),
        answer(9, 999, 4),  # its question is absent
        answer(3, 1, 5, body="<p>same id again</p>"),
        question(10, body=""),
    ]
    summary = run([write_dump(rows)], tmp_path / "out")
    assert summary["skipped"] == {
        "empty body": 3,
        "answer without Score": 1,
        "row without PostTypeId": 1,
        "answer with a non-integer Score": 1,
        "answer whose question is absent": 1,
        "duplicate post id": 1,
    }
    assert summary["pairs"] == 1


def test_question_left_with_one_answer_after_empty_bodies(write_dump, tmp_path):
    rows = [question(1), answer(2, 1, 1), answer(3, 1, 8, body="<p></p>")]
    summary = run([write_dump(rows)], tmp_path / "out")
    assert summary["skipped"]["fewer than 2 answers left after empty bodies"] == 1
    assert summary["preference_rows"] == 0 and summary["pairs"] == 0


def test_missing_input(tmp_path):
    with pytest.raises(DumpError, match=r"nope/Posts.xml: no such file"):
        run([tmp_path / "nope" / "Posts.xml"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DumpError, match="folder holds no Posts.xml"):
        run([tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _assert_nothing_written(tmp_path):
    assert [p.name for p in tmp_path.iterdir() if p.name != "dumps"] == []


def test_truncated_xml_names_file_and_position(write_dump, tmp_path):
    folder = write_dump(GOOD)
    data = (folder / "Posts.xml").read_bytes()
    (folder / "Posts.xml").write_bytes(data[: len(data) - 40])
    with pytest.raises(DumpError) as err:
        run([folder], tmp_path / "out")
    msg = str(err.value)
    assert str(folder / "Posts.xml") in msg and "line 5, column" in msg and "ends early" in msg
    _assert_nothing_written(tmp_path)


def test_malformed_xml(write_dump, tmp_path):
    folder = write_dump(GOOD)
    (folder / "Posts.xml").write_bytes(posts_xml(GOOD).replace(b'<row Id="2"', b'<row Id="2" <', 1))
    with pytest.raises(DumpError, match=r"line 4, column \d+: not well-formed"):
        run([folder], tmp_path / "out")
    _assert_nothing_written(tmp_path)


def test_non_utf8_byte(write_dump, tmp_path):
    folder = write_dump(GOOD)
    (folder / "Posts.xml").write_bytes(posts_xml(GOOD).replace(b"What about it", b"What \xff about it"))
    with pytest.raises(DumpError, match=r"line 3, column \d+: .*not valid UTF-8"):
        run([folder], tmp_path / "out")
    _assert_nothing_written(tmp_path)


def test_corrupt_7z(tmp_path):
    bad = tmp_path / "coffee.stackexchange.com.7z"
    bad.write_bytes(b"7z\xbc\xaf\x27\x1c not really an archive")
    with pytest.raises(DumpError, match="cannot read the 7z archive"):
        run([bad], tmp_path / "out")


def test_failed_run_keeps_previous_output(write_dump, tmp_path):
    run([write_dump(GOOD)], tmp_path / "out")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
    bad = write_dump([question(1)], site="broken")
    (bad / "Posts.xml").write_bytes(b"<posts><row Id='1'")
    with pytest.raises(DumpError):
        prepare_dataset([str(bad)], tmp_path / "out", PrepareOptions(num_proc=1), overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dumps", "out"]  # no temporary folder left


def test_existing_output_needs_overwrite(write_dump, tmp_path):
    run([write_dump(GOOD)], tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run([write_dump(GOOD)], tmp_path / "out")


def test_bad_fractions(write_dump, tmp_path):
    with pytest.raises(ValueError, match="sum to 1"):
        run([write_dump(GOOD)], tmp_path / "out", evaluation_fraction=0.5)
    assert not (tmp_path / "out").exists()


def test_cli_reports_one_line_and_exits_nonzero(write_dump, tmp_path):
    folder = write_dump(GOOD)
    (folder / "Posts.xml").write_bytes(posts_xml(GOOD)[:-30])
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--dumps", str(folder),
                           "--output_dir", str(tmp_path / "out"), "--num_proc", "1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("prepare_data.py: error: ") and "Posts.xml: line" in line
    assert not (tmp_path / "out").exists()


def test_cli_runs_from_a_yaml_config(write_dump, tmp_path):
    folder = write_dump(GOOD)
    config = tmp_path / "prepare.yaml"
    config.write_text(f"dumps: [{folder}]\noutput_dir: {tmp_path / 'out'}\nnum_proc: 1\nmax_pairs_per_question: 1\n")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--config", str(config)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "total" in proc.stdout and (tmp_path / "out" / "pairs" / "finetune").is_dir()
    config.write_text("num_prc: 1\n")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--config", str(config)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: Unknown arguments from config file: ['--num_prc', '1']" in proc.stderr


def test_shipped_data_config_is_valid(tmp_path):
    """Every key of configs/data/stackexchange.yaml is a known flag; it then stops at the
    first dump that is not on this machine, with a one-line error."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--config",
                           str(REPO / "configs" / "data" / "stackexchange.yaml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == ("prepare_data.py: error: dumps/stackoverflow.com-Posts.7z: no such file or folder "
                                   "(expected a Posts.xml, a folder holding one, or a .7z)")
