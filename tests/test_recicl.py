"""recicl.py end to end on a tiny random model and a tiny dataset, plus its prompt rules,
answer-token check and shared-prefix scoring."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

import data
import generate
import model as llama
from tokenizer import Tokenizer, load_tokenizer
import lora
import recicl
import train as trainer


def write_tiny_movielens(path, n_users=12, n_items=40, per_user=24, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "u.data"), "w") as f:
        for u in range(1, n_users + 1):
            for i in rng.choice(n_items, per_user, replace=False) + 1:
                f.write(f"{u}\t{i}\t{rng.integers(1, 6)}\t{rng.integers(1000, 5000)}\n")
    with open(os.path.join(path, "u.item"), "w", encoding="latin-1") as f:
        for i in range(1, n_items + 1):
            f.write(f"{i}|Movie {i} ({1950 + i})|01-Jan-1995|x\n")
    return str(path)


@pytest.fixture
def setup_dirs(tmp_path):
    from conftest import make_tiny_dir
    make_tiny_dir(tmp_path / "tiny", tie=True, max_position_embeddings=1024)
    return str(tmp_path / "tiny"), write_tiny_movielens(tmp_path / "ml"), str(tmp_path / "out")


def common(model, ds, out):
    return ["--model", model, "--dataset", ds, "--out", out, "--prompt-budget", "600"]


def test_train_eval_recommend_feedback_end_to_end(setup_dirs, capsys):
    model, ds, out = setup_dirs
    small = ["--train-samples", "8", "--val-samples", "4", "--steps", "2", "--batch-size", "2", "--save-every", "1"]
    recicl.main(["train"] + common(model, ds, out) + small)
    recicl.main(["train", "--demos", "0"] + common(model, ds, out) + small)
    for run in ("icl", "nodemo"):
        assert os.path.exists(os.path.join(out, run, "best", "adapter_model.safetensors"))
        assert json.load(open(os.path.join(out, run, "config.json")))["method"] == "recicl"
    recicl.main(["eval", "--eval-samples", "12", "--rows-per-user", "4", "--update", "--icl-ablation"] + small + common(model, ds, out))
    res = json.load(open(os.path.join(out, "results.json")))
    methods = {r["method"] for r in res["rows"]}
    llm = {name for name, _, _ in recicl.LLM_METHODS.values()} | {recicl.UPDATED}
    controls = {"DemoLikeRate", "UserLikeRate", "ItemLikeRate (t)", "LogReg", "MF", "Pop", "ItemLikeRate"}
    stacked = {f"{res['best_control']} + {name}'s score" for name in llm - {recicl.UPDATED}}
    assert llm | controls | stacked | {recicl.MF_UPDATED} == methods
    assert {r["method"] for r in res["rows"] if r["kind"] == "analysis"} == stacked
    auc_rows = [r for r in res["rows"] if r["method"] != recicl.UPDATED]
    assert {r["period"] for r in auc_rows} == {"D5", "D6", "D7", "D8", "D9"}
    assert all(r["n"] == 12 and r["users"] >= 3 and (np.isnan(r["auc"]) or 0 <= r["auc"] <= 1) for r in auc_rows)
    assert all(0 <= r["demos_shown"] <= r["demos_available"] <= 4 for r in auc_rows if r["method"] in ("RecICL", "base + ICL"))
    summary = {r["method"]: r for r in res["summary"]}
    assert summary["RecICL"]["vs_best_control"]["vs"] == res["best_control"] in controls
    assert "vs_best_control" not in summary["LogReg"]
    assert len(summary["PDM"]["per_period"]) == 4 and "definition" in summary["PDM"]
    assert len(summary["PDM"]["mf_per_period"]) == 4 and recicl.MF_UPDATED in methods
    upd = json.load(open(os.path.join(out, "update", "through_D8", "config.json")))
    assert upd["periods"] == [5, 8] and upd["train_samples"] == round(8 * 4 / 5)     # the D4 adapter on D5..D8, same rate
    assert os.path.exists(os.path.join(out, "update", "through_D8", "best", "adapter_model.safetensors"))
    capsys.readouterr()
    recicl.main(["recommend", "--user", "3", "--max-candidates", "6", "--top", "6"] + common(model, ds, out))
    before = capsys.readouterr().out
    recicl.main(["recommend", "--user", "3", "--max-candidates", "6", "--top", "6", "--feedback", "1:5", "2:1"] + common(model, ds, out))
    after = capsys.readouterr().out
    assert "(0 new)" in before and "(2 new)" in after
    assert len([l for l in after.splitlines() if ". " in l and "item" in l]) == 6


def test_stacked_scores_find_what_the_llm_adds_and_nothing_else():
    """Leave-one-period-out stacking on synthetic rows: an LLM score that holds part of the label
    the control does not lifts the AUC above the control's; pure noise does not, and a period's
    scores never come from a fit on its own rows (the stacked scores of a period do not move when
    its own labels are flipped)."""
    from types import SimpleNamespace
    import eval as metrics
    rng = np.random.default_rng(0)
    rows, control, useful, noise = {}, {}, {}, {}
    for p in range(5, 10):
        y = rng.integers(0, 2, 300)
        a, b = rng.normal(size=300), rng.normal(size=300)
        rows[p] = [SimpleNamespace(label=int(v), user=k % 40) for k, v in enumerate(y)]
        control[p], useful[p], noise[p] = y + 2 * a, y + 2 * b, rng.normal(size=300)
    auc = lambda sc: np.mean([metrics.auc([s.label for s in rows[p]], sc[p]) for p in rows])
    with_useful, with_noise = recicl.stacked_scores(rows, control, useful), recicl.stacked_scores(rows, control, noise)
    assert auc(with_useful) > auc(control) + 0.05
    assert abs(auc(with_noise) - auc(control)) < 0.01
    flipped = {p: ([SimpleNamespace(label=1 - s.label, user=s.user) for s in rs] if p == 7 else rs) for p, rs in rows.items()}
    assert np.allclose(recicl.stacked_scores(flipped, control, useful)[7], with_useful[7])


def tiny_prompter(model_dir, ds, k=4, prompt_budget=400, demo_history=3):
    d = data.load(ds, verbose=False)
    samples = data.recicl_samples(d, k_demos=k)
    args = llama.read_config(model_dir)
    tok = load_tokenizer(model_dir, args)
    return d, samples, tok, recicl.Prompter(d, samples, tok, k, demo_history, prompt_budget)


def test_over_long_prompt_cuts_query_history_then_oldest_demos_and_keeps_query(setup_dirs):
    model, ds, _ = setup_dirs
    d, samples, tok, pr = tiny_prompter(model, ds, prompt_budget=100_000)
    s = next(x for x in samples if len(x.demo_idx) == 4 and len(x.history) >= 3)
    titles = [d.titles[i] for i in s.history]
    full, kept = pr.render(s)
    assert [x.idx for x in kept] == s.demo_idx
    assert full.endswith(recicl.block(titles, d.titles[s.item]))
    n_full = len(tok.encode(full))
    pr.prompt_budget = n_full - 5                   # the query's oldest history title goes, every demo stays
    text, kept = pr.render(s)
    assert [x.idx for x in kept] == s.demo_idx and text.endswith(recicl.block(titles[1:], d.titles[s.item]))
    no_history = recicl.block([], d.titles[s.item])
    pr.prompt_budget = len(tok.encode(text[:-len(recicl.block(titles[1:], d.titles[s.item]))] + no_history)) - 1
    text, kept = pr.render(s)                 # no history left to cut: the oldest demonstration goes
    assert [x.idx for x in kept] == s.demo_idx[1:] and text.endswith(no_history)
    pr.prompt_budget = len(tok.encode(recicl.system_line() + no_history))          # only the bare query fits
    text, kept = pr.render(s)
    assert kept == [] and text == recicl.system_line() + no_history
    pr.prompt_budget -= 1
    with pytest.raises(ValueError, match="the query alone needs"):
        pr.render(s)
    for x in samples:                                       # demonstrations are strictly earlier
        assert all(samples[j].ts < x.ts for j in x.demo_idx)


def test_answer_tokens_checked_at_startup(tmp_path, setup_dirs):
    model, _, _ = setup_dirs
    args = llama.read_config(model)
    tok = load_tokenizer(model, args)
    yes, no = recicl.answer_ids(tok)
    assert yes != no and tok.decode([yes]) == " Yes" and tok.decode([no]) == " No"
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    plain = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match="single distinct tokens"):
        recicl.answer_ids(Tokenizer(str(tmp_path / "plain.json"), None, False, []))


def test_shared_prefix_scoring_equals_separate_prompts(setup_dirs):
    model_dir, ds, _ = setup_dirs
    m, tok = generate.load_model(model_dir, plain=True)
    d, samples, _, pr = tiny_prompter(model_dir, ds, prompt_budget=1000)
    ans = recicl.answer_ids(tok)

    history = [(int(i), float(r)) for i, r in zip(d.items[d.users == 0], d.ratings[d.users == 0])]
    cands = list(range(7))
    ranked = dict(recicl.rank_for_user(m, tok, pr, d, history, cands, ans, k_demos=1, threshold=4.0,
                                             batch_size=3))
    liked = [i for i, r in history if r >= 4][-10:]
    for c in cands:                                         # the same prompt, whole, scored alone
        demos = []
        for k in range(len(history) - 1, len(history)):
            i, r = history[k]
            demos.append(data.Sample(-1, -1, i, int(r >= 4), 0, 0, [x for x, rr in history[:k] if rr >= 4][-10:], []))
        text = recicl.system_line() + "".join(pr.demo_text(s) for s in demos) + recicl.block([d.titles[i] for i in liked], d.titles[c])
        assert len(tok.encode(text)) < pr.prompt_budget                # within budget: nothing was dropped
        with torch.no_grad():
            lg = recicl.yes_no_logits(m, [tok.encode(text)], ans)[0]
        assert abs((lg[0] - lg[1]).item() - ranked[c]) < 1e-4


def test_query_split_is_a_token_boundary_for_the_real_tokenizer(default_dir):
    args = llama.read_config(default_dir)
    tok = load_tokenizer(default_dir, args)
    d = data.load(verbose=False)
    liked = d.titles[:5]
    for title in d.titles[::37] + ['Star Wars: "Episode" IV (1977)', "Amélie (2001)", "8 1/2 (1963)"]:
        a, b = recicl.split_query(liked, title)
        assert tok.encode(a) + tok.encode(b, bos=False) == tok.encode(a + b), title


def test_yes_no_logits_of_a_padded_batch_match_transformers(tmp_path):
    """yes_no_logits runs the last layer only at each prompt's last token of a right-padded
    batch; the two logits must be transformers' at that token of each prompt run alone."""
    from conftest import make_tiny_dir
    hf = make_tiny_dir(tmp_path / "tiny", tie=True)
    m = llama.load(str(tmp_path / "tiny"))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (40, 17, 29)]
    ans = [297, 295]
    with torch.no_grad():
        ours = recicl.yes_no_logits(m, prompts, ans)
        for b, p in enumerate(prompts):
            ref = hf(torch.tensor([p])).logits[0, -1, ans]
            assert torch.allclose(ours[b], ref, atol=1e-4, rtol=0), b
    assert ours.shape == (3, 2) and (ours[:, 0] - ours[:, 1]).abs().max() > 1e-3


