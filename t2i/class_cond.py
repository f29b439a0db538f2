"""A class-conditional DiT stage: stage 1 of the PixArt-alpha recipe for domains that have no
ImageNet DiT to start from (medical, satellite, product photos), trained by the same trainer.

    [[stages]]
    name = "dit"
    kind = "class-cond"          # default: "text-to-image" (PixArt)
    class_column = "shape"       # a column of the caption shards: each image's label
    preset = "DiT-tiny/2"        # DiT-<size> is the backbone of PixArt-<size> (PixArt-* names work too)
    [[stages]]
    name = "align"
    init = "previous"            # the DiT above, imported by re-parameterisation (t2i.import_dit)

What differs from the text-to-image stage, and only that, is its conditioning, `ClassConditioning`
(a t2i.conditioning.Conditioning; features, loader, objective, AdamW + EMA, checkpoints, exact
resume, recovery, ledger and trackers are t2i.train's):
- the model is `DiTWithNull` (t2i.dit): diffusers' `DiTTransformer2DModel`, one class per distinct label
  value plus the null class (id = number of classes) for classifier-free guidance. The null
  class embeds to zero, so the DiT's unconditional output is its function without a class term:
  exactly what import-dit carries over into PixArt (exact at t = 500);
- a labels step (`write_labels`, run with the features whenever the stage is given its caption
  shards) writes every row's (key, class id) from the shards' `class_column` into
  `<stage>/labels.parquet` and `classes.json`; training looks each sample's class up by key
  (`ClassLabels`: 12 bytes per image in memory) and drops it to the null class with probability
  `caption_dropout` (DiT's 10% label dropout). A null label trains the null class;
- each checkpoint's `transformer/` is a complete diffusers `DiTTransformer2DModel` directory (EMA
  weights), and `classes.json` (also in the stage directory) lists the label value of each class
  id. So `t2i-data import-dit <stage dir | checkpoint>` and `init = "dit:<stage dir>"` read it as
  any diffusers DiT, and `init = "previous"` after a class-cond stage goes through that import.

The feature rows still carry text features (features computes them for every stage; rows need a
caption: without captions, put the label text in `caption`). They are read and not used here.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from shards import UserError
from shards import fs as shard_fs
from t2i.conditioning import Conditioning
from t2i.dit import DiTWithNull, build_dit, load_dit
from t2i.dit_source import dit_directory
from t2i.objective import check_init_objective
from t2i.models import LATENT_CHANNELS

CLASSES_JSON = "classes.json"
LABELS_FILE = "labels.parquet"  # key -> class id of every caption row: what training looks labels up in
LABELS_META = "t2i_data.classes"
INITS = ("scratch", "dit", "checkpoint")
LABEL_TYPES = (str, int, bool)


def check_config(cfg) -> None:
    """The class-cond settings of a TrainConfig, checked before any work."""
    if not cfg.class_column:
        raise UserError("a class-cond stage needs class_column: set it to the caption-shard column holding each image's label")
    if cfg.buckets:
        raise UserError("a class-cond stage trains square latents (diffusers' DiT): set buckets = false")
    if cfg.init.partition(":")[0] not in INITS and cfg.init != "previous":
        raise UserError(f"init {cfg.init!r} of a class-cond stage is not scratch, dit:PATH or checkpoint:DIR: fix the stage's init")


# ---- labels ------------------------------------------------------------------------------------

def _hash_keys(keys: list[str] | pa.Array) -> np.ndarray:
    """64-bit hashes of string keys (vectorised; stable within a process, which is all we need)."""
    import polars as pl

    arrow = isinstance(keys, (pa.Array, pa.ChunkedArray))
    series = pl.from_arrow(keys) if arrow else pl.Series(values=keys, dtype=pl.String)
    return series.cast(pl.String).hash(seed=0).to_numpy()


@dataclass
class ClassLabels:
    """Every key's class id, as sorted key hashes and ids (12 bytes per image), and the classes."""

    column: str
    classes: list  # class id -> label value
    hashes: np.ndarray  # uint64, sorted
    ids: np.ndarray  # int32, the class id of hashes[i]; -1: no label (the null class)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def lookup(self, keys: list[str]) -> torch.Tensor:
        """Class ids (long) of `keys`; an unlabelled key gets the null class (num_classes)."""
        h = _hash_keys(keys)
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        found = self.hashes[pos] == h
        if not found.all():
            missing = [k for k, f in zip(keys, found) if not f][:3]
            raise UserError(f"feature rows {', '.join(missing)} have no row in the caption shards the labels come from: "
                            "pass the shards the features were computed from")
        ids = self.ids[pos].astype(np.int64)
        ids[ids < 0] = self.num_classes
        return torch.from_numpy(ids)

    def mapping(self) -> dict[str, Any]:
        """What classes.json holds: class id i is classes[i]; null_class is the unconditional id."""
        return {"column": self.column, "classes": self.classes, "null_class": self.num_classes}


