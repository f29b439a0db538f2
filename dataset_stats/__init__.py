"""Caption statistics in the terms of PixArt-alpha's Table 1 (`t2i-data stats`).

`readers` (formats, compression, caption column, up-front validation, batched streaming) ->
`nouns` (spaCy tagging in token-sized batches in worker processes, with `language` ID) ->
`metrics` (DN, VN, VN/DN, size-matched subsamples, growth) -> `report` (terminal table, JSON,
Markdown, plots). `engine_ray` runs the tagging on Ray Data instead.
"""

from dataset_stats.api import StatsOptions, run_stats

__all__ = ["StatsOptions", "run_stats"]
