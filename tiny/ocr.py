"""Tiny transformers OCR models with random weights, saved as ordinary HF folders, for the
mechanics of the `text` scorer's transformers paths (they read nothing meaningful):

- `build_tiny_trocr`: a TrOCR-layout recogniser (`VisionEncoderDecoderModel`: a ViT encoder and
  a TrOCR decoder, with a `TrOCRProcessor`), loaded by curate.text.Recognizer as it loads
  `microsoft/trocr-small-printed`;
- `build_tiny_ppocr_detector`: a ~30k-parameter PP-OCRv5 mobile detector (a DBNet-style
  probability map) with its image processor, loaded by curate.text.HFTextMap as it loads
  `PaddlePaddle/PP-OCRv5_mobile_det_safetensors`.
"""

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


def build_tiny_ppocr_detector(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny PP-OCRv5 mobile detector (PP-LCNetV3 backbone at scale 0.25) with its processor to `out`."""
    import torch
    from transformers import PPLCNetV3Config, PPOCRV5MobileDetConfig, PPOCRV5MobileDetForObjectDetection, PPOCRV5ServerDetImageProcessor

    torch.manual_seed(seed)
    channels = [(16, 32), (32, 64), (64, 128), (128, 256), (256, 256)]
    blocks = [[[3, cin, cout, stride, False]] for (cin, cout), stride in zip(channels, [1, 2, 2, 2, 2])]
    stages = ["stage2", "stage3", "stage4", "stage5"]
    backbone = PPLCNetV3Config(scale=0.25, block_configs=blocks, out_features=stages, out_indices=[2, 3, 4, 5], divisor=8,
                               conv_symmetric_num=1)  # fmt: skip
    config = PPOCRV5MobileDetConfig(backbone_config=backbone, neck_out_channels=32, layer_list_out_channels=[8, 12, 16, 32])
    out = Path(out)
    model = PPOCRV5MobileDetForObjectDetection(config)
    with torch.no_grad():  # its head starts at a constant map: noise, so maps differ by image
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    PPOCRV5ServerDetImageProcessor().save_pretrained(out)
    return out
