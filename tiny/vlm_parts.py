"""The pieces every tiny VLM of tiny.vlms is made of: a byte-level BPE tokenizer trained on a few
sentences with a family's special tokens, the shrunk text config, chat templates, and saving a
model with its processor so both transformers and vLLM load it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

CORPUS = [
    "Describe this image and its style in a very detailed manner",
    "Describe this image in one short sentence",
    "The image shows a red circle, a blue square and a green triangle on a white background.",
    "A photograph of a city street with cars, people, trees, buildings and a cloudy sky.",
    "The style is realistic with soft lighting, warm colours and a shallow depth of field.",
    "user assistant system model User: Assistant: You are a helpful assistant.",
]  # fmt: skip

HEAD_DIM = 32  # vLLM's CPU attention needs 32/64/80/...; 16 fails
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=HEAD_DIM, max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip


def bpe_tokenizer(specials: list[str], bos: str | None, eos: str, pad: str, add_bos: bool, gemma: bool = False,
               vocab_size: int | None = None, **extra):  # fmt: skip
    """A BPE tokenizer trained on CORPUS with the family's special tokens: byte-level (GPT-2 /
    Llama 3 / Qwen style), or with `gemma` Gemma's style (spaces as "▁", byte fallback, so "\n"
    is a token of its own, which vLLM's PaliGemma looks up). `vocab_size`: padded to that many
    tokens (a released model's vocabulary size, so its embedding and output layer cost as much)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if gemma:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        specials = ["<unk>", *specials, *(f"<0x{b:02X}>" for b in range(256))]
        alphabet = sorted(set("".join(CORPUS).replace(" ", "▁")) | {"\n"})
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=500 + 260 * gemma, special_tokens=specials, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    if gemma:
        tok.add_tokens(["\n" * n for n in (2, 3, 4)])  # tokens of Gemma's vocabulary that vLLM's Gemma 3 looks up
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    if vocab_size:
        tok = pad_vocab(tok, vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, padding_side="left", **extra)


def pad_vocab(tok, vocab_size: int):
    """`tok` with filler entries appended to its BPE vocabulary up to `vocab_size` ids: no merge
    produces them, so text tokenizes as before, and every id the model can emit decodes."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    first = tok.get_vocab_size()  # with the added tokens: the fillers come after every id in use
    spec["model"]["vocab"].update({f"<fill{i}>": first + i for i in range(vocab_size - first)})
    return Tokenizer.from_str(json.dumps(spec))


def token_ids(tok, model_cfg_text: dict) -> dict:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                **model_cfg_text)  # fmt: skip


def save_vlm(model_cls, cfg, processor, out: Path, seed: int, fix: Callable[[Path], None] | None = None) -> Path:
    import torch

    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if fix:
        fix(out)
    return out


# --- chat templates: one user turn (image + text) in each family's real format ------------------

def chat_template(user_open: str, image: str, user_close: str, assistant: str, image_after: bool = False) -> str:
    text = "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    img = "{% for c in message['content'] %}{% if c['type'] == 'image' %}" + image + "{% endif %}{% endfor %}"
    body = text + img if image_after else img + text
    return ("{% for message in messages %}" + user_open + body + user_close + "{% endfor %}"
            "{% if add_generation_prompt %}" + assistant + "{% endif %}")  # fmt: skip
