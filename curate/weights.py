"""Saving the small torch modules the curate scorers fit (watermark head, text detector) as one
safetensors file with their sizes in the metadata, to a local path or an object-store URI."""

from __future__ import annotations

from pathlib import Path


def save_module(module, path: str | Path, metadata: dict[str, str]) -> str | Path:
    """Write `module`'s state dict to `path` as safetensors with `metadata`; returns `path`."""
    from safetensors.torch import save

    from shards import fs

    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    fs.write_bytes(path, save(state, metadata=metadata))
    return path
