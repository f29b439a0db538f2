"""The `text` scorer: how much of an image is covered by text, whether it has text, and (with a
recogniser) what the text says.

- Detector: a text probability map per image. `text_coverage` is the share of the map whose
  probability passes `--text-threshold`; `has_text` is coverage >= `--text-min-coverage`. Two kinds:
  - `TextNet`, a small fully-convolutional net predicting, for every 4x4-pixel cell of the image
    resized to its square input (`input_size`, recorded in the weights), whether the cell lies in
    text: a `.safetensors` file, a directory holding `text-detector.safetensors`, or an HF id with
    that file; fitted by `fit_text_detector` on images with known text masks (the project's tiny
    one: tiny.text_detector, on the world's photos with rendered text overlays);
  - a transformers DBNet-style detector whose output is a text probability map (`HFTextMap`,
    `AutoModelForObjectDetection` + its image processor, e.g. PP-OCRv5's
    `PaddlePaddle/PP-OCRv5_mobile_det_safetensors`): a folder with a config.json or an HF id
    without the TextNet file. Each image is processed at its own size; images of one processed
    size share forward passes.
- Recogniser (optional, `--text-recognizer`): a transformers image-to-text OCR model by HF id or
  directory (TrOCR's `VisionEncoderDecoderModel` with its processor, e.g.
  `microsoft/trocr-small-printed`); it reads the bounding box of each connected text region the
  detector found, in one batched `generate`, and `text` joins the strings in reading order (top
  to bottom, left to right). Without one, `text` is null.

Batched: a batch's images are resized and run through the detector in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from shards.errors import UserError

DETECTOR_FILE = "text-detector.safetensors"
CELL = 4  # pixels per side of the detector's output cells (two stride-2 convolutions)
CPU_PIXELS = 4 * 256 * 256  # input pixels per TextNet forward pass


class TextNet(nn.Module):
    """Image (n, 3, s, s) in [0, 255] -> text logits per 4x4 cell (n, s/4, s/4); receptive field 41 px."""

    def __init__(self, input_size: int = 64, width: int = 32) -> None:
        super().__init__()
        self.input_size, self.width = input_size, width
        w = width
        self.layers = nn.Sequential(
            nn.Conv2d(3, w // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w // 2, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=4, dilation=4), nn.ReLU(),
            nn.Conv2d(w, 1, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x / 127.5 - 1.0).squeeze(1)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The batch tensor of `images`, each resized to the square input."""
        s = self.input_size
        arrays = [np.asarray(im.convert("RGB").resize((s, s), Image.BILINEAR), np.float32) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    @torch.inference_mode()
    def cell_probs(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, s/4, s/4) text probability per cell, in forward passes of CPU_PIXELS' worth of images
        (measured at a 256 px input on one thread: 36 ms an image in fours, 56 ms in 32s, whose
        activations leave the CPU's caches)."""
        self.eval()
        x = self.pixels(images)
        step = max(1, CPU_PIXELS // (self.input_size * self.input_size))
        return torch.cat([torch.sigmoid(self(x[i : i + step])) for i in range(0, len(x), step)]).numpy()


def cell_targets(masks: np.ndarray) -> torch.Tensor:
    """(n, s, s) pixel masks in {0, 1} -> (n, s/4, s/4) share of each cell in text."""
    t = torch.from_numpy(np.ascontiguousarray(masks, np.float32))[:, None]
    return nn.functional.avg_pool2d(t, CELL).squeeze(1)


def fit_text_detector(images: torch.Tensor, masks: np.ndarray, steps: int = 600, batch: int = 32, lr: float = 3e-3,
                      seed: int = 0, width: int = 32) -> TextNet:
    """Fit a TextNet by binary cross-entropy of each cell against its share of text (`images`:
    (n, 3, s, s) as TextNet.pixels makes them; `masks`: (n, s, s)). Deterministic for a seed
    (one torch thread)."""
    torch.manual_seed(seed)
    net = TextNet(images.shape[-1], width)
    y = cell_targets(masks)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[idx]
        if torch.rand((), generator=gen) < 0.5:  # mirror: text reads either way to a detector
            x, target = x.flip(-1), y[idx].flip(-1)
        else:
            target = y[idx]
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), target, pos_weight=torch.tensor(2.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def save_text_detector(net: TextNet, path: str | Path) -> str | Path:
    """Write the detector as safetensors, its sizes in the metadata (a local path or an object-store URI)."""
    from curate.weights import save_module

    return save_module(net, path, {"input_size": str(net.input_size), "width": str(net.width), "kind": "text-detector"})


def _detector_file(ref: str) -> Path:
    """A .safetensors file, a directory holding DETECTOR_FILE, or an HF id (its DETECTOR_FILE)."""
    from shards.hub import check_model

    path = Path(ref).expanduser()
    if path.is_file():
        return path
    kwargs = check_model(ref, "text detector", "--text-detector")
    if path.is_dir():
        if not (path / DETECTOR_FILE).is_file():
            raise UserError(f"--text-detector {ref} holds no {DETECTOR_FILE} and no config.json: pass a text detector file, "
                            "its folder, a transformers text detector folder or an HF id")
        return path / DETECTOR_FILE
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref, DETECTOR_FILE, **kwargs))
    except Exception as e:  # noqa: BLE001 - no such file in the repository: one line
        raise UserError(f"--text-detector {ref}: no {DETECTOR_FILE} there ({type(e).__name__}): pass a text detector file, folder or HF id") from None


def load_detector(ref: str) -> "TextNet | HFTextMap":
    """A TextNet (its file, a folder holding it, an HF id with it) or a transformers detector
    (a folder with a config.json, an HF id without the TextNet file)."""
    path = Path(ref).expanduser()
    if path.is_dir() and not (path / DETECTOR_FILE).is_file() and (path / "config.json").is_file():
        return HFTextMap(ref)
    if not path.exists() and not ref.endswith(".safetensors"):
        from shards.hub import check_model

        from huggingface_hub import hf_hub_download

        kwargs = check_model(ref, "text detector", "--text-detector")  # a hub id: cached or reachable, else one line
        try:
            hf_hub_download(ref, DETECTOR_FILE, **kwargs)
        except Exception:  # noqa: BLE001 - no TextNet file there: a transformers detector (or one line from its loader)
            return HFTextMap(ref)
    return load_text_detector(ref)


def load_text_detector(ref: str) -> TextNet:
    """The TextNet from a file, directory or HF id; one line when it is not one."""
    from safetensors import safe_open

    path = _detector_file(ref)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        net = TextNet(int(meta["input_size"]), int(meta["width"]))
        net.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - not a text detector's safetensors: one line
        raise UserError(f"--text-detector {ref} is not a text detector file ({type(e).__name__}): pass one saved by "
                        "curate.text.save_text_detector (tiny.text_detector fits the demo's)") from None
    return net.eval()


@dataclass
class TextFound:
    """What the text scorer found in one image."""

    coverage: float  # share of the image's cells in text
    has_text: bool  # coverage >= the minimum coverage
    text: str | None  # recognised strings in reading order; None without a recogniser


class TextReader:
    """A loaded detector (and recogniser), batched."""

    def __init__(self, detector: str, recognizer: str | None = None, threshold: float = 0.5, min_coverage: float = 0.01) -> None:
        self.net = load_detector(detector)
        self.threshold, self.min_coverage = threshold, min_coverage
        self.recognizer = Recognizer(recognizer) if recognizer else None

    def read(self, images: Sequence[Image.Image]) -> list[TextFound]:
        if not images:
            return []
        cells = [m >= self.threshold for m in self.net.cell_probs(images)]
        coverage = [float(c.mean()) for c in cells]
        texts: list[str | None] = [None] * len(images)
        if self.recognizer is not None:
            texts = self.recognizer.read(images, [text_regions(_coarse(c)) if cov >= self.min_coverage else [] for c, cov in zip(cells, coverage)])
        return [TextFound(c, c >= self.min_coverage, t) for c, t in zip(coverage, texts)]


class HFTextMap:
    """A transformers text detector whose output (`last_hidden_state`, (n, 1, h, w)) is a text
    probability map over its processed input (DBNet-style: PP-OCRv5's detectors)."""

    def __init__(self, ref: str) -> None:
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        from shards.hub import load_pretrained

        self.model = load_pretrained(AutoModelForObjectDetection.from_pretrained, ref, "text detector", "--text-detector").eval()
        self.processor = load_pretrained(AutoImageProcessor.from_pretrained, ref, "text detector", "--text-detector")

    @torch.inference_mode()
    def cell_probs(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """Each image's probability map: images processed to the same size share forward passes
        (of up to CPU_PIXELS' worth; no padding, so a map does not depend on its batch)."""
        pixels = [self.processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0] for im in images]
        maps: list[np.ndarray] = [np.zeros(0)] * len(images)
        for shape in dict.fromkeys(tuple(p.shape) for p in pixels):
            same = [i for i, p in enumerate(pixels) if tuple(p.shape) == shape]
            step = max(1, CPU_PIXELS // (shape[1] * shape[2]))
            for idx in (same[k : k + step] for k in range(0, len(same), step)):
                out = self.model(pixel_values=torch.stack([pixels[i] for i in idx])).last_hidden_state.float()[:, 0]
                for j, i in enumerate(idx):
                    maps[i] = out[j].numpy()
        return maps


def _coarse(cells: np.ndarray, most: int = 64) -> np.ndarray:
    """A boolean map with at most `most` cells a side (any cell of a block set: the block set)."""
    f = max(1, -(-max(cells.shape) // most))
    if f == 1:
        return cells
    h, w = -(-cells.shape[0] // f) * f, -(-cells.shape[1] // f) * f
    padded = np.zeros((h, w), bool)
    padded[: cells.shape[0], : cells.shape[1]] = cells
    return padded.reshape(h // f, f, w // f, f).any(axis=(1, 3))


def text_regions(cells: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Bounding boxes (x0, y0, x1, y1, as shares of the image) of the 8-connected regions of a
    boolean cell grid, in reading order (top to bottom, then left to right)."""
    h, w = cells.shape
    seen = np.zeros_like(cells, bool)
    boxes = []
    for y, x in zip(*np.nonzero(cells)):
        if seen[y, x]:
            continue
        stack, ys, xs = [(y, x)], [], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            ys.append(cy)
            xs.append(cx)
            for ny in range(max(0, cy - 1), min(h, cy + 2)):
                for nx in range(max(0, cx - 1), min(w, cx + 2)):
                    if cells[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        boxes.append((min(xs) / w, min(ys) / h, (max(xs) + 1) / w, (max(ys) + 1) / h))
    return sorted(boxes, key=lambda b: (round(b[1] * 8), b[0]))


class Recognizer:
    """A transformers OCR model (TrOCR-style VisionEncoderDecoder + processor) reading crops."""

    def __init__(self, ref: str) -> None:
        from transformers import AutoProcessor, VisionEncoderDecoderModel

        from shards.hub import load_pretrained

        self.model = load_pretrained(VisionEncoderDecoderModel.from_pretrained, ref, "text recogniser", "--text-recognizer").eval()
        self.processor = load_pretrained(AutoProcessor.from_pretrained, ref, "text recogniser", "--text-recognizer")

    @torch.inference_mode()
    def read(self, images: Sequence[Image.Image], regions: list[list[tuple[float, float, float, float]]], max_tokens: int = 32) -> list[str]:
        """Each image's regions read in one batched generate; strings joined per image."""
        crops = []
        for im, boxes in zip(images, regions):
            w, h = im.size
            for x0, y0, x1, y1 in boxes:  # a cell of margin: the detector's cells are coarse
                crops.append(im.convert("RGB").crop((int(max(0, x0 * w - CELL)), int(max(0, y0 * h - CELL)),
                                                     int(min(w, x1 * w + CELL)), int(min(h, y1 * h + CELL)))))  # fmt: skip
        if not crops:
            return ["" for _ in images]
        pixels = self.processor(images=crops, return_tensors="pt").pixel_values
        ids = self.model.generate(pixels, max_new_tokens=max_tokens)
        strings = [s.strip() for s in self.processor.batch_decode(ids, skip_special_tokens=True)]
        out, at = [], 0
        for boxes in regions:
            out.append(" ".join(s for s in strings[at : at + len(boxes)] if s))
            at += len(boxes)
        return out
