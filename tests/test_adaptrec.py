"""adaptrec.py: retrieval against brute force, no self and no future in what is retrieved,
shared-prefix ranking against a plain full-sequence forward, the answer-only loss, selection
rules, the self-adaptive judge against the base judge and across a resume, and train / eval /
recommend end to end on a tiny random model and tiny data."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adaptrec
import data
import generate
import model as llama
from test_recicl import write_tiny_movielens


@pytest.fixture
def dirs(tmp_path):
    from conftest import make_tiny_dir
    make_tiny_dir(tmp_path / "tiny", tie=True, max_position_embeddings=1400)
    ds = write_tiny_movielens(tmp_path / "ml", n_users=14, n_items=60, per_user=18)
    return str(tmp_path / "tiny"), ds, str(tmp_path / "out")


def test_top_n_allowed_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        q, k = torch.randn(8, generator=g), torch.randn(41, 8, generator=g)
        allowed = torch.rand(41, generator=g) < (0.1 if trial % 2 else 0.7)
        got = adaptrec.top_n_allowed(q, k, allowed, 6)
        s = F.cosine_similarity(k, q[None], dim=1)
        ref = sorted(torch.nonzero(allowed)[:, 0].tolist(), key=lambda j: -float(s[j]))[:6]
        assert [j for j, _ in got] == ref
        assert np.allclose([v for _, v in got], s[ref].numpy(), atol=1e-6)
    assert adaptrec.top_n_allowed(q, k, torch.zeros(41, dtype=torch.bool), 6) == []


def test_pool_holds_no_valid_or_test_item(dirs):
    _, ds, _ = dirs
    d = data.load(ds, verbose=False)
    rows = data.sequential_rows(d)
    pool = adaptrec.build_pool(d)
    held_out = {(r.user, r.target, r.ts) for r in rows["valid"] + rows["test"]}
    for u, items, ts in zip(pool.users, pool.items, pool.ts):
        assert all((int(u), i, t) not in held_out for i, t in zip(items, ts))
        assert ts == sorted(ts) and len(items) == int((d.users == u).sum()) - 2


def test_retrieval_cuts_every_user_at_the_query_time(dirs):
    model_dir, ds, out = dirs
    d = data.load(ds, verbose=False)
    m, tok = generate.load_model(model_dir, plain=True)
    pool = adaptrec.build_pool(d)
    ret = adaptrec.Retriever(d, pool, m, tok, adaptrec.VectorCache(os.path.join(out, "v.safetensors"), "k"), n=4, window=5)
    rows = data.sequential_rows(d)
    all_rows = rows["train"][::7] + rows["test"]
    got = ret.retrieve(all_rows)
    assert any(got.values())
    title_vec = {i: ret.item_vecs[i] for i in range(len(d.titles))}
    for r in all_rows:
        q = torch.stack([title_vec[i] for i in r.history]).mean(0)
        keys, allowed = {}, []
        for p, (u, items, ts) in enumerate(zip(pool.users, pool.items, pool.ts)):
            before = [i for i, t in zip(items, ts) if t < r.ts]      # the user's whole past at the query's time
            if u != r.user and len(before) >= 4:
                allowed.append(p)
                keys[p] = (len(before), torch.stack([title_vec[i] for i in before[-5:]]).mean(0))
        ref = sorted(allowed, key=lambda p: -float(F.cosine_similarity(keys[p][1], q, dim=0)))[:4]
        assert [u for u, _ in got[adaptrec.row_key(r)]] == [(p, keys[p][0]) for p in ref]
        for (p, end), sim in got[adaptrec.row_key(r)]:
            assert abs(sim - float(F.cosine_similarity(keys[p][1], q, dim=0))) < 1e-5
    # mean pooling ignores padding: a batch gives what each text gives alone
    texts = [adaptrec.seq_text(d, it[-10:]) for it in pool.items[:3]]
    batch = adaptrec.embed_texts(m, tok, texts, batch_size=3)
    for k, t in enumerate(texts):
        with torch.no_grad():
            h = m(torch.tensor([tok.encode(t)]))[0]
        assert torch.allclose(batch[k], h.mean(0), atol=1e-5)
    # the cache returns the same vectors from disk for the same key, and nothing for another key
    title = data.quote(d.titles[0])
    again = adaptrec.VectorCache(os.path.join(out, "v.safetensors"), "k")
    assert torch.equal(again.vecs[title], ret.item_vecs[0])
    assert adaptrec.VectorCache(os.path.join(out, "v.safetensors"), "other").vecs == {}


def test_a_changed_prompt_template_changes_the_cache_key(monkeypatch):
    before = adaptrec.prompt_key()
    monkeypatch.setattr(adaptrec, "JUDGE_QUESTION", "How alike, from 1 to 9? Answer:")
    assert adaptrec.prompt_key() != before
    monkeypatch.undo()
    monkeypatch.setattr(adaptrec, "JUDGE_SYSTEM", adaptrec.JUDGE_SYSTEM.replace("tastes", "taste"))
    assert adaptrec.prompt_key() != before
    monkeypatch.undo()
    monkeypatch.setattr(adaptrec, "SYSTEM", adaptrec.SYSTEM.replace("next", "later"))
    assert adaptrec.prompt_key() != before
    monkeypatch.undo()
    assert adaptrec.prompt_key() == before


def full_sequence_logprob(m, prompt, cont):
    """log p(cont | prompt) from one plain forward over prompt + cont (no cache, no prefix)."""
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        lp = torch.log_softmax(m.head(m(ids))[0], -1)
    return sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))


def test_shared_prefix_ranking_equals_separate_scoring(dirs):
    model_dir, _, _ = dirs
    m, tok = generate.load_model(model_dir, plain=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (17, 30, 9)]
    conts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (1, 4, 6, 3)]
    with torch.inference_mode():
        cache, logits = generate.prefill_batch(m, prompts, extra=8)
        for b, p in enumerate(prompts):
            got = generate.logprobs_after(m, cache.row(b), logits[b], conts, batch_size=3)
            ref = [full_sequence_logprob(m, p, c) for c in conts]
            assert np.allclose(got.numpy(), ref, atol=1e-4)
        # and the same cache still decodes what generate() gives
        new = generate.decode(m, cache, logits, 6, eos_ids=[])
    assert new == generate.generate(m, prompts, max_new_tokens=6, eos_ids=[])


def test_answer_only_loss_against_cross_entropy(dirs):
    model_dir, _, _ = dirs
    m = llama.load(model_dir)
    exs = [adaptrec.Example(None, [], list(range(10, 30)), 15), adaptrec.Example(None, [], list(range(40, 52)), 9)]
    loss, n = adaptrec.loss_fn(m, exs)
    terms = []
    with torch.no_grad():
        for e in exs:
            logits = m.head(m(torch.tensor([e.ids])))[0]
            for t in range(e.n_prompt, len(e.ids)):          # each answer token from what precedes it
                terms.append(F.cross_entropy(logits[t - 1][None], torch.tensor([e.ids[t]])))
    assert abs(float(loss) - float(torch.stack(terms).mean())) < 1e-5
    assert n == 19 + 11


@pytest.mark.parametrize("plain,score", [(True, "sum"), (False, "sum"), (False, "mean")], ids=["plain", "fast", "mean"])
def test_listwise_loss_reads_what_the_ranking_reads(dirs, plain, score):
    """candidate_logprobs (one packed forward, differentiable) equals generate.logprobs_after (the
    eval's ranking through a KV cache); the listwise loss is the cross-entropy over those (summed,
    or with --score mean divided by each answer's length) plus the weighted mean token NLL of the
    target, and its gradient reaches the LoRA weights."""
    import lora
    model_dir, _, _ = dirs
    m, _ = generate.load_model(model_dir, plain=plain)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 290, (150,), generator=g).tolist()       # past one 64-row block of the fast kernel
    answers = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (1, 4, 6, 3, 5)]
    with torch.inference_mode():
        cache, logits = generate.prefill_batch(m, [prompt], extra=8)
        ref = generate.logprobs_after(m, cache.row(0), logits[0], answers)
        packed = adaptrec.candidate_logprobs(m, prompt, answers)
    assert torch.allclose(packed, ref, atol=1e-4) and ref.std() > 0.1

    how = score

    class Prompter:
        score_by, score = how, adaptrec.Prompter.score

        def answer(self, item):
            return answers[item]
    row = data.SeqRow(user=0, history=[], target=2, ts=0, split="train", candidates=list(range(5)))
    e = adaptrec.Example(row, [], prompt + answers[2], len(prompt))
    lora.inject(m, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    for weight in (0.0, 1.0):
        loss, n = adaptrec.make_listwise_loss_fn(Prompter(), weight)(m, [e])
        logits = ref if score == "sum" else torch.tensor([ref[k] / len(a) for k, a in enumerate(answers)])
        expected = -torch.log_softmax(logits, 0)[2] - weight * ref[2] / len(answers[2])
        assert abs(loss.item() - expected.item()) < 1e-4 and n == 150 + sum(len(a) - 1 for a in answers)
    m.train()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in lora.lora_parameters(m)[1::2])   # lora_B


def test_selection_rules():
    sel = adaptrec.Selector.__new__(adaptrec.Selector)
    r = data.SeqRow(user=0, history=[1, 2, 3], target=9, ts=10, split="test", candidates=[])
    retrieved = {adaptrec.row_key(r): [((2, 5), 0.9), ((1, 4), 0.8), ((4, 7), 0.7)]}
    sel.scores = {adaptrec.row_key(r): {"units": [[2, 5], [1, 4], [4, 7]], "rating": [3.0, 7.0, 3.0]}}
    assert sel.select(r, retrieved, 2, "embed") == [(2, 5), (1, 4)]
    assert sel.select(r, retrieved, 3, "llm") == [(1, 4), (2, 5), (4, 7)]       # ties keep stage-1 order
    assert sel.select(r, retrieved, 0, "llm") == []
    allowed = (np.array([9, 4, 5, 0, 7]), np.array([False, True, True, False, True]))
    rand = sel.select(r, retrieved, 5, "random", seed=3, allowed=allowed)
    assert sorted(rand) == [(1, 4), (2, 5), (4, 7)]                           # only allowed users, cut at t
    assert rand == sel.select(r, retrieved, 5, "random", seed=3, allowed=allowed)
    dis = sel.disagreement([r], retrieved, 2)
    assert dis["top_1_differs"] == 1.0 and dis["mean_overlap"] == 2.0 and dis["top_m_set_differs"] == 0.0


def synthetic_rows(n, rng):
    """n rows of 20 candidates with the target at a random slot."""
    rows = []
    for k in range(n):
        cands = list(range(20 * k, 20 * k + 20))
        rows.append(data.SeqRow(user=k, history=[], target=cands[rng.integers(20)], ts=0, split="test", candidates=cands))
    return rows


def test_mixed_ranks_find_what_the_llm_adds_and_nothing_else():
    """A weighted Borda count chosen leave-one-row-out: an LLM that knows the target in rows where
    the control does not lifts NDCG above the control's; noise does not; a constant LLM gives the
    control's ranks exactly; a row's weight never depends on its own answer; and the ranks equal a
    brute-force Borda count in exact fractions from eval's average ranks."""
    from fractions import Fraction
    import eval as metrics
    rng = np.random.default_rng(0)
    rows = synthetic_rows(300, rng)
    hot = np.zeros((300, 20))
    for k, r in enumerate(rows):
        hot[k, r.candidates.index(r.target)] = 1
    knows_c, knows_l = rng.random(300) < 0.5, rng.random(300) < 0.5
    control = rng.normal(size=(300, 20)) + 4 * hot * knows_c[:, None]
    useful = rng.normal(size=(300, 20)) + 4 * hot * knows_l[:, None]
    noise = rng.normal(size=(300, 20))
    alone = adaptrec.target_ranks(rows, control)
    with_useful, w, by_weight = adaptrec.mixed_ranks(rows, control, useful)
    with_noise, w_noise, _ = adaptrec.mixed_ranks(rows, control, noise)
    assert metrics.ndcg_at_k(with_useful, 5) > metrics.ndcg_at_k(alone, 5) + 0.03 and w.mean() > 0.2
    assert abs(metrics.ndcg_at_k(with_noise, 5) - metrics.ndcg_at_k(alone, 5)) < 0.02 and w_noise.mean() < 0.2
    same = adaptrec.mixed_ranks(rows, control, np.zeros((300, 20)))[0]
    assert (same == alone).all() and (by_weight[0] == alone).all()   # w = 0: the control's ranking
    few = rows[:4]                                      # a row's answer moves to any slot: its own weight stays
    w_few = adaptrec.mixed_ranks(few, control[:4], useful[:4])[1]
    for k in range(4):
        for c in few[k].candidates:
            moved = [dataclasses.replace(r, target=c) if i == k else r for i, r in enumerate(few)]
            assert adaptrec.mixed_ranks(moved, control[:4], useful[:4])[1][k] == w_few[k]
    for k in range(30):
        pc, pl = metrics._avg_ranks(control[k]), metrics._avg_ranks(useful[k])
        wk = Fraction(w[k]).limit_denominator(20)
        mix = [(1 - wk) * Fraction(a) + wk * Fraction(b) + Fraction(b) / 1000 for a, b in zip(pc, pl)]
        t = rows[k].candidates.index(rows[k].target)
        assert with_useful[k] == sum(mix[i] >= mix[t] for i in range(20) if i != t)


def test_demo_overlap_counts_shared_items_and_target():
    pool = adaptrec.Pool(np.array([5, 6, 7]), [[1, 2, 9, 11], [2, 3, 4], [7, 8, 1]], [[1, 2, 3, 4], [1, 2, 3], [1, 2, 3]])
    r1 = data.SeqRow(user=0, history=[1, 2, 3], target=9, ts=10, split="test", candidates=[])
    r2 = data.SeqRow(user=1, history=[4, 5], target=6, ts=10, split="test", candidates=[])
    demos = {adaptrec.row_key(r1): [(0, 3), (1, 3)], adaptrec.row_key(r2): [(2, 3)]}
    # r1: units (1, 2, 9) and (2, 3, 4) hold 3 of its history and its target; r2: (7, 8, 1) none
    assert adaptrec.demo_overlap(pool, [r1, r2], demos) == {"demo_history_overlap": 1.5, "demo_has_target": 0.5}
    assert adaptrec.demo_overlap(pool, [r1], {adaptrec.row_key(r1): [(0, 2)]}) == {"demo_history_overlap": 2.0, "demo_has_target": 0.0}


def test_corrupt_caches_are_named(dirs, tmp_path):
    _, tok = generate.load_model(dirs[0], plain=True)
    vec, judged = tmp_path / "vectors.safetensors", tmp_path / "judge.json"
    vec.write_bytes(b"not a torch file")
    judged.write_text("{ truncated")
    with pytest.raises(ValueError, match="vectors.safetensors: unreadable vector cache"):
        adaptrec.VectorCache(str(vec), "key")
    with pytest.raises(ValueError, match="judge.json: unreadable judge cache"):
        adaptrec.Selector(None, None, None, tok, str(judged), "key")


def test_parse_configs():
    assert adaptrec.parse_configs("0,1:llm,5:embed,5:random") == [(0, "none"), (1, "llm"), (5, "embed"), (5, "random")]
    for bad in ("5", "3:best", "x:llm", "0:llm"):
        with pytest.raises(ValueError):
            adaptrec.parse_configs(bad)


def test_train_eval_recommend_end_to_end(dirs, capsys):
    model_dir, ds, out = dirs
    common = ["--model", model_dir, "--dataset", ds, "--out", out, "--n", "4", "--prompt-budget", "1200"]
    adaptrec.main(["train", *common, "--configs", "0,2:llm,2:random", "--train-rows", "8", "--val-rows", "4",
            "--fit-rows", "8", "--batch-size", "4", "--epochs", "1", "--lr", "1e-3", "--eval-every", "1"])
    for run in ("m0", "m2-llm", "m2-random"):
        assert os.path.exists(os.path.join(out, run, "best", "adapter_config.json"))
        assert json.load(open(os.path.join(out, run, "config.json")))["m"] == int(run[1])
        logged = [json.loads(line) for line in open(os.path.join(out, run, "log.jsonl"))]
        fit = [json.loads(line) for line in open(os.path.join(out, run, "fit.jsonl"))]   # one line per validation
        assert [f["val_rows_ndcg20"] for f in fit] == [x["validation"] for x in logged if "validation" in x]
        assert len(fit) == 2 and all(0 < f["train_rows_ndcg20"] <= 1 for f in fit)
    with pytest.raises(SystemExit, match="--fit-rows"):
        adaptrec.main(["train", *common, "--configs", "0", "--train-rows", "8", "--fit-rows", "8"])
    judged = json.load(open(next(os.path.join(out, "cache", f) for f in os.listdir(os.path.join(out, "cache"))
                                 if f.startswith("judge"))))["rows"]
    assert len(judged) == 12 and all(1 <= x <= 9 for v in judged.values() for x in v["rating"])
    args = ["eval", *common, "--configs", "0,2:llm,2:embed,2:random", "--eval-rows", "5", "--sasrec-epochs", "1"]
    adaptrec.main(args)                                       # 2:embed has no adapter: skipped, said so
    res = json.load(open(os.path.join(out, "results.json")))
    methods = [(r["method"], r["m"], r["select"]) for r in res["rows"]]
    controls = ["Pop (t)", "DemoVote (M=2, llm)", "DemoVote (M=2, embed)", "DemoVote (M=2, random)", "TitlePrior (base)",
                "Pop", "SASRec"]
    best = res["best_control"]
    analyses = [f"{best} + M={m} ({how})" for m, how in ((0, "none"), (2, "llm"), (2, "random"))]
    assert methods == [("AdaptRec", 0, "none"), ("AdaptRec", 2, "llm"), ("AdaptRec", 2, "random")] + \
        [(c, None, None) for c in controls] + [(x, None, None) for x in analyses]
    best_ranks = np.array(next(r["target_ranks"] for r in res["rows"] if r["method"] == best))
    for r in res["rows"][-3:]:                             # LLM + best control, against the control alone
        assert r["kind"] == "analysis" and sum(r["llm_weight_rows"].values()) == 5
        assert [x["w"] for x in r["in_sample_by_weight"]] == [j / 20 for j in range(21)]
        assert r["in_sample_by_weight"][0]["hr1_rank"] >= np.mean(best_ranks == 0)   # w = 0: the control, ties by the LLM
        d = r["hr1_rank_vs_best_control"]
        assert d["vs"] == best and d["diff"] == pytest.approx(np.mean(np.array(r["target_ranks"]) == 0) -
                                                               np.mean(best_ranks == 0), abs=1e-4)
    for r in res["rows"]:
        assert r["n"] == 5 and 0 <= r["hr1"] <= r["valid_ratio"] <= 1 and 0 <= r["ndcg5"] <= 1
    assert best in controls
    for r in res["rows"][:3]:
        d = r["hr1_rank_vs_best_control"]
        assert d["vs"] == res["best_control"] and d["ci95"][0] <= d["diff"] <= d["ci95"][1]
        assert "demo_has_target" in r
    assert res["selection"]["rows"] == 5
    for r in res["rows"]:                                  # the stored per-row ranks give the reported metrics
        ranks = np.array(r["target_ranks"])
        assert len(ranks) == 5 and np.mean(ranks == 0) == pytest.approx(r["hr1_rank"], abs=1e-4)
    m0 = np.array(res["rows"][0]["target_ranks"])
    assert "hr1_rank_vs_m0" not in res["rows"][0]
    for r in res["rows"][1:3]:                             # each M = 2 adapter against M = 0's, row by row
        d, mine = r["hr1_rank_vs_m0"], np.array(r["target_ranks"])
        assert d["vs"] == "M=0" and d["diff"] == pytest.approx(np.mean(mine == 0) - np.mean(m0 == 0), abs=1e-4)
        assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
        g = r["ndcg5_vs_m0"]["diff"]
        assert g == pytest.approx(np.mean(np.where(mine < 5, 1 / np.log2(mine + 2), 0) -
                                          np.where(m0 < 5, 1 / np.log2(m0 + 2), 0)), abs=1e-4)
    adaptrec.main(args)                                    # same rows, candidates and demonstrations: same numbers
    again = json.load(open(os.path.join(out, "results.json")))
    assert [r["ndcg5"] for r in again["rows"]] == [r["ndcg5"] for r in res["rows"]]
    history = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]   # each eval kept, in order
    assert [h["finished"] for h in history] == [res["finished"], again["finished"]]
    assert history[0]["rows"] == res["rows"] and history[1]["rows"] == again["rows"]
    adaptrec.main(["train", *common, "--out", os.path.join(out, "noval"), "--configs", "2:embed", "--train-rows", "4",
            "--batch-size", "4", "--epochs", "1", "--objective", "both", "--score", "mean"])
    assert adaptrec.adapter_dir(os.path.join(out, "noval"), 2, "embed").endswith("final")
    noval = ["eval", *common, "--out", os.path.join(out, "noval"), "--configs", "2:embed", "--eval-rows", "5",
             "--sasrec-epochs", "0"]
    with pytest.raises(SystemExit, match="tuned with --score mean; this run has --score sum"):
        adaptrec.main(noval)                               # an adapter is ranked with the score it was tuned with
    adaptrec.main(noval + ["--score", "mean"])
    assert json.load(open(os.path.join(out, "noval", "results.json")))["config"]["score"] == "mean"
    capsys.readouterr()
    adaptrec.main(["recommend", *common, "--user", "3", "--m", "2"])
    text = capsys.readouterr().out
    assert "stage 1" in text and "recommendation (generated)" in text and "<- held-out next item" in text
    with pytest.raises(SystemExit):
        adaptrec.main(["recommend", *common, "--user", "no-such-user"])


