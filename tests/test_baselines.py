"""baselines.py on synthetic data with a known signal: MF must find it, Pop must not beat it."""
import numpy as np

import baselines
import data


def item_signal_data(n_users=60, n_items=40, per_user=20, seed=0):
    """Odd items are liked (rating 5), even items disliked (rating 1), plus 10% noise."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    ratings = np.where(items % 2 == 1, 5.0, 1.0)
    flip = rng.random(len(items)) < 0.1
    ratings[flip] = 6.0 - ratings[flip]
    ts = rng.permutation(len(items))
    order = np.argsort(ts)
    return data.Data(users[order], items[order], ratings[order].astype(np.float32), ts[order],
                  [str(u) for u in range(n_users)], [str(i) for i in range(n_items)], [f"T{i}" for i in range(n_items)])


def test_binary_baselines_find_item_signal():
    rows = baselines.run_binary(item_signal_data(), log=lambda s: None)
    assert {r["period"] for r in rows} == {"D5", "D6", "D7", "D8", "D9"}
    mean = {m: np.mean([r["auc"] for r in rows if r["method"] == m]) for m in ("Pop", "ItemLikeRate", "MF")}
    assert mean["ItemLikeRate"] > 0.8 and mean["MF"] > 0.8          # 10% label noise caps AUC near 0.9
    assert abs(mean["Pop"] - 0.5) < 0.15                              # popularity carries no signal here
    assert all(r["n"] == 120 for r in rows)


def test_sequential_baselines_run_on_fixed_rows():
    d = item_signal_data(n_users=30, n_items=60, per_user=15)
    rows = baselines.run_sequential(d, log=lambda s: None)
    assert [r["method"] for r in rows] == ["Pop", "SASRec"]
    for r in rows:
        assert r["n"] == 30 and 0 <= r["hr1"] <= r["hr5"] <= 1 and r["hr1_ci95"][0] <= r["hr1"] <= r["hr1_ci95"][1]


def test_causal_counts_see_only_strictly_earlier_interactions():
    d = item_signal_data(n_users=8, n_items=6, per_user=5, seed=3)
    d.ts[:] = np.repeat(np.arange(len(d) // 2), 2)               # pairs share a timestamp
    y = (d.ratings >= 4).astype(np.float64)
    c = baselines.causal_counts(d, y)
    for j in range(len(d)):
        before = d.ts < d.ts[j]
        for key, ix in (("user", d.users), ("item", d.items)):
            same = before & (ix == ix[j])
            assert c[f"{key}_n"][j] == same.sum() and c[f"{key}_likes"][j] == y[same].sum()


def test_logreg_is_at_the_optimum_and_finds_the_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3)) * [1.0, 5.0, 0.1] + [0.0, 3.0, -1.0]
    y = (rng.random(4000) < 1 / (1 + np.exp(-(2 * x[:, 0] - 0.3 * x[:, 1] + 1)))).astype(np.float64)
    w = baselines.fit_logreg(x, y, l2=0.0)
    p = 1 / (1 + np.exp(-(x @ w[:-1] + w[-1])))
    assert np.abs(np.c_[x, np.ones(len(x))].T @ (p - y) / len(y)).max() < 1e-8   # gradient of the log loss
    assert abs(w[0] - 2) < 0.2 and abs(w[1] + 0.3) < 0.05 and abs(w[-1] - 1) < 0.4


def test_realtime_scores_are_causal_and_logreg_fits_training_only():
    d = item_signal_data()
    n = len(d)
    zero = np.zeros(n)
    train = data.periods(n, 10) < 5
    s = baselines.realtime_scores(d, 4.0, zero, zero, train)
    y = d.ratings >= 4
    test = ~train
    from eval import auc
    assert auc(y[test], s["ItemLikeRate (t)"][test]) > 0.8 and auc(y[test], s["LogReg"][test]) > 0.8
    d2 = item_signal_data()
    d2.ratings[-1] = 6.0 - d2.ratings[-1]                            # the future must not change the past
    s2 = baselines.realtime_scores(d2, 4.0, zero, zero, train)
    for k in s:
        assert np.array_equal(s[k][:-1][d.ts[:-1] < d.ts[-1]], s2[k][:-1][d.ts[:-1] < d.ts[-1]])
