"""Tiny RANDOM vision-language models of the families people caption with (tests and benchmarks
only; nothing on the product's import path uses this module).

    build_tiny_vlm(family, out_dir, seed=0, scale="tiny") -> Path     # FAMILIES lists the names

Each is the family's real transformers config class, shrunk (1-2 layers, hidden 64, text
head_dim 32, which vLLM's CPU attention accepts), its real processor class with a byte-level BPE
tokenizer trained here on a few sentences (the family's special tokens and a chat template that
renders its real prompt format), and small image settings so a test image gives tens of image
tokens. Same family and seed give the same directory contents. `transformers` and `vllm.LLM`
both load it (where vLLM supports the family on CPU; see tests/test_caption_families.py).

`scale="small"` (the families in SMALL) keeps the same classes, tokenizer and templates but takes
the real dimensions of a small released captioner (IDEFICS_SIZES, QWEN2_VL_SMALL), still with random
weights and with the tokenizer padded to the released vocabulary size, for
benchmarks that need the engine's real cost per image (benchmarks/vlm_throughput_bench.py
--scale small); `model_parts(family, scale)` gives its config and processor without weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tiny.vlm_parts import HEAD_DIM, TEXT, bpe_tokenizer, chat_template, save_vlm, token_ids

QWEN_TEMPLATE = chat_template("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                          "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n", "<|im_start|>assistant\n")
QWEN3_TEMPLATE = chat_template("<|im_start|>user\n", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n", "<|im_start|>assistant\n")
INTERNVL_TEMPLATE = chat_template("<|im_start|>user\n", "<IMG_CONTEXT>\n", "<|im_end|>\n", "<|im_start|>assistant\n")
NEXT_TEMPLATE = chat_template("[INST] ", "<image>\n", " [/INST]", "")
ONEVISION_TEMPLATE = chat_template("<|im_start|>user ", "<image>\n", "<|im_end|>", "<|im_start|>assistant\n")
IDEFICS3_TEMPLATE = chat_template("User:", "<image>", "<end_of_utterance>\n", "Assistant:")
GEMMA3_TEMPLATE = chat_template("<start_of_turn>user\n", "<start_of_image>", "<end_of_turn>\n", "<start_of_turn>model\n")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


# Qwen2-VL small: Qwen2-VL-2B's layout with Qwen2-0.5B's text (the 2B's is Qwen2-1.5B's) and a ViT-B-sized
# vision tower (the 2B's is 32 layers x 1280, 675 M parameters: minutes per batch on 2 CPU cores); the
# released processor (3136..12845056 pixels, patch 14, merge 2), which the job caps (autolabel.sizing).
QWEN2_VL_SMALL = dict(
    text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=32768, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}),  # sums to head_dim / 2
    vision=dict(depth=12, embed_dim=768, hidden_size=896, num_heads=12, patch_size=14, spatial_merge_size=2, mlp_ratio=4),
    pixels=(3136, 12845056), vocab_size=151936,
)  # fmt: skip


def _qwen_family(version: str, out: Path, seed: int, scale: str = "tiny") -> Path:
    return save_vlm(*_qwen_parts(version, scale), out, seed)


def _qwen_parts(version: str, scale: str = "tiny") -> tuple:
    """(model class, config, processor) of Qwen `version` ("2", "2.5", "3"); `scale` "small": Qwen2-VL only."""
    import transformers as T

    small = QWEN2_VL_SMALL if scale == "small" else None
    tok = bpe_tokenizer(QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>", add_bos=False, vocab_size=small and small["vocab_size"],
                     extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                           "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})  # fmt: skip
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))  # fmt: skip
    patch = 16 if version == "3" else 14
    factor = patch * 2
    pixels = small["pixels"] if small else (4 * factor * factor, 16 * factor * factor)
    image_processor = T.Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                              size={"shortest_edge": pixels[0], "longest_edge": pixels[1]})  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}  # sums to head_dim / 2
    text = token_ids(tok, small["text"] if small else dict(TEXT, rope_parameters=rope))
    if version == "2":
        vision = small["vision"] if small else dict(depth=1, embed_dim=32, hidden_size=64, num_heads=1, patch_size=patch, spatial_merge_size=2,
                                                    mlp_ratio=2)  # fmt: skip
        cfg, cls, proc = T.Qwen2VLConfig(text_config=text, vision_config=vision, **ids), T.Qwen2VLForConditionalGeneration, T.Qwen2VLProcessor
        video = T.Qwen2VLVideoProcessor()
    elif version == "2.5":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64, patch_size=patch,
                      spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1])  # fmt: skip
        cfg, cls, proc = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids), T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLProcessor
        video = T.Qwen2VLVideoProcessor()
    else:
        text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64, patch_size=patch,
                      spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])  # fmt: skip
        cfg, cls, proc = T.Qwen3VLConfig(text_config=text, vision_config=vision, **ids), T.Qwen3VLForConditionalGeneration, T.Qwen3VLProcessor
        video = T.Qwen3VLVideoProcessor(patch_size=patch)
    template = QWEN3_TEMPLATE if version == "3" else QWEN_TEMPLATE
    processor = proc(image_processor=image_processor, tokenizer=tok, video_processor=video, chat_template=template)
    return cls, cfg, processor


def build_qwen2_vl(out: Path, seed: int = 0, scale: str = "tiny") -> Path:
    return _qwen_family("2", out, seed, scale)


def build_qwen2_5_vl(out: Path, seed: int = 0) -> Path:
    return _qwen_family("2.5", out, seed)


def build_qwen3_vl(out: Path, seed: int = 0) -> Path:
    return _qwen_family("3", out, seed)


def build_internvl3(out: Path, seed: int = 0) -> Path:
    """InternVL3: InternViT tiles (crop_to_patches) + pixel shuffle + Qwen2.5 text."""
    import transformers as T

    tok = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"], None,
                     "<|im_end|>", "<|endoftext|>", add_bos=False,
                     extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                           "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})  # fmt: skip
    side = 56  # (56 / 14)^2 patches, pixel shuffle 0.5: 4 tokens per tile
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=[side, side],
                  patch_size=[14, 14])  # fmt: skip
    cfg = T.InternVLConfig(vision_config=vision, text_config=dict(token_ids(tok, TEXT), model_type="qwen2"),
                           image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                           tie_word_embeddings=False)  # fmt: skip
    ip = T.GotOcr2ImageProcessor(size={"height": side, "width": side}, crop_to_patches=True, min_patches=1, max_patches=4)
    processor = T.InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=T.InternVLVideoProcessor(),
                                    image_seq_length=4, chat_template=INTERNVL_TEMPLATE)  # fmt: skip
    return save_vlm(T.InternVLForConditionalGeneration, cfg, processor, out, seed)


def build_llava_next(out: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT (1.6): CLIP tiles on an anyres grid of pinpoints + Llama/Mistral text."""
    import transformers as T
    from tiny.llava import fix_vllm_keys

    tok = bpe_tokenizer(["<pad>", "<s>", "</s>", "<image>"], "<s>", "</s>", "<pad>", add_bos=True,
                     extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    side, pinpoints = 28, [[28, 56], [56, 28], [56, 56]]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=side, patch_size=14)
    cfg = T.LlavaNextConfig(vision_config=dict(vision, model_type="clip_vision_model"), text_config=dict(token_ids(tok, TEXT), model_type="llama"),
                            image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                            vision_feature_layer=-1, image_seq_length=4)  # fmt: skip
    ip = T.LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_grid_pinpoints=pinpoints)
    processor = T.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1, chat_template=NEXT_TEMPLATE)  # fmt: skip
    return save_vlm(T.LlavaNextForConditionalGeneration, cfg, processor, out, seed, fix=fix_vllm_keys)


