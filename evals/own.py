"""`eval --suite own --shards CAPTIONS`: a benchmark built from the lab's own caption shards.

1. **Combinations** (spaCy's English pipeline, as `stats` loads it: dataset_stats.nouns): for
   every noun of every caption, each attribute (an `amod` or `compound` child) with each spatial
   relation (a `prep` child whose phrase names a place: `SPATIAL`) is one (attribute, object,
   relation) combination. Combinations seen fewer than `min_count` times are noise and dropped;
   so are parts seen fewer than `min_count` times.
2. **Held-out split**: the combinations the captions never hold whose pairs they all do hold
   (the attribute with the object, the object with the relation): a model that composes draws
   them, one that memorised its captions does not. A `seen` split of the same size is drawn
   from the combinations the captions hold, for comparison.
3. **Paraphrases**: each prompt as the captions say it (`caption`), in another word order
   (`order`), with synonyms (`synonym`, from `SYNONYMS`; a word without one stays), and as a
   keyword list (`keywords`).
4. **Questions** per prompt (evals.questions): the object, the attribute, the relation and the
   whole combination, each a yes/no question for the VLM judge.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from evals.questions import Combo, questions
from shards.errors import UserError

SPATIAL = frozenset("left right top bottom center centre middle front behind above below under over beneath near next "
                    "beside side corner upper lower".split())  # "background": too often the backdrop, not a place  # fmt: skip
SYNONYMS = {
    "circle": "disc", "square": "box", "triangle": "triangular shape", "cross": "plus sign", "large": "big", "small": "little",
    "image": "picture", "left": "left side", "right": "right side", "center": "middle", "top": "upper part",
    "bottom": "lower part", "red": "scarlet", "blue": "navy", "green": "emerald", "yellow": "golden", "purple": "violet",
    "cyan": "turquoise", "cat": "kitten", "dog": "puppy", "car": "automobile", "table": "desk", "photo": "photograph",
}  # fmt: skip
VARIANTS = ("caption", "order", "synonym", "keywords")
STOP = frozenset("a an the of in on at to is are this that with and".split())


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt of the suite: a combination in one wording, with its questions."""

    id: str
    split: str  # heldout | seen
    variant: str  # caption | order | synonym | keywords
    prompt: str
    object: str
    attribute: str
    relation: str
    questions: tuple[tuple[str, str], ...]  # (category, question)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["questions"] = [list(q) for q in self.questions]
        return d


def _relation(prep) -> str | None:
    """A prep child's phrase when it names a place ('on the left of the image'), else None."""
    words = [t.text for t in prep.subtree]
    return " ".join(words).lower() if SPATIAL & {w.lower() for w in words} else None


def combos_of(doc) -> set[Combo]:
    """The (attribute, object, relation) combinations one parsed caption holds."""
    found = set()
    for noun in doc:
        if noun.tag_ not in ("NN", "NNS") or noun.dep_ in ("pobj", "compound"):
            continue  # the things drawn: not the places they are at
        attrs = [c.text.lower() for c in noun.children if c.dep_ in ("amod", "compound") and c.is_alpha]
        rels = [r for c in noun.children if c.dep_ == "prep" and (r := _relation(c))]
        found.update(Combo(noun.lemma_.lower() or noun.text.lower(), a, r) for a in attrs for r in rels)
    return found


def count_combos(captions: Iterable[str], batch_size: int = 256) -> Counter:
    """Captions that hold each combination (each counted once per caption)."""
    import spacy

    from dataset_stats.nouns import model_name

    nlp = spacy.load(model_name(), exclude=["ner"])  # the parser (prep, amod) and lemmas; not entities
    counts: Counter = Counter()
    for doc in nlp.pipe(captions, batch_size=batch_size):
        counts.update(combos_of(doc))
    return counts


def split_combos(counts: Counter, min_count: int = 3) -> tuple[list[Combo], list[Combo]]:
    """(held-out, seen): combinations never held whose attribute-object and object-relation pairs
    are each held at least `min_count` times; and those held at least `min_count` times."""
    seen = sorted(c for c, n in counts.items() if n >= min_count)
    pairs_ao, pairs_or = Counter(), Counter()
    for c, n in counts.items():
        pairs_ao[(c.attribute, c.object)] += n
        pairs_or[(c.object, c.relation)] += n
    objects = sorted({c.object for c in seen})
    heldout = [Combo(o, a, r) for o in objects for (a, o2) in sorted(pairs_ao) if o2 == o and pairs_ao[(a, o)] >= min_count
               for (o3, r) in sorted(pairs_or) if o3 == o and pairs_or[(o, r)] >= min_count and Combo(o, a, r) not in counts]  # fmt: skip
    return heldout, seen


def paraphrases(combo: Combo) -> dict[str, str]:
    """The combination's prompt in each wording of VARIANTS."""
    article = "An" if combo.attribute[:1] in "aeiou" else "A"
    caption = f"{article} {combo.phrase()}."
    order = f"{combo.relation[:1].upper()}{combo.relation[1:]}, there is a {combo.attribute} {combo.object}." if combo.relation else caption
    synonym = " ".join(SYNONYMS.get(w, w) for w in caption.rstrip(".").split()) + "."
    keywords = ", ".join(w for w in combo.phrase().split() if w not in STOP)
    return {"caption": caption, "order": order, "synonym": synonym, "keywords": keywords}


def build_suite(captions: Iterable[str], n_prompts: int = 40, seed: int = 0, min_count: int = 3) -> list[SuitePrompt]:
    """Up to `n_prompts` held-out and as many seen combinations (drawn by `seed`), each in every
    wording of VARIANTS with its questions."""
    heldout, seen = split_combos(count_combos(captions), min_count)
    if not heldout:
        raise UserError(f"the captions hold every combination of their parts ({len(seen)} seen at least {min_count} times): "
                        "pass the training images' caption shards only (held-out images' captions fill the gaps)")  # fmt: skip
    rng = np.random.default_rng(seed)
    pick = lambda xs: [xs[i] for i in sorted(rng.choice(len(xs), size=min(n_prompts, len(xs)), replace=False))]  # noqa: E731
    out = []
    for split, combos in (("heldout", pick(heldout)), ("seen", pick(seen))):
        for combo in combos:
            qs = tuple(questions(combo))
            for variant, text in paraphrases(combo).items():
                pid = hashlib.sha256(f"{split}|{combo}|{variant}".encode()).hexdigest()[:12]
                out.append(SuitePrompt(pid, split, variant, text, combo.object, combo.attribute, combo.relation, qs))
    return out
