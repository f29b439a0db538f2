"""The image layer shared by `caption` and `features` (shards.images), and the features job:
same orientation in both jobs, unique keys across sources, absolute addresses, tar members by
offset, failures recorded, rank-parallel features equal to one process, kill -9 resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from autolabel.api import run_caption
from autolabel.backends import Generation
from shards import ShardError, ShardWriter, complete_shards
from shards.errors import UserError
from shards.images import Address, ImageReader, RowImageReader, decode_image, iter_sources
from shards.images.sources import source_names

ROOT = Path(__file__).resolve().parent.parent
COLORS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40)}


def jpeg(w: int, h: int, color=(200, 30, 30), seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, np.float32) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def color_of(img: Image.Image) -> str:
    mean = np.asarray(img.convert("RGB"), np.float32).reshape(-1, 3).mean(0)
    return min(COLORS, key=lambda c: np.linalg.norm(mean - np.array(COLORS[c])))


class ColorCaptioner:
    """A stand-in VLM: captions each image with its colour and remembers what it was shown."""

    name, model_name = "transformers", "color-captioner"

    def __init__(self) -> None:
        self.seen: list[Image.Image] = []

    def format_prompt(self, question: str) -> str:
        return question

    def generate(self, images, prompts, params):
        self.seen += [im.copy() for im in images]
        return [Generation(text=f"a {color_of(im)} circle on the left", token_ids=[1, 2], finish_reason="stop") for im in images]

    def close(self) -> None:
        pass


def caption(srcs, out: Path, captioner=None) -> list[dict]:
    run_caption([str(s) for s in srcs], out, captioner=captioner or ColorCaptioner(), batch_size=4, shard_size=8, progress=False)
    return rows(out)


def rows(out: Path) -> list[dict]:
    return [r for s in complete_shards(out) for r in pq.read_table(s).to_pylist()]


def load_image(row: dict) -> Image.Image:
    """A caption row's image as features reads it (the image layer's bytes, its decode policy), full size."""
    return decode_image(RowImageReader().read(row)).image


def decode_raw(buf: bytes, dtype: str | None, shape) -> torch.Tensor:
    """A tensor as features stores it (raw bytes in the row's dtype; None, in shards written before
    the dtype column existed, is float32)."""
    return torch.frombuffer(bytearray(buf), dtype=getattr(torch, dtype or "float32")).view(*shape)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus

    return build_tiny_models(tmp_path_factory.mktemp("models"), simple_corpus() + ["a green circle on the left"], vae_fit_steps=0)


def fcfg(models, **kw):
    from t2i.features import FeatureConfig

    base = dict(vae=models["vae"], text_encoder=models["text_encoder"], resolution=16, max_tokens=16, text_dtype="float32",
                batch_size=4, rows_per_shard=8, workers=2)  # fmt: skip
    return FeatureConfig(**{**base, **kw})


def features(caps: Path, root: Path, cfg, **kw) -> tuple[dict, dict[str, dict]]:
    from t2i.features import compute_features

    r = compute_features(caps, root, cfg, device="cpu", progress=False, **kw)
    got = rows(Path(r["dir"]))
    by_key = {x["key"]: x for x in got}
    assert len(by_key) == len(got), "a key was encoded twice"
    return r, by_key


def make_tar(path: Path, members: list[tuple[str, bytes]], links: tuple[str, ...] = ()) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, members[0][0]
            tf.addfile(info)


# --- the image layer ----------------------------------------------------------------------------


def test_reader_reads_by_address_from_files_tars_and_parquet_row_groups(tmp_path):
    images = [jpeg(30 + i, 20, seed=i) for i in range(7)]
    (tmp_path / "a.jpg").write_bytes(images[0])
    make_tar(tmp_path / "t.tar", [(f"x/{i}.jpg", b) for i, b in enumerate(images)])
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "t.tar", arcname="inner.tar")  # any member; plus images below
        for i, b in enumerate(images):
            info = tarfile.TarInfo(f"{i}.jpg")
            info.size = len(b)
            tf.addfile(info, io.BytesIO(b))
    pq.write_table(pa.table({"image": images}), tmp_path / "p.parquet", row_group_size=3)  # 3 row groups
    items = list(iter_sources([tmp_path / "a.jpg", tmp_path / "t.tar", tmp_path / "t.tar.gz", tmp_path / "p.parquet"]))
    assert len(items) == 1 + 7 + 7 + 7
    reader = ImageReader()
    for it in reversed(items):  # any order: offsets and row groups, not a scan
        assert Path(Address.parse(it.address).location).is_absolute()
        assert reader.read(it.address) == it.read_bytes() and it.read_bytes() in images
    assert str(Address.parse(items[3].address)) == items[3].address and "#tar:" in items[3].address
    assert items[-1].address.endswith("p.parquet#row:6")


def test_two_sources_with_the_same_names_keep_every_image(tmp_path, models):
    for i, (side, color) in enumerate((("a", "red"), ("b", "blue"))):
        (tmp_path / side / "imgs").mkdir(parents=True)
        (tmp_path / side / "imgs" / "x.jpg").write_bytes(jpeg(40, 30, COLORS[color], seed=i))
    assert [it.key for it in iter_sources([tmp_path / "a" / "imgs"])] == ["imgs/x.jpg"]  # alone: keys unchanged
    got = caption([tmp_path / "a" / "imgs", tmp_path / "b" / "imgs"], tmp_path / "caps")
    assert sorted((r["key"], r["caption"]) for r in got) == [("a/imgs/x.jpg", "a red circle on the left"),
                                                             ("b/imgs/x.jpg", "a blue circle on the left")]  # fmt: skip
    r, feats = features(tmp_path / "caps", tmp_path / "feats", fcfg(models))
    assert sorted(feats) == ["a/imgs/x.jpg", "b/imgs/x.jpg"] and r["failed"] == 0
    assert source_names(["/d/imgs", "/e/a/imgs", "/f/a/imgs", "/g/a"]) == ["d/imgs", "e/a/imgs", "f/a/imgs", "g/a"]


def test_exif_orientation_is_the_same_for_caption_and_features(tmp_path, models):
    """A landscape file (red left, blue right) with EXIF orientation 6 is a portrait image, red on top."""
    arr = np.zeros((60, 120, 3), np.uint8)
    arr[:, :60], arr[:, 60:] = COLORS["red"], COLORS["blue"]
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "rot.jpg").write_bytes(buf.getvalue())

    cap = ColorCaptioner()
    (row,) = caption([tmp_path / "src"], tmp_path / "caps", cap)
    (shown,) = cap.seen
    assert (row["width"], row["height"]) == (60, 120) and shown.height > shown.width
    assert color_of(shown.crop((0, 0, shown.width, shown.height // 3))) == "red"

    seen = load_image(row)
    assert seen.size == (60, 120) and color_of(seen.crop((0, 0, 60, 40))) == "red"
    _, feats = features(tmp_path / "caps", tmp_path / "feats", fcfg(models, resolution=256, buckets=True))
    f = feats["src/rot.jpg"]
    assert f["height"] > f["width"]  # the portrait bucket


def test_features_from_another_working_directory(tmp_path, models, monkeypatch):
    (tmp_path / "job" / "imgs").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "job" / "imgs" / f"{i}.jpg").write_bytes(jpeg(40, 30, seed=i))
    monkeypatch.chdir(tmp_path / "job")
    got = caption(["imgs"], Path("caps"))  # relative, as a user types it
    assert all(Path(r["address"]).is_absolute() and Path(r["source"]).is_absolute() for r in got)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r, feats = features(tmp_path / "job" / "caps", tmp_path / "feats", fcfg(models))
    assert len(feats) == r["rows"] == 5 and r["failed"] == 0


def test_duplicate_tar_member_names_caption_and_encode_the_same_bytes(tmp_path, models):
    red, blue = jpeg(40, 30, COLORS["red"]), jpeg(40, 30, COLORS["blue"])
    make_tar(tmp_path / "t.tar", [("sa_1.jpg", red), ("sa_1.jpg", blue)], links=("link.jpg",))
    got = {r["key"]: r for r in caption([tmp_path / "t.tar"], tmp_path / "caps")}
    assert sorted(got) == ["t.tar/link.jpg", "t.tar/sa_1.jpg", "t.tar/sa_1.jpg~2"]
    assert "link" in got["t.tar/link.jpg"]["error"] and got["t.tar/link.jpg"]["caption"] is None
    assert got["t.tar/sa_1.jpg"]["caption"] == "a red circle on the left"
    assert got["t.tar/sa_1.jpg~2"]["caption"] == "a blue circle on the left"

    for key in ("t.tar/sa_1.jpg", "t.tar/sa_1.jpg~2"):  # the bytes features reads are the captioned ones
        assert f"a {color_of(load_image(got[key]))} circle on the left" == got[key]["caption"]
    _, feats = features(tmp_path / "caps", tmp_path / "feats", fcfg(models))
    assert sorted(feats) == ["t.tar/sa_1.jpg", "t.tar/sa_1.jpg~2"]
    with pytest.raises(OSError, match="occurs 2 times"):  # a schema-1 row naming the member: ambiguous, not guessed
        load_image({"source": str(tmp_path / "t.tar"), "member": "sa_1.jpg"})


def test_undecodable_image_at_feature_time_is_recorded_and_skipped(tmp_path, models):
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg(40, 30, seed=i))
    caption([tmp_path / "imgs"], tmp_path / "caps")
    (tmp_path / "imgs" / "2.jpg").write_bytes(b"\xff\xd8\xff broken after captioning")
    (tmp_path / "imgs" / "4.jpg").unlink()
    r, feats = features(tmp_path / "caps", tmp_path / "feats", fcfg(models))
    assert sorted(feats) == ["imgs/0.jpg", "imgs/1.jpg", "imgs/3.jpg", "imgs/5.jpg"]
    assert r["failed"] == 2 and r["new"] == 4
    manifest = json.loads((Path(r["dir"]) / "manifest.json").read_text())
    assert manifest["failed"] == 2 and sorted(f["key"] for f in manifest["failures"]) == ["imgs/2.jpg", "imgs/4.jpg"]
    assert all(f["error"] for f in manifest["failures"])
    again, feats = features(tmp_path / "caps", tmp_path / "feats", fcfg(models))
    assert again["new"] == 0 and again["failed"] == 2 and len(feats) == 4  # not retried, not duplicated


def test_latent_dtype_stores_compact_latents(tmp_path, models):
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg(40, 30, seed=i))
    caption([tmp_path / "imgs"], tmp_path / "caps")
    _, f32 = features(tmp_path / "caps", tmp_path / "feats", fcfg(models))
    _, bf16 = features(tmp_path / "caps", tmp_path / "feats", fcfg(models, latent_dtype="bfloat16"))
    for key, a in f32.items():
        b = bf16[key]
        assert (a["latent_dtype"], b["latent_dtype"]) == ("float32", "bfloat16")
        assert len(b["latent_mean"]) * 2 == len(a["latent_mean"])
        x, y = decode_raw(a["latent_mean"], a["latent_dtype"], a["latent_shape"]), decode_raw(b["latent_mean"], b["latent_dtype"], b["latent_shape"])
        torch.testing.assert_close(y.float(), x, rtol=1e-2, atol=1e-2)
    with pytest.raises(UserError, match="latent-dtype"):
        fcfg(models, latent_dtype="int8").validate()
    # the training loader hands them out in the stored dtype, in this process and from its workers
    from t2i.data import StreamingFeatureDataset
    from t2i.loader import make_loader

    ds = StreamingFeatureDataset(tmp_path / "feats" / fcfg(models, latent_dtype="bfloat16").cache_key(), 16)
    direct = ds.get(np.arange(4))
    (loaded,) = list(make_loader(ds, 0, 0, 4, workers=1))
    for b in (direct, loaded):
        assert b.latent_mean.dtype == b.latent_std.dtype == torch.bfloat16
        for i, key in enumerate(b.keys):
            want = decode_raw(bf16[key]["latent_mean"], "bfloat16", bf16[key]["latent_shape"])
            assert torch.equal(b.latent_mean[i], want)


# --- data-parallel and resume -------------------------------------------------------------------


def many_images(tmp_path: Path, n: int) -> Path:
    """`n` captioned images: half in a tar, half in a folder."""
    colors = list(COLORS)
    make_tar(tmp_path / "sa.tar", [(f"sa_{i}.jpg", jpeg(48, 32, COLORS[colors[i % 3]], seed=i)) for i in range(n // 2)])
    (tmp_path / "imgs").mkdir()
    for i in range(n - n // 2):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg(32, 48, COLORS[colors[i % 3]], seed=100 + i))
    caption([tmp_path / "sa.tar", tmp_path / "imgs"], tmp_path / "caps")
    return tmp_path / "caps"


def cli_features(caps: Path, root: Path, models, *extra: str) -> list[str]:
    return [str(ROOT / "cli.py"), "features", "--shards", str(caps), "--out", str(root), "--vae", models["vae"],
            "--text-encoder", models["text_encoder"], "--resolution", "16", "--max-tokens", "16", "--text-dtype", "float32",
            "--batch-size", "4", "--shard-size", "8", *extra]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_two_feature_processes_write_exactly_the_rows_of_one(tmp_path, models):
    caps = many_images(tmp_path, 40)
    _, one = features(caps, tmp_path / "one", fcfg(models))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *cli_features(caps, tmp_path / "two", models, "--workers", "1")]  # fmt: skip
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (fdir,) = [d for d in (tmp_path / "two").iterdir() if d.is_dir()]
    names = {s.name.split("-")[1] for s in complete_shards(fdir)}
    assert names == {"r000", "r001"}  # each rank wrote its own shards
    two = {r["key"]: r for r in rows(fdir)}
    assert len(two) == len(rows(fdir)) == len(one) == 40 and set(two) == set(one)
    for key, a in one.items():
        b = two[key]
        for col, dt, shape in (("latent_mean", "latent_dtype", a["latent_shape"]), ("text_emb", "text_dtype", (-1, a["text_channels"]))):
            x = torch.frombuffer(bytearray(a[col]), dtype=getattr(torch, a[dt])).view(*shape)
            y = torch.frombuffer(bytearray(b[col]), dtype=getattr(torch, b[dt])).view(*shape)
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_feature_run_killed_with_kill_9_resumes_exactly_once(tmp_path, models):
    caps = many_images(tmp_path, 160)
    root = tmp_path / "feats"
    cmd = [sys.executable, *cli_features(caps, root, models, "--workers", "1", "--batch-size", "2", "--shard-size", "4")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(root.glob("*/*.done")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: give it more work"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (fdir,) = [d for d in root.iterdir() if d.is_dir()]
    before = len(rows(fdir))
    assert 0 < before < 160
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = [x["key"] for x in rows(fdir)]
    assert len(got) == len(set(got)) == 160
    assert sorted(got) == sorted(x["key"] for x in rows(caps))
    assert not [p for p in fdir.iterdir() if p.name.endswith(".tmp")]


# --- data-parallel features: each rank reads only its own row groups ----------------------------


def embedded_caption_shards(out: Path, n: int, monkeypatch) -> Path:
    """`n` caption rows with their JPEG bytes embedded, 8 a shard, each row its own row group
    (as rows of large images are), so a shard has several row groups to share out."""
    import shards.writer
    from shards import CaptionRow

    colors = list(COLORS)
    with monkeypatch.context() as m:
        m.setattr(shards.writer, "ROW_GROUP_BYTES", 1)
        w = ShardWriter(out, rows_per_shard=8, writer_id="0000e4be")
        for i in range(n):
            c = colors[i % 3]
            w.add(CaptionRow(key=f"e{i:03d}", caption=f"a {c} circle on the left", width=48, height=32,
                             image=jpeg(48, 32, COLORS[c], seed=i), model="synthetic"))
        w.close()
    assert pq.ParquetFile(complete_shards(out)[0]).metadata.num_row_groups == 8
    return out


def in_process_rank(rank: int, world_size: int):
    """Ranks for running one rank at a time in this process: no process group to wait on, and
    each rank's own counts as its total (the test adds them up)."""
    from t2i.ranks import Ranks

    class InProcess(Ranks):
        def barrier(self) -> None:
            pass

        def total(self, counts):
            return list(counts)

    return InProcess(rank, world_size)


