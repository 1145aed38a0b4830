import pytest

from stackllama.data.scoring import pm_score


@pytest.mark.parametrize(
    "score, expected",
    [(0, 0), (1, 1), (2, 2), (4, 2), (5, 3), (10, 3), (11, 4), (21, 4), (22, 5), (-1, -1), (-7, -1)],
)
def test_pm_score_is_rounded_log2_of_one_plus_score(score, expected):
    assert pm_score(score, accepted=False) == expected


def test_accepted_answer_gets_one_more():
    assert pm_score(0, accepted=True) == 1
    assert pm_score(5, accepted=True) == 4


def test_negative_accepted_answer_stays_minus_one_unless_flag():
    assert pm_score(-3, accepted=True) == -1
    assert pm_score(-3, accepted=True, accepted_bonus_for_negative=True) == 0
    assert pm_score(-3, accepted=False, accepted_bonus_for_negative=True) == -1
