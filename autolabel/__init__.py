"""Auto-captioning (`t2i-data caption`): a LLaVA-class VLM writes dense captions into shards.

sources (folders, SA-1B tars, Parquet) -> prepare (draft decode, EXIF, RGB, resize, in parallel
workers) -> backends (vLLM or transformers) -> hygiene -> shards.ShardWriter, resumable.
Entry point: `autolabel.api.run_caption`.
"""
