"""The `phash` scorer and its perceptual-duplicate groups (curate.phash, curate.phash_groups):
recompressed and resized copies share a group, different images do not; multi-index hashing
finds exactly the groups of an all-pairs comparison."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from shards import ShardWriter, complete_shards
from tiny.images import photo


def brute_force_roots(codes: np.ndarray, distance: int) -> np.ndarray:
    """Each hash's group (its smallest member), from every pair (the naive way)."""
    d = np.bitwise_count(codes[:, None] ^ codes[None, :]) <= distance
    parent = np.arange(len(codes))
    for a, b in zip(*np.nonzero(np.triu(d, 1))):
        ra, rb = a, b
        while parent[ra] != ra:
            ra = parent[ra]
        while parent[rb] != rb:
            rb = parent[rb]
        parent[max(ra, rb)] = min(ra, rb)
    while not np.array_equal(parent[parent], parent):
        parent = parent[parent]
    return parent


@pytest.mark.parametrize("way", [None, "flip", "exact"])
@pytest.mark.parametrize("distance", [1, 4, 6])
def test_multi_index_hashing_finds_the_all_pairs_groups(distance, way, monkeypatch):
    import curate.phash_groups as G

    monkeypatch.setattr(G, "BLOCK_PAIRS", 64)  # many small candidate blocks
    rng = np.random.default_rng(distance)
    base = rng.integers(0, 1 << 62, 1500, dtype=np.uint64) * np.uint64(3)
    near = base[rng.integers(0, 1500, 400)]
    for _ in range(distance + 1):  # copies within and just beyond the distance, chains too
        near ^= np.uint64(1) << rng.integers(0, 64, len(near)).astype(np.uint64)
    codes = np.concatenate([base, near, base[:50]])  # and exact repeats
    if way is not None:
        monkeypatch.setattr(G, "chunk_plan", lambda n, d: (way, (G.flip_plan if way == "flip" else G.exact_plan)(n, d)[1]))
    rep = G.group_rows(codes, np.ones(len(codes), bool), distance)
    truth = brute_force_roots(codes, distance)
    assert np.array_equal(rep, truth), (rep != truth).sum()
    assert (rep != np.arange(len(codes))).sum() >= 50


def test_the_exact_key_way_finds_each_near_pair_once_even_in_crowded_keys(monkeypatch):
    """Hashes that share most bits (one crowded run per key set, beyond a block), every pair
    within the distance found exactly once, and the far ones never."""
    import curate.phash_groups as G

    monkeypatch.setattr(G, "BLOCK_PAIRS", 50)
    rng = np.random.default_rng(7)
    codes = np.unique(np.uint64(0xF0F0_1234_5678_9ABC) ^ (rng.integers(0, 1 << 12, 400, dtype=np.uint64) << np.uint64(20)))
    for distance in (2, 4, 7):
        found = [np.stack([np.minimum(a, b), np.maximum(a, b)], 1) for a, b in G.near_pairs(codes, distance, way="exact")]
        got = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
        d = np.bitwise_count(codes[:, None] ^ codes[None, :]) <= distance
        truth = np.argwhere(np.triu(d, 1))
        assert len(got) == len(truth) and len(np.unique(got, axis=0)) == len(truth), (distance, len(got), len(truth))
        assert np.array_equal(np.unique(got, axis=0), truth)


def test_chunk_plans_cover_64_bits_and_the_cheaper_way_wins():
    from curate.phash_groups import chunk_plan, exact_plan, flip_plan

    for n in (10, 20_000, 1_000_000, 10_000_000):
        for d in (1, 4, 8, 12):
            cost, plan = flip_plan(n, d)
            assert sum(b for _, b in plan) == 64 and max(b for _, b in plan) <= 24 and len(plan) >= 3
            assert [s for s, _ in plan] == list(np.cumsum([0] + [b for _, b in plan][:-1]))
            exact_cost, chunks = exact_plan(n, d)
            assert sum(b for _, b in chunks) == 64 and len(chunks) > d
            assert chunk_plan(n, d) == (("flip", plan) if cost < exact_cost else ("exact", chunks))
    assert chunk_plan(10_000_000, 4)[0] == "exact"  # sorts by 3 of 7 chunks beat ~5 candidates a flipped look-up


