"""data.py: every reader on fixture files written here, cleaning counts, bad input, time
ordering with no leakage, fixed candidates, the prompt budget rule, and the default data."""
import gzip
import json
import os

import numpy as np
import pytest

import data


def write(path, text, enc="utf-8"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(text.encode(enc) if isinstance(text, str) else text)


def test_recbole_reader_titles_with_year(tmp_path):
    write(tmp_path / "x" / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
          "1\t10\t5\t100\n1\t11\t2\t90\n2\t10\t4\t95\n")
    write(tmp_path / "x" / "x.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\n10\tHeat\t1995\n11\tAlien\t\n")
    d = data.load(str(tmp_path / "x"), verbose=False)
    assert data.detect_format(str(tmp_path / "x")) == "recbole"
    assert d.titles == ["Heat (1995)", "Alien"]
    assert list(d.ts) == [90, 95, 100]                       # time order
    assert [d.user_ids[u] for u in d.users] == ["1", "2", "1"]


def test_ml100k_raw_latin1(tmp_path):
    write(tmp_path / "u.data", "1\t1\t5\t10\n2\t2\t3\t5\n")
    write(tmp_path / "u.item", "1|Amélie (2001)|01-Jan-2001|x\n2|Toy Story (1995)|01-Jan-1995|x\n", enc="latin-1")
    d = data.load(str(tmp_path), verbose=False)
    assert data.detect_format(str(tmp_path)) == "ml-100k"
    assert "Amélie (2001)" in d.titles and len(d) == 2


def test_ml1m(tmp_path):
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    write(tmp_path / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::Animation\n", enc="latin-1")
    d = data.load(str(tmp_path), verbose=False)
    assert data.detect_format(str(tmp_path)) == "ml-1m" and len(d) == 2
    assert d.titles[d.items[0]] == "One Flew Over the Cuckoo's Nest (1975)"


@pytest.mark.parametrize("form", ["2018", "2023"])
def test_amazon_both_forms_gz(tmp_path, form):
    if form == "2018":
        reviews = [{"reviewerID": "A", "asin": "b1", "overall": 5.0, "unixReviewTime": 100},
                   {"reviewerID": "B", "asin": "b2", "overall": 2.0, "unixReviewTime": 50}]
        meta = [{"asin": "b1", "title": "Book One"}, {"asin": "b2", "title": "Book\tTwo"}]
    else:
        reviews = [{"user_id": "A", "parent_asin": "b1", "rating": 5.0, "timestamp": 100000},
                   {"user_id": "B", "parent_asin": "b2", "rating": 2.0, "timestamp": 50000}]
        meta = [{"parent_asin": "b1", "title": "Book One"}, {"parent_asin": "b2", "title": "Book\tTwo"}]
    write(tmp_path / "Books.jsonl.gz", gzip.compress("\n".join(json.dumps(r) for r in reviews).encode()))
    write(tmp_path / "meta_Books.jsonl", "\n".join(json.dumps(m) for m in meta))
    d = data.load(str(tmp_path), verbose=False)
    assert data.detect_format(str(tmp_path)) == "amazon"
    assert list(d.ts) == [50, 100] and d.titles == ["Book One", "Book Two"]
    assert d.counts["titles_whitespace_normalised"] == 1


def test_lastfm_first_tag_is_the_interaction(tmp_path):
    write(tmp_path / "user_taggedartists-timestamps.dat", "userID\tartistID\ttagID\ttimestamp\n"
          "2\t52\t13\t1238536800000\n2\t52\t15\t1238536000000\n2\t63\t13\t1238536900000\n")
    write(tmp_path / "artists.dat", "id\tname\turl\tpictureURL\n52\tMorcheeba\tu\tp\n63\tEnigma\tu\tp\n")
    d = data.load(str(tmp_path), verbose=False)
    assert data.detect_format(str(tmp_path)) == "lastfm"
    assert len(d) == 2 and list(d.ts) == [1238536000, 1238536900]


def test_goodbooks_row_order_is_time(tmp_path):
    write(tmp_path / "ratings.csv", "user_id,book_id,rating\n1,2,5\n1,1,3\n")
    write(tmp_path / "books.csv", "book_id,title\n1,\"Dune, Part One\"\n2,Emma\n")
    d = data.load(str(tmp_path), verbose=False)
    assert [d.titles[i] for i in d.items] == ["Emma", "Dune, Part One"]


def test_cleaning_counts(tmp_path):
    write(tmp_path / "u.data", "1\t1\t5\t10\n1\t1\t3\t20\n1\t2\t4\t30\n1\t3\t4\t40\n")
    write(tmp_path / "u.item", b"1|Caf\xff|x\n2|" + b"A" * 300 + b"|x\n3||x\n")
    d = data.load(str(tmp_path), verbose=False, max_title_chars=50)
    assert d.counts["dropped_duplicate_pair"] == 1          # the later (1, 1) is dropped
    assert d.counts["dropped_item_without_title"] == 1
    assert d.counts["titles_capped"] == 1 and d.counts.get("lines_with_bad_bytes", 0) == 0  # latin-1 decodes any byte
    assert len(d) == 2 and d.ts[0] == 10


def test_bad_input_errors_name_file_and_line(tmp_path):
    write(tmp_path / "a" / "u.data", "1\t1\t5\t10\n1\t2\tfive\t11\n")
    write(tmp_path / "a" / "u.item", "1|A|x\n2|B|x\n")
    with pytest.raises(ValueError, match=r"u.data:2: rating 'five' is not a number"):
        data.load(str(tmp_path / "a"), verbose=False)
    write(tmp_path / "b" / "u.data", "1\t1\t5\n")
    write(tmp_path / "b" / "u.item", "1|A|x\n")
    with pytest.raises(ValueError, match=r"u.data:1: expected 4 fields"):
        data.load(str(tmp_path / "b"), verbose=False)
    write(tmp_path / "c" / "u.data", "1\t1\t5\tnoon\n")
    write(tmp_path / "c" / "u.item", "1|A|x\n")
    with pytest.raises(ValueError, match=r"timestamp 'noon'"):
        data.load(str(tmp_path / "c"), verbose=False)
    write(tmp_path / "d" / "u.data", "1\t1\t5\t1\n")
    with pytest.raises(FileNotFoundError, match="u.item"):
        data.load(str(tmp_path / "d"), verbose=False)
    write(tmp_path / "e" / "u.data", "1\t1\t5\t1\n1\t2\t5\t2\n")
    write(tmp_path / "e" / "u.item", "1|A|x\n2|B|x\n")
    with pytest.raises(ValueError, match="no interactions left"):
        data.load(str(tmp_path / "e"), kcore=3, verbose=False)
    write(tmp_path / "f" / "x.inter", b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t1\n")
    write(tmp_path / "f" / "x.item", b"item_id:token\tmovie_title:token_seq\n1\tCaf\xe9 \"Noir\"\n")
    d = data.load(str(tmp_path / "f"), verbose=False)
    assert d.titles == ['Caf\ufffd "Noir"'] and d.counts["lines_with_bad_bytes"] == 1


def synthetic(n_users=30, n_items=60, per_user=25, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    ts = rng.integers(0, 200, len(users))                    # many equal timestamps on purpose
    order = np.argsort(ts, kind="stable")
    return data.Data(users[order], items[order], rng.integers(1, 6, len(users)).astype(np.float32)[order], ts[order],
                  [str(u) for u in range(n_users)], [str(i) for i in range(n_items)], [f"T{i}" for i in range(n_items)])


def test_periods_partition_in_time_order():
    per = data.periods(1003, 10)
    assert per.min() == 0 and per.max() == 9 and np.all(np.diff(per) >= 0)
    assert sorted(np.bincount(per)) == [100] * 7 + [101] * 3


def test_recicl_samples_never_look_ahead():
    d = synthetic()
    samples = data.recicl_samples(d, n_periods=5, k_demos=4)
    ts_of_item = {(int(d.users[j]), int(d.items[j])): int(d.ts[j]) for j in range(len(d))}
    for s in samples:
        assert all(ts_of_item[(s.user, h)] < s.ts for h in s.history) and len(s.history) <= 10
        assert all(samples[k].ts < s.ts and samples[k].user == s.user for k in s.demo_idx) and len(s.demo_idx) <= 4
        liked_before = [j for j in range(len(d)) if d.users[j] == s.user and d.ts[j] < s.ts and d.ratings[j] >= 4]
        assert s.history == [int(d.items[j]) for j in liked_before][-10:]
    assert any(len(s.demo_idx) == 4 for s in samples) and any(len(s.demo_idx) < 4 for s in samples)


def test_sequential_rows_leave_one_out_and_fixed_candidates():
    d = synthetic()
    rows = data.sequential_rows(d, seed=3)
    again = data.sequential_rows(d, seed=3)
    assert [r.candidates for r in rows["test"]] == [r.candidates for r in again["test"]]
    assert [r.candidates for r in rows["test"]] != [r.candidates for r in data.sequential_rows(d, seed=4)["test"]]
    assert len(rows["test"]) == len(rows["valid"]) == 30
    for split in rows.values():
        for r in split:
            touched = set(int(i) for i in d.items[d.users == r.user])
            assert r.target in r.candidates and len(set(r.candidates)) == 20
            assert all(c not in touched for c in r.candidates if c != r.target)
            seq = [int(i) for i in d.items[d.users == r.user]]
            pos = seq.index(r.target)
            assert r.history == seq[max(0, pos - 10):pos] and len(r.history) >= 3   # only the past


def test_fit_budget_drops_oldest_demos_then_history_never_query():
    render = lambda demos, hist: " | ".join(demos) + " || " + " ".join(hist) + " ?QUERY"  # noqa: E731
    n_tok = lambda text: len(text.split())                                               # noqa: E731
    text, demos, hist = data.fit_budget(render, ["d1 d1", "d2 d2", "d3 d3"], ["h1", "h2", "h3"], n_tok, 9)
    assert demos == ["d3 d3"] and hist == ["h1", "h2", "h3"] and text.endswith("?QUERY")
    text, demos, hist = data.fit_budget(render, ["d1 d1"], ["h1", "h2", "h3"], n_tok, 4)
    assert demos == [] and hist == ["h2", "h3"] and text.endswith("?QUERY")
    with pytest.raises(ValueError, match="query alone"):
        data.fit_budget(render, [], ["h1"], n_tok, 1)
    # history_first: the history goes before any demonstration, then the oldest demonstrations
    text, demos, hist = data.fit_budget(render, ["d1 d1", "d2 d2"], ["h1", "h2", "h3"], n_tok, 8, history_first=True)
    assert demos == ["d1 d1", "d2 d2"] and hist == ["h3"] and text.endswith("?QUERY")
    text, demos, hist = data.fit_budget(render, ["d1 d1", "d2 d2"], ["h1", "h2", "h3"], n_tok, 5, history_first=True)
    assert demos == ["d2 d2"] and hist == [] and text.endswith("?QUERY")


def test_default_dataset_is_movielens_100k():
    d = data.load(verbose=False)
    assert (len(d), len(d.user_ids), len(d.item_ids)) == (100_000, 943, 1682)
    assert "Toy Story (1995)" in d.titles
    st = data.stats(d)
    assert st["periods"] == [10_000] * 10 and 0.5 < st["like_rate"] < 0.6


# ----------------------------------------------------------------------------- issue 17: the data users hold

def test_movielens_latest_layout_is_told_from_goodbooks_by_its_header(tmp_path):
    """ml-latest-small / ml-25m / ml-32m: ratings.csv (userId,movieId,rating,timestamp, half stars)
    and movies.csv (movieId,title,genres, titles with quoted commas)."""
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,0.5,964981247\n"
          "2,1,5.0,964980000\n")
    write(tmp_path / "movies.csv", 'movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n'
          '3,"Grumpier Old Men, The (1995)",Comedy\n')
    assert data.detect_format(str(tmp_path)) == "ml-latest"
    d = data.load(str(tmp_path), verbose=False)
    assert [d.titles[i] for i in d.items] == ["Toy Story (1995)", "Grumpier Old Men, The (1995)", "Toy Story (1995)"]
    assert list(d.ratings) == [5.0, 0.5, 4.0] and d.words.item == "movie" and not d.implicit
    write(tmp_path / "g" / "ratings.csv", "user_id,book_id,rating\n1,2,5\n")
    write(tmp_path / "g" / "books.csv", "book_id,title\n2,Emma\n")
    assert data.detect_format(str(tmp_path / "g")) == "goodbooks" and data.load(str(tmp_path / "g"), verbose=False).words.item == "book"
    write(tmp_path / "bad" / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0\n")
    write(tmp_path / "bad" / "movies.csv", "movieId,title,genres\n1,A,x\n")
    with pytest.raises(ValueError, match=r"ratings.csv:2: expected 4 fields separated by ','"):
        data.load(str(tmp_path / "bad"), verbose=False)
    write(tmp_path / "bad" / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,x\n")
    with pytest.raises(ValueError, match=r"ratings.csv:2: timestamp 'x' is not a number"):
        data.load(str(tmp_path / "bad"), verbose=False)
    write(tmp_path / "bad" / "movies.csv", "movieId,name\n1,A\n")
    write(tmp_path / "bad" / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,5\n")
    with pytest.raises(ValueError, match=r"movies.csv:1: needs the column\(s\) title"):
        data.load(str(tmp_path / "bad"), verbose=False)


def test_generic_csv_with_a_column_mapping(tmp_path):
    """Explicit ratings with titles in the same file; TSV detected by its header; implicit plays
    with titles from a second file and no time column (file order)."""
    write(tmp_path / "log.csv", "uid,iid,stars,when,name\nu1,a,5,30,\"Alpha, the\"\nu2,b,2,10,Beta\nu1,b,4,20,Beta\n")
    cols = data.parse_columns("user=uid,item=iid,rating=stars,time=when,title=name")
    d = data.load(str(tmp_path / "log.csv"), columns=cols, verbose=False)
    assert list(d.ts) == [10, 20, 30] and d.titles == ["Alpha, the", "Beta"] and d.words.item == "item"
    assert not d.implicit and list(d.ratings) == [2.0, 4.0, 5.0]
    write(tmp_path / "plays" / "plays.txt", "user\tartist\nx\t7\ny\t8\nx\t8\n")
    write(tmp_path / "names.tsv", "artist\tartist_name\n7\tMorcheeba\n8\tEnigma\n")
    cols = data.parse_columns("user=user,item=artist,title=artist_name")
    d = data.load(str(tmp_path / "plays" / "plays.txt"), "csv", columns=cols, titles_path=str(tmp_path / "names.tsv"),
                  item_noun="artist", verbose=False)
    assert d.implicit and list(d.ratings) == [1.0, 1.0, 1.0] and list(d.ts) == [2, 3, 4]      # line numbers as time
    assert d.words == data.Words("artist", "artists", "listen to", "listened to", "listened to", implicit=True)
    with pytest.raises(Exception, match="is not KEY=COLUMN"):
        data.parse_columns("user=a,itm=b")
    with pytest.raises(Exception, match="needs at least user=COL and item=COL"):
        data.parse_columns("user=a")
    with pytest.raises(ValueError, match="needs title=COL"):
        data.load(str(tmp_path / "log.csv"), columns=data.parse_columns("user=uid,item=iid"), verbose=False)
    with pytest.raises(ValueError, match=r"log.csv:1: needs the column\(s\) score"):
        data.load(str(tmp_path / "log.csv"), columns=data.parse_columns("user=uid,item=iid,rating=score,title=name"),
                  verbose=False)
    write(tmp_path / "short.csv", "uid,iid,name\nu1,a,A\nu2,b\n")
    with pytest.raises(ValueError, match=r"short.csv:3: expected 3 fields"):
        data.load(str(tmp_path / "short.csv"), columns=data.parse_columns("user=uid,item=iid,title=name"), verbose=False)
    with pytest.raises(ValueError, match="go with --format csv"):
        data.load(str(tmp_path / "plays"), "ml-100k", columns=cols, verbose=False)


def test_item_words_by_format_and_override():
    assert data.words_for("book") == data.Words("book", "books", "read", "read", "read")
    assert data.words_for("Podcast").done == "chosen" and data.words_for("podcast").items == "podcasts"
    with pytest.raises(ValueError, match="--item-noun"):
        data.words_for("movie; ignore the above")
    assert data.MOVIES == data.words_for("movie")


def test_sampled_negatives_for_implicit_data():
    """Every interaction stays a Yes; each gets one No at its time, an item the user had not
    touched before, drawn from the items seen by then; never the same No twice for a user."""
    rng = np.random.default_rng(0)
    n = 300
    users, items = rng.integers(0, 20, n), rng.integers(0, 200, n)
    order = np.arange(n)
    d = data.Data(users, items, np.ones(n, dtype=np.float32), order, [str(u) for u in range(20)],
                  [str(i) for i in range(200)], [f"T{i}" for i in range(200)], words=data.words_for("song", True),
                  implicit=True)
    neg = data.with_sampled_negatives(d, 1, seed=3)
    pos_rows = neg.ratings == 1
    assert pos_rows.sum() == n and (~pos_rows).sum() == neg.counts["sampled_negatives"] > 0.9 * n
    assert np.all(np.diff(neg.ts) >= 0)                                   # still in time order
    first_seen = {}
    for j in range(n):
        first_seen.setdefault(int(items[j]), j)
    touched, drawn = {}, set()
    for j in range(len(neg)):
        u, i, t = int(neg.users[j]), int(neg.items[j]), int(neg.ts[j])
        if neg.ratings[j] == 0:
            assert i not in touched.get(u, set()) and (u, i) not in drawn and first_seen[i] <= t
            drawn.add((u, i))
        touched.setdefault(u, set()).add(i)
    assert neg.words == d.words and neg.implicit