def test_prompts_and_cache_key_name_the_data_sets_items():
    books = data.words_for("book")
    prefix, conts = adaptrec.judge_texts(["A"], [["B"]], books)
    rec = adaptrec.Prompter.render_text([(["C"], "D")], ["E"], ["F", "G"], books)
    text = prefix + conts[0] + rec
    assert "movie" not in text and "watch" not in text
    assert "Recommend the book the user will read next." in rec and "Similar user 1 has read" in rec
    assert "Compare the book tastes of two users from the books they read." in prefix
    assert adaptrec.prompt_key(books) != adaptrec.prompt_key()


def test_implicit_feedback_runs_end_to_end(tmp_path, monkeypatch):
    """Plays data trains and evaluates; an eval repeated unchanged reads its scores back (a killed
    eval redoes only the configurations it had not finished), one with other prompts scores again."""
    from conftest import make_tiny_dir
    from test_recicl import write_tiny_plays
    make_tiny_dir(tmp_path / "tiny", tie=True, max_position_embeddings=1400)
    args = write_tiny_plays(tmp_path / "plays", n_users=14, n_items=60, per_user=18) + [
        "--model", str(tmp_path / "tiny"), "--out", str(tmp_path / "out"), "--n", "4", "--prompt-budget", "1200"]
    adaptrec.main(["train", *args, "--configs", "2:llm", "--train-rows", "4", "--batch-size", "4"])
    ev = ["eval", *args, "--configs", "2:llm", "--eval-rows", "4", "--sasrec-epochs", "1"]
    adaptrec.main(ev)
    res = json.load(open(tmp_path / "out" / "results.json"))
    assert res["rows"][0]["method"] == "AdaptRec" and res["rows"][0]["n"] == 4

    def no_evaluate(*a, **k):
        raise AssertionError("scored again")
    monkeypatch.setattr(adaptrec, "evaluate", no_evaluate)
    adaptrec.main(ev)
    again = json.load(open(tmp_path / "out" / "results.json"))
    assert again["rows"][0] == res["rows"][0]
    with pytest.raises(AssertionError, match="scored again"):
        adaptrec.main(ev + ["--demo-history", "2"])


