"""eval.py against brute force and hand-computed values, ties included."""
import math

import numpy as np
import pytest

import eval as metrics


def brute_auc(labels, scores):
    pos = [s for l, s in zip(labels, scores) if l]
    neg = [s for l, s in zip(labels, scores) if not l]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_auc_equals_all_pairs_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 40)
        scores = rng.integers(0, 6, 40).astype(float)          # many ties
        if 0 < labels.sum() < 40:
            assert metrics.auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)
    assert metrics.auc([1, 0], [0.3, 0.3]) == 0.5
    assert metrics.auc([1, 1, 0], [0.9, 0.1, 0.5]) == 0.5
    assert math.isnan(metrics.auc([1, 1], [0.2, 0.3]))


def test_uauc_by_hand():
    users = [0, 0, 0, 1, 1, 2, 2]
    labels = [1, 0, 0, 1, 0, 1, 1]                             # user 2 has one class: skipped
    scores = [0.9, 0.5, 0.95, 0.1, 0.2, 0.3, 0.4]
    assert metrics.uauc(users, labels, scores) == pytest.approx((0.5 + 0.0) / 2)


def test_ranks_hr_ndcg_by_hand_ties_count_against():
    assert metrics.rank_of_target([0.1, 0.9, 0.5], 1) == 0
    assert metrics.rank_of_target([0.9, 0.5, 0.5, 0.1], 1) == 2       # one higher, one tied: pessimistic
    assert metrics.rank_of_target([0.5] * 20, 7) == 19                # a constant scorer never hits
    ranks = [0, 1, 4, 5]
    assert metrics.hr_at_k(ranks, 1) == 0.25 and metrics.hr_at_k(ranks, 5) == 0.75
    assert metrics.ndcg_at_k(ranks, 5) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 0) / 4)


def test_match_answer_and_generated_hr1():
    cands = ["Heat (1995)", "Toy Story (1995)", "Toy Story 2 (1999)"]
    assert metrics.match_answer("I recommend toy story (1995).", cands) == 1
    assert metrics.match_answer("Heat (1995) or Toy Story (1995)", cands) is None   # two named: invalid
    assert metrics.match_answer("Casablanca", cands) is None
    assert metrics.match_answer("TOY STORY 2 (1999)", cands) == 2
    r = metrics.hr1_generated([1, None, 2, 0], [1, 1, 0, 0])
    assert r == {"valid_ratio": 0.75, "hr1": 0.5, "hr1_valid": pytest.approx(2 / 3), "n": 4}


def test_bootstrap_interval_covers_estimate():
    x = np.random.default_rng(1).integers(0, 2, 400)
    lo, hi = metrics.bootstrap_ci(np.mean, x, n_boot=500)
    assert lo < x.mean() < hi and hi - lo < 0.15
    assert metrics.bootstrap_ci(np.mean, x, n_boot=200, seed=3) == metrics.bootstrap_ci(np.mean, x, n_boot=200, seed=3)


def test_paired_diff_ci_point_pairing_and_clusters():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    a = y + rng.normal(size=200)                 # informative
    b = rng.normal(size=200)                     # noise
    strata = [[np.arange(k, k + 10) for k in range(s, s + 100, 10)] for s in (0, 100)]
    point, lo, hi = metrics.paired_diff_ci(metrics.auc, y, a, b, strata, n_boot=300)
    direct = np.mean([metrics.auc(y[:100], a[:100]) - metrics.auc(y[:100], b[:100]), metrics.auc(y[100:], a[100:]) - metrics.auc(y[100:], b[100:])])
    assert point == pytest.approx(direct) and lo < point < hi and lo > 0
    assert metrics.paired_diff_ci(metrics.auc, y, a, a, strata, n_boot=50) == (0.0, 0.0, 0.0)   # same draw for both
    # swapping the methods mirrors the interval (the same resamples are used)
    p2, lo2, hi2 = metrics.paired_diff_ci(metrics.auc, y, b, a, strata, n_boot=300)
    assert p2 == pytest.approx(-point) and lo2 == pytest.approx(-hi) and hi2 == pytest.approx(-lo)


def test_non_finite_scores_are_an_error_not_a_metric():
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            metrics.auc([1, 0, 1, 0], [0.1, bad, 0.3, 0.2])
        with pytest.raises(ValueError, match="NaN or infinite"):
            metrics.rank_of_target([0.1, 0.2, bad], 2)
        with pytest.raises(ValueError, match="NaN or infinite"):
            metrics.rank_of_target([bad, 0.2, 0.1], 2)
