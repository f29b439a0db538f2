"""REPA (Yu et al. 2025, "Representation Alignment for Generation: Training Diffusion Transformers
Is Easier Than You Think"): an auxiliary loss (a t2i.objective.LossTerm) that trains the tokens of
an early block, through a small MLP projector, to match by cosine the patch tokens of a frozen
vision encoder (the teacher, t2i.teacher) on the clean image.

Settings (TrainConfig, manifest, CLI):
- `teacher`: the teacher, by HF id or directory. `features` stores its patch tokens (it joins
  the features' cache key); training reads them with the latents and never runs it.
- `repa_weight` (lambda, default 0: off): total loss += lambda x the mean over tokens of
  (1 - cos(projector(h), teacher patch)); REPA and SimpleTuner use 0.5. At 0 nothing is attached
  and the run is the plain one.
- `repa_block`: h is the output of the first `repa_block` blocks (REPA's encoder depth, counted
  from 1); 0: about a third of the depth (round(depth / 3), at least 1: 9 of XL's 28 blocks).
- `repa_proj`: the projector's width; 0: REPA's 2048, at most 4 x the model's width (256 for
  a 64-wide tiny model). The projector is REPA's: Linear(hidden, proj), SiLU, Linear(proj, proj),
  SiLU, Linear(proj, teacher channels).

The projector is a submodule of the trained model (`repa_projector`): trained, in the optimizer,
the EMA and every checkpoint, so a resume is exact; changing any REPA setting on --resume is
refused (`check_resume_repa`). `export`, `sample`, import-dit and a class-cond stage's DiT read
only the transformer's weights, so they drop it.

Grids: the teacher's patch grid (its own input size, t2i.teacher) and the model's token grid
cover the same image; where they differ the teacher tokens are resized to the model's grid by
bilinear interpolation over the grid (align_corners false), and a teacher grid of another aspect
(more than ASPECT_TOLERANCE apart: features made otherwise than by `features`) is refused
before training, since interpolating it would stretch the image.

Token routing (t2i.routing): when the aligned block is inside the routed range its output holds
only each sample's kept tokens, and only those are compared (their positions: the micro-batch's
"keep"); elsewhere every token is.

Mechanics, without an `if` in the loop: a forward pre-hook on the model arms the term (training
forwards with gradients only: not validation, not sampling); the aligned block's forward hook
records its output once (gradient checkpointing recomputes the block without recording again); a
forward hook on the model projects it, inside the model's forward (DDP and FSDP see the
projector as part of the model); the term's call compares that with the stored teacher tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from shards.errors import UserError

NAME = "repa"
PROJ_WIDTH = 2048  # REPA's projector width (every SiT size)
ASPECT_TOLERANCE = 0.1  # relative aspect difference of teacher and token grids that interpolation may absorb
# the settings a resume must keep, and their defaults (a checkpoint from before REPA trained without it)
REPA_FIELDS: dict[str, Any] = {"teacher": "", "repa_weight": 0.0, "repa_block": 0, "repa_proj": 0}


def aligned_block(depth: int, block: int) -> int:
    """How many blocks precede the aligned tokens: `block`, or 0 for round(depth / 3) (at least
    1); a UserError when the model has no such block."""
    n = block or max(1, round(depth / 3))
    if not 1 <= n <= depth:
        raise UserError(f"repa_block = {block} is not a block of a {depth}-block model: pick 1..{depth} (the output of the "
                        "first repa_block blocks is aligned; 0: about a third of the depth)")
    return n


def check_repa(settings: Mapping[str, Any], depth: int | None) -> None:
    """A UserError for REPA settings it cannot train with (`depth`: the model's blocks, None
    when not known before the init model loads)."""
    weight = settings.get("repa_weight", 0.0)  # its range, and the others', checked by TrainConfig (shards.checks)
    if weight and not settings.get("teacher"):
        raise UserError(f"repa_weight = {weight} needs a teacher: set teacher (--teacher) to a vision model, e.g. "
                        "facebook/dinov2-base, whose patch tokens features stores")
    if weight and depth is not None:
        aligned_block(depth, settings.get("repa_block", 0))


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: settings.get(k, default) for k, default in REPA_FIELDS.items()}
    if out["teacher"] and Path(out["teacher"]).exists():
        out["teacher"] = str(Path(out["teacher"]).resolve())
    return out


def check_resume_repa(ck: Path, saved: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """Refuse to resume checkpoint `ck` (its recorded config `saved`) with other REPA settings."""
    theirs, ours = _plain(saved), _plain(settings)
    differ = [f"{k} {theirs[k]!r} (this run: {ours[k]!r})" for k in REPA_FIELDS if theirs[k] != ours[k]]
    if differ:
        raise UserError(f"checkpoint {ck} was trained with other REPA settings: {'; '.join(differ)}: resume with the "
                        "checkpoint's settings, or start a new --out with init = \"checkpoint:...\"")


def build_projector(hidden: int, width: int, out: int) -> nn.Sequential:
    """REPA's projector: hidden -> width -> width -> out, SiLU between (torch's default init)."""
    return nn.Sequential(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, out))


def projector_width(hidden: int, proj: int = 0) -> int:
    """The projector's width: `proj`, or REPA's 2048 at most 4 x the model's width."""
    return proj or min(PROJ_WIDTH, 4 * hidden)