def test_chat_prompts_end_to_end(dirs):
    """--chat: the judge's shared prefix + each continuation are the whole ChatML conversation;
    the answer is the assistant's turn ('"<title>"' + <|im_end|>); train and eval run, and eval
    refuses an adapter tuned without --chat."""
    from conftest import write_byte_tokenizer
    from tokenizer import chat_format
    model_dir, ds, out = dirs
    write_byte_tokenizer(os.path.join(model_dir, "tokenizer.json"), chat=True)
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"}, f)
    m, tok = generate.load_model(model_dir, plain=True)
    chat = chat_format(model_dir, tok)
    lead, digits = adaptrec.rating_ids(tok, chat=True)
    assert lead == [] and len(set(digits)) == 9
    d = data.load(ds, verbose=False)
    calls = []
    real = generate.next_token_logits

    def spy(model, conts, prefix, **kw):
        calls.append((prefix, conts))
        return real(model, conts, prefix=prefix, **kw)
    generate.next_token_logits = spy
    try:
        adaptrec.judge(m, tok, d, [0, 1], [[2, 3], [4]], (lead, digits), chat=chat)
    finally:
        generate.next_token_logits = real
    prefix, conts = calls[0]
    system = adaptrec.say(adaptrec.JUDGE_SYSTEM, d.words)
    p_text, c_texts = adaptrec.judge_texts([d.titles[0], d.titles[1]], [[d.titles[2], d.titles[3]], [d.titles[4]]], d.words)
    for c, c_text in zip(conts, c_texts):
        whole = chat.ids([{"role": "system", "content": system.strip()}, {"role": "user", "content": p_text[len(system):] + c_text}])
        assert prefix + c == whole
    common = ["--model", model_dir, "--dataset", ds, "--out", out, "--n", "4", "--prompt-budget", "1200"]
    adaptrec.main(["train", *common, "--configs", "2:llm", "--train-rows", "4", "--batch-size", "4", "--chat"])
    adaptrec.main(["eval", *common, "--configs", "2:llm", "--eval-rows", "4", "--sasrec-epochs", "1"])   # auto: on
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["rows"][0]["method"] == "AdaptRec" and 0 <= res["rows"][0]["valid_ratio"] <= 1
    with pytest.raises(SystemExit, match="was tuned with --chat True; this run has --chat False"):
        adaptrec.main(["eval", *common, "--configs", "2:llm", "--eval-rows", "4", "--sasrec-epochs", "1", "--chat", "off"])