def check_label_column(shards_dir, column: str) -> list:
    """The complete caption shards, every one checked to have `column` (footers only: before any work)."""
    from shards.reader import open_shards

    shards = open_shards(shards_dir, "caption")
    for shard in shards:
        if column not in shard.columns:
            raise UserError(f"class_column {column!r} is not a column of {shard.location} (columns: {', '.join(shard.columns)}): "
                            "set class_column to one of them")
    return shards


def _label_batches(shards_dir, column: str) -> Iterator[tuple[pa.Array, pa.Array]]:
    """(keys, label values) of every row of the complete caption shards, streamed by batch."""
    from shards.reader import iter_batches

    for batch in iter_batches(check_label_column(shards_dir, column), ["key", column], batch_size=65536):
        yield batch.column("key"), batch.column(column)


def label_classes(shards_dir, column: str, classes: list | None = None) -> list:
    """The classes of `column` in the caption shards: its sorted distinct values, or `classes`
    when given (a resumed stage keeps its ids: a value outside them is an error)."""
    index = dict.fromkeys(classes or [])
    for _, values in _label_batches(shards_dir, column):
        for v in pc.unique(values.drop_null()).to_pylist():  # a few distinct values per batch
            if not isinstance(v, LABEL_TYPES):
                raise UserError(f"class_column {column!r} holds {type(v).__name__} values: use a column of strings or integers")
            if v not in index and classes is not None:
                raise UserError(f"label {v!r} in {column!r} is not one of the classes this stage started with "
                                f"({len(index)} in its classes.json): train a new stage (fresh --out) for new classes")
            index[v] = None
    if not index:
        raise UserError(f"class_column {column!r} is empty (every value is null): pick the column that holds the labels")
    return list(classes) if classes is not None else sorted(index)


def write_labels(cfg, shards_dir, out: Path, resume: bool = False) -> int:
    """The labels step of a class-cond stage: every caption row's (key, class id) into
    `<out>/labels.parquet` (streamed, written whole or not at all; the classes in its metadata),
    and `<out>/classes.json`. A resumed stage keeps the classes of its classes.json. Returns rows."""
    import pyarrow.parquet as pq

    shards_dir, out, column = shard_fs.as_location(shards_dir), Path(out), cfg.class_column
    saved = out / CLASSES_JSON
    classes = None
    if resume and saved.exists():
        mapping = json.loads(saved.read_text())
        if mapping["column"] != column:
            raise UserError(f"{out} was trained on class_column {mapping['column']!r}, not {column!r}: set it back, or train into a fresh --out")
        classes = mapping["classes"]
    classes = label_classes(shards_dir, column, classes)
    mapping = {"column": column, "classes": classes, "null_class": len(classes)}
    schema = pa.schema([("key", pa.string()), ("class_id", pa.int32())], metadata={LABELS_META: json.dumps(mapping)})
    tmp, rows = out / f".{LABELS_FILE}.tmp", 0
    with pq.ParquetWriter(tmp, schema) as w:
        for keys, values in _label_batches(shards_dir, column):
            found = pc.index_in(values, value_set=pa.array(classes, values.type))  # null for a null label
            w.write_table(pa.table({"key": keys.cast(pa.string()), "class_id": pc.fill_null(found, -1).cast(pa.int32())}, schema=schema))
            rows += len(keys)
    tmp.replace(out / LABELS_FILE)
    shard_fs.write_text(saved, json.dumps(mapping, indent=2))
    return rows


