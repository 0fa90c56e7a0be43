"""RecICL: real-time personalization for LLM recommendation with customized in-context learning
(arXiv 2410.23136). Tune once on samples laid out as in-context demonstrations; at serving
time the user's newest feedback enters the prompt as demonstrations, with no weight update.

    python recicl.py train                 # RecICL adapter (K = 4 demonstrations)
    python recicl.py train --demos 0       # the TALLRec-style baseline: same question, no demos
    python recicl.py eval                  # AUC / UAUC per test period D5..D9 beside causal controls
                                           # (DemoLikeRate, UserLikeRate, ItemLikeRate (t), LogReg,
                                           # frozen Pop / ItemLikeRate / MF), results.json
    python recicl.py recommend --user 42 [--feedback 50:5 ...]

Task: does user u like item i (rating >= threshold)? One block of the prompt:
    A user has given high ratings to the following movies: "A", "B". Leverage this to predict
    whether the user would enjoy the movie titled "X". Answer with "Yes" or "No".
    Answer: Yes
A training example is a system line, the user's K most recent earlier samples as such blocks
with their true answers, then the query block ending in "Answer:". The loss is a two-way
cross-entropy over the " Yes" / " No" logits at that last position (the notes: the
reference's class-balanced BCE gives zero loss on one-class batches); the score is
logit(Yes) - logit(No). Both answers must be single, distinct tokens (checked at start-up).
Implicit data (no ratings): every interaction is a Yes, and --implicit-negatives items the user
had not touched, drawn per interaction from the items seen by then, are the No's
(data.with_sampled_negatives); the history is then what the user did, not what they liked.

CPU defaults (a 2-core machine, SmolLM2-135M): a subsample of the training samples, shorter
histories inside demonstrations (--demo-history 3; the query keeps up to 10 liked titles) and a
prompt budget of 512 tokens, met by dropping the query's oldest history titles first, then the
oldest demonstrations, never the query's item (at 512 every eval prompt of the default run keeps
all the demonstrations its user has, and on average 7.2 of 8.8 query history titles). Flags take every part to the paper's full size.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from collections import defaultdict

import numpy as np
import torch

import data
import eval as metrics
import generate
from tokenizer import ChatML, Tokenizer
import train as trainer
from fetch import write_results

# ----------------------------------------------------------------------------- prompts

def system_line(w: data.Words = data.MOVIES) -> str:
    return (f"Predict whether the user will enjoy the {w.item}, from the {w.items} the user "
            f"{w.did if w.implicit else 'rated highly'} before.\n\n")


def block(liked_titles: list, title: str, answer: int | None = None, w: data.Words = data.MOVIES) -> str:
    """One block; w names the items (data.Words). Implicit data: the history is what the user
    did ("has listened to the following artists"), not what they rated highly."""
    liked = data.quoted_list(liked_titles) if liked_titles else "none yet"
    text = (f"A user has {w.done if w.implicit else 'given high ratings to'} the following {w.items}: {liked}. Leverage "
            f"this to predict whether the user would enjoy the {w.item} titled {data.quote(title)}. Answer with \"Yes\" "
            "or \"No\".\nAnswer:")
    return text if answer is None else text + (" Yes\n\n" if answer else " No\n\n")


def split_query(liked_titles: list, title: str, w: data.Words = data.MOVIES) -> tuple[str, str]:
    """The query block cut before ' "title"...': the first part is the same for every candidate.
    The cut falls at a pre-tokenizer boundary (a word, then ' "'), so tokenizing the two parts
    separately gives the same ids as tokenizing the whole block."""
    full = block(liked_titles, title, w=w)
    cut = full.rindex(" " + data.quote(title) + ". Answer with")      # the query's own item is the last one
    return full[:cut], full[cut:]


class Prompter:
    """Renders samples into token ids within a budget (data.fit_budget)."""

    def __init__(self, d: data.Data, samples: list, tok: Tokenizer, k_demos: int, demo_history: int, prompt_budget: int,
                 chat: ChatML | None = None):
        self.d, self.samples, self.tok, self.chat = d, samples, tok, chat
        self.k, self.demo_history, self.prompt_budget = k_demos, demo_history, prompt_budget
        self._rendered = {}              # (sample index, budget) -> render()

    def titles(self, items):
        return [self.d.titles[i] for i in items]

    def demo_text(self, s: data.Sample) -> str:
        hist = s.history[-self.demo_history:] if self.demo_history else []
        return block(self.titles(hist), self.d.titles[s.item], s.label, self.d.words)

    def text(self, demos: list, history: list, title: str) -> str:
        """System line, demonstration blocks (oldest first), then the query block."""
        return system_line(self.d.words) + "".join(self.demo_text(x) for x in demos) + block(self.titles(history), title,
                                                                                              w=self.d.words)

    def fit(self, demos: list, history: list, title: str) -> tuple[str, list, list]:
        """data.fit_budget on this prompt, cutting the query's oldest history titles before any
        demonstration, so that the prompt shows the K demonstrations it is said to show:
        (text, demonstrations kept, history kept)."""
        return data.fit_budget(lambda ds, hist: self.text(ds, hist, title), demos, history,
                            lambda t: len(self.encode(t)), self.prompt_budget, history_first=True)

    def render(self, s: data.Sample) -> tuple[str, list]:
        """(text, demonstration samples kept) for sample s."""
        key = s.idx, self.prompt_budget
        if key not in self._rendered:
            demos = [self.samples[j] for j in s.demo_idx[-self.k:]] if self.k else []
            text, kept, _ = self.fit(demos, s.history, self.d.titles[s.item])
            self._rendered[key] = text, kept
        return self._rendered[key]

    def ids(self, s: data.Sample) -> list:
        return self.encode(self.render(s)[0])

    def encode(self, text: str) -> list:
        """The ids of a prompt `text` renders: as it is, or with --chat in the model's chat template:
        the system line as the system turn, the rest as the user turn, then the assistant's turn
        opened (its first token is the answer)."""
        return self.tok.encode(text) if self.chat is None else self.chat.wrap(system_line(self.d.words), text)


def answer_ids(tok: Tokenizer, chat: bool = False) -> list:
    """[id of ' Yes', id of ' No'] (with chat: 'Yes', 'No', the first token of the assistant's
    turn), checked to be single distinct tokens and to be the tokens that follow 'Answer:' inside
    a demonstration (with chat: that follow the turn's 'assistant\n')."""
    lead, space = ("assistant\n", "") if chat else ("Answer:", " ")
    yes, no = tok.encode(space + "Yes", bos=False), tok.encode(space + "No", bos=False)
    if len(yes) != 1 or len(no) != 1 or yes == no:
        raise ValueError(f"this tokenizer does not encode {space + 'Yes'!r} / {space + 'No'!r} as single distinct tokens "
                         f"({yes}, {no})")
    base = tok.encode(lead, bos=False)
    for word, ids in ((space + "Yes", yes), (space + "No", no)):
        if tok.encode(lead + word, bos=False) != base + ids:
            raise ValueError(f"{lead + word!r} does not tokenize as {lead!r} followed by {ids}")
    return [yes[0], no[0]]


# ----------------------------------------------------------------------------- blocks layout

# --layout blocks: the prompt's text is the same blocks without the system line, but every block
# (a demonstration, or the query up to its answer cue) is encoded on its own at positions 0..,
# and only the query's answer cue reads the demonstrations, as a set (the parallel context
# windows of Ratner et al., ACL 2023, arXiv 2212.10947). A block's keys and values then do not
# depend on the prompt that holds it, so training packs a user's consecutive samples into one
# sequence, each rendered once, with a reader (a copy of its cue) per sample: about K + 1 times
# fewer tokens than one prompt per sample, with the same logits (tests/test_recicl.py).

BODY, TAIL, READ = 0, 1, 2     # token kinds: a block up to its cue; the cue and answer; a reader
CUE = "\nAnswer:"


def block_mask(owner: torch.Tensor, kind: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
    """Who attends to whom in the blocks layout: (T, T) bool, token t sees token s iff
      - t and s are in one sample's block (BODY or TAIL) and s <= t: a block is encoded alone;
      - t reads for sample a (READ) and s is in a block of a demonstration of a, or in a's own
        BODY (not its TAIL, which holds the answer), or is a reader token of a with s <= t.
    owner (T,): the sample of each token, an index into sees (-1: padding); kind (T,): BODY,
    TAIL or READ; sees (n, n): sees[a, b] = sample b is a demonstration of sample a.
    Every token sees itself (padding only itself)."""
    T = owner.shape[0]
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]
    real = owner >= 0
    same = (owner[:, None] == owner[None, :]) & real[:, None]
    demo = sees[owner.clamp(min=0)[:, None], owner.clamp(min=0)[None, :]] & real[:, None] & real[None, :]
    reader, in_block = kind[:, None] == READ, kind[None, :] != READ
    block_rule = same & causal & ~reader & in_block
    read_rule = reader & ((demo & in_block) | (same & (kind[None, :] == BODY)) | (same & ~in_block & causal))
    return block_rule | read_rule | torch.eye(T, dtype=torch.bool)


class BlockPrompter:
    """Sequences of the blocks layout. One rendering per sample: the block of `block` with
    `demo_history` liked titles, split into BODY (up to the cue) and TAIL (cue and answer)."""

    def __init__(self, d: data.Data, samples: list, tok: Tokenizer, k_demos: int, demo_history: int, max_seq_len: int):
        self.d, self.samples, self.tok = d, samples, tok
        self.k, self.demo_history, self.max_seq_len = k_demos, demo_history, max_seq_len
        self.cue = tok.encode(CUE, bos=False)
        self._parts = {}                 # sample index -> (body ids, tail ids)

    def demos(self, s: data.Sample) -> list:
        return [self.samples[j] for j in s.demo_idx[-self.k:]] if self.k else []

    def parts(self, s: data.Sample) -> tuple[list, list]:
        if s.idx not in self._parts:
            hist = s.history[-self.demo_history:] if self.demo_history else []
            text = block([self.d.titles[i] for i in hist], self.d.titles[s.item], w=self.d.words)
            body = text[:-len(CUE)]
            if not text.endswith(CUE):
                raise ValueError(f"a block must end in the cue {CUE!r}")
            answer = " Yes\n\n" if s.label else " No\n\n"
            self._parts[s.idx] = self.tok.encode(body), self.cue + self.tok.encode(answer, bos=False)
        return self._parts[s.idx]

    def render(self, s: data.Sample) -> tuple[str, list]:
        """(text of sample s's prompt, its demonstrations): the Prompter interface."""
        shown = self.demos(s)
        return "".join(self.tok.decode(sum(self.parts(x), [])) for x in shown) + self.tok.decode(self.parts(s)[0]) + CUE, shown

    def sequence(self, readers: list, whole_blocks: bool) -> dict:
        """One sequence: blocks, then a reader (the cue, at the positions that follow its body)
        for each sample of `readers`. whole_blocks=False: one prompt, the demonstrations'
        blocks and the reader's BODY (readers = [s]); True: a pack, the whole blocks of the
        readers and of their demonstrations, in sample order, each once.
        Returns ids, pos, owner, kind (T,), the mask (T, T), `read_at` (the slot of each
        reader's last token, which predicts its answer) and `labels`."""
        demos = {s.idx: self.demos(s) for s in readers}
        if whole_blocks:
            blocks = sorted({x.idx: x for s in readers for x in [s] + demos[s.idx]}.values(), key=lambda x: x.idx)
            pieces = [(x, ids, kind) for x in blocks for ids, kind in zip(self.parts(x), (BODY, TAIL))]
        else:
            (s,) = readers
            pieces = [(x, ids, kind) for x in demos[s.idx] for ids, kind in zip(self.parts(x), (BODY, TAIL))]
            pieces.append((s, self.parts(s)[0], BODY))
        owners = {idx: n for n, idx in enumerate(dict.fromkeys(x.idx for x, _, _ in pieces))}
        ids, pos, owner, kind, read_at = [], [], [], [], []
        for x, part, k in pieces:
            start = 0 if k == BODY else len(self.parts(x)[0])
            ids += part
            pos += range(start, start + len(part))
            owner += [owners[x.idx]] * len(part)
            kind += [k] * len(part)
        for s in readers:
            start = len(self.parts(s)[0])
            ids += self.cue
            pos += range(start, start + len(self.cue))
            owner += [owners[s.idx]] * len(self.cue)
            kind += [READ] * len(self.cue)
            read_at.append(len(ids) - 1)
        if len(ids) > self.max_seq_len:
            raise ValueError(f"a blocks-layout sequence of {len(ids)} tokens exceeds the model's max_seq_len "
                             f"{self.max_seq_len} (fewer samples per pack?)")
        sees = torch.zeros(len(owners), len(owners), dtype=torch.bool)
        for s in readers:
            for x in demos[s.idx]:
                sees[owners[s.idx], owners[x.idx]] = True
        owner_t, kind_t = torch.tensor(owner), torch.tensor(kind)
        mask = block_mask(owner_t, kind_t, sees)
        if (mask & ~torch.ones_like(mask).tril()).any():
            raise AssertionError("blocks layout: a token reads a later one (pieces out of order)")
        return {"ids": torch.tensor(ids), "pos": torch.tensor(pos), "owner": owner_t, "kind": kind_t, "mask": mask,
                "read_at": read_at, "labels": [s.label for s in readers]}


def blocks_logits(model, seqs: list, ans: list) -> torch.Tensor:
    """(N, 2) fp32 logits of [Yes, No] at every reader of the sequences (in order), batched with
    right padding (a pad token sees only itself); differentiable."""
    B, T, n = len(seqs), max(len(q["ids"]) for q in seqs), max(len(q["read_at"]) for q in seqs)
    idx, pos = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    mask = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1, 1)                       # (B, 1, T, T)
    at, real = torch.zeros(B, n, dtype=torch.long), torch.zeros(B, n, dtype=torch.bool)
    for b, q in enumerate(seqs):
        t, r = len(q["ids"]), len(q["read_at"])
        idx[b, :t], pos[b, :t], mask[b, 0, :t, :t] = q["ids"], q["pos"], q["mask"]
        at[b, :r], real[b, :r] = torch.tensor(q["read_at"]), True
    dev = generate.model_device(model)
    h = model(idx.to(dev), pos=pos.to(dev), mask=mask.to(dev), at=at.to(dev))    # (B, n, D)
    return model.head(h[real.to(dev)], torch.tensor(ans, device=dev))


