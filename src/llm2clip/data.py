"""The canonical dataset layout every stage reads: webdataset shards of image-caption records.

A prepared dataset directory (written by llm2clip.prepare_data):
    train/shard-000000.tar ...            samples: <key>.png|jpg + <key>.json {"key", "captions": {kind: [str]}}
    eval/<benchmark>/shard-000000.tar ...
    <split>/sizes.json                    {shard file name: sample count}
    stats.json, rejects.jsonl, manifest.json (written last)
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image

from llm2clip import artifacts, storage

storage.register_webdataset_schemes()

CAPTION_KINDS = ("raw", "short", "long")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# Which captions each eval set is scored on, and how many each image must have. synthetic_reworded holds the images
# of synthetic_long (same keys, same order, same groups) captioned only in held-out wordings (synthetic.EVAL_WORDING).
BENCHMARKS = {"synthetic_short": ("short", 2), "synthetic_long": ("long", 1), "synthetic_reworded": ("long", 1)}


def caption_list(meta: dict) -> list[tuple[str, str]]:
    """Every caption of a record as (kind, text), in canonical order; cache rows follow this order."""
    caps = meta["captions"]
    return [(kind, text) for kind in CAPTION_KINDS for text in caps.get(kind, [])]


def write_split(records: Iterable[dict], out_dir: str, shard_size: int) -> dict[str, int]:
    """Write records into `out_dir/shard-NNNNNN.tar` files; returns {shard name: count} (also sizes.json)."""
    sizes: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        writer, name = None, None
        for record in records:
            if writer is None or sizes[name] >= shard_size:
                if writer is not None:
                    writer.close()
                    stack.close()  # completes the upload of the finished shard
                name = f"shard-{len(sizes):06d}.tar"
                writer = wds.TarWriter(stack.enter_context(storage.open_write(storage.join(out_dir, name))))
                sizes[name] = 0
            writer.write(record)
            sizes[name] += 1
        if writer is not None:
            writer.close()
    storage.write_json(storage.join(out_dir, "sizes.json"), sizes)
    return sizes


def read_split(split_dir: str) -> Iterator[dict]:
    """Canonical records {key, image: PIL RGB, meta} of a prepared split, in shard order."""
    for shard in storage.listdir(split_dir, ".tar"):
        for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False):
            ext = next(e for e in IMAGE_EXTS if e in sample)
            meta = json.loads(sample["json"])
            image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
            yield {"key": sample["__key__"], "image": image, "meta": meta, "shard": Path(shard).name}


def read_captions(split_dir: str) -> Iterator[tuple[str, str, dict]]:
    """(shard name, key, meta) without decoding images (for caption-only stages)."""
    for shard in storage.listdir(split_dir, ".tar"):
        yield from read_captions_of_shard(shard)


def read_captions_of_shard(shard: str) -> Iterator[tuple[str, str, dict]]:
    for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False):
        yield Path(shard).name, sample["__key__"], json.loads(sample["json"])


def benchmarks(dataset_dir: str) -> dict[str, str]:
    """{eval split: caption kind it is scored on} of a prepared dataset."""
    splits = artifacts.read_manifest(dataset_dir, "prepare_data")["splits"]
    return {name: v["caption_kind"] for name, v in splits.items() if "caption_kind" in v}


def split_path(split: str) -> str:
    return "train" if split == "train" else f"eval/{split}"
