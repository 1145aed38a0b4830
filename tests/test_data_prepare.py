"""The prepare stage end to end on small crafted dumps and on the bundled sample."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import answer, question

from stackllama.data.dumps import parse_tags, site_domain
from stackllama.data.loading import load_pairs, load_preferences
from stackllama.data.prepare import PrepareOptions, prepare_dataset


def read(out, what):
    return pq.read_table(out / what).to_pylist()


def run(dumps, out, **kw):
    kw.setdefault("num_proc", 1)
    return prepare_dataset([str(d) for d in dumps], out, PrepareOptions(**kw))


def one_question_dump(write_dump, **kw):
    rows = [
        question(1, title="How to store beans?", body="<p>Whole <b>beans</b>.</p>", accepted=11),
        answer(10, 1, 4, owner=20),  # pm 2
        answer(11, 1, 0, owner=21),  # accepted: pm 1
        answer(12, 1, -2, owner=22, OwnerDisplayName="Gone User"),  # pm -1
        answer(13, 1, 3),  # pm 2, tie with 10
    ]
    return write_dump(rows, **kw)


def test_preference_row_layout_scores_and_attribution(write_dump, tmp_path):
    dump = one_question_dump(write_dump, users=[{"Id": 20, "DisplayName": "Ann"}, {"Id": 21, "DisplayName": "Bo"}])
    summary = run([dump], tmp_path / "out")
    (row,) = read(tmp_path / "out", "preferences")
    assert row["qid"] == 1
    assert row["question"] == "How to store beans?\n\nWhole **beans**."
    assert row["date"] == "2015/01/27"
    assert row["metadata"] == ["https://coffee.stackexchange.com/questions/1", "https://coffee.stackexchange.com",
                               "https://coffee.stackexchange.com/users/7"]
    assert row["tags"] == ["a", "b"]
    by_id = {a["answer_id"]: a for a in row["answers"]}
    assert {i: a["pm_score"] for i, a in by_id.items()} == {10: 2, 11: 1, 12: -1, 13: 2}
    assert [i for i, a in by_id.items() if a["selected"]] == [11]
    assert by_id[10]["author"] == "Ann" and by_id[10]["author_id"] == 20  # from Users.xml
    assert by_id[10]["author_profile"] == "https://coffee.stackexchange.com/users/20"
    assert by_id[12]["author"] == "Gone User"  # OwnerDisplayName when Users.xml lacks the user
    assert by_id[13]["author_id"] is None and by_id[13]["author_profile"] == ""
    assert by_id[10]["score"] == 4 and by_id[10]["text"] == "Answer 10 with score 4."
    # 4 answers, one tie (10, 13): 5 pairs
    assert summary["pairs"] == 5 and summary["questions_with_2_answers"] == 1


def test_pairs_prefer_higher_pm_score(write_dump, tmp_path):
    run([one_question_dump(write_dump)], tmp_path / "out", finetune_fraction=1.0, reward_fraction=0.0,
        rl_fraction=0.0, evaluation_fraction=0.0)
    pairs = read(tmp_path / "out", "pairs/finetune")
    score = {f"Answer {i} with score {s}.": p for i, s, p in [(10, 4, 2), (11, 0, 1), (12, -2, -1), (13, 3, 2)]}
    assert len(pairs) == 5
    assert all(score[p["response_j"]] > score[p["response_k"]] for p in pairs)
    assert all((p["pm_score_j"], p["pm_score_k"]) == (score[p["response_j"]], score[p["response_k"]]) for p in pairs)
    assert list(pairs[0]) == ["qid", "question", "date", "metadata", "response_j", "response_k", "pm_score_j",
                              "pm_score_k"]


def test_body_only_flag(write_dump, tmp_path):
    run([one_question_dump(write_dump)], tmp_path / "out", question_body_only=True)
    assert read(tmp_path / "out", "preferences")[0]["question"] == "Whole **beans**."


def test_accepted_bonus_for_negative_flag(write_dump, tmp_path):
    rows = [question(1, accepted=10), answer(10, 1, -3), answer(11, 1, 0)]
    run([write_dump(rows)], tmp_path / "a")
    run([write_dump(rows, site="tea")], tmp_path / "b", accepted_bonus_for_negative=True)
    assert {a["answer_id"]: a["pm_score"] for a in read(tmp_path / "a", "preferences")[0]["answers"]} == {10: -1, 11: 0}
    assert {a["answer_id"]: a["pm_score"] for a in read(tmp_path / "b", "preferences")[0]["answers"]} == {10: 0, 11: 0}


def test_at_most_max_pairs_per_question(write_dump, tmp_path):
    rows = [question(1)] + [answer(100 + i, 1, 2 ** i - 1) for i in range(7)]  # 7 distinct pm: 21 pairs
    summary = run([write_dump(rows)], tmp_path / "out")
    assert summary["pairs"] == 10
    summary = run([write_dump(rows)], tmp_path / "out3", max_pairs_per_question=3)
    assert summary["pairs"] == 3


def test_fake_posts_other_types_and_single_answer_questions_are_dropped(write_dump, tmp_path):
    rows = [
        question(1), answer(2, 1, 1), answer(3, 1, 5),
        question(5), answer(6, 5, 2),  # one answer: no pairs
        question(1000000001), answer(1000000010, 1000000001, 3), answer(7, 1000000001, 9),
        {"Id": 8, "PostTypeId": 4, "Body": "<p>tag wiki</p>", "Score": 0},
        {"Id": 9, "PostTypeId": 5, "Body": "<p>tag excerpt</p>", "Score": 0},
    ]
    summary = run([write_dump(rows)], tmp_path / "out")
    assert summary["skipped"]["planted fake post"] == 2
    assert summary["skipped"]["not a question or answer (PostTypeId 4)"] == 1
    assert summary["skipped"]["not a question or answer (PostTypeId 5)"] == 1
    # answer 7 belonged to the fake question, so it has no question now
    assert summary["skipped"]["answer whose question is absent"] == 1
    assert summary["questions"] == 2 and summary["questions_with_fewer_than_2_answers"] == 1
    assert [r["qid"] for r in read(tmp_path / "out", "preferences")] == [1]


def test_both_tag_formats_and_site_names():
    assert parse_tags("<coffee><whole-bean>") == ["coffee", "whole-bean"]
    assert parse_tags("|coffee|whole-bean|") == ["coffee", "whole-bean"]
    assert parse_tags("") == [] and parse_tags(None) == []
    assert site_domain("coffee") == "coffee.stackexchange.com"
    assert site_domain("coffee.stackexchange.com.7z") == "coffee.stackexchange.com"
    assert site_domain("stackoverflow.com-Posts.7z") == "stackoverflow.com"
    assert site_domain("superuser") == "superuser.com"


def test_new_tag_format_in_a_dump(write_dump, tmp_path):
    rows = [question(1, tags="|espresso|grinding|"), answer(2, 1, 1), answer(3, 1, 9)]
    run([write_dump(rows)], tmp_path / "out")
    assert read(tmp_path / "out", "preferences")[0]["tags"] == ["espresso", "grinding"]


def test_inputs_as_file_folder_7z_and_named_site(write_dump, tmp_path):
    import py7zr

    folder = one_question_dump(write_dump, site="beer")
    archive = tmp_path / "coffee.stackexchange.com.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        z.write(folder / "Posts.xml", "Posts.xml")
    named = f"tea.stackexchange.com={folder / 'Posts.xml'}"
    summary = run([folder / "Posts.xml", archive, named], tmp_path / "out")
    assert summary["sites"] == ["beer.stackexchange.com", "coffee.stackexchange.com", "tea.stackexchange.com"]
    sites = sorted(r["metadata"][1] for r in read(tmp_path / "out", "preferences"))
    assert sites == ["https://beer.stackexchange.com", "https://coffee.stackexchange.com",
                     "https://tea.stackexchange.com"]
    assert summary["pairs"] == 15


def test_each_post_converted_once(write_dump, tmp_path, monkeypatch):
    from stackllama.data import markdown

    calls = []
    real = markdown.HtmlToMarkdown.__call__
    monkeypatch.setattr(markdown.HtmlToMarkdown, "__call__", lambda self, html: calls.append(html) or real(self, html))
    rows = [question(1)] + [answer(10 + i, 1, 2 ** i) for i in range(6)] + [question(2), answer(30, 2, 1)]
    summary = run([write_dump(rows)], tmp_path / "out")
    assert summary["pairs"] == 10
    # 1 question + 6 answers, each converted once although they appear in 10 pairs; the
    # question with a single answer is never converted
    assert len(calls) == 7


def test_reproducible_and_independent_of_process_count(tmp_path, bundled_output):
    from stackllama.data.prepare import bundled_dumps

    out, _ = bundled_output
    run(bundled_dumps(), tmp_path / "two", num_proc=2)
    for subset in ("finetune", "evaluation"):
        assert read(out, f"pairs/{subset}") == read(tmp_path / "two", f"pairs/{subset}")


def test_bundled_sample_matches_hand_count(bundled_output):
    """Hand count over the three bundled Posts.xml files, made independently with
    ElementTree: for every question, the answers' pm_scores; questions with >= 2 answers:
    coffee 82, beer 410, matheducators 311 (803); pairs (min(10, non-tied pairs) per
    question): 129 + 1267 + 1471 = 2867, from 72 + 384 + 289 = 745 questions."""
    out, summary = bundled_output
    assert summary["rows_read"] == 592 + 2354 + 2061
    assert summary["questions"] == 225 + 663 + 397
    assert summary["answers"] == 327 + 1572 + 1507
    assert summary["questions_with_2_answers"] == 803
    assert summary["preference_rows"] == 803
    assert summary["pairs"] == 2867
    assert sum(s["questions"] for s in summary["subsets"].values()) == 745
    assert json.loads((out / "summary.json").read_text())["pairs"] == 2867


def test_bundled_subsets_are_disjoint_and_drawn_by_fraction(bundled_output):
    out, summary = bundled_output
    seen = {}
    for subset in ("finetune", "reward", "rl", "evaluation"):
        keys = {(r["metadata"][1], r["qid"]) for r in read(out, f"pairs/{subset}")}
        for other, other_keys in seen.items():
            assert not keys & other_keys, f"{subset} and {other} share questions"
        seen[subset] = keys
        assert len(keys) == summary["subsets"][subset]["questions"]
    # 803 questions drawn 30/30/30/10 before dropping those without pairs
    counts = [summary["subsets"][s]["questions"] for s in ("finetune", "reward", "rl", "evaluation")]
    assert all(200 <= c <= 241 for c in counts[:3]) and 60 <= counts[3] <= 81


def test_output_loads_with_datasets(bundled_output):
    from datasets import load_dataset

    out, summary = bundled_output
    finetune = load_dataset(str(out), "pairs", split="finetune")
    assert finetune.num_rows == summary["subsets"]["finetune"]["pairs"]
    assert finetune.column_names[:6] == ["qid", "question", "date", "metadata", "response_j", "response_k"]
    assert load_dataset(str(out), data_dir="pairs/rl", split="train").num_rows == summary["subsets"]["rl"]["pairs"]
    assert load_pairs(out, "evaluation").num_rows == summary["subsets"]["evaluation"]["pairs"]
    prefs = load_preferences(out)
    assert prefs.num_rows == 803
    assert set(prefs[0]["answers"][0]) >= {"answer_id", "author", "author_id", "author_profile", "pm_score",
                                                  "selected", "text"}
    card = (out / "README.md").read_text()
    assert "cc-by-sa-3.0" in card and "Stack Exchange, Inc." in card
    with pytest.raises(ValueError, match="unknown subset"):
        load_pairs(out, "train")
