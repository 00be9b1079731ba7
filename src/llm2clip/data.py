"""prepare_data: validate image-caption records and write the canonical webdataset shards.

Canonical layout of a prepared dataset directory:
    train/shard-000000.tar ...            samples: <key>.png|jpg + <key>.json {"key", "captions": {kind: [str]}}
    eval/<benchmark>/shard-000000.tar ...
    <split>/sizes.json                    {shard file name: sample count}
    stats.json, rejects.jsonl, manifest.json (written last)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from llm2clip import artifacts, storage, synthetic

storage.register_webdataset_schemes()

CAPTION_KINDS = ("raw", "short", "long")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# Which captions each eval set is scored on, and how many each image must have.
BENCHMARKS = {"synthetic_short": ("short", 2), "synthetic_long": ("long", 1)}
SOURCE_FORMATS = ("canonical", "img2dataset", "table")
# published eval formats -> (caption kind scored, minimum captions per image)
EVAL_FORMATS = {"karpathy": ("short", 1), "docci": ("long", 1), "urban1k": ("long", 1), "sharegpt4v": ("long", 1)}


@dataclass(frozen=True)
class PrepareDataConfig:
    """Where records come from and how the canonical shards are cut."""

    source: str = "synthetic"  # "synthetic", or a local directory / s3:// prefix in the canonical layout
    num_train: int = 1000
    num_eval: int = 200  # images per eval set
    image_size: int = 64
    train_group_size: int = 2  # synthetic: scenes sharing the same objects (hard negatives)
    eval_group_size: int = 4
    shard_size: int = 250
    min_side: int = 8
    max_side: int = 8192
    max_pixels: int = 64_000_000
    seed: int = 0
    # Real sources (see llm2clip.formats): the layout, the images root of a table, the field of each caption kind
    # ("txt", "json.caption", a table column...), and eval sets as "name=format:uri[:images]".
    source_format: str = "canonical"
    images: str = ""
    raw_field: str = ""
    short_field: str = ""
    long_field: str = ""
    eval_sources: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, options: dict, **fields) -> PrepareDataConfig:
        """Build from a pipeline's `source_options` dict (JSON: lists become tuples); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"source_options: unknown keys {unknown} (known: {sorted(known)})")
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        return cls(**{**options, **fields})

    def __post_init__(self) -> None:
        check = artifacts.check
        check(self.source_format in SOURCE_FORMATS, "source_format", self.source_format, f"one of {SOURCE_FORMATS}")
        check(
            self.source_format != "table" or bool(self.images),
            "images",
            self.images,
            "a caption table needs the images root (directory or s3:// prefix)",
        )
        for spec in self.eval_sources:
            name, _, rest = spec.partition("=")
            fmt = rest.split(":", 1)[0]
            check(
                bool(name) and fmt in EVAL_FORMATS and ":" in rest,
                "eval_sources",
                spec,
                f"expected NAME=FORMAT:URI[:IMAGES] with FORMAT in {list(EVAL_FORMATS)}",
            )
        check(
            self.source == "synthetic" or storage.is_remote(self.source) or Path(self.source).exists(),
            "source",
            self.source,
            "must be 'synthetic', an s3:// URI or an existing local directory / caption table",
        )
        check(self.num_train >= 2, "num_train", self.num_train, "needs at least 2 images")
        check(self.num_eval >= 2, "num_eval", self.num_eval, "needs at least 2 images")
        check(16 <= self.image_size <= 1024, "image_size", self.image_size, "must be in [16, 1024]")
        check(self.train_group_size >= 1, "train_group_size", self.train_group_size, "must be >= 1")
        check(self.eval_group_size >= 1, "eval_group_size", self.eval_group_size, "must be >= 1")
        check(self.shard_size >= 1, "shard_size", self.shard_size, "must be >= 1")
        check(1 <= self.min_side <= self.max_side, "min_side", self.min_side, "must be in [1, max_side]")


