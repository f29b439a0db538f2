"""`select --top COLUMN:P% [--by GROUP]` (curate.rank): exactly ceil(P% of N) rows per group,
ties by key hash the same on every rerun, streamed by radix selection; one-line errors."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from shards import CAPTION_SCHEMA, ShardWriter, iter_batches
from shards.hashing import hash_strings

SCORE_SCHEMA = pa.schema([("key", pa.string()), ("clip_score", pa.float32()), ("lang", pa.string()), ("jpeg_quality", pa.int32()),
                          ("error", pa.string())])  # fmt: skip


def write_scores(root: Path, n: int = 3000, seed: int = 0) -> dict:
    """Caption shards and score shards of `n` rows: clip_score rounded to 2 decimals (many ties),
    some null, a lang column with a null group, an integer column with few values."""
    rng = np.random.default_rng(seed)
    keys = [f"img/{i:05d}.jpg" for i in rng.permutation(n)]
    score = np.round(rng.uniform(0.1, 0.4, n), 2)
    score[::53] = np.nan
    lang = rng.choice(np.array(["en", "fr", "de", None], dtype=object), n, p=[0.6, 0.2, 0.15, 0.05])
    jpeg = rng.integers(60, 64, n)
    caps, scores = ShardWriter(root / "caps", rows_per_shard=700), ShardWriter(root / "scores", rows_per_shard=450, schema=SCORE_SCHEMA)
    for k, s, l, j in zip(keys, score, lang, jpeg):
        caps.add({"key": k, "caption": f"caption of {k}"})
        scores.add({"key": k, "clip_score": None if np.isnan(s) else float(s), "lang": l, "jpeg_quality": int(j)})
    caps.close()
    scores.close()
    return {"keys": keys, "clip_score": score, "lang": lang, "jpeg_quality": jpeg}


def expected(data: dict, column: str, percent: str, by: str | None = None, keep=None) -> set[str]:
    """The brute-force answer: per group, sort by (value desc, key hash asc), keep ceil(p N)."""
    keys, values = data["keys"], np.asarray(data[column], np.float64)
    h = hash_strings(keys)
    groups: dict = {}
    for i, k in enumerate(keys):
        if np.isnan(values[i]) or (keep is not None and not keep(i)):
            continue
        groups.setdefault(None if by is None else data[by][i], []).append(i)
    out = set()
    for rows in groups.values():
        rows.sort(key=lambda i: (-values[i], int(h[i])))
        out |= {keys[i] for i in rows[: math.ceil(Fraction(percent) * len(rows) / 100)]}
    return out


def selected(out: Path) -> list[str]:
    return [k for b in iter_batches(out, ["key"]) for k in b.column("key").to_pylist()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    return {"root": root, **write_scores(root)}


@pytest.mark.parametrize("collect", [1 << 16, 4])  # rows collected at once, and the radix passes forced
@pytest.mark.parametrize("percent, by", [("30", None), ("30", "lang"), ("0.1", "lang"), ("100", None), ("33.3", None)])
def test_top_keeps_exactly_ceil_p_n_with_ties_by_key_hash(data, tmp_path, monkeypatch, percent, by, collect):
    import curate.rank as R
    from curate.select import run_select

    monkeypatch.setattr(R, "COLLECT", collect)
    root = data["root"]
    s = run_select(root / "caps", root / "scores", None, tmp_path / "a", top=f"clip_score:{percent}%", by=by)
    got = selected(tmp_path / "a")
    want = expected(data, "clip_score", percent, by)
    assert len(got) == len(set(got)) == s.kept == len(want) and set(got) == want
    nulls = int(np.isnan(data["clip_score"]).sum())
    assert s.removed == [(f"top clip_score:{percent}%" + (f" by {by}" if by else ""), len(data["keys"]) - len(want))] and nulls
    again = run_select(root / "caps", root / "scores", None, tmp_path / "b", top=f"clip_score:{percent}%", by=by)
    assert selected(tmp_path / "b") == got and again.kept == s.kept  # a rerun keeps the same rows, ties included


def test_top_on_an_integer_column_breaks_its_many_ties_by_key_hash(data, tmp_path, monkeypatch):
    import curate.rank as R
    from curate.select import run_select

    monkeypatch.setattr(R, "COLLECT", 8)
    run_select(data["root"] / "caps", data["root"] / "scores", None, tmp_path / "q", top="jpeg_quality:10%")
    assert set(selected(tmp_path / "q")) == expected(data, "jpeg_quality", "10")


def test_where_applies_first_then_top_among_the_rows_that_pass(data, tmp_path):
    from curate.select import run_select

    root = data["root"]
    s = run_select(root / "caps", root / "scores", "lang = 'en' and jpeg_quality >= 61", tmp_path / "w", top="clip_score:25%")
    keep = lambda i: data["lang"][i] == "en" and data["jpeg_quality"][i] >= 61  # noqa: E731
    want = expected(data, "clip_score", "25", keep=keep)
    assert set(selected(tmp_path / "w")) == want and s.kept == len(want)
    n_en = sum(1 for l in data["lang"] if l == "en")
    assert s.removed[0] == ("lang = 'en'", len(data["keys"]) - n_en)
    assert [t for t, _ in s.removed] == ["lang = 'en'", "jpeg_quality >= 61", "top clip_score:25%"]
    assert sum(n for _, n in s.removed) + s.kept == len(data["keys"])


def test_where_over_caption_columns_with_top(data, tmp_path):
    """A --where that reads caption columns is evaluated on the joined frame first; --top ranks the rest."""
    from curate.select import run_select

    root = data["root"]
    run_select(root / "caps", root / "scores", "caption like '%0.jpg'", tmp_path / "c", top="clip_score:50%")
    want = expected(data, "clip_score", "50", keep=lambda i: data["keys"][i].endswith("0.jpg"))
    assert set(selected(tmp_path / "c")) == want


def test_resume_after_a_crash_writes_no_row_twice(data, tmp_path):
    from curate.select import run_select

    root, out = data["root"], tmp_path / "r"
    full = run_select(root / "caps", root / "scores", None, out, top="clip_score:40%", shard_size=100)
    shards = sorted(out.glob("*.parquet"))
    for shard in shards[-3:]:
        Path(str(shard) + ".done").unlink()
    again = run_select(root / "caps", root / "scores", None, out, top="clip_score:40%", shard_size=100)
    got = selected(out)
    assert len(got) == len(set(got)) == full.kept and 0 < again.written < full.kept
    with pytest.raises(Exception, match="same --top"):
        run_select(root / "caps", root / "scores", None, out, top="clip_score:41%")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top", "clip_score:0%"], "error: bad --top 'clip_score:0%': the share 0% is outside (0, 100]"),
        (["--top", "clip_score:150%"], "the share 150% is outside (0, 100]"),
        (["--top", "clip_score:-5%"], "error: bad --top 'clip_score:-5%': give COLUMN:P% with 0 < P <= 100"),
        (["--top", "clip_score:30"], "give COLUMN:P% with 0 < P <= 100"),
        (["--top", "clip_scor:30%"], "error: unknown --top column 'clip_scor': use one of the score columns key, clip_score"),
        (["--top", "lang:30%"], "error: --top column 'lang' holds string, not numbers"),
        (["--top", "clip_score:30%", "--by", "langu"], "error: unknown --by column 'langu'"),
        (["--by", "lang", "--where", "clip_score > 0"], "error: --by needs --top"),
        (["--where", "clip_score >= abc", "--top", "clip_score:30%"], "error: bad --where"),
        (["--where", "clip_score >>= 0.3"], "error: bad --where"),
        ([], "error: empty --where"),
    ],
)
def test_bad_top_by_and_thresholds_are_one_line_errors(data, tmp_path, args, message):
    from cli import app

    root = data["root"]
    res = CliRunner().invoke(app, ["select", "--shards", str(root / "caps"), "--scores", str(root / "scores"), "--out", str(tmp_path / "x"), *args])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert message in lines[0], lines[0]


def test_parse_top_is_exact_in_fractions():
    from curate.rank import parse_top

    top = parse_top(" clip_score : 30 % ")
    assert (top.column, top.percent) == ("clip_score", Fraction(30))
    assert [top.quota(n) for n in (0, 1, 10, 11, 100)] == [0, 1, 3, 4, 30]  # 0.3 * 10 is 3, not 4
    assert parse_top("aesthetic:33.3%").quota(1000) == 333 and parse_top("a:1e1%").percent == 10


def test_rank_keys_order_values_then_hashes():
    from curate.rank import rank_keys

    values = np.array([-2.5, -0.0, 0.0, 1e-300, 3.0, 3.0, np.inf, -np.inf])
    hashes = np.array([5, 5, 4, 5, 7, 6, 5, 5], np.uint64)
    hi, lo = rank_keys(values, hashes)
    order = sorted(range(len(values)), key=lambda i: (int(hi[i]), int(lo[i])), reverse=True)
    assert order == [6, 5, 4, 3, 2, 1, 0, 7]  # inf, 3.0 (hash 6 before 7), ..., 0.0 (hash 4) before -0.0 (hash 5), -inf
