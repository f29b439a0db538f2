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


def _resolve(weights: str, flag: str) -> Path:
    """A local file, or an HF id (`repo` -> its first .safetensors/.pth, or `repo/file`), checked
    first (shards.hub: one line within seconds when the hub cannot be reached)."""
    path = Path(weights)
    if path.exists() or weights.startswith((".", "/", "~")):
        return path
    from huggingface_hub import hf_hub_download, list_repo_files

    from shards.hub import hub_kwargs

    parts = weights.split("/")
    repo = "/".join(parts[:2])
    local = hub_kwargs(repo, "aesthetic head").get("local_files_only", False)
    try:
        if len(parts) > 2:
            return Path(hf_hub_download(repo, "/".join(parts[2:]), local_files_only=local))
        files = [f for f in list_repo_files(weights) if f.endswith((".safetensors", ".pth", ".pt"))]
        return Path(hf_hub_download(weights, files[0], local_files_only=local))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no weights: one line
        raise UserError(f"{flag} {weights!r} not found ({type(e).__name__}): pass a local .pth/.safetensors file or fit "
                        "one with --fit-aesthetic") from None


def load_head(weights: str, dim: int, flag: str = "--aesthetic-weights") -> AestheticMLP:
    """The head from a file or HF id; its input size must match the CLIP embedding size. A
    file that is not such a head (random bytes, other weights) is a one-line UserError."""
    from shards.hub import load_weights_file

    state = load_weights_file(_resolve(weights, flag), "LAION aesthetic head", flag)
    got = tuple(state["layers.0.weight"].shape)[1] if hasattr(state.get("layers.0.weight"), "shape") else None
    if got is None:
        raise UserError(f"{flag} {weights} is not a LAION aesthetic head (no layers.0.weight): pass the head's weights, "
                        "or fit one with --fit-aesthetic")
    if got != dim:
        raise UserError(f"{flag} {weights} expects {got}-d CLIP embeddings, the CLIP model gives {dim}-d: use the CLIP "
                        "the head was trained on")
    head = AestheticMLP(dim)
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{flag} {weights} does not fit the aesthetic head ({str(e).splitlines()[0]}): pass a LAION "
                        "aesthetic v2 head") from None
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