def build_llava_onevision(out: Path, seed: int = 0) -> Path:
    """LLaVA-OneVision: SigLIP tiles on an anyres_max_9 grid + Qwen2 text."""
    import transformers as T
    from tiny.llava import fix_vllm_keys

    tok = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], None, "<|im_end|>", "<|endoftext|>",
                     add_bos=False, extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})  # fmt: skip
    side = 28
    pinpoints = [[side * i, side * j] for i in range(1, 4) for j in range(1, 4)]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=side, patch_size=14)
    cfg = T.LlavaOnevisionConfig(vision_config=dict(vision, model_type="siglip_vision_model"),
                                 text_config=dict(token_ids(tok, TEXT), model_type="qwen2"), image_grid_pinpoints=pinpoints,
                                 image_token_index=tok.convert_tokens_to_ids("<image>"),
                                 video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1)  # fmt: skip
    ip = T.LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_grid_pinpoints=pinpoints)
    processor = T.LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=T.LlavaOnevisionVideoProcessor(),
                                          num_image_tokens=4, vision_feature_select_strategy="full", chat_template=ONEVISION_TEMPLATE)  # fmt: skip
    return save_vlm(T.LlavaOnevisionForConditionalGeneration, cfg, processor, out, seed, fix=fix_vllm_keys)


