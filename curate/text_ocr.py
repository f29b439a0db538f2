"""The `text` scorer: how much of an image is covered by text, and what the text says.

Two models through transformers, each an HF id or a local directory: a text detector
(`AutoModelForObjectDetection` whose output is a text probability map, DBNet-style: PP-OCRv5's
detectors, default `PaddlePaddle/PP-OCRv5_mobile_det_safetensors`) and, optionally, a text
recogniser (`AutoModelForTextRecognition`, CTC over a character list: default
`PaddlePaddle/PP-OCRv5_mobile_rec_safetensors`). Both are small (a few M parameters) and run
on CPU; PP-OCRv5 reads Latin, Chinese and Japanese scripts.

Per batch: every image goes through its detector processor (resized within `limit_side_len`,
sides multiples of 32), the maps are padded to one size and computed in one forward pass, then
each map is cut back to its image and turned into boxes by the processor's own post-processing
(map > `threshold`, box score > `box_threshold`, DB unclip). `text_coverage` is the share of
the image's area inside the union of the boxes; `text_boxes` their number. The boxes' crops,
padded to one aspect ratio (so the processor's resize does not stretch them), are read in one
recogniser pass; `text` is their strings in reading order (top to bottom, then left to right),
space-separated (null without a recogniser, "" when no box was found).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from shards.errors import UserError

DEFAULT_DETECTOR = "PaddlePaddle/PP-OCRv5_mobile_det_safetensors"
DEFAULT_RECOGNIZER = "PaddlePaddle/PP-OCRv5_mobile_rec_safetensors"
PAD_GREY = (128, 128, 128)  # 0 after the recogniser's normalisation (mean 0.5, std 0.5), as PP-OCR pads


@dataclass
class TextFound:
    """What the text scorer found in one image."""

    coverage: float  # share of the image inside text boxes
    boxes: list[tuple[int, int, int, int]]  # (x0, y0, x1, y1) in the image's pixels, reading order
    text: str | None  # the recognised strings, space-separated; None without a recogniser


class _MapOutput:
    """What the detector processor's post-processing reads: `last_hidden_state`, (n, 1, h, w)."""

    def __init__(self, maps) -> None:
        self.last_hidden_state = maps


def _load(ref: str, what: str, auto: str):
    import transformers

    from shards.hub import hub_kwargs

    kwargs = hub_kwargs(ref, what)
    try:
        model = getattr(transformers, auto).from_pretrained(ref, **kwargs).eval()
        processor = transformers.AutoImageProcessor.from_pretrained(ref, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the {what} {ref!r} ({reason}): pass a transformers {auto} directory or HF id") from None
    return model, processor


class TextReader:
    """A loaded text detector (and recogniser), batched."""

    def __init__(self, detector: str = DEFAULT_DETECTOR, recognizer: str | None = DEFAULT_RECOGNIZER,
                 threshold: float = 0.3, box_threshold: float = 0.6) -> None:
        self.det, self.det_proc = _load(detector, "text detector", "AutoModelForObjectDetection")
        self.rec, self.rec_proc = _load(recognizer, "text recogniser", "AutoModelForTextRecognition") if recognizer else (None, None)
        self.threshold, self.box_threshold = threshold, box_threshold

    def read(self, images: Sequence[Image.Image]) -> list[TextFound]:
        """Coverage, boxes and text of each image."""
        import torch

        if not images:
            return []
        with torch.inference_mode():
            boxes = [_reading_order(b) for b in self.detect(images)]
            texts = self.recognize(images, boxes) if self.rec is not None else [None] * len(images)
        return [TextFound(_coverage(b, im.size), b, t) for im, b, t in zip(images, boxes, texts)]

    def detect(self, images: Sequence[Image.Image]) -> list[list[tuple[int, int, int, int]]]:
        """Text boxes (x0, y0, x1, y1) per image, from one padded forward pass."""
        import torch

        encoded = [self.det_proc(images=im.convert("RGB"), return_tensors="pt") for im in images]
        pixels = [e["pixel_values"][0] for e in encoded]
        h, w = max(p.shape[1] for p in pixels), max(p.shape[2] for p in pixels)
        batch = torch.zeros(len(pixels), pixels[0].shape[0], h, w)
        for i, p in enumerate(pixels):
            batch[i, :, : p.shape[1], : p.shape[2]] = p
        maps = self.det(pixel_values=batch).last_hidden_state.float()
        out = []
        for i, (p, e) in enumerate(zip(pixels, encoded)):
            found = self.det_proc.post_process_object_detection(
                _MapOutput(maps[i : i + 1, :, : p.shape[1], : p.shape[2]]), threshold=self.threshold,
                target_sizes=e["target_sizes"], box_threshold=self.box_threshold)[0]  # fmt: skip
            out.append([_corners(b, images[i].size) for b in found["boxes"].numpy()])
        return out

    def recognize(self, images: Sequence[Image.Image], boxes: list[list[tuple[int, int, int, int]]]) -> list[str]:
        """The strings in each image's boxes, read in one recogniser pass; joined per image."""
        crops = [im.convert("RGB").crop(b) for im, bs in zip(images, boxes) for b in bs]
        if not crops:
            return ["" for _ in images]
        ratio = max(c.width / max(1, c.height) for c in crops)
        padded = []
        for c in crops:  # one aspect ratio for all: the processor resizes every crop to the widest's shape
            canvas = Image.new("RGB", (max(c.width, int(round(ratio * c.height))), c.height), PAD_GREY)
            canvas.paste(c, (0, 0))
            padded.append(canvas)
        encoded = self.rec_proc(images=padded, return_tensors="pt")
        strings = [r["text"] for r in self.rec_proc.post_process_text_recognition(self.rec(**encoded))]
        out, at = [], 0
        for bs in boxes:
            out.append(" ".join(s for s in strings[at : at + len(bs)] if s))
            at += len(bs)
        return out


def _corners(box: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) within the image from a box as (4,) corners or a (4, 2) polygon."""
    pts = np.asarray(box, np.float64).reshape(-1, 2)
    w, h = size
    x0, y0 = np.clip(pts.min(0), 0, [w, h])
    x1, y1 = np.clip(pts.max(0), 0, [w, h])
    return int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))


def _reading_order(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Boxes top to bottom in lines (a box whose vertical centre is within half a median box
    height of the line's first box joins it), left to right within a line."""
    if len(boxes) < 2:
        return boxes
    half = max(1.0, float(np.median([b[3] - b[1] for b in boxes])) / 2)
    lines: list[list[tuple[int, int, int, int]]] = []
    for b in sorted(boxes, key=lambda b: (b[1] + b[3]) / 2):
        centre = (b[1] + b[3]) / 2
        if lines and abs(centre - (lines[-1][0][1] + lines[-1][0][3]) / 2) <= half:
            lines[-1].append(b)
        else:
            lines.append([b])
    return [b for line in lines for b in sorted(line)]


def _coverage(boxes: list[tuple[int, int, int, int]], size: tuple[int, int]) -> float:
    """Share of a `size` image inside the union of `boxes`."""
    w, h = size
    if not boxes or not w or not h:
        return 0.0
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return float(mask.mean())