def assert_same_features(a: dict, b: dict) -> None:
    for col, dt, shape in (("latent_mean", "latent_dtype", a["latent_shape"]), ("text_emb", "text_dtype", (-1, a["text_channels"]))):
        x = torch.frombuffer(bytearray(a[col]), dtype=getattr(torch, a[dt])).view(*shape)
        y = torch.frombuffer(bytearray(b[col]), dtype=getattr(torch, b[dt])).view(*shape)
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)  # other batch neighbours: float sums in another order


def record_caption_reads(monkeypatch) -> list[tuple[str, object]]:
    """(shard name, row group, or "all" for a whole-file scan) of every caption-shard read."""
    from shards import fs

    reads: list[tuple[str, object]] = []
    real_open, real_group, real_iter = fs.parquet_file, pq.ParquetFile.read_row_group, pq.ParquetFile.iter_batches

    def open_tagged(p):
        pf = real_open(p)
        pf.t2i_name = Path(str(p)).name
        return pf

    def read_group(self, i, *a, **kw):
        if hasattr(self, "t2i_name"):
            reads.append((self.t2i_name, i))
        return real_group(self, i, *a, **kw)

    def iter_batches(self, *a, **kw):
        if hasattr(self, "t2i_name"):
            reads.append((self.t2i_name, "all"))
        return real_iter(self, *a, **kw)

    monkeypatch.setattr(fs, "parquet_file", open_tagged)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_group)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    return reads


