import os
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def posts_xml(rows: list[dict], root: str = "posts") -> bytes:
    """A dump file as Stack Exchange writes it: BOM, CRLF, one escaped <row> per post."""
    lines = ['<?xml version="1.0" encoding="utf-8"?>', f"<{root}>"]
    for row in rows:
        attrs = " ".join(f"{k}={quoteattr(str(v))}" for k, v in row.items())
        lines.append(f"  <row {attrs} />")
    lines.append(f"</{root}>")
    return b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n"


def question(id, title="A question?", body="<p>What about it?</p>", accepted=None, owner=7, tags="<a><b>",
             created="2015-01-27T20:09:32.720", **extra):
    row = {"Id": id, "PostTypeId": 1, "CreationDate": created, "Score": 3, "Body": body, "OwnerUserId": owner,
           "Title": title, "Tags": tags, "AnswerCount": 0}
    if accepted is not None:
        row["AcceptedAnswerId"] = accepted
    row.update(extra)
    return {k: v for k, v in row.items() if v is not None}


def answer(id, parent, score, body=None, owner=None, **extra):
    row = {"Id": id, "PostTypeId": 2, "ParentId": parent, "CreationDate": "2015-01-28T10:00:00.000", "Score": score,
           "Body": body if body is not None else f"<p>Answer {id} with score {score}.</p>"}
    if owner is not None:
        row["OwnerUserId"] = owner
    row.update(extra)
    return {k: v for k, v in row.items() if v is not None}


@pytest.fixture
def write_dump(tmp_path):
    """write_dump(rows, site="coffee") -> folder holding Posts.xml (the folder name is the site)."""

    def _write(rows, site="coffee", users=None):
        folder = tmp_path / "dumps" / site
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "Posts.xml").write_bytes(posts_xml(rows))
        if users is not None:
            (folder / "Users.xml").write_bytes(posts_xml(users, root="users"))
        return folder

    return _write


@pytest.fixture(scope="session")
def bundled_output(tmp_path_factory):
    """The bundled sample prepared once with the default flags (one process)."""
    from stackllama.data.prepare import PrepareOptions, bundled_dumps, prepare_dataset

    out = tmp_path_factory.mktemp("bundled") / "data"
    summary = prepare_dataset(bundled_dumps(), out, PrepareOptions(num_proc=1))
    return out, summary
