"""Training-step cost: our trainer (t2i.stage.run_stage on a features directory, as `t2i-data train
--features`: the streaming loader (t2i.loader, DataLoader workers) over the cached index
(t2i.feature_index), posterior sampling, null-caption dropout, IDDPM hybrid loss, grad clipping,
EMA, logging) vs a plain reference loop over the same diffusers PixArtTransformer2DModel (fp32,
no compile, no fused AdamW, MSE only, tensors already in memory).

CPU: the ratio ours / reference per step for the tiny preset (and PixArt-S/2 at 128 px).
GPU (when available): images/s and MFU of PixArt-XL/2 at 256 px, bf16, through our trainer.
Features are random tensors of the right shapes (no VAE/T5 download needed), written as a
finished features directory (feature shards, config.json and manifest.json as `t2i-data
features` leaves them), so training opens it exactly as it opens real features.

    python benchmarks/train_bench.py            # writes the "train" section of BENCHMARKS.md
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import load_note, write_section  # noqa: E402
from shards import ShardWriter  # noqa: E402
from shards.writer import write_manifest  # noqa: E402
from t2i.diffusion import Diffusion  # noqa: E402
from t2i.features import FEATURE_SCHEMA, features_dir  # noqa: E402
from t2i.stage import run_stage  # noqa: E402
from t2i.noise import sample_keys  # noqa: E402
from t2i.train import TrainConfig, make_inputs  # noqa: E402


def fake_vae_dir(root: Path, factor: int) -> str:
    """Only the config is read by training (scale factor, scaling_factor)."""
    from diffusers import AutoencoderKL

    n = int(np.log2(factor)) + 1
    vae = AutoencoderKL(block_out_channels=(8,) * n, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=8, latent_channels=4)
    d = root / f"vae{factor}"
    vae.save_pretrained(d)
    return str(d)


def fake_features(root: Path, cfg: TrainConfig, n: int, latent: int, channels: int, tokens: int) -> None:
    """A finished features directory for cfg's settings under `root`: random rows, its config.json
    and its manifest (so the loader caches its index, as for real features)."""
    fcfg = cfg.feature_config()
    fdir = features_dir(root, fcfg)
    w = ShardWriter(fdir, rows_per_shard=max(n, 1), schema=FEATURE_SCHEMA, prefix="features")
    rng = np.random.default_rng(0)
    for i in range(n):
        w.add({"key": f"k{i:06d}", "caption": "x", "height": cfg.resolution, "width": cfg.resolution,
               "latent_shape": [4, latent, latent],
               "latent_mean": rng.standard_normal((4, latent, latent), np.float32).tobytes(),
               "latent_std": np.full((4, latent, latent), 0.05, np.float32).tobytes(),
               "text_emb": rng.standard_normal((tokens, channels)).astype(np.float16 if cfg.text_dtype == "float16" else np.float32).tobytes(),
               "text_len": tokens, "text_channels": channels, "text_dtype": cfg.text_dtype, "latent_dtype": "float32"})
    w.flush()
    config = {**asdict(fcfg), "cache_key": fcfg.cache_key()}
    (fdir / "config.json").write_text(json.dumps(config))
    write_manifest(fdir, config=config, extra={"schema": "features", "failed": 0})


def ours(cfg: TrainConfig, root: Path) -> tuple[float, float | None]:
    """Seconds per optimizer step of the job's training path (run_stage on the features root, as
    `t2i-data train --features`), from its JSONL log (first interval = warm-up)."""
    out = root / f"run-{cfg.name}"
    run_stage(cfg, out, features=root, progress=False)
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()][1:]
    ips = np.mean([r["images_per_s"] for r in recs])
    mfu = [r["mfu"] for r in recs if r["mfu"] is not None]
    return cfg.batch_size / ips, (float(np.mean(mfu)) if mfu else None)


def reference(cfg: TrainConfig, latent: int, channels: int, tokens: int, steps: int, device: str) -> float:
    """Seconds per step of the plain loop: forward, MSE on epsilon, backward, AdamW."""
    from diffusers import DDPMScheduler

    from t2i.models import build_transformer

    torch.manual_seed(0)
    model = build_transformer(cfg.preset, latent, channels).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    B = cfg.batch_size
    x0 = torch.randn(B, 4, latent, latent, device=device)
    text = torch.randn(B, tokens, channels, device=device)
    mask = torch.ones(B, tokens, dtype=torch.long, device=device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (B,), device=device)
        out = model(sched.add_noise(x0, noise, t), encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out[:, :4], noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.mean(times[max(1, steps // 5):]))


def input_cost(batch: int, latent: int, repeats: int = 20) -> tuple[float, float]:
    """Seconds per micro-batch of ours' noise inputs (each sample's from its own key, so a global
    batch gets the same noise on any number of processes: t2i.noise.sample_keys + make_inputs) and
    of the reference's unkeyed batched draws, on the same latents."""
    from types import SimpleNamespace

    mean = torch.randn(batch, 4, latent, latent)
    b = SimpleNamespace(latent_mean=mean, latent_std=torch.full_like(mean, 0.05), text=None, mask=None)
    objective = Diffusion()
    t = time.perf_counter()
    for _ in range(repeats):
        make_inputs(b, 0.18, objective, 0.1, sample_keys(0, 0, 1, np.arange(batch)))
    ours_s = (time.perf_counter() - t) / repeats
    t = time.perf_counter()
    for _ in range(repeats):
        x0 = b.latent_mean + b.latent_std * torch.randn_like(mean)
        torch.randn_like(x0), torch.randint(0, 1000, (batch,))
    return ours_s, (time.perf_counter() - t) / repeats