def test_each_rank_reads_only_its_row_groups_and_the_ranks_encode_every_row_once(tmp_path, models, monkeypatch):
    from t2i.features import compute_features

    caps = embedded_caption_shards(tmp_path / "caps", 24, monkeypatch)
    one, by_key = features(caps, tmp_path / "one", fcfg(models))
    reads = record_caption_reads(monkeypatch)
    per_rank, summaries = [], []
    for rank in (0, 1):
        reads.clear()
        summaries.append(compute_features(caps, tmp_path / "two", fcfg(models), device="cpu", progress=False,
                                          ranks=in_process_rank(rank, 2)))  # fmt: skip
        per_rank.append(list(reads))
    every = {(s.name, g) for s in complete_shards(caps) for g in range(8)}
    for got in per_rank:
        assert len(got) == len(set(got)) == 12 and all(g != "all" for _, g in got)  # half the row groups, each once, no scans
    assert set(per_rank[0]) | set(per_rank[1]) == every and not set(per_rank[0]) & set(per_rank[1])
    # together: every row once, the same features as one process; the counts add up to one's
    fdir = Path(summaries[0]["dir"])
    two = rows(fdir)
    assert sorted(r["key"] for r in two) == sorted(by_key) and len(by_key) == 24
    assert {s.name.split("-")[1] for s in complete_shards(fdir)} == {"r000", "r001"}
    for r in two:
        assert_same_features(by_key[r["key"]], r)
    assert [s["new"] for s in summaries] == [12, 12] and sum(s["valid"] for s in summaries) == one["valid"] == 24
    # a rerun (here on one process) finds everything done: nothing encoded twice
    again = compute_features(caps, tmp_path / "two", fcfg(models), device="cpu", progress=False)
    assert again["new"] == 0 and len(rows(fdir)) == 24


