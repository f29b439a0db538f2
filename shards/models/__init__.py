"""Models that more than one job uses, kept here so no job imports another's internals: CLIP
embeddings and CLIPScore (score, eval), the LAION aesthetic head (score, eval, the demo), and
caption language identification (stats, score)."""

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # CLIPScore, aesthetic and duplicate embeddings (score, eval)
