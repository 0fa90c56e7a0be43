"""AdaptRec: sequential recommendation with demonstrations from similar users (arXiv 2504.08786).

    python adaptrec.py train                  # LoRA-tune on prompts with M = 5 selected demonstrations
    python adaptrec.py eval                   # generation HR@1 / ValidRatio, likelihood HR@k / NDCG@5
    python adaptrec.py recommend --user 42    # retrieved users, selected demonstrations, answer

Task (LLaRA's setting, see ../shared/notes/adaptrec.md): given a user's last <= 10 items, name
the next one among 20 candidates (the true item and 19 the user never touched, fixed per row
by data.sequential_rows).

Stage 1, user similarity retrieval. Every user sequence becomes one vector: its titles joined
into one string, run through the base LLM, final hidden states mean-pooled over the tokens.
The pool holds one unit per user: the end of the user's training part (every interaction but
the last two, which are the valid and test targets), shown as "history -> chose X next". A
query at time t may only retrieve units that end strictly before t (nothing at or after the
query's time, and no valid or test item of anyone), never its own user. Top N (10) by cosine,
computed by chunked matrix products with a running top-N, so memory is bounded by the chunk
sizes, not the number of users. Vectors are cached on disk per model.

Stage 2, self-adaptive selection. The base LLM reads the target history and one retrieved
history and is asked for a similarity from 1 to 9; instead of parsing text we read its
distribution over the nine digit tokens and take the expected rating. The M (5) best are kept,
ties in stage-1 order. Each user pair is one continuation of a shared prefix (the target's
history), all N in one batch. Judgements are cached on disk per row. `--select embed` keeps
the stage-1 order, `--select random` draws M eligible users at random (the "no retrieval"
ablation). The judge is the untuned base model (the public code refreshes it from the adapter
in training; we keep it fixed so that train and eval see the same selections).

Stage 3, recommendation. The prompt: a system line, one line per selected user ("Similar user
k has watched A, B, C. Based on this, they chose X next.", the least similar first so that the
budget drops it first and the most similar stands next to the query), then the target's history
and the candidates, then "Answer:". LoRA is tuned on ' "<true title>"' + end-of-sequence, with
the loss on those tokens only. Eval: greedy generation (at most 64 new tokens, first line),
ValidRatio (the line names exactly one candidate) and HR@1 = hits over ALL rows; and a ranking
of the 20 candidates by the model's log-probability of ' "<title>"' + EOS after the prompt
(one shared prefix, model.continuation_logprobs): HR@1, HR@5, NDCG@5, ties against the target.

CPU defaults (2 cores, SmolLM2-135M; train + eval within 30 minutes together, measured in the
README): 64 training rows for 1 epoch (16 steps of 4, lr 1e-3; in the earlier 2-epoch run the
loss had flattened by step 15), LoRA r 16 on q/v, demonstrations that show 3 history items, the
judge shown each retrieved user's last 5 items, 80 test rows, configurations M = 0 and M = 5
with llm / embed / random selection. Where the time goes, per row on that machine: a ~700-token
prompt prefill 1.3 s, ranking 20 candidates 1.1 s, generation 0.3 s, a stage-2 judgement 1.7 s;
plus 3.3 min for the pool's vectors (first run only) and 2.5 min for SASRec.
Flags take every part to the paper's size (--train-rows 0, --demo-history 10,
--lora-targets with all seven projections, --eval-rows 0, --configs with M = 1, 3, 7).
"""
import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

import data as D
import eval as E
import lora
import model as M
import train as T

SYSTEM = ("Recommend the movie the user will watch next. Answer with exactly one title from the "
          "candidates and nothing else.\n\n")
JUDGE_SYSTEM = ("Compare the movie tastes of two users from the movies they watched. Rate how similar the tastes "
                "of user A and user B are, from 1 (not at all) to 9 (the same).\n\n")
JUDGE_QUESTION = "How similar, from 1 to 9? Answer:"   # short: it is repeated in each of the N continuations
SELECTIONS = ("llm", "embed", "random")


