"""Which captions are not English: py3langid (langid.py's model, shipped inside its PyPI wheel).

A caption counts as non-English when the identifier is confident (normalised probability at
least `MIN_CONFIDENCE`) that it is in a language other than English. Candidates are the
`CANDIDATES` below, the languages most used on the web: with all 140 of the model's languages,
short English alt-text ("Oktoberfest Decorating Kit", "HBO Girls Paper Dolls") is often taken for
Nigerian Pidgin, Luxembourgish or Latin (30% of the LAION sample, nearly all wrong), and a
low-confidence guess on a few words is no evidence either. Uncertain captions count as English,
so `--lang en` drops only captions that are clearly in another language.
"""

from __future__ import annotations

from typing import Optional, Sequence

from shards.errors import UserError

ENGLISH = "en"
MIN_CONFIDENCE = 0.9
CANDIDATES = (
    "en", "de", "fr", "es", "it", "pt", "nl", "ru", "ja", "zh", "ko", "ar", "pl", "tr", "sv", "cs",
    "el", "th", "vi", "id", "hi", "uk", "da", "fi", "no", "hu", "ro", "he", "fa",
)  # fmt: skip
LANG_FILTERS = (ENGLISH,)  # the noun tagger is English: only English captions can be kept


class LanguageId:
    """One identifier per process (the model loads in ~0.3 s; ~70 us per short caption), shared by
    `stats --lang` and the `lang` scorer of `score`, so both judge a caption's language alike."""

    def __init__(self) -> None:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise UserError("py3langid is not installed (language ID): pip install py3langid") from None
        self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self._identifier.set_languages(list(CANDIDATES))

    def classify(self, texts: Sequence[Optional[str]]) -> list[tuple[Optional[str], Optional[float]]]:
        """(language code, probability normalised over CANDIDATES) per text; (None, None) when empty."""
        out: list[tuple[Optional[str], Optional[float]]] = []
        for text in texts:
            if not text or not text.strip():
                out.append((None, None))
                continue
            lang, prob = self._identifier.classify(text)
            out.append((lang, float(prob)))
        return out

    def language(self, text: str) -> Optional[str]:
        """The caption's language code when identified with confidence, else None (unsure)."""
        lang, prob = self._identifier.classify(text)
        return lang if prob >= MIN_CONFIDENCE else None

    def is_foreign(self, text: str) -> bool:
        """True when the caption is confidently in a language other than English."""
        lang = self.language(text)
        return lang is not None and lang != ENGLISH


def check_lang_filter(lang: Optional[str]) -> None:
    if lang is not None and lang not in LANG_FILTERS:
        raise UserError(f"unsupported --lang {lang!r}: only `--lang en` (the noun tagger is English)")


DESCRIPTION = (
    f"py3langid over {len(CANDIDATES)} common languages; non-English: another language with "
    f"probability >= {MIN_CONFIDENCE} (uncertain captions count as English)"
)
