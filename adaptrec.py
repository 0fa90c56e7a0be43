"""AdaptRec: sequential recommendation with demonstrations from similar users (arXiv 2504.08786).

    python adaptrec.py train                  # one LoRA adapter per configuration: M = 0, and M = 5 chosen by the LLM
    python adaptrec.py eval                   # generation HR@1 / ValidRatio, likelihood HR@k / NDCG@5
    python adaptrec.py recommend --user 42    # retrieved users, selected demonstrations, answer

Task (LLaRA's setting, arXiv 2312.02445): given a user's last <= 10 items, name
the next one among 20 candidates (the true item and 19 the user never touched, fixed per row
by data.sequential_rows).

Stage 1, user similarity retrieval. A query is the row's history at its time t; the pool holds
every other user's interactions strictly before t (their training part, never their valid or
test item), cut there: a "unit", shown as "history -> chose X next". Each title is run through
the base LLM alone and its final hidden states mean-pooled; a sequence's vector is the mean of
its last 10 titles' vectors (the paper embeds the joined titles at once; per-title vectors give
every user's vector at any cut time from prefix sums, so the cut is exact and costs nothing).
Top N (10) other users by cosine, among those with at least 4 items before t. Title vectors are
cached on disk per model.

Stage 2, self-adaptive selection. The base LLM reads the target history and one retrieved
history and is asked for a similarity from 1 to 9; instead of parsing text we read its
distribution over the nine digit tokens and take the expected rating. The M (5) best are kept,
ties in stage-1 order. Each user pair is one continuation of a shared prefix (the target's
history), all N in one batch. Judgements are cached on disk per row, model, data and prompt
templates (prompt_key). Selections (`--configs M:SELECT`): `llm`, the untuned base model judges,
once, so train and eval see the same judge; `self`, the paper's self-adaptive selection, the
adapter being tuned judges (SelfJudge: every --judge-refresh steps its current weights rate the
rows of the coming steps; at eval the kept adapter rates the test rows; the public code
refreshes its judge from the adapter every 1,000 batches); `embed` keeps the stage-1 order;
`random` draws M eligible users at random (the "no retrieval" ablation).

Stage 3, recommendation. The prompt: a system line, one line per selected user ("Similar user
k has watched A, B, C. Based on this, they chose X next.", the least similar first so that the
budget drops it first and the most similar stands next to the query), then the target's history
and the candidates, then "Answer:". LoRA is tuned on ' "<true title>"' + end-of-sequence, with
the loss on those tokens only. Eval: greedy generation (at most 64 new tokens, first line),
ValidRatio (the line names exactly one candidate) and HR@1 = hits over ALL rows; and a ranking
of the 20 candidates by the model's log-probability of ' "<title>"' + EOS after the prompt
(one shared prefix, generate.logprobs_after; `--score mean` divides it by the answer's token
count): HR@1, HR@5, NDCG@5, ties against the target.

Every configuration (M, selection) is its own adapter, tuned with the same settings on the same
rows: `train --configs 0,5:llm` (the default) tunes OUT/m0 and OUT/m5-llm, and `eval --configs`
evaluates each with its own. Eval sets them beside controls on the same rows: Pop (t) (items
taken by anyone before the row's time), DemoVote (candidates ranked by how many of the shown
demonstrations hold them, ties by Pop (t)), TitlePrior (the base model's log p of each title
with no user in the prompt), and the leave-one-out Pop and SASRec; each LLM row gets its ranked
HR@1 and NDCG@5 minus the best control's, with a paired bootstrap interval. An analysis row per
adapter mixes its ranking with the best control's (mixed_ranks: a weighted Borda count, each
row's weight chosen on the other rows): above the control alone, the LLM adds something to it.

CPU defaults (2 cores, SmolLM2-135M): 64 training rows for 1 epoch (16 steps of 4, lr 1e-3),
LoRA r 16 on q/v, demonstrations that show 3 history items, the judge shown each retrieved
user's last 5 items, 80 test rows. Flags take every part to the paper's size (--train-rows 0,
--demo-history 10, --lora-targets with all seven projections, --eval-rows 0, --configs with
M = 1, 3, 7).
"""
import argparse
import bisect
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

import data
import eval as metrics
import generate
import model as llama
from tokenizer import ChatML, Tokenizer
import train as trainer
from fetch import atomic_path, sha256, write_json, write_results

# Templates: {item}, {items}, {do}, {did}, {done} are the data set's words (data.Words).
SYSTEM = ("Recommend the {item} the user will {do} next. Answer with exactly one title from the "
          "candidates and nothing else.\n\n")
JUDGE_SYSTEM = ("Compare the {item} tastes of two users from the {items} they {did}. Rate how similar the tastes "
                "of user A and user B are, from 1 (not at all) to 9 (the same).\n\n")
JUDGE_QUESTION = "How similar, from 1 to 9? Answer:"   # short: it is repeated in each of the N continuations
SELECTIONS = ("llm", "self", "embed", "random")