def test_self_adaptive_judge_rates_each_round_with_the_adapter_and_resumes_exactly(dirs, monkeypatch, capsys):
    """Selection self: round r's rows are rated by the adapter of step r * refresh (round 0: the
    untuned model, so the base judge's ratings; later rounds: other ratings), each training row
    once in one epoch; a run interrupted inside a round resumes to the uninterrupted run's
    adapter; eval and recommend let the kept adapter judge."""
    from safetensors.torch import load_file
    model_dir, ds, out = dirs
    common = ["--model", model_dir, "--dataset", ds, "--n", "4", "--prompt-budget", "1200"]
    train = ["train", *common, "--train-rows", "8", "--val-rows", "2", "--batch-size", "2", "--micro-batch", "1",
             "--judge-refresh", "2", "--eval-every", "2", "--save-every", "1", "--lr", "1e-2"]
    adaptrec.main(train + ["--out", out, "--configs", "2:self"])
    adaptrec.main(train + ["--out", out, "--configs", "2:llm", "--epochs", "0.25"])    # the base judge, on the same rows
    cache = os.path.join(out, "cache")
    base = json.load(open(next(os.path.join(cache, f) for f in os.listdir(cache) if f.startswith("judge"))))["rows"]
    rounds = [json.load(open(os.path.join(out, "m2-self", "judge", f"round-{r:05d}.json")))["rows"] for r in (0, 1)]
    assert sorted(os.listdir(os.path.join(out, "m2-self", "judge"))) == ["round-00000.json", "round-00001.json"]
    assert [len(x) for x in rounds] == [4, 4] and not set(rounds[0]) & set(rounds[1])    # 4 steps of 2, 1 epoch
    assert len(base) == 10 and set(rounds[0]) | set(rounds[1]) < set(base)               # the 8 training rows
    for k, v in rounds[0].items():                                    # the adapter at step 0 is the base model
        assert v["units"] == base[k]["units"] and v["rating"] == pytest.approx(base[k]["rating"], abs=1e-3)
    moved = [abs(x - y) for k, v in rounds[1].items() for x, y in zip(v["rating"], base[k]["rating"])]
    assert max(moved) > 1e-3                                          # the adapter of step 2 judges otherwise

    calls = {"n": 0}
    nll = adaptrec.loss_fn

    def interrupted(model, batch):                 # a Ctrl-C at step 4, inside round 1 (2 micro-batches a step)
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return nll(model, batch)
    out2 = os.path.join(os.path.dirname(out), "out2")
    monkeypatch.setattr(adaptrec, "loss_fn", interrupted)
    with pytest.raises(SystemExit):
        adaptrec.main(train + ["--out", out2, "--configs", "2:self"])
    assert json.load(open(os.path.join(out2, "m2-self", "checkpoint.json")))["step"] == 3
    monkeypatch.setattr(adaptrec, "loss_fn", nll)
    adaptrec.main(train + ["--out", out2, "--configs", "2:self", "--resume"])
    a, b = (load_file(os.path.join(o, "m2-self", "final", "adapter_model.safetensors")) for o in (out, out2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    adaptrec.main(["eval", *common, "--out", out, "--configs", "2:llm,2:self", "--eval-rows", "5", "--sasrec-epochs", "0"])
    res = json.load(open(os.path.join(out, "results.json")))
    methods = [(r["method"], r["select"]) for r in res["rows"]]
    assert ("AdaptRec", "self") in methods and ("DemoVote (M=2, self)", None) in methods
    test_keys = set(json.load(open(next(os.path.join(cache, f) for f in os.listdir(cache)
                                        if f.startswith("judge"))))["rows"]) - set(base)
    kept = next(f for f in os.listdir(cache) if f.startswith("self-"))
    judged = json.load(open(os.path.join(cache, kept)))
    assert set(judged["rows"]) == test_keys and len(test_keys) == 5 and judged["model"].endswith(kept.split("-")[1])
    capsys.readouterr()
    adaptrec.main(["recommend", *common, "--out", out, "--user", "3", "--m", "2", "--select", "self"])
    assert "stage 2 (self): 2 demonstrations" in capsys.readouterr().out
