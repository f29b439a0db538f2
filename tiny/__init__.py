"""Tiny models and synthetic worlds for the tests, the benchmarks and the demo.

Nothing here is on a product path: shards, autolabel, dataset_stats, curate, t2i and costs never
import `tiny` (tests/test_layout.py checks it); the demo, the tests and the benchmarks do.

- `world`: the synthetic shape world (scenes, rendering, captions, alt-texts, SA-1B folders,
  caption shards), a pure function of a seed;
- `judge`: the world's ground-truth checker for captions and generated images;
- `pixart`: a tiny T5 text encoder and a tiny VAE for the trainer;
- `llava`: a tiny random LLaVA for the caption job; `vlms`: one per captioner family;
- `clip`: a tiny CLIP fitted on the world (score, eval, the demo's aesthetic stage);
- `alignment`: train-and-judge helpers for text-image alignment on the world;
- `curate_world`: the world as caption shards with planted copies, languages and broken rows;
- `images`: image inputs for the caption and image-layer tests (random JPEGs, awkward files, tars).
"""