# Idefics3 / SmolVLM sizes. tiny: 64 px tiles, (64 / 16)^2 patches, pixel shuffle 2: 4 tokens per tile.
# small: SmolVLM-256M as released (HuggingFaceTB/SmolVLM-256M-Instruct config.json, model_type idefics3:
# SmolLM2-135M text, SigLIP-base-patch16-512 vision, pixel shuffle 4: (512 / 16)^2 / 4^2 = 64 tokens per
# 512 px tile, vocabulary 49280, output layer not tied). Its processor's longest_edge is 2048 (a 640x480
# image: 4 x 3 tiles + the whole image, 832 tokens); the preset's 512 (one tile, 64 tokens, the
# documented `size={"longest_edge": 512}`) keeps a run on 2 CPU cores short and the engine's share the
# smallest it is at these dimensions.
IDEFICS_SIZES = {
    "tiny": dict(text=TEXT, vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=64,
                                        patch_size=16), scale_factor=2, longest_edge=128, vocab_size=None),
    "small": dict(text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                            head_dim=64, max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                            tie_word_embeddings=False),
                  vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=512,
                              patch_size=16), scale_factor=4, longest_edge=512, vocab_size=49280),
}  # fmt: skip


def _idefics_parts(smol: bool, scale: str) -> tuple:
    """(model class, config, processor) of Idefics3 (`smol`: SmolVLM) at size `scale`."""
    import transformers as T

    size = IDEFICS_SIZES[scale]
    tiles = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    bos = "<|im_start|>" if smol else "<|begin_of_text|>"
    tok = bpe_tokenizer(["<|endoftext|>", bos, "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>", *tiles],
                     bos, "<end_of_utterance>", "<|endoftext|>", add_bos=not smol, vocab_size=size["vocab_size"])  # fmt: skip
    vision, text = size["vision"], dict(token_ids(tok, size["text"]), model_type="llama")
    tile, scale_factor = vision["image_size"], size["scale_factor"]
    seq_len = (tile // vision["patch_size"]) ** 2 // scale_factor**2
    ip_kwargs = dict(size={"longest_edge": size["longest_edge"]}, max_image_size={"longest_edge": tile})
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale_factor, pad_token_id=tok.pad_token_id)
    if smol:
        processor = T.SmolVLMProcessor(image_processor=T.SmolVLMImageProcessor(**ip_kwargs), tokenizer=tok,
                                       video_processor=T.SmolVLMVideoProcessor(), image_seq_len=seq_len, chat_template=IDEFICS3_TEMPLATE)  # fmt: skip
        return T.SmolVLMForConditionalGeneration, T.SmolVLMConfig(vision_config=vision, text_config=text, **ids), processor
    processor = T.Idefics3Processor(image_processor=T.Idefics3ImageProcessor(**ip_kwargs), tokenizer=tok, image_seq_len=seq_len,
                                    chat_template=IDEFICS3_TEMPLATE)  # fmt: skip
    return T.Idefics3ForConditionalGeneration, T.Idefics3Config(vision_config=vision, text_config=text, **ids), processor


def build_idefics3(out: Path, seed: int = 0, scale: str = "tiny") -> Path:
    return save_vlm(*_idefics_parts(False, scale), out, seed)


def build_smolvlm(out: Path, seed: int = 0, scale: str = "tiny") -> Path:
    return save_vlm(*_idefics_parts(True, scale), out, seed)


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def build_gemma3(out: Path, seed: int = 0) -> Path:
    """Gemma 3: SigLIP at a fixed square, pooled to mm_tokens_per_image, + Gemma 3 text (sliding + full)."""
    import transformers as T

    tok = bpe_tokenizer(GEMMA_SPECIALS, "<bos>", "<end_of_turn>", "<pad>", add_bos=True, gemma=True,
                     extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                           "image_token": "<image_soft_token>"})  # fmt: skip
    side = 28  # 2x2 patches of 14: 4 image tokens
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=side, patch_size=14)
    text = dict(token_ids(tok, TEXT), query_pre_attn_scalar=HEAD_DIM, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    cfg = T.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4,
                         boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                         eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                         image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))  # fmt: skip
    ip = T.Gemma3ImageProcessor(size={"height": side, "width": side})
    processor = T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=GEMMA3_TEMPLATE)
    from tiny.llava import fix_vllm_keys

    return save_vlm(T.Gemma3ForConditionalGeneration, cfg, processor, out, seed, fix=fix_vllm_keys)


