"""The `aesthetic` scorer: the LAION aesthetic predictor v2 head on CLIP image embeddings.

Architecture as released (christophschuhmann/improved-aesthetic-predictor): an MLP
dim -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout, on L2-normalised CLIP ViT-L/14 image
embeddings (dim 768), predicting a 1-10 rating. Weights come from a local .pth/.safetensors
file or an HF id (`repo` or `repo/file.pth`; from the local HF cache when offline). `fit_head`
fits one on a user's own ratings (`score --fit-aesthetic ratings.parquet`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from shards.errors import UserError


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor v2 MLP (same layer names, so released weights load)."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.input_size = dim
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)

    @torch.inference_mode()
    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Ratings for unit-length CLIP image embeddings, (n, dim) -> (n,)."""
        self.eval()
        return self(torch.from_numpy(np.ascontiguousarray(embeddings, np.float32))).numpy()


def _state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _resolve(weights: str) -> Path:
    """A local file, or an HF id (`repo` -> its first .safetensors/.pth, or `repo/file`)."""
    path = Path(weights)
    if path.is_file():
        return path
    from huggingface_hub import hf_hub_download, list_repo_files

    parts = weights.split("/")
    try:
        if len(parts) > 2:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        files = [f for f in list_repo_files(weights) if f.endswith((".safetensors", ".pth", ".pt"))]
        return Path(hf_hub_download(weights, files[0]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no weights: one line
        raise UserError(f"aesthetic weights {weights!r} not found ({type(e).__name__}): pass a local .pth/.safetensors file or fit one with --fit-aesthetic") from None


def load_head(weights: str, dim: int) -> AestheticMLP:
    """The head from a file or HF id; its input size must match the CLIP embedding size."""
    state = _state_dict(_resolve(weights))
    got = state["layers.0.weight"].shape[1] if "layers.0.weight" in state else None
    if got != dim:
        raise UserError(f"aesthetic weights {weights} expect {got}-d CLIP embeddings, the CLIP model gives {dim}-d: use the CLIP the head was trained on")
    head = AestheticMLP(dim)
    head.load_state_dict(state)
    return head.eval()


def fit_head(embeddings: np.ndarray, ratings: np.ndarray, epochs: int = 200, lr: float = 1e-3, seed: int = 0) -> AestheticMLP:
    """Fit the MLP by mean squared error on (unit-length embedding, rating) pairs (Adam, full
    batches of 256, as the released predictor was trained)."""
    torch.manual_seed(seed)
    head = AestheticMLP(embeddings.shape[1])
    x = torch.from_numpy(np.ascontiguousarray(embeddings, np.float32))
    y = torch.from_numpy(np.asarray(ratings, np.float32))
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(256):
            loss = nn.functional.mse_loss(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def save_head(head: AestheticMLP, path: str | Path) -> str | Path:
    """Write the head as safetensors (a local path or an object-store URI, via shards.fs)."""
    from safetensors.torch import save

    from shards import fs

    fs.write_bytes(path, save({k: v.contiguous() for k, v in head.state_dict().items()}))
    return path