def caption_list(meta: dict) -> list[tuple[str, str]]:
    """Every caption of a record as (kind, text), in canonical order; cache rows follow this order."""
    caps = meta["captions"]
    return [(kind, text) for kind in CAPTION_KINDS for text in caps.get(kind, [])]


def _decode_text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def validate(record: dict, cfg: PrepareDataConfig, seen: set[str], need: tuple[str, int] | None) -> str | None:
    """Return why the record must be dropped, or None; normalises its captions in place."""
    key = record.get("__key__")
    if not key:
        return "missing field: __key__"
    if key in seen:
        return f"duplicate key {key!r}"
    if "__error__" in record:
        return record["__error__"]
    meta = record.get("json")
    if isinstance(meta, bytes | str):
        try:
            meta = json.loads(meta)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"json: not valid UTF-8 JSON ({e.__class__.__name__})"
    if not isinstance(meta, dict) or not isinstance(meta.get("captions"), dict):
        return "missing field: json.captions"
    clean: dict[str, list[str]] = {}
    for kind, texts in meta["captions"].items():
        if kind not in CAPTION_KINDS:
            return f"json.captions.{kind}: unknown caption kind (expected one of {CAPTION_KINDS})"
        texts = texts if isinstance(texts, list) else [texts]
        for i, t in enumerate(texts):
            text = _decode_text(t)
            if text is None:
                return f"json.captions.{kind}[{i}]: not UTF-8 text"
            if not text.strip():
                return f"json.captions.{kind}[{i}]: empty caption"
            clean.setdefault(kind, []).append(text.strip())
    if not clean:
        return "json.captions: no caption"
    if need is not None and len(clean.get(need[0], [])) < need[1]:
        return f"json.captions.{need[0]}: this benchmark needs at least {need[1]}"
    ext = next((e for e in IMAGE_EXTS if e in record), None)
    if ext is None:
        return f"missing field: image (one of {IMAGE_EXTS})"
    try:
        with Image.open(io.BytesIO(record[ext])) as img:
            w, h = img.size
            if min(w, h) < cfg.min_side or max(w, h) > cfg.max_side or w * h > cfg.max_pixels:
                return f"{ext}: absurd image size {w}x{h}"
            img.load()  # full decode: catches truncated files that open() accepts
            if img.mode not in ("RGB", "RGBA", "L", "P", "LA"):
                return f"{ext}: unsupported image mode {img.mode}"
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"{ext}: undecodable image ({e.__class__.__name__}: {e})"
    image = record[ext]
    record.clear()
    record.update({"__key__": key, ext: image, "json": {**meta, "key": key, "captions": clean}})
    return None


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


def _eval_source(spec: str) -> tuple[str, Iterable[dict], tuple[str, int]]:
    from llm2clip import formats

    name, _, rest = spec.partition("=")
    fmt, _, location = rest.partition(":")
    if location.startswith(("s3:", "minio:")):  # keep the scheme's colon: s3://b/x.json[:s3://b/images]
        scheme, _, tail = location.partition("://")
        uri, _, images = tail.partition(":")
        uri = f"{scheme}://{uri}"
    else:
        uri, _, images = location.partition(":")
    if fmt == "urban1k":  # a directory, not a file: image/ and caption/ below it
        return name, formats.urban1k_records(uri, images), EVAL_FORMATS[fmt]
    readers = {
        "karpathy": formats.karpathy_records,
        "docci": formats.docci_records,
        "sharegpt4v": formats.sharegpt4v_records,
    }
    return name, readers[fmt](uri, images or storage.join(uri.rsplit("/", 1)[0], "images")), EVAL_FORMATS[fmt]


