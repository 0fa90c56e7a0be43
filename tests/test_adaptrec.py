"""adaptrec.py: retrieval against brute force, no self and no future in what is retrieved,
shared-prefix ranking against a plain full-sequence forward, the answer-only loss, selection
rules, and train / eval / recommend end to end on a tiny random model and tiny data."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adaptrec as A
import data as D
import model as M
from test_recicl import write_tiny_movielens


@pytest.fixture
def dirs(tmp_path):
    from conftest import make_tiny_dir
    make_tiny_dir(tmp_path / "tiny", tie=True, max_position_embeddings=1400)
    ds = write_tiny_movielens(tmp_path / "ml", n_users=14, n_items=60, per_user=18)
    return str(tmp_path / "tiny"), ds, str(tmp_path / "out")


def brute_force(q, k, n, qu, ku, qt, kt):
    s = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T
    out = []
    for a in range(len(q)):
        allowed = [j for j in range(len(k)) if ku[j] != qu[a] and kt[j] < qt[a]]
        out.append(sorted(allowed, key=lambda j: -float(s[a, j]))[:n])
    return out, s


@pytest.mark.parametrize("q_chunk,k_chunk", [(5, 7), (1024, 65536), (1, 1)])
def test_cosine_top_n_equals_brute_force(q_chunk, k_chunk):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(23, 8, generator=g), torch.randn(41, 8, generator=g)
    qu, ku = torch.randint(0, 9, (23,), generator=g), torch.randint(0, 9, (41,), generator=g)
    qt, kt = torch.randint(0, 50, (23,), generator=g), torch.randint(0, 50, (41,), generator=g)
    idx, sim = A.cosine_top_n(q, k, 6, qu, ku, qt, kt, q_chunk=q_chunk, k_chunk=k_chunk)
    ref, s = brute_force(q, k, 6, qu, ku, qt, kt)
    for a in range(len(q)):
        got = [int(j) for j in idx[a] if j >= 0]
        assert got == ref[a]
        assert all(ku[j] != qu[a] and kt[j] < qt[a] for j in got)          # no self, nothing at or after t
        assert torch.allclose(sim[a, :len(got)], s[a, got], atol=1e-6)
        assert (idx[a, len(got):] == -1).all()                               # fewer allowed than n: padded
    assert any(len(r) < 6 for r in ref)                                      # the padding case occurs


def test_pool_holds_no_valid_or_test_item(dirs):
    _, ds, _ = dirs
    d = D.load(ds, verbose=False)
    rows = D.sequential_rows(d)
    pool = A.build_pool(d)
    held_out = {(r.user, r.target, r.ts) for r in rows["valid"] + rows["test"]}
    ts_of = {(int(u), int(i)): int(t) for u, i, t in zip(d.users, d.items, d.ts)}
    for u, items, end in zip(pool.users, pool.items, pool.end_ts):
        assert all((int(u), i, ts_of[(int(u), i)]) not in held_out for i in items)
        assert max(ts_of[(int(u), i)] for i in items) == end


def test_retrieval_no_self_no_future_and_embedding_padding(dirs):
    model_dir, ds, out = dirs
    d = D.load(ds, verbose=False)
    m, tok = M.load(model_dir)
    pool = A.build_pool(d)
    ret = A.Retriever(d, pool, m, tok, A.VectorCache(os.path.join(out, "v.pt"), "k"), n=4)
    rows = D.sequential_rows(d)
    all_rows = rows["train"][::7] + rows["test"]
    got = ret.retrieve(all_rows)
    ts_of = {(int(u), int(i)): int(t) for u, i, t in zip(d.users, d.items, d.ts)}
    assert any(got.values())
    for r in all_rows:
        for p, _ in got[A.row_key(r)]:
            assert pool.users[p] != r.user
            assert all(ts_of[(int(pool.users[p]), i)] < r.ts for i in pool.items[p])
    # mean pooling ignores padding: a batch gives what each text gives alone
    texts = [A.seq_text(d, it[-10:]) for it in pool.items[:3]]
    batch = A.embed_texts(m, tok, texts, batch_size=3)
    for k, t in enumerate(texts):
        with torch.no_grad():
            h = m(torch.tensor([tok.encode(t)]))[0]
        assert torch.allclose(batch[k], h.mean(0), atol=1e-5)
    # the cache returns the same vectors from disk for the same key, and nothing for another key
    again = A.VectorCache(os.path.join(out, "v.pt"), "k")
    assert torch.equal(again.vecs[texts[0]], ret.cache.vecs[texts[0]])
    assert A.VectorCache(os.path.join(out, "v.pt"), "other").vecs == {}


def full_sequence_logprob(m, prompt, cont):
    """log p(cont | prompt) from one plain forward over prompt + cont (no cache, no prefix)."""
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        lp = torch.log_softmax(m.head(m(ids))[0], -1)
    return sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))


def test_shared_prefix_ranking_equals_separate_scoring(dirs):
    model_dir, _, _ = dirs
    m, tok = M.load(model_dir)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (17, 30, 9)]
    conts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (1, 4, 6, 3)]
    with torch.inference_mode():
        cache, logits = M.prefill_batch(m, prompts, extra=8)
        for b, p in enumerate(prompts):
            got = M.logprobs_after(m, cache.row(b), logits[b], conts, batch_size=3)
            ref = [full_sequence_logprob(m, p, c) for c in conts]
            assert np.allclose(got.numpy(), ref, atol=1e-4)
        # and the same cache still decodes what generate() gives
        new = M.decode(m, cache, logits, 6, eos_ids=[])
    assert new == M.generate(m, prompts, max_new_tokens=6, eos_ids=[])


def test_answer_only_loss_against_cross_entropy(dirs):
    model_dir, _, _ = dirs
    m, _ = M.load(model_dir)
    exs = [A.Example(None, [], list(range(10, 30)), 15), A.Example(None, [], list(range(40, 52)), 9)]
    loss, n = A.loss_fn(m, exs)
    terms = []
    with torch.no_grad():
        for e in exs:
            logits = m.head(m(torch.tensor([e.ids])))[0]
            for t in range(e.n_prompt, len(e.ids)):          # each answer token from what precedes it
                terms.append(F.cross_entropy(logits[t - 1][None], torch.tensor([e.ids[t]])))
    assert abs(float(loss) - float(torch.stack(terms).mean())) < 1e-5
    assert n == 19 + 11


def test_selection_rules():
    pool = A.Pool(np.array([0, 1, 2, 3, 4]), [[1, 2, 3, 4]] * 5, np.array([5, 6, 7, 50, 8]))
    sel = A.Selector.__new__(A.Selector)
    sel.pool = pool
    r = D.SeqRow(user=0, history=[1, 2, 3], target=9, ts=10, split="test", candidates=[])
    retrieved = {A.row_key(r): [(2, 0.9), (1, 0.8), (4, 0.7)]}
    sel.scores = {A.row_key(r): {"pool": [2, 1, 4], "rating": [3.0, 7.0, 3.0]}}
    assert sel.select(r, retrieved, 2, "embed") == [2, 1]
    assert sel.select(r, retrieved, 3, "llm") == [1, 2, 4]                   # ties keep stage-1 order
    assert sel.select(r, retrieved, 0, "llm") == []
    rand = sel.select(r, retrieved, 5, "random", seed=3)
    assert sorted(rand) == [1, 2, 4]                                          # only other users, ended before t
    assert rand == sel.select(r, retrieved, 5, "random", seed=3)
    dis = sel.disagreement([r], retrieved, 2)
    assert dis["top_1_differs"] == 1.0 and dis["mean_overlap"] == 2.0 and dis["top_m_set_differs"] == 0.0


def test_demo_overlap_counts_shared_items_and_target():
    pool = A.Pool(np.array([5, 6, 7]), [[1, 2, 9], [2, 3, 4], [7, 8, 1]], np.array([1, 2, 3]))
    r1 = D.SeqRow(user=0, history=[1, 2, 3], target=9, ts=10, split="test", candidates=[])
    r2 = D.SeqRow(user=1, history=[4, 5], target=6, ts=10, split="test", candidates=[])
    demos = {A.row_key(r1): [0, 1], A.row_key(r2): [2]}
    # r1: items seen {1, 2, 9, 3, 4} hold 3 of its history and its target; r2: {7, 8, 1} hold none
    assert A.demo_overlap(pool, [r1, r2], demos) == {"demo_history_overlap": 1.5, "demo_has_target": 0.5}
    assert A.demo_overlap(pool, [r1], {A.row_key(r1): []}) == {"demo_history_overlap": 0.0, "demo_has_target": 0.0}


def test_corrupt_caches_are_named(dirs, tmp_path):
    _, tok = M.load(dirs[0])
    vec, judged = tmp_path / "vectors.pt", tmp_path / "judge.json"
    vec.write_bytes(b"not a torch file")
    judged.write_text("{ truncated")
    with pytest.raises(ValueError, match="vectors.pt: unreadable vector cache"):
        A.VectorCache(str(vec), "key")
    with pytest.raises(ValueError, match="judge.json: unreadable judge cache"):
        A.Selector(None, None, None, tok, str(judged), "key")


def test_parse_configs():
    assert A.parse_configs("0,1:llm,5:embed,5:random") == [(0, "none"), (1, "llm"), (5, "embed"), (5, "random")]
    for bad in ("5", "3:best", "x:llm", "0:llm"):
        with pytest.raises(ValueError):
            A.parse_configs(bad)


def test_train_eval_recommend_end_to_end(dirs, capsys):
    model_dir, ds, out = dirs
    common = ["--model", model_dir, "--dataset", ds, "--out", out, "--n", "4", "--max-len", "1200"]
    A.main(["train", *common, "--m", "2", "--train-rows", "8", "--val-rows", "4", "--batch-size", "4",
            "--epochs", "1", "--lr", "1e-3"])
    assert os.path.exists(os.path.join(out, "m5-llm", "best", "adapter_config.json"))
    judged = json.load(open(next(os.path.join(out, "cache", f) for f in os.listdir(os.path.join(out, "cache"))
                                 if f.startswith("judge"))))["rows"]
    assert len(judged) == 12 and all(1 <= x <= 9 for v in judged.values() for x in v["rating"])
    args = ["eval", *common, "--configs", "0,2:llm,2:embed,2:random", "--eval-rows", "5", "--sasrec-epochs", "1"]
    A.main(args)
    res = json.load(open(os.path.join(out, "results.json")))
    methods = [(r["method"], r["m"], r["select"]) for r in res["rows"]]
    assert methods == [("AdaptRec", 0, "none"), ("AdaptRec", 2, "llm"), ("AdaptRec", 2, "embed"),
                       ("AdaptRec", 2, "random"), ("Pop", None, None), ("SASRec", None, None)]
    for r in res["rows"]:
        assert r["n"] == 5 and 0 <= r["hr1"] <= r["valid_ratio"] <= 1 and 0 <= r["ndcg5"] <= 1
    assert all("demo_has_target" in r for r in res["rows"][:4])
    assert res["selection"]["rows"] == 5
    A.main(args)                                    # same rows, candidates and demonstrations: same numbers
    again = json.load(open(os.path.join(out, "results.json")))
    assert [r["ndcg5"] for r in again["rows"]] == [r["ndcg5"] for r in res["rows"]]
    A.main(["train", *common, "--run", "noval", "--m", "2", "--train-rows", "4", "--batch-size", "4", "--epochs", "1"])
    assert A.adapter_dir(argparse.Namespace(out=out, run="noval")).endswith("final")
    capsys.readouterr()
    A.main(["recommend", *common, "--user", "3", "--m", "2"])
    text = capsys.readouterr().out
    assert "stage 1" in text and "recommendation (generated)" in text and "<- held-out next item" in text
    with pytest.raises(SystemExit):
        A.main(["recommend", *common, "--user", "no-such-user"])
