"""Text features encoded on demand (`text_dtype = "ids"`, issue 31): the features job stores each
caption field's T5 token ids (int32, the tokens the attention mask keeps: 4 bytes a token against
float16's 2 x channels, 0.05 % at T5-XXL's 4096), and the training step encodes them here, on the
training device, with the frozen text encoder the features job would have used (the stage's
`text_encoder`, loaded through t2i.encoders: one line offline), under no_grad, in the compute
dtype the features job uses (bfloat16 on CUDA, float32 otherwise), returned in float32 (what the
step casts stored features to) and zero past each mask, as stored features are.

Everything downstream (caption-field draws, caption dropout and the null caption, token drop,
REPA, the validation loss) sees a Batch whose `text` is features, as with stored ones.

The cost: a T5 forward per caption per step, ~2 x params x tokens FLOPs (T5-XXL's encoder,
4.7 B parameters, at 120 tokens: 1.13 TFLOP a caption; a PixArt-XL/2 training step is 0.89,
3.7 and 19.5 TFLOP a sample at 256, 512 and 1024 px by t2i.models.flops_per_image: +126 %,
+30 %, +6 %), and the encoder's weights on every training device (9.5 GB in bfloat16). Only
tokens up to the batch's longest caption are encoded (T5's masked attention makes the kept
tokens' features independent of the padding).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from t2i.encoders import load_text_encoder
from t2i.text_codec import IDS


class OnDemandText:
    """Callable on a loader Batch: the same Batch with `text` the T5 features of its token ids,
    on `device` (identity when text_dtype is not ids: see `for_config`)."""

    def __init__(self, text_encoder: str, device) -> None:
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32  # the features job's
        _, self.encoder = load_text_encoder(text_encoder, self.device, self.dtype)
        self.channels = int(self.encoder.config.d_model)

    @staticmethod
    def for_config(cfg, device, reads_text: bool = True):
        """The stage's on-demand encoder when it trains on ids and its model reads the captions
        (a class-cond stage does not), else `same_batch`."""
        return OnDemandText(cfg.text_encoder, device) if cfg.text_dtype == IDS and reads_text else same_batch

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, max_tokens, channels) float32 features of (B, max_tokens[, 1]) token ids and their
        mask, zero where the mask is 0 (encoded up to the longest kept caption)."""
        n = int(mask.sum(1).max()) if mask.numel() else 0  # on the loader's (CPU) mask: no device sync
        ids = ids.reshape(mask.shape).to(self.device, torch.long, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        out = torch.zeros(*mask.shape, self.channels, device=self.device)
        if n:
            emb = self.encoder(ids[:, :n], attention_mask=mask[:, :n])[0].float()
            out[:, :n] = emb * mask[:, :n, None]
        return out

    def __call__(self, batch):
        if batch.text.is_floating_point():
            raise ValueError("a batch of stored features reached the on-demand text encoder: train with text_dtype ids on ids")
        return replace(batch, text=self.encode(batch.text, batch.mask))


def same_batch(batch):
    """The batch as it is (features stored as features)."""
    return batch
