"""Metrics for both methods.

  auc            P(score of a random positive > score of a random negative), ties count half;
                 computed from average ranks (equal to the Mann-Whitney U statistic / (P N))
  uauc           mean of per-user AUCs over users whose rows hold both classes
  rank_of_target 0-based rank of the true item among candidate scores; ties are counted
                 against the target (pessimistic), so a constant scorer gets no hits
  hr_at_k, ndcg_at_k   from those ranks: hit if rank < k; NDCG = 1 / log2(rank + 2) if rank < k
  match_answer   which candidate a generated answer names: case-insensitive substring match,
                 valid when exactly one candidate is named
  hr1_generated  hits / all rows (LLaRA's published definition) and hits / valid rows
  Non-finite scores are an error (check_finite), never a metric.
  bootstrap_ci   percentile interval of a statistic over rows resampled with replacement
  paired_diff_ci mean over strata (test periods) of stat(method A) - stat(method B) on the same
                 rows, with a percentile interval from resampling clusters (users) within each
                 stratum, the same draw for both methods (a paired bootstrap)
"""
import numpy as np


def _avg_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank: a group of c equal values that ends at
    rank r (counting up) has ranks r - c + 1 .. r, average r - (c - 1) / 2."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2)[inverse].astype(np.float64)


def check_finite(scores: np.ndarray):
    """Non-finite scores have no order: a metric on them would look finite and mean nothing."""
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"{bad} of {scores.size} scores are NaN or infinite: the model's outputs are not finite "
                         "(check its weights and config)")


def auc(labels, scores) -> float:
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    check_finite(scores)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _avg_ranks(scores)
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def uauc(users, labels, scores) -> float:
    users, labels, scores = np.asarray(users), np.asarray(labels), np.asarray(scores)
    vals = []
    for u in np.unique(users):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            vals.append(auc(labels[m], scores[m]))
    return float(np.mean(vals)) if vals else float("nan")


def rank_of_target(scores, target_index: int) -> int:
    s = np.asarray(scores, dtype=np.float64)
    check_finite(s)
    others = np.delete(s, target_index)
    return int((others >= s[target_index]).sum())


def hr_at_k(ranks, k: int) -> float:
    return float((np.asarray(ranks) < k).mean())


def ndcg_at_k(ranks, k: int) -> float:
    r = np.asarray(ranks, dtype=np.float64)
    return float(np.where(r < k, 1.0 / np.log2(r + 2), 0.0).mean())


def match_answer(text: str, candidates: list[str]) -> int | None:
    """Index of the one candidate named in `text`, or None (no candidate or several)."""
    t = text.lower()
    named = [i for i, c in enumerate(candidates) if c.lower() in t]
    return named[0] if len(named) == 1 else None


def hr1_generated(answers: list, targets: list) -> dict:
    """answers: matched candidate index or None per row; targets: true index per row."""
    n = len(answers)
    valid = sum(a is not None for a in answers)
    hits = sum(a is not None and a == t for a, t in zip(answers, targets))
    return {"valid_ratio": valid / n if n else float("nan"), "hr1": hits / n if n else float("nan"),
            "hr1_valid": hits / valid if valid else float("nan"), "n": n}


def bootstrap_ci(stat, *arrays, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """(lo, hi) percentile interval of stat(*arrays) over rows resampled with replacement."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        ix = rng.integers(0, n, n)
        v = stat(*(a[ix] for a in arrays))
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def paired_diff_ci(stat, y, a, b, strata: list, n_boot: int = 1000, alpha: float = 0.05,
                   seed: int = 0) -> tuple[float, float, float]:
    """(point, lo, hi) of the mean over strata of stat(y, a) - stat(y, b). strata: one list per
    stratum of index arrays into y / a / b, one array per cluster; a bootstrap draw resamples
    each stratum's clusters with replacement. Draws where a stat is undefined (NaN) are skipped."""
    y, a, b = np.asarray(y), np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)

    def diff(groups):
        return float(np.mean([stat(y[ix], a[ix]) - stat(y[ix], b[ix]) for ix in groups]))

    point = diff([np.concatenate(clusters) for clusters in strata])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        v = diff([np.concatenate([cl[k] for k in rng.integers(0, len(cl), len(cl))]) for cl in strata])
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return point, float("nan"), float("nan")
    return point, float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))
