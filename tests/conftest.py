"""Test-wide settings. Two cores collapse under oversubscription, so torch uses few threads."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
# Caption samples the repository carries (tests/data/README.md: source, licence, what is kept)
TEST_DATA = ROOT / "tests" / "data"
LAION_SAMPLE = TEST_DATA / "laion_sample_10k.parquet"  # 10k LAION alt-texts, TEXT column
COCO_SAMPLE = TEST_DATA / "coco_captions_val2017_1k.json"  # the first 1,000 COCO val2017 captions
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """The tiny random LLaVA (tiny.llava, seed 0) the caption tests share; read-only."""
    from tiny.llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), seed=0)


@pytest.fixture(scope="session")
def hf_captioner(tiny_llava):
    """`tiny_llava` loaded once by the transformers backend."""
    from autolabel.backends import TransformersCaptioner

    return TransformersCaptioner(str(tiny_llava))


@pytest.fixture(scope="session")
def world_models(tmp_path_factory) -> dict[str, str]:
    """The tiny T5 (its vocabulary: the world's dense captions and prompts) and the tiny VAE fitted
    300 steps, built on one thread: what the world's alignment and eval tests train with."""
    import torch

    from tiny.alignment import corpus
    from tiny.pixart import build_tiny_models

    torch.set_num_threads(1)
    return build_tiny_models(tmp_path_factory.mktemp("world-models"), corpus(), vae_fit_steps=300)


@pytest.fixture(scope="session")
def simple_world(tmp_path_factory) -> dict:
    """Tiny T5 + VAE (10 VAE steps) on the simple corpus and 96 simple-world captions in shards of
    48: what the text-feature storage tests (compact, on demand) encode. Read-only: each test
    module writes its features into its own folder."""
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    root = tmp_path_factory.mktemp("simple-world")
    models = build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=10)
    write_simple_world(root / "captions", 96, rows_per_shard=48)
    return {"captions": root / "captions", **models}
