"""Caption hygiene: strip prompt echo and whitespace, flag truncation and repetition loops."""

from __future__ import annotations

import re

_ROLE_PREFIX = re.compile(r"^\s*(?:ASSISTANT:|\[/INST\]|assistant\n)\s*", re.I)
_CHAT_ECHO = re.compile(r"^\s*(?:USER:|\[INST\]).*?(?:ASSISTANT:|\[/INST\])\s*", re.S)  # the whole prompt echoed


def clean_caption(text: str, question: str | None = None) -> str:
    """The caption without a leading echo of the prompt or role tag, whitespace normalised."""
    text = _CHAT_ECHO.sub("", text.strip())
    if question and text.startswith(question.strip()):
        text = text[len(question.strip()) :]
    text = _ROLE_PREFIX.sub("", text)
    return " ".join(text.split())


def is_degenerate(text: str, min_repeats: int = 4, min_share: float = 0.3) -> bool:
    """True when the caption ends in a loop: one n-gram (n <= 12 words) repeated back to back at
    least `min_repeats` times, covering at least `min_share` of the words."""
    words = text.split()
    n_words = len(words)
    for n in range(1, min(12, n_words // min_repeats) + 1):
        gram = words[-n:]
        reps, end = 1, n_words - n
        while end - n >= 0 and words[end - n : end] == gram:
            reps += 1
            end -= n
        if reps >= min_repeats and reps * n >= min_share * n_words:
            return True
    return False