# ----------------------------------------------------------------------------- scoring and loss

def yes_no_logits(model, rows_ids: list, ans: list) -> torch.Tensor:
    """(N, 2) fp32 logits of [Yes, No] after each prompt; differentiable (no no_grad here)."""
    idx, valid = generate.pad(rows_ids, left=False, device=generate.model_device(model))
    last = valid.long().sum(1, keepdim=True) - 1                    # (N, 1) slot of each prompt's last token
    h = model(idx, valid, at=last)                                   # (N, 1, D)
    return model.head(h[:, 0], torch.tensor(ans, device=idx.device))


def score(model, prompter: Prompter, samples: list, ans: list, batch_size: int = 8, log=None) -> np.ndarray:
    """logit(Yes) - logit(No) for each sample. Prompts are batched in order of length (less
    padding); the scores come back in the samples' order."""
    blocks = isinstance(prompter, BlockPrompter)
    ids = [prompter.sequence([x], whole_blocks=False) if blocks else prompter.ids(x) for x in samples]
    order = sorted(range(len(ids)), key=lambda k: len(ids[k]["ids"] if blocks else ids[k]))
    out, t0 = np.zeros(len(ids), dtype=np.float32), time.time()
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            lg = (blocks_logits if blocks else yes_no_logits)(model, [ids[k] for k in chunk], ans)
            out[chunk] = (lg[:, 0] - lg[:, 1]).cpu().numpy()
            if log and (s // batch_size) % 10 == 0:
                log(f"  scored {min(s + batch_size, len(ids))}/{len(ids)} ({time.time() - t0:.0f}s)")
    return out


def make_loss_fn(prompter, ans: list):
    """loss_fn(model, batch) for trainer.train: the two-way cross-entropy of each sample's
    answer. Examples are samples, or with a BlockPrompter, packs (lists of samples)."""
    if isinstance(prompter, BlockPrompter):
        def blocks_loss_fn(model, batch):
            seqs = [prompter.sequence(x, whole_blocks=True) if isinstance(x, list) else
                    prompter.sequence([x], whole_blocks=False) for x in batch]
            lg = blocks_logits(model, seqs, ans)
            target = torch.tensor([1 - y for q in seqs for y in q["labels"]], device=lg.device)  # 0 = Yes
            return torch.nn.functional.cross_entropy(lg, target), sum(len(q["ids"]) for q in seqs)
        return blocks_loss_fn

    def loss_fn(model, batch):
        ids = [prompter.ids(s) for s in batch]
        lg = yes_no_logits(model, ids, ans)                                          # (b, 2)
        target = torch.tensor([0 if s.label else 1 for s in batch], device=lg.device)  # 0 = Yes
        return torch.nn.functional.cross_entropy(lg, target), sum(len(i) for i in ids)
    return loss_fn


# ----------------------------------------------------------------------------- setup

def add_common(p):
    p.add_argument("--model", default=None, help="HF Llama directory (default: SmolLM2-135M-Instruct, fetched once)")
    data.add_args(p)
    p.add_argument("--out", default="runs/recicl", help="output directory (default: runs/recicl)")
    p.add_argument("--periods", type=trainer.count(2), default=10)
    p.add_argument("--train-periods", type=trainer.count(1), default=5, help="D0..D(n-1) train; the rest are test periods")
    p.add_argument("--threshold", type=trainer.real(-math.inf), default=4.0, help="rating at or above which the answer is "
                   "Yes (implicit data: every interaction, see --implicit-negatives)")
    p.add_argument("--implicit-negatives", type=trainer.count(1), default=1, help="implicit data (no ratings): items the "
                   "user had not touched, drawn per interaction as the No answers")
    p.add_argument("--demos", dest="k_demos", type=trainer.count(0), default=4, help="K demonstrations per prompt; 0 = TALLRec-style baseline")
    p.add_argument("--demo-history", type=trainer.count(0), default=3, help="liked titles shown inside each demonstration")
    p.add_argument("--prompt-budget", type=trainer.count(16), default=512, help="prompt budget in tokens")
    p.add_argument("--seed", type=int, default=0)
    generate.add_device_args(p)
    p.add_argument("--plain", action="store_true", help="the plain model.py path, without fast.py's CPU speed layer "
                   "(same results, slower on CPU)")
    generate.add_chat_arg(p, "every prompt, in training and scoring, wrapped (the system line as the system turn, "
                          "the rest as the user turn; the answer opens the assistant's turn; not with --layout blocks)")
    p.add_argument("--layout", choices=("causal", "blocks"), default="causal", help="causal: the paper's prompt, one "
                   "causal sequence; blocks: each block encoded alone, only the answer cue reads the demonstrations, "
                   "which lets training pack a user's samples (--pack); train and eval must use the same layout")


def add_train_args(p):
    p.add_argument("--train-samples", type=trainer.count(0), default=256, help="training samples drawn from D0..D4 (0 = all)")
    p.add_argument("--val-samples", type=trainer.count(1), default=96, help="held-out samples of the last training period")
    p.add_argument("--epochs", type=trainer.real(0, low_open=True), default=1.0)
    p.add_argument("--steps", type=trainer.count(0), default=0, help="optimizer steps (default: from samples and epochs)")
    p.add_argument("--pack", type=trainer.count(0), default=32, help="--layout blocks: samples per packed training "
                   "sequence (a user's consecutive samples; 0 = one prompt per sample)")
    trainer.add_args(p, batch_size=None, lr=3e-4, lora_r=8, lora_dropout=0.05, resume_from="OUT/icl or OUT/nodemo",
                     batch_help="examples per optimizer step: prompts (default 8), or packs with --layout blocks (default 1)")


def setup(a, log, tuned: str | None = None):
    """Data, samples, the model (the base, or with `tuned`: generate.load_model's), tokenizer,
    answer ids and the prompter of the command line."""
    d, a.threshold = data.binary_view(data.load_from_args(a), a.threshold, a.implicit_negatives, a.seed)
    if d.implicit:          # the stated rule for implicit data: data.with_sampled_negatives
        log(f"[recicl] implicit feedback: every interaction is a Yes, and {a.implicit_negatives} untouched "
            f"{d.words.item}(s) drawn per interaction are No ({d.counts['sampled_negatives']} in all)")
    samples = data.recicl_samples(d, a.periods, a.threshold, k_demos=max(a.k_demos, 0), max_history=10)
    model, tok = generate.load_model(a.model, dtype=a.dtype, device=a.device, plain=a.plain, tuned=tuned)
    if a.prompt_budget > model.args.max_seq_len:
        raise ValueError(f"--prompt-budget {a.prompt_budget} exceeds the model's context of {model.args.max_seq_len} tokens")
    a.chat = generate.use_chat(a.chat, a.model, tok, None if a.layout == "causal" else
                               "works with --layout causal only (a chat turn holds the whole prompt)")
    ans = answer_ids(tok, chat=a.chat)
    prompter = make_prompter(a, d, samples, tok, model, a.k_demos)
    log(f"[recicl] {len(samples)} samples; answer ids {ans}; K={a.k_demos}, budget {a.prompt_budget} tokens")
    return d, samples, model, tok, ans, prompter


def make_prompter(a, d, samples, tok, model, k_demos: int):
    if a.layout == "blocks":
        return BlockPrompter(d, samples, tok, k_demos, a.demo_history, model.args.max_seq_len)
    chat = generate.chat_template(a.model, tok) if a.chat else None
    return Prompter(d, samples, tok, k_demos, a.demo_history, a.prompt_budget, chat)


def run_name(k_demos: int) -> str:
    return "icl" if k_demos > 0 else "nodemo"


def log_fn(s):
    print(s, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- train

def split_for_training(samples, pool_periods: int, n_train: int, n_val: int, seed: int,
                       whole_users: bool = False, first_period: int = 0) -> tuple[list, list]:
    """(training samples, validation samples) from periods first_period..pool_periods-1: n_val
    held out of the last of them (at most half of it), then n_train drawn from the rest (0 = all):
    at random, or with whole_users the samples of users taken in random order (the last one
    cut), so that packs hold consecutive samples."""
    rng = random.Random(seed)
    pool = [s for s in samples if first_period <= s.period < pool_periods]
    last = [s for s in pool if s.period == pool_periods - 1]
    val = rng.sample(last, min(n_val, len(last) // 2))
    val_ids = {s.idx for s in val}
    rest = [s for s in pool if s.idx not in val_ids]
    if not n_train:
        return rest, val
    if not whole_users:
        return rng.sample(rest, min(n_train, len(rest))), val
    by_user = defaultdict(list)
    for s in rest:
        by_user[s.user].append(s)
    picked = []
    for u in rng.sample(sorted(by_user), len(by_user)):
        picked += by_user[u][:n_train - len(picked)]
        if len(picked) == n_train:
            break
    return picked, val


def packs(train_set: list, size: int) -> list:
    """The training samples as packs: each user's samples in time order, `size` at a time."""
    by_user = defaultdict(list)
    for s in sorted(train_set, key=lambda s: s.idx):
        by_user[s.user].append(s)
    return [run[k:k + size] for run in by_user.values() for k in range(0, len(run), size)]


def train_adapter(model, prompter, ans, train_set, val, cfg, lora_spec: dict, resume: bool, run_config: dict,
                  base_model: str):
    """Tune a LoRA adapter (lora_spec: lora.inject's arguments), or every weight (lora_spec None),
    on train_set, validated by AUC on val. Returns the training summary."""
    trainer.make_trainable(model, lora_spec)
    val_labels = np.array([s.label for s in val])
    validate = lambda m: metrics.auc(val_labels, score(m, prompter, val, ans))  # noqa: E731
    return trainer.train(model, train_set, make_loss_fn(prompter, ans), cfg, validate=validate, resume=resume,
                         run_config=run_config, base_model=base_model)


def tune(a, samples, model, prompter, ans, pool_periods: int, out_dir: str, first_period: int = 0,
         n_train: int | None = None) -> dict:
    """train_adapter with the command line's settings, on samples of periods first_period..
    pool_periods-1 (n_train of them; default --train-samples). A model that holds an adapter
    already goes on training it (--update continues from the D4 adapter)."""
    blocks = isinstance(prompter, BlockPrompter)
    n_train = a.train_samples if n_train is None else n_train
    train_set, val = split_for_training(samples, pool_periods, n_train, a.val_samples, a.seed, whole_users=blocks,
                                        first_period=first_period)
    examples = packs(train_set, a.pack) if blocks and a.pack else train_set
    steps = a.steps or math.ceil(len(examples) * a.epochs / a.batch_size)
    log_fn(f"[recicl] training on {len(train_set)} samples from D{first_period}..D{pool_periods - 1}"
           f"{f' in {len(examples)} packs' if examples is not train_set else ''}, {steps} steps of {a.batch_size}; "
           f"validating on {len(val)} held-out samples of D{pool_periods - 1}")
    run_config = {"method": "recicl", "args": vars(a), "train_samples": len(train_set), "val_samples": len(val),
                  "examples": len(examples), "periods": [first_period, pool_periods - 1]}
    return train_adapter(model, prompter, ans, examples, val, trainer.config_from_args(a, out_dir, steps),
                         trainer.lora_from_args(a), a.resume, run_config, a.model or "SmolLM2-135M-Instruct")


def tuned_model(adapter: str, model_dir: str | None, dtype, device, plain: bool):
    """A fresh copy of the base model with the adapter in directory `adapter` (or the whole model
    a full fine-tune saved there)."""
    return generate.load_model(model_dir, dtype=dtype, device=device, plain=plain, tuned=adapter)[0]


def cmd_train(a):
    t0 = time.time()
    d, samples, model, tok, ans, prompter = setup(a, log_fn)
    out_dir = os.path.join(a.out, run_name(a.k_demos))
    summary = tune(a, samples, model, prompter, ans, a.train_periods, out_dir)
    trainer.dist_close()
    best = "none finite" if summary["best"] is None else f"{summary['best']:.4f}"
    log_fn(f"[recicl] done in {time.time() - t0:.0f}s; best validation AUC {best}; adapter in {trainer.adapter_dir(out_dir)}")


# ----------------------------------------------------------------------------- eval

# (name, adapter run or None for the base model, whether the prompt shows the K demonstrations).
# Base and no-demo models given demonstrations at test time are the paper's motivating rows (a
# model tuned without ICL-format samples loses the ability to use demonstrations); each costs
# as much as the RecICL row, so they run with --icl-ablation.
# --methods picks them by key; the default leaves out the two ICL_ABLATION rows.
LLM_METHODS = {"zero-shot": ("zero-shot (base)", None, False), "base-icl": ("base + ICL", None, True),
               "tallrec": ("TALLRec (no-demo tuned)", "nodemo", False), "tallrec-icl": ("TALLRec + ICL", "nodemo", True),
               "recicl": ("RecICL", "icl", True)}
ICL_ABLATION = ("base-icl", "tallrec-icl")


def method_keys(text: str) -> list:
    """--methods: a comma-separated subset of LLM_METHODS' keys (argparse type)."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in LLM_METHODS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown method {bad[0] if bad else text!r}; choose from {', '.join(LLM_METHODS)}")
    return keys


def eval_rows(samples, test_periods, n_rows: int, rows_per_user: int, seed: int) -> dict:
    """period -> the rows every method is scored on. Users active in the period are drawn at
    random, each with up to `rows_per_user` of their rows there (drawn at random), until n_rows
    rows; n_rows 0 = every row of the period. Whole users, not scattered rows, so that UAUC (the
    mean of per-user AUCs) averages users with several answers each."""
    rng = random.Random(seed + 1)
    out = {}
    for p in test_periods:
        by_user = defaultdict(list)
        for s in samples:
            if s.period == p:
                by_user[s.user].append(s)
        if not n_rows:
            out[p] = [s for u in sorted(by_user) for s in by_user[u]]
            continue
        picked = []
        for u in rng.sample(sorted(by_user), len(by_user)):
            rs = by_user[u]
            picked += rng.sample(rs, min(rows_per_user, len(rs), n_rows - len(picked)))
            if len(picked) == n_rows:
                break
        out[p] = sorted(picked, key=lambda s: s.idx)
    return out


def user_clusters(rows) -> list:
    """Index arrays of `rows`, one per user (the bootstrap's resampling unit)."""
    by_user = defaultdict(list)
    for k, s in enumerate(rows):
        by_user[s.user].append(k)
    return [np.array(v) for v in by_user.values()]


def period_metrics(rows, scores, demos_shown=None, k: int = 0) -> dict:
    y = np.array([s.label for s in rows])
    u = np.array([s.user for s in rows])
    both = [x for x in np.unique(u) if 0 < y[u == x].sum() < (u == x).sum()]
    out = {"auc": round(metrics.auc(y, scores), 4), "uauc": round(metrics.uauc(u, y, scores), 4), "uauc_users": len(both),
           "n": len(rows), "users": len(np.unique(u))}
    if demos_shown is not None:         # shown in the prompt, of the user's earlier samples (at most K)
        out["demos_shown"] = round(float(np.mean(demos_shown)), 3)
        out["demos_available"] = round(float(np.mean([min(len(s.demo_idx), k) for s in rows])), 3)
    return out


def control_scores(d, samples, rows: dict, prompter: Prompter, k_demos: int, threshold: float, periods: int,
                   train_periods: int, seed: int, log) -> dict:
    """{control: {period: scores of its rows}}, every score from what was known before the row's
    time: the demonstrations' like rate (the share of Yes among the demonstrations the RecICL
    prompt shows), baselines.realtime_scores, and the classical models frozen after the
    training periods."""
    import baselines
    y = np.array([s.label for s in samples], dtype=np.float64)
    demo_likes = np.array([y[s.demo_idx[-k_demos:]].sum() if k_demos and s.demo_idx else 0.0 for s in samples])
    demo_n = np.array([min(len(s.demo_idx), k_demos) for s in samples], dtype=np.float64)
    train = np.array([s.period < train_periods for s in samples])
    per_item = baselines.realtime_scores(d, threshold, demo_likes, demo_n, train)
    per_item.update(baselines.binary_scores(d, periods, train_periods, threshold, seed, log))
    out = {"DemoLikeRate": {}}
    for p, rs in rows.items():
        shown = [prompter.render(s)[1] for s in rs]
        out["DemoLikeRate"][p] = np.array([(sum(x.label for x in k) + 0.5) / (len(k) + 1) for k in shown])
    for name, sc in per_item.items():
        out[name] = {p: sc[[s.idx for s in rs]] for p, rs in rows.items()}
    return out


def paired_to_best(rows: dict, llm: dict, controls: dict) -> tuple[str, dict]:
    """The control of highest mean AUC on these rows, and for each LLM method the mean over
    periods of its AUC minus that control's, with a 95% interval from resampling users."""
    mean_auc = {c: np.mean([metrics.auc([s.label for s in rs], sc[p]) for p, rs in rows.items()]) for c, sc in controls.items()}
    best = max(mean_auc, key=lambda c: mean_auc[c])
    order = list(rows)
    y = np.concatenate([[s.label for s in rows[p]] for p in order])
    offsets = np.cumsum([0] + [len(rows[p]) for p in order])
    strata = [[ix + offsets[k] for ix in user_clusters(rows[p])] for k, p in enumerate(order)]
    ctrl = np.concatenate([controls[best][p] for p in order])
    out = {}
    for name, sc in llm.items():
        point, lo, hi = metrics.paired_diff_ci(metrics.auc, y, np.concatenate([sc[p] for p in order]), ctrl, strata, n_boot=1000)
        out[name] = {"vs": best, "diff": round(point, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    return best, out


def stacked_scores(rows: dict, control: dict, llm: dict) -> dict:
    """{period: scores} of a logistic regression on (the control's score, the LLM's score), fitted
    on the other test periods' rows and applied to this period's (leave one period out). An
    analysis, not a method: it fits on later periods' answers. Its AUC above the control's alone
    means that the LLM's score carries something that the control's features do not."""
    import baselines
    out = {}
    for p in rows:
        fit = [q for q in rows if q != p]
        x = np.concatenate([np.c_[control[q], llm[q]] for q in fit])
        y = np.concatenate([[s.label for s in rows[q]] for q in fit]).astype(np.float64)
        w = baselines.fit_logreg(x, y)
        out[p] = np.c_[control[p], llm[p]] @ w[:-1] + w[-1]
    return out


def cmd_eval(a):
    t0 = time.time()
    d, samples, model, tok, ans, _ = setup(a, log_fn)
    rows = eval_rows(samples, range(a.train_periods, a.periods), a.eval_samples, a.rows_per_user, a.seed)
    prompters = {k: make_prompter(a, d, samples, tok, model, k) for k in (0, a.k_demos)}
    llm, shown = {}, {}
    keys = a.methods or [k for k in LLM_METHODS if a.icl_ablation or k not in ICL_ABLATION]
    for name, adapter, icl in (LLM_METHODS[k] for k in keys):
        m, prompter = model, prompters[a.k_demos if icl else 0]
        if adapter is not None:
            path = trainer.adapter_dir(os.path.join(a.out, adapter))
            if not trainer.is_saved(path):
                log_fn(f"[recicl] skipping {name}: no adapter at {path} (run: python recicl.py train"
                       f"{' --demos 0' if adapter == 'nodemo' else ''})")
                continue
            trainer.check_tuned_like(os.path.join(a.out, adapter), {"--layout": (a.layout, "causal"), "--chat": (a.chat, False)})
            m = tuned_model(path, a.model, a.dtype, a.device, a.plain)
        llm[name] = {}
        for p, rs in rows.items():
            log_fn(f"[recicl] {name} on D{p} ({len(rs)} rows, {time.time() - t0:.0f}s so far)")
            llm[name][p] = score(m, prompter, rs, ans, a.score_batch)
        shown[name] = {p: [len(prompter.render(s)[1]) for s in rs] for p, rs in rows.items()}
    if a.update and "RecICL" in llm:
        d4 = trainer.adapter_dir(os.path.join(a.out, "icl"))

        def tune_through(p, out_dir):
            """The D4 adapter, continued on what is new (D5..D(p-1)) at the rate it was tuned at."""
            n_new = round(a.train_samples * (p - a.train_periods) / a.train_periods) if a.train_samples else 0
            log_fn(f"[recicl] --update: continuing the D{a.train_periods - 1} adapter on D{a.train_periods}..D{p - 1} "
                   f"({n_new or 'all'} samples; {time.time() - t0:.0f}s so far)")
            tune(a, samples, tuned_model(d4, a.model, a.dtype, a.device, a.plain), prompters[a.k_demos], ans, p,
                 out_dir, first_period=a.train_periods, n_train=n_new)
        llm.update(updated_models(rows, prompters[a.k_demos], ans, os.path.join(a.out, "update"), tune_through,
                                  lambda path: tuned_model(path, a.model, a.dtype, a.device, a.plain), a.score_batch))
    controls = control_scores(d, samples, rows, prompters[a.k_demos], a.k_demos, a.threshold, a.periods,
                              a.train_periods, a.seed, log_fn)
    best, diffs = paired_to_best(rows, {k: v for k, v in llm.items() if k != UPDATED}, controls)
    stacked = {f"{best} + {name}'s score": stacked_scores(rows, controls[best], sc)
               for name, sc in llm.items() if name != UPDATED and len(rows) > 1}
    diffs.update(paired_to_best(rows, stacked, {best: controls[best]})[1])
    if UPDATED in llm:        # what updating buys a classical model, beside PDM (never the frozen rows' control)
        controls[MF_UPDATED] = updated_mf(d, rows, a.threshold, a.periods, a.seed)
    results = []
    for name, sc in list(llm.items()) + list(stacked.items()) + list(controls.items()):
        kind = "llm" if name in llm else "analysis" if name in stacked else "control"
        for p, rs in rows.items():
            if p in sc:
                results.append({"method": name, "kind": kind, "period": f"D{p}",
                                **period_metrics(rs, sc[p], shown.get(name, {}).get(p), a.k_demos)})
    report(results, diffs, best, a, time.time() - t0)


PDM_DEFINITION = ("PDM = mean over test periods t = D(T+1)..D(P-1) of [AUC on Dt of the RecICL adapter updated "
                  "through D(t-1)] - [AUC on Dt of the RecICL adapter tuned through D(T-1) = D4], where T is "
                  "--train-periods; the updated adapter is the D4 adapter trained on, with the same settings, on "
                  "samples of D(T)..D(t-1) at the rate of the first tuning (--train-samples per T periods). Both "
                  "score the same rows of Dt. Near 0: updating the model brings little; RecICL's demonstrations "
                  "carry the new feedback. Beside it, the same difference for MF retrained through D(t-1).")
UPDATED = "RecICL updated through D(t-1)"
MF_UPDATED = "MF retrained through D(t-1)"


def updated_mf(d, rows: dict, threshold: float, periods: int, seed: int) -> dict:
    """{period t: MF scores of Dt's rows}, MF retrained on D0..D(t-1), for every test period after the first."""
    import baselines
    per, y, _ = baselines.binary_split(d, periods, 0, threshold)
    out = {}
    for p in list(rows)[1:]:
        mf = baselines.train_mf(d, y, per < p, seed=seed, log=log_fn)
        with torch.no_grad():
            out[p] = mf(torch.tensor([s.user for s in rows[p]]), torch.tensor([s.item for s in rows[p]])).numpy()
    return out


def updated_models(rows, prompter, ans, update_dir: str, tune_through, load_tuned, score_batch: int) -> dict:
    """{UPDATED: {period: scores}}: for each test period t after the first, an adapter tuned
    through D(t-1) (tune_through(t, directory), or reused from update_dir/through_D(t-1)) scores
    Dt's rows; load_tuned(adapter directory) gives the base model with that adapter."""
    out = {}
    for p in list(rows)[1:]:
        out_dir = os.path.join(update_dir, f"through_D{p - 1}")
        if not trainer.is_saved(trainer.adapter_dir(out_dir)):
            tune_through(p, out_dir)
        m = load_tuned(trainer.adapter_dir(out_dir))      # the best adapter, not the last step
        out[p] = score(m, prompter, rows[p], ans, score_batch)
    return {UPDATED: out}


def report(results, diffs, best, a, elapsed):
    periods = [f"D{p}" for p in range(a.train_periods, a.periods)]
    width = max([26] + [len(r["method"]) + 1 for r in results])
    print(f"{'method':<{width}}" + "".join(f"{p:>7}" for p in periods) + f"{'AUC':>7}{'UAUC':>7}{'users':>6}{'demos':>10}"
          f"   AUC - {best} (best control), 95% CI")
    summary = []
    for name in dict.fromkeys(r["method"] for r in results):
        mine = {r["period"]: r for r in results if r["method"] == name}
        aucs = [mine[p]["auc"] if p in mine else float("nan") for p in periods]
        row = {"method": name, "kind": next(iter(mine.values()))["kind"], "mean_auc": round(float(np.nanmean(aucs)), 4),
               "mean_uauc": round(float(np.nanmean([r["uauc"] for r in mine.values()])), 4),
               "mean_uauc_users": round(float(np.mean([r["uauc_users"] for r in mine.values()])), 1)}
        if "demos_shown" in next(iter(mine.values())):
            for key in ("demos_shown", "demos_available"):
                row[f"mean_{key}"] = round(float(np.mean([r[key] for r in mine.values()])), 3)
        if name in diffs:
            row["vs_best_control"] = diffs[name]
        summary.append(row)
        d = diffs.get(name)
        print(f"{name:<{width}}" + "".join(f"{x:>7.3f}" for x in aucs) + f"{row['mean_auc']:>7.3f}{row['mean_uauc']:>7.3f}"
              f"{row['mean_uauc_users']:>6.1f}"
              + (f"{row['mean_demos_shown']:>5.2f}/{row['mean_demos_available']:<4.2f}" if "mean_demos_shown" in row else " " * 10)
              + (f"   {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else ""))
    print("AUC per period and mean; UAUC: mean over periods of the mean per-user AUC, over the users ('users', per "
          "period) whose rows hold both classes; demos: mean demonstrations shown per prompt / the user's earlier samples "
          "available (at most K).")
    if any(r["kind"] == "analysis" for r in results):
        print(f"'{best} + X's score': a logistic regression on both scores, fitted on the other test periods' rows "
              f"(an analysis, not a method); above {best} alone, X's score carries something the control does not.")
    if any(r["method"] == UPDATED for r in results):
        gains = [next(r["auc"] for r in results if r["method"] == UPDATED and r["period"] == p) -
                 next(r["auc"] for r in results if r["method"] == "RecICL" and r["period"] == p)
                 for p in periods[1:]]
        mf_gains = [next(r["auc"] for r in results if r["method"] == MF_UPDATED and r["period"] == p) -
                    next(r["auc"] for r in results if r["method"] == "MF" and r["period"] == p) for p in periods[1:]]
        summary.append({"method": "PDM", "pdm": round(float(np.mean(gains)), 4),
                        "per_period": [round(g, 4) for g in gains], "mf_update_gain": round(float(np.mean(mf_gains)), 4),
                        "mf_per_period": [round(g, 4) for g in mf_gains], "definition": PDM_DEFINITION})
        print(f"PDM = {summary[-1]['pdm']:+.4f} (per period {summary[-1]['per_period']}); the same for MF: "
              f"{summary[-1]['mf_update_gain']:+.4f} (per period {summary[-1]['mf_per_period']}). {PDM_DEFINITION}")
    path = write_results({"config": vars(a), "elapsed_s": round(elapsed, 1), "best_control": best, "summary": summary,
                          "rows": results}, a.out)
    log_fn(f"[recicl] wrote {path} ({elapsed:.0f}s)")


# ----------------------------------------------------------------------------- recommend

def cmd_recommend(a):
    if a.layout != "causal":
        sys.exit("error: recommend ranks with the causal layout only (score blocks-layout adapters with eval)")
    path = trainer.adapter_dir(os.path.join(a.out, run_name(a.k_demos)))
    if not trainer.is_saved(path):
        log_fn(f"[recicl] no adapter at {path}: ranking with the base model (run: python recicl.py train)")
    d, samples, model, tok, ans, prompter = setup(a, log_fn, tuned=path if trainer.is_saved(path) else None)
    if a.user not in d.user_ids:
        sys.exit(f"error: unknown user {a.user!r}")
    u = d.user_ids.index(a.user)
    item_ix = {iid: k for k, iid in enumerate(d.item_ids)}
    history = [(int(d.items[j]), float(d.ratings[j])) for j in np.flatnonzero(d.users == u)]
    for fb in a.feedback or []:
        iid, _, rating = fb.partition(":")
        try:
            value = float(rating)
        except ValueError:
            value = math.nan
        if iid not in item_ix or not math.isfinite(value):
            sys.exit(f"error: --feedback wants ITEM:RATING with a known item id and a finite rating, got {fb!r}")
        history.append((item_ix[iid], value))
    seen = {i for i, _ in history}
    if a.items:
        bad = [i for i in a.items if i not in item_ix]
        if bad:
            sys.exit(f"error: unknown items {bad}")
        cands = [item_ix[i] for i in a.items]
    else:
        pop = np.bincount(d.items, minlength=len(d.item_ids))
        cands = [i for i in np.argsort(-pop, kind="stable") if i not in seen][:a.max_candidates]
    ranked = rank_for_user(model, tok, prompter, d, history, cands, ans, a.k_demos, a.threshold, a.batch_size)
    print(f"user {a.user}: {len(history)} interactions ({len(a.feedback or [])} new), latest liked: "
          f"{data.quoted_list([d.titles[i] for i, r in history if r >= a.threshold][-5:])}")
    for n, (i, s) in enumerate(ranked[:a.top], 1):
        print(f"{n:>3}. {s:+.3f}  {d.titles[i]}  (item {d.item_ids[i]})")


def rank_for_user(model, tok, prompter, d, history, cands, ans, k_demos: int, threshold: float, batch_size: int = 16):
    """Score candidates by logit(Yes) - logit(No) with the user's latest feedback as
    demonstrations. The prompt up to the candidate's title is computed once (shared prefix);
    the prompter's budget (--prompt-budget), met for the longest candidate, drops the oldest
    demonstrations first."""
    liked = [i for i, r in history if r >= threshold][-10:]
    demos = []                       # the user's latest K interactions, each with what it knew
    for k in range(max(0, len(history) - k_demos), len(history)) if k_demos else []:
        i, r = history[k]
        liked_before = [x for x, rr in history[:k] if rr >= threshold][-10:]
        demos.append(data.Sample(-1, -1, i, int(r >= threshold), 0, 0, liked_before, []))
    longest = max(cands, key=lambda c: len(tok.encode(d.titles[c], bos=False)))
    _, demos, liked = prompter.fit(demos, liked, d.titles[longest])
    titles = prompter.titles(liked)
    system, head = system_line(d.words), "".join(prompter.demo_text(s) for s in demos) + split_query(titles, d.titles[longest], d.words)[0]
    tails = [split_query(titles, d.titles[c], d.words)[1] for c in cands]
    if prompter.chat is None:
        prefix, suffixes = tok.encode(system + head), [tok.encode(t, bos=False) for t in tails]
    else:                            # Prompter.encode's chat turns, cut inside the user turn
        prefix, suffixes = prompter.chat.wrap_split(system, head), [prompter.chat.wrap_tail(t) for t in tails]
    lg = generate.next_token_logits(model, suffixes, prefix=prefix, batch_size=batch_size, vocab_ids=ans)
    s = (lg[:, 0] - lg[:, 1]).tolist()
    return sorted(zip(cands, s), key=lambda x: -x[1])


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="RecICL: ICL-format tuning and real-time personalization (arXiv 2410.23136).")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="tune a LoRA adapter on ICL-format samples of the training periods")
    add_common(t)
    add_train_args(t)
    e = sub.add_parser("eval", help="AUC/UAUC per test period: base and tuned models with and without demonstrations, "
                       "beside real-time and classical controls on the same rows")
    add_common(e)
    e.add_argument("--eval-samples", type=trainer.count(0), default=150, help="rows per test period, from whole users (0 = all)")
    e.add_argument("--rows-per-user", type=trainer.count(1), default=10, help="at most this many rows of each drawn user")
    add_train_args(e)
    e.add_argument("--score-batch", type=trainer.count(1), default=8, help="prompts per forward when scoring")
    e.add_argument("--icl-ablation", action="store_true", help="also score the base model and the no-demo tuned "
                   "model with the K demonstrations (the paper's motivating rows; each as slow as the RecICL row)")
    e.add_argument("--methods", type=method_keys, default=None, help="the LLM rows to score, comma-separated, from "
                   f"{', '.join(LLM_METHODS)} (default: all but {' and '.join(ICL_ABLATION)}, which --icl-ablation adds)")
    e.add_argument("--update", action="store_true", help="also tune adapters through D(t-1) for each test period t "
                   "and report PDM (slow: one training run per period)")
    r = sub.add_parser("recommend", help="rank candidate items for a user with their latest feedback in the prompt")
    add_common(r)
    r.add_argument("--user", required=True, help="user id as in the dataset")
    r.add_argument("--items", nargs="*", help="candidate item ids (default: the most popular unseen items)")
    r.add_argument("--max-candidates", type=trainer.count(1), default=100)
    r.add_argument("--feedback", nargs="*", help="new feedback ITEM:RATING, appended as the newest interactions")
    r.add_argument("--top", type=trainer.count(1), default=10)
    r.add_argument("--batch-size", type=trainer.count(1), default=32)
    a = p.parse_args(argv)
    a.dtype = generate.default_dtype(a.device, a.dtype)
    if getattr(a, "batch_size", 0) is None:
        a.batch_size = 1 if a.layout == "blocks" and a.pack else 8
    if a.train_periods >= a.periods:
        p.error(f"--train-periods {a.train_periods} must be below --periods {a.periods} (the rest are test periods)")
    torch.manual_seed(a.seed)
    trainer.run_cli({"train": cmd_train, "eval": cmd_eval, "recommend": cmd_recommend}, a)


if __name__ == "__main__":
    main()