def projector_macs(hidden: int, width: int, out: int) -> int:
    """Multiply-adds of the projector per token."""
    return hidden * width + width * width + width * out


def check_grid(teacher: tuple[int, int], tokens: tuple[int, int]) -> None:
    """A UserError when a teacher grid cannot be interpolated onto a token grid without stretching."""
    if abs(math.log((teacher[0] / teacher[1]) / (tokens[0] / tokens[1]))) > math.log1p(ASPECT_TOLERANCE):
        raise UserError(f"the stored teacher patch grid {teacher[0]}x{teacher[1]} has another aspect than the model's token grid "
                        f"{tokens[0]}x{tokens[1]}: interpolating would stretch the image; make the features with this "
                        "stage's resolution and buckets (`features` runs the teacher at each bucket's aspect)")


def match_grid(target: torch.Tensor, grid: tuple[int, int], tokens: tuple[int, int]) -> torch.Tensor:
    """(B, rows x columns, C) teacher tokens on the token grid (B, tokens, C): as they are when the
    grids agree, else bilinearly interpolated over the grid (align_corners false)."""
    if tuple(grid) == tuple(tokens):
        return target
    b, _, c = target.shape
    image = target.transpose(1, 2).reshape(b, c, *grid)
    resized = nn.functional.interpolate(image, size=tokens, mode="bilinear", align_corners=False)
    return resized.flatten(2).transpose(1, 2)


class Repa:
    """The REPA loss term of a stage (see the module docstring); `attach` it to the model before
    the optimizer is built."""

    name = NAME

    def __init__(self, weight: float, block: int, proj: int, teacher_dim: int) -> None:
        self.weight, self.block, self.proj, self.teacher_dim = weight, block, proj, teacher_dim
        self.patch, self.projector, self.macs = 1, None, 0
        self._armed, self._tokens, self._projected = False, None, None

    def attach(self, model: nn.Module) -> None:
        """Add `repa_projector` to the model and the hooks that feed it (a UserError for a block
        the model does not have)."""
        tr = model.transformer
        blocks = tr.transformer_blocks
        hidden = tr.config.num_attention_heads * tr.config.attention_head_dim
        n = aligned_block(len(blocks), self.block)
        self.patch, width = tr.config.patch_size, projector_width(hidden, self.proj)
        model.repa_projector = self.projector = build_projector(hidden, width, self.teacher_dim)
        self.macs = projector_macs(hidden, width, self.teacher_dim)
        model.register_forward_pre_hook(self._arm)
        blocks[n - 1].register_forward_hook(self._record)
        model.register_forward_hook(self._project)

    def _arm(self, model: nn.Module, args: Any) -> None:
        self._armed, self._tokens = model.training and torch.is_grad_enabled(), None

    def _record(self, block: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._armed:
            self._armed, self._tokens = False, output

    def _project(self, model: nn.Module, args: Any, output: Any) -> None:
        if self._tokens is not None:
            self._projected, self._tokens = self.projector(self._tokens), None

    def inputs(self, batch) -> dict[str, Any]:
        """The batch's stored teacher patch tokens and their grid."""
        return {"target": batch.teacher, "grid": tuple(batch.teacher_grid)}

    def __call__(self, inp: dict[str, Any]) -> torch.Tensor:
        """Per sample, the mean over the compared tokens of 1 - cos(projected tokens, teacher's)."""
        z, self._projected = self._projected, None
        if z is None:
            raise RuntimeError("the REPA loss needs a training forward of the model it is attached to first")
        own = inp[self.name]
        tokens = (inp["x0"].shape[-2] // self.patch, inp["x0"].shape[-1] // self.patch)
        target = match_grid(own["target"].to(z.device).float().detach(), own["grid"], tokens)  # the teacher gets no gradient
        if z.shape[1] != target.shape[1]:  # the aligned block is routed: only each sample's kept tokens
            keep = inp["keep"].to(z.device)
            target = target.gather(1, keep[:, :, None].expand(-1, -1, target.shape[-1]))
        return 1 - nn.functional.cosine_similarity(z.float(), target, dim=-1).mean(1)


def repa_terms(settings: Mapping[str, Any], model: nn.Module, teacher_dim: int) -> list[Repa]:
    """The stage's REPA term attached to `model` (none when repa_weight is 0)."""
    if not settings.get("repa_weight", 0.0):
        return []
    term = Repa(settings["repa_weight"], settings.get("repa_block", 0), settings.get("repa_proj", 0), teacher_dim)
    term.attach(model)
    return [term]


def check_teacher_grids(data, patch: int) -> None:
    """Every bucket's stored teacher grid can be put on the model's token grid (`check_grid`)."""
    for idx in data.buckets.values():
        if len(idx):
            layout = data.read(idx[:1])[1]
            check_grid(layout.teacher[:2], (layout.latent_shape[-2] // patch, layout.latent_shape[-1] // patch))
