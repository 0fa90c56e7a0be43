"""Classical baselines on exactly the rows the LLM methods use.

    python baselines.py --task binary      [--dataset DIR] [--out runs/baselines]
    python baselines.py --task sequential  [--dataset DIR] [--out runs/baselines]

binary (RecICL's task): trained on periods D0..D4 (all interactions, labels rating >= threshold),
frozen, AUC and UAUC on each of D5..D9.
  Pop            score = number of training interactions of the item
  ItemLikeRate   score = the item's smoothed like rate in training ((likes + 1) / (n + 2))
  MF             user/item embeddings (dim 32) + biases, trained with binary cross-entropy,
                 Adam, early stopping on a random 5% of the training interactions held out
binary, real time (recicl.py eval's controls): each score of an interaction at time t uses only
interactions strictly before t, the information RecICL's prompt is built from.
  UserLikeRate         the user's smoothed like rate over all earlier answers
  ItemLikeRate (t)     the item's smoothed like rate over all earlier interactions
  LogReg               logistic regression on the log-odds of both rates and of the like rate of
                       the user's K latest answers, and the log counts behind them, fitted on
                       the training periods' interactions
sequential (AdaptRec's task): leave-one-out rows from data.sequential_rows with their fixed 20
candidates; HR@1, HR@5, NDCG@5 on the test rows (ties against the target).
  Pop            candidates ranked by training popularity
  SASRec         Kang & McAuley 2018 (arXiv 1808.09781): item + position embeddings, 2 causal
                 self-attention blocks (dim 64, 1 head, dropout 0.2), next item from the last
                 position by dot product. Trained with cross-entropy over all items (the paper
                 uses BCE with one sampled negative), early stopping on the validation rows.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as metrics


# ----------------------------------------------------------------------------- binary task

def binary_split(d: data.Data, n_periods: int, train_periods: int, threshold: float):
    per = data.periods(len(d), n_periods)
    y = (d.ratings >= threshold).astype(np.int64)
    return per, y, per < train_periods


class MF(nn.Module):
    def __init__(self, n_users, n_items, dim=32):
        super().__init__()
        self.u, self.i = nn.Embedding(n_users, dim), nn.Embedding(n_items, dim)
        self.ub, self.ib = nn.Embedding(n_users, 1), nn.Embedding(n_items, 1)
        self.b = nn.Parameter(torch.zeros(1))
        for e in (self.u, self.i):
            nn.init.normal_(e.weight, std=0.01)
        nn.init.zeros_(self.ub.weight), nn.init.zeros_(self.ib.weight)

    def forward(self, u, i):
        return (self.u(u) * self.i(i)).sum(-1) + self.ub(u)[:, 0] + self.ib(i)[:, 0] + self.b


class EarlyStop:
    """Keeps the best state by a validation metric (higher is better); says when to stop."""

    def __init__(self, patience: int):
        self.patience, self.best, self.state, self.bad = patience, -float("inf"), None, 0

    def stop(self, metric: float, model: nn.Module) -> bool:
        if metric > self.best:
            self.best, self.state, self.bad = metric, {k: t.clone() for k, t in model.state_dict().items()}, 0
        else:
            self.bad += 1
        return self.bad >= self.patience


def train_mf(d, y, train_mask, seed=0, epochs=60, patience=4, log=print):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tr = np.flatnonzero(train_mask)
    val = rng.choice(tr, size=max(1, len(tr) // 20), replace=False)
    tr = np.setdiff1d(tr, val)
    m = MF(len(d.user_ids), len(d.item_ids))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-5)
    U, I, Y = torch.from_numpy(d.users), torch.from_numpy(d.items), torch.from_numpy(y).float()
    es = EarlyStop(patience)
    for ep in range(epochs):
        perm = torch.from_numpy(rng.permutation(tr))
        for s in range(0, len(perm), 1024):
            b = perm[s:s + 1024]
            loss = F.binary_cross_entropy_with_logits(m(U[b], I[b]), Y[b])
            opt.zero_grad(), loss.backward(), opt.step()
        with torch.no_grad():
            v = metrics.auc(y[val], m(U[val], I[val]).numpy())
        if es.stop(v, m):
            break
    log(f"[baselines] MF: {ep + 1} epochs, best held-out AUC {es.best:.4f}")
    m.load_state_dict(es.state)
    return m


def binary_scores(d: data.Data, n_periods=10, train_periods=5, threshold=4.0, seed=0, log=print) -> dict:
    """{method: score of every interaction}, each model fitted on periods < train_periods only."""
    per, y, train = binary_split(d, n_periods, train_periods, threshold)
    n_items = len(d.item_ids)
    count = np.bincount(d.items[train], minlength=n_items).astype(np.float64)
    likes = np.bincount(d.items[train], weights=y[train], minlength=n_items)
    mf = train_mf(d, y, train, seed=seed, log=log)
    with torch.no_grad():
        mf_scores = mf(torch.from_numpy(d.users), torch.from_numpy(d.items)).numpy()
    return {"Pop": count[d.items], "ItemLikeRate": ((likes + 1) / (count + 2))[d.items], "MF": mf_scores}


def causal_counts(d: data.Data, y: np.ndarray) -> dict:
    """For each interaction (d in time order): likes and count of its user and of its item over
    the interactions strictly before its timestamp (interactions at the same time do not see
    each other)."""
    n = len(d)
    acc = {"user": (np.zeros(len(d.user_ids)), np.zeros(len(d.user_ids)), d.users),
           "item": (np.zeros(len(d.item_ids)), np.zeros(len(d.item_ids)), d.items)}
    out = {f"{k}_{v}": np.zeros(n) for k in acc for v in ("likes", "n")}
    starts = np.flatnonzero(np.r_[True, d.ts[1:] != d.ts[:-1]])         # first row of each timestamp
    for j, k in zip(starts, np.r_[starts[1:], n]):
        for key, (likes, count, ix) in acc.items():
            g = ix[j:k]
            out[f"{key}_likes"][j:k], out[f"{key}_n"][j:k] = likes[g], count[g]
            np.add.at(likes, g, y[j:k])
            np.add.at(count, g, 1)
    return out


def log_odds(likes, n, prior: float = 1.0):
    """log of (likes + prior) / (n - likes + prior): the log-odds of a smoothed rate."""
    return np.log((likes + prior) / (n - likes + prior))


def fit_logreg(x: np.ndarray, y: np.ndarray, l2: float = 1e-4, iters: int = 30) -> np.ndarray:
    """Weights (features + 1 for the bias, last) of L2-regularised logistic regression by Newton's
    method on standardised features; returns weights for the raw features."""
    mu, sd = x.mean(0), x.std(0) + 1e-12
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-z @ w))
        grad = z.T @ (p - y) / len(y) + l2 * np.r_[w[:-1], 0]
        hess = (z * (p * (1 - p))[:, None]).T @ z / len(y) + l2 * np.diag(np.r_[np.ones(len(w) - 1), 0])
        w = w - np.linalg.solve(hess, grad)
    return np.r_[w[:-1] / sd, w[-1] - (w[:-1] * mu / sd).sum()]


def realtime_scores(d: data.Data, threshold: float, demo_likes: np.ndarray, demo_n: np.ndarray,
                    train: np.ndarray) -> dict:
    """{control: score of every interaction} from what was known strictly before it. demo_likes /
    demo_n: likes among and number of the user's K latest earlier answers (RecICL's
    demonstrations); train: mask of the interactions the logistic regression is fitted on."""
    y = (d.ratings >= threshold).astype(np.float64)
    c = causal_counts(d, y)
    user, item = log_odds(c["user_likes"], c["user_n"]), log_odds(c["item_likes"], c["item_n"])
    x = np.c_[user, item, log_odds(demo_likes, demo_n, 0.5), np.log1p(c["user_n"]), np.log1p(c["item_n"])]
    w = fit_logreg(x[train], y[train])
    return {"UserLikeRate": user, "ItemLikeRate (t)": item, "LogReg": x @ w[:-1] + w[-1]}


def run_binary(d: data.Data, n_periods=10, train_periods=5, threshold=4.0, seed=0, log=print) -> list[dict]:
    per, y, _ = binary_split(d, n_periods, train_periods, threshold)
    rows = []
    for name, s in binary_scores(d, n_periods, train_periods, threshold, seed, log).items():
        for p in range(train_periods, n_periods):
            m = per == p
            rows.append({"method": name, "period": f"D{p}", "auc": round(metrics.auc(y[m], s[m]), 4),
                         "uauc": round(metrics.uauc(d.users[m], y[m], s[m]), 4), "n": int(m.sum())})
    return rows


# ----------------------------------------------------------------------------- sequential task

class SASRec(nn.Module):
    def __init__(self, n_items, max_history=10, dim=64, blocks=2, heads=1, dropout=0.2):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)      # index 0 = padding, items shifted by 1
        self.pos = nn.Embedding(max_history, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim, dropout, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm, self.drop, self.max_history = nn.LayerNorm(dim), nn.Dropout(dropout), max_history

    def forward(self, hist):
        """hist: (B, L) item index + 1, left-padded with 0 -> (B, dim) state after the last item."""
        L = hist.shape[1]
        x = self.item(hist) * self.item.embedding_dim ** 0.5 + self.pos(torch.arange(L))[None]
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        h = self.enc(self.drop(x), mask=causal, src_key_padding_mask=hist == 0)
        return self.norm(h[:, -1])

    def scores(self, hist):
        return self(hist) @ self.item.weight[1:].T                       # (B, n_items)


def pad_hist(rows, max_history):
    out = np.zeros((len(rows), max_history), dtype=np.int64)
    for k, r in enumerate(rows):
        h = r.history[-max_history:]
        out[k, max_history - len(h):] = np.array(h) + 1
    return torch.from_numpy(out)


def candidate_ranks(scores: np.ndarray, rows) -> np.ndarray:
    """scores (n_rows, n_items) -> rank of each row's target among its candidates."""
    return np.array([metrics.rank_of_target(scores[k, r.candidates], r.candidates.index(r.target)) for k, r in enumerate(rows)])