def test_eval_rows_are_whole_users_with_a_row_cap(setup_dirs):
    _, ds, _ = setup_dirs
    d = data.load(ds, verbose=False)
    samples = data.recicl_samples(d, k_demos=4)
    rows = recicl.eval_rows(samples, range(5, 10), n_rows=10, rows_per_user=3, seed=0)
    assert rows == recicl.eval_rows(samples, range(5, 10), n_rows=10, rows_per_user=3, seed=0)
    for p, rs in rows.items():
        assert len(rs) == 10 and all(s.period == p for s in rs) and len({s.idx for s in rs}) == 10
        per_user = {u: sum(s.user == u for s in rs) for u in {s.user for s in rs}}
        assert max(per_user.values()) <= 3
        # every drawn user but the last gives min(3, its rows in the period)
        full = [u for u, c in per_user.items() if c < min(3, sum(s.user == u and s.period == p for s in samples))]
        assert len(full) <= 1
    every = recicl.eval_rows(samples, range(5, 10), n_rows=0, rows_per_user=3, seed=0)
    assert sorted(s.idx for s in every[7]) == [s.idx for s in samples if s.period == 7]


def test_demo_like_rate_reads_the_demonstrations_the_prompt_shows(setup_dirs):
    model, ds, _ = setup_dirs
    d, samples, tok, pr = tiny_prompter(model, ds, prompt_budget=100_000)
    s = next(x for x in samples if len(x.demo_idx) == 4 and len(x.history) >= 1 and x.period >= 5)
    pr.prompt_budget = len(tok.encode(pr.render(s)[0])) - 1     # the query's history goes first: all demos stay
    assert len(pr.render(s)[1]) == 4
    no_history = recicl.block([], d.titles[s.item])
    pr.prompt_budget = len(tok.encode(recicl.system_line() + "".join(pr.demo_text(samples[j]) for j in s.demo_idx[2:]) + no_history))
    kept = pr.render(s)[1]
    assert [x.idx for x in kept] == s.demo_idx[2:]
    ctrl = recicl.control_scores(d, samples, {s.period: [s]}, pr, k_demos=4, threshold=4.0, periods=10, train_periods=5,
                                 seed=0, log=lambda m: None)
    likes = sum(x.label for x in kept)
    assert ctrl["DemoLikeRate"][s.period][0] == pytest.approx((likes + 0.5) / 3)


