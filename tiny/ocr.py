"""A tiny TrOCR-layout OCR model (transformers `VisionEncoderDecoderModel`: a ViT encoder and a
TrOCR decoder, with a `TrOCRProcessor`), random weights, saved as an ordinary HF folder: the
`text` scorer's recogniser path (curate.text.Recognizer) loads it as it loads
`microsoft/trocr-small-printed`. It reads nothing meaningful: tests use it for the mechanics."""

from __future__ import annotations

from pathlib import Path


def build_tiny_trocr(out: str | Path, seed: int = 0) -> Path:
    """Write a ~100k-parameter TrOCR-layout model with its processor to `out`."""
    import torch
    from transformers import (TrOCRConfig, TrOCRForCausalLM, TrOCRProcessor, VisionEncoderDecoderModel, ViTConfig,
                              ViTImageProcessor, ViTModel)  # fmt: skip

    from tiny.vlm_parts import bpe_tokenizer

    torch.manual_seed(seed)
    tok = bpe_tokenizer(["<s>", "</s>", "<pad>"], bos="<s>", eos="</s>", pad="<pad>", add_bos=False)
    encoder = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64))  # fmt: skip
    decoder = TrOCRForCausalLM(TrOCRConfig(vocab_size=len(tok), d_model=32, decoder_layers=1, decoder_attention_heads=2,
                                           decoder_ffn_dim=64, max_position_embeddings=64, cross_attention_hidden_size=32,
                                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                           eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.bos_token_id))  # fmt: skip
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = tok.bos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.decoder_start_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out = Path(out)
    model.save_pretrained(out)
    TrOCRProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(out)
    return out