def log_fn(s):
    print(s, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the pool

@dataclass
class Pool:
    """Every user's training part (all interactions but the last two, which are the valid and
    test targets), oldest first. A unit (p, end) is pool user p's first `end` items: a
    demonstration shows it as "history -> chose items[end - 1] next". Retrieval for a query at
    time t takes from each other user the unit of everything that user did strictly before t."""
    users: np.ndarray    # (U,) user index
    items: list          # U lists of item indices, oldest first
    ts: list             # U lists of their timestamps

    def ends_before(self, t: int) -> np.ndarray:
        """(U,) for each pool user, how many of their items are strictly before time t."""
        return np.array([bisect.bisect_left(ts, t) for ts in self.ts], dtype=np.int64)

    def unit(self, unit: tuple) -> list:
        p, end = unit
        return self.items[p][:end]


def build_pool(d: data.Data) -> Pool:
    seqs = defaultdict(list)
    for j in range(len(d)):                         # d is in time order
        seqs[int(d.users[j])].append(j)
    users, items, ts = [], [], []
    for u, js in sorted(seqs.items()):
        if len(js) > 2:
            users.append(u)
            items.append([int(d.items[j]) for j in js[:-2]])
            ts.append([int(d.ts[j]) for j in js[:-2]])
    return Pool(np.array(users, dtype=np.int64), items, ts)


def row_key(r: data.SeqRow) -> str:
    return f"{r.user}:{r.ts}:{r.target}"


# ----------------------------------------------------------------------------- stage 1: vectors and retrieval

def seq_text(d: data.Data, items: list) -> str:
    return data.quoted_list(d.titles[i] for i in items)


def model_key(model: llama.Llama) -> str:
    """A fingerprint of the weights (config and a few tensors), for the on-disk caches."""
    h = hashlib.sha1(json.dumps(model.args.__dict__, sort_keys=True, default=str).encode())
    for t in (model.model.embed_tokens.weight[:64], model.model.norm.weight, model.model.layers[-1].mlp.down_proj.weight[:4]):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def embed_texts(model: llama.Llama, tok: Tokenizer, texts: list, batch_size: int = 16, log=None) -> torch.Tensor:
    """(n, D) fp32: each text's final hidden states (after the last norm) averaged over its tokens.
    Batches are formed in order of length (little padding); padding is excluded from the mean."""
    ids = [tok.encode(t) for t in texts]
    order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
    out = torch.zeros(len(ids), model.args.dim)
    t0 = time.time()
    for n, s in enumerate(range(0, len(order), batch_size)):
        chunk = order[s:s + batch_size]
        idx, valid = generate.pad([ids[k] for k in chunk], left=False, device=generate.model_device(model))
        h = model(idx, valid).float()                                            # (b, T, D)
        w = valid[..., None].float()
        out[chunk] = ((h * w).sum(1) / w.sum(1)).cpu()
        if log and n % 20 == 0:
            log(f"[adaptrec] embedded {min(s + batch_size, len(ids))}/{len(ids)} texts ({time.time() - t0:.0f}s)")
    return out


class VectorCache:
    """text -> vector, for one model, in a safetensors file (the texts and the model key in its
    metadata), rewritten atomically after each fill."""

    def __init__(self, path: str, key: str):
        self.path, self.key, self.vecs = path, key, {}
        if os.path.exists(path):
            try:
                meta = {}
                vecs = dict(llama.read_safetensors(path, meta))["vecs"]
                texts = json.loads(meta["texts"])
                if not isinstance(texts, list) or vecs.dim() != 2 or len(texts) != len(vecs):
                    raise ValueError(f"{len(texts)} texts for vectors of shape {tuple(vecs.shape)}")
                if not torch.isfinite(vecs).all():
                    raise ValueError("NaN or infinite vectors")
            except Exception as e:
                raise ValueError(f"{path}: unreadable vector cache ({e}); delete it to recompute") from None
            if meta.get("model") == key:
                self.vecs = dict(zip(texts, vecs))

    def get(self, model, tok, texts: list, log=None) -> torch.Tensor:
        from safetensors.torch import save_file
        if self.vecs and next(iter(self.vecs.values())).shape[-1] != model.args.dim:
            raise ValueError(f"{self.path}: its vectors are not {model.args.dim} wide like the model's; delete it to "
                             "recompute")
        missing = list(dict.fromkeys(t for t in texts if t not in self.vecs))
        if missing:
            if log:
                log(f"[adaptrec] stage 1: embedding {len(missing)} texts ({len(texts) - len(missing)} cached)")
            self.vecs.update(zip(missing, embed_texts(model, tok, missing, log=log)))
            with atomic_path(self.path) as tmp:
                save_file({"vecs": torch.stack(list(self.vecs.values())).contiguous()}, tmp,
                          metadata={"model": self.key, "texts": json.dumps(list(self.vecs))})
        return torch.stack([self.vecs[t] for t in texts]) if texts else torch.zeros(0, model.args.dim)


def top_n_allowed(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, n: int) -> list:
    """[(key index, cosine)] of the n allowed keys most similar to query (D,), best first; keys
    (K, D), allowed (K,) bool. Fewer than n when fewer are allowed."""
    sim = torch.nn.functional.normalize(keys.float(), dim=1) @ torch.nn.functional.normalize(query.float(), dim=0)
    sim = sim.masked_fill(~allowed, -float("inf"))
    best, idx = sim.topk(min(n, len(sim)))
    return [(int(i), float(v)) for i, v in zip(idx, best) if v > -float("inf")]


class Retriever:
    """Stage 1. A sequence's vector is the mean of its titles' vectors, each title run through
    the base LLM alone (embed_texts; cached on disk). The paper embeds the joined titles at once;
    per-title vectors make a user's vector at any cut time a window mean of prefix sums, so each
    query compares against every other user's last `window` items strictly before its time,
    exactly, without embedding a new text per query."""

    def __init__(self, d, pool: Pool, model, tok, cache: VectorCache, n: int, window: int = 10,
                 min_items: int = 4, log=None):
        self.d, self.pool, self.n, self.window, self.min_items = d, pool, n, window, min_items
        self.item_vecs = cache.get(model, tok, [data.quote(t) for t in d.titles], log)            # (I, D)
        # all users' prefix sums in one flat tensor: user p's sum of its first e items is row offset[p] + e
        lens = [len(it) for it in pool.items]
        self.offset = torch.tensor(np.r_[0, np.cumsum([x + 1 for x in lens])[:-1]], dtype=torch.long)
        self.prefix = torch.cat([torch.cat([torch.zeros(1, self.item_vecs.shape[1]), self.item_vecs[it].cumsum(0)])
                                 for it in pool.items])

    def unit_vectors(self, ends: np.ndarray) -> torch.Tensor:
        """(U, D): each pool user's mean item vector over their last `window` items before `end`."""
        e = torch.as_tensor(ends)
        s = (e - self.window).clamp(min=0)
        return (self.prefix[self.offset + e] - self.prefix[self.offset + s]) / (e - s).clamp(min=1)[:, None]

    def allowed(self, r: data.SeqRow) -> tuple[np.ndarray, np.ndarray]:
        """(ends before the row's time, mask of pool users it may retrieve: not itself, and at
        least min_items items before its time)."""
        ends = self.pool.ends_before(r.ts)
        return ends, (ends >= self.min_items) & (self.pool.users != r.user)

    def retrieve(self, rows: list) -> dict:
        """row_key -> [((pool index, end), cosine), ...] best first."""
        out = {}
        for r in rows:
            ends, ok = self.allowed(r)
            q = self.item_vecs[r.history].mean(0)
            out[row_key(r)] = [((p, int(ends[p])), sim)
                               for p, sim in top_n_allowed(q, self.unit_vectors(ends), torch.from_numpy(ok), self.n)]
        return out


# ----------------------------------------------------------------------------- stage 2: selection

def rating_ids(tok: Tokenizer, chat: bool = False) -> tuple[list, list]:
    """(ids that follow 'Answer:' before the digit, [id of '1', ..., id of '9']); with chat the
    digit opens the assistant's turn, right after its 'assistant\n'. The rating must be one token
    after a common lead-in (e.g. a lone space token), checked here."""
    before, between = ("assistant\n", "") if chat else ("Answer:", " ")
    base = tok.encode(before, bos=False)
    tails = [tok.encode(f"{before}{between}{k}", bos=False)[len(base):] for k in range(1, 10)]
    lead = tails[0][:-1]
    same_base = all(tok.encode(f"{before}{between}{k}", bos=False)[:len(base)] == base for k in range(1, 10))
    if any(t[:-1] != lead for t in tails) or len({t[-1] for t in tails}) != 9 or not same_base:
        raise ValueError("this tokenizer does not write the ratings 1..9 after 'Answer:' as one distinct token each")
    return lead, [t[-1] for t in tails]


def say(template: str, w: data.Words) -> str:
    """A template with the data set's words filled in."""
    return template.format(item=w.item, items=w.items, do=w.do, did=w.did, done=w.done)


def judge_texts(history_titles: list, others_titles: list, w: data.Words = data.MOVIES) -> tuple[str, list]:
    """The judge's prompt: a prefix with user A, one continuation per user B."""
    prefix = say(JUDGE_SYSTEM, w) + f"User A has {w.done} {data.quoted_list(history_titles)}.\n"
    return prefix, [f"User B has {w.done} {data.quoted_list(o)}.\n{JUDGE_QUESTION}" for o in others_titles]


def prompt_key(w: data.Words = data.MOVIES, chat: bool = False) -> str:
    """A hash of the judge's and the recommender's prompts rendered on fixed stand-in inputs:
    any change to a template (or to the items' words, or --chat) changes it, so the caches of
    LLM outputs follow the prompts."""
    prefix, conts = judge_texts(["A", "B"], [["C"], ["D", "E"]], w)
    rec = Prompter.render_text([(["F"], "G")], ["H"], ["I", "J"], w)
    return hashlib.sha1("\x00".join([prefix, *conts, rec] + ["chat"] * chat).encode()).hexdigest()[:8]


@torch.no_grad()
def judge(model, tok, d, history: list, others: list, digits: tuple, batch_size: int = 16,
          chat: ChatML | None = None) -> list:
    """Expected similarity rating (1..9) of the target history against each other sequence. With
    chat, JUDGE_SYSTEM is the system turn and users A and B the user turn, cut between them."""
    lead, digit_ids = digits
    prefix, conts = judge_texts([d.titles[i] for i in history], [[d.titles[i] for i in o] for o in others], d.words)
    if chat is None:
        prefix_ids, conts = tok.encode(prefix), [tok.encode(c, bos=False) + lead for c in conts]
    else:
        system = say(JUDGE_SYSTEM, d.words)
        prefix_ids, conts = chat.wrap_split(system, prefix[len(system):]), [chat.wrap_tail(c) + lead for c in conts]
    p = torch.softmax(generate.next_token_logits(model, conts, prefix=prefix_ids, batch_size=batch_size,
                                          vocab_ids=digit_ids), -1)
    return (p @ torch.arange(1, 10, dtype=p.dtype, device=p.device)).tolist()


def judge_cache_ok(saved) -> bool:
    """{"model": key, "rows": {row key: {"units": [[pool index, end], ...], "rating": [x, ...]}}}
    with one finite rating in 1..9 per unit."""
    if not isinstance(saved, dict) or not isinstance(saved.get("rows"), dict):
        return False
    for v in saved["rows"].values():
        if not isinstance(v, dict) or not isinstance(v.get("units"), list) or not isinstance(v.get("rating"), list):
            return False
        if len(v["units"]) != len(v["rating"]) or not all(isinstance(u, list) and len(u) == 2 for u in v["units"]):
            return False
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and 1 <= x <= 9 for x in v["rating"]):
            return False
    return True


