"""The `watermark` scorer: the probability that an image carries a watermark, from a small
classifier head on its CLIP image embedding (the embedding the `clip` scorer computes anyway,
so the scorer costs one tiny MLP per batch).

The head (dim -> 256 -> 1, GELU, logistic output) is fitted on a labelled sample of the user's
own images (`score --fit-watermark labels.parquet`: columns `key` and `label`, 1 = watermarked,
0 = clean; saved as `scores/watermark-head.safetensors`), as `--fit-aesthetic` fits the aesthetic
head, or loaded from a file or an HF id (`repo` -> its first .safetensors file, or `repo/file`).
The file records its input size and hidden width in its safetensors metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from shards.errors import UserError

HIDDEN = 256
HEAD_FILE = "watermark-head.safetensors"


class WatermarkHead(nn.Module):
    """An MLP from a unit CLIP image embedding to a watermark logit."""

    def __init__(self, dim: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)

    @torch.inference_mode()
    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """P(watermark) for unit CLIP image embeddings, (n, dim) -> (n,)."""
        self.eval()
        return torch.sigmoid(self(torch.from_numpy(np.ascontiguousarray(embeddings, np.float32)))).numpy()


def fit_watermark_head(embeddings: np.ndarray, labels: np.ndarray, epochs: int = 300, lr: float = 2e-3, seed: int = 0) -> WatermarkHead:
    """Fit the head by class-balanced binary cross-entropy on (embedding, 0/1 label) pairs (AdamW,
    batches of 256). Both classes must be present."""
    y = torch.from_numpy(np.asarray(labels, np.float32))
    positives = float(y.sum())
    if positives == 0 or positives == len(y):
        raise UserError(f"--fit-watermark needs both labels: got {int(positives)} watermarked of {len(y)} images; label clean (0) and watermarked (1) images")
    torch.manual_seed(seed)
    head = WatermarkHead(embeddings.shape[1])
    x = torch.from_numpy(np.ascontiguousarray(embeddings, np.float32))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y) - positives) / positives))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(256):
            loss = loss_fn(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def save_watermark_head(head: WatermarkHead, path: str | Path) -> str | Path:
    """Write the head as safetensors, its sizes in the metadata (a local path or an object-store URI)."""
    from curate.weights import save_module

    return save_module(head, path, {"dim": str(head.dim), "hidden": str(head.hidden), "kind": "watermark"})


def _resolve(weights: str) -> Path:
    """A local file, or an HF id: `repo` (its first .safetensors file) or `repo/path/in/repo`."""
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    from huggingface_hub import hf_hub_download, list_repo_files

    from shards.hub import hub_kwargs

    parts = weights.split("/")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    kwargs = hub_kwargs(repo, "watermark head")
    try:
        if not file:
            names = [f for f in list_repo_files(repo) if f.endswith(".safetensors")] if not kwargs else [HEAD_FILE]
            file = names[0]
        return Path(hf_hub_download(repo, file, **kwargs))
    except Exception as e:  # noqa: BLE001 - unknown repo or file, no weights: one line
        raise UserError(f"watermark head {weights!r} not found ({type(e).__name__}): pass a local .safetensors file, "
                        "an HF id, or fit one with --fit-watermark labels.parquet") from None


def load_watermark_head(weights: str, dim: int) -> WatermarkHead:
    """The head from a file or HF id; its input size must be the CLIP model's embedding size."""
    from safetensors import safe_open

    path = _resolve(weights)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - not a safetensors file: one line
        raise UserError(f"watermark head {weights} is not a readable safetensors file ({type(e).__name__}): pass the file --fit-watermark wrote") from None
    got = state["layers.0.weight"].shape[1] if "layers.0.weight" in state else None
    if got != dim:
        raise UserError(f"watermark head {weights} expects {got}-d CLIP embeddings, the CLIP model gives {dim}-d: use the CLIP it was fitted on")
    head = WatermarkHead(dim, int(meta.get("hidden", state["layers.0.weight"].shape[0])))
    head.load_state_dict(state)
    return head.eval()
