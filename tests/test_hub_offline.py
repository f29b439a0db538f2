"""Model loading on machines without network, and the image size the caption job reads from a
model's processor (issue 15: SizeDict, Qwen2-VL pixel counts)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from autolabel.sizing import size_policy
from shards import hub
from shards.errors import UserError

UNKNOWN = "t2i-data-tests/no-such-model"


def _policy(image_processor):
    return size_policy(image_processor)


# --- size policy (the full per-family table: tests/test_caption_families.py, test_size_policy.py) ---


def test_clip_size_dict_gives_its_short_side():
    from transformers import CLIPImageProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert type(ip.size).__name__ == "SizeDict"  # what the pinned transformers gives, not a dict
    policy = _policy(ip)
    assert (policy.kind, policy.side) == ("short_side", 336)
    assert policy.target(1500, 2250) == (336, 504)  # LLaVA-1.5's input, aspect kept


def test_tiny_llava_job_uses_the_processor_input_size(tmp_path):
    from autolabel.backends import TransformersCaptioner, size_policy_of
    from tiny.llava import build_tiny_llava

    model_dir = build_tiny_llava(tmp_path / "m", image_size=48, patch_size=8, seed=0)
    captioner = TransformersCaptioner(str(model_dir), device="cpu")
    assert size_policy_of(captioner).side == 48  # what autolabel.api prepares images to


def test_qwen2_vl_pixel_counts_are_not_side_lengths():
    from transformers import Qwen2VLImageProcessor

    default = Qwen2VLImageProcessor()
    assert default.size["shortest_edge"] == 3136  # min_pixels, not a side
    policy = _policy(default)
    assert policy.kind == "pixels" and (policy.min_pixels, policy.max_pixels) == (3136, default.size["longest_edge"])
    w, h = policy.target(1500, 2250)
    assert w * h <= default.size["longest_edge"] and w % 28 == 0 and h % 28 == 0 and 3136 not in (w, h)
    capped = _policy(Qwen2VLImageProcessor(max_pixels=1024 * 28 * 28))
    assert capped.max_pixels == 802_816 and math.prod(capped.target(1500, 2250)) <= 802_816


def test_llava_next_grid_and_longest_edge_processors():
    from transformers import Idefics3ImageProcessor, LlavaNextImageProcessor

    grid = _policy(LlavaNextImageProcessor())
    assert grid.kind == "grid" and max(grid.target(2250, 1500)) <= 1008  # anyres: inside its best pinpoint
    longest = _policy(Idefics3ImageProcessor())
    assert (longest.kind, longest.side) == ("long_side", 1456) and "longest edge" in longest.why
    assert longest.target(1500, 2250) == (971, 1456)
    assert _policy(SimpleNamespace(size={"shortest_edge": 224, "height": None})).side == 224  # plain dicts too


# --- unreachable hub ---------------------------------------------------------------------------


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """cli.py in a subprocess with `env` on top of ours, minus conftest's offline switches."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    full_env.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def one_image(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    Image.new("RGB", (64, 48), "red").save(src / "a.jpg")
    return src


@pytest.mark.slow
def test_caption_unknown_id_offline_is_one_line_error(tmp_path, one_image):
    r = _cli(["caption", "--src", str(one_image), "--out", str(tmp_path / "out"), "--model", UNKNOWN,
              "--backend", "transformers"], HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and UNKNOWN in lines[-1] and "HF_HUB_OFFLINE" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr and "Retrying" not in r.stderr


@pytest.mark.slow
def test_caption_unreachable_hub_fails_without_retries(tmp_path, one_image):
    """No network (here: a closed local port as the endpoint) and no HF_HUB_OFFLINE: one probe,
    no retries, the one-line error."""
    r = _cli(["caption", "--src", str(one_image), "--out", str(tmp_path / "out"), "--model", UNKNOWN,
              "--backend", "transformers"], HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not reachable" in last and UNKNOWN in last, r.stderr
    assert "Retrying" not in r.stderr and "Traceback" not in r.stderr


def test_train_vae_and_text_encoder_ids_fail_fast_offline(tmp_path, monkeypatch):
    from t2i.encoders import load_text_encoder, load_vae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="the VAE .*HF_HUB_OFFLINE"):
        load_vae(UNKNOWN)
    with pytest.raises(UserError, match="the text encoder .*HF_HUB_OFFLINE"):
        load_text_encoder(UNKNOWN)


def test_cached_id_loads_from_cache_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / f"models--{UNKNOWN.replace('/', '--')}" / "snapshots" / "abc").mkdir(parents=True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("no route")))
    assert hub.hub_kwargs(UNKNOWN, "model") == {"local_files_only": True}
    assert hub.hub_kwargs(str(tmp_path), "model") == {}  # a local directory: no hub at all
    with pytest.raises(UserError, match="not reachable .no route."):
        hub.hub_kwargs("t2i-data-tests/other", "model")


def test_local_model_digest_follows_contents_not_times_and_samples_large_files(tmp_path, monkeypatch):
    """A folder's digest changes with a file's bytes (whole for small files, sampled blocks for
    large ones, their first and last blocks included) and its names, not with times; a hub id has none."""
    monkeypatch.setattr(hub, "WHOLE_FILE_BYTES", 2 << 20)  # so a 5 MiB file takes the sampled path
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    big = bytearray(np.random.default_rng(0).bytes(5 << 20))
    (model / "weights.bin").write_bytes(big)
    first = hub.local_model_digest(str(model))
    os.utime(model / "weights.bin", (0, 0))
    assert hub.local_model_digest(str(model)) == first
    for at in (0, len(big) - 1):  # the first and the last block are always read
        changed = bytearray(big)
        changed[at] ^= 0xFF
        (model / "weights.bin").write_bytes(changed)
        assert hub.local_model_digest(str(model)) != first
    (model / "weights.bin").write_bytes(big)
    (model / "config.json").write_text('{"a": 1}')  # a small file: hashed whole
    assert hub.local_model_digest(str(model)) != first
    (model / "config.json").write_text("{}")
    (model / "config.json").rename(model / "other.json")
    assert hub.local_model_digest(str(model)) != first
    assert hub.local_model_digest("org/model") is None
