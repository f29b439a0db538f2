"""`t2i-data caption`: tiny random LLaVA, both backends, bad inputs, exactly-once resume.
(The image layer's own tests, sources and decoding, are in test_images.py.)"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from autolabel.api import CaptionConfig, run_caption
from autolabel.backends import GenParams, TransformersCaptioner, VllmCaptioner
from autolabel.hygiene import clean_caption, is_degenerate
from shards.images.fit import prepare_image
from autolabel.prompts import ALT_PROMPT, PAPER_PROMPT, family_template, question_for, render_prompt
from shards.reader import complete_shards
from shards.schema import CAPTION_SCHEMA
from tiny.images import bad_and_odd_inputs, jpeg_bytes, make_parquet, make_tar
from tiny.llava import build_tiny_llava

ROOT = Path(__file__).resolve().parent.parent


def read_rows(out: Path) -> pl.DataFrame:
    shards = complete_shards(out)
    return pl.concat([pl.read_parquet(s) for s in shards]) if shards else pl.DataFrame()


@pytest.fixture(scope="session")
def vllm_captioner(tiny_llava, tmp_path_factory):
    pytest.importorskip("vllm")
    return VllmCaptioner(str(tiny_llava), run_dir=tmp_path_factory.mktemp("vllm-run"))


def test_tiny_llava_loads_and_corpus_sets_vocabulary(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    d = build_tiny_llava(tmp_path / "m", corpus=["zebracorn stripes"] * 50 + ["USER: <image>\nASSISTANT:"], seed=1)
    model = LlavaForConditionalGeneration.from_pretrained(d)
    processor = AutoProcessor.from_pretrained(d)
    tok = processor.tokenizer
    assert len(tok.tokenize("zebracorn")) == 1  # the corpus word became one token
    assert len(tok.tokenize("xylophone")) > 1  # words outside it still encode, byte by byte
    assert {"<image>", "<pad>", "<s>", "</s>"} <= set(tok.get_vocab())
    keys = load_file(d / "model.safetensors").keys()
    vision = [k for k in keys if "vision_tower" in k]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)  # vLLM's layout
    assert model.config.text_config.head_dim == 32
    assert render_prompt(processor, str(d), "q") == "USER: <image>\nq\nASSISTANT:"


def test_prompts():
    assert question_for(None, "a dog", use_alt=False) == PAPER_PROMPT
    assert question_for(None, 'a "dog"', use_alt=True) == ALT_PROMPT.format(alt="a 'dog'")
    assert question_for("Say hi", None, use_alt=True) == "Say hi"
    assert family_template("llava-hf/llava-v1.6-mistral-7b-hf").format(q="x") == "[INST] <image>\nx [/INST]"
    assert family_template("llava-hf/llava-1.5-7b-hf").format(q="x") == "USER: <image>\nx\nASSISTANT:"

    class NoTemplate:
        chat_template = None
        tokenizer = None

    assert render_prompt(NoTemplate(), "llava-hf/llava-1.5-7b-hf", "q") == "USER: <image>\nq\nASSISTANT:"


def test_hygiene():
    assert clean_caption("  Describe it \n The  cat sits.  ", "Describe it") == "The cat sits."
    assert clean_caption("ASSISTANT: A cat.") == "A cat."
    assert clean_caption("USER: <image>\nDescribe it\nASSISTANT: A  cat.\n") == "A cat."
    assert clean_caption("[INST] <image>\nq [/INST] A dog.") == "A dog."
    assert is_degenerate("a red car " + "and the sky " * 10)
    assert not is_degenerate("A red car parks near a tall tree under a grey sky with clouds.")
    assert not is_degenerate("")


def test_bad_inputs_recorded_then_retry_replaces_them(tmp_path, hf_captioner):
    src = tmp_path / "src"
    expected = bad_and_odd_inputs(src)
    out = tmp_path / "out"
    kw = dict(max_new_tokens=4, temperature=0.0, batch_size=4, shard_size=4, progress=False, captioner=hf_captioner)
    s = run_caption([src], out, **kw)
    df = read_rows(out)
    assert df["key"].n_unique() == df.height == len(expected)
    for name, readable in expected.items():
        row = df.filter(pl.col("key") == f"src/{name}").row(0, named=True)
        assert (row["error"] is None) == readable, (name, row["error"])
        assert (row["caption"] is not None) == readable
    assert (s.captioned, s.failed) == (5, 5)
    assert "bomb" in df.filter(pl.col("key") == "src/bomb.png")["error"][0]

    # a rerun skips everything; --retry-failed re-reads only the failed ones, now fixed
    assert run_caption([src], out, **kw).skipped == len(expected)
    (src / "truncated.jpg").write_bytes(jpeg_bytes(100, 90, seed=3))
    s = run_caption([src], out, retry_failed=True, **kw)
    assert (s.retried, s.captioned, s.failed) == (5, 1, 4)
    df = read_rows(out)
    assert df["key"].n_unique() == df.height == len(expected)  # replaced, not duplicated
    assert df.filter(pl.col("key") == "src/truncated.jpg")["error"][0] is None
    assert not (out / "retry-journal.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == len(expected) and manifest["config"]["backend"] == "transformers"


def test_transformers_rows_schema_and_readers(tmp_path, hf_captioner):
    make_tar(tmp_path / "sa.tar", n=3, unsafe=False)
    make_parquet(tmp_path / "p.parquet", n=2, struct=False)
    out = tmp_path / "out"
    cfg = CaptionConfig(src=[tmp_path / "sa.tar", tmp_path / "p.parquet"], out=out, max_new_tokens=3, temperature=0.0,
                        seed=7, batch_size=2, shard_size=2, embed_images=True, prompt_mode="alt", progress=False)  # fmt: skip
    run_caption(cfg, captioner=hf_captioner)
    shards = complete_shards(out)
    assert len(shards) == 3  # fixed-size shards of 2 rows
    table = pa.concat_tables(pq.read_table(s) for s in shards)
    assert table.schema.equals(CAPTION_SCHEMA, check_metadata=False)
    df = read_rows(out)
    assert df.height == 5 and df["error"].is_null().all()
    assert set(df["backend"]) == {"transformers"} and set(df["seed"]) == {7} and set(df["max_new_tokens"]) == {3}
    assert (df["finish_reason"] == "length").all() and df["truncated"].all() and (df["num_tokens"] == 3).all()
    assert df.filter(pl.col("key") == "p.parquet/1")["prompt"][0] == ALT_PROMPT.format(alt="alt 1")
    assert df.filter(pl.col("key") == "sa.tar/sa_0.jpg")["prompt"][0] == PAPER_PROMPT
    assert df.filter(pl.col("key") == "sa.tar/sa_0.jpg")["width"][0] == 1500  # from the JSON sidecar
    assert Image.open(io.BytesIO(df.filter(pl.col("key") == "p.parquet/0")["image"][0])).size == (70, 50)


@pytest.mark.slow
def test_vllm_matches_transformers_greedy_float32(tmp_path, hf_captioner, vllm_captioner):
    images = [prepare_image(jpeg_bytes(120, 90, seed=s)).image for s in range(3)]
    prompts = [hf_captioner.format_prompt(q) for q in (PAPER_PROMPT, "What is this?", ALT_PROMPT.format(alt="a cat"))]
    assert prompts == [vllm_captioner.format_prompt(q) for q in (PAPER_PROMPT, "What is this?", ALT_PROMPT.format(alt="a cat"))]
    params = GenParams(temperature=0.0, max_new_tokens=12, seed=0)
    hf = hf_captioner.generate(images, prompts, params)
    vl = vllm_captioner.generate(images, prompts, params)
    assert [g.token_ids for g in hf] == [g.token_ids for g in vl]
    assert [g.finish_reason for g in hf] == [g.finish_reason for g in vl]

    # and the vLLM backend through the whole job
    make_tar(tmp_path / "sa.tar", n=3)
    out = tmp_path / "out"
    s = run_caption([tmp_path / "sa.tar"], out, max_new_tokens=6, temperature=0.2, batch_size=2, shard_size=10,
                    progress=False, captioner=vllm_captioner)  # fmt: skip
    df = read_rows(out)
    assert (s.captioned, s.failed) == (3, 2) and df.height == 5 and set(df["backend"]) == {"vllm"}
    assert df.filter(pl.col("error").is_null())["caption"].str.len_chars().min() > 0


def test_an_image_the_model_rejects_is_recorded_not_fatal(tmp_path, hf_captioner):
    from autolabel.backends import size_policy_of

    odd = size_policy_of(hf_captioner).target(77, 33)  # what the job prepares the odd image at

    class Picky:  # a model that fails on one particular image (e.g. an odd size its processor rejects)
        name, model_name = "transformers", hf_captioner.model_name
        processor = hf_captioner.processor

        def format_prompt(self, q):
            return hf_captioner.format_prompt(q)

        def generate(self, images, prompts, params):
            if any(im.size == odd for im in images):
                raise ValueError("unsupported image")
            return hf_captioner.generate(images, prompts, params)

    src = tmp_path / "src"
    src.mkdir()
    for i, size in enumerate([(100, 80), (77, 33), (90, 60)]):
        (src / f"{i}.jpg").write_bytes(jpeg_bytes(*size))
    s = run_caption([src], tmp_path / "out", max_new_tokens=2, batch_size=3, progress=False, captioner=Picky())
    df = read_rows(tmp_path / "out")
    assert (s.captioned, s.failed, df.height) == (2, 1, 3)
    assert "unsupported image" in df.filter(pl.col("key") == "src/1.jpg")["error"][0]


@pytest.mark.parametrize(
    "case, extra, expected",
    [
        ("missing src", [], "error: --src"),
        ("empty src", [], "error: no images found"),
        ("unknown backend", ["--backend", "onnx"], "error: unknown --backend"),
        ("unknown prompt mode", ["--prompt-mode", "fancy"], "error: unknown --prompt-mode"),
        ("missing model dir", ["--backend", "transformers", "--model", "./no/such/model"], "error: --model ./no/such/model does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_error(tmp_path, case, extra, expected):
    src = tmp_path / "src"
    if case != "missing src":
        src.mkdir()
    if case not in ("missing src", "empty src"):
        (src / "a.jpg").write_bytes(jpeg_bytes())
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "caption", "--src", str(src), "--out", str(tmp_path / "o"),
                        *extra], capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith(expected) and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not list((tmp_path / "o").glob("*.parquet"))  # nothing written


def test_from_loaded_wraps_a_loaded_model(tmp_path, hf_captioner):
    cap = TransformersCaptioner.from_loaded(hf_captioner.model, hf_captioner.processor, "my-llava")
    images = [prepare_image(jpeg_bytes(90, 70, seed=s)).image for s in range(2)]
    prompts = [cap.format_prompt(PAPER_PROMPT)] * 2
    params = GenParams(temperature=0.0, max_new_tokens=5)
    assert [g.token_ids for g in cap.generate(images, prompts, params)] == [g.token_ids for g in hf_captioner.generate(images, prompts, params)]
    assert cap.caption is not None and cap.model_name == "my-llava"


@pytest.mark.slow
def test_kill_9_then_resume_is_exactly_once(tmp_path, tiny_llava, hf_captioner):
    src = tmp_path / "sam"
    src.mkdir()
    for i in range(48):
        (src / f"sa_{i}.jpg").write_bytes(jpeg_bytes(200, 150, seed=i))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "cli.py"), "caption", "--src", str(src), "--out", str(out), "--model",
           str(tiny_llava), "--backend", "transformers", "--max-new-tokens", "48", "--temperature", "0",
           "--batch-size", "2", "--shard-size", "4", "--workers", "1", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(out.glob("*.done")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: give it more work"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_rows(out).height
    assert 0 < before < 49

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"skipped as already done {before}" in r.stdout
    resumed = read_rows(out)
    assert resumed["key"].n_unique() == resumed.height == 49
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    reference = tmp_path / "reference"
    run_caption([src], reference, max_new_tokens=4, temperature=0.0, progress=False, captioner=hf_captioner)
    assert sorted(resumed["key"]) == sorted(read_rows(reference)["key"])
    assert resumed.filter(pl.col("error").is_not_null())["key"].to_list() == ["sam/broken.jpg"]


def test_interrupted_retry_swap_is_finished_by_the_next_run(tmp_path):
    """A crash between writing a retry's replacement shard and deleting the old one leaves both;
    the next run finishes the swap from the journal, so every key is left exactly once."""
    from shards.layout import JOURNAL
    from shards.retry import finish_interrupted_retry
    from shards.writer import ShardWriter

    out = tmp_path / "out"
    w = ShardWriter(out, rows_per_shard=10)
    old = w.write_table(pa.Table.from_pylist([{"key": "a", "error": "broken"}, {"key": "b", "caption": "x"}], CAPTION_SCHEMA))
    new_name = w.next_shard_name()
    (out / JOURNAL).write_text(json.dumps({new_name: [old.name]}))
    w.write_table(pa.Table.from_pylist([{"key": "a", "caption": "fixed"}, {"key": "b", "caption": "x"}], CAPTION_SCHEMA))
    assert read_rows(out).height == 4  # the crash window: both shards complete
    finish_interrupted_retry(out)
    df = read_rows(out)
    assert sorted(df["key"]) == ["a", "b"] and df.filter(pl.col("key") == "a")["caption"][0] == "fixed"
    assert not (out / JOURNAL).exists() and not old.exists()

    # a crash before the replacement was complete: the journal is dropped, the old shard stays
    (out / JOURNAL).write_text(json.dumps({"part-00099-deadbeef.parquet": [complete_shards(out)[0].name]}))
    finish_interrupted_retry(out)
    assert read_rows(out).height == 2 and not (out / JOURNAL).exists()


def test_one_caption_batch_function_fills_rows_for_both_engines():
    """autolabel.pipeline.caption_batch is what the local loop and the Ray CaptionActor both call:
    the alt-text prompt per row, hygiene on the text, and a failing image isolated into its row."""
    from types import SimpleNamespace

    from PIL import Image

    from autolabel.config import CaptionConfig
    from autolabel.pipeline import base_row, caption_batch
    from autolabel.prompts import ALT_PROMPT, PAPER_PROMPT

    class Echo:
        name, model_name = "fake", "echo"

        def format_prompt(self, q):
            return f"<{q}>"

        def generate(self, images, prompts, params):
            if any(im.width == 3 for im in images):
                raise ValueError("odd image")
            return [SimpleNamespace(text=f"A photo of size {im.width}.", num_tokens=5, finish_reason="stop") for im in images]

    cfg = CaptionConfig(prompt_mode="alt", temperature=0.0, max_new_tokens=7)
    cap = Echo()
    rows = [base_row(cap, cfg.gen_params(), None, key=k, source=None, member=None, address=None, image_id=None, width=None,
                     height=None, alt_text=alt) for k, alt in (("a", "a cat"), ("b", None), ("c", None))]
    assert caption_batch(cap, cfg, zip(rows, [Image.new("RGB", (w, 2)) for w in (5, 3, 4)])) == rows
    assert [r["prompt"] for r in rows] == [ALT_PROMPT.format(alt="a cat"), PAPER_PROMPT, PAPER_PROMPT]
    assert [r["caption"] for r in (rows[0], rows[2])] == ["A photo of size 5.", "A photo of size 4."]
    assert rows[1]["error"] == "captioning failed: ValueError: odd image" and "caption" not in rows[1]
    assert rows[0]["error"] is None and rows[0]["max_new_tokens"] == 7 and rows[0]["model"] == "echo"


def test_shards_reader_does_not_import_the_writer():
    """The layout constants live in shards.layout: the reader (and the layout) import nothing of
    the writer, so the writer imports the reader at the top, with no cycle."""
    import ast

    def imported(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    shards_dir = Path(__file__).resolve().parent.parent / "shards"
    for name in ("reader.py", "layout.py"):
        assert "shards.writer" not in imported(shards_dir / name), name
    assert "shards.reader" in imported(shards_dir / "writer.py")


# --- the vLLM engine is fed each image as it is prepared (autolabel.pipeline.next_batch) ---------


@pytest.mark.slow
def test_streamed_requests_give_llm_generate_s_tokens(vllm_captioner):
    """VllmCaptioner feeds the engine request by request (LLMEngine.add_request, step): the
    tokens are those of `vllm.LLM.generate` on the same inputs (the path it replaced), in order,
    sampled (temperature 0.2, seeded) and greedy."""
    from vllm import SamplingParams

    images = [prepare_image(jpeg_bytes(120 + 10 * s, 90, seed=s)).image for s in range(4)]
    prompts = [vllm_captioner.format_prompt(q) for q in (PAPER_PROMPT, "What is this?", ALT_PROMPT.format(alt="a cat"), "Hi")]
    for temperature in (0.2, 0.0):
        params = GenParams(temperature=temperature, max_new_tokens=10, seed=3)
        sp = SamplingParams(temperature=temperature, max_tokens=10, seed=3)
        requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
        reference = [list(o.outputs[0].token_ids) for o in vllm_captioner.llm.generate(requests, sp, use_tqdm=False)]
        streamed = vllm_captioner.generate_streamed(iter(zip(images, prompts)), params)
        assert [g.token_ids for g in streamed] == reference
        assert len({tuple(t) for t in reference}) > 1  # the order is checked: the outputs differ


@pytest.mark.slow
def test_the_engine_starts_before_the_batch_is_prepared(tmp_path, vllm_captioner, monkeypatch):
    """The job hands each prepared image to the engine at once: the second image's preparation
    waits (up to 60 s) until the engine has the first request. A job that collected the whole
    batch before calling the engine would never get there."""
    import threading

    import autolabel.pipeline as pipeline

    engine = vllm_captioner.llm.llm_engine
    first_in_engine, waited = threading.Event(), []
    add_request, prepare = engine.add_request, pipeline._prepare

    def add_and_signal(*args, **kwargs):
        request_id = add_request(*args, **kwargs)
        first_in_engine.set()
        return request_id

    def gated_prepare(item, opts):
        if item.key.endswith("1.jpg"):
            waited.append(first_in_engine.wait(timeout=60))
        return prepare(item, opts)

    monkeypatch.setattr(engine, "add_request", add_and_signal)
    monkeypatch.setattr(pipeline, "_prepare", gated_prepare)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(jpeg_bytes(100, 80, seed=i))
    s = run_caption([src], tmp_path / "out", max_new_tokens=3, temperature=0.0, batch_size=3, workers=2, progress=False,
                    captioner=vllm_captioner)  # fmt: skip
    assert waited == [True] and s.captioned == 3
    assert len(read_rows(tmp_path / "out")) == 3


class _Rejecting:
    """The vLLM captioner, failing on images of one size (as an engine rejects an image it cannot
    process): in the stream, after the requests before it reached the engine."""

    def __init__(self, inner: VllmCaptioner, bad_size: tuple[int, int]) -> None:
        self.inner, self.bad_size, self.lingering = inner, bad_size, []
        self.name, self.model_name, self.processor = inner.name, inner.model_name, inner.processor

    def format_prompt(self, q):
        return self.inner.format_prompt(q)

    def _checked(self, requests):
        for image, prompt in requests:
            if image.size == self.bad_size:
                raise ValueError("unsupported image")
            yield image, prompt

    def generate_streamed(self, requests, params):
        try:
            return self.inner.generate_streamed(self._checked(requests), params)
        except ValueError:
            self.lingering.append(self.inner.llm.llm_engine.has_unfinished_requests())
            raise

    def generate(self, images, prompts, params):
        return self.generate_streamed(zip(images, prompts), params)

    def close(self):
        pass


@pytest.mark.slow
def test_a_streamed_image_the_engine_rejects_is_isolated(tmp_path, vllm_captioner):
    """One image failing mid-stream: the requests already in the engine are aborted (none
    lingers into the next batch), the batch is retried image by image, the bad image becomes its
    error row and the others get the captions a clean run gives them."""
    from autolabel.backends import size_policy_of

    odd = size_policy_of(vllm_captioner).target(77, 33)
    src = tmp_path / "src"
    src.mkdir()
    for i, size in enumerate([(100, 80), (77, 33), (90, 60), (110, 70)]):
        (src / f"{i}.jpg").write_bytes(jpeg_bytes(*size, seed=i))
    kw = dict(max_new_tokens=5, temperature=0.0, batch_size=4, progress=False)
    picky = _Rejecting(vllm_captioner, odd)
    s = run_caption([src], tmp_path / "out", captioner=picky, **kw)
    assert (s.captioned, s.failed) == (3, 1) and picky.lingering[0] is False
    assert not vllm_captioner.llm.llm_engine.has_unfinished_requests()
    df = read_rows(tmp_path / "out").sort("key")
    assert "unsupported image" in df.filter(pl.col("key") == "src/1.jpg")["error"][0]
    (src / "1.jpg").unlink()
    run_caption([src], tmp_path / "clean", captioner=vllm_captioner, **kw)
    clean = read_rows(tmp_path / "clean").sort("key")
    good = df.filter(pl.col("error").is_null())
    assert good.select("key", "caption", "num_tokens").to_dicts() == clean.select("key", "caption", "num_tokens").to_dicts()


@pytest.mark.slow
def test_an_interrupted_streamed_run_resumes_exactly_once_with_the_same_captions(tmp_path, vllm_captioner):
    """A run stopped mid-batch (while the engine is being fed) keeps only complete shards; the
    rerun captions the rest once, and every row equals an uninterrupted run's."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(9):
        (src / f"{i}.jpg").write_bytes(jpeg_bytes(90 + 5 * i, 70, seed=i))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    kw = dict(max_new_tokens=6, temperature=0.2, seed=1, batch_size=3, shard_size=3, progress=False)

    class Stops:
        """Stops the process (as Ctrl-C does) when the 8th image reaches the engine (the 7th is in it)."""

        name, model_name, processor = vllm_captioner.name, vllm_captioner.model_name, vllm_captioner.processor
        format_prompt = staticmethod(vllm_captioner.format_prompt)
        fed = 0

        def _counted(self, requests):
            for request in requests:
                Stops.fed += 1
                if Stops.fed == 8:
                    raise KeyboardInterrupt
                yield request

        def generate_streamed(self, requests, params):
            return vllm_captioner.generate_streamed(self._counted(requests), params)

        def close(self):
            pass

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_caption([src], out, captioner=Stops(), **kw)
    assert not vllm_captioner.llm.llm_engine.has_unfinished_requests()
    before = read_rows(out).height
    assert 0 < before < 10 and before % 3 == 0  # whole shards only
    s = run_caption([src], out, captioner=vllm_captioner, **kw)
    assert s.skipped == before and s.captioned + s.failed == 10 - before
    resumed = read_rows(out).sort("key")
    assert resumed["key"].n_unique() == resumed.height == 10
    run_caption([src], tmp_path / "reference", captioner=vllm_captioner, **kw)
    cols = ["key", "caption", "num_tokens", pl.col("error").is_null()]  # (a decode error names an object address)
    assert resumed.select(cols).to_dicts() == read_rows(tmp_path / "reference").sort("key").select(cols).to_dicts()
    assert resumed["error"].null_count() == 9


