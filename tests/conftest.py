"""Test-wide settings. Two cores collapse under oversubscription, so torch uses few threads."""

import os
import sys
from pathlib import Path

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
