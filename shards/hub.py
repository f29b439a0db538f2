"""Loading by Hugging Face Hub id on clusters without network: fail in seconds, not minutes.

`from_pretrained` on an unreachable hub retries for minutes (measured: 2 min 27 s to 2 min 54 s
with no DNS) before its error. `hub_kwargs` asks the hub once, with a short timeout and no retries,
before any loading: an id that is cached loads from the cache (`local_files_only`), one that is
not fails at once with a one-line error. `HF_HUB_OFFLINE=1` skips the question (cache only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def hub_kwargs(ref: str, what: str) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs for `ref` ({} for a local directory or a reachable hub);
    raises UserError at once when `ref` is a hub id that cannot be loaded from here."""
    if not is_hub_id(ref):
        return {}
    if offline():
        if not _cached(ref):
            raise _offline_error(ref, what, "HF_HUB_OFFLINE is set and it is not in the local HF cache")
        return {"local_files_only": True}
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(ref, timeout=PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise UserError(f"no model {ref!r} ({what}) on the Hugging Face Hub: check the id (private or gated: `hf auth login`)") from None
    except HfHubHTTPError:
        return {}  # the hub answered (gated, rate-limited, ...): from_pretrained reports the details
    except Exception as e:  # no answer: DNS, connection refused, timeout, proxy
        if _cached(ref):
            return {"local_files_only": True}
        reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise _offline_error(ref, what, f"the Hugging Face Hub is not reachable ({reason}) and it is not in the local HF cache") from None
    return {}