class Selector:
    """Stage 2 over stage 1's lists; the LLM's ratings are cached in a JSON file per model,
    data and prompt (the key), or only in memory where path is None."""

    def __init__(self, d, pool, model, tok, path: str, key: str, judge_history: int = 5, log=None,
                 chat: ChatML | None = None):
        self.d, self.pool, self.model, self.tok, self.path, self.log, self.chat = d, pool, model, tok, path, log, chat
        self.key, self.judge_history, self.digits = key, judge_history, rating_ids(tok, chat is not None)
        self.scores = {}
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
            except ValueError as e:
                raise ValueError(f"{path}: unreadable judge cache ({e}); delete it to judge again") from None
            if not judge_cache_ok(saved):
                raise ValueError(f"{path}: the judge cache does not have the expected structure (rows of units and "
                                 "finite ratings 1..9); delete it to judge again")
            if saved.get("model") == self.key:
                self.scores = saved["rows"]

    def save(self):
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        write_json({"model": self.key, "rows": self.scores}, self.path)

    def rate(self, rows: list, retrieved: dict):
        """Fill the LLM ratings of every row's retrieved units, skipping cached ones."""
        units = {row_key(r): [list(u) for u, _ in retrieved[row_key(r)]] for r in rows}
        todo = [r for r in rows if self.scores.get(row_key(r), {}).get("units") != units[row_key(r)]]
        t0, done = time.time(), 0
        try:
            for n, r in enumerate(todo):
                others = [self.pool.unit(u)[-self.judge_history:] for u in units[row_key(r)]]
                s = judge(self.model, self.tok, self.d, r.history, others, self.digits, chat=self.chat) if others else []
                self.scores[row_key(r)] = {"units": units[row_key(r)], "rating": [round(x, 4) for x in s]}
                done = n + 1
                if n % 20 == 19 or n == len(todo) - 1:
                    self.save()
                    if self.log:
                        self.log(f"[adaptrec] stage 2: judged {n + 1}/{len(todo)} rows ({time.time() - t0:.0f}s)")
        except KeyboardInterrupt:                   # keep every finished rating: the same command goes on from them
            self.save()
            if self.log and self.path:
                self.log(f"[adaptrec] stage 2 interrupted: {done}/{len(todo)} rows judged and kept in {self.path}; "
                         "the same command continues from them")
            raise

    def select(self, r: data.SeqRow, retrieved: dict, m: int, how: str, seed: int = 0, allowed=None) -> list:
        """Units (pool index, end) of the m demonstrations of row r, most similar first.
        allowed: Retriever.allowed(r), needed by the random selection."""
        if m == 0:
            return []
        ranked = [u for u, _ in retrieved[row_key(r)]]
        if how == "embed":
            return ranked[:m]
        if how in ("llm", "self"):                  # self: the same rule, this Selector's model an adapter
            rating = self.scores[row_key(r)]["rating"]
            order = sorted(range(len(ranked)), key=lambda k: (-rating[k], k))   # ties: stage-1 order
            return [ranked[k] for k in order[:m]]
        if how == "random":
            ends, ok = allowed
            rng = np.random.default_rng([seed, r.user, r.ts])
            return [(int(p), int(ends[p])) for p in rng.choice(np.flatnonzero(ok), min(m, int(ok.sum())), replace=False)]
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

def demo_line(k: int, history_titles: list, chosen: str, w: data.Words = data.MOVIES) -> str:
    return (f"Similar user {k} has {w.done} {data.quoted_list(history_titles)}. Based on this, they chose "
            f"{data.quote(chosen)} next.\n")


class Prompter:
    """Renders a row with its demonstrations (units, most similar first) within a budget."""

    def __init__(self, d: data.Data, pool: Pool, tok: Tokenizer, demo_history: int, prompt_budget: int,
                 chat: ChatML | None = None, score: str = "sum"):
        self.d, self.pool, self.tok, self.demo_history, self.prompt_budget = d, pool, tok, demo_history, prompt_budget
        self.chat, self.score_by = chat, score

    def titles(self, items):
        return [self.d.titles[i] for i in items]

    def shown(self, unit: tuple) -> list:
        """The items of a unit that its demonstration line shows: history, then the chosen one."""
        items = self.pool.unit(unit)
        return items[:-1][-self.demo_history:] + items[-1:]

    @staticmethod
    def render_text(demos: list, history: list, candidates: list, w: data.Words = data.MOVIES) -> str:
        """demos: [(history titles, chosen title)] in display order (user 1 first); titles only."""
        lines = [demo_line(k + 1, h, chosen, w) for k, (h, chosen) in enumerate(demos)]
        query = (f"This user has {w.done} {data.quoted_list(history)}. Recommend one {w.item} from these "
                 f"candidates: {data.quoted_list(candidates)}.\nAnswer:")
        return say(SYSTEM, w) + "".join(lines) + ("\n" if lines else "") + query

    def text(self, demos: list, history: list, candidates: list) -> str:
        """demos: units in display order (user 1 first)."""
        shown = [self.titles(self.shown(u)) for u in demos]
        return self.render_text([(t[:-1], t[-1]) for t in shown], self.titles(history), self.titles(candidates),
                                self.d.words)

    def ids(self, r: data.SeqRow, demos: list) -> list:
        """Prompt ids for row r; the least similar demonstrations go first (and are dropped first)."""
        text, _, _ = data.fit_budget(lambda ds, h: self.text(ds, h, r.candidates), list(reversed(demos)), r.history,
                                  lambda t: len(self.encode(t)), self.prompt_budget)
        return self.encode(text)

    def encode(self, text: str) -> list:
        """A prompt's ids: as it is, or with --chat in the chat template (SYSTEM as the system turn,
        the rest as the user turn, then the assistant's turn opened for the answer)."""
        return self.tok.encode(text) if self.chat is None else self.chat.wrap(say(SYSTEM, self.d.words), text)

    def answer(self, item: int) -> list:
        """' "<title>"' + EOS: the training target and what the ranking scores. Quoted as in the
        candidate list, so the answer's tokens repeat the list's (' "', then the title's tokens).
        With --chat: '"<title>"' + <|im_end|>, the assistant's whole turn."""
        if self.chat is not None:
            return self.tok.encode(data.quote(self.d.titles[item]), bos=False) + [self.chat.end]
        return self.tok.encode(" " + data.quote(self.d.titles[item]), bos=False) + [self.tok.eos_ids[0]]

    def score(self, logprobs: torch.Tensor, answers: list) -> torch.Tensor:
        """The ranking score of each answer (its ids, from self.answer) from its log p(answer |
        prompt): that sum (--score sum), or the mean over its tokens (--score mean, length-normalised)."""
        if self.score_by == "sum":
            return logprobs
        return logprobs / torch.tensor([len(a) for a in answers], dtype=logprobs.dtype, device=logprobs.device)


# ----------------------------------------------------------------------------- loss and scoring

@dataclass
class Example:
    row: data.SeqRow
    units: list          # pool indices, most similar first
    ids: list            # prompt ids + answer ids
    n_prompt: int


def make_example(prompter: Prompter, r: data.SeqRow, units: list) -> Example:
    prompt = prompter.ids(r, units)
    return Example(r, units, prompt + prompter.answer(r.target), len(prompt))


