"""Fréchet distance (FID) and kernel distance (KID) between generated images and a reference
folder, through torchmetrics.

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

KID (Binkowski et al. 2018; torchmetrics' `KernelInceptionDistance`) is computed beside FID on the
same features, extracted once per batch (`SharedFeatures`): the squared MMD with a cubic
polynomial kernel, averaged over `KID_SUBSETS` random subsets of min(`KID_SUBSET_SIZE`, images on
either side) images, drawn from a fixed seed so a rerun gives the same number. Unlike FID it is
unbiased, so it is the one to read with few samples (near 0 for two draws of one distribution).
It keeps every feature vector (O(images x features) memory: 2048 floats per image).
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
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0  # torchmetrics' defaults; the subsets drawn from a fixed seed
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


class SharedFeatures(torch.nn.Module):
    """A feature extractor two metrics share: the second call with the same batch tensor returns
    the first call's features instead of running the network again."""

    def __init__(self, extractor: torch.nn.Module, num_features: int) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = num_features
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            self._last = (x, self.extractor(x))
        return self._last[1]


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


def _kid_metric(features: torch.nn.Module):
    from torchmetrics.image.kid import KernelInceptionDistance
    import warnings

    with warnings.catch_warnings():  # "will save all extracted features": known, documented above
        warnings.simplefilter("ignore", UserWarning)
        return KernelInceptionDistance(feature=features, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, reset_real_features=False)


def to_uint8_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(n, 3, size, size) uint8; every image resized with PIL bicubic (clean-fid's advice: PIL's
    resize is the antialiased one), so references of any size batch together."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class FidMeter:
    """FID and KID of generated batches against a fixed reference set (one feature pass per batch)."""

    def __init__(self, features: str = "inception", inception: str | Path | None = None, clip=None, device: str = "cpu",
                 dims: int = 2048) -> None:
        metric = _metric(features, inception, clip, dims)
        shared = SharedFeatures(metric.inception, dims if features == "inception" else int(clip.dim))
        metric.inception = shared  # FID and KID read the same features, computed once
        self.metric, self.kid_metric = metric.to(device), _kid_metric(shared).to(device)
        self.features = features
        self.size = INCEPTION_SIZE if features == "inception" else int(clip.input_size)
        self.device = device
        self.reference_count = self.generated_count = 0
        self.kid: tuple[float, float] | None = None  # (mean, std over subsets) of the last `compute`

    @torch.no_grad()  # not inference_mode: the metric's state tensors are updated in place across calls
    def add(self, images: Sequence[Image.Image], real: bool) -> None:
        if images:
            batch = to_uint8_batch(images, self.size).to(self.device)
            self.metric.update(batch, real=real)
            self.kid_metric.update(batch, real=real)
            if real:
                self.reference_count += len(images)
            else:
                self.generated_count += len(images)

    def compute(self) -> float:
        """FID of the generated images added since the last call (their KID, mean and std, in
        `self.kid`); then forgets them (keeps the reference)."""
        value = float(self.metric.compute())
        self.kid = self.compute_kid()
        self.metric.reset()
        self.kid_metric.reset()
        self.generated_count = 0
        return value

    def compute_kid(self) -> tuple[float, float]:
        """(KID mean, std over subsets) of the generated images added since the last `compute`;
        subsets of min(KID_SUBSET_SIZE, either side's count) images, drawn from KID_SEED."""
        self.kid_metric.subset_size = max(2, min(KID_SUBSET_SIZE, self.reference_count, self.generated_count))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(KID_SEED)
            mean, std = self.kid_metric.compute()
        return float(mean), float(std)


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