def log_fn(s):
    print(s, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the pool

@dataclass
class Pool:
    """One retrievable unit per user: the end of the user's training part."""
    users: np.ndarray    # (U,) user index
    items: list          # U lists of item indices, oldest first; the last one is "what they chose next"
    end_ts: np.ndarray   # (U,) time of the last item (every item of the unit is at or before it)


def build_pool(d: D.Data, max_items: int = 11, min_items: int = 4) -> Pool:
    """Each user's interactions without the last two (valid and test targets), cut to the last
    `max_items`; users with fewer than `min_items` there are left out."""
    seqs = defaultdict(list)
    for j in range(len(d)):                         # d is in time order
        seqs[int(d.users[j])].append(j)
    users, items, end = [], [], []
    for u, js in sorted(seqs.items()):
        part = js[:-2][-max_items:]
        if len(part) >= min_items:
            users.append(u)
            items.append([int(d.items[j]) for j in part])
            end.append(int(d.ts[part[-1]]))
    return Pool(np.array(users, dtype=np.int64), items, np.array(end, dtype=np.int64))


def row_key(r: D.SeqRow) -> str:
    return f"{r.user}:{r.ts}:{r.target}"


# ----------------------------------------------------------------------------- stage 1: vectors and retrieval

def seq_text(d: D.Data, items: list) -> str:
    return D.quoted_list(d.titles[i] for i in items)


def model_key(model: M.Llama) -> str:
    """A fingerprint of the weights (config and a few tensors), for the on-disk caches."""
    h = hashlib.sha1(json.dumps(model.args.__dict__, sort_keys=True, default=str).encode())
    for t in (model.model.embed_tokens.weight[:64], model.model.norm.weight, model.model.layers[-1].mlp.down_proj.weight[:4]):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def embed_texts(model: M.Llama, tok: M.Tokenizer, texts: list, batch_size: int = 16, log=None) -> torch.Tensor:
    """(n, D) fp32: each text's final hidden states (after the last norm) averaged over its tokens.
    Batches are formed in order of length (little padding); padding is excluded from the mean."""
    ids = [tok.encode(t) for t in texts]
    order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
    out = torch.zeros(len(ids), model.args.dim)
    t0 = time.time()
    for n, s in enumerate(range(0, len(order), batch_size)):
        chunk = order[s:s + batch_size]
        idx, valid = M.pad([ids[k] for k in chunk], left=False, device=M.model_device(model))
        h = model(idx, valid).float()                                            # (b, T, D)
        w = valid[..., None].float()
        out[chunk] = ((h * w).sum(1) / w.sum(1)).cpu()
        if log and n % 20 == 0:
            log(f"[adaptrec] embedded {min(s + batch_size, len(ids))}/{len(ids)} sequences ({time.time() - t0:.0f}s)")
    return out


class VectorCache:
    """text -> vector, for one model, in a torch file written atomically after each fill."""

    def __init__(self, path: str, key: str):
        self.path, self.key, self.vecs = path, key, {}
        if os.path.exists(path):
            try:
                saved = torch.load(path, weights_only=True)
            except Exception as e:
                raise ValueError(f"{path}: unreadable vector cache ({e}); delete it to recompute") from None
            if saved.get("model") == key:
                self.vecs = dict(zip(saved["texts"], saved["vecs"]))

    def get(self, model, tok, texts: list, log=None) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self.vecs))
        if missing:
            if log:
                log(f"[adaptrec] stage 1: embedding {len(missing)} sequences ({len(texts) - len(missing)} cached)")
            self.vecs.update(zip(missing, embed_texts(model, tok, missing, log=log)))
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            T.atomic_torch_save({"model": self.key, "texts": list(self.vecs), "vecs": torch.stack(list(self.vecs.values()))},
                                self.path)
        return torch.stack([self.vecs[t] for t in texts]) if texts else torch.zeros(0, model.args.dim)