# ----------------------------------------------------------------------------- blocks layout

def test_block_mask_by_hand():
    """Sample 0's block (body 2 tokens, tail 1), sample 1's block (body 1, tail 1), then a
    reader of sample 1, whose one demonstration is sample 0. Written out by hand."""
    B, T, R = recicl.BODY, recicl.TAIL, recicl.READ
    owner = torch.tensor([0, 0, 0, 1, 1, 1])
    kind = torch.tensor([B, B, T, B, T, R])
    sees = torch.tensor([[False, False], [True, False]])
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],       # block 0, causal within itself
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0],       # block 1 does not see block 0
                             [0, 0, 0, 1, 1, 0],
                             [1, 1, 1, 1, 0, 1]],      # the reader: all of its demo, its own body, itself
                            dtype=torch.bool)
    assert torch.equal(recicl.block_mask(owner, kind, sees), expected)
    padded = recicl.block_mask(torch.tensor([0, -1]), torch.tensor([B, B]), torch.zeros(1, 1, dtype=torch.bool))
    assert torch.equal(padded, torch.eye(2, dtype=torch.bool))      # a pad sees only itself, nobody sees it


def tied_movielens(path, n_users=6, per_user=30, seed=1):
    """Timestamps from a narrow range: many samples of a user share one, and so their demonstrations."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "u.data"), "w") as f:
        for u in range(1, n_users + 1):
            for i in rng.choice(40, per_user, replace=False) + 1:
                f.write(f"{u}\t{i}\t{rng.integers(1, 6)}\t{rng.integers(1000, 1012)}\n")
    with open(os.path.join(path, "u.item"), "w", encoding="latin-1") as f:
        for i in range(1, 41):
            f.write(f"{i}|Movie {i} ({1950 + i})|01-Jan-1995|x\n")
    return str(path)


@pytest.mark.parametrize("plain", [True, False], ids=["plain", "fast"])
def test_packed_sequence_equals_one_prompt_per_sample(tmp_path, plain):
    """The claim that makes packing exact: a pack of a user's consecutive samples gives every
    sample the logits, loss and LoRA gradients of its own prompt (its K demonstrations' blocks,
    its body, its cue), including samples that share a timestamp and so their demonstrations."""
    from conftest import make_tiny_dir
    make_tiny_dir(tmp_path / "tiny", tie=True, max_position_embeddings=4096)
    m, tok = generate.load_model(str(tmp_path / "tiny"), plain=plain)
    d = data.load(tied_movielens(tmp_path / "ml"), verbose=False)
    samples = data.recicl_samples(d, k_demos=4)
    bp = recicl.BlockPrompter(d, samples, tok, 4, 3, m.args.max_seq_len)
    run = [s for s in samples if s.user == 2][5:13]
    assert any(a.demo_idx == b.demo_idx for a, b in zip(run, run[1:]))           # ties are in the pack
    assert any(a.idx not in b.demo_idx for a, b in zip(run, run[1:]))
    ans = recicl.answer_ids(tok)
    lora.inject(m, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for mod in lora.lora_modules(m).values():
            mod.lora_B.weight.normal_(0, 0.05)
    m.train()
    loss_fn = recicl.make_loss_fn(bp, ans)
    results = []
    for batch in ([run], run):                       # one pack; one prompt per sample
        m.zero_grad()
        loss, n_tok = loss_fn(m, batch)
        loss.backward()
        results.append((loss.item(), n_tok, {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    (packed, packed_tok, g1), (single, single_tok, g2) = results
    assert abs(packed - single) < 1e-5 and packed > 0.1
    for name in g1:
        assert g1[name].abs().max() > 0 and torch.allclose(g1[name], g2[name], atol=1e-5, rtol=1e-4), name
    assert single_tok > 2.5 * packed_tok                  # what packing saves
    with torch.no_grad():                                # scoring (one prompt per sample) agrees with the pack
        lg = recicl.blocks_logits(m, [bp.sequence(run, whole_blocks=True)], ans)
        scores = recicl.score(m, bp, run, ans, batch_size=3)
    assert np.allclose((lg[:, 0] - lg[:, 1]).numpy(), scores, atol=1e-4)


def test_a_blocks_prompt_reads_its_demonstrations_as_a_set(setup_dirs):
    """In the blocks layout a demonstration's block is encoded alone: reordering the
    demonstrations leaves the score unchanged, changing a demonstration's answer changes it,
    and the query's body does not see the demonstrations (only its cue does)."""
    model_dir, ds, _ = setup_dirs
    m, tok = generate.load_model(model_dir, plain=True)
    d = data.load(ds, verbose=False)
    samples = data.recicl_samples(d, k_demos=4)
    bp = recicl.BlockPrompter(d, samples, tok, 4, 3, m.args.max_seq_len)
    ans = recicl.answer_ids(tok)
    s = next(x for x in samples if len(x.demo_idx) == 4)
    q = bp.sequence([s], whole_blocks=False)
    body = (q["kind"] == recicl.BODY) & (q["owner"] == q["owner"][-1])
    assert not q["mask"][body][:, ~body].any()                       # the query's body reads only itself
    with torch.no_grad():
        base = recicl.score(m, bp, [s], ans)[0]
        s.demo_idx[:] = s.demo_idx[::-1]
        assert abs(recicl.score(m, bp, [s], ans)[0] - base) < 1e-4
        flipped = samples[s.demo_idx[0]]
        flipped.label = 1 - flipped.label
        bp._parts.clear()
        assert abs(recicl.score(m, bp, [s], ans)[0] - base) > 1e-4


