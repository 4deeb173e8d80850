"""Tests of the rank statistics under the two NaN policies, against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from onnxeps.stats import NAN_POLICIES, rank_statistics

NAN = float("nan")

# Seven models, two undefined, with a tie among the defined scores.
SCORE = np.array([0.3, NAN, 0.1, 0.7, NAN, 0.5, 0.3])
TRUTH = np.array([70.0, 60.0, 65.0, 90.0, 10.0, 80.0, 50.0])
DEFINED = ~np.isnan(SCORE)


def ranked_case() -> tuple[np.ndarray, np.ndarray]:
    """Return 100 models whose score ranks them by truth, except the two best.

    The two best models (truth 99 and 98) get the two lowest scores. By score, the top
    10 are truth 97..88, so 8 of the truth top 10 (99..90) are found. The top 64 by
    score are truth 97..34, which hold 3 of the truth top 5 (99..95).
    """
    truth = np.arange(100, dtype=np.float64)
    score = truth.copy()
    score[99] = -1.0
    score[98] = -2.0
    return score, truth


def test_policies_listed():
    assert NAN_POLICIES == ("omit", "rank-last")


def test_omit_spearman_matches_scipy():
    result = rank_statistics(SCORE, TRUTH, True, "omit")
    expected = stats.spearmanr(SCORE[DEFINED], TRUTH[DEFINED]).statistic
    assert result["spearman"] == pytest.approx(expected, abs=1e-12)


def test_omit_kendall_matches_scipy():
    result = rank_statistics(SCORE, TRUTH, True, "omit")
    expected = stats.kendalltau(SCORE[DEFINED], TRUTH[DEFINED]).statistic
    assert result["kendall"] == pytest.approx(expected, abs=1e-12)


def test_omit_coverage_counts():
    result = rank_statistics(SCORE, TRUTH, True, "omit")
    assert result["policy"] == "omit"
    assert result["n"] == 5
    assert result["defined"] == 5
    assert result["total"] == 7


def test_rank_last_spearman_matches_scipy():
    # -inf ranks every undefined model below all defined ones, tied with each other.
    last = np.where(DEFINED, SCORE, -np.inf)
    result = rank_statistics(SCORE, TRUTH, True, "rank-last")
    expected = stats.spearmanr(last, TRUTH).statistic
    assert result["spearman"] == pytest.approx(expected, abs=1e-12)


def test_rank_last_kendall_matches_scipy():
    last = np.where(DEFINED, SCORE, -np.inf)
    result = rank_statistics(SCORE, TRUTH, True, "rank-last")
    expected = stats.kendalltau(last, TRUTH).statistic
    assert result["kendall"] == pytest.approx(expected, abs=1e-12)


def test_rank_last_negative_scores():
    # The undefined models must still rank below defined scores that are negative.
    score = np.array([-5.0, NAN, -7.0, -6.0, NAN])
    truth = np.array([5.0, 1.0, 3.0, 4.0, 2.0])
    result = rank_statistics(score, truth, True, "rank-last")
    last = np.where(np.isnan(score), -np.inf, score)
    expected = stats.spearmanr(last, truth).statistic
    assert result["spearman"] == pytest.approx(expected, abs=1e-12)


def test_rank_last_large_scores():
    score = np.array([1e17, 2e17, 3e17, NAN])
    truth = np.array([2.0, 3.0, 4.0, 1.0])
    result = rank_statistics(score, truth, True, "rank-last")
    assert result["spearman"] == pytest.approx(1.0)


def test_rank_last_coverage_counts():
    result = rank_statistics(SCORE, TRUTH, True, "rank-last")
    assert result["policy"] == "rank-last"
    assert result["n"] == 7
    assert result["defined"] == 5
    assert result["total"] == 7


def test_rank_last_undefined_never_top():
    # 20 models: the top 10 % is 2 models. The best-by-truth model is undefined, so
    # under rank-last it cannot be among the 2 highest scores.
    truth = np.arange(20, dtype=np.float64)
    score = truth.copy()
    score[19] = NAN
    result = rank_statistics(score, truth, True, "rank-last")
    # Top 2 by score are truth 18 and 17, and the truth top 2 are 19 and 18.
    assert result["top10_share"] == pytest.approx(0.5)


def test_perfect_ranking():
    truth = np.arange(100, dtype=np.float64)
    result = rank_statistics(truth * 3.0, truth, True, "omit")
    assert result["spearman"] == pytest.approx(1.0)
    assert result["kendall"] == pytest.approx(1.0)
    assert result["top10_share"] == pytest.approx(1.0)
    assert result["top64_in_top5"] == 5


def test_top10_share_hand_case():
    score, truth = ranked_case()
    result = rank_statistics(score, truth, True, "omit")
    assert result["top10_share"] == pytest.approx(0.8)


def test_top64_in_top5_hand_case():
    score, truth = ranked_case()
    result = rank_statistics(score, truth, True, "omit")
    assert result["top64_in_top5"] == 3


def test_top10_correlations_hand_case():
    score, truth = ranked_case()
    result = rank_statistics(score, truth, True, "omit")
    # The truth top 10 % are the last 10 models.
    expected_rho = stats.spearmanr(score[90:], truth[90:]).statistic
    expected_tau = stats.kendalltau(score[90:], truth[90:]).statistic
    assert result["top10_spearman"] == pytest.approx(expected_rho, abs=1e-12)
    assert result["top10_kendall"] == pytest.approx(expected_tau, abs=1e-12)


def test_top_share_rounds_up():
    # 15 models: the top 10 % is ceil(1.5) = 2 models and the top 5 % is 1 model.
    truth = np.arange(15, dtype=np.float64)
    score = truth.copy()
    score[14] = -1.0
    result = rank_statistics(score, truth, True, "omit")
    # Top 2 by score are truth 13 and 12, and the truth top 2 are 14 and 13.
    assert result["top10_share"] == pytest.approx(0.5)
    # All 15 models are in the top 64 by score, so the best model is always found.
    assert result["top64_in_top5"] == 1


def test_loss_flips_top():
    # The same ranking against a loss (lower is better): the best models by loss are
    # the same models, so the top-block counts are equal and the correlations flip sign.
    score, truth = ranked_case()
    loss = 100.0 - truth
    by_accuracy = rank_statistics(score, truth, True, "omit")
    by_loss = rank_statistics(score, loss, False, "omit")
    assert by_loss["top10_share"] == pytest.approx(0.8)
    assert by_loss["top64_in_top5"] == 3
    assert by_loss["spearman"] == pytest.approx(-by_accuracy["spearman"], abs=1e-12)
    assert by_loss["kendall"] == pytest.approx(-by_accuracy["kendall"], abs=1e-12)


def test_loss_top_is_lowest():
    # Ten models, loss 0..9: the top 10 % is the single model with loss 0.
    loss = np.arange(10, dtype=np.float64)
    score_finds_best = -loss
    score_finds_worst = loss.copy()
    found = rank_statistics(score_finds_best, loss, False, "omit")
    missed = rank_statistics(score_finds_worst, loss, False, "omit")
    assert found["top10_share"] == pytest.approx(1.0)
    assert missed["top10_share"] == pytest.approx(0.0)
    assert found["top64_in_top5"] == 1


def test_all_undefined_omit():
    result = rank_statistics(np.full(4, NAN), np.arange(4.0), True, "omit")
    assert result["n"] == 0
    assert result["defined"] == 0
    assert result["total"] == 4
    assert math.isnan(result["spearman"])
    assert math.isnan(result["kendall"])


def test_constant_truth_is_nan():
    result = rank_statistics(np.arange(5.0), np.full(5, 1.0), True, "omit")
    assert math.isnan(result["spearman"])
    assert math.isnan(result["kendall"])


def test_constant_score_is_nan():
    result = rank_statistics(np.full(5, 2.0), np.arange(5.0), True, "omit")
    assert math.isnan(result["spearman"])
    assert math.isnan(result["kendall"])


def test_unknown_policy_raises():
    with pytest.raises(ValueError, match="rank-last"):
        rank_statistics(SCORE, TRUTH, True, "drop")
