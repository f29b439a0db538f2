"""A tiny OWLv2 open-vocabulary detector (random weights) saved as an ordinary HF directory, for the
tests of evals.detect (`--detector DIR`): the architecture, processor and post-processing of
google/owlv2-base-patch16-ensemble at a few thousand parameters, with tiny.clip's word-level tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def build_tiny_owlv2(out_dir: str | Path, corpus: Sequence[str], image_size: int = 32, hidden: int = 32, seed: int = 0) -> Path:
    """Build and save the detector with its processor at `out_dir`; returns the directory."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from tiny.clip import build_tiny_clip

    _, tokenizer, _ = build_tiny_clip(corpus)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=hidden,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer)  # fmt: skip
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
