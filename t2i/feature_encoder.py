"""The features job's per-batch function: decoded images grouped into batches of one size,
encoded (VAE posterior mean + std, T5 features of each caption field, and with a `teacher` its
patch tokens of the same pixels: t2i.teacher) and written as feature rows. Every engine (this
process, torchrun ranks, Ray actors) encodes through `encode_rows`."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Iterable

import torch

from shards import fs as shard_fs
from shards.prefetch import prefetch
from shards.writer import ShardWriter
from t2i.caption_fields import text_columns
from t2i.encoders import compile_text_encoder, compile_vae_encoder, encode_text, load_text_encoder, load_vae, tokenize
from t2i.text_codec import IDS, encode, is_compact

if TYPE_CHECKING:
    from t2i.feature_images import RowImages
    from t2i.feature_config import FeatureConfig


def encode_rows(rows: Iterable[dict[str, Any]], images: "RowImages", encoder: "FeatureEncoder") -> int:
    """The features of `rows` (caption rows): read and decoded ahead by threads, encoded in
    batches of one size, written as `encoder`'s shards; unreadable images recorded as failures.
    Returns the number of rows encoded; the last shard is flushed."""
    cfg = encoder.cfg
    workers = cfg.workers or min(8, os.cpu_count() or 1)
    new = 0
    for row, pixels, error in prefetch(images, map(images.locate, rows), workers, max(2 * cfg.batch_size, 4 * workers), "decode"):
        if error is not None:
            encoder.record_failure(row["key"], error)
        else:
            new += encoder.add(row, pixels)
    return new + encoder.close()


class FeatureEncoder:
    """Groups decoded images by size into batches, encodes them (VAE + T5, and the teacher when
    there is one; models loaded on the first batch: a fully cached run never loads them) and
    writes feature rows to `writer`'s shards. Unreadable images go to `failures-<writer id>.json`,
    rewritten whole at every shard commit and at the end."""

    def __init__(self, writer: ShardWriter, cfg: "FeatureConfig", device: str) -> None:
        self.writer, self.cfg, self.device = writer, cfg, device
        self.pending: dict[tuple[int, int], list] = {}
        self.failures: dict[str, str] = {}
        self.models = None
        self.teacher = None  # t2i.teacher.Teacher, with the other models when cfg.teacher is set
        self.compute_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def add(self, row: dict[str, Any], pixels: torch.Tensor) -> int:
        """Queue one image; returns how many rows were encoded (a full batch of its size, or 0)."""
        group = self.pending.setdefault(tuple(pixels.shape[1:]), [])
        group.append((row, pixels))
        if len(group) < self.cfg.batch_size:
            return 0
        self.pending.pop(tuple(pixels.shape[1:]))
        return self._encode(group)

    def record_failure(self, key: str, error: str) -> None:
        """Note an image that could not be read or decoded (written with the next shard)."""
        self.failures[key] = error

    def close(self) -> int:
        """Encode what is left, flush the last shard, write the failures; rows encoded here."""
        n = sum(self._encode(group) for group in self.pending.values())
        self.pending = {}
        self.writer.flush()
        self._write_failures()
        return n

    def _write_failures(self) -> None:
        if self.failures:
            path = shard_fs.join(self.writer.out_dir, f"failures-{self.writer.writer_id}.json")
            shard_fs.write_text(path, json.dumps(self.failures, indent=0))

    @torch.no_grad()
    def _encode(self, group: list) -> int:
        if self.models is None:
            self._load_models()
        x = torch.stack([t for _, t in group]).to(self.device, self.models[0].dtype)
        mean, std = self._encode_latents(x)
        texts, channels = self._encode_texts([r for r, _ in group])
        patches = self._encode_teacher(x)
        for i, (r, img) in enumerate(group):
            before = len(self.writer.written)
            self.writer.add({
                "key": r["key"], "height": img.shape[1], "width": img.shape[2],
                "latent_shape": list(mean.shape[1:]), "latent_mean": _raw(mean[i]), "latent_std": _raw(std[i]),
                "text_channels": channels, "text_dtype": self.cfg.text_dtype, "latent_dtype": self.cfg.latent_dtype,
                **texts[i], **patches[i],
            })  # fmt: skip
            if len(self.writer.written) > before:  # a shard was committed: its failures go with it
                self._write_failures()
        return len(group)

    def _load_models(self) -> None:
        self.use_models(load_vae(self.cfg.vae, self.device, self.compute_dtype),
                        *load_text_encoder(self.cfg.text_encoder, self.device, self.compute_dtype,
                                           weights=self.cfg.text_dtype != IDS))  # ids: the tokenizer alone  # fmt: skip
        if self.cfg.teacher:
            from t2i.teacher import Teacher

            self.teacher = Teacher.load(self.cfg.teacher, self.device, self.compute_dtype)

    def use_models(self, vae, tokenizer, text_encoder) -> None:
        """Encode with these frozen models (on this encoder's device, in its compute dtype; the
        text encoder None for text_dtype ids), set up as the config asks: the VAE in channels_last
        memory format (`channels_last`), its encoder compiled (`compile_vae`), the T5 encoder's
        blocks compiled in place (`compile_text`)."""
        if self.cfg.channels_last:
            vae = vae.to(memory_format=torch.channels_last)
        if self.cfg.compile_vae:
            compile_vae_encoder(vae)
        if self.cfg.compile_text and text_encoder is not None:
            compile_text_encoder(text_encoder)
        self.models = (vae, tokenizer, text_encoder)

    def _encode_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and std of the pixels `x` (on the device), in latent_dtype, on
        the CPU, in NCHW order (also when the VAE runs channels_last)."""
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        post = self.models[0].encode(x).latent_dist
        dtype, nchw = getattr(torch, self.cfg.latent_dtype), torch.contiguous_format
        return post.mean.to(dtype, memory_format=nchw).cpu(), post.std.to(dtype, memory_format=nchw).cpu()

    def _encode_teacher(self, x: torch.Tensor) -> list[dict[str, Any]]:
        """Each image's teacher columns (t2i.features.TEACHER_COLUMNS; none without a teacher):
        the patch tokens of the pixels the VAE encoded, in teacher_dtype."""
        if self.teacher is None:
            return [{} for _ in x]
        tokens, (rows, cols) = self.teacher.encode(x)
        tokens = tokens.to(getattr(torch, self.cfg.teacher_dtype)).cpu()
        return [{"teacher_emb": _raw(t), "teacher_shape": [rows, cols, t.shape[-1]], "teacher_dtype": self.cfg.teacher_dtype}
                for t in tokens]

    def _encode_texts(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """Each caption field's T5 features (one batch per field, of the rows that have it) as
        the feature-row columns of each row (null where a row lacks the field); text channels."""
        _, tok, enc = self.models
        cols: list[dict[str, Any]] = [{} for _ in rows]
        channels = 0
        for field in self.cfg.caption_fields:
            names = text_columns(field)
            has = [i for i, r in enumerate(rows) if r.get(field)]
            for c in cols:
                c.update({names.text: None, names.emb: None, names.len: None})
            if not has:
                continue
            emb, mask, scales = self._store_text(tok, enc, [rows[i][field] for i in has])
            lens, channels = mask.sum(1).cpu(), emb.shape[-1]
            for j, i in enumerate(has):
                n = int(lens[j])
                cols[i].update({names.text: rows[i][field], names.emb: _raw(emb[j, :n]), names.len: n})
                if scales is not None:
                    cols[i][names.scale] = _raw(scales[j, :n])
        return cols, channels

    def _store_text(self, tok, enc, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(T5 features as stored, on the CPU, the attention mask, the scales or None): in
        text_dtype, or compact (int8, fp8: byte codes and a float32 scale per token, quantised on
        the encoder's device; t2i.text_codec), or for ids the token ids (int32, one "channel")."""
        if self.cfg.text_dtype == IDS:  # encoded on demand by the training step (t2i.text_ondemand)
            ids, mask = tokenize(tok, captions, self.cfg.max_tokens)
            return ids.to(torch.int32)[..., None], mask, None
        emb, mask = encode_text(tok, enc, captions, self.cfg.max_tokens)
        if not is_compact(self.cfg.text_dtype):
            return emb.to(getattr(torch, self.cfg.text_dtype)).cpu(), mask, None
        codes, scales = encode(emb, self.cfg.text_dtype)
        return codes.cpu(), mask, scales.cpu()


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes in its own dtype (bfloat16 too, which numpy lacks)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()
