"""tiny/vlms.py's "small" size: the real dimensions of small released captioners (random
weights, for benchmarks/vlm_throughput_bench.py --scale small). Config and processor only; the
parameter counts come from a model built on the meta device (no memory, no weights)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from autolabel.sizing import DEFAULT_MAX_PIXELS
from tiny.vlms import SMALL, build_tiny_vlm, model_parts

PROMPT = "Describe this image in one short sentence"


def image_tokens(processor, config, size: tuple[int, int]) -> int:
    """Image placeholder tokens the processor puts in the prompt for one image of `size`."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    ids = processor(text=text, images=[Image.new("RGB", size)], return_tensors="pt")["input_ids"][0].tolist()
    return ids.count(config.image_token_id)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.slow
def test_small_idefics_is_smolvlm_256m(family):
    cls, cfg, processor = model_parts(family, "small")
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == (576, 30, 9, 3, 1536)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size) == (768, 12, 12, 512, 16)
    assert cfg.scale_factor == 4 and t.vocab_size == len(processor.tokenizer) == 49280
    with torch.device("meta"):
        model = cls(cfg)
    assert 256.0e6 < parameters(model) < 257.0e6  # the released SmolVLM-256M: 513 MB of bfloat16
    # one 512 px tile (longest_edge 512): (512 / 16)^2 patches / 4^2 = 64 tokens, whatever the aspect
    assert image_tokens(processor, cfg, (640, 480)) == image_tokens(processor, cfg, (300, 500)) == 64


def test_small_qwen2_vl_has_qwen2_05b_text():
    cls, cfg, processor = model_parts("qwen2_vl", "small")
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == (896, 24, 14, 2, 4864)
    assert (v.embed_dim, v.depth, v.num_heads, v.hidden_size) == (768, 12, 12, 896)
    assert t.vocab_size == len(processor.tokenizer) == 151936
    with torch.device("meta"):
        model = cls(cfg)
    assert parameters(model.model.language_model) == 494_032_768  # Qwen2-0.5B's count (embeddings tied)
    # the released processor's pixel range (3136..12845056), far above 640x480: 476x644 px, 17 x 23 tokens,
    # also under the job's cap (autolabel.sizing: 576 tokens' worth)
    assert processor.image_processor.size["longest_edge"] == 12845056 and 17 * 23 * 28 * 28 < DEFAULT_MAX_PIXELS
    assert image_tokens(processor, cfg, (640, 480)) == 17 * 23


def test_padded_vocabulary_tokenizes_as_the_tiny_one():
    """The small tokenizer is the tiny one plus fillers no merge reaches: the same ids for text,
    and every id the model can emit decodes."""
    small, tiny = (model_parts("qwen2_vl", scale)[2].tokenizer for scale in ("small", "tiny"))
    assert len(tiny) < 1000 < len(small)
    assert small(PROMPT)["input_ids"] == tiny(PROMPT)["input_ids"]
    assert small.decode([len(small) - 1]) == f"<fill{len(small) - len(tiny) - 1}>"


def test_sizes_without_a_preset_fail():
    assert set(SMALL) == {"idefics3", "smolvlm", "qwen2_vl"}
    with pytest.raises(ValueError, match="small"):
        build_tiny_vlm("gemma3", "/nonexistent", scale="small")
    with pytest.raises(ValueError, match="huge"):
        model_parts("idefics3", "huge")
