"""Where the benchmarks find their caption sample: the full shared LAION sample beside the
repository when it is there (../shared/data), else the copy the tests carry (tests/data: the
same 10,000 captions, the TEXT column only; tests/data/README.md)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_LAION = ROOT.parent / "shared" / "data" / "laion_sample_10k.parquet"
LAION = SHARED_LAION if SHARED_LAION.exists() else ROOT / "tests" / "data" / "laion_sample_10k.parquet"
