"""The image layer every job reads through (shards/images and the caption job's preparation):
listing sources into unique keys, the decode policy (EXIF orientation, modes, the bomb guard) and
decoding near the model's input size. Moved out of test_caption.py."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from shards.images import ImageError
from shards.images.fit import prepare_image, target_size
from shards.images.sources import count_items, iter_sources
from tiny.images import bad_and_odd_inputs, jpeg_bytes, make_parquet, make_tar


def test_prepare_decodes_near_target_size_and_orients():
    data = jpeg_bytes(1500, 1000)
    p = prepare_image(data, 400, 800)
    assert (p.width, p.height) == (1500, 1000) and p.image.size == target_size(1500, 1000, 400, 800) == (600, 400)
    assert p.image.mode == "RGB"
    # decoding only as far as the model needs: short side >= min_short, within the limits
    big = jpeg_bytes(1600, 2400)
    p = prepare_image(big, 400, 800, min_short=336)
    assert 336 <= min(p.image.size) <= 400 and max(p.image.size) <= 800 and (p.width, p.height) == (1600, 2400)
    # EXIF orientation 6 (rotate 90): a landscape file is a portrait image
    im = Image.open(io.BytesIO(jpeg_bytes(300, 200)))
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    p = prepare_image(buf.getvalue(), 400, 800)
    assert (p.width, p.height) == (200, 300) and p.image.size == (200, 300)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_decodes_upright(orientation):
    """The upright picture, whichever of the 8 EXIF orientations the file is stored in (the
    transposition is applied in place; an upright file is used as decoded, not copied)."""
    from PIL import ImageOps

    from shards.images.decode import decode_image

    yy, xx = np.mgrid[0:60, 0:90]
    upright = np.stack([xx * 2, yy * 4, np.full_like(xx, 128)], -1).astype(np.uint8)  # 90x60, gradients tell the axes apart
    stored = Image.fromarray(upright)
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}  # fmt: skip
    if orientation in inverse:
        stored = stored.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=98, exif=exif)
    assert np.abs(np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())))).astype(int) - upright).mean() < 2
    decoded = decode_image(buf.getvalue())
    assert (decoded.width, decoded.height) == (90, 60) and decoded.image.size == (90, 60)
    assert np.abs(np.asarray(decoded.image).astype(int) - upright).mean() < 2


def test_prepare_modes_and_bomb(tmp_path):
    expected = bad_and_odd_inputs(tmp_path)
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    for name, readable in expected.items():
        data = (tmp_path / name).read_bytes()
        if readable:
            assert prepare_image(data).image.mode == "RGB", name
        else:
            with pytest.raises(ImageError):
                prepare_image(data)
    with pytest.raises(ImageError, match="bomb"):
        prepare_image((tmp_path / "bomb.png").read_bytes())


def test_sources(tmp_path):
    (tmp_path / "sam" / "sub").mkdir(parents=True)
    (tmp_path / "sam" / "sub" / "sa_5.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "sam" / "sub" / "sa_5.json").write_text(json.dumps({"image": {"image_id": 5, "width": 120, "height": 80}}))
    make_tar(tmp_path / "sa_000.tar")
    make_parquet(tmp_path / "hf.parquet")
    items = list(iter_sources([tmp_path / "sam", tmp_path / "sa_000.tar", tmp_path / "hf.parquet"]))
    assert count_items([tmp_path / "sam", tmp_path / "sa_000.tar", tmp_path / "hf.parquet"]) == len(items)  # progress total
    by_key = {it.key: it for it in items}
    assert len(by_key) == len(items) == 1 + 3 + 2 + 3
    assert by_key["sam/sub/sa_5.jpg"].image_id == 5
    t = by_key["sa_000.tar/sa_1.jpg"]
    assert (t.image_id, t.width, t.height, t.member, t.error) == (101, 1500, 1000, "sa_1.jpg", None) and t.data
    unsafe = [it for it in items if "evil" in it.key]
    assert len(unsafe) == 2 and all("unsafe" in it.error and it.data is None for it in unsafe)
    p = by_key["hf.parquet/2"]
    assert p.alt == "alt 2" and Image.open(io.BytesIO(p.data)).size == (70, 50)
