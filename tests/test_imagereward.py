"""ImageReward as a --preference model (evals.imagereward), on a tiny random checkpoint that
tiny.imagereward writes in ImageReward's format (ImageReward.pt + med_config.json + a tokenizer).

What the forward test proves, and what it does not: `reference_score` below is a second, plain
torch implementation of ImageReward's score written from its source (vit.py, med.py,
ImageReward.score: timm-style ViT with LayerNorm eps 1e-6, BERT self- then cross-attention per
layer, the [CLS] state through the five linear layers, (r - mean) / std), reading the tensors by
their ImageReward names. The scorer's result (transformers' BlipVisionModel + BlipTextModel after
the key renaming) equals it to < 1e-5, so the renaming, the configs derived from the checkpoint
and the head are consistent with that reading of the source. It does not prove that the published
ImageReward.pt uses exactly these names and shapes (they come from the source; the 1.7 GB file was
not downloaded here), nor that the score matches the ImageReward package's on real images: no real
checkpoint was run.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle"]


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory):
    from tiny.imagereward import build_tiny_imagereward

    torch.set_num_threads(1)
    return build_tiny_imagereward(tmp_path_factory.mktemp("ir") / "ImageReward", PROMPTS + ["a photo of a bench"])


def _images(sizes=((50, 40), (37, 61), (32, 32))):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _attend(x, kv, sd, pre, heads, mask):
    """med.py's BertAttention: self.query/key/value, softmax(q k / sqrt(d) + mask) v, output.dense, residual LayerNorm."""
    b, n, h = x.shape
    split = lambda t: t.view(b, t.shape[1], heads, h // heads).transpose(1, 2)  # noqa: E731
    q, k, v = (split(F.linear(src, sd[f"{pre}self.{p}.weight"], sd[f"{pre}self.{p}.bias"])) for p, src in
               (("query", x), ("key", kv), ("value", kv)))  # fmt: skip
    scores = q @ k.transpose(-1, -2) / math.sqrt(h // heads) + (0 if mask is None else mask)
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h)
    out = F.linear(ctx, sd[f"{pre}output.dense.weight"], sd[f"{pre}output.dense.bias"]) + x
    return F.layer_norm(out, (h,), sd[f"{pre}output.LayerNorm.weight"], sd[f"{pre}output.LayerNorm.bias"], 1e-12)


def reference_score(folder, pixels, input_ids, attention_mask):
    """ImageReward's score from its state dict by name, in plain torch (see the module docstring)."""
    from evals.imagereward import REWARD_MEAN, REWARD_STD

    sd = torch.load(folder / "ImageReward.pt", weights_only=True)
    med = json.loads((folder / "med_config.json").read_text())
    v = lambda name: sd["blip.visual_encoder." + name]  # noqa: E731
    width, patch = v("cls_token").shape[-1], v("patch_embed.proj.weight").shape[-1]
    heads, ln = width // 64, lambda t, p: F.layer_norm(t, (width,), v(p + ".weight"), v(p + ".bias"), 1e-6)  # noqa: E731
    x = F.conv2d(pixels, v("patch_embed.proj.weight"), v("patch_embed.proj.bias"), stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([v("cls_token").expand(len(x), -1, -1), x], 1) + v("pos_embed")
    for i in range(len({k.split(".")[3] for k in sd if ".blocks." in k})):
        b, n = f"blocks.{i}.", x.shape[1]
        qkv = F.linear(ln(x, b + "norm1"), v(b + "attn.qkv.weight"), v(b + "attn.qkv.bias"))
        q, k, val = qkv.reshape(len(x), n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(-1)
        x = x + F.linear((att @ val).transpose(1, 2).reshape(len(x), n, width), v(b + "attn.proj.weight"), v(b + "attn.proj.bias"))
        hid = F.gelu(F.linear(ln(x, b + "norm2"), v(b + "mlp.fc1.weight"), v(b + "mlp.fc1.bias")))
        x = x + F.linear(hid, v(b + "mlp.fc2.weight"), v(b + "mlp.fc2.bias"))
    image = ln(x, "norm")
    t = {k.removeprefix("blip.text_encoder."): w for k, w in sd.items() if k.startswith("blip.text_encoder.")}
    h, th = med["hidden_size"], med["num_attention_heads"]
    y = t["embeddings.word_embeddings.weight"][input_ids] + t["embeddings.position_embeddings.weight"][: input_ids.shape[1]]
    y = F.layer_norm(y, (h,), t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], med["layer_norm_eps"])
    mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(med["num_hidden_layers"]):
        pre = f"encoder.layer.{i}."
        y = _attend(y, y, t, pre + "attention.", th, mask)
        y = _attend(y, image, t, pre + "crossattention.", th, None)
        inner = F.gelu(F.linear(y, t[pre + "intermediate.dense.weight"], t[pre + "intermediate.dense.bias"]))
        y = F.layer_norm(F.linear(inner, t[pre + "output.dense.weight"], t[pre + "output.dense.bias"]) + y, (h,),
                         t[pre + "output.LayerNorm.weight"], t[pre + "output.LayerNorm.bias"], med["layer_norm_eps"])  # fmt: skip
    r = y[:, 0, :]
    for index in (0, 2, 4, 6, 7):
        r = F.linear(r, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
    return ((r[:, 0] - REWARD_MEAN) / REWARD_STD).numpy()


def test_tiny_imagereward_directory_loads_scores_deterministic_and_batch_invariant(tiny_ir, tmp_path):
    from evals.imagereward import ImageRewardScorer
    from evals.preference import load_preference, score_folder

    scorer = load_preference(str(tiny_ir), "cpu")
    assert isinstance(scorer, ImageRewardScorer) and scorer.image_size == 32
    images = _images()
    together = scorer.score(images, PROMPTS)
    assert together.shape == (3,) and together.dtype == np.float32 and np.isfinite(together).all()
    alone = np.concatenate([scorer.score([im], [p]) for im, p in zip(images, PROMPTS)])
    assert np.abs(together - alone).max() < 1e-5  # padding to 35 tokens: a prompt's score does not depend on its batch
    again = ImageRewardScorer(str(tiny_ir), "cpu").score(images, PROMPTS)
    assert np.array_equal(together, again)
    other = scorer.score(images, PROMPTS[1:] + PROMPTS[:1])
    assert np.abs(other - together).min() > 1e-4  # another prompt for the same image: another score
    for p, im in zip(PROMPTS, images):
        im.save(tmp_path / f"{p[:5]}.png")
    suite = [{"id": p[:5], "prompt": p} for p in PROMPTS]
    mean = score_folder(scorer, suite, tmp_path)
    assert mean == pytest.approx(float(together.mean()), abs=1e-5)  # PNG round trip is lossless
    assert json.loads((tmp_path / "preference.json").read_text()) == {str(tiny_ir): mean}


def test_score_equals_a_forward_written_from_imagereward_source(tiny_ir):
    """The key-mapping test; what it proves is in the module docstring."""
    from evals.imagereward import MAX_TOKENS, ImageRewardScorer, preprocess

    scorer = ImageRewardScorer(str(tiny_ir), "cpu")
    images = _images()
    tok = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    assert tok["input_ids"].shape == (3, 35) and (tok["input_ids"] != 1).all()  # no [UNK]: the tiny vocabulary covers them
    with torch.no_grad():
        want = reference_score(tiny_ir, preprocess(images, 32), tok["input_ids"], tok["attention_mask"])
    got = scorer.score(images, PROMPTS)
    assert np.abs(got - want).max() < 1e-6, (got, want)  # 1e-6: the ViT's LayerNorm eps at 1e-5 instead of 1e-6 is 1.4e-5 off


def test_preprocess_is_imagereward_transform():
    """preprocess == ImageReward's torchvision _transform: Resize(n, bicubic), CenterCrop(n), RGB, ToTensor, Normalize."""
    import torchvision.transforms as tv  # installed with torch_fidelity (a dependency)
    from evals.imagereward import IMAGE_MEAN, IMAGE_STD, preprocess

    transform = tv.Compose([tv.Resize(32, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(32),
                            tv.ToTensor(), tv.Normalize(IMAGE_MEAN, IMAGE_STD)])  # fmt: skip
    images = _images(((50, 40), (37, 61), (32, 32), (33, 90), (91, 34)))  # 33 x 90: a crop offset of 27.5, rounded
    want = torch.stack([transform(im) for im in images])
    assert (preprocess(images, 32) - want).abs().max().item() < 1e-6


def _one_line(call):
    from shards.errors import UserError

    with pytest.raises(UserError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_directory_that_is_not_imagereward_is_one_line(tiny_ir, tmp_path):
    from evals.preference import load_preference

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a model")
    assert "ImageReward.pt" in _one_line(lambda: load_preference(str(other), "cpu"))  # the fix names both kinds
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_ir / "med_config.json", no_weights)
    assert "holds no ImageReward.pt" in _one_line(lambda: load_preference(str(no_weights), "cpu"))
    noise = shutil.copytree(tiny_ir, tmp_path / "noise")
    (noise / "ImageReward.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a readable" in _one_line(lambda: load_preference(str(noise), "cpu"))
    wrong = shutil.copytree(tiny_ir, tmp_path / "wrong")
    torch.save({"visual.proj": torch.zeros(2, 2)}, wrong / "ImageReward.pt")  # a state dict of something else
    assert "no ImageReward weights" in _one_line(lambda: load_preference(str(wrong), "cpu"))
    missing = shutil.copytree(tiny_ir, tmp_path / "missing")
    sd = torch.load(missing / "ImageReward.pt", weights_only=True)
    del sd["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(sd, missing / "ImageReward.pt")
    assert "does not match ImageReward's BLIP" in _one_line(lambda: load_preference(str(missing), "cpu"))


def _fake_hub_cache(root, folder, files):
    """An HF cache holding `files` of `folder` as the snapshot of THUDM/ImageReward (what `hf download` leaves)."""
    repo = root / "models--THUDM--ImageReward"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in files:
        shutil.copy(folder / f, snap / f)
    return root


def test_hub_id_loads_from_the_cache_offline_and_is_one_line_when_absent(tiny_ir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from evals.imagereward import ImageRewardScorer
    from evals.preference import check_preference, load_preference
    from shards import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_answered", {})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    line = _one_line(lambda: load_preference("THUDM/ImageReward", "cpu"))
    assert "THUDM/ImageReward" in line and "HF_HUB_OFFLINE" in line
    cache = _fake_hub_cache(tmp_path / "cache", tiny_ir, ["ImageReward.pt", "med_config.json", "tokenizer.json", "tokenizer_config.json"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    scorer = load_preference("THUDM/ImageReward", "cpu")
    images = _images()
    assert isinstance(scorer, ImageRewardScorer)
    assert np.array_equal(scorer.score(images, PROMPTS), ImageRewardScorer(str(tiny_ir), "cpu").score(images, PROMPTS))
    bare = _fake_hub_cache(tmp_path / "bare", tiny_ir, ["ImageReward.pt", "med_config.json"])  # as published: no tokenizer
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(bare))
    assert "bert-base-uncased" in _one_line(lambda: load_preference("THUDM/ImageReward", "cpu"))  # its BERT tokenizer is not cached
    assert "bert-base-uncased" in _one_line(lambda: check_preference("THUDM/ImageReward"))  # eval's check before any work


def test_unreachable_hub_is_one_line_within_15_s(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    from evals.preference import load_preference
    from shards import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port: no answer
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_answered", {})
    start = time.monotonic()
    line = _one_line(lambda: load_preference("THUDM/ImageReward", "cpu"))
    assert "not reachable" in line and "THUDM/ImageReward" in line and time.monotonic() - start < 15


def test_eval_with_a_directory_that_is_not_a_preference_model_stops_before_any_work(tmp_path):
    """`eval --suite geneval --preference DIR` on a folder that is neither: exit 2, one line, before sampling."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "config.json").write_text("{}")  # only checked to exist before the preference check
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "notes.txt").write_text("not a model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "cli.py", "eval", str(tmp_path), "--suite", "geneval", "--limit", "1", "--judge",
                        str(tmp_path / "judge"), "--preference", str(tmp_path / "bad"), "--out", str(tmp_path / "out")],
                       cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "ImageReward.pt" in r.stderr and "CLIPModel" in r.stderr and not list(tmp_path.rglob("*.png"))  # nothing sampled