def load_labels(out: Path, column: str) -> ClassLabels:
    """The labels a labels step wrote into `out`, as key hashes and ids."""
    import pyarrow.parquet as pq

    path = Path(out) / LABELS_FILE
    if not path.exists():
        raise UserError(f"no labels in {out}: run the class-cond stage with --shards (its labels come from the caption shards' {column!r} column)")
    table = pq.read_table(path)
    mapping = json.loads(table.schema.metadata[LABELS_META.encode()])
    if mapping["column"] != column:
        raise UserError(f"the labels in {out} come from column {mapping['column']!r}, not {column!r}: rerun the stage with --shards")
    ids = table.column("class_id").to_numpy().astype(np.int32)
    return _sorted_labels(column, mapping["classes"], _hash_keys(table.column("key")), ids)


def _sorted_labels(column: str, classes: list, hashes: np.ndarray, ids: np.ndarray) -> ClassLabels:
    order = np.argsort(hashes)  # equal hashes (a key twice) are checked below whatever their order
    hashes, ids = hashes[order], ids[order]
    dup = hashes[1:] == hashes[:-1]
    if (ids[1:][dup] != ids[:-1][dup]).any():
        raise UserError(f"some keys appear twice in the caption shards with different {column!r} labels: keep one row per key")
    keep = np.concatenate([[True], ~dup])
    return ClassLabels(column, classes, hashes[keep], ids[keep])


# ---- the stage ---------------------------------------------------------------------------------

class ClassConditioning(Conditioning):
    """The conditioning of a class-cond stage: each image's class label, looked up by key, dropped
    to the null class with probability `caption_dropout`; the model is a DiT (t2i.dit), each
    checkpoint a diffusers DiT directory with its classes.json."""

    kind = "class-cond"
    cross_attention = False  # the class enters through adaLN: no cross-attention, no caption projection
    guidance = 4.0  # the sampler's default classifier-free guidance
    handoff = "dit"  # how a later text-to-image stage starts from this one: import-dit (t2i.import_dit)
    check_config = staticmethod(check_config)

    def __init__(self, labels: ClassLabels) -> None:
        self.labels = labels

    @staticmethod
    def check_shards(cfg, shards) -> None:
        """Before the features step: every caption shard has the label column."""
        check_label_column(shard_fs.as_location(shards), cfg.class_column)

    @staticmethod
    def init_from_previous(previous: type[Conditioning]) -> str:
        """How this stage starts from the previous stage's checkpoints (init = "previous"): its
        checkpoint (a DiT, whatever the previous stage was)."""
        return "checkpoint"

    @classmethod
    def open(cls, cfg, out: Path, shards, resume: bool, accel) -> "ClassConditioning":
        """The stage's labels: written from `shards` first when given (the main process runs the
        labels step, the others wait), else the ones an earlier run of this stage wrote."""
        if shards is not None:
            if accel.is_main_process:
                write_labels(cfg, shards, out, resume)
            accel.wait_for_everyone()
        return cls(load_labels(out, cfg.class_column))

    def build_model(self, cfg, latent_size: int, caption_channels: int, learned_sigma: bool = True) -> DiTWithNull:
        """DiTWithNull from the stage's init: scratch, dit:PATH (EMA weights) or checkpoint:DIR
        (the caption width is not used: a DiT has no captions)."""
        kind, _, arg = cfg.init.partition(":")
        if kind == "scratch":
            dit = build_dit(cfg.preset, latent_size, self.labels.num_classes, learned_sigma)
        else:
            check_init_objective(vars(cfg), dit_directory(arg)[0])  # DDPM <-> flow: refused
            dit = load_dit(arg, which="model" if kind == "checkpoint" else "ema")
        n = dit.config.num_embeds_ada_norm
        if n != self.labels.num_classes:
            raise UserError(f"init {cfg.init} has {n} classes, class_column {cfg.class_column!r} has {self.labels.num_classes}: "
                            "start from scratch or from a DiT with the same classes")
        if dit.config.sample_size != latent_size:
            dit.register_to_config(sample_size=latent_size)
        return DiTWithNull(dit)

    def inputs(self, batch) -> dict[str, torch.Tensor]:
        """The model's conditioning inputs for a batch: the class ids of its keys."""
        return {"labels": self.labels.lookup(batch.keys)}

    def checkpoint_extras(self, weights: dict[str, torch.Tensor],
                          ema: dict[str, torch.Tensor]) -> Callable[[Path], None]:
        """What completes a checkpoint being written (`write_checkpoint` with these weights)."""
        return functools.partial(self.write_checkpoint, weights, ema)

    def write_checkpoint(self, weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], ck: Path) -> None:
        """Complete a checkpoint being written: its transformer/ becomes a diffusers DiT directory
        (the EMA weights; buffers from the model), and classes.json goes next to it."""
        from safetensors.torch import save_file

        inner = {k.removeprefix("transformer."): v.detach().contiguous().cpu()
                 for k, v in {**weights, **ema}.items() if k.startswith("transformer.")}
        save_file(inner, Path(ck) / "transformer" / "diffusion_pytorch_model.safetensors")
        (Path(ck) / CLASSES_JSON).write_text(json.dumps(self.labels.mapping(), indent=2))

    @classmethod
    def images(cls, checkpoint: str | Path, prompts: list[str], steps: int = 20, guidance: float | None = None,
               seed: int = 0, vae: str | None = None, text_encoder: str | None = None, which: str = "ema",
               dtype: torch.dtype = torch.float32) -> list:
        """Samples of a class-cond checkpoint, the prompts naming classes (`generate_classes`;
        no text encoder, and the DiT samples in float32)."""
        return generate_classes(checkpoint, prompts, steps, cls.guidance if guidance is None else guidance, seed, vae, which)


