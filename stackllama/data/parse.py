"""Pass 1 of the preparation: stream each dump's rows into the on-disk `PostStore`, nothing
converted yet. Row-level problems (a row without an id, an answer without a score, ...) are
counted by reason, not raised."""

from __future__ import annotations

from collections import Counter

from tqdm.auto import tqdm

from .dumps import DumpSource, iter_rows, parse_tags
from .store import PostStore

# Planted in every site's dump since 2024 to trace copies; they are not real posts.
FAKE_POST_IDS = frozenset({1000000001, 1000000010})
_INSERT_BATCH = 1_000


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def load_posts(source: DumpSource, site: int, store: PostStore, skipped: Counter, dates: list[str],
               progress: bool | None) -> int:
    """Stream one Posts.xml into the store; returns rows read. Row-level problems are counted."""
    questions, answers = [], []
    rows = 0
    size = source.posts_path.stat().st_size
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"parse {source.site}", disable=not progress
              if progress is not None else None) as bar:
        for row in iter_rows(source.posts_path, on_read=bar.update):
            rows += 1
            post_type, post_id = row.get("PostTypeId"), _int_or_none(row.get("Id"))
            if post_type is None:
                skipped["row without PostTypeId"] += 1
                continue
            if post_type not in ("1", "2"):
                skipped[f"not a question or answer (PostTypeId {post_type})"] += 1
                continue
            if post_id is None:
                skipped["row without a valid Id"] += 1
                continue
            if post_id in FAKE_POST_IDS:
                skipped["planted fake post"] += 1
                continue
            body = row.get("Body", "")
            if not body.strip():
                skipped["empty body"] += 1
                continue
            created = row.get("CreationDate", "")
            if created:
                dates[0] = min(dates[0], created) if dates[0] else created
                dates[1] = max(dates[1], created)
            owner_id = _int_or_none(row.get("OwnerUserId"))
            owner_name = row.get("OwnerDisplayName", "")
            if post_type == "1":
                questions.append((site, post_id, row.get("Title", ""), body, created, owner_id, owner_name,
                                  _int_or_none(row.get("AcceptedAnswerId")),
                                  "|".join(parse_tags(row.get("Tags")))))
            else:
                if row.get("Score") is None:
                    skipped["answer without Score"] += 1
                    continue
                score, parent = _int_or_none(row["Score"]), _int_or_none(row.get("ParentId"))
                if score is None:
                    skipped["answer with a non-integer Score"] += 1
                    continue
                if parent is None:
                    skipped["answer without ParentId"] += 1
                    continue
                answers.append((site, post_id, parent, score, body, owner_id, owner_name))
            if len(questions) >= _INSERT_BATCH:
                skipped["duplicate post id"] += store.add_questions(questions)
                questions = []
            if len(answers) >= _INSERT_BATCH:
                skipped["duplicate post id"] += store.add_answers(answers)
                answers = []
    skipped["duplicate post id"] += store.add_questions(questions) + store.add_answers(answers)
    return rows


def load_users(source: DumpSource, site: int, store: PostStore) -> None:
    """Display names for attribution, from Users.xml when the dump has it."""
    batch = []
    for row in iter_rows(source.users_path):
        user_id = _int_or_none(row.get("Id"))
        if user_id is not None and row.get("DisplayName"):
            batch.append((site, user_id, row["DisplayName"]))
        if len(batch) >= _INSERT_BATCH:
            store.add_users(batch)
            batch = []
    store.add_users(batch)
