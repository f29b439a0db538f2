"""The transformers captioner's static KV cache (issue 17: 1.5x on an H100): same greedy tokens
as the default cache, and a one-line error when asked of the wrong backend."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from autolabel.backends import GenParams, TransformersCaptioner
from autolabel.prompts import PAPER_PROMPT

ROOT = Path(__file__).resolve().parent.parent


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))


def test_static_cache_gives_the_same_greedy_tokens(tiny_llava):
    dynamic = TransformersCaptioner(str(tiny_llava))  # its own: the test patches the model
    static = TransformersCaptioner.from_loaded(dynamic.model, dynamic.processor, "tiny", static_cache=True)
    images = [_image(s) for s in range(3)]
    prompts = [dynamic.format_prompt(PAPER_PROMPT)] * 3
    params = GenParams(temperature=0.0, max_new_tokens=6)
    a = [g.token_ids for g in dynamic.generate(images, prompts, params)]
    seen, generate = {}, static.model.generate
    static.model.generate = lambda *args, **kw: (seen.update(kw), generate(*args, **kw))[1]
    try:
        b = [g.token_ids for g in static.generate(images, prompts, params)]
    finally:
        static.model.generate = generate
    assert seen.get("cache_implementation") == "static"
    assert a == b and all(len(t) >= 1 for t in a)


def test_static_cache_on_vllm_is_a_one_line_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    buf = io.BytesIO()
    _image(0).save(buf, "JPEG")
    (src / "a.jpg").write_bytes(buf.getvalue())
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "caption", "--src", str(src), "--out", str(tmp_path / "o"),
                        "--static-cache"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith("error: --static-cache is a transformers-backend setting") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.parquet"))