def test_a_batch_renders_each_question_once():
    """The chat template runs once per distinct question of a batch, not once per image."""
    from types import SimpleNamespace

    from PIL import Image

    from autolabel.config import CaptionConfig
    from autolabel.pipeline import base_row, caption_batch

    class Counting:
        name, model_name, rendered = "fake", "counting", []

        def format_prompt(self, q):
            self.rendered.append(q)
            return f"<{q}>"

        def generate(self, images, prompts, params):
            return [SimpleNamespace(text=p, num_tokens=1, finish_reason="stop") for p in prompts]

    cfg = CaptionConfig(prompt_mode="alt", prompts=("dense", "short"))
    cap = Counting()
    alts = ("a cat", None, None, "a cat", "a dog")
    rows = [base_row(cap, cfg.gen_params(), None, key=str(i), source=None, member=None, address=None, image_id=None, width=None,
                     height=None, alt_text=alt) for i, alt in enumerate(alts)]
    caption_batch(cap, cfg, zip(rows, [Image.new("RGB", (4, 4))] * len(rows)))
    assert sorted(cap.rendered) == sorted(set(cap.rendered)) and len(cap.rendered) == 4  # 3 distinct first questions + "short"
    assert [r["caption"] for r in rows] == [f"<{r['prompt']}>" for r in rows] and rows[1]["caption"] == rows[2]["caption"]
    assert all(r["caption_short"] for r in rows)
