"""DiT -> PixArt re-parameterisation: at t = 500, with zero cross-attention, the imported model equals
the DiT's unconditional (null-class) output, for facebookresearch and diffusers DiTs whose null rows
are learned (non-zero), against an independent forward of each; the blocks keep the DiT's eps."""

import math

import pytest
import torch
import torch.nn.functional as F

from shards.errors import UserError
from t2i.import_dit import import_dit

HIDDEN, HEADS, DEPTH, PATCH, LATENT, OUT = 64, 4, 2, 2, 8, 8


def random_official_dit(seed=0, std=0.2):
    """A random facebookresearch/DiT state dict (learned sigma, 10 classes + a learned null row)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
    h = HIDDEN
    sd = {
        "x_embedder.proj.weight": r(h, 4, PATCH, PATCH), "x_embedder.proj.bias": r(h),
        "t_embedder.mlp.0.weight": r(h, 256), "t_embedder.mlp.0.bias": r(h),
        "t_embedder.mlp.2.weight": r(h, h), "t_embedder.mlp.2.bias": r(h),
        "y_embedder.embedding_table.weight": r(11, h),
        "final_layer.linear.weight": r(PATCH * PATCH * OUT, h), "final_layer.linear.bias": r(PATCH * PATCH * OUT),
        "final_layer.adaLN_modulation.1.weight": r(2 * h, h), "final_layer.adaLN_modulation.1.bias": r(2 * h),
    }
    pe = get_2d_sincos_pos_embed(h, LATENT // PATCH, base_size=LATENT // PATCH, output_type="pt")  # official: no rescaling
    sd["pos_embed"] = torch.as_tensor(pe).float()[None]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({
            b + "attn.qkv.weight": r(3 * h, h), b + "attn.qkv.bias": r(3 * h),
            b + "attn.proj.weight": r(h, h), b + "attn.proj.bias": r(h),
            b + "mlp.fc1.weight": r(4 * h, h), b + "mlp.fc1.bias": r(4 * h),
            b + "mlp.fc2.weight": r(h, 4 * h), b + "mlp.fc2.bias": r(h),
            b + "adaLN_modulation.1.weight": r(6 * h, h), b + "adaLN_modulation.1.bias": r(6 * h),
        })
    return sd


def official_dit_forward(sd, x, t, y=None):
    """facebookresearch/DiT's forward, written out from its models.py: c = t_emb + y_emb, the class
    `y` (default: the null class, the table's last row, as DiT's LabelEmbedder appends it)."""
    h, p = HIDDEN, PATCH
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1).to(x.dtype)
    c = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])), sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    table = sd["y_embedder.embedding_table.weight"]
    c = c + table[torch.full((x.shape[0],), table.shape[0] - 1) if y is None else y]
    z = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    mod = lambda v, sh, sc: v * (1 + sc[:, None]) + sh[:, None]  # noqa: E731
    ln = lambda v: F.layer_norm(v, (h,), eps=1e-6)  # noqa: E731
    B, N, _ = z.shape
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sm, cm, gm, sp, cp, gp = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"]).chunk(6, 1)
        y = mod(ln(z), sm, cm)
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(B, N, 3, HEADS, h // HEADS).permute(2, 0, 3, 1, 4)
        a = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * (h // HEADS) ** -0.5, -1) @ qkv[2]
        z = z + gm[:, None] * F.linear(a.transpose(1, 2).reshape(B, N, h), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        y = mod(ln(z), sp, cp)
        y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh"), sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        z = z + gp[:, None] * y
    sh, sc = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, 1)
    z = F.linear(mod(ln(z), sh, sc), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    g = LATENT // p
    z = z.reshape(B, g, g, p, p, OUT)
    return torch.einsum("nhwpqc->nchpwq", z).reshape(B, OUT, g * p, g * p)


def pixart_forward(model, x, t, seed=1):
    g = torch.Generator().manual_seed(seed)
    captions = torch.randn(x.shape[0], 7, model.config.caption_channels, generator=g).to(x.dtype)
    return model(x, encoder_hidden_states=captions, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


@torch.no_grad()
def test_import_official_dit_is_exact_at_t500(tmp_path):
    sd = random_official_dit(std=0.1)  # outputs of size ~0.6, as a trained DiT's
    path = tmp_path / "DiT-tiny.pt"
    torch.save(sd, path)
    assert sd["y_embedder.embedding_table.weight"][10].abs().min() > 0  # a learned, non-zero null row
    model, info = import_dit(path, caption_channels=16, num_heads=HEADS)
    assert info["dropped"] == ["y_embedder.embedding_table.weight"] and info["null_class"] == 10 and info["norm_eps"] == 1e-6
    assert info["pos_embed_max_abs_diff"] < 1e-6
    x = torch.randn(3, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(2))
    t = torch.full((3,), 500)
    ref = official_dit_forward(sd, x, t)
    out = pixart_forward(model, x, t)
    assert ref.abs().mean() > 0.3  # the comparison is not between two near-zero tensors
    assert (out - ref).abs().max() < 1e-5, (out - ref).abs().max()
    # the null class matters: a class's output is another function, which the import does not give
    assert (out - official_dit_forward(sd, x, t, torch.tensor([1, 2, 3]))).abs().max() > 1e-2
    # away from t = 500 the adaLN tables no longer absorb the shared MLP: the models differ
    t100 = torch.full((3,), 100)
    assert (pixart_forward(model, x, t100) - official_dit_forward(sd, x, t100)).abs().max() > 1e-2


@torch.no_grad()
def test_import_diffusers_dit_is_exact_at_t500(tmp_path):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HIDDEN // HEADS, in_channels=4, out_channels=OUT,
                                num_layers=DEPTH, sample_size=LATENT, patch_size=PATCH, num_embeds_ada_norm=10, norm_eps=1e-6)
    for p in dit.parameters():
        p.normal_(0, 0.1)  # every block's class table random, its null row (10) included; outputs of size ~0.6
    dit.eval()  # no random label dropout in its forward
    assert dit.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[10].abs().min() > 0
    dit.save_pretrained(tmp_path / "dit")
    model, info = import_dit(tmp_path / "dit", caption_channels=16)
    assert info["heads"] == HEADS and info["dropped"] and info["null_class"] == 10
    x = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(3))
    t = torch.full((2,), 500)
    null = torch.full((2,), 10)
    ref = dit(x, timestep=t, class_labels=null).sample  # the DiT's unconditional output, its own forward
    out = pixart_forward(model, x, t)
    assert ref.abs().mean() > 0.3
    assert (out - ref).abs().max() < 1e-5, (out - ref).abs().max()
    assert (out - dit(x, timestep=t, class_labels=torch.tensor([1, 2])).sample).abs().max() > 1e-2
    # the CLI's import: the same model, saved with the DiT's eps
    from typer.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.app, ["import-dit", str(tmp_path / "dit"), "--out", str(tmp_path / "pix"), "--caption-channels", "16"])
    assert r.exit_code == 0 and "null class 10 folded in" in r.output and "eps" not in r.output, r.output
    from diffusers import PixArtTransformer2DModel

    saved = PixArtTransformer2DModel.from_pretrained(tmp_path / "pix")
    assert (pixart_forward(saved, x, t) - ref).abs().max() < 1e-5


@torch.no_grad()
def test_import_of_a_diffusers_dit_with_another_mlp_eps_says_so(tmp_path):
    """diffusers' DiT default: 1e-6 before attention (hard-coded), norm_eps 1e-5 before the MLP; PixArt
    has one eps for both, so the import keeps 1e-6 and its line names the difference (a small residual)."""
    from diffusers import DiTTransformer2DModel
    from typer.testing import CliRunner

    import cli

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HIDDEN // HEADS, in_channels=4, out_channels=OUT,
                                num_layers=DEPTH, sample_size=LATENT, patch_size=PATCH, num_embeds_ada_norm=10).eval()
    for p in dit.parameters():
        p.normal_(0, 0.1)
    dit.save_pretrained(tmp_path / "dit")
    r = CliRunner().invoke(cli.app, ["import-dit", str(tmp_path / "dit"), "--out", str(tmp_path / "pix"), "--caption-channels", "16"])
    assert r.exit_code == 0 and "the DiT's MLP LayerNorm eps is 1e-05" in r.output, r.output
    model, info = import_dit(tmp_path / "dit", caption_channels=16)
    x, t = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(3)), torch.full((2,), 500)
    ref = dit(x, timestep=t, class_labels=torch.full((2,), 10)).sample
    assert info["norm_eps"] == 1e-5 and (pixart_forward(model, x, t) - ref).abs().max() / ref.abs().max() < 1e-3


def test_import_rejects_non_dit_checkpoint(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"foo": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="not a facebookresearch/DiT checkpoint"):
        import_dit(path)
    with pytest.raises(UserError, match="does not exist"):
        import_dit(tmp_path / "missing.pt")
