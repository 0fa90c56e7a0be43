"""baselines.py on synthetic data with a known signal: MF must find it, Pop must not beat it."""
import numpy as np

import baselines as B
import data as D


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
    return D.Data(users[order], items[order], ratings[order].astype(np.float32), ts[order],
                  [str(u) for u in range(n_users)], [str(i) for i in range(n_items)], [f"T{i}" for i in range(n_items)])


def test_binary_baselines_find_item_signal():
    rows = B.run_binary(item_signal_data(), log=lambda s: None)
    assert {r["period"] for r in rows} == {"D5", "D6", "D7", "D8", "D9"}
    mean = {m: np.mean([r["auc"] for r in rows if r["method"] == m]) for m in ("Pop", "ItemLikeRate", "MF")}
    assert mean["ItemLikeRate"] > 0.8 and mean["MF"] > 0.8          # 10% label noise caps AUC near 0.9
    assert abs(mean["Pop"] - 0.5) < 0.15                              # popularity carries no signal here
    assert all(r["n"] == 120 for r in rows)


def test_sequential_baselines_run_on_fixed_rows():
    d = item_signal_data(n_users=30, n_items=60, per_user=15)
    rows = B.run_sequential(d, log=lambda s: None)
    assert [r["method"] for r in rows] == ["Pop", "SASRec"]
    for r in rows:
        assert r["n"] == 30 and 0 <= r["hr1"] <= r["hr5"] <= 1 and r["hr1_ci95"][0] <= r["hr1"] <= r["hr1_ci95"][1]