def loss_fn(model, batch: list) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the answer tokens (' "<title>"' + EOS) of each example."""
    dev = generate.model_device(model)
    idx, valid = generate.pad([e.ids[:-1] for e in batch], left=False, device=dev)          # (b, T)
    targets, _ = generate.pad([e.ids[1:] for e in batch], left=False, device=dev)
    supervised = torch.zeros_like(valid)
    for b, e in enumerate(batch):
        supervised[b, e.n_prompt - 1:len(e.ids) - 1] = True     # position t predicts token t + 1
    return model.loss(idx, targets, supervised, valid), int(valid.sum())


def candidate_pack(prompt: list, answers: list) -> tuple:
    """One sequence that scores every answer after one prompt: the prompt, then each answer but
    its last token, at the positions that follow the prompt, each seeing the prompt and its own
    earlier tokens only. Returns ids (T,), pos (T,), mask (T, T) and, for each answer, the rows
    of the slots n-1.. (n = len(prompt): its first row is the prompt's last slot) whose next-token
    distributions predict its tokens, in order."""
    n = len(prompt)
    ids, pos, owner, rows = list(prompt), list(range(n)), [-1] * n, []
    for c, a in enumerate(answers):
        rows.append([0] + list(range(len(ids) - n + 1, len(ids) - n + len(a))))
        ids += a[:-1]
        pos += range(n, n + len(a) - 1)
        owner += [c] * (len(a) - 1)
    owner = torch.tensor(owner)
    sees = (owner[None, :] == -1) | (owner[:, None] == owner[None, :])       # the prompt, or the same answer
    return torch.tensor(ids), torch.tensor(pos), sees & torch.ones(len(ids), len(ids), dtype=torch.bool).tril(), rows


def candidate_logprobs(model, prompt: list, answers: list) -> torch.Tensor:
    """log p(answer | prompt) for each answer, (N,) fp32, in one forward over candidate_pack's
    sequence; differentiable (generate.logprobs_after computes the same through a KV cache)."""
    dev = generate.model_device(model)
    ids, pos, mask, rows = candidate_pack(prompt, answers)
    n = len(prompt)
    at = torch.arange(n - 1, len(ids), device=dev)[None]                     # the slots that predict answer tokens
    h = model(ids[None].to(dev), pos=pos[None].to(dev), mask=mask[None, None].to(dev), at=at)   # (1, T-n+1, D)
    lp = torch.log_softmax(model.head(h[0]), -1)                              # (T-n+1, V)
    return torch.stack([lp[r, a].sum() for r, a in zip((torch.tensor(r, device=dev) for r in rows),
                                                       (torch.tensor(a, device=dev) for a in answers))])


def make_listwise_loss_fn(prompter: Prompter, nll_weight: float):
    """--objective listwise / both: per example, the cross-entropy over its 20 candidates of their
    ranking scores after the one prompt (prompter.score of their sequence log-likelihoods, what
    the ranking eval reads), plus nll_weight times the target's mean token NLL (the title
    objective of loss_fn)."""
    def listwise_loss_fn(model, batch: list) -> tuple[torch.Tensor, int]:
        total, tokens = 0.0, 0
        for e in batch:
            answers = [prompter.answer(c) for c in e.row.candidates]
            lp = candidate_logprobs(model, e.ids[:e.n_prompt], answers)
            t = e.row.candidates.index(e.row.target)
            scores = prompter.score(lp, answers)
            total = total - torch.log_softmax(scores, 0)[t] - nll_weight * lp[t] / len(answers[t])
            tokens += e.n_prompt + sum(len(a) - 1 for a in answers)
        return total / len(batch), tokens
    return listwise_loss_fn


@torch.inference_mode()
def answer_and_rank(model, tok, prompter: Prompter, rows: list, units_by_row: dict, batch_size: int = 8,
                    max_new_tokens: int = 64, log=None) -> tuple[list, list]:
    """For each row, in one pass over its prompt: the greedy answer (first line of at most
    max_new_tokens new tokens; max_new_tokens 0 = ranking only) and each candidate's ranking
    score, (20,) fp32: prompter.score of log p(' "<title>"' + EOS | prompt). Prompts are
    prefilled in left-padded batches (in order of length); each row's 20 answers then attend to
    its slice of that cache (KVCache.row) before the batch decodes from it."""
    prompts = [prompter.ids(r, units_by_row[row_key(r)]) for r in rows]
    order = sorted(range(len(rows)), key=lambda k: len(prompts[k]))
    answers, logprobs, t0 = [None] * len(rows), [None] * len(rows), time.time()
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        cache, logits = generate.prefill_batch(model, [prompts[k] for k in chunk], max_new_tokens)
        for b, k in enumerate(chunk):
            cands = [prompter.answer(c) for c in rows[k].candidates]
            logprobs[k] = prompter.score(generate.logprobs_after(model, cache.row(b), logits[b], cands), cands).cpu()
        new = generate.decode(model, cache, logits, max_new_tokens, stop=["\n"], tokenizer=tok)
        for k, ids in zip(chunk, new):
            answers[k] = tok.decode(ids).strip().split("\n")[0].strip()
        if log:
            log(f"[adaptrec]   {min(s + batch_size, len(rows))}/{len(rows)} rows ({time.time() - t0:.0f}s)")
    return answers, logprobs


def target_ranks(rows: list, scores) -> np.ndarray:
    """Rank (0 = first, ties against the target) of each row's target by its candidates' scores."""
    return np.array([metrics.rank_of_target(sc, r.candidates.index(r.target)) for r, sc in zip(rows, scores)])


def evaluate(model, tok, prompter, rows, units_by_row, gen_batch: int = 8, log=None) -> tuple[dict, np.ndarray]:
    """Generation (ValidRatio, HR@1 over all rows) and likelihood ranking (HR@1, HR@5, NDCG@5);
    and the ranking scores, (rows, 20)."""
    answers, logprobs = answer_and_rank(model, tok, prompter, rows, units_by_row, gen_batch, log=log)
    scores = torch.stack(logprobs).numpy()
    ranks = target_ranks(rows, scores)
    matched = [metrics.match_answer(t, prompter.titles(r.candidates)) for t, r in zip(answers, rows)]
    targets = [r.candidates.index(r.target) for r in rows]
    g = metrics.hr1_generated(matched, targets)
    hits = np.array([m is not None and m == t for m, t in zip(matched, targets)], dtype=np.float64)
    return {"hr1": round(g["hr1"], 4), "hr1_ci95": ci(np.mean, hits), "valid_ratio": round(g["valid_ratio"], 4),
            "hr1_valid": round(g["hr1_valid"], 4), **rank_metrics(ranks), "n": len(rows),
            "examples": [{"user": prompter.d.user_ids[r.user], "answer": t, "target": prompter.d.titles[r.target]}
                         for t, r in list(zip(answers, rows))[:5]]}, scores


def ci(stat, *arrays) -> list:
    return [round(x, 4) for x in metrics.bootstrap_ci(stat, *arrays, n_boot=1000)]


def rank_metrics(ranks) -> dict:
    return {"hr1_rank": round(metrics.hr_at_k(ranks, 1), 4), "hr1_rank_ci95": ci(lambda r: metrics.hr_at_k(r, 1), ranks),
            "hr5": round(metrics.hr_at_k(ranks, 5), 4), "ndcg5": round(metrics.ndcg_at_k(ranks, 5), 4),
            "ndcg5_ci95": ci(lambda r: metrics.ndcg_at_k(r, 5), ranks)}


# ----------------------------------------------------------------------------- setup

def add_common(p):
    p.add_argument("--model", default=None, help="HF Llama directory (default: SmolLM2-135M-Instruct, fetched once)")
    data.add_args(p)
    p.add_argument("--out", default="runs/adaptrec", help="output directory; each configuration's adapter is tuned "
                   "into OUT/m<M>-<select> (OUT/m0 without demonstrations)")
    p.add_argument("--n", type=trainer.count(1), default=10, help="users retrieved in stage 1 (N)")
    p.add_argument("--demo-history", type=trainer.count(0), default=3, help="history items shown per demonstration (paper: 10)")
    p.add_argument("--judge-history", type=trainer.count(1), default=5, help="last items of each retrieved user shown to the stage-2 judge")
    p.add_argument("--prompt-budget", type=trainer.count(16), default=1024, help="prompt budget in tokens; the least similar demonstrations, then the oldest history items, are dropped to meet it")
    p.add_argument("--seed", type=int, default=0)
    generate.add_device_args(p)
    p.add_argument("--plain", action="store_true", help="the plain model.py path, without fast.py's CPU speed layer "
                   "(same results, slower on CPU)")
    p.add_argument("--score", choices=("sum", "mean"), default="sum", help="a candidate's ranking score, in the ranking, "
                   "validation and the listwise objective: sum = log p(' \"title\"' + EOS | prompt); mean = that over "
                   "its token count (length-normalised: near-uniform before tuning where the sum is peaked); an adapter "
                   "is evaluated with the score it was tuned with")
    generate.add_chat_arg(p, "every prompt (the judge's, training, generation, ranking): the system line as the "
                          "system turn, the rest as the user turn, the answer as the assistant's turn ending in <|im_end|>")


def data_key(d: data.Data) -> str:
    h = hashlib.sha1(f"{len(d)}:{int(d.ts[0])}:{int(d.ts[-1])}".encode())
    h.update("\n".join(d.titles).encode())
    return h.hexdigest()[:12]


@dataclass
class Setup:
    d: data.Data
    rows: dict
    pool: Pool
    model: llama.Llama          # the base model: stages 1 and 2 and the controls use it untuned
    tok: Tokenizer
    retriever: Retriever
    selector: Selector
    prompter: Prompter


def setup(a, log) -> Setup:
    d = data.load_from_args(a)
    rows = data.sequential_rows(d, seed=a.seed)
    pool = build_pool(d)
    model, tok = generate.load_model(a.model, dtype=a.dtype, device=a.device, plain=a.plain)
    if a.prompt_budget + 64 > model.args.max_seq_len:
        raise ValueError(f"--prompt-budget {a.prompt_budget} + 64 answer tokens exceeds the model's context of {model.args.max_seq_len}")
    key = f"{model_key(model)}-{data_key(d)}"
    cache = os.path.join(a.out, "cache")
    retriever = Retriever(d, pool, model, tok, VectorCache(os.path.join(cache, f"vectors-{key}.safetensors"), key), a.n, log=log)
    a.chat = generate.use_chat(a.chat, a.model, tok)
    chat = generate.chat_template(a.model, tok) if a.chat else None
    judge_file = f"judge-{key}-{prompt_key(d.words, a.chat)}-h{a.judge_history}.json"
    selector = Selector(d, pool, model, tok, os.path.join(cache, judge_file), key, a.judge_history, log, chat)
    log(f"[adaptrec] {len(rows['train'])} train / {len(rows['valid'])} valid / {len(rows['test'])} test rows; "
        f"pool of {len(pool.users)} users; N={a.n}, budget {a.prompt_budget} tokens")
    return Setup(d, rows, pool, model, tok, retriever, selector, Prompter(d, pool, tok, a.demo_history, a.prompt_budget,
                                                                          chat, a.score))


def demo_overlap(pool: Pool, rows: list, units_by_row: dict) -> dict:
    """What the demonstrators have in common with the target user, from item ids alone (no
    LLM): the mean number of the row's history items found in its demonstrators' units
    (everything they did before the row's time), and the share of rows where a demonstrator's
    unit holds the row's target."""
    seen = [set(i for u in units_by_row[row_key(r)] for i in pool.unit(u)) for r in rows]
    n = max(len(rows), 1)
    return {"demo_history_overlap": round(sum(len(set(r.history) & s) for r, s in zip(rows, seen)) / n, 4),
            "demo_has_target": round(sum(r.target in s for r, s in zip(rows, seen)) / n, 4)}


def judge_with(s: Setup, model, path: str | None, key: str) -> Selector:
    """A stage-2 judge with the base judge's prompt and settings and another model (selection
    `self`: an adapter); its ratings are cached at path under key (path None: in memory)."""
    return Selector(s.d, s.pool, model, s.tok, path, key, s.selector.judge_history, log_fn, s.selector.chat)


def demonstrations(s: Setup, rows: list, retrieved: dict, m: int, how: str, seed: int,
                   judge: Selector | None = None) -> dict:
    """row_key -> units of the row's demonstrations: stage 2 over stage 1's `retrieved`, rated by
    `judge` (default the base model's; selection `self` passes the adapter's, judge_with)."""
    judge = judge or s.selector
    if how in ("llm", "self") and m > 0:
        judge.rate(rows, retrieved)
    return {row_key(r): judge.select(r, retrieved, m, how, seed, s.retriever.allowed(r) if how == "random" else None)
            for r in rows}


def parse_configs(text: str) -> list:
    """'0,1:llm,5:embed' -> [(0, 'none'), (1, 'llm'), (5, 'embed')]."""
    out = []
    for part in text.split(","):
        m, _, how = part.strip().partition(":")
        if not m.isdigit() or (int(m) > 0 and how not in SELECTIONS) or (int(m) == 0 and how not in ("", "none")):
            raise ValueError(f"--configs: {part!r} is not M:SELECT (SELECT one of {SELECTIONS}) or 0")
        out.append((int(m), how if int(m) else "none"))
    return out


def run_name(m: int, how: str) -> str:
    return f"m{m}-{how}" if m else "m0"


def adapter_dir(out: str, m: int, how: str) -> str:
    """The adapter of configuration (m, how) under OUT: train.adapter_dir of its run."""
    return trainer.adapter_dir(os.path.join(out, run_name(m, how)))


# ----------------------------------------------------------------------------- train

def add_train_args(p):
    p.add_argument("--configs", default="0,5:llm", help="comma-separated M:SELECT, one adapter each, trained on the "
                   "same rows (0 = no demonstrations); all selections: 0,5:llm,5:self,5:embed,5:random")
    p.add_argument("--train-rows", type=trainer.count(0), default=64, help="training rows drawn from all users' train parts (0 = all)")
    p.add_argument("--val-rows", type=trainer.count(0), default=0, help="validation rows (users' second-last items), ranked at each "
                   "validation to keep the best adapter (0 = no validation: the final adapter is used)")
    p.add_argument("--fit-rows", type=trainer.count(0), default=0, help="at each validation, also rank this many of the "
                   "training rows and log their NDCG@20 beside the held-out rows' (into OUT/RUN/fit.jsonl too): does the "
                   "adapter fit what it is tuned on, and does that carry over? Never used to choose; needs --val-rows")
    p.add_argument("--epochs", type=trainer.real(0, low_open=True), default=1.0)
    p.add_argument("--objective", choices=("nll", "listwise", "both"), default="nll", help="nll: the target title's "
                   "token cross-entropy; listwise: cross-entropy over the 20 candidates' sequence log-likelihoods after "
                   "one shared prompt (what the ranking reads; one forward per row, ~1.5x the tokens); both: their sum")
    p.add_argument("--judge-refresh", type=trainer.count(1), default=16, help="selection self: steps between "
                   "refreshes of the stage-2 judge from the adapter being tuned (each row is judged once per epoch, by "
                   "the weights its round began with, whatever the interval; public code: 1,000 batches)")
    trainer.add_args(p, batch_size=4, lr=1e-3, lora_r=16, lora_dropout=0.0, resume_from="OUT/RUN",
               lr_help="paper: 2e-4 over 5 epochs of the full data; few steps here")


class SelfJudge:
    """Selection `self` in training, as trainer.train's before_step: at the first step of each
    round of `every` steps, the adapter's current weights rate the rows of the round's steps, and
    their examples are rebuilt with the M best. A round's ratings are kept in
    RUN/judge/round-<r>.json, so a run resumed inside a round reads the ratings of the weights the
    round began with."""

    def __init__(self, s: Setup, m: int, rows: list, retrieved: dict, examples: list, cfg, every: int, seed: int):
        self.s, self.m, self.rows, self.retrieved, self.examples = s, m, rows, retrieved, examples
        self.cfg, self.every, self.seed, self.ready = cfg, every, seed, None      # ready: the round built

    def __call__(self, step: int, model):
        r = step // self.every
        if r == self.ready:
            return
        end = min((r + 1) * self.every, self.cfg.steps)
        idx = sorted({i for t in range(step, end) for i in trainer.batch_indices(t, len(self.rows), self.cfg)})
        rows = [self.rows[i] for i in idx]
        log_fn(f"[adaptrec] self-adaptive judge, round {r}: the adapter of step {r * self.every} rates the "
               f"{len(rows)} rows of steps {step + 1}-{end}")
        path = os.path.join(self.cfg.out_dir, "judge", f"round-{r:05d}.json")
        units = demonstrations(self.s, rows, self.retrieved, self.m, "self", self.seed,
                               judge_with(self.s, model, path, f"{self.s.selector.key}-round{r}"))
        for i, row in zip(idx, rows):
            self.examples[i] = make_example(self.s.prompter, row, units[row_key(row)])
        self.ready = r


def train_config(s: Setup, a, m: int, how: str, train_rows: list, val_rows: list, retrieved: dict) -> dict:
    """Tune one adapter, on a fresh copy of the base model, with M = m demonstrations chosen by `how`."""
    t0 = time.time()
    steps = max(1, round(len(train_rows) * a.epochs / a.batch_size))
    model = generate.load_model(a.model, dtype=a.dtype, device=a.device, plain=a.plain)[0]
    trainer.make_trainable(model, trainer.lora_from_args(a))
    cfg = trainer.config_from_args(a, os.path.join(a.out, run_name(m, how)), steps)
    fit_rows, fit_log = train_rows[:a.fit_rows], os.path.join(cfg.out_dir, "fit.jsonl")
    if not a.resume and os.path.exists(fit_log):            # a fresh run's log starts empty; --resume appends
        os.remove(fit_log)
    if how == "self":              # examples built round by round by the adapter's own judgements
        if not a.resume:
            shutil.rmtree(os.path.join(cfg.out_dir, "judge"), ignore_errors=True)
        examples, units_by_row = [None] * len(train_rows), None
        before_step = SelfJudge(s, m, train_rows, retrieved, examples, cfg, a.judge_refresh, a.seed)
        log_fn(f"[adaptrec] {run_name(m, how)}: training on {len(examples)} rows, {steps} steps, the judge refreshed "
               f"from the adapter every {a.judge_refresh} steps; validating on {len(val_rows)} rows")
    else:
        units_by_row, before_step = demonstrations(s, train_rows + val_rows, retrieved, m, how, a.seed), None
        if how == "llm":
            dis = s.selector.disagreement(train_rows, retrieved, m)
            log_fn(f"[adaptrec] stage 2 vs stage 1 on the training rows: top-{m} sets differ on "
                   f"{dis['top_m_set_differs']:.1%}, top-1 on {dis['top_1_differs']:.1%}")
        examples = [make_example(s.prompter, r, units_by_row[row_key(r)]) for r in train_rows]
        log_fn(f"[adaptrec] {run_name(m, how)}: training on {len(examples)} rows (mean "
               f"{np.mean([len(e.ids) for e in examples]):.0f} tokens), {steps} steps; validating on {len(val_rows)} rows")

    def ndcg20(mod, rows):          # the validation metric: smoother than HR@1 on a few rows
        units = units_by_row        # self: the adapter as it is now judges the rows, in memory
        if how == "self":
            units = demonstrations(s, rows, retrieved, m, how, a.seed, judge_with(s, mod, None, "validation"))
        return metrics.ndcg_at_k(target_ranks(rows, answer_and_rank(mod, s.tok, s.prompter, rows, units,
                                                                    max_new_tokens=0)[1]), 20)

    def validate(mod):
        held_out = ndcg20(mod, val_rows)
        if fit_rows:
            fit = ndcg20(mod, fit_rows)
            log_fn(f"[adaptrec] NDCG@20 on {len(fit_rows)} training rows {fit:.4f}, on {len(val_rows)} held-out rows "
                   f"{held_out:.4f}")
            with open(fit_log, "a") as f:
                f.write(json.dumps({"train_rows_ndcg20": fit, "val_rows_ndcg20": held_out}) + "\n")
        return held_out

    objective = loss_fn if a.objective == "nll" else make_listwise_loss_fn(s.prompter, float(a.objective == "both"))
    summary = trainer.train(model, examples, objective, cfg, validate=validate if val_rows else None, resume=a.resume,
                      run_config={"method": "adaptrec", "m": m, "select": how, "args": vars(a),
                                  "train_rows": len(examples), "val_rows": len(val_rows)},
                      base_model=a.model or "SmolLM2-135M-Instruct", before_step=before_step)
    log_fn(f"[adaptrec] {run_name(m, how)} done in {time.time() - t0:.0f}s; "
           + (f"best validation NDCG@20 {summary['best']}; " if val_rows else "")
           + f"adapter in {adapter_dir(a.out, m, how)}")
    return summary


def cmd_train(a):
    t0 = time.time()
    configs = parse_configs(a.configs)
    if a.fit_rows and not a.val_rows:
        raise ValueError("--fit-rows is logged at each validation: give --val-rows too")
    if trainer.dist_info()[1] > 1 and any(how == "self" for _, how in configs):
        raise ValueError("selection self rebuilds each round's examples in one process: train it without torchrun")
    s = setup(a, log_fn)
    rng = random.Random(a.seed)
    train_rows = rng.sample(s.rows["train"], min(a.train_rows, len(s.rows["train"]))) if a.train_rows else s.rows["train"]
    val_rows = rng.sample(s.rows["valid"], min(a.val_rows, len(s.rows["valid"])))
    retrieved = s.retriever.retrieve(train_rows + val_rows)
    for m, how in configs:
        train_config(s, a, m, how, train_rows, val_rows, retrieved)
    trainer.dist_close()
    log_fn(f"[adaptrec] {len(configs)} adapter(s) in {time.time() - t0:.0f}s")


# ----------------------------------------------------------------------------- eval

def causal_pop(d: data.Data, rows: list) -> np.ndarray:
    """(rows, items): how often each item was taken, by anyone, strictly before the row's time."""
    ts_by_item = [np.sort(d.ts[d.items == i]) for i in range(len(d.item_ids))]
    return np.array([[np.searchsorted(t, r.ts, side="left") for t in ts_by_item] for r in rows], dtype=np.float64)


@torch.inference_mode()
def title_prior(model, tok, prompter: Prompter, items: list) -> dict:
    """item -> log p(' "<title>"' + EOS | a prompt with no user in it), from the base model."""
    prompt = prompter.encode(say(SYSTEM, prompter.d.words) + f"Recommend one {prompter.d.words.item}.\nAnswer:")
    cache, logits = generate.prefill_batch(model, [prompt], 0)
    lp = generate.logprobs_after(model, cache.row(0), logits[0], [prompter.answer(i) for i in items])
    return dict(zip(items, lp.tolist()))


def control_scores(s: Setup, rows: list, units_by_config: dict, sasrec_epochs: int, seed: int, log) -> dict:
    """{control: (rows, 20) scores of each row's candidates}, every score from what was known before
    the row's time (Pop (t), DemoVote, TitlePrior) or from the users' training rows (Pop, SASRec,
    the classical baselines as they are usually run on leave-one-out splits)."""
    import baselines
    at_candidates = lambda full: np.stack([full[k, r.candidates] for k, r in enumerate(rows)])   # (R, I) -> (R, 20)
    pop_t = causal_pop(s.d, rows)                                                  # (R, I)
    tie = pop_t / (pop_t.max() + 1)                                               # < 1: only breaks ties
    out = {"Pop (t)": at_candidates(pop_t)}
    for (m, how), units in units_by_config.items():
        if m:
            vote = np.zeros_like(pop_t)
            for k, r in enumerate(rows):
                for u in units[row_key(r)]:
                    vote[k, s.prompter.shown(u)] += 1
            out[f"DemoVote (M={m}, {how})"] = at_candidates(vote + tie)
    prior = title_prior(s.model, s.tok, s.prompter, sorted({c for r in rows for c in r.candidates}))
    out["TitlePrior (base)"] = np.array([[prior[c] for c in r.candidates] for r in rows])
    pop = np.bincount([r.target for r in s.rows["train"]], minlength=len(s.d.item_ids)).astype(np.float64)
    out["Pop"] = at_candidates(np.tile(pop, (len(rows), 1)))
    if sasrec_epochs:
        sas = baselines.train_sasrec(len(s.d.item_ids), s.rows, seed=seed, epochs=sasrec_epochs, log=log)
        with torch.no_grad():
            out["SASRec"] = at_candidates(sas.scores(baselines.pad_hist(rows, sas.max_history)).numpy())
    return out


def mixed_ranks(rows: list, control: np.ndarray, llm: np.ndarray,
                steps: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Does the LLM's ranking hold anything the control's does not? Target ranks under a weighted
    Borda count of the two rankings of each row's 20 candidates, (1 - w) * the control's points +
    w * the LLM's (points: candidates ranked below, ties half), w in 0, 1/steps, .., 1, what the
    sum leaves equal ordered by the LLM's points. Each row's w is the one with the best NDCG@20 on
    the OTHER rows (leave one row out), so no row's rank comes from a fit on its own answer. An analysis, not a method: it
    fits on test rows. w = 0 is the control's own ranking, so above the control alone means the
    LLM's ranking carries something the control's does not. On few rows (80) with a flat curve
    over w, the other rows' choice is noisy and can land below both rankings: it is a
    conservative test, not an estimate of the best mix. Returns (ranks, each row's w, and the
    ranks under every w on all rows, (steps + 1, R): the in-sample curve, an upper bound)."""
    def points(x):                      # (R, 20) -> (R, 20) integers: 2 * (candidates below + half the ties)
        below = (x[:, :, None] > x[:, None, :]).sum(-1)
        equal = (x[:, :, None] == x[:, None, :]).sum(-1) - 1
        return 2 * below + equal
    pc, pl = points(np.asarray(control, dtype=np.float64)), points(np.asarray(llm, dtype=np.float64))
    target = [r.candidates.index(r.target) for r in rows]
    # integers throughout, so ties are exact; pl < 64 only orders what the weighted sum leaves equal
    ranks = np.array([[metrics.rank_of_target(((steps - j) * pc[k] + j * pl[k]) * 64 + pl[k], target[k])
                       for k in range(len(rows))] for j in range(steps + 1)])                  # (steps + 1, R)
    gain = 1 / np.log2(ranks + 2)                                       # NDCG@20 of each row: every rank is < 20
    best = np.array([np.argmax(np.delete(gain, k, axis=1).sum(1)) for k in range(len(rows))])   # best j without row k
    return ranks[best, np.arange(len(rows))], best / steps, ranks


def paired_diffs(mine: np.ndarray, theirs: np.ndarray, vs: str) -> dict:
    """Ranked HR@1 and NDCG@5 of one set of target ranks minus another's on the same rows, each with
    a paired bootstrap interval (the same rows drawn for both)."""
    n = len(mine)
    strata = [[np.array([k]) for k in range(n)]]
    out = {}
    for metric, per_row in (("hr1_rank", lambda x: (x < 1).astype(float)), ("ndcg5", lambda x: np.where(x < 5, 1 / np.log2(x + 2), 0))):
        point, lo, hi = metrics.paired_diff_ci(lambda y, v: float(v.mean()), np.zeros(n), per_row(mine), per_row(theirs),
                                               strata, n_boot=1000)
        out[metric] = {"vs": vs, "diff": round(point, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    return out


def paired_to_best(results: list, ranks: dict, controls: list) -> str:
    """Add to each LLM row its ranked HR@1 and NDCG@5 minus the best control's (by ranked HR@1,
    then NDCG@5) on the same rows, and, to each row with demonstrations, minus M = 0's where M = 0
    was evaluated too (the issue's "M = 5 above M = 0"); paired bootstrap intervals. Returns the
    best control's name."""
    best = max(controls, key=lambda c: (metrics.hr_at_k(ranks[c], 1), metrics.ndcg_at_k(ranks[c], 5)))
    for r in results:
        if r["kind"] != "llm":
            continue
        mine = ranks[(r["m"], r["select"])]
        for metric, d in paired_diffs(mine, ranks[best], best).items():
            r[f"{metric}_vs_best_control"] = d
        if r["m"] and (0, "none") in ranks:
            for metric, d in paired_diffs(mine, ranks[(0, "none")], "M=0").items():
                r[f"{metric}_vs_m0"] = d
    return best


def cmd_eval(a):
    t0 = time.time()
    configs = parse_configs(a.configs)
    s = setup(a, log_fn)
    rng = random.Random(a.seed + 1)
    rows = sorted(rng.sample(s.rows["test"], min(a.eval_rows, len(s.rows["test"]))) if a.eval_rows else s.rows["test"],
                  key=lambda r: r.user)
    retrieved = s.retriever.retrieve(rows)
    units = {c: demonstrations(s, rows, retrieved, *c, a.seed) for c in configs if c[1] != "self"}
    m_llm = next((m for m, h in configs if h == "llm"), 0)
    agree = s.selector.disagreement(rows, retrieved, m_llm) if m_llm else None
    results, llm_scores, llm_ranks = [], {}, {}
    name = "base model (untuned)" if a.base else "AdaptRec"
    for m, how in configs:                                  # one model in memory at a time
        model = evaluated_model(s, a, m, how)
        if model is None:
            continue
        if how == "self":                                   # the kept adapter judges the test rows
            units[(m, how)] = demonstrations(s, rows, retrieved, m, how, a.seed, self_judge(s, a, model, m))
        log_fn(f"[adaptrec] {name}, M={m} ({how}): {len(rows)} rows ({time.time() - t0:.0f}s so far)")
        res, llm_scores[(m, how)] = evaluate_once(s, a, m, how, model, rows, units[(m, how)])
        llm_ranks[(m, how)] = target_ranks(rows, llm_scores[(m, how)])
        results.append({"method": name, "kind": "llm", "m": m, "select": how, **res,
                        **demo_overlap(s.pool, rows, units[(m, how)]),
                        "target_ranks": llm_ranks[(m, how)].tolist()})   # per row, 0 = first: pairs can be compared later
        log_fn(f"[adaptrec]   HR@1 {res['hr1']:.4f} (valid {res['valid_ratio']:.3f}), ranked HR@1 {res['hr1_rank']:.4f}, "
               f"NDCG@5 {res['ndcg5']:.4f}")
    controls = control_scores(s, rows, {c: units[c] for c in configs if c in units}, a.sasrec_epochs, a.seed, log_fn)
    ranks = {**{c: target_ranks(rows, sc) for c, sc in controls.items()}, **llm_ranks}
    if not results:
        raise FileNotFoundError(f"no adapter for any of --configs {a.configs} in {a.out}: run `python adaptrec.py train` "
                                "first, or pass --base")
    results += [ranked_row(c, "control", ranks[c]) for c in controls]
    best = paired_to_best(results, ranks, list(controls))
    for (m, how), sc in llm_scores.items():            # does the LLM's ranking add to the best control's?
        mixed, w, by_weight = mixed_ranks(rows, controls[best], sc)
        row = ranked_row(f"{best} + M={m} ({how})", "analysis", mixed)
        row.update({f"{k}_vs_best_control": d for k, d in paired_diffs(mixed, ranks[best], best).items()})
        row["llm_weight_rows"] = {f"{x:g}": int((w == x).sum()) for x in np.unique(w)}    # w chosen: how many rows
        # every fixed w on all rows at once: the in-sample curve, an upper bound on what mixing can give
        row["in_sample_by_weight"] = [{"w": j / (len(by_weight) - 1), "hr1_rank": metrics.hr_at_k(rk, 1),
                                       "ndcg5": round(metrics.ndcg_at_k(rk, 5), 4)} for j, rk in enumerate(by_weight)]
        results.append(row)
    report(results, agree, best, a, time.time() - t0)


def evaluated_model(s: Setup, a, m: int, how: str):
    """The model eval runs for configuration (m, how): the base model with --base, else its
    adapter (None, said so, where it has none)."""
    if a.base:
        return s.model
    path = adapter_dir(a.out, m, how)
    if not trainer.is_saved(path):
        log_fn(f"[adaptrec] skipping M={m} ({how}): no adapter in {os.path.join(a.out, run_name(m, how))} "
               f"(run: python adaptrec.py train --configs {m}{':' + how if m else ''})")
        return None
    trainer.check_tuned_like(os.path.join(a.out, run_name(m, how)), {"--chat": (a.chat, False), "--score": (a.score, "sum")})
    return generate.load_model(a.model, dtype=a.dtype, device=a.device, plain=a.plain, tuned=path)[0]


def evaluate_once(s: Setup, a, m: int, how: str, model, rows: list, units_by_row: dict) -> tuple[dict, np.ndarray]:
    """evaluate(), kept in OUT/cache/eval-<run>.json under a key of all its scores depend on (base
    model, adapter weights, every prompt and candidate answer, --score, dtype, device): an eval
    killed after some configurations redoes only the rest, and one repeated unchanged reads its
    scores back."""
    weights = "base" if a.base else sha256(trainer.saved_weights(adapter_dir(a.out, m, how)))
    p = next(model.parameters())
    key = hashlib.sha256(json.dumps([
        model_key(s.model), weights, a.score, str(p.dtype), p.device.type,
        [s.prompter.ids(r, units_by_row[row_key(r)]) for r in rows],
        [[s.prompter.answer(c) for c in r.candidates] for r in rows], [r.candidates.index(r.target) for r in rows],
    ]).encode()).hexdigest()
    path = os.path.join(a.out, "cache", f"eval-{'base-' if a.base else ''}{run_name(m, how)}.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        if saved["key"] == key:
            log_fn(f"[adaptrec]   scores read back from {path} (same adapter, prompts and settings)")
            return saved["result"], np.array(saved["scores"], dtype=np.float32)
    except (OSError, ValueError, KeyError, TypeError):
        pass                                            # none yet, or unreadable: evaluate again
    res, scores = evaluate(model, s.tok, s.prompter, rows, units_by_row, a.gen_batch, log_fn)
    write_json({"key": key, "result": res, "scores": scores.tolist()}, path)
    return res, scores


def self_judge(s: Setup, a, model, m: int) -> Selector:
    """Selection `self` at eval and recommend: the evaluated model (the kept adapter) judges; its
    ratings are cached beside the base judge's under the adapter's hash."""
    weights = trainer.saved_weights(adapter_dir(a.out, m, "self"))
    tag = sha256(weights)[:12] if weights and model is not s.model else "base"
    base = os.path.basename(s.selector.path)          # names the base judge's model, data, prompts, --judge-history
    return judge_with(s, model, os.path.join(a.out, "cache", f"self-{tag}-{base}"), f"{s.selector.key}-self-{tag}")


def ranked_row(name: str, kind: str, ranks: np.ndarray) -> dict:
    """A results row of a ranking with no generation (a control, an analysis): its answer is its
    top candidate, always valid, so generated HR@1 = ranked HR@1."""
    return {"method": name, "kind": kind, "m": None, "select": None, "hr1": round(metrics.hr_at_k(ranks, 1), 4),
            "hr1_ci95": ci(lambda x: metrics.hr_at_k(x, 1), ranks), "valid_ratio": 1.0, **rank_metrics(ranks),
            "n": len(ranks), "target_ranks": np.asarray(ranks).tolist()}


def report(results: list, agree: dict | None, best: str, a, elapsed: float):
    w = max(len(r["method"]) for r in results) + 2
    print(f"{'method':<{w}}{'M':>3} {'select':<7}{'HR@1':>7} {'95% CI':<16}{'Valid':>6}{'rHR@1':>7}{'HR@5':>7}{'NDCG@5':>8}"
          f"{'n':>5}{'shared':>8}{'has-tgt':>8}   rHR@1 - best control [95% CI]")
    for r in results:
        demo = f"{r['demo_history_overlap']:>8.2f}{r['demo_has_target']:>8.2f}" if r.get("m") else " " * 16
        d = r.get("hr1_rank_vs_best_control")
        print(f"{r['method']:<{w}}{'' if r['m'] is None else r['m']:>3} {r['select'] or '':<7}{r['hr1']:>7.4f} "
              f"{str(r['hr1_ci95']):<16}{r['valid_ratio']:>6.3f}{r['hr1_rank']:>7.4f}{r['hr5']:>7.4f}{r['ndcg5']:>8.4f}"
              f"{r['n']:>5}{demo}" + (f"   {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else ""))
    print(f"HR@1 and Valid: greedy generation, hits over all rows; rHR@1, HR@5, NDCG@5: ranking by log p(\"title\" + EOS)"
          f"{' per token' if a.score == 'mean' else ''}.\n"
          f"Best control (by rHR@1): {best}. shared: the row's history items found in its demonstrators' units (mean); "
          "has-tgt: rows where a demonstrator's unit holds the target.")
    if any(r["kind"] == "analysis" for r in results):
        print(f"'{best} + M=m (select)': a weighted Borda count of {best}'s ranking and that adapter's, the weight of "
              "each row chosen on the other rows (an analysis, not a method); above the control alone, the LLM's "
              "ranking holds something the control's does not.")
    for r in results:
        if "hr1_rank_vs_m0" in r:
            h, g = r["hr1_rank_vs_m0"], r["ndcg5_vs_m0"]
            print(f"M={r['m']} ({r['select']}) - M=0, paired over the same rows: rHR@1 {h['diff']:+.4f} "
                  f"[{h['ci95'][0]:+.4f}, {h['ci95'][1]:+.4f}], NDCG@5 {g['diff']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]")
    if agree:
        print(f"stage 2 vs stage 1 (M={agree['m']}): top-M sets differ on {agree['top_m_set_differs']:.1%} of rows, "
              f"top-1 on {agree['top_1_differs']:.1%}; mean overlap {agree['mean_overlap']:.2f} of {agree['m']}")
    path = write_results({"config": vars(a), "elapsed_s": round(elapsed, 1), "selection": agree, "best_control": best,
                          "rows": results}, a.out)
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
    adapter = adapter_dir(a.out, a.m, a.select)
    model = s.model
    if trainer.is_saved(adapter):
        model = generate.load_model(a.model, dtype=a.dtype, device=a.device, plain=a.plain, tuned=adapter)[0]
    else:
        log_fn(f"[adaptrec] no adapter at {adapter}: answering with the base model (run: python adaptrec.py train)")
    judge = self_judge(s, a, model, a.m) if a.select == "self" else s.selector
    chosen = demonstrations(s, [row], retrieved, a.m, a.select, a.seed, judge)[row_key(row)]
    judged = judge.scores.get(row_key(row), {})
    rating = {tuple(u): x for u, x in zip(judged.get("units", []), judged.get("rating", []))}
    print(f"user {a.user}, history (oldest first): {data.quoted_list(s.prompter.titles(row.history))}")
    print(f"stage 1: {len(retrieved[row_key(row)])} similar users (each cut at this user's next item's time)")
    for unit, sim in retrieved[row_key(row)]:
        mark = "*" if unit in chosen else " "
        print(f" {mark} user {s.d.user_ids[s.pool.users[unit[0]]]:>6}  cosine {sim:.3f}  LLM rating "
              f"{rating.get(unit, float('nan')):.2f}  chose {data.quote(s.d.titles[s.pool.unit(unit)[-1]])}")
    print(f"stage 2 ({a.select}): {len(chosen)} demonstrations (*)")
    (answer,), (lp,) = answer_and_rank(model, s.tok, s.prompter, [row], {row_key(row): chosen})
    print(f"recommendation (generated): {answer}")
    print(f"candidates by {'log p(title)' if a.score == 'sum' else 'log p(title) per token'}:")
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
    e.add_argument("--configs", default="0,5:llm",
                   help="comma-separated M:SELECT (0 = no demonstrations), each evaluated with its own adapter "
                   "(OUT/m<M>-<select>); the full ablation, once trained: 0,1:llm,3:llm,5:llm,7:llm,5:self,5:embed,5:random")
    e.add_argument("--eval-rows", type=trainer.count(0), default=80, help="test rows (one per user, drawn at random; 0 = all)")
    e.add_argument("--gen-batch", type=trainer.count(1), default=8, help="prompts per generation batch")
    e.add_argument("--sasrec-epochs", type=trainer.count(0), default=10, help="SASRec epochs at most, early-stopped on the valid "
                   "rows (0 = Pop only; baselines.py uses 30)")
    e.add_argument("--base", action="store_true", help="evaluate the untuned base model instead of the adapters")
    r = sub.add_parser("recommend", help="show retrieval, selection and the recommendation for one user's next item")
    add_common(r)
    r.add_argument("--user", required=True, help="user id as in the dataset")
    r.add_argument("--m", type=trainer.count(0), default=5)
    r.add_argument("--select", default="llm", choices=SELECTIONS)
    a = p.parse_args(argv)
    a.dtype = generate.default_dtype(a.device, a.dtype)
    torch.manual_seed(a.seed)
    trainer.run_cli({"train": cmd_train, "eval": cmd_eval, "recommend": cmd_recommend}, a)


if __name__ == "__main__":
    main()