def cosine_top_n(queries: torch.Tensor, keys: torch.Tensor, n: int, query_users, key_users, query_ts, key_end_ts,
                 q_chunk: int = 1024, k_chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the n keys of highest cosine similarity among the allowed ones: a key is
    allowed iff it belongs to another user and ends strictly before the query's time.
    queries (Q, D), keys (K, D); returns (Q, n) key indices (-1 where fewer are allowed) and
    similarities, best first. Memory: one (q_chunk, k_chunk) block at a time."""
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    k = torch.nn.functional.normalize(keys.float(), dim=1)
    qu, qt = torch.as_tensor(query_users), torch.as_tensor(query_ts)
    ku, kt = torch.as_tensor(key_users), torch.as_tensor(key_end_ts)
    idx_out = torch.full((len(q), n), -1, dtype=torch.long)
    sim_out = torch.full((len(q), n), -float("inf"))
    for qs in range(0, len(q), q_chunk):
        best_s = torch.full((min(q_chunk, len(q) - qs), n), -float("inf"))
        best_i = torch.full_like(best_s, -1, dtype=torch.long)
        for ks in range(0, len(k), k_chunk):
            s = q[qs:qs + q_chunk] @ k[ks:ks + k_chunk].T                                  # (qc, kc)
            banned = (ku[None, ks:ks + k_chunk] == qu[qs:qs + q_chunk, None]) | \
                     (kt[None, ks:ks + k_chunk] >= qt[qs:qs + q_chunk, None])
            s = s.masked_fill(banned, -float("inf"))
            cand_s = torch.cat([best_s, s], 1)
            cand_i = torch.cat([best_i, torch.arange(ks, ks + s.shape[1]).expand(len(s), -1)], 1)
            best_s, top = cand_s.topk(n, dim=1)
            best_i = cand_i.gather(1, top)
        best_i[best_s == -float("inf")] = -1
        idx_out[qs:qs + q_chunk], sim_out[qs:qs + q_chunk] = best_i, best_s
    return idx_out, sim_out


class Retriever:
    """Stage 1 for a set of rows: pool vectors (cached), query vectors, top-N per row."""

    def __init__(self, d, pool, model, tok, cache: VectorCache, n: int, log=None):
        self.d, self.pool, self.n = d, pool, n
        self.model, self.tok, self.cache, self.log = model, tok, cache, log
        self.keys = cache.get(model, tok, [seq_text(d, it[-10:]) for it in pool.items], log)

    def retrieve(self, rows: list) -> dict:
        """row_key -> [(pool index, cosine), ...] best first."""
        if not rows:
            return {}
        qv = self.cache.get(self.model, self.tok, [seq_text(self.d, r.history) for r in rows], self.log)
        idx, sim = cosine_top_n(qv, self.keys, min(self.n, len(self.keys)), [r.user for r in rows],
                                self.pool.users, [r.ts for r in rows], self.pool.end_ts)
        return {row_key(r): [(int(i), float(s)) for i, s in zip(idx[k], sim[k]) if i >= 0] for k, r in enumerate(rows)}


# ----------------------------------------------------------------------------- stage 2: selection

def rating_ids(tok: M.Tokenizer) -> tuple[list, list]:
    """(ids that follow 'Answer:' before the digit, [id of '1', ..., id of '9']). The rating
    must be one token after a common lead-in (e.g. a lone space token), checked here."""
    base = tok.encode("Answer:", bos=False)
    tails = [tok.encode(f"Answer: {k}", bos=False)[len(base):] for k in range(1, 10)]
    lead = tails[0][:-1]
    if any(t[:-1] != lead for t in tails) or len({t[-1] for t in tails}) != 9 or \
            any(tok.encode(f"Answer: {k}", bos=False)[:len(base)] != base for k in range(1, 10)):
        raise ValueError("this tokenizer does not write the ratings 1..9 after 'Answer:' as one distinct token each")
    return lead, [t[-1] for t in tails]


@torch.no_grad()
def judge(model, tok, d, history: list, others: list, digits: tuple, batch_size: int = 16) -> list:
    """Expected similarity rating (1..9) of the target history against each other sequence."""
    lead, digit_ids = digits
    prefix = tok.encode(JUDGE_SYSTEM + f"User A has watched {seq_text(d, history)}.\n")
    conts = [tok.encode(f"User B has watched {seq_text(d, o)}.\n{JUDGE_QUESTION}", bos=False) + lead for o in others]
    p = torch.softmax(M.next_token_logits(model, conts, prefix=prefix, batch_size=batch_size, vocab_ids=digit_ids), -1)
    return (p @ torch.arange(1, 10, dtype=torch.float32)).tolist()


class Selector:
    """Stage 2 over stage 1's lists; the LLM's ratings are cached in a JSON file per model."""

    def __init__(self, d, pool, model, tok, path: str, key: str, judge_history: int = 5, log=None):
        self.d, self.pool, self.model, self.tok, self.path, self.log = d, pool, model, tok, path, log
        self.key, self.judge_history, self.digits = key, judge_history, rating_ids(tok)
        self.scores = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
            except ValueError as e:
                raise ValueError(f"{path}: unreadable judge cache ({e}); delete it to judge again") from None
            if saved.get("model") == self.key:
                self.scores = saved["rows"]

    def save(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        T.write_json({"model": self.key, "rows": self.scores}, self.path)

    def rate(self, rows: list, retrieved: dict):
        """Fill the LLM ratings of every row's retrieved users (pool indices), skipping cached ones."""
        todo = [r for r in rows if self.scores.get(row_key(r), {}).get("pool") != [p for p, _ in retrieved[row_key(r)]]]
        t0 = time.time()
        for n, r in enumerate(todo):
            pool_ix = [p for p, _ in retrieved[row_key(r)]]
            others = [self.pool.items[p][-self.judge_history:] for p in pool_ix]
            s = judge(self.model, self.tok, self.d, r.history, others, self.digits) if others else []
            self.scores[row_key(r)] = {"pool": pool_ix, "rating": [round(x, 4) for x in s]}
            if n % 20 == 19 or n == len(todo) - 1:
                self.save()
                if self.log:
                    self.log(f"[adaptrec] stage 2: judged {n + 1}/{len(todo)} rows ({time.time() - t0:.0f}s)")

    def select(self, r: D.SeqRow, retrieved: dict, m: int, how: str, seed: int = 0) -> list:
        """Pool indices of the m demonstrations of row r, most similar first."""
        if m == 0:
            return []
        ranked = [p for p, _ in retrieved[row_key(r)]]
        if how == "embed":
            return ranked[:m]
        if how == "llm":
            rating = self.scores[row_key(r)]["rating"]
            order = sorted(range(len(ranked)), key=lambda k: (-rating[k], k))   # ties: stage-1 order
            return [ranked[k] for k in order[:m]]
        if how == "random":
            allowed = np.flatnonzero((self.pool.users != r.user) & (self.pool.end_ts < r.ts))
            rng = np.random.default_rng([seed, r.user, r.ts])
            return [int(p) for p in rng.choice(allowed, min(m, len(allowed)), replace=False)]
        raise ValueError(f"unknown selection {how!r}; one of {SELECTIONS}")

    def disagreement(self, rows: list, retrieved: dict, m: int) -> dict:
        """How often the LLM's choice differs from stage 1's order."""
        sets = [(set(self.select(r, retrieved, m, "llm")), set(self.select(r, retrieved, m, "embed"))) for r in rows]
        tops = [(self.select(r, retrieved, 1, "llm"), self.select(r, retrieved, 1, "embed")) for r in rows]
        n = max(len(rows), 1)
        return {"rows": len(rows), "m": m, "top_m_set_differs": round(sum(a != b for a, b in sets) / n, 4),
                "top_1_differs": round(sum(a != b for a, b in tops) / n, 4),
                "mean_overlap": round(sum(len(a & b) for a, b in sets) / n, 4)}


# ----------------------------------------------------------------------------- stage 3: prompts

def demo_line(k: int, history_titles: list, chosen: str) -> str:
    return f"Similar user {k} has watched {D.quoted_list(history_titles)}. Based on this, they chose {D.quote(chosen)} next.\n"


class Prompter:
    """Renders a row with its demonstrations (pool indices, most similar first) within a budget."""

    def __init__(self, d: D.Data, pool: Pool, tok: M.Tokenizer, demo_history: int, max_len: int):
        self.d, self.pool, self.tok, self.demo_history, self.max_len = d, pool, tok, demo_history, max_len

    def titles(self, items):
        return [self.d.titles[i] for i in items]

    def text(self, demos: list, history: list, candidates: list) -> str:
        """demos: pool indices in display order (user 1 first)."""
        lines = [demo_line(k + 1, self.titles(self.pool.items[p][:-1][-self.demo_history:]), self.d.titles[self.pool.items[p][-1]])
                 for k, p in enumerate(demos)]
        query = (f"This user has watched {D.quoted_list(self.titles(history))}. Recommend one movie from these "
                 f"candidates: {D.quoted_list(self.titles(candidates))}.\nAnswer:")
        return SYSTEM + "".join(lines) + ("\n" if lines else "") + query

    def ids(self, r: D.SeqRow, demos: list) -> list:
        """Prompt ids for row r; the least similar demonstrations go first (and are dropped first)."""
        text, _, _ = D.fit_budget(lambda ds, h: self.text(ds, h, r.candidates), list(reversed(demos)), r.history,
                                  lambda t: len(self.tok.encode(t)), self.max_len)
        return self.tok.encode(text)

    def answer(self, item: int) -> list:
        """' "<title>"' + EOS: the training target and what the ranking scores. Quoted as in the
        candidate list, so the answer's tokens repeat the list's (' "', then the title's tokens)."""
        return self.tok.encode(" " + D.quote(self.d.titles[item]), bos=False) + [self.tok.eos_ids[0]]


# ----------------------------------------------------------------------------- loss and scoring

@dataclass
class Example:
    row: D.SeqRow
    demos: list          # pool indices, most similar first
    ids: list            # prompt ids + answer ids
    n_prompt: int


def make_example(prompter: Prompter, r: D.SeqRow, demos: list) -> Example:
    prompt = prompter.ids(r, demos)
    return Example(r, demos, prompt + prompter.answer(r.target), len(prompt))


def loss_fn(model, batch: list) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the answer tokens (' "<title>"' + EOS) of each example."""
    dev = M.model_device(model)
    idx, valid = M.pad([e.ids[:-1] for e in batch], left=False, device=dev)          # (b, T)
    targets, _ = M.pad([e.ids[1:] for e in batch], left=False, device=dev)
    supervised = torch.zeros_like(valid)
    for b, e in enumerate(batch):
        supervised[b, e.n_prompt - 1:len(e.ids) - 1] = True     # position t predicts token t + 1
    return model.loss(idx, targets, supervised, valid), int(valid.sum())


@torch.inference_mode()
def answer_and_rank(model, tok, prompter: Prompter, rows: list, demos: dict, batch_size: int = 8,
                    max_new_tokens: int = 64, log=None) -> tuple[list, list]:
    """For each row, in one pass over its prompt: the greedy answer (first line of at most
    max_new_tokens new tokens; max_new_tokens 0 = ranking only) and log p(' "<title>"' + EOS | prompt)
    of each candidate, (20,) fp32. Prompts are prefilled in left-padded batches (in order of
    length); each row's 20 answers then attend to its slice of that cache (KVCache.row) before
    the batch decodes from it."""
    prompts = [prompter.ids(r, demos[row_key(r)]) for r in rows]
    order = sorted(range(len(rows)), key=lambda k: len(prompts[k]))
    answers, logprobs, t0 = [None] * len(rows), [None] * len(rows), time.time()
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        cache, logits = M.prefill_batch(model, [prompts[k] for k in chunk], max_new_tokens)
        for b, k in enumerate(chunk):
            logprobs[k] = M.logprobs_after(model, cache.row(b), logits[b], [prompter.answer(c) for c in rows[k].candidates])
        new = M.decode(model, cache, logits, max_new_tokens, stop=["\n"], tokenizer=tok)
        for k, ids in zip(chunk, new):
            answers[k] = tok.decode(ids).strip().split("\n")[0].strip()
        if log:
            log(f"[adaptrec]   {min(s + batch_size, len(rows))}/{len(rows)} rows ({time.time() - t0:.0f}s)")
    return answers, logprobs


def target_ranks(rows: list, logprobs: list) -> np.ndarray:
    """Rank (0 = first, ties against the target) of each row's target by its candidates' log-probs."""
    return np.array([E.rank_of_target(lp.numpy(), r.candidates.index(r.target)) for r, lp in zip(rows, logprobs)])


def evaluate(model, tok, prompter, rows, demos, a, log=None) -> dict:
    """Generation (ValidRatio, HR@1 over all rows) and likelihood ranking (HR@1, HR@5, NDCG@5)."""
    answers, logprobs = answer_and_rank(model, tok, prompter, rows, demos, a.gen_batch, log=log)
    ranks = target_ranks(rows, logprobs)
    matched = [E.match_answer(t, prompter.titles(r.candidates)) for t, r in zip(answers, rows)]
    targets = [r.candidates.index(r.target) for r in rows]
    g = E.hr1_generated(matched, targets)
    hits = np.array([m is not None and m == t for m, t in zip(matched, targets)], dtype=np.float64)
    return {"hr1": round(g["hr1"], 4), "hr1_ci95": ci(np.mean, hits), "valid_ratio": round(g["valid_ratio"], 4),
            "hr1_valid": round(g["hr1_valid"], 4), **rank_metrics(ranks), "n": len(rows),
            "examples": [{"user": prompter.d.user_ids[r.user], "answer": t, "target": prompter.d.titles[r.target]}
                         for t, r in list(zip(answers, rows))[:5]]}


def ci(stat, *arrays) -> list:
    return [round(x, 4) for x in E.bootstrap_ci(stat, *arrays, n_boot=1000)]


def rank_metrics(ranks) -> dict:
    return {"hr1_rank": round(E.hr_at_k(ranks, 1), 4), "hr1_rank_ci95": ci(lambda r: E.hr_at_k(r, 1), ranks),
            "hr5": round(E.hr_at_k(ranks, 5), 4), "ndcg5": round(E.ndcg_at_k(ranks, 5), 4),
            "ndcg5_ci95": ci(lambda r: E.ndcg_at_k(r, 5), ranks)}


# ----------------------------------------------------------------------------- setup

def add_common(p):
    p.add_argument("--model", default=None, help="HF Llama directory (default: SmolLM2-135M-Instruct, fetched once)")
    p.add_argument("--dataset", default=None, help="dataset directory (default: MovieLens-100K)")
    p.add_argument("--format", default=None, choices=sorted(D.READERS))
    p.add_argument("--out", default="runs/adaptrec", help="output directory (default: runs/adaptrec)")
    p.add_argument("--run", default="m5-llm", help="name of the tuned run under OUT (default: m5-llm)")
    p.add_argument("--n", type=int, default=10, help="users retrieved in stage 1 (N)")
    p.add_argument("--demo-history", type=int, default=3, help="history items shown per demonstration (paper: 10)")
    p.add_argument("--judge-history", type=int, default=5, help="last items of each retrieved user shown to the stage-2 judge")
    p.add_argument("--max-len", type=int, default=1024, help="prompt budget in tokens; the least similar demonstrations, then the oldest history items, are dropped to meet it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", type=M.parse_dtype, default=torch.float32)


def data_key(d: D.Data) -> str:
    h = hashlib.sha1(f"{len(d)}:{int(d.ts[0])}:{int(d.ts[-1])}".encode())
    h.update("\n".join(d.titles).encode())
    return h.hexdigest()[:12]


@dataclass
class Setup:
    d: D.Data
    rows: dict
    pool: Pool
    model: M.Llama
    tok: M.Tokenizer
    retriever: Retriever
    selector: Selector
    prompter: Prompter


def setup(a, log) -> Setup:
    d = D.load(a.dataset, a.format)
    rows = D.sequential_rows(d, seed=a.seed)
    pool = build_pool(d, max_items=max(10, a.demo_history) + 1)
    model, tok = M.load(a.model, dtype=a.dtype)
    if a.max_len + 64 > model.args.max_seq_len:
        raise ValueError(f"--max-len {a.max_len} + 64 answer tokens exceeds the model's context of {model.args.max_seq_len}")
    key = f"{model_key(model)}-{data_key(d)}"
    cache = os.path.join(a.out, "cache")
    retriever = Retriever(d, pool, model, tok, VectorCache(os.path.join(cache, f"vectors-{key}.pt"), key), a.n, log)
    selector = Selector(d, pool, model, tok, os.path.join(cache, f"judge-{key}-h{a.judge_history}.json"),
                        key, a.judge_history, log)
    log(f"[adaptrec] {len(rows['train'])} train / {len(rows['valid'])} valid / {len(rows['test'])} test rows; "
        f"pool of {len(pool.users)} users; N={a.n}, budget {a.max_len} tokens")
    return Setup(d, rows, pool, model, tok, retriever, selector, Prompter(d, pool, tok, a.demo_history, a.max_len))


def demo_overlap(pool: Pool, rows: list, demos: dict) -> dict:
    """What the demonstrators have in common with the target user, from item ids alone (no
    LLM): the mean number of the row's history items found in its demonstrators' pool
    sequences, and the share of rows where a demonstrator's sequence holds the row's target."""
    seen = [set(i for p in demos[row_key(r)] for i in pool.items[p]) for r in rows]
    n = max(len(rows), 1)
    return {"demo_history_overlap": round(sum(len(set(r.history) & s) for r, s in zip(rows, seen)) / n, 4),
            "demo_has_target": round(sum(r.target in s for r, s in zip(rows, seen)) / n, 4)}


def demonstrations(s: Setup, rows: list, retrieved: dict, m: int, how: str, seed: int) -> dict:
    """row_key -> pool indices of the row's demonstrations (stage 2 over stage 1's `retrieved`, base model)."""
    if how == "llm" and m > 0:
        s.selector.rate(rows, retrieved)
    return {row_key(r): s.selector.select(r, retrieved, m, how, seed) for r in rows}


# ----------------------------------------------------------------------------- train

def add_train_args(p):
    p.add_argument("--m", type=int, default=5, help="demonstrations per training prompt (M)")
    p.add_argument("--select", default="llm", choices=SELECTIONS, help="stage-2 selection for the training prompts")
    p.add_argument("--train-rows", type=int, default=64, help="training rows drawn from all users' train parts (0 = all)")
    p.add_argument("--val-rows", type=int, default=0, help="validation rows (users' second-last items), ranked at each "
                   "validation to keep the best adapter (0 = no validation: the final adapter is used)")
    p.add_argument("--epochs", type=float, default=1.0)
    T.add_args(p, batch_size=4, lr=1e-3, lora_r=16, lora_dropout=0.0, resume_from="OUT/RUN/checkpoint.pt",
               lr_help="paper: 2e-4 over 5 epochs of the full data; few steps here")


def cmd_train(a):
    t0 = time.time()
    s = setup(a, log_fn)
    rng = random.Random(a.seed)
    train_rows = rng.sample(s.rows["train"], min(a.train_rows, len(s.rows["train"]))) if a.train_rows else s.rows["train"]
    val_rows = rng.sample(s.rows["valid"], min(a.val_rows, len(s.rows["valid"])))
    retrieved = s.retriever.retrieve(train_rows + val_rows)
    demos = demonstrations(s, train_rows + val_rows, retrieved, a.m, a.select, a.seed)
    if a.select == "llm" and a.m:
        dis = s.selector.disagreement(train_rows, retrieved, a.m)
        log_fn(f"[adaptrec] stage 2 vs stage 1 on the training rows: top-{a.m} sets differ on "
               f"{dis['top_m_set_differs']:.1%}, top-1 on {dis['top_1_differs']:.1%}")
    examples = [make_example(s.prompter, r, demos[row_key(r)]) for r in train_rows]
    steps = max(1, round(len(examples) * a.epochs / a.batch_size))
    log_fn(f"[adaptrec] training on {len(examples)} rows (mean {np.mean([len(e.ids) for e in examples]):.0f} tokens, "
           f"M={a.m}, {a.select}), {steps} steps; validating on {len(val_rows)} rows ({time.time() - t0:.0f}s so far)")
    cfg = T.config_from_args(s.model, a, os.path.join(a.out, a.run), steps)
    # validation metric: NDCG@20 of the likelihood ranking (smoother than HR@1 on a few rows)
    validate = (lambda m: E.ndcg_at_k(target_ranks(val_rows, answer_and_rank(m, s.tok, s.prompter, val_rows, demos,
                                                                             max_new_tokens=0)[1]), 20)) if val_rows else None
    summary = T.train(s.model, examples, loss_fn, cfg, validate=validate, resume=a.resume,
                      run_config={"method": "adaptrec", "args": vars(a), "train_rows": len(examples), "val_rows": len(val_rows)},
                      base_model=a.model or "SmolLM2-135M-Instruct")
    T.dist_close()
    log_fn(f"[adaptrec] done in {time.time() - t0:.0f}s; " + (f"best validation NDCG@20 {summary['best']:.4f}; " if val_rows else "")
           + f"adapter in {adapter_dir(a)}")


def adapter_dir(a) -> str:
    """OUT/RUN/best (kept by validation), else OUT/RUN/final."""
    best = os.path.join(a.out, a.run, "best")
    return best if os.path.exists(os.path.join(best, "adapter_config.json")) else os.path.join(a.out, a.run, "final")


# ----------------------------------------------------------------------------- eval

def parse_configs(text: str) -> list:
    """'0,1:llm,5:embed' -> [(0, 'none'), (1, 'llm'), (5, 'embed')]."""
    out = []
    for part in text.split(","):
        m, _, how = part.strip().partition(":")
        if not m.isdigit() or (int(m) > 0 and how not in SELECTIONS) or (int(m) == 0 and how not in ("", "none")):
            raise ValueError(f"--configs: {part!r} is not M:SELECT (SELECT one of {SELECTIONS}) or 0")
        out.append((int(m), how if int(m) else "none"))
    return out


def baseline_rows(s: Setup, rows: list, a, log) -> list:
    """Pop and SASRec (baselines.py) trained on every user's train rows, ranked on these rows."""
    import baselines as B
    n_items = len(s.d.item_ids)
    pop = np.bincount([r.target for r in s.rows["train"]], minlength=n_items).astype(np.float64)
    out = [("Pop", B.candidate_ranks(np.tile(pop, (len(rows), 1)), rows))]
    if a.sasrec_epochs:
        m = B.train_sasrec(n_items, s.rows, seed=a.seed, epochs=a.sasrec_epochs, log=log)
        with torch.no_grad():
            out.append(("SASRec", B.candidate_ranks(m.scores(B.pad_hist(rows, m.max_len)).numpy(), rows)))
    # a baseline's answer is its top candidate: always valid, so generated HR@1 = ranked HR@1
    return [{"method": name, "m": None, "select": None, "hr1": round(E.hr_at_k(r, 1), 4),
             "hr1_ci95": ci(lambda x: E.hr_at_k(x, 1), r), "valid_ratio": 1.0, **rank_metrics(r), "n": len(rows)}
            for name, r in out]


