"""The `nsfw` and `lang` scorers: models whose weights ship inside their PyPI wheels.

- nsfw: NudeNet 3's detector (`320n.onnx`, bundled in the `nudenet` wheel; onnxruntime). The
  score is the highest confidence of an exposed-nudity class in the image, 0 when none.
- lang: py3langid, langid.py's model (naive Bayes over byte n-grams, shipped in the wheel, numpy
  only), through `shards.models.language.LanguageId` (the same identifier and candidate languages
  as `stats --lang`). Picked because it loads offline in milliseconds, needs no compiled
  extension beyond numpy, scores thousands of captions a second on one core, and gives
  normalised probabilities; fastText's lid.176 is stronger on very short text but its model is
  not in any wheel, and lingua's wheel is ~100 MB.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from shards.errors import UserError

EXPOSED = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")


class NsfwDetector:
    """NudeNet's bundled ONNX detector, batched."""

    def __init__(self) -> None:
        try:
            from nudenet import NudeDetector
        except ImportError:
            raise UserError('the nsfw scorer needs nudenet: pip install "t2i-data[safety]"') from None
        self.detector = NudeDetector()  # the wheel's own 320n.onnx: no download

    def score(self, images: Sequence[Image.Image]) -> list[tuple[float, str]]:
        """(score, comma-separated exposed classes found) per image."""
        if not images:
            return []
        bgr = [np.ascontiguousarray(np.asarray(im.convert("RGB"))[..., ::-1]) for im in images]
        results = self.detector.detect_batch(bgr, batch_size=len(bgr))
        out = []
        for dets in results:
            hits = [d for d in dets if d["class"] in EXPOSED]
            out.append((max((float(d["score"]) for d in hits), default=0.0), ",".join(sorted({d["class"] for d in hits}))))
        return out
