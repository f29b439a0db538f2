"""The loader's index of a features directory, cached next to the shards as `index.npz`.

Building the index (t2i.data.StreamingFeatureDataset) reads every shard's footer and its
key/height/width columns: at 10M samples, minutes per open, paid by every rank of every run.
The cache holds the finished numpy arrays and is used when it matches the directory:

- it is written (atomically: temp file, fsync, rename) only once the directory is complete, i.e.
  its manifest lists exactly the complete shards (the features job has finished);
- it records a fingerprint of the complete shards (name, size, mtime of each) and of the caption
  fields: a rewritten, added or removed shard, or other fields, make it stale, and the index is
  rebuilt (and the cache rewritten);
- a cache that cannot be read or written (read-only directory, damaged file) only costs the rebuild.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

INDEX_FILE = "index.npz"
INDEX_VERSION = 1  # bump when the arrays change meaning


def fingerprint(shards: list[str], caption_fields: tuple[str, ...]) -> str:
    """A digest of the complete shards (name, bytes, mtime) and the caption fields: one stat a shard."""
    stats = [(Path(s).name, (st := os.stat(s)).st_size, st.st_mtime_ns) for s in shards]
    ident = {"version": INDEX_VERSION, "fields": list(caption_fields), "shards": stats}
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def load_index(features_dir: str | Path, digest: str) -> dict[str, np.ndarray] | None:
    """The cached index arrays when the cache matches `digest` (see fingerprint), else None."""
    path = Path(features_dir) / INDEX_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != digest:
                return None
            return {k: z[k] for k in z.files if k != "fingerprint"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):  # none yet, or damaged: rebuild
        return None


def is_complete(features_dir: str | Path, shards: list[str]) -> bool:
    """Whether the features job has finished: its manifest lists exactly the complete shards."""
    try:
        manifest = json.loads((Path(features_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return sorted(s.get("shard", "") for s in manifest.get("shards", [])) == sorted(Path(s).name for s in shards)


def save_index(features_dir: str | Path, shards: list[str], digest: str, arrays: dict[str, np.ndarray]) -> bool:
    """Write the cache when the directory is complete; whether it was written. Atomic: readers
    see the old cache or the new one, never part of one (several ranks may write at once)."""
    d = Path(features_dir)
    if not is_complete(d, shards):
        return False
    tmp = d / f".{INDEX_FILE}.{os.getpid()}.tmp"  # a crash's leftover is cleaned like a shard's temp file
    try:
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(digest), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / INDEX_FILE)
    except OSError:  # a read-only or full features directory trains all the same
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
    return True