def build_paligemma2(out: Path, seed: int = 0) -> Path:
    """PaliGemma 2: SigLIP at a fixed square + Gemma 2 text (soft-capped logits); no chat template:
    the processor puts the image tokens and <bos> before the prompt and a newline after it."""
    import transformers as T
    from tiny.llava import fix_vllm_keys

    tok = bpe_tokenizer(["<pad>", "<eos>", "<bos>", "<image>"], "<bos>", "<eos>", "<pad>", add_bos=True, gemma=True,
                     extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    side = 28
    ip = T.SiglipImageProcessor(size={"height": side, "width": side})
    ip.image_seq_length = 4
    processor = T.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds its <loc>/<seg> tokens

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=side,
                  patch_size=14, projection_dim=64)  # fmt: skip
    text = dict(token_ids(tok, TEXT), model_type="gemma2", query_pre_attn_scalar=HEAD_DIM, sliding_window=64,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0)  # fmt: skip
    cfg = T.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                            projection_dim=64, hidden_size=64)  # fmt: skip
    return save_vlm(T.PaliGemmaForConditionalGeneration, cfg, processor, out, seed, fix=fix_vllm_keys)


FAMILIES: dict[str, Callable[..., Path]] = {
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "internvl3": build_internvl3,
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "gemma3": build_gemma3,
    "paligemma2": build_paligemma2,
}


# families with a "small" size (random weights at a small released captioner's dimensions): what each mirrors
SMALL = {
    "idefics3": "SmolVLM-256M-Instruct as released (its model_type is idefics3), processor at one 512 px tile",
    "smolvlm": "SmolVLM-256M's dimensions in SmolVLM(2)'s classes, processor at one 512 px tile",
    "qwen2_vl": "Qwen2-VL-2B's layout and processor, Qwen2-0.5B's text, a ViT-B-sized vision tower (the 2B's: 32 x 1280)",
}


def build_tiny_vlm(family: str, out_dir: str | Path, seed: int = 0, scale: str = "tiny") -> Path:
    """Build and save family `family`'s random model + processor at `out_dir`: tiny, or at
    `scale="small"` (families in SMALL) a small released captioner's dimensions."""
    if scale == "tiny":
        return FAMILIES[family](Path(out_dir), seed)
    _check_size(family, scale)
    return FAMILIES[family](Path(out_dir), seed, scale=scale)


def _check_size(family: str, scale: str) -> None:
    if family not in SMALL or scale not in ("tiny", "small"):
        raise ValueError(f"no {scale!r} size for {family!r}: sizes are tiny (every family) and small ({', '.join(SMALL)})")


def model_parts(family: str, scale: str = "small") -> tuple:
    """(model class, config, processor) of `family` at `scale`, without building weights."""
    _check_size(family, scale)
    return _qwen_parts("2", scale) if family == "qwen2_vl" else _idefics_parts(family == "smolvlm", scale)


def released_processors() -> dict:
    """Image processors with the settings of each family's released checkpoints (for the size
    policy's tests and benchmarks: no weights needed)."""
    import transformers as T

    return {
        "llava-1.5": T.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        "qwen2-vl": T.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056),
        "qwen3-vl": T.Qwen2VLImageProcessor(patch_size=16, min_pixels=65536, max_pixels=16777216),
        "internvl3": T.GotOcr2ImageProcessor(size={"height": 448, "width": 448}, crop_to_patches=True, max_patches=12),
        "llava-next": T.LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
        "llava-onevision": T.LlavaOnevisionImageProcessor(),
        "idefics3": T.Idefics3ImageProcessor(size={"longest_edge": 4 * 364}),
        "gemma3": T.Gemma3ImageProcessor(size={"height": 896, "width": 896}),
        "paligemma2": T.SiglipImageProcessor(size={"height": 448, "width": 448}),
    }  # fmt: skip
