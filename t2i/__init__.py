"""The PixArt-alpha trainer: features -> train -> sample -> export, on diffusers.

Modules: `models` (size presets, null caption, FLOPs), `import_dit` (DiT -> PixArt
re-parameterisation), `diffusion` (DDPM + IDDPM hybrid loss), `features` (VAE + T5 feature
shards), `data` (bucketed, resumable batches), `train`, `manifest` (TOML stages), `sample`,
`export`, `tiny` (local tiny VAE / T5 for CPU and CI).
"""