def seq_metrics(ranks) -> dict:
    return {"hr1": round(metrics.hr_at_k(ranks, 1), 4), "hr5": round(metrics.hr_at_k(ranks, 5), 4),
            "ndcg5": round(metrics.ndcg_at_k(ranks, 5), 4), "n": len(ranks),
            "hr1_ci95": [round(x, 4) for x in metrics.bootstrap_ci(lambda r: metrics.hr_at_k(r, 1), ranks)]}


def train_sasrec(n_items, rows, seed=0, epochs=30, patience=3, log=print):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    m = SASRec(n_items)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    H, T = pad_hist(rows["train"], m.max_history), torch.tensor([r.target for r in rows["train"]])
    Hv = pad_hist(rows["valid"], m.max_history)
    es = EarlyStop(patience)
    for ep in range(epochs):
        m.train()
        perm = torch.from_numpy(rng.permutation(len(T)))
        for s in range(0, len(perm), 256):
            b = perm[s:s + 256]
            loss = F.cross_entropy(m.scores(H[b]), T[b])
            opt.zero_grad(), loss.backward(), opt.step()
        m.eval()
        with torch.no_grad():
            v = metrics.hr_at_k(candidate_ranks(m.scores(Hv).numpy(), rows["valid"]), 1)
        log(f"[baselines] SASRec epoch {ep + 1}: loss {loss.item():.3f}, valid HR@1 {v:.4f}")
        if es.stop(v, m):
            break
    m.load_state_dict(es.state)
    return m.eval()