def test_ranks_that_see_other_caption_shards_refuse_to_start(tmp_path, models, monkeypatch):
    from t2i.features import _check_plan, _write_plan, caption_shards

    shards = caption_shards(embedded_caption_shards(tmp_path / "caps", 16, monkeypatch))
    _write_plan(tmp_path, shards)
    _check_plan(tmp_path, shards, tmp_path / "caps")
    with pytest.raises(ShardError, match="changed while features started"):
        _check_plan(tmp_path, shards[:1], tmp_path / "caps")


def test_features_of_a_model_folder_refitted_in_place_are_refused_not_extended(tmp_path, models):
    """A local folder's path names the features; its content digest, recorded beside them, tells
    that its weights changed: the features job and training refuse in one line, a copy of the
    folder elsewhere keeps its digest, and features recorded before digests are accepted."""
    import shutil

    from safetensors.torch import load_file, save_file

    from shards.hub import local_model_digest
    from t2i.train.config import TrainConfig
    from t2i.train.resume import find_features

    vae = tmp_path / "vae"
    shutil.copytree(models["vae"], vae)
    assert local_model_digest(str(vae)) == local_model_digest(models["vae"])  # names and contents, not times
    caps = many_images(tmp_path, 6)
    cfg = fcfg({**models, "vae": str(vae)}, rows_per_shard=4)
    r, _ = features(caps, tmp_path / "feats", cfg)
    made = json.loads((Path(r["dir"]) / "config.json").read_text())
    assert made["model_digests"] == {"vae": local_model_digest(str(vae)), "text_encoder": local_model_digest(models["text_encoder"])}
    train = TrainConfig(vae=str(vae), text_encoder=models["text_encoder"], resolution=16, max_tokens=16, text_dtype="float32")
    assert find_features(tmp_path / "feats", train) == Path(r["dir"])

    (weights,) = vae.glob("*.safetensors")
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, weights)  # a refit into the same folder
    for attempt in (lambda: features(caps, tmp_path / "feats", cfg), lambda: find_features(tmp_path / "feats", train)):
        with pytest.raises(UserError, match=r"made with the VAE at .*vae before its weights changed .*: delete .* and make the features again") as e:
            attempt()
        assert "\n" not in str(e.value)

    del made["model_digests"]  # features made before digests were recorded
    (Path(r["dir"]) / "config.json").write_text(json.dumps(made))
    assert find_features(tmp_path / "feats", train) == Path(r["dir"])
    again, _ = features(caps, tmp_path / "feats", cfg)
    assert again["new"] == 0 and json.loads((Path(r["dir"]) / "config.json").read_text())["model_digests"]["vae"] == local_model_digest(str(vae))
