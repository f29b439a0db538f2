"""Caption rows -> pixel tensors for the features job: the row's bytes from the image layer
(shards.images.RowImageReader), decoded under the shared policy (EXIF, RGB, bomb guard, JPEG
draft), resized and cropped to the row's bucket (t2i.geometry)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from shards.images import READ_ERRORS, ImageError, RowImageReader, decode_image
from t2i.geometry import draft_short, image_to_tensor, target_size

if TYPE_CHECKING:
    from t2i.feature_config import FeatureConfig


class RowImages:
    """Caption row -> (row, pixel tensor at its bucket size, None) or (row, None, error).
    `locate` runs in the producer thread, on the rows in order (compressed tars only stream
    forward); `__call__` runs in the decode workers."""

    def __init__(self, cfg: "FeatureConfig") -> None:
        self.cfg, self.rows = cfg, RowImageReader()

    def locate(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row, its bytes read now if they only stream forward, or its error noted."""
        try:
            self.rows.read_ahead(row)
        except READ_ERRORS as e:
            row["_error"] = f"unreadable: {e}"
        return row

    def _draft_short(self, width: int, height: int) -> int:
        return draft_short(width, height, self.cfg.resolution, self.cfg.buckets)

    def __call__(self, row: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None, str | None]:
        if row.get("_error"):
            return row, None, row["_error"]
        try:
            data = self.rows.read(row)
        except READ_ERRORS as e:
            return row, None, f"unreadable: {e}"
        try:
            img = decode_image(data, self._draft_short if self.cfg.draft else None, self.cfg.max_pixels).image
        except ImageError as e:
            return row, None, str(e)
        h, w = target_size(img.width, img.height, self.cfg.resolution, self.cfg.buckets)
        return row, image_to_tensor(img, h, w), None

    def close(self) -> None:
        """Close the open sources."""
        self.rows.close()