def test_phash_matches_the_dct_definition_and_is_robust_to_copies():
    from curate.phash import grey_pixels, hamming, phash_bits, phashes

    images = [_jpeg(photo(i, 128), 90) for i in range(40)]
    pixels = grey_pixels(images)
    n = pixels.shape[1]
    k = np.arange(n)
    c = np.cos(np.pi * k[:, None] * (2 * k[None, :] + 1) / (2 * n))
    dct = np.einsum("ij,bjk,lk->bil", c, pixels, c)[:, :8, :8].reshape(len(images), -1)  # DCT-II, rows then columns
    bits = dct > np.median(dct, axis=1, keepdims=True)
    assert np.array_equal(phash_bits(pixels), bits)
    h = phashes(images)
    assert h.dtype == np.uint64 and int(h[0]) == int("".join("1" if b else "0" for b in bits[0]), 2)  # bit 63 first
    copies = phashes([_jpeg(im.resize((90, 90), Image.LANCZOS), 40) for im in images])
    assert (hamming(h, copies) <= 4).all()
    others = hamming(h[:, None], h[None, :])[~np.eye(len(h), dtype=bool)]
    assert others.min() > 8


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _copies_world(root: Path, n: int = 30) -> tuple[Path, dict[str, str]]:
    """Caption shards of `n` photo-like images (tiny.images.photo), each with a recompressed copy,
    a resized copy and a resized-and-recompressed one. Returns {key: its original's key}."""
    folder = root / "images"
    folder.mkdir()
    writer, truth = ShardWriter(root / "captions", rows_per_shard=25), {}
    for i in range(n):
        im, key = photo(1000 + i, 256), f"photo{i:03d}"
        for name, (side, quality) in {key: (256, 92), f"{key}_q30": (256, 30), f"{key}_small": (128, 90), f"{key}_both": (180, 50)}.items():
            path = folder / f"{name}.jpg"
            im.resize((side, side), Image.BICUBIC).save(path, format="JPEG", quality=quality)
            writer.add({"key": name, "address": str(path), "source": str(path), "caption": "a photo"})
            truth[name] = key
    writer.close()
    return root / "captions", truth


@pytest.mark.slow
def test_recompressed_and_resized_copies_share_a_group_and_different_images_do_not(tmp_path):
    from curate.api import ScoreConfig, run_score

    captions, truth = _copies_world(tmp_path)
    s = run_score(ScoreConfig(shards=captions, out=tmp_path / "scores", scorers="phash", progress=False, shard_size=30))
    groups = pl.read_parquet([str(p) for p in complete_shards(tmp_path / "scores" / "phash")])
    group = dict(groups.select("key", "phash_group").iter_rows())
    assert set(group) == set(truth)
    for key, original in truth.items():
        assert group[key] == group[original] == original, (key, group[key])  # the original (first row) represents
    assert len({group[k] for k in truth}) == len(set(truth.values())), "two different images merged"
    dup = dict(groups.select("key", "phash_duplicate").iter_rows())
    assert sum(dup.values()) == s.phash_duplicates == 3 * len(set(truth.values()))
    assert set(groups["phash_group_size"].to_list()) == {4}
    assert "phash" in s.scorer_seconds and "phash" in s.ledger["scorer_seconds"]


def test_grouping_compares_far_fewer_pairs_than_all_pairs(monkeypatch):
    """Sub-quadratic: the full comparisons multi-index hashing makes (counted, not timed) grow
    about linearly with the hashes, and stay a tiny share of the n^2/2 all pairs."""
    import curate.phash_groups as G

    compared = []

    def counting(a, b):
        compared.append(len(a))
        return G.phash_hamming(a, b)

    monkeypatch.setattr(G, "phash_hamming", G.hamming, raising=False)
    monkeypatch.setattr(G, "hamming", counting)
    work = {}
    for n in (20_000, 200_000):
        rng = np.random.default_rng(n)
        codes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
        codes[: n // 5] = codes[n // 5 : 2 * (n // 5)] ^ (np.uint64(1) << rng.integers(0, 64, n // 5).astype(np.uint64))  # 20% copies
        compared.clear()
        rep = G.group_rows(codes, np.ones(n, bool), 4)
        work[n] = sum(compared)
        assert (rep[: n // 5] == np.arange(n // 5)).all() and (rep[n // 5 : 2 * (n // 5)] == np.arange(n // 5)).all()
        assert work[n] < 0.01 * n * n / 2, (n, work[n])
    assert work[200_000] < 20 * work[20_000], work  # 10x the hashes: ~10x the work (all pairs: 100x)


@pytest.mark.parametrize("args, message", [
    (["--scorers", "phash", "--phash-distance", "13"], "error: --phash-distance 13 is out of range: pass a whole number from 0 to 12"),
    (["--scorers", "phash", "--phash-distance", "-1"], "error: --phash-distance -1 is out of range"),
    (["--scorers", "phsh"], "error: unknown scorer phsh: use some of"),
    (["--scorers", "txt"], "error: unknown scorer txt: use some of clip,aesthetic,dedup,nsfw,lang,image,watermark,text,phash,captions"),
])  # fmt: skip
def test_bad_score_settings_are_one_line_before_any_work(tmp_path, args, message):
    from typer.testing import CliRunner

    from cli import app

    captions, _ = _copies_world(tmp_path, n=1)
    res = CliRunner().invoke(app, ["score", "--shards", str(captions), "--out", str(tmp_path / "scores"), *args])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "scores").exists() or not list((tmp_path / "scores").glob("*.parquet"))


def test_watermark_without_a_head_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from tiny.clip import build_tiny_clip, save_clip

    captions, _ = _copies_world(tmp_path, n=1)
    clip = save_clip(*build_tiny_clip(["a photo"]), tmp_path / "clip")
    for extra, message in (([], "the watermark scorer needs --watermark-weights FILE_OR_HF_ID or --fit-watermark labels.parquet"),
                           (["--fit-watermark", str(tmp_path / "nope.parquet")], "--fit-watermark")):  # fmt: skip
        res = CliRunner().invoke(app, ["score", "--shards", str(captions), "--out", str(tmp_path / f"s{len(extra)}"), "--scorers", "watermark",
                                       "--clip-model", str(clip), *extra])  # fmt: skip
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