def test_blocks_layout_trains_packed_and_eval_checks_the_layout(setup_dirs):
    model, ds, out = setup_dirs
    small = ["--train-samples", "12", "--val-samples", "4", "--steps", "2", "--save-every", "1", "--layout", "blocks",
             "--pack", "3", "--demos", "2"]
    recicl.main(["train"] + common(model, ds, out) + small)
    cfg = json.load(open(os.path.join(out, "icl", "config.json")))
    assert cfg["train_samples"] == 12 and cfg["examples"] >= 4 and cfg["train"]["batch_size"] == 1
    recicl.main(["eval", "--eval-samples", "6", "--rows-per-user", "3", "--methods", "recicl"] + common(model, ds, out) + small)
    res = json.load(open(os.path.join(out, "results.json")))
    assert {r["method"] for r in res["rows"] if r["kind"] == "llm"} == {"RecICL"}      # --methods: only that row
    recicl_rows = [r for r in res["rows"] if r["method"] == "RecICL"]
    assert len(recicl_rows) == 5 and all(r["demos_shown"] == r["demos_available"] for r in recicl_rows)
    with pytest.raises(SystemExit, match="tuned with --layout blocks; this run has --layout causal"):
        recicl.main(["eval", "--eval-samples", "6", "--demos", "2"] + common(model, ds, out))


