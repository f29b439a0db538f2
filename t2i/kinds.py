"""The kinds of stage, each a Conditioning (t2i.conditioning): which one a stage's `kind` names,
and which one a checkpoint was trained with (the kind its trainer state records)."""

from __future__ import annotations

import json
from pathlib import Path

from shards.errors import UserError
from t2i.checkpoint import require_checkpoint
from t2i.class_cond import ClassConditioning
from t2i.conditioning import Conditioning
from t2i.text_cond import TextConditioning

KINDS: dict[str, type[Conditioning]] = {TextConditioning.kind: TextConditioning, ClassConditioning.kind: ClassConditioning}
DEFAULT_KIND = TextConditioning.kind  # what checkpoints from before `kind` existed were trained with


def conditioning_class(kind: str | None) -> type[Conditioning]:
    """The Conditioning of a stage's `kind` (None: the default)."""
    kind = DEFAULT_KIND if kind is None else kind
    if kind not in KINDS:
        raise UserError(f"kind {kind!r} is not one of {', '.join(KINDS)}: fix the stage's kind")
    return KINDS[kind]


def checkpoint_conditioning(checkpoint: str | Path) -> type[Conditioning]:
    """The Conditioning a checkpoint (or a run directory: its newest) was trained with."""
    ck = require_checkpoint(checkpoint)
    state = json.loads((ck / "trainer_state.json").read_text())
    return conditioning_class(state.get("config", {}).get("kind"))
