"""Fréchet distance between generated images and a reference folder, through torchmetrics.

`--fid-features inception` (the standard FID): torchmetrics' `FrechetInceptionDistance` on the
2048-d pool features of torch-fidelity's TF-ported Inception v3 (the network of the original FID
code), with its weights read from a local file (`--inception PATH`); nothing is downloaded at run
time. The file is torch-fidelity's `pt_inception-2015-12-05-6726825d.pth` (see README).
`dims` picks the Inception layer (64, 192, 768 or the standard 2048): as pytorch-fid's `--dims`,
the smaller ones are for fewer samples than features (a 2048-d covariance of 500 images is
singular), and they cost much less (the 2048-d matrix square root takes seconds per checkpoint).
`--fid-features clip`: the same statistic on unit-length CLIP image embeddings (as clean-fid's
CLIP mode), with the CLIP model that CLIPScore uses, so it also works with a tiny local CLIP.

Only running sums are kept (mean and covariance sums of each side), so a reference of millions of
images costs O(features^2) memory, never O(images). The reference side is computed once and kept
while the generated side is reset for every checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from shards.errors import UserError

FID_FEATURES = ("inception", "clip")
INCEPTION_DIMS = (64, 192, 768, 2048)  # the Inception layers torchmetrics offers; 2048 (pool3) is the standard FID
INCEPTION_SIZE = 299
INSTALL_HINT = "pip install 't2i-data[eval]' (torchmetrics + torch-fidelity)"


class ClipImageFeatures(torch.nn.Module):
    """uint8 (n, 3, h, w) images -> (n, dim) unit CLIP image embeddings (a torchmetrics feature
    extractor). Images go through the CLIP processor exactly as for CLIPScore."""

    def __init__(self, clip) -> None:
        super().__init__()
        self.clip = clip
        self.num_features = int(clip.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in x]
        return torch.from_numpy(self.clip.embed_images(images)).to(x.device)


def check_options(features: str, inception: str | Path | None, dims: int) -> None:
    """The FID flags, checked before any model is loaded."""
    if features not in FID_FEATURES:
        raise UserError(f"unknown --fid-features {features!r}: use inception or clip")
    if features == "clip":
        return
    if dims not in INCEPTION_DIMS:
        raise UserError(f"--fid-dims {dims} is not an Inception feature size: use one of {', '.join(map(str, INCEPTION_DIMS))}")
    if inception is None or not Path(inception).is_file():
        raise UserError(f"--inception {inception or '(not given)'} is not a file: pass torch-fidelity's Inception weights "
                        "(pt_inception-2015-12-05-6726825d.pth), or --fid-features clip")  # fmt: skip


def _metric(features: str, inception: str | Path | None, clip, dims: int):
    check_options(features, inception, dims)
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise UserError(f"FID needs torchmetrics: {INSTALL_HINT}") from None
    if features == "clip":
        return FrechetInceptionDistance(feature=ClipImageFeatures(clip), reset_real_features=False)
    try:
        return FrechetInceptionDistance(feature=dims, reset_real_features=False, feature_extractor_weights_path=str(inception))
    except ModuleNotFoundError:
        raise UserError(f"FID on Inception features needs torch-fidelity: {INSTALL_HINT}") from None
    except Exception as e:  # noqa: BLE001 - not a state dict, wrong architecture: one line naming the flag
        raise UserError(f"--inception {inception} is not torch-fidelity's Inception v3 weights ({type(e).__name__}): "
                        "pass pt_inception-2015-12-05-6726825d.pth") from None  # fmt: skip


def to_uint8_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(n, 3, size, size) uint8; every image resized with PIL bicubic (clean-fid's advice: PIL's
    resize is the antialiased one), so references of any size batch together."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class FidMeter:
    """FID of generated batches against a fixed reference set."""

    def __init__(self, features: str = "inception", inception: str | Path | None = None, clip=None, device: str = "cpu",
                 dims: int = 2048) -> None:
        self.metric = _metric(features, inception, clip, dims).to(device)
        self.features = features
        self.size = INCEPTION_SIZE if features == "inception" else int(clip.input_size)
        self.device = device
        self.reference_count = 0

    @torch.no_grad()  # not inference_mode: the metric's state tensors are updated in place across calls
    def add(self, images: Sequence[Image.Image], real: bool) -> None:
        if images:
            self.metric.update(to_uint8_batch(images, self.size).to(self.device), real=real)
            if real:
                self.reference_count += len(images)

    def compute(self) -> float:
        """FID of the generated images added since the last call; then forgets them (keeps the reference)."""
        value = float(self.metric.compute())
        self.metric.reset()
        return value


def reference_files(folder: str | Path) -> list:
    """The images under `folder` (recursive, sorted; tars and Parquet files of images too), listed
    by the image layer (shards.images) as every job lists its sources; a missing or imageless
    folder is a UserError."""
    from shards.images import iter_entries

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--reference {folder} is not a directory: pass a folder of reference images")
    entries = list(iter_entries([root]))
    if len(entries) < 2:
        raise UserError(f"--reference {folder} holds {len(entries)} images (.jpg/.png/.webp/...): FID needs at least 2")
    return entries


def read_reference(entries: Sequence, batch_size: int, failed: list[str], size: int | None = None) -> Iterator[list[Image.Image]]:
    """Batches of decoded reference images, under the one decode policy (shards.images: EXIF
    orientation, RGB, bomb guard, JPEG draft decode down to `size`); unreadable files are listed
    in `failed`, not fatal."""
    from shards.images import READ_ERRORS, ImageError, decode_image, iter_entry

    batch: list[Image.Image] = []
    for entry in entries:
        try:
            for item in iter_entry(entry):
                batch.append(decode_image(item.read_bytes(), size).image)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        except (ImageError, *READ_ERRORS) as e:  # corrupt, truncated, a bomb: recorded, the rest still count
            failed.append(f"{entry.location}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if batch:
        yield batch
