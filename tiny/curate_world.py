"""Test fixtures for `score`/`select`: a world with a quality axis, planted near-duplicates,
captions in several languages, a broken image and a missing source, as caption shards."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from PIL import Image

from shards.writer import ShardWriter
from tiny import world as W
from tiny.clip import world_caption

NON_ENGLISH = {
    "fr": "Un grand cercle rouge à gauche de l'image, sur un fond gris clair. C'est le seul objet de cette illustration simple.",
    "de": "Ein großer roter Kreis links im Bild auf einem hellgrauen Hintergrund. Er ist das einzige Objekt dieser einfachen Illustration.",
    "es": "Un gran círculo rojo a la izquierda de la imagen, sobre un fondo gris claro. Es el único objeto de esta ilustración sencilla.",
    "it": "Un grande cerchio rosso a sinistra dell'immagine, su uno sfondo grigio chiaro. È l'unico oggetto di questa semplice illustrazione.",
}


def _save(img: Image.Image, path: Path, quality: int) -> None:
    img.save(path, format="JPEG", quality=quality)


def plant_duplicates(world: Path, keys: list[str]) -> dict[str, str]:
    """For each key: a resized + re-encoded, a re-encoded and a slightly cropped copy, plus an
    exact byte copy of the first. Returns {copy file stem: original key}."""
    planted = {}
    for key in keys:
        im = Image.open(world / f"{key}.jpg").convert("RGB")
        w, h = im.size
        copies = {
            f"{key}_resized": im.resize((w * 3 // 4, h * 3 // 4), Image.BICUBIC),
            f"{key}_reencoded": im,
            f"{key}_cropped": im.crop((2, 2, w - 2, h - 2)).resize((w, h), Image.BICUBIC),
        }
        for i, (name, img) in enumerate(copies.items()):
            _save(img, world / "dups" / f"{name}.jpg", quality=(80, 70, 85)[i])
            planted[name] = key
    shutil.copyfile(world / f"{keys[0]}.jpg", world / "dups" / f"{keys[0]}_exact.jpg")
    planted[f"{keys[0]}_exact"] = keys[0]
    return planted


def write_caption_shards(world: Path, out: Path, planted: dict[str, str], languages: dict[str, str] | None = None,
                         shard_size: int = 50, keys: list[str] | None = None) -> dict:
    """Caption shards for every image of `world` (truthful world captions), its copies, a broken
    file and a missing one. Returns the ground truth: {key: record} with quality and scene."""
    truth = {}
    writer = ShardWriter(out, rows_per_shard=shard_size)
    for rec, scene in W.read_scenes(world):
        key = rec["key"]
        if keys is not None and key not in keys:
            continue
        caption = world_caption(scene)
        truth[key] = {"scene": scene, "quality": scene.quality, "original": key, "lang": "en"}
        # world images carry an address (caption schema 2); the copies below only a source (schema 1)
        path = str((world / rec["file_name"]).resolve())
        writer.add({"key": key, "source": path, "address": path, "caption": caption})
    for i, (code, text) in enumerate((languages or {}).items()):
        key = f"lang_{code}"
        src = next(iter(truth))
        truth[key] = {**truth[src], "lang": code}  # the same image, re-encoded: a near-duplicate of src
        writer.add({"key": key, "source": str(world / f"{src}.jpg"), "caption": text, "image": _reencode(world / f"{src}.jpg", 60 + i)})
    for stem, original in planted.items():
        truth[stem] = {**truth[original], "original": original}
        writer.add({"key": stem, "source": str(world / "dups" / f"{stem}.jpg"), "caption": world_caption(truth[original]["scene"])})
    (world / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    writer.add({"key": "broken", "source": str(world / "broken.jpg"), "caption": "a broken file"})
    writer.add({"key": "missing", "source": str(world / "gone.jpg"), "caption": "a file that was deleted"})
    writer.close()
    return truth


def _reencode(path: Path, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def distinct_keys(world: Path) -> list[str]:
    """The first image of each (colour, shape): images the tiny CLIP should never merge.
    (Two scenes of one colour and shape, moved or resized, are semantic near-duplicates to a
    CLIP trained on 600 images of 32 px; at its scale they are what dedup should not merge.)"""
    seen, keys = set(), []
    for rec, scene in W.read_scenes(world):
        if (scene.color, scene.shape) not in seen:
            seen.add((scene.color, scene.shape))
            keys.append(rec["key"])
    return keys


def make_world(root: Path, n: int = 80, seed: int = 1, dup_keys: int = 10, low_quality: float = 0.4,
               distinct: bool = False) -> tuple[Path, Path, dict]:
    """(world folder, caption shard dir, truth); `distinct`: only `distinct_keys` are captioned."""
    world = root / "world"
    W.write_sam_folder(world, n=n, seed=seed, image_size=64, split="any", low_quality=low_quality)
    (world / "dups").mkdir()
    keys = distinct_keys(world) if distinct else [r["key"] for r, _ in W.read_scenes(world)]
    planted = plant_duplicates(world, keys[:dup_keys])
    truth = write_caption_shards(world, root / "captions", planted, NON_ENGLISH, keys=keys)
    return world, root / "captions", truth
