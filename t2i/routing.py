"""Token dropping in training: TREAD-style routing (Krause et al. 2025) of a share of the patch
tokens past the middle blocks of a PixArt or DiT.

While a training forward routes (`token_drop` > 0), block `start` receives only each sample's
kept tokens, blocks start .. end-1 run on them alone, and after block end-1 the routed tokens
rejoin as they left (scattered back into the full sequence): the blocks outside the route and the
final layer see every token, and the loss covers all of them. The model itself is unchanged (no
new parameters, the same checkpoints); sampling, the validation loss and export run every token
through every block. The routed blocks cost (1 - token_drop) of their compute
(t2i.models.flops_per_image counts it).

Which tokens a sample keeps is drawn from its own random words (t2i.noise: the words that follow
its noise), so a sample routes the same tokens on any number of processes and after a resume.
`token_drop = 0` routes nothing: the forward is the plain one, and so are the losses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from shards.errors import UserError
from t2i.noise import random_words


def routed_blocks(depth: int, start: int, end: int) -> tuple[int, int]:
    """The blocks [start, end) a model of `depth` blocks routes (a negative end counts from the
    last block); a UserError when that is no block."""
    s, e = start, end + depth if end < 0 else end
    if not 0 <= s < e <= depth:
        raise UserError(f"token_drop routes blocks [{start}, {end}) of a {depth}-block model: none; set token_drop_start and "
                        f"token_drop_end so that 0 <= start < end <= {depth} (a negative end counts from the last block)")
    return s, e


def keep_tokens(keys: np.ndarray, tokens: int, ratio: float, first: int) -> torch.Tensor | None:
    """(B, kept) the token positions each sample keeps (sorted), tokens - floor(ratio * tokens) of
    them, a random subset drawn from words first .. first+tokens-1 of its stream; None for ratio 0."""
    if not ratio:
        return None
    kept = tokens - int(ratio * tokens)
    order = np.argsort(random_words(keys, tokens, first), axis=1, kind="stable")[:, :kept]
    return torch.from_numpy(np.sort(order, axis=1))


@dataclass(frozen=True)
class TokenDrop:
    """A stage's token dropping: the share routed and the model's patch size (tokens per latent)."""

    ratio: float = 0.0
    patch: int = 1

    def keep(self, keys: np.ndarray, latent_shape: tuple[int, ...], first: int) -> torch.Tensor | None:
        """The tokens each sample of a micro-batch keeps (None: no routing), from its words `first` on."""
        h, w = latent_shape[-2:]
        return keep_tokens(keys, (h // self.patch) * (w // self.patch), self.ratio, first)


class _Route:
    """One routed forward: the full sequence as it entered the route, and the kept positions."""

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep, self.full = keep, None

    def _index(self, x: torch.Tensor) -> torch.Tensor:
        return self.keep.to(x.device)[:, :, None].expand(-1, -1, x.shape[-1])

    def enter(self, block: Callable) -> Callable:
        def run(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self.full = hidden_states  # what the exit scatters into (also when it is recomputed, under checkpointing)
            return block(hidden_states.gather(1, self._index(hidden_states)), *args, **kwargs)
        return run

    def leave(self, block: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = block(*args, **kwargs)
            return self.full.scatter(1, self._index(out), out.to(self.full.dtype))
        return run


class RoutedBlocks(nn.ModuleList):
    """A model's transformer_blocks (the same modules and state-dict keys) that route while `keep`
    is set: iterating then yields block `start` behind the gather and block end-1 behind the
    scatter (both around one block when the route is one block long)."""

    start: int = 0
    end: int = 0
    keep: torch.Tensor | None = None

    def __iter__(self) -> Iterator[Any]:
        blocks = list(super().__iter__())
        if self.keep is not None:
            route = _Route(self.keep)
            blocks[self.start] = route.enter(blocks[self.start])
            blocks[self.end - 1] = route.leave(blocks[self.end - 1])
        return iter(blocks)


def attach_routing(model: nn.Module, ratio: float, start: int, end: int) -> TokenDrop:
    """The stage's TokenDrop for `model` (a PixArtWithNull or DiTWithNull); with ratio > 0 its
    transformer's blocks [start, end) route from now on (in forwards given a `keep`)."""
    transformer = model.transformer
    if ratio:
        blocks = transformer.transformer_blocks
        blocks.start, blocks.end = routed_blocks(len(blocks), start, end)
        blocks.__class__ = RoutedBlocks
    return TokenDrop(ratio, transformer.config.patch_size)


@contextlib.contextmanager
def routing(model: nn.Module, keep: torch.Tensor | None) -> Iterator[None]:
    """Forwards of `model` inside route the kept tokens `keep` (None: a plain forward)."""
    if keep is None:
        yield
        return
    blocks = model.transformer.transformer_blocks
    blocks.keep = keep
    try:
        yield
    finally:
        blocks.keep = None