def cmd_eval(a):
    t0 = time.time()
    configs = parse_configs(a.configs)
    s = setup(a, log_fn)
    rng = random.Random(a.seed + 1)
    rows = sorted(rng.sample(s.rows["test"], min(a.eval_rows, len(s.rows["test"]))) if a.eval_rows else s.rows["test"],
                  key=lambda r: r.user)
    retrieved = s.retriever.retrieve(rows)
    demos = {c: demonstrations(s, rows, retrieved, *c, a.seed) for c in configs}
    m_llm = next((m for m, h in configs if h == "llm"), 0)
    agree = s.selector.disagreement(rows, retrieved, m_llm) if m_llm else None
    adapter = adapter_dir(a)
    name = "AdaptRec"
    if a.base:
        name = "base model (untuned)"
    elif os.path.exists(os.path.join(adapter, "adapter_config.json")):
        lora.load_adapter(s.model, adapter)
    else:
        raise FileNotFoundError(f"no adapter in {os.path.join(a.out, a.run)}: run `python adaptrec.py train` first, or pass --base")
    results = []
    for m, how in configs:
        log_fn(f"[adaptrec] {name}, M={m} ({how}): {len(rows)} rows ({time.time() - t0:.0f}s so far)")
        res = evaluate(s.model, s.tok, s.prompter, rows, demos[(m, how)], a, log_fn)
        results.append({"method": name, "m": m, "select": how, **res, **demo_overlap(s.pool, rows, demos[(m, how)])})
        log_fn(f"[adaptrec]   HR@1 {res['hr1']:.4f} (valid {res['valid_ratio']:.3f}), ranked HR@1 {res['hr1_rank']:.4f}, "
               f"NDCG@5 {res['ndcg5']:.4f}")
    results += baseline_rows(s, rows, a, log_fn)
    report(results, agree, a, time.time() - t0)


