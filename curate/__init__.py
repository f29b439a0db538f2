"""`t2i-data score` and `select`: per-image quality scores as shards, and subsets chosen by them.

`score` (curate.api.run_score) reads caption shards and writes score shards keyed by `key`
(same shard machinery as captions: atomic, done markers, resumable); `select`
(curate.api.run_select) filters caption shards by a polars/SQL condition over those scores and
writes the subset as ordinary caption shards.
"""
