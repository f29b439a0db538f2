"""Caption prompts: the paper's, the caption-conditioned one, and how to wrap them for a model."""

from __future__ import annotations

PAPER_PROMPT = "Describe this image and its style in a very detailed manner"
SHORT_PROMPT = "Describe this image in one short sentence"
# `--prompts dense,short`: named prompts, each caption stored in its own field (the first in
# `caption`, every other in `caption_<name>`, a column of shards.schema)
PROMPTS = {"dense": PAPER_PROMPT, "short": SHORT_PROMPT}
ALT_PROMPT = 'Given the caption of this image "{alt}", describe this image in a very detailed manner'

# Known per-family templates, used only when the model ships no chat template.
LLAVA_15_TEMPLATE = "USER: <image>\n{q}\nASSISTANT:"
LLAVA_NEXT_TEMPLATE = "[INST] <image>\n{q} [/INST]"


def question_for(prompt: str | None, alt: str | None, use_alt: bool) -> str:
    """The instruction for one image: the alt-text prompt when asked for and an alt-text exists."""
    if use_alt and alt and alt.strip():
        return ALT_PROMPT.format(alt=" ".join(alt.split()).replace('"', "'"))
    return prompt or PAPER_PROMPT


def family_template(model_name: str) -> str:
    """LLaVA-NeXT's [INST] format for NeXT/1.6 models, LLaVA-1.5's otherwise."""
    name = model_name.lower()
    return LLAVA_NEXT_TEMPLATE if ("next" in name or "v1.6" in name or "1.6" in name) else LLAVA_15_TEMPLATE


def render_prompt(processor, model_name: str, question: str) -> str:
    """The full text prompt with one `<image>` placeholder: the processor's chat template where
    it has one, else the family template. PaliGemma has neither: its prompt is the bare question
    (the processor, and vLLM, put the image tokens and <bos> before it and a newline after)."""
    if type(processor).__name__ == "PaliGemmaProcessor":
        return question
    template = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if template:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return family_template(model_name).format(q=question)
