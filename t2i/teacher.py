"""REPA's teacher (t2i.repa): a frozen transformers vision model whose patch tokens an early block
of the trained model learns to match. `features` runs it once per image and stores its patch
tokens beside the latents (t2i.feature_encoder); training never runs it.

- Any ViT-family vision model by HF id or local directory: DINOv2 (with registers too), SigLIP
  and CLIP (the vision tower of a full checkpoint), ViT: `AutoModel` (on the checkpoint's
  `vision_config` when it has one) and its `AutoImageProcessor` (mean, std and input size).
- Its patch tokens are `last_hidden_state` without the prefix tokens (CLS, registers), counted
  on a probe forward as the token count minus the patch grid.
- It sees the clean image the VAE encodes (the row's bucket), resized (bicubic, antialiased) to
  its own input size: the processor's crop (or size) for a square image, the same pixel area at
  the bucket's aspect otherwise, each side a multiple of its patch; normalised with the
  processor's mean and std. Never cropped: each teacher patch covers the part of the image its
  latent tokens cover (a grid that differs from the model's is interpolated in training).
- Refused in one line: an id the hub check (shards.hub: within seconds) cannot load, a model
  whose config has no patch grid (a CNN, a text model), or one whose output is not patch tokens.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from shards.errors import UserError
from shards.hub import check_model, load_pretrained

WHAT = "the REPA teacher"
FLAG = "--teacher"
MAX_PREFIX = 16  # CLS + registers: more tokens than the grid beyond this is not a ViT's patch sequence


@dataclass(frozen=True)
class TeacherShape:
    """What pricing and the grid need from a teacher's config and processor (no weights)."""

    patch: int
    native: tuple[int, int]  # (height, width) of the input it was made for (its processor's crop or size)
    hidden: int  # channels of its patch tokens
    layers: int
    mlp: int  # its MLP's inner width

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The teacher's input size for an image of `height` x `width`: its native size for a
        square image, else the native pixel area at the image's aspect; sides multiples of the patch."""
        area, aspect = self.native[0] * self.native[1], height / width
        return tuple(max(self.patch, round(math.sqrt(area * a) / self.patch) * self.patch) for a in (aspect, 1 / aspect))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The teacher's patch grid (rows, columns) for an image of `height` x `width`."""
        h, w = self.input_size(height, width)
        return h // self.patch, w // self.patch

    def forward_flops(self, height: int, width: int) -> float:
        """FLOPs of one forward on an image of `height` x `width` (matmuls: patch embedding, per
        layer qkv/out 4 h^2 + MLP 2 h m per token and attention 2 T^2 h; x2 multiply-add)."""
        t = math.prod(self.grid(height, width))
        per_layer = t * (4 * self.hidden**2 + 2 * self.hidden * self.mlp) + 2 * t * t * self.hidden
        return 2.0 * (self.layers * per_layer + t * 3 * self.patch**2 * self.hidden)


def _side(size) -> tuple[int, int] | None:
    """(height, width) of a processor's size / crop_size, or None."""
    if not size:
        return None
    get = size.get if hasattr(size, "get") else lambda k: getattr(size, k, None)
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    edge = get("shortest_edge")
    return (int(edge), int(edge)) if edge else None


def load_config(spec: str) -> tuple[Any, dict[str, Any]]:
    """(the vision config, from_pretrained's hub kwargs) of a teacher; a UserError when it cannot
    be loaded or has no patch grid."""
    from transformers import AutoConfig

    hub = check_model(spec, WHAT, FLAG)  # an unreachable or unknown hub id, a missing or empty folder: in seconds
    try:
        config = AutoConfig.from_pretrained(spec, **hub)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load {WHAT} {spec!r} ({e.__class__.__name__}): pass a local transformers vision model directory "
                        "or a reachable HF id") from None
    vision = getattr(config, "vision_config", None) or config
    patch = getattr(vision, "patch_size", None)
    if not isinstance(patch, int) or not isinstance(getattr(vision, "hidden_size", None), int):
        raise UserError(f"{WHAT} {spec!r} ({config.model_type}) has no patch tokens (its config has no patch_size and hidden_size): "
                        "use a ViT-family vision model (DINOv2, SigLIP, CLIP vision)")
    return vision, hub


