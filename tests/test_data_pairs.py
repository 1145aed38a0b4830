import numpy as np
import pytest

from stackllama.data.pairs import SUBSETS, assign_splits, candidate_pairs, sample_pairs


def test_candidate_pairs_drop_ties_and_put_better_first():
    scores = [2, 0, 2, -1]
    pairs = candidate_pairs(scores)
    assert (0, 2) not in pairs and (2, 0) not in pairs  # tie
    assert len(pairs) == 5
    for better, worse in pairs:
        assert scores[better] > scores[worse]


def test_sample_at_most_ten_without_replacement_and_reproducibly():
    scores = list(range(8))  # 28 candidate pairs
    a = sample_pairs(scores, 10, seed=42, key="site:1")
    assert len(a) == 10 and len(set(a)) == 10
    assert set(a) <= set(candidate_pairs(scores))
    assert a == sample_pairs(scores, 10, seed=42, key="site:1")
    assert a != sample_pairs(scores, 10, seed=43, key="site:1")
    assert a != sample_pairs(scores, 10, seed=42, key="site:2")


def test_few_candidates_are_all_kept():
    assert sample_pairs([1, 0, 0], 10, seed=0, key="k") == [(0, 1), (0, 2)]
    assert sample_pairs([1, 1], 10, seed=0, key="k") == []


def test_split_fractions_seeded_and_every_question_in_one_subset():
    n = 1000
    split = assign_splits(n, (0.3, 0.3, 0.3, 0.1), seed=42)
    assert split.shape == (n,)
    assert np.bincount(split, minlength=4).tolist() == [300, 300, 300, 100]
    np.testing.assert_array_equal(split, assign_splits(n, (0.3, 0.3, 0.3, 0.1), seed=42))
    assert not np.array_equal(split, assign_splits(n, (0.3, 0.3, 0.3, 0.1), seed=7))
    # the split is drawn after a shuffle: the first 300 questions are not all in `finetune`
    assert 0 < (split[:300] == 0).sum() < 300
    # the seeded shuffle: question i goes to the subset of its position in permutation(n)
    perm = np.random.default_rng(42).permutation(n)
    assert split[perm[0]] == SUBSETS.index("finetune") and split[perm[-1]] == SUBSETS.index("evaluation")


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        assign_splits(10, (0.5, 0.5, 0.5, 0.0), seed=0)
    with pytest.raises(ValueError):
        assign_splits(10, (1.2, -0.2, 0.0, 0.0), seed=0)