def report(results: list, agree: dict | None, a, elapsed: float):
    print(f"{'method':<22}{'M':>3} {'select':<7}{'HR@1':>7} {'95% CI':<16}{'Valid':>6}{'rHR@1':>7}{'HR@5':>7}{'NDCG@5':>8}"
          f"{'n':>5}{'shared':>8}{'has-tgt':>8}")
    for r in results:
        demo = f"{r['demo_history_overlap']:>8.2f}{r['demo_has_target']:>8.2f}" if r.get("m") else ""
        print(f"{r['method']:<22}{'' if r['m'] is None else r['m']:>3} {r['select'] or '':<7}{r['hr1']:>7.4f} "
              f"{str(r['hr1_ci95']):<16}{r['valid_ratio']:>6.3f}{r['hr1_rank']:>7.4f}{r['hr5']:>7.4f}{r['ndcg5']:>8.4f}{r['n']:>5}{demo}")
    print("HR@1 and Valid: greedy generation, hits over all rows; rHR@1, HR@5, NDCG@5: ranking by log p(\"title\" + EOS).\n"
          "shared: the row's history items found in its demonstrators' sequences (mean); has-tgt: rows where a "
          "demonstrator's sequence holds the target.")
    if agree:
        print(f"stage 2 vs stage 1 (M={agree['m']}): top-M sets differ on {agree['top_m_set_differs']:.1%} of rows, "
              f"top-1 on {agree['top_1_differs']:.1%}; mean overlap {agree['mean_overlap']:.2f} of {agree['m']}")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results.json")
    T.write_json({"config": vars(a), "elapsed_s": round(elapsed, 1), "selection": agree, "rows": results}, path)
    log_fn(f"[adaptrec] wrote {path} ({elapsed:.0f}s)")


