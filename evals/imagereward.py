"""ImageReward (Xu et al. 2023, THUDM/ImageReward) as a `--preference` model, through transformers'
BLIP classes (`BlipVisionModel`, `BlipTextModel`), not the ImageReward pip package.

The checkpoint is `ImageReward.pt`, the state dict of ImageReward's own module: `blip.visual_encoder.*`
(BLIP's timm-style ViT; ViT-L/16 at 224 px), `blip.text_encoder.*` (BLIP's BERT, "med", with a
cross-attention to the image in every layer, configured by `med_config.json`), `blip.vision_proj` /
`blip.text_proj` (unused by the score) and `mlp.layers.{0,2,4,6,7}` (five linear layers, no
activations between them; 1, 3, 5 are dropouts). The ViT's names are renamed to BlipVisionModel's
(as transformers' convert_blip_original_pytorch_to_hf.py does for BLIP); the text encoder's names
are already BlipTextModel's.

The score, as ImageReward.score computes it: the prompt through BLIP's BERT tokenizer (padded to
35 tokens, truncated there), the text encoder run on it with cross-attention to every image token
of the ViT's last (layer-normed) hidden state, the [CLS] position's hidden state through the MLP,
then (r - 0.16717...) / 1.03333... (ImageReward's published mean and std). Images: resized
(bicubic) so the short side is 224, centre-cropped to 224 x 224, normalised with CLIP's mean and
std (ImageReward's `_transform`; the size is read from the checkpoint's position embedding).

Not from the checkpoint, so fixed here as BLIP fixes them: the ViT's heads (64 channels each: 16
for ViT-L, 12 for ViT-B), its LayerNorm eps 1e-6, exact GELU; the text encoder's cross-attention
width is the ViT's width (BLIP overrides med_config's `encoder_width` with it). The tokenizer is the
model directory's own when it holds one, else bert-base-uncased with ImageReward's two added tokens
([DEC], [ENC]), as ImageReward's `init_tokenizer` builds it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from shards.errors import UserError

WEIGHTS, MED_CONFIG = "ImageReward.pt", "med_config.json"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's published normalisation
MAX_TOKENS = 35
IMAGE_MEAN, IMAGE_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HEAD_DIM = 64  # BLIP's ViTs: 768 / 12 heads, 1024 / 16 heads
VIT_EPS = 1e-6
TOKENIZER = "google-bert/bert-base-uncased"  # ImageReward: BertTokenizer.from_pretrained('bert-base-uncased')
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
VISION, TEXT, HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."
FIX = (f"pass a directory holding THUDM/ImageReward's {WEIGHTS} and {MED_CONFIG}, its HF id THUDM/ImageReward, "
       "or a CLIPModel directory or id (PickScore, HPSv2)")  # fmt: skip
_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
_VIT_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
            "patch_embed.proj": "embeddings.patch_embedding", "norm": "post_layernorm"}  # fmt: skip


def vision_key(key: str) -> str | None:
    """A `blip.visual_encoder.` key (without that prefix) as BlipVisionModel names it; None if unknown."""
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if block:
        name = _VIT_BLOCK.get(block[2])
        return f"encoder.layers.{block[1]}.{name}.{block[3]}" if name else None
    stem, _, leaf = key.rpartition(".")
    if stem in _VIT_TOP and leaf in ("weight", "bias"):
        return f"{_VIT_TOP[stem]}.{leaf}"
    return _VIT_TOP.get(key) if key in ("cls_token", "pos_embed") else None


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict, list[torch.Tensor]]:
    """ImageReward's state dict as (BlipVisionModel state, BlipTextModel state, the MLP's linear
    layers as [weight, bias, weight, bias, ...] in order). Keys outside the scored parts (the
    contrastive projections, a DDP `module.` prefix) are dropped; an unknown ViT key stays unknown
    (it makes the strict load below fail)."""
    vision, text, head = {}, {}, {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(VISION):
            vision[vision_key(key[len(VISION):]) or key] = value
        elif key.startswith(TEXT) and not key.endswith("embeddings.position_ids"):  # med.py's buffer, saved in the state
            text[key[len(TEXT):]] = value
        elif key.startswith(HEAD):
            index, _, leaf = key[len(HEAD):].partition(".")
            head[(int(index) if index.isdigit() else -1, leaf)] = value
    layers = [head.get((i, leaf)) for i in sorted({i for i, _ in head}) for leaf in ("weight", "bias")]
    return vision, text, layers


def configs(state_vision: dict, med: dict):
    """(BlipVisionConfig, BlipTextConfig) from the ViT's tensor shapes and med_config.json."""
    from transformers import BlipTextConfig, BlipVisionConfig

    pos, patch = state_vision["embeddings.position_embedding"], state_vision["embeddings.patch_embedding.weight"]
    width = int(pos.shape[-1])
    layers = 1 + max(int(k.split(".")[2]) for k in state_vision if k.startswith("encoder.layers."))
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=int(state_vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
                              num_hidden_layers=layers, num_attention_heads=max(1, width // HEAD_DIM),
                              image_size=int(patch.shape[-1]) * math.isqrt(int(pos.shape[1]) - 1), patch_size=int(patch.shape[-1]),
                              hidden_act="gelu", layer_norm_eps=VIT_EPS)  # fmt: skip
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id")  # fmt: skip
    text = BlipTextConfig(**{k: med[k] for k in keep if k in med}, encoder_hidden_size=width, is_decoder=True,
                          bos_token_id=None, eos_token_id=None, sep_token_id=None,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return vision, text


def preprocess(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """ImageReward's `_transform(size)` on PIL images: the short side resized to `size` (bicubic; the
    long side int(size x long / short)), the centre `size` x `size` (offsets rounded as torchvision's
    CenterCrop), RGB, [0, 1], CLIP's mean and std. (n, 3, size, size) float32."""
    out = []
    for im in images:
        w, h = im.size
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        if new != (w, h):
            im = im.resize(new, Image.BICUBIC)
        left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
        im = im.crop((left, top, left + size, top + size)).convert("RGB")
        out.append(np.asarray(im, np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return (x - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)


class ImageRewardScorer:
    """ImageReward loaded once: `score(images, prompts)` -> its normalised reward per image."""

    def __init__(self, model: str, device: str | None = None, flag: str = "--preference") -> None:
        from shards.hub import load_weights_file, quiet_weight_loading

        quiet_weight_loading()
        self.name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        weights, med_path, tokenizer_dir = model_files(model, flag)
        med = _read_med_config(med_path, model, flag)
        state = load_weights_file(weights, f"ImageReward checkpoint ({WEIGHTS})", flag)
        self.vision, self.text, self.head = _build(state, med, model, flag)
        self.vision.to(self.device).eval()
        self.text.to(self.device).eval()
        self.head = [t.to(self.device, torch.float32) for t in self.head]
        self.image_size = int(self.vision.config.image_size)
        self.tokenizer = load_tokenizer(tokenizer_dir, flag)

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """(reward - mean) / std of each image for its prompt, (n,) float32."""
        if not images:
            return np.zeros(0, np.float32)
        pixels = preprocess(images, self.image_size).to(self.device, self.vision.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        hidden = self.text(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device),
                           encoder_hidden_states=image_embeds,
                           encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
                           ).last_hidden_state  # fmt: skip
        reward = hidden[:, 0, :].float()
        for w, b in zip(self.head[0::2], self.head[1::2]):
            reward = torch.nn.functional.linear(reward, w, b)
        return ((reward[:, 0] - REWARD_MEAN) / REWARD_STD).cpu().numpy().astype(np.float32)


def _build(state: dict, med: dict, model: str, flag: str):
    """(BlipVisionModel, BlipTextModel, MLP tensors) loaded strictly from ImageReward's state dict."""
    from transformers import BlipTextModel, BlipVisionModel

    vision_state, text_state, head = split_checkpoint(state)
    if not vision_state or not text_state or not head:
        raise UserError(f"{flag} {model}: {WEIGHTS} holds no ImageReward weights (no {VISION}*, {TEXT}* or {HEAD}* tensors): {FIX}")
    if not _is_chain(head, int(med.get("hidden_size", 0))):
        raise UserError(f"{flag} {model}: {WEIGHTS}'s {HEAD}* are not a chain of linear layers from the text width to one "
                        f"reward: {FIX}")
    try:
        vision_cfg, text_cfg = configs(vision_state, med)
        vision, text = BlipVisionModel(vision_cfg), BlipTextModel(text_cfg, add_pooling_layer=False)
        vision.load_state_dict(vision_state, strict=True)
        text.load_state_dict(text_state, strict=True)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag} {model}: {WEIGHTS} does not match ImageReward's BLIP ({type(e).__name__}: {reason}): {FIX}") from None
    return vision, text, head


def _is_chain(head: list, width: int) -> bool:
    """[weight, bias, ...]: each layer takes the previous one's output, the first the text width, the last gives 1."""
    if any(t is None or not isinstance(t, torch.Tensor) for t in head):
        return False
    dims = [width]
    for w, b in zip(head[0::2], head[1::2]):
        if w.dim() != 2 or w.shape[1] != dims[-1] or b.shape != (w.shape[0],):
            return False
        dims.append(int(w.shape[0]))
    return dims[-1] == 1


def _read_med_config(path: Path, model: str, flag: str) -> dict:
    try:
        med = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {model}: {MED_CONFIG} is not readable JSON ({type(e).__name__}): {FIX}") from None
    if not isinstance(med, dict) or "hidden_size" not in med:
        raise UserError(f"{flag} {model}: {MED_CONFIG} is not BLIP's BERT config (no hidden_size): {FIX}")
    return med


def is_imagereward(model: str) -> bool:
    """A local directory holding ImageReward.pt or med_config.json, or a hub repository with
    med_config.json (asked after shards.hub's check: one line when the hub cannot be reached)."""
    path = Path(model).expanduser()
    if path.exists():
        return path.is_dir() and ((path / WEIGHTS).is_file() or (path / MED_CONFIG).is_file())
    from shards.hub import check_model, is_hub_id

    if not is_hub_id(model):
        return False
    from huggingface_hub import hf_hub_download

    kwargs = check_model(model, "preference model", "--preference")
    try:
        hf_hub_download(model, MED_CONFIG, **kwargs)
    except Exception:  # noqa: BLE001 - no such file there (or not cached offline): not ImageReward
        return False
    return True


def model_files(model: str, flag: str) -> tuple[Path, Path, Path | None]:
    """(ImageReward.pt, med_config.json, the folder holding a tokenizer or None) of a directory or HF id."""
    from shards.hub import check_model

    kwargs = check_model(model, "ImageReward model", flag)
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [f for f in (WEIGHTS, MED_CONFIG) if not (path / f).is_file()]
        if missing:
            raise UserError(f"{flag} {model} holds no {' and no '.join(missing)}: {FIX}")
        return path / WEIGHTS, path / MED_CONFIG, _tokenizer_folder(model, kwargs)
    from huggingface_hub import hf_hub_download

    try:
        files = [Path(hf_hub_download(model, f, **kwargs)) for f in (MED_CONFIG, WEIGHTS)]
    except Exception as e:  # noqa: BLE001 - a repository without them: one line
        raise UserError(f"{flag} {model}: no {WEIGHTS} / {MED_CONFIG} there ({type(e).__name__}): {FIX}") from None
    return files[1], files[0], _tokenizer_folder(model, kwargs)


def _tokenizer_folder(model: str, hub: dict) -> Path | None:
    """The folder holding `model`'s own tokenizer (a directory's, or the hub repository's), or None."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path if any((path / f).is_file() for f in TOKENIZER_FILES) else None
    from huggingface_hub import hf_hub_download

    for name in TOKENIZER_FILES:
        try:
            return Path(hf_hub_download(model, name, **hub)).parent
        except Exception:  # noqa: BLE001 - THUDM/ImageReward ships no tokenizer: bert-base-uncased then
            continue
    return None


def check(model: str, flag: str = "--preference") -> None:
    """Before any work: `model` (directory or id) can be reached, and so can its tokenizer (its
    own, or bert-base-uncased); one line otherwise. Downloads nothing large."""
    from shards.hub import check_model

    hub = check_model(model, "ImageReward model", flag)
    if _tokenizer_folder(model, hub) is None:
        check_model(TOKENIZER, "ImageReward's BERT tokenizer", flag)


def load_tokenizer(folder: Path | None, flag: str):
    """The model folder's tokenizer, or bert-base-uncased with ImageReward's [DEC] and [ENC] tokens."""
    from transformers import AutoTokenizer

    from shards.hub import load_pretrained

    if folder is not None:
        return load_pretrained(AutoTokenizer.from_pretrained, str(folder), "ImageReward tokenizer", flag)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, TOKENIZER, "ImageReward's BERT tokenizer", flag)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer
