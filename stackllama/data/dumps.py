"""Finding and streaming Stack Exchange data dumps.

A dump is given as a `Posts.xml`, a folder holding one, or the site's `.7z` archive as
Stack Exchange distributes it (`coffee.stackexchange.com.7z`, or for Stack Overflow
`stackoverflow.com-Posts.7z` beside `stackoverflow.com-Users.7z`). `SITE=PATH` names the
site explicitly; otherwise it is taken from the file or folder name.

`iter_rows` streams `<row>` elements with bounded memory (Stack Overflow's `Posts.xml` is
about 100 GB), and turns parser errors into a one-line `DumpError` naming the file and the
line/column, so a truncated download or a bad byte never surfaces as a bare traceback.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DumpError

# Sites whose domain is not <name>.stackexchange.com.
_TOP_LEVEL_SITES = {
    "stackoverflow": "stackoverflow.com",
    "superuser": "superuser.com",
    "serverfault": "serverfault.com",
    "askubuntu": "askubuntu.com",
    "stackapps": "stackapps.com",
    "mathoverflow": "mathoverflow.net",
}



@dataclass(frozen=True)
class DumpSource:
    """One site's dump, resolved to files on disk."""

    site: str  # domain, e.g. "coffee.stackexchange.com"
    posts_path: Path
    users_path: Path | None
    origin: str  # what the user passed

    @property
    def site_url(self) -> str:
        return f"https://{self.site}"


def site_domain(name: str) -> str:
    """`coffee` -> `coffee.stackexchange.com`; a name that is already a domain is kept."""
    name = name.strip().lower()
    name = re.sub(r"\.7z$", "", name)
    name = re.sub(r"-(posts|users)$", "", name)
    if "." in name:
        return name
    return _TOP_LEVEL_SITES.get(name, f"{name}.stackexchange.com")


def _extract_7z(archive: Path, scratch: Path) -> dict[str, Path]:
    """Extract Posts.xml / Users.xml from a site archive into `scratch`; returns name -> path."""
    import py7zr  # only for a .7z dump

    try:
        with py7zr.SevenZipFile(archive, mode="r") as z:
            names = z.getnames()
            wanted = [n for n in names if Path(n).name in ("Posts.xml", "Users.xml")]
            if not wanted:
                return {}
            scratch.mkdir(parents=True, exist_ok=True)
            z.extract(path=scratch, targets=wanted)
    except (py7zr.exceptions.Bad7zFile, py7zr.exceptions.ArchiveError, EOFError, OSError) as e:
        raise DumpError(f"{archive}: cannot read the 7z archive ({e})") from e
    return {Path(n).name: scratch / n for n in wanted}


def resolve_dump(spec: str | os.PathLike, scratch_dir: Path) -> DumpSource:
    """Turn a user's `PATH` or `SITE=PATH` into a `DumpSource`, extracting a .7z if needed."""
    spec = str(spec)
    site = None
    if "=" in spec and not Path(spec).exists():
        site, spec = spec.split("=", 1)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DumpError(f"{path}: no such file or folder (expected a Posts.xml, a folder holding one, or a .7z)")

    users: Path | None = None
    if path.is_dir():
        posts = path / "Posts.xml"
        if not posts.is_file():
            raise DumpError(f"{path}: folder holds no Posts.xml")
        users = path / "Users.xml"
        name = path.resolve().name
    elif path.suffix == ".7z":
        name = path.name
        extracted = _extract_7z(path, scratch_dir / re.sub(r"\W", "_", path.name))
        if "Posts.xml" not in extracted:
            raise DumpError(f"{path}: archive holds no Posts.xml")
        posts = extracted["Posts.xml"]
        users = extracted.get("Users.xml")
        # Stack Overflow ships one archive per table: look for the Users archive beside it.
        sibling = path.with_name(re.sub(r"-Posts\.7z$", "-Users.7z", path.name, flags=re.I))
        if users is None and sibling != path and sibling.exists():
            users = _extract_7z(sibling, scratch_dir / re.sub(r"\W", "_", sibling.name)).get("Users.xml")
    else:
        posts = path
        users = path.with_name("Users.xml")
        name = path.resolve().parent.name
    if users is not None and not users.is_file():
        users = None
    return DumpSource(site=site_domain(site or name), posts_path=posts, users_path=users, origin=str(spec))


class _ProgressReader:
    """A binary file wrapper that reports bytes read to a callback (drives the progress bar)."""

    def __init__(self, f, on_read: Callable[[int], None] | None):
        self._f = f
        self._on_read = on_read

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if self._on_read is not None and data:
            self._on_read(len(data))
        return data


def _explain(error: ET.ParseError) -> str:
    msg = str(error).split(":")[0]
    if msg.startswith("no element found") or msg.startswith("unclosed token"):
        return f"{msg}: the file ends early (truncated download or unfinished extraction?)"
    if msg.startswith("not well-formed"):
        return f"{msg}: malformed XML or a byte that is not valid UTF-8"
    return msg


def iter_rows(path: Path, on_read: Callable[[int], None] | None = None) -> Iterator[dict[str, str]]:
    """Yield the attribute dict of every `<row>` in a dump file, in file order.

    Memory stays flat: each row is dropped from the tree as soon as it is yielded.
    Raises `DumpError` (file, line, column, reason) on malformed or truncated XML.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DumpError(f"{path}: {e.strerror}") from e
    with f:
        context = ET.iterparse(_ProgressReader(f, on_read), events=("start", "end"))
        try:
            _, root = next(context)
            for event, elem in context:
                if event == "end" and elem.tag == "row":
                    yield elem.attrib
                    root.clear()
        except ET.ParseError as e:
            line, column = e.position
            raise DumpError(f"{path}: line {line}, column {column}: {_explain(e)}") from None


def parse_tags(tags: str | None) -> list[str]:
    """Both tag formats of real dumps: `<a><b>` (until 2023) and `|a|b|` (2024 on)."""
    if not tags:
        return []
    if tags.startswith("<"):
        return re.findall(r"<([^<>]+)>", tags)
    return [t for t in tags.split("|") if t]