def _source_records(cfg: PrepareDataConfig) -> tuple[dict[str, Iterable[dict]], dict[str, tuple[str, int]]]:
    """Records per split, and the (caption kind, minimum count) each eval split is scored on."""
    from llm2clip import formats

    if cfg.source != "synthetic" and cfg.source_format != "canonical":
        if cfg.source_format == "img2dataset":
            train = formats.img2dataset_records(cfg.source, cfg.raw_field or "txt", cfg.short_field, cfg.long_field)
        else:
            train = formats.table_records(
                cfg.source, cfg.images, short=cfg.short_field, long=cfg.long_field, raw=cfg.raw_field or "caption"
            )
        evals = [_eval_source(spec) for spec in cfg.eval_sources]
        return {"train": train, **{n: r for n, r, _ in evals}}, {n: need for n, _, need in evals}
    if cfg.source == "synthetic":
        return {
            "train": synthetic.generate("train", cfg.num_train, cfg.train_group_size, 2, cfg.image_size, cfg.seed),
            "synthetic_short": synthetic.generate("short", cfg.num_eval, 1, 2, cfg.image_size, cfg.seed),
            "synthetic_long": synthetic.generate(
                "long", cfg.num_eval, cfg.eval_group_size, 1, cfg.image_size, cfg.seed
            ),
        }, BENCHMARKS
    out = {}
    for split in ["train", *BENCHMARKS]:
        shards = storage.list_files(storage.join(cfg.source, split_path(split)), ".tar")
        out[split] = (s for shard in shards for s in wds.WebDataset(shard, shardshuffle=False, empty_check=False))
    evals = [_eval_source(spec) for spec in cfg.eval_sources]
    out.update({n: r for n, r, _ in evals})
    return out, {**BENCHMARKS, **{n: need for n, _, need in evals}}


def benchmarks(dataset_dir: str) -> dict[str, str]:
    """{eval split: caption kind it is scored on} of a prepared dataset."""
    splits = artifacts.read_manifest(dataset_dir, "prepare_data")["splits"]
    return {name: v["caption_kind"] for name, v in splits.items() if "caption_kind" in v}


def split_path(split: str) -> str:
    return "train" if split == "train" else f"eval/{split}"


def prepare_data(cfg: PrepareDataConfig, out_dir: str) -> dict:
    """Validate every record of the source and write canonical shards, stats and rejects. Returns stats."""
    t0 = time.time()
    rejects: list[dict] = []
    stats: dict[str, dict] = {}
    sources, needs = _source_records(cfg)
    for split, records in sources.items():
        seen: set[str] = set()
        reasons: Counter[str] = Counter()
        need = needs.get(split)

        def kept(records=records, seen=seen, reasons=reasons, need=need, split=split) -> Iterator[dict]:
            for i, rec in enumerate(records):
                why = validate(rec, cfg, seen, need)
                if why is None:
                    seen.add(rec["__key__"])
                    yield rec
                else:
                    reasons[why.split(":")[0]] += 1
                    rejects.append({"split": split, "index": i, "key": rec.get("__key__"), "reason": why})

        sizes = write_split(kept(), storage.join(out_dir, split_path(split)), cfg.shard_size)
        count = sum(sizes.values())
        if count == 0:
            raise ValueError(f"split {split!r} of source {cfg.source!r}: no usable record ({dict(reasons)})")
        stats[split] = {
            "kept": count,
            "rejected": sum(reasons.values()),
            "shards": len(sizes),
            "reject_reasons": dict(reasons),
        }
    with storage.open_write(storage.join(out_dir, "rejects.jsonl")) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rejects).encode())
    storage.write_json(storage.join(out_dir, "stats.json"), stats)
    seconds = time.time() - t0
    splits = {s: {"path": split_path(s), **({"caption_kind": needs[s][0]} if s in needs else {})} for s in stats}
    artifacts.write_manifest(
        out_dir,
        "prepare_data",
        cfg,
        {"source": cfg.source},
        splits=splits,
        stats=stats,
        timings_s={"prepare_data": seconds},
    )
    return {
        "seconds": seconds,
        **{f"{s}_kept": v["kept"] for s, v in stats.items()},
        "rejected": sum(v["rejected"] for v in stats.values()),
    }