def test_methods_flag_names_its_choices():
    assert recicl.method_keys("recicl, zero-shot") == ["recicl", "zero-shot"]
    with pytest.raises(Exception, match="unknown method 'recicll'; choose from zero-shot"):
        recicl.method_keys("recicl,recicll")


def test_full_fine_tuning_trains_saves_and_evaluates_a_whole_model(setup_dirs):
    """--full: best/ holds a whole HF-layout model (no adapter), and eval scores with it."""
    model, ds, out = setup_dirs
    small = ["--train-samples", "6", "--val-samples", "4", "--steps", "2", "--batch-size", "2", "--full", "--lr", "1e-3"]
    recicl.main(["train"] + common(model, ds, out) + small)
    best = os.path.join(out, "icl", "best")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(best))
    assert not os.path.exists(os.path.join(best, "adapter_config.json"))
    tuned = llama.load(best)
    base = llama.load(model)
    assert not torch.equal(tuned.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)
    recicl.main(["eval", "--eval-samples", "6", "--rows-per-user", "3", "--methods", "recicl"] + common(model, ds, out) + small)
    res = json.load(open(os.path.join(out, "results.json")))
    assert len([r for r in res["rows"] if r["method"] == "RecICL"]) == 5


def write_tiny_plays(path, n_users=8, n_items=40, per_user=20, seed=2):
    """An implicit-feedback log (user, artist, time; no ratings) and a titles file."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "plays.csv"), "w") as f:
        f.write("user,artist,time\n")
        for u in range(n_users):
            for i in rng.choice(n_items, per_user, replace=False):
                f.write(f"u{u},{i},{rng.integers(1000, 5000)}\n")
    with open(os.path.join(path, "artists.tsv"), "w") as f:
        f.write("artist\tname\n" + "".join(f"{i}\tArtist {i}\n" for i in range(n_items)))
    return ["--dataset", os.path.join(path, "plays.csv"), "--format", "csv", "--columns", "user=user,item=artist,time=time,title=name",
            "--titles", os.path.join(path, "artists.tsv"), "--item-noun", "artist"]


def test_prompts_name_the_data_sets_items():
    books = data.words_for("book")
    text = recicl.system_line(books) + recicl.block(["Emma"], "Dune", 1, books)
    assert "books" in text and "book titled" in text and "movie" not in text
    plays = data.words_for("artist", implicit=True)
    assert recicl.block(["Enigma"], "Morcheeba", w=plays).startswith('A user has listened to the following artists: "Enigma".')
    assert "the artists the user listened to before" in recicl.system_line(plays)
    assert recicl.system_line() + recicl.block([], "Heat") == (
        "Predict whether the user will enjoy the movie, from the movies the user rated highly before.\n\n"
        'A user has given high ratings to the following movies: none yet. Leverage this to predict whether the user would '
        'enjoy the movie titled "Heat". Answer with "Yes" or "No".\nAnswer:')


def test_implicit_feedback_trains_and_evaluates_with_sampled_negatives(tmp_path, capsys):
    """An interactions CSV without ratings: every interaction a Yes, one sampled No each (said so);
    the prompts speak of artists; train and eval run."""
    from conftest import make_tiny_dir
    make_tiny_dir(tmp_path / "tiny", tie=True, max_position_embeddings=1024)
    args = write_tiny_plays(tmp_path / "plays") + ["--model", str(tmp_path / "tiny"), "--out", str(tmp_path / "out"),
                                                   "--prompt-budget", "600"]
    small = ["--train-samples", "8", "--val-samples", "4", "--steps", "2", "--batch-size", "2"]
    recicl.main(["train"] + args + small)
    assert "implicit feedback: every interaction is a Yes, and 1 untouched artist(s)" in capsys.readouterr().err
    recicl.main(["eval", "--eval-samples", "10", "--rows-per-user", "5", "--methods", "recicl"] + args + small)
    res = json.load(open(tmp_path / "out" / "results.json"))
    rows = [r for r in res["rows"] if r["method"] == "RecICL"]
    assert len(rows) == 5 and all(0 <= r["auc"] <= 1 for r in rows)          # both classes in every period


def test_chat_wrapping_scores_the_same_through_the_shared_prefix(setup_dirs):
    """--chat: Prompter.encode wraps the prompt in ChatML turns (the answer opens the assistant's
    turn, so the answer ids are 'Yes'/'No'); recommend's shared-prefix path, cut inside the user
    turn, scores each candidate as the whole wrapped prompt scored alone."""
    from conftest import write_byte_tokenizer
    from tokenizer import ChatML, chat_format
    model_dir, ds, _ = setup_dirs
    write_byte_tokenizer(os.path.join(model_dir, "tokenizer.json"), chat=True)
    m, tok = generate.load_model(model_dir, plain=True)
    assert chat_format(model_dir, tok) is None                     # no chat template in this checkpoint
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"}, f)
    chat = chat_format(model_dir, tok)
    assert isinstance(chat, ChatML) and chat.default_system is None
    d, samples, _, _ = tiny_prompter(model_dir, ds, prompt_budget=1000)
    pr = recicl.Prompter(d, samples, tok, 4, 3, 1000, chat)
    ans = recicl.answer_ids(tok, chat=True)
    assert ans == [tok.encode("Yes", bos=False)[0], tok.encode("No", bos=False)[0]] != recicl.answer_ids(tok)
    s = next(x for x in samples if len(x.demo_idx) >= 2)
    ids = pr.ids(s)
    assert ids[0] == chat.start and ids[-len(chat.answer_prefix()):] == chat.answer_prefix()
    assert tok.decode(ids).startswith("<|im_start|>system\nPredict whether") and "<|im_start|>user\n" in tok.decode(ids)
    history = [(int(i), float(r)) for i, r in zip(d.items[d.users == 0], d.ratings[d.users == 0])]
    cands = list(range(5))
    ranked = dict(recicl.rank_for_user(m, tok, pr, d, history, cands, ans, k_demos=1, threshold=4.0, batch_size=2))
    liked = [i for i, r in history if r >= 4][-10:]
    i, r = history[-1]
    demo = data.Sample(-1, -1, i, int(r >= 4), 0, 0, [x for x, rr in history[:-1] if rr >= 4][-10:], [])
    for c in cands:
        text = recicl.system_line() + pr.demo_text(demo) + recicl.block([d.titles[i] for i in liked], d.titles[c])
        with torch.no_grad():
            lg = recicl.yes_no_logits(m, [pr.encode(text)], ans)[0]
        assert abs((lg[0] - lg[1]).item() - ranked[c]) < 1e-4


def test_chat_is_on_by_default_where_the_checkpoint_has_a_chatml_template(setup_dirs):
    """--chat auto: on with a ChatML template in tokenizer_config.json, off without one or where
    the run cannot use it (--layout blocks); --chat on says why it cannot be."""
    from conftest import write_byte_tokenizer
    model_dir, _, _ = setup_dirs
    write_byte_tokenizer(os.path.join(model_dir, "tokenizer.json"), chat=True)
    _, tok = generate.load_model(model_dir, plain=True)
    assert generate.use_chat("auto", model_dir, tok) is False and generate.use_chat("off", model_dir, tok) is False
    with pytest.raises(ValueError, match="no chat template iclrec can render"):
        generate.use_chat("on", model_dir, tok)
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"}, f)
    assert generate.use_chat("auto", model_dir, tok) is True and generate.use_chat("on", model_dir, tok) is True
    assert generate.use_chat("off", model_dir, tok) is False and generate.use_chat(True, model_dir, tok) is True
    assert generate.use_chat("auto", model_dir, tok, why_not="blocks") is False
    with pytest.raises(ValueError, match="--chat: blocks"):
        generate.use_chat("on", model_dir, tok, why_not="blocks")
    p = argparse.ArgumentParser()
    generate.add_chat_arg(p, "x")
    assert [p.parse_args(v).chat for v in ([], ["--chat"], ["--chat", "off"])] == ["auto", "on", "off"]


def test_an_adapter_is_scored_as_it_was_tuned(tmp_path):
    run = tmp_path / "icl"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"args": {"layout": "causal", "chat": True}}))
    same = {"--layout": ("causal", "causal"), "--chat": (True, False)}
    trainer.check_tuned_like(str(run), same)
    with pytest.raises(ValueError, match="was tuned with --chat True; this run has --chat False"):
        trainer.check_tuned_like(str(run), {**same, "--chat": (False, False)})
    with pytest.raises(ValueError, match="tuned with --layout causal; this run has --layout blocks"):
        trainer.check_tuned_like(str(run), {**same, "--layout": ("blocks", "causal")})
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a run's config.json"):
        trainer.check_tuned_like(str(run), same)
    (run / "config.json").write_text(json.dumps({"args": {}}))          # written before the flags existed
    trainer.check_tuned_like(str(run), {"--layout": ("causal", "causal"), "--chat": (False, False)})
