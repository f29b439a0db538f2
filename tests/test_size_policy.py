"""The size each family's processor works from (autolabel.sizing), with the released models'
processor settings, and what the caption job does with it: no model needed (issue 15)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from autolabel.prepare import prepare_for_model
from autolabel.sizing import DEFAULT_MAX_PIXELS, pixel_limits, set_pixel_limits, size_policy
from shards.errors import UserError
from tiny.vlms import released_processors

SAM = (1500, 2250)  # an SA-1B image (portrait)


# target (width, height) of a 1500x2250 image: what each processor resizes it to (never upscaled)
EXPECTED = {
    "llava-1.5": ("short_side", (336, 504)),
    "internvl3": ("canvas", (896, 1344)),  # a 2x3 grid of 448 tiles, the aspect ratio's
    "llava-next": ("grid", (449, 672)),  # inside 672x672, the best pinpoint (rounded up, as its processor does)
    "llava-onevision": ("grid", (1500, 2250)),  # 1536x2304 holds it whole: full size
    "idefics3": ("long_side", (971, 1456)),
    "gemma3": ("canvas", (896, 896)),  # squashed to its square
    "paligemma2": ("canvas", (448, 448)),
}


def sam_jpeg(w: int = SAM[0], h: int = SAM[1]) -> bytes:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (h // 50, w // 50, 3), dtype=np.uint8)).resize((w, h))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("family", list(EXPECTED))
def test_side_processors_targets(family):
    policy = size_policy(released_processors()[family])
    assert (policy.kind, policy.target(*SAM)) == EXPECTED[family]
    assert policy.target(64, 48) == (64, 48)  # small images are never upscaled (the processor does that)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_pixel_processors_are_capped_so_sam_images_stay_near_llava_token_counts(family):
    ip = released_processors()[family]
    own = size_policy(ip)
    factor = own.factor
    w, h = own.target(*SAM)
    assert (w // factor) * (h // factor) > 1500  # the processor's own limit: thousands of tokens
    lo, hi = pixel_limits(ip, None, None)  # what the job uses unless --max-pixels says otherwise
    assert hi == DEFAULT_MAX_PIXELS and lo == own.min_pixels
    set_pixel_limits(ip, lo, hi)
    capped = size_policy(ip)
    w, h = capped.target(*SAM)
    assert w % factor == 0 and h % factor == 0 and w * h <= DEFAULT_MAX_PIXELS
    assert (w // factor) * (h // factor) <= 576  # tokens
    # and the processor agrees: it keeps that size
    grid = ip(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert [grid[1] * ip.patch_size, grid[2] * ip.patch_size] == [h, w]
    assert pixel_limits(ip, 1000, 200_000) == (1000, 200_000)  # --min-pixels / --max-pixels win


def test_pixel_limits_on_a_side_processor_are_a_one_line_error():
    with pytest.raises(UserError, match="--min-pixels/--max-pixels apply to pixel-count processors") as e:
        pixel_limits(released_processors()["llava-1.5"], None, 200_000)
    assert "\n" not in str(e.value)
    assert pixel_limits(released_processors()["llava-1.5"], None, None) is None
    with pytest.raises(UserError, match="above"):
        pixel_limits(released_processors()["qwen2-vl"], 500_000, 200_000)


def test_paper_limit_applies_first():
    policies = {k: size_policy(ip) for k, ip in released_processors().items()}
    for name, policy in policies.items():
        w, h = policy.target(*SAM, max_short=400, max_long=800)
        assert min(w, h) <= 400 and max(w, h) <= 800, name
    assert policies["qwen2-vl"].target(*SAM, 400, 800) == (392, 588)  # smart_resize of 400x600


def test_prepare_for_model_decodes_to_the_target_only():
    data = sam_jpeg()
    for name, ip in released_processors().items():
        policy = size_policy(ip)
        prepared = prepare_for_model(data, policy)
        assert prepared.image.size == policy.target(*SAM), name
        assert (prepared.width, prepared.height) == SAM
    # the draft decode reads only what the target needs: LLaVA-1.5's 336 px from a 1/4-scale DCT decode
    policy = size_policy(released_processors()["llava-1.5"])
    assert policy.draft_short(*SAM) == 336
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (math.ceil(SAM[0] * 336 / 1500), math.ceil(SAM[1] * 336 / 1500)))
    assert im.size == (375, 563)  # what libjpeg decodes, instead of 1500x2250


# families whose processor, given the job's prepared image, keeps its size (skips its resize) and
# makes the very pixel values it would make from the draft-decoded image
SAME_PIXELS = ["llava-1.5", "qwen2-vl", "qwen3-vl", "llava-onevision", "gemma3", "paligemma2"]
# these also make a whole-image thumbnail, from the prepared image instead of the draft: up to a few levels off there
THUMBNAIL = ["internvl3", "llava-next", "idefics3"]


@pytest.mark.parametrize("family", SAME_PIXELS + THUMBNAIL)
def test_prepared_image_gives_the_pixel_values_the_processor_makes_from_the_draft(family):
    import torch

    from shards.images.decode import decode_image

    ip = released_processors()[family]
    set_pixel_limits(ip, *(pixel_limits(ip, None, None) or (None, None)))
    policy = size_policy(ip)
    data = sam_jpeg()
    draft = decode_image(data, draft_short=policy.draft_short).image  # what libjpeg decodes for this policy
    ours = prepare_for_model(data, policy).image
    assert ours.size == policy.target(*SAM)
    if family != "llava-onevision":  # (its processor works from the full image: nothing to resize)
        assert draft.size != ours.size  # the job did resize, and the processor then kept its size
    ours, theirs = (ip(images=[im], return_tensors="pt")["pixel_values"] for im in (ours, draft))
    if family in SAME_PIXELS:
        assert torch.equal(ours, theirs)
    else:
        level = 1 / 255 / min(ip.image_std)  # one uint8 level, normalised
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= 4 * level and (ours - theirs).abs().mean() < level


def test_policy_resizes_with_the_processors_filter():
    from autolabel.prepare import resize_as_processor

    procs = released_processors()
    assert [size_policy(procs[f]).resample for f in ("llava-1.5", "gemma3", "idefics3")] == [3, 2, 1]  # bicubic, bilinear, lanczos
    im = Image.open(io.BytesIO(sam_jpeg())).convert("RGB")
    ours = np.asarray(resize_as_processor(im, (336, 504), 3), np.int16)
    pil = np.asarray(im.resize((336, 504), Image.Resampling.BICUBIC, reducing_gap=None), np.int16)
    assert np.abs(ours - pil).max() <= 1  # torchvision's antialiased bicubic is PIL's to within one level
    assert not np.array_equal(np.asarray(resize_as_processor(im, (336, 504), 2)), ours)  # the filter is used
    assert resize_as_processor(im, im.size, 3) is im


@pytest.mark.parametrize("resample", [1, 2, 3])
def test_resize_from_pils_own_memory_equals_the_copying_way(resample, monkeypatch):
    import torch

    import autolabel.prepare as prepare

    im = Image.open(io.BytesIO(sam_jpeg())).convert("RGB")
    assert prepare._rgbx_view(im, torch) is not None  # this Pillow exports its pixels: the zero-copy way is taken
    fast = np.asarray(prepare.resize_as_processor(im, (336, 504), resample))
    monkeypatch.setattr(prepare, "_rgbx_view", lambda im, torch: None)  # older Pillow: a copy of the pixels
    assert np.array_equal(fast, np.asarray(prepare.resize_as_processor(im, (336, 504), resample)))


def test_resize_falls_back_to_pil_without_torchvision(monkeypatch):
    import autolabel.prepare as prepare

    im = Image.open(io.BytesIO(sam_jpeg())).convert("RGB")
    monkeypatch.setattr(prepare, "_torchvision", lambda: None)
    out = prepare.resize_as_processor(im, (336, 504), 3)
    assert out.size == (336, 504)
    assert np.array_equal(np.asarray(out), np.asarray(im.resize((336, 504), Image.Resampling.BICUBIC, reducing_gap=None)))
