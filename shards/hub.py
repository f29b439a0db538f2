"""Loading by Hugging Face Hub id on clusters without network: fail in seconds, not minutes.

`from_pretrained` on an unreachable hub retries for minutes (measured: 2 min 27 s to 2 min 54 s
with no DNS) before its error. `hub_kwargs` asks the hub once, with a short timeout and no retries,
before any loading: an id that is cached loads from the cache (`local_files_only`), one that is
not fails at once with a one-line error. `HF_HUB_OFFLINE=1` skips the question (cache only).

`check_model` is the one check every loader makes before loading (CLIP in score and eval, the
VAE and T5, a PixArt or DiT init, a caption model): a local folder must exist and hold
something, a hub id must be cached or answer within seconds. `load_pretrained` wraps a
`from_pretrained` with it and turns a folder that is no such model (no config, random weights)
into one line; `load_weights_file` does the same for single weight files (the aesthetic head).
"""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable

from shards import fs
from shards.errors import UserError

PROBE_TIMEOUT_S = 5.0


def is_hub_id(ref: str) -> bool:
    """`org/name` or `name` that is not an existing local path."""
    return not Path(ref).expanduser().exists() and not ref.startswith((".", "/", "~")) and ref.count("/") <= 1


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _cached(ref: str) -> bool:
    """Whether the HF cache holds a snapshot of model `ref` (its folder, not a scan of the cache)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{ref.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _offline_error(ref: str, what: str, why: str) -> UserError:
    return UserError(
        f"cannot load {what} {ref!r}: {why}: download it where the hub is reachable (`hf download {ref}`) "
        f"and copy the HF cache here, or pass a local directory"
    )


_answered: dict[tuple, dict[str, Any]] = {}  # (hub id, offline, cache, endpoint) -> kwargs: asked once per process


def hub_kwargs(ref: str, what: str) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs for `ref` ({} for a local directory or a reachable hub);
    raises UserError at once when `ref` is a hub id that cannot be loaded from here."""
    if not is_hub_id(ref):
        return {}
    from huggingface_hub import constants

    asked = (ref, offline(), str(constants.HF_HUB_CACHE), str(constants.ENDPOINT))  # the same question, the same answer
    if asked not in _answered:
        _answered[asked] = _ask_hub(ref, what)
    return dict(_answered[asked])


def _ask_hub(ref: str, what: str) -> dict[str, Any]:
    """hub_kwargs' question to the hub (or the cache, offline)."""
    if offline():
        if not _cached(ref):
            raise _offline_error(ref, what, "HF_HUB_OFFLINE is set and it is not in the local HF cache")
        return {"local_files_only": True}
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        _probe(ref)
    except RepositoryNotFoundError:
        raise UserError(f"no model {ref!r} ({what}) on the Hugging Face Hub: check the id (private or gated: `hf auth login`)") from None
    except HfHubHTTPError as e:
        if getattr(getattr(e, "response", None), "status_code", None) != 404:
            return {}  # the hub answered (gated, rate-limited, ...): from_pretrained reports the details
        if _cached(ref):
            return {"local_files_only": True}
        raise UserError(f"no model {ref!r} ({what}) at {_endpoint()}: check the id, or HF_ENDPOINT") from None
    except Exception as e:  # no answer: DNS, connection refused, timeout, proxy
        if _cached(ref):
            return {"local_files_only": True}
        reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise _offline_error(ref, what, f"the Hugging Face Hub is not reachable ({reason}) and it is not in the local HF cache") from None
    return {}


def _probe(ref: str) -> None:
    """Ask the hub for `ref`'s model info; raise what it raises, or TimeoutError when it has not
    answered within PROBE_TIMEOUT_S (a hard deadline: the client may try a request twice)."""
    from huggingface_hub import HfApi

    box: dict[str, BaseException] = {}

    def ask() -> None:
        try:
            HfApi().model_info(ref, timeout=PROBE_TIMEOUT_S)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    asking = threading.Thread(target=ask, name="t2i-hub-probe", daemon=True)  # daemon: never holds up the exit
    asking.start()
    asking.join(PROBE_TIMEOUT_S)
    if asking.is_alive():
        raise TimeoutError(f"no answer within {PROBE_TIMEOUT_S:g} s")
    if "error" in box:
        raise box["error"]


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


# ---- the one check before any model loads -----------------------------------------------------


