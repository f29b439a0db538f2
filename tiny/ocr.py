"""Tiny text detector and recogniser the project trains itself on the world's photos with text
overlays (tiny.overlays), for the `text` scorer's tests, benchmarks and the demo.

Both are transformers PP-OCRv5 mobile models (`PPOCRV5MobileDetForObjectDetection`,
`PPOCRV5MobileRecForTextRecognition`, on a PP-LCNetV3 backbone) with tiny configs, saved with
their image processors as ordinary HF directories: `curate.text_ocr.TextReader` loads them by
the same path as `PaddlePaddle/PP-OCRv5_mobile_det_safetensors` and `..._rec_safetensors`.

- detector: DBNet's probability map, trained by class-weighted binary cross-entropy + dice
  against the overlays' shrunk text boxes (tiny.overlays.text_mask);
- recogniser: CTC over tiny.overlays.ALPHABET (index 0 is CTC's blank), on crops of the text
  boxes with a few pixels of random margin, padded to one aspect ratio as the scorer pads them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tiny import world as W
from tiny.overlays import ALPHABET, Overlay, add_text, overlay, text_mask

BLANK = "<blank>"


def _backbone(stage_strides, out: list[str]):
    from transformers import PPLCNetV3Config

    channels = [(16, 32), (32, 64), (64, 128), (128, 256), (256, 256)]
    blocks = [[[3, cin, cout, stride, False]] for (cin, cout), stride in zip(channels, stage_strides)]
    return PPLCNetV3Config(scale=0.25, block_configs=blocks, out_features=out, out_indices=[int(o[-1]) for o in out],
                           divisor=8, conv_symmetric_num=1)  # fmt: skip


def build_text_detector(seed: int = 0):
    """(model, image processor): a ~30k-parameter PP-OCRv5 mobile detector, random weights."""
    from transformers import PPOCRV5MobileDetConfig, PPOCRV5MobileDetForObjectDetection, PPOCRV5ServerDetImageProcessor

    torch.manual_seed(seed)
    config = PPOCRV5MobileDetConfig(backbone_config=_backbone([1, 2, 2, 2, 2], ["stage2", "stage3", "stage4", "stage5"]),
                                    neck_out_channels=32, layer_list_out_channels=[8, 12, 16, 32])  # fmt: skip
    return PPOCRV5MobileDetForObjectDetection(config), PPOCRV5ServerDetImageProcessor()


def build_text_recognizer(seed: int = 0, width: int = 240):
    """(model, image processor): a tiny PP-OCRv5 mobile recogniser over ALPHABET, random weights."""
    from transformers import PPOCRV5MobileRecConfig, PPOCRV5MobileRecForTextRecognition, PPOCRV5ServerRecImageProcessor

    torch.manual_seed(seed)
    chars = [BLANK, *ALPHABET]
    config = PPOCRV5MobileRecConfig(backbone_config=_backbone([1, (2, 1), (2, 1), (2, 1), 1], ["stage5"]), hidden_size=48,
                                    depth=1, num_attention_heads=4, head_out_channels=len(chars))  # fmt: skip
    size = {"height": 48, "width": width}
    return PPOCRV5MobileRecForTextRecognition(config), PPOCRV5ServerRecImageProcessor(size=size, pad_size=size, character_list=chars)


def overlay_samples(n: int, seed: int, kind: str = "text", fraction: float = 0.5, size: int = 64,
                    low_quality: float = 0.3) -> tuple[list[Image.Image], list[Overlay]]:
    """`n` world photos (train split), `fraction` of them with an overlay of `kind`."""
    scenes = W.with_low_quality(W.sample_scenes(n, seed, "train"), low_quality, seed)
    images, truth = [], []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, i, 31])
        img, o = overlay(W.render(scene, size), kind if rng.uniform() < fraction else "", rng)
        images.append(img)
        truth.append(o)
    return images, truth


def train_text_detector(out_dir: str | Path, n: int = 800, steps: int = 400, seed: int = 0, lr: float = 1e-2) -> Path:
    """Fit a tiny detector on `n` world photos (half with text) and save it to `out_dir`."""
    model, processor = build_text_detector(seed)
    images, truth = overlay_samples(n, seed)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    masks = torch.from_numpy(np.stack([text_mask(o, im.size) for im, o in zip(images, truth)]))[:, None]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (32,), generator=gen)
        p, y = model(pixel_values=pixels[idx]).last_hidden_state.clamp(1e-6, 1 - 1e-6), masks[idx]
        bce = torch.nn.functional.binary_cross_entropy(p, y, weight=torch.where(y > 0, 3.0, 1.0))
        dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
        opt.zero_grad()
        (bce + dice).backward()
        opt.step()
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def text_crops(n: int, seed: int, size: int = 64) -> tuple[list[Image.Image], list[str]]:
    """Crops of `n` text overlays (their box plus 0-2 px of random margin) and their strings."""
    crops, strings = [], []
    for i, scene in enumerate(W.sample_scenes(n, seed, "train")):
        rng = np.random.default_rng([seed, i, 37])
        img, o = add_text(W.render(scene, size), rng)
        x0, y0, x1, y1 = o.boxes[0]
        m = rng.integers(0, 3, 4)
        crops.append(img.crop((max(0, x0 - m[0]), max(0, y0 - m[1]), min(size, x1 + m[2]), min(size, y1 + m[3]))))
        strings.append(o.text)
    return crops, strings


def pad_to_ratio(crops: list[Image.Image], ratio: float) -> list[Image.Image]:
    """Each crop on a grey canvas `ratio` times as wide as high (as curate.text_ocr pads them)."""
    out = []
    for c in crops:
        canvas = Image.new("RGB", (max(c.width, int(round(ratio * c.height))), c.height), (128, 128, 128))
        canvas.paste(c, (0, 0))
        out.append(canvas)
    return out


def train_text_recognizer(out_dir: str | Path, n: int = 1500, steps: int = 1500, seed: int = 0, lr: float = 2e-3) -> Path:
    """Fit a tiny CTC recogniser on `n` text crops and save it to `out_dir`."""
    model, processor = build_text_recognizer(seed)
    crops, strings = text_crops(n, seed)
    pixels = processor(images=pad_to_ratio(crops, 5.0), return_tensors="pt")["pixel_values"]
    chars = processor.character_list
    targets = [torch.tensor([chars.index(ch) for ch in s]) for s in strings]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (32,), generator=gen).tolist()
        log_probs = model(pixel_values=pixels[idx]).last_hidden_state.clamp_min(1e-8).log().transpose(0, 1)
        loss = ctc(log_probs, torch.cat([targets[i] for i in idx]), torch.full((len(idx),), log_probs.shape[0], dtype=torch.long),
                   torch.tensor([len(targets[i]) for i in idx]))  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)