def main() -> None:
    load0 = os.getloadavg()[0]
    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, costs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = [("PixArt-tiny/2", 16, 2, 64, 32, 40, 200), ("PixArt-S/2", 128, 8, 8, 64, 120, 30)]
        for preset, res, factor, bs, ch, tok, steps in cases:
            cfg = TrainConfig(name=preset.replace("/", "_"), preset=preset, resolution=res, vae=fake_vae_dir(root, factor),
                              max_tokens=tok, text_dtype="float32", batch_size=bs, steps=steps, lr=1e-4, warmup_steps=10,
                              log_every=max(1, steps // 5), checkpoint_every=10**9, keep_checkpoints=1)
            latent = res // factor
            fake_features(root, cfg, bs * 8, latent, ch, tok)
            # the reference before and after ours: a change of load on the shared cores during the run hits both sides
            before = reference(cfg, latent, ch, tok, steps, device)
            o, _ = ours(cfg, root)
            after = reference(cfg, latent, ch, tok, steps, device)
            r = (before + after) / 2
            rows.append(f"| {preset} | {res} px, batch {bs}, {device} fp32 | {o * 1e3:.1f} ms | {r * 1e3:.1f} ms "
                        f"({before * 1e3:.1f} / {after * 1e3:.1f}) | {o / r:.2f}x |")
            print(rows[-1], flush=True)
            gen, batched = input_cost(bs, latent)
            costs.append(f"{preset} (batch {bs}): {gen * 1e3:.2f} ms per step for the keyed draws vs "
                         f"{batched * 1e3:.2f} ms unkeyed ({(gen - batched) / r:.1%} of the reference step)")
        gpu = ""
        if device == "cuda":
            cfg = TrainConfig(name="xl", preset="PixArt-XL/2", resolution=256, vae=fake_vae_dir(root, 8), max_tokens=120,
                              batch_size=32, steps=30, lr=2e-5, warmup_steps=10, mixed_precision="bf16", log_every=5,
                              checkpoint_every=10**9, keep_checkpoints=1)
            fake_features(root, cfg, 32 * 8, 32, 4096, 120)
            s, mfu = ours(cfg, root)
            gpu = f"\nGPU ({torch.cuda.get_device_name()}): PixArt-XL/2, 256 px, bf16, batch 32: {32 / s:.1f} images/s, MFU {mfu:.1%}\n"
            print(gpu)
    body = (
        "Per optimizer step: our trainer vs a plain loop over the same `PixArtTransformer2DModel` "
        "(fp32, no compile, no fused AdamW, MSE only, tensors already in memory). Ours adds feature-shard "
        "batching (`run_stage` on a finished features directory, as `t2i-data train --features`: cached index, streaming "
        "loader with its default 2 DataLoader workers), posterior sampling, null-caption dropout, the IDDPM VLB term, grad "
        "clipping, EMA and logging. Ratio = ours / reference (above 1: ours slower per step). 1 torch thread each.\n\n"
        "The reference runs before and after ours; its column is the mean (before / after in brackets).\n\n"
        "| model | setting | ours | reference | ratio |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n" + gpu
        + "\nWhere ours spends more, measured here: its noise inputs are drawn from one stream per sample (keyed by the "
        "sample's place in the global batch, so the noise does not depend on the number of processes or a resume; all "
        "samples at once, `t2i.noise`; the \"train noise inputs\" section compares them with the former per-sample generators): "
        + "; ".join(costs) + ". Its DataLoader workers read the next batches in 2 other processes, which on 2 shared "
        "cores take CPU time from the training process.\n"
        + f"\n{load_note(load0)}\n"
        + ("\nNo GPU was available for this run: the PixArt-XL/2 images/s and MFU line is measured only on CUDA.\n" if not gpu else "")
    )
    write_section("train", body)


if __name__ == "__main__":
    main()