# ---- sampling ----------------------------------------------------------------------------------

def class_ids(mapping: dict[str, Any], labels: list, where: str) -> list[int]:
    """Class ids of label values (or their text, as a prompt gives them); None: the null class."""
    by_text = {str(v): i for i, v in enumerate(mapping["classes"])}
    unknown = [v for v in labels if v is not None and str(v) not in by_text]
    if unknown:
        raise UserError(f"{unknown[0]!r} is not a class of {where}: its classes are {', '.join(map(str, mapping['classes']))}")
    return [mapping["null_class"] if v is None else by_text[str(v)] for v in labels]


@torch.no_grad()
def generate_classes(checkpoint: str | Path, labels: list, steps: int = 20, guidance: float = 4.0, seed: int = 0,
                     vae: str | None = None, which: str = "ema", device: str | None = None) -> list:
    """PIL images of the classes `labels` (label values as in classes.json; None: unconditional)
    from a class-cond checkpoint: DPM-Solver++ with classifier-free guidance against the null class.
    (diffusers' DiTPipeline hard-codes ImageNet's null class 1000.)"""
    from t2i.checkpoint import require_checkpoint
    from t2i.encoders import load_vae
    from t2i.objective import objective_of_state

    ck = require_checkpoint(checkpoint)
    state = json.loads((ck / "trainer_state.json").read_text())
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ids = torch.tensor(class_ids(json.loads((ck / CLASSES_JSON).read_text()), list(labels), str(ck)), device=device)
    dit = load_dit(ck, which=which).to(device).eval()
    decoder = load_vae(vae or state["features"]["vae"], device)
    sched = objective_of_state(state).sampler()
    sched.set_timesteps(steps)
    size, null = dit.config.sample_size, torch.full_like(ids, dit.config.num_embeds_ada_norm)
    noise = torch.randn((len(ids), LATENT_CHANNELS, size, size), generator=torch.Generator().manual_seed(seed))
    latents = noise.to(device)
    for t in sched.timesteps:
        out = dit(torch.cat([latents, latents]), timestep=t.to(device).expand(2 * len(ids)), class_labels=torch.cat([ids, null])).sample
        cond, uncond = out[:, :LATENT_CHANNELS].chunk(2)
        latents = sched.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    images = decoder.decode(latents / state["scaling_factor"]).sample
    return _to_pil(images)


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