# ----------------------------------------------------------------------------- recommend

def cmd_recommend(a):
    s = setup(a, log_fn)
    if a.user not in s.d.user_ids:
        sys.exit(f"error: unknown user {a.user!r}")
    u = s.d.user_ids.index(a.user)
    row = next((r for r in s.rows["test"] if r.user == u), None)
    if row is None:
        sys.exit(f"error: user {a.user!r} has too short a history for a next-item row")
    retrieved = s.retriever.retrieve([row])
    if a.select == "llm":
        s.selector.rate([row], retrieved)
    chosen = s.selector.select(row, retrieved, a.m, a.select, a.seed)
    rating = dict(zip(s.selector.scores.get(row_key(row), {}).get("pool", []), s.selector.scores.get(row_key(row), {}).get("rating", [])))
    print(f"user {a.user}, history (oldest first): {D.quoted_list(s.prompter.titles(row.history))}")
    print(f"stage 1: {len(retrieved[row_key(row)])} similar users (each shown up to its last item before this user's next one)")
    for p, sim in retrieved[row_key(row)]:
        mark = "*" if p in chosen else " "
        print(f" {mark} user {s.d.user_ids[s.pool.users[p]]:>6}  cosine {sim:.3f}  LLM rating {rating.get(p, float('nan')):.2f}  "
              f"chose {D.quote(s.d.titles[s.pool.items[p][-1]])}")
    print(f"stage 2 ({a.select}): {len(chosen)} demonstrations (*)")
    adapter = adapter_dir(a)
    if os.path.exists(os.path.join(adapter, "adapter_config.json")):
        lora.load_adapter(s.model, adapter)
    else:
        log_fn(f"[adaptrec] no adapter at {adapter}: answering with the base model (run: python adaptrec.py train)")
    demos = {row_key(row): chosen}
    (answer,), (lp,) = answer_and_rank(s.model, s.tok, s.prompter, [row], demos)
    print(f"recommendation (generated): {answer}")
    print("candidates by log p(title):")
    for n, k in enumerate(torch.argsort(lp, descending=True).tolist(), 1):
        c = row.candidates[k]
        print(f"{n:>3}. {lp[k]:8.2f}  {s.d.titles[c]}{'   <- held-out next item' if c == row.target else ''}")


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="AdaptRec: similar-user demonstrations for LLM sequential recommendation "
                                "(arXiv 2504.08786).")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="LoRA-tune on prompts with M selected demonstrations; keeps the best adapter")
    add_common(t)
    add_train_args(t)
    e = sub.add_parser("eval", help="generation and likelihood-ranking metrics per (M, selection), plus baselines")
    add_common(e)
    e.add_argument("--configs", default="0,5:llm,5:embed,5:random",
                   help="comma-separated M:SELECT (0 = no demonstrations); the full ablation: "
                   "0,1:llm,3:llm,5:llm,7:llm,5:embed,5:random")
    e.add_argument("--eval-rows", type=int, default=80, help="test rows (one per user, drawn at random; 0 = all)")
    e.add_argument("--gen-batch", type=int, default=8, help="prompts per generation batch")
    e.add_argument("--sasrec-epochs", type=int, default=10, help="SASRec epochs at most, early-stopped on the valid "
                   "rows (0 = Pop only; baselines.py uses 30)")
    e.add_argument("--base", action="store_true", help="evaluate the untuned base model instead of OUT/RUN's adapter")
    r = sub.add_parser("recommend", help="show retrieval, selection and the recommendation for one user's next item")
    add_common(r)
    r.add_argument("--user", required=True, help="user id as in the dataset")
    r.add_argument("--m", type=int, default=5)
    r.add_argument("--select", default="llm", choices=SELECTIONS)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    try:
        {"train": cmd_train, "eval": cmd_eval, "recommend": cmd_recommend}[a.cmd](a)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