def teacher_shape(spec: str, vision=None, processor=None) -> TeacherShape:
    """The TeacherShape of `spec` from its config and image processor (read here when not given)."""
    if vision is None:
        vision, hub = load_config(spec)
        processor = load_processor(spec, hub)
    crop = _side(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    native = crop or _side(getattr(processor, "size", None))
    if native is None:
        size = getattr(vision, "image_size", 224)
        native = (size, size) if isinstance(size, int) else tuple(size)
    mlp = getattr(vision, "intermediate_size", None) or int(getattr(vision, "mlp_ratio", 4) * vision.hidden_size)
    return TeacherShape(vision.patch_size, native, vision.hidden_size, vision.num_hidden_layers, mlp)


@functools.lru_cache(maxsize=None)
def shape_of(spec: str) -> TeacherShape:
    """teacher_shape(spec), read once per process (`plan` prices every stage with it)."""
    return teacher_shape(spec)


def load_processor(spec: str, hub: dict[str, Any]):
    """The teacher's AutoImageProcessor; a UserError when it has none (its mean and std matter)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(spec, **hub)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{WHAT} {spec!r} has no image processor ({e.__class__.__name__}): save its preprocessor_config.json "
                        "with the model (its mean, std and input size)") from None


class Teacher:
    """A loaded, frozen teacher: `encode(pixels)` gives its patch tokens."""

    def __init__(self, spec: str, model, shape: TeacherShape, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.spec, self.model, self.shape, self.mean, self.std = spec, model, shape, mean, std
        self.interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self.prefix = self._count_prefix()

    @classmethod
    def load(cls, spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "Teacher":
        """The teacher `spec` on `device` in `dtype`, without gradients."""
        from transformers import AutoModel

        vision, hub = load_config(spec)
        processor = load_processor(spec, hub)
        model = load_pretrained(AutoModel.from_pretrained, spec, WHAT, FLAG, config=vision)  # bad weights: one line
        model = model.to(device, dtype).eval().requires_grad_(False)
        stats = [torch.tensor(getattr(processor, k, None) or [0.5] * 3, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                 for k in ("image_mean", "image_std")]
        return cls(spec, model, teacher_shape(spec, vision, processor), *stats)

    def _count_prefix(self) -> int:
        """The tokens before the patches (CLS, registers), from a probe forward at the native size."""
        h, w = self.shape.native
        dev = self.mean.device
        out = self._forward(torch.zeros(1, 3, h - h % self.shape.patch, w - w % self.shape.patch, device=dev))
        grid = (h // self.shape.patch) * (w // self.shape.patch)
        if out.dim() != 3 or not 0 <= out.shape[1] - grid <= MAX_PREFIX or out.shape[-1] != self.shape.hidden:
            raise UserError(f"{WHAT} {self.spec!r} does not output patch tokens (last_hidden_state {tuple(out.shape)} for a "
                            f"{h // self.shape.patch}x{w // self.shape.patch} patch grid): use a ViT-family vision model "
                            "(DINOv2, SigLIP, CLIP vision)")
        return out.shape[1] - grid

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate and tuple(x.shape[-2:]) != self.shape.native else {}
        return self.model(pixel_values=x.to(next(self.model.parameters()).dtype), **kwargs).last_hidden_state

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, rows x columns, hidden) patch tokens of images `pixels` (B, 3, H, W) in [-1, 1] (as
        the VAE takes them), in row-major grid order, and the grid (rows, columns)."""
        x = (pixels.to(self.mean.device).float() + 1) / 2
        size = self.shape.input_size(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        tokens = self._forward((x - self.mean) / self.std)[:, self.prefix :]
        return tokens, (size[0] // self.shape.patch, size[1] // self.shape.patch)
