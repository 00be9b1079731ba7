"""Readers for real input layouts, each yielding raw records for prepare_data's validation:
{"__key__", <image ext>: bytes, "json": {"captions": {kind: [text]}}} or, when the record cannot be read,
{"__key__", "__error__": reason} so that it is counted and written to the rejects file, never silently lost.

Train sources: img2dataset webdataset tars (jpg/txt/json; which fields hold which caption kind is configurable,
so DreamLIP-style recaptioned shards work) and caption tables (CSV or JSONL; Parquet when pyarrow is installed)
with image paths relative to an images root (local directory or s3:// prefix).
Evaluation sets: Karpathy-split JSON (Flickr30k / COCO, five captions per image), DOCCI jsonlines, Urban-1K
(image/ + caption/ folders) and ShareGPT4V JSON (one long caption per image).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

import webdataset as wds

from llm2clip import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _field(sample: dict, spec: str) -> list[str]:
    """A caption field of a webdataset sample: "txt" (a file), or "json.key" / "json.a.b" (a JSON field)."""
    if not spec:
        return []
    ext, _, path = spec.partition(".")
    value = sample.get(ext)
    if value is None:
        return []
    if not path:
        return [value.decode("utf-8", errors="strict") if isinstance(value, bytes) else value]
    obj = json.loads(value) if isinstance(value, bytes | str) else value
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    if obj is None:
        return []
    return obj if isinstance(obj, list) else [obj]


def img2dataset_records(uri: str, raw: str = "txt", short: str = "", long: str = "") -> Iterator[dict]:
    """Samples of img2dataset tars under `uri`; `raw`, `short`, `long` name the field of each caption kind."""
    shards = storage.list_files(uri, ".tar", recursive=True)
    if not shards:
        raise FileNotFoundError(f"no .tar shards under {uri}")
    for shard in shards:
        for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False):
            key = sample["__key__"]
            try:
                captions = {k: _field(sample, spec) for k, spec in (("raw", raw), ("short", short), ("long", long))}
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield {"__key__": key, "__error__": f"caption field: unreadable ({e.__class__.__name__})"}
                continue
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            record = {"__key__": key, "json": {"captions": {k: v for k, v in captions.items() if v}}}
            if ext:
                record[ext] = sample[ext]
            yield record


def _image_record(key: str, image_uri: str, captions: dict[str, list[str]]) -> dict:
    try:
        image = storage.read_bytes(image_uri)
    except (FileNotFoundError, IsADirectoryError):
        return {"__key__": key, "__error__": f"image file not found: {image_uri}"}
    ext = image_uri.rsplit(".", 1)[-1].lower()
    ext = ext if ext in IMAGE_EXTS else "jpg"
    return {"__key__": key, ext: image, "json": {"captions": captions}}


def _rows(uri: str) -> Iterator[dict]:
    raw = storage.read_bytes(uri)
    if uri.endswith(".csv"):
        yield from csv.DictReader(io.StringIO(raw.decode("utf-8")))
    elif uri.endswith((".jsonl", ".jsonlines")):
        for line in raw.decode("utf-8").splitlines():
            if line.strip():
                yield json.loads(line)
    elif uri.endswith(".parquet"):
        import pyarrow.parquet as pq  # optional: only for Parquet tables

        yield from pq.read_table(io.BytesIO(raw)).to_pylist()
    else:
        raise ValueError(f"caption table {uri}: expected .csv, .jsonl or .parquet")


def table_records(uri: str, images: str, image_column: str = "image", short: str = "", long: str = "",
                  raw: str = "caption", key_column: str = "") -> Iterator[dict]:  # fmt: skip
    """Rows of a caption table; image paths are relative to `images` (a directory or s3:// prefix)."""
    for i, row in enumerate(_rows(uri)):
        key = str(row.get(key_column) or f"row{i:08d}") if key_column else f"row{i:08d}"
        path = row.get(image_column)
        if not path:
            yield {"__key__": key, "__error__": f"missing field: {image_column}"}
            continue
        caps = {
            k: [row[c]] for k, c in (("raw", raw), ("short", short), ("long", long)) if c and row.get(c) is not None
        }
        yield _image_record(key, storage.join(images, str(path)), caps)


def karpathy_records(uri: str, images: str, split: str = "test") -> Iterator[dict]:
    """Karpathy-split JSON (Flickr30k, COCO): {"images": [{"filename", "filepath"?, "split", "sentences"}]}."""
    for img in storage.read_json(uri)["images"]:
        if img.get("split") != split:
            continue
        rel = "/".join(p for p in (img.get("filepath"), img["filename"]) if p)
        caps = [s["raw"] if isinstance(s, dict) else s for s in img.get("sentences", [])]
        key = str(img.get("cocoid") or img.get("imgid") or img["filename"].rsplit(".", 1)[0])
        yield _image_record(key, storage.join(images, rel), {"short": caps})


def docci_records(uri: str, images: str, split: str = "test") -> Iterator[dict]:
    """DOCCI jsonlines: {"example_id", "split", "image_file", "description"} -> one long caption per image."""
    for line in storage.read_bytes(uri).decode("utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("split") != split:
            continue
        key = str(row.get("example_id") or row["image_file"].rsplit(".", 1)[0])
        yield _image_record(key, storage.join(images, row["image_file"]), {"long": [row.get("description", "")]})


def urban1k_records(uri: str, images: str = "") -> Iterator[dict]:
    """Urban-1K: <root>/image/<name>.jpg with <root>/caption/<name>.txt holding its long caption.
    `uri` is the root; `images` overrides where the images are (default <root>/image)."""
    image_root = images or storage.join(uri, "image")
    for caption_file in storage.list_files(storage.join(uri, "caption"), ".txt"):
        stem = caption_file.rsplit("/", 1)[-1].removesuffix(".txt")
        try:
            text = storage.read_bytes(caption_file).decode("utf-8")
        except UnicodeDecodeError:
            yield {"__key__": stem, "__error__": f"{caption_file}: not UTF-8 text"}
            continue
        yield _image_record(stem, storage.join(image_root, f"{stem}.jpg"), {"long": [text.strip()]})


def sharegpt4v_records(uri: str, images: str) -> Iterator[dict]:
    """ShareGPT4V JSON: [{"id", "image": relative path, "conversations": [human prompt, gpt caption]}]."""
    for item in storage.read_json(uri):
        answers = [c.get("value", "") for c in item.get("conversations", []) if c.get("from") == "gpt"]
        key = str(item.get("id") or item["image"].rsplit(".", 1)[0]).replace("/", "_")
        yield _image_record(key, storage.join(images, item["image"]), {"long": answers[:1]})
