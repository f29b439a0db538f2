"""A tiny RANDOM LLaVA, built locally in seconds, for tests, benchmarks and the demo.

Public API (kept stable; the demo fine-tunes what this builds):

    build_tiny_llava(out_dir, corpus=None, image_size=32, seed=0, **sizes) -> Path
    save_llava(model, processor, out_dir) -> Path   # save_pretrained both + fix_vllm_keys
    fix_vllm_keys(model_dir) -> None
    LLAVA_CHAT_TEMPLATE

The directory holds a `LlavaForConditionalGeneration` (tiny CLIP vision tower, 2-layer MLP
projector, tiny Llama with head_dim 32, which vLLM's CPU attention accepts) and a
`LlavaProcessor` (CLIPImageProcessor + a byte-level BPE tokenizer trained on `corpus`, with
`<image>`, `<pad>`, `<s>`, `</s>` and LLaVA-1.5's chat template). Both
`LlavaForConditionalGeneration.from_pretrained(dir)` and `vllm.LLM(model=dir)` load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}</s>{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)  # renders LLaVA-1.5's "USER: <image>\n{q}\nASSISTANT:"

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]

DEFAULT_CORPUS = [
    "Describe this image and its style in a very detailed manner",
    'Given the caption of this image "a photo", describe this image in a very detailed manner',
    "USER: <image>\n", "ASSISTANT:", "ASSISTANT: ",
    "The image shows a red circle, a blue square and a green triangle on a white background.",
    "A photograph of a city street with cars, people, trees, buildings and a cloudy sky.",
    "The style is realistic with soft lighting, warm colours and a shallow depth of field.",
]  # fmt: skip


def build_tiny_llava(
    out_dir: str | Path,
    corpus: Sequence[str] | None = None,
    image_size: int = 32,
    seed: int = 0,
    *,
    patch_size: int = 8,
    vocab_size: int = 600,
    vision_hidden: int = 64,
    text_hidden: int = 64,
    vision_layers: int = 2,
    text_layers: int = 2,
    max_position_embeddings: int = 1024,
) -> Path:
    """Build and save a random tiny LLaVA + processor at `out_dir`; returns the directory.

    `corpus` (strings) is what the byte-level BPE tokenizer is trained on, so it sets the
    vocabulary (up to `vocab_size` tokens; any text still encodes, byte-level). The vision
    tower sees `image_size` px squares in `patch_size` patches: (image_size/patch_size)^2 image
    tokens per image. Same arguments and seed give the same weights and tokenizer.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    out = Path(out_dir)
    tok, tokenizer = _bpe_tokenizer(list(corpus) if corpus else list(DEFAULT_CORPUS), vocab_size)

    cfg = _llava_config(tok, tokenizer, image_size, patch_size, vision_hidden, text_hidden, vision_layers, text_layers,
                        max_position_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip
    return save_llava(model, processor, out)


def _llava_config(tok, tokenizer, image_size: int, patch_size: int, vision_hidden: int, text_hidden: int,
                  vision_layers: int, text_layers: int, max_position_embeddings: int):
    """The LlavaConfig of a tiny CLIP vision tower + Llama text model of these sizes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    head_dim = 32  # vLLM's CPU attention needs 32/64/80/...; 16 fails
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32), image_size=image_size, patch_size=patch_size,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=3 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=text_hidden // head_dim,
        num_key_value_heads=text_hidden // head_dim, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.token_to_id("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=(image_size // patch_size) ** 2,
    )  # fmt: skip


def _bpe_tokenizer(texts: list[str], vocab_size: int):
    """(tokenizers.Tokenizer, PreTrainedTokenizerFast): a byte-level BPE trained on `texts`, with
    the special tokens a LLaVA prompt needs, padding on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )  # fmt: skip
    return tok, tokenizer


def save_llava(model, processor, out_dir: str | Path) -> Path:
    """Save a LLaVA model and its processor at `out_dir` in the layout both transformers and vLLM
    load (`save_pretrained` of both, then `fix_vllm_keys`); returns the directory. Use it after
    fine-tuning what `build_tiny_llava` made."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    fix_vllm_keys(out)
    return out


def fix_vllm_keys(model_dir: str | Path) -> None:
    """Rename saved vision-tower weights so vLLM loads them; transformers reads both layouts.

    transformers 5.x saves LLaVA's CLIP tower as `vision_tower.X` (its in-memory
    `CLIPVisionModel.vision_model` level is flattened on save), while vLLM's LLaVA loader
    expects `vision_tower.vision_model.X`. Idempotent.
    """
    from safetensors.torch import load_file, save_file

    prefix, want = "vision_tower.", "vision_tower.vision_model."
    for path in Path(model_dir).glob("*.safetensors"):
        state = load_file(path)
        renamed = {}
        for k, v in state.items():
            i = k.find(prefix)
            if i >= 0 and not k[i:].startswith(want):
                k = k[:i] + want + k[i + len(prefix) :]
            renamed[k] = v
        if list(renamed) != list(state):
            save_file(renamed, str(path), metadata={"format": "pt"})
