"""Image inputs for the caption and image-layer tests: random JPEGs, every awkward file a source
can hold, an SA-1B-style tar and an image Parquet (img2dataset / HF layout)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def jpeg_bytes(w=120, h=80, seed=0, mode="RGB", **save) -> bytes:
    """A `w` x `h` JPEG of uniform noise (a pure function of `seed`), in PIL `mode`."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", **save)
    return buf.getvalue()


def photo(seed: int, size: int = 256, slope: float = 1.5) -> Image.Image:
    """A photo-like RGB image: random colour noise with a natural image's 1/f^slope spectrum (smooth
    regions, edges at every scale), a pure function of `seed`. What perceptual hashes are made
    for; the shape world's flat graphics are not (their low frequencies sit near the median)."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=(3, size, size)) + 1j * rng.normal(size=(3, size, size))) / f ** (slope / 2)
    img = np.real(np.fft.ifft2(spectrum))
    img -= img.min(axis=(1, 2), keepdims=True)
    img /= img.max(axis=(1, 2), keepdims=True)
    return Image.fromarray((img.transpose(1, 2, 0) * 255).astype(np.uint8))


def bad_and_odd_inputs(root: Path) -> dict[str, bool]:
    """Write every awkward input; returns file name -> readable?"""
    root.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(160, 120)
    (root / "good.jpg").write_bytes(good)
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "corrupt.jpg").write_bytes(good[:20] + bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)))
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "cmyk.jpg").write_bytes(jpeg_bytes(90, 70, mode="CMYK"))
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(root / "sixteen.png")  # I;16
    Image.new("RGBA", (50, 40), (255, 0, 0, 80)).save(root / "alpha.png")
    frames = [Image.new("P", (40, 30), c) for c in (1, 2, 3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    Image.new("1", (10000, 9000)).save(root / "bomb.png")  # 90M pixels > PIL's limit, a few KB on disk
    return {"good.jpg": True, "zero.jpg": False, "text.jpg": False, "corrupt.jpg": False, "truncated.jpg": False,
            "cmyk.jpg": True, "sixteen.png": True, "alpha.png": True, "animated.gif": True, "bomb.png": False}  # fmt: skip


def make_tar(path: Path, n: int = 3, unsafe: bool = True) -> None:
    """An SA-1B-style tar: `n` JPEGs with their JSON sidecars; `unsafe` adds a `..` and an
    absolute member name."""
    with tarfile.open(path, "w") as tf:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for i in range(n):
            add(f"sa_{i}.jpg", jpeg_bytes(90, 60, seed=i))
            add(f"sa_{i}.json", json.dumps({"image": {"image_id": 100 + i, "width": 1500, "height": 1000,
                                                      "file_name": f"sa_{i}.jpg"}, "annotations": []}).encode())  # fmt: skip
        if unsafe:
            add("../evil.jpg", jpeg_bytes(10, 10))
            add("/abs/evil.jpg", jpeg_bytes(10, 10))


def make_parquet(path: Path, n: int = 3, struct: bool = True) -> None:
    """`n` JPEGs in an `image` column (HF `{bytes, path}` structs, or plain binary) with a `TEXT`
    alt-text column."""
    images = [jpeg_bytes(70, 50, seed=10 + i) for i in range(n)]
    col = pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)]) if struct else pa.array(images, pa.binary())
    pq.write_table(pa.table({"image": col, "TEXT": [f"alt {i}" for i in range(n)]}), path)