def check_model(ref: str, what: str, flag: str) -> dict[str, Any]:
    """The check every loader makes before loading `ref` (a local model directory or an HF id):
    a local path must be a directory that holds something, a hub id must be cached or reachable
    (hub_kwargs: one 5 s request). Returns the extra `from_pretrained` kwargs; one-line UserError
    otherwise (`flag`: how the user gave it, e.g. --clip-model)."""
    quiet_weight_loading()
    noun = what.removeprefix("the ")
    path = Path(str(ref)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag} {ref} is a file, not a model directory: pass a {noun} directory (saved with "
                            "save_pretrained) or an HF id")
        if not any(path.iterdir()):
            raise UserError(f"{flag} {ref} is an empty folder: pass a {noun} directory (saved with save_pretrained) or an HF id")
        return {}
    if not is_hub_id(str(ref)):
        raise UserError(f"{flag} {ref} does not exist: pass a local {noun} directory or an HF id")
    return hub_kwargs(str(ref), what)


def quiet_weight_loading() -> None:
    """No "Loading weights" progress bar from transformers (the jobs show their own progress, and
    an error after a load stays the one line on stderr); downloads keep the hub's own bars."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def load_pretrained(load: Callable[..., Any], ref: str, what: str, flag: str, **kwargs: Any) -> Any:
    """`load(ref, **kwargs)` (a `from_pretrained`) after check_model; a folder that is not such a
    model (no config, random weights, a damaged file) is a one-line UserError, not a traceback."""
    hub = check_model(ref, what, flag)
    noun = what.removeprefix("the ")
    try:
        return load(ref, **{**hub, **kwargs})
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read the user's model files: one line
        raise UserError(f"{flag} {ref} is not a loadable {noun} ({type(e).__name__}: {_first_line(e)}): pass a "
                        f"{noun} directory saved with save_pretrained, or its HF id") from None


def load_weights_file(path: str | Path, what: str, flag: str, mmap: bool = False) -> dict[str, Any]:
    """A state dict from a `.safetensors` file or a torch `.pt`/`.pth` (weights only); a missing,
    random or damaged file is a one-line UserError. `mmap`: map it rather than read it (a check
    before the real load: cheap for gigabytes)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {path} is not a file: pass the {what} file (.safetensors or .pth)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(p))
    except Exception as e:  # noqa: BLE001 - random bytes, truncated, a pickle of something else
        raise UserError(f"{flag} {path} is not a readable {what} file ({type(e).__name__}: {_first_line(e)}): "
                        f"pass the {what} as .safetensors or .pth") from None
    if not isinstance(state, dict):
        raise UserError(f"{flag} {path} holds a {type(state).__name__}, not a state dict: pass the {what} file")
    return state


def _first_line(e: BaseException) -> str:
    """The reason in an exception's message: its first line, its first sentence when long."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". ", 1)[0] if len(line) > 120 else line


def absolute_model(ref: str | None) -> str | None:
    """`ref` as a run records it, usable from any working directory: an existing local path made
    absolute; a hub id, a URI or anything else as it is. `kind:path` (a stage's init) keeps its kind."""
    if not ref:
        return ref
    kind, sep, arg = str(ref).partition(":")
    if sep and kind in ("dit", "pixart", "checkpoint") and arg:
        return f"{kind}:{absolute_model(arg)}"
    path = Path(str(ref)).expanduser()
    return str(path.resolve()) if "://" not in str(ref) and path.exists() else str(ref)


WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones by sampled blocks
SAMPLED_BLOCKS = 16  # 1 MiB blocks read from a larger file, first and last included


def local_model_digest(ref: str) -> str | None:
    """A digest of a local model folder's contents, so outputs made with it can tell when its
    weights were changed in place (a refit into the same folder); None for a hub id or URI.

    Files up to 64 MiB are hashed whole. A larger one (T5-XXL's shards) is hashed by its size and
    16 evenly spaced 1 MiB blocks: a refit rewrites every tensor, so this catches it while reading
    megabytes, not gigabytes. Names and contents count, times do not: a copied folder keeps its digest."""
    root = Path(str(ref)).expanduser()
    if "://" in str(ref) or not root.exists():
        return None
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.relative_to(root).as_posix() if path != root else path.name}\0{size}\0".encode())
        if size <= WHOLE_FILE_BYTES:
            h.update(fs.sha256(path).encode())
            continue
        with open(path, "rb") as f:
            for i in range(SAMPLED_BLOCKS):
                f.seek((size - (1 << 20)) * i // (SAMPLED_BLOCKS - 1))
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]
