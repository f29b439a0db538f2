"""`--prompts dense,short`: several named prompts per image in one pass, each caption in its own
field; and caption shards written before those fields existed still read (issue 15)."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from autolabel.api import run_caption
from autolabel.backends import TransformersCaptioner
from autolabel.prompts import PAPER_PROMPT, PROMPTS, SHORT_PROMPT
from shards.errors import UserError
from shards.reader import complete_shards
from shards.schema import CAPTION_SCHEMA


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llava):
    root = tmp_path_factory.mktemp("prompts")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8)).save(buf, "JPEG")
        (src / f"{i}.jpg").write_bytes(buf.getvalue())
    captioner = TransformersCaptioner(str(tiny_llava))
    return root, src, captioner


def _rows(out) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(s) for s in complete_shards(out)]).sort("key")


def _run(src, out, captioner, **kw) -> pl.DataFrame:
    run_caption([src], out, captioner=captioner, temperature=0.0, max_new_tokens=5, batch_size=2, progress=False, **kw)
    return _rows(out)


def test_several_prompts_in_one_pass_fill_their_own_fields(setup):
    root, src, captioner = setup
    both = _run(src, root / "both", captioner, prompts=["dense", "short"])
    dense = _run(src, root / "dense", captioner, prompt=PAPER_PROMPT)
    short = _run(src, root / "short", captioner, prompt=SHORT_PROMPT)
    assert PROMPTS["dense"] == PAPER_PROMPT and PROMPTS["short"] == SHORT_PROMPT
    assert both["caption"].to_list() == dense["caption"].to_list()  # `caption` = the first prompt's
    assert both["caption_short"].to_list() == short["caption"].to_list()
    assert both["caption_dense"].null_count() == len(both) and both["prompt"].to_list() == [PAPER_PROMPT] * len(both)
    reversed_ = _run(src, root / "reversed", captioner, prompts=["short", "dense"])
    assert reversed_["caption"].to_list() == short["caption"].to_list()
    assert reversed_["caption_dense"].to_list() == dense["caption"].to_list()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts": ["dense", "tags"]}, "use distinct names from dense, short"),
        ({"prompts": ["short", "short"]}, "use distinct names"),
        ({"prompts": ["dense", "short"], "prompt": "hi"}, "--prompt and --prompts both given"),
    ],
)
def test_bad_prompts_are_one_line_errors(setup, kwargs, message):
    root, src, captioner = setup
    with pytest.raises(UserError, match=message) as e:
        run_caption([src], root / "bad", captioner=captioner, progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_schema_2_shards_still_read(tmp_path):
    """A shard without image_tokens / caption_dense / caption_short reads with them null."""
    old_fields = [f for f in CAPTION_SCHEMA if f.name not in ("image_tokens", "caption_dense", "caption_short")]
    old = pa.table({f.name: pa.array([None], f.type) if f.name != "key" else ["a"] for f in old_fields}, pa.schema(old_fields))
    pq.write_table(old, tmp_path / "old.parquet")
    table = pq.read_table(tmp_path / "old.parquet", schema=CAPTION_SCHEMA)
    assert table.schema.names == CAPTION_SCHEMA.names
    assert table.column("image_tokens").to_pylist() == [None] and table.column("caption_short").to_pylist() == [None]