def run_sequential(d: data.Data, seed=0, log=print, max_epochs=30) -> list[dict]:
    rows = data.sequential_rows(d, seed=seed)
    n_items = len(d.item_ids)
    pop = np.bincount([r.target for r in rows["train"]], minlength=n_items).astype(np.float64)
    test = rows["test"]
    out = [{"method": "Pop", **seq_metrics(candidate_ranks(np.tile(pop, (len(test), 1)), test))}]
    m = train_sasrec(n_items, rows, seed=seed, epochs=max_epochs, log=log)
    with torch.no_grad():
        out.append({"method": "SASRec", **seq_metrics(candidate_ranks(m.scores(pad_hist(test, m.max_history)).numpy(), test))})
    return out


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="Classical baselines on the rows of the LLM methods; prints a table "
                                "and writes OUT/baselines_TASK.json.")
    p.add_argument("--task", choices=["binary", "sequential"], required=True)
    data.add_args(p)
    p.add_argument("--out", default="runs/baselines")
    p.add_argument("--periods", type=int, default=10)
    p.add_argument("--train-periods", type=int, default=5)
    p.add_argument("--threshold", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=30, help="SASRec epochs at most (early stopping on valid HR@1, patience 3)")
    a = p.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    try:
        d = data.load_from_args(a)
        if a.task == "binary":
            d, a.threshold = data.binary_view(d, a.threshold, 1, a.seed)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    if a.task == "binary":
        rows = run_binary(d, a.periods, a.train_periods, a.threshold, a.seed, log)
        print(f"{'method':<14}" + "".join(f"{r['period']:>8}" for r in rows if r["method"] == "Pop") + "   (AUC)")
        for name in dict.fromkeys(r["method"] for r in rows):
            print(f"{name:<14}" + "".join(f"{r['auc']:>8.4f}" for r in rows if r["method"] == name))
    else:
        rows = run_sequential(d, a.seed, log, a.max_epochs)
        print(f"{'method':<10}{'HR@1':>8}{'HR@5':>8}{'NDCG@5':>8}{'n':>6}  HR@1 95% CI")
        for r in rows:
            print(f"{r['method']:<10}{r['hr1']:>8.4f}{r['hr5']:>8.4f}{r['ndcg5']:>8.4f}{r['n']:>6}  {r['hr1_ci95']}")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"baselines_{a.task}.json")
    with open(path, "w") as f:
        json.dump({"config": vars(a), "elapsed_s": round(time.time() - t0, 1), "rows": rows}, f, indent=2)
    log(f"[baselines] wrote {path} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
