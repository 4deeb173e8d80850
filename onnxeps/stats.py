"""Rank statistics of scores against ground truth, under the two NaN policies.

``omit`` drops models whose score is undefined; ``rank-last`` keeps them, tied below every
defined score. "Top" always means best by the ground truth: highest accuracy, or lowest
loss when ``higher_is_better`` is False.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NAN_POLICIES", "rank_statistics"]

NAN_POLICIES = ("omit", "rank-last")
TOP_SHARE = 0.10
TOP_HITS_SHARE = 0.05
TOP_HITS_COUNT = 64


def _correlations(score: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    if score.size < 2 or np.all(score == score[0]) or np.all(truth == truth[0]):
        return float("nan"), float("nan")
    # Imported here because scipy takes about 0.5 s to import, which every scoring
    # worker that imports the bench module would otherwise pay.
    from scipy import stats

    rho = stats.spearmanr(score, truth).statistic
    tau = stats.kendalltau(score, truth).statistic
    return float(rho), float(tau)


def _best_first(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Indices from best to worst (stable, so ties keep input order)."""
    keyed = -values if higher_is_better else values
    return np.argsort(keyed, kind="stable")


def _top_block(score, truth, higher_is_better: bool) -> dict:
    n = truth.size
    top_n = max(1, math.ceil(TOP_SHARE * n))
    by_truth = _best_first(truth, higher_is_better)
    top_truth = set(by_truth[:top_n].tolist())
    in_top = np.zeros(n, dtype=bool)
    in_top[list(top_truth)] = True
    rho, tau = _correlations(score[in_top], truth[in_top])
    # Higher score always predicts better truth, so rank scores from the highest.
    by_score = _best_first(score, True)
    share = len(top_truth & set(by_score[:top_n].tolist())) / top_n
    hits_n = max(1, math.ceil(TOP_HITS_SHARE * n))
    top_hits = set(by_truth[:hits_n].tolist())
    hits = len(top_hits & set(by_score[:TOP_HITS_COUNT].tolist()))
    return {
        "top10_spearman": rho,
        "top10_kendall": tau,
        "top10_share": share,
        "top64_in_top5": hits,
    }


def rank_statistics(
    score: np.ndarray, truth: np.ndarray, higher_is_better: bool, policy: str
) -> dict:
    """Spearman and Kendall over all models and the top 10 %, and top-hit counts.

    Undefined scores are NaN in ``score``. Returns the statistics with the models used
    (``n``) and the coverage (defined / total).
    """
    score = np.asarray(score, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    defined = ~np.isnan(score)
    if policy == "omit":
        score, truth = score[defined], truth[defined]
    elif policy == "rank-last":
        # -inf ranks below every defined score, so the undefined models tie for last.
        score = np.where(defined, score, -np.inf)
    else:
        raise ValueError(f"unknown NaN policy {policy!r}; valid: {', '.join(NAN_POLICIES)}")
    result = {"policy": policy, "n": int(truth.size), "defined": int(defined.sum()),
              "total": int(defined.size)}  # fmt: skip
    if truth.size == 0:
        return result | {"spearman": float("nan"), "kendall": float("nan")}
    rho, tau = _correlations(score, truth)
    return result | {"spearman": rho, "kendall": tau} | _top_block(score, truth, higher_is_better)
