"""Stage prepare_data: validate image-caption records and write the canonical webdataset shards (llm2clip.data).

Every record of the source goes through `check_record`; a record that fails is dropped with its reason into
rejects.jsonl and counted in stats.json, never silently lost.
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

import numpy as np
import webdataset as wds
from PIL import ExifTags, Image, ImageCms, ImageOps

from llm2clip import artifacts, storage, synthetic
from llm2clip.data import BENCHMARKS, CAPTION_KINDS, IMAGE_EXTS, split_path, write_split

SOURCE_FORMATS = ("canonical", "img2dataset", "table")
# published eval formats -> (caption kind scored, minimum captions per image)
EVAL_FORMATS = {"karpathy": ("short", 1), "docci": ("long", 1), "urban1k": ("long", 1), "sharegpt4v": ("long", 1)}


@dataclass(frozen=True)
class PrepareDataConfig:
    """Where records come from and how the canonical shards are cut."""

    source: str = dataclasses.field(
        default="synthetic",
        metadata={
            "help": 'where the images and captions come from: "synthetic" (rendered scenes with short and long '
            "captions), or a directory / s3:// prefix of canonical shards (train/, eval/<benchmark>/), img2dataset "
            "tars or a caption table (source_format and the other source options say how to read it)"
        },
    )
    num_train: int = dataclasses.field(default=1000, metadata={"help": "synthetic source: training images"})
    num_eval: int = dataclasses.field(
        default=200,
        metadata={
            "help": "synthetic source: images per eval set (synthetic_short, synthetic_long, synthetic_reworded)"
        },
    )
    image_size: int = dataclasses.field(
        default=64, metadata={"help": "synthetic source: side of the rendered images, in pixels"}
    )
    train_group_size: int = 2  # synthetic: scenes sharing the same objects (hard negatives)
    eval_group_size: int = 4
    shard_size: int = 250
    min_side: int = 8
    max_side: int = 8192
    max_pixels: int = 64_000_000
    seed: int = 0
    # Real sources (see llm2clip.formats): the layout, the images root of a table, the field of each caption kind
    # ("txt", "json.caption", a table column...; raw defaults to "txt" / "caption"), the table's image and key
    # columns (no key column: keys are row numbers), and eval sets as "name=format:uri[:images]".
    source_format: str = "canonical"
    images: str = ""
    raw_field: str = ""
    short_field: str = ""
    long_field: str = ""
    image_column: str = "image"
    key_column: str = ""
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
        real = self.source != "synthetic" and self.source_format != "canonical"
        table = real and self.source_format == "table"
        for name in ("raw_field", "short_field", "long_field"):
            value = getattr(self, name)
            check(real or not value, name, value, "only read from img2dataset and table sources (ignored here)")
        for name in ("images", "key_column"):
            check(table or not getattr(self, name), name, getattr(self, name), "only read from caption tables")
        check(table or self.image_column == "image", "image_column", self.image_column, "only read from tables")
        check(bool(self.image_column), "image_column", self.image_column, "must name the table's image column")
        check(
            not real or bool(self.eval_sources),
            "eval_sources",
            self.eval_sources,
            "an img2dataset or table source needs at least one eval set (NAME=FORMAT:URI[:IMAGES])",
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


# ----------------------------------------------------------------------------------------------- rejects


class Reject(Exception):
    """Why a record is dropped. `reason` is the class counted in stats.json (a fixed vocabulary, listed in the
    README's "Bad input" table); the message says what exactly is wrong and where."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def safe_key(key: object) -> str:
    """A record key normalised for use as a tar member name; absolute paths and `..` are refused.

    Backslashes become `/`, `.` and empty path parts are dropped, and dots in the last part become `_`
    (webdataset splits a member name at the first dot of its base name: "a.b.jpg" would be key "a")."""
    if not isinstance(key, str) or not key.strip():
        raise Reject("missing key", f"no record key ({key!r})")
    path = key.replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":" and path[0].isalpha()):
        raise Reject("unsafe key", f"key {key!r} is an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Reject("unsafe key", f"key {key!r} climbs out of its directory with '..'")
    if not parts or any(ord(c) < 32 for c in path):
        raise Reject("unsafe key", f"key {key!r} is empty or holds control characters")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise Reject("unsafe key", f"key {key!r} is not valid UTF-8") from None
    return "/".join([*parts[:-1], parts[-1].replace(".", "_")])


def clean_caption(value: object, where: str) -> str:
    """The one caption check every reader goes through: text (bytes must be UTF-8), valid UTF-8 (no lone
    surrogates, which JSON escapes and surrogateescape-decoded tables produce), not blank. Returns it stripped.
    Length is never a reason: the tokenizer truncates later. `where` names record, caption kind and field."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Reject(
                "caption not UTF-8", f"{where}: invalid byte 0x{e.object[e.start]:02x} at byte {e.start}"
            ) from None
    if not isinstance(value, str):
        raise Reject("caption not text", f"{where}: a {type(value).__name__}, not a string ({value!r:.40})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        # U+DC80..U+DCFF is also how a table's undecodable byte arrives (surrogateescape): name the byte too
        byte = f", undecodable byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else ""
        raise Reject(
            "caption not UTF-8", f"{where}: lone surrogate U+{code:04X}{byte} at character {e.start}"
        ) from None
    text = value.strip()
    if not text:
        raise Reject("blank caption", f"{where}: empty after stripping whitespace")
    return text


# ----------------------------------------------------------------------------------------------- images
# Image formats we keep byte for byte when the image is already plain sRGB; anything else is stored as PNG of
# its RGB conversion, so every reader of the canonical shards gets the same pixels with a plain convert("RGB").
PASSTHROUGH = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: a phone JPEG with extra frames
SNIFF = {
    b"\x89PNG": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "WEBP",
}
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white (as on a web page), not black


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    # Our max_pixels decides, with a message that names the size; PIL's global bomb check would refuse (or
    # only warn about) the image before its size is known. prepare_data decodes in one thread.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _is_srgb(icc: bytes | None) -> bool:
    if not icc:
        return True
    try:
        return "srgb" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).lower()
    except (ImageCms.PyCMSError, OSError, TypeError):
        return True  # an unreadable profile is ignored, not a reason to drop the image


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image as 8-bit sRGB: EXIF rotation applied, CMYK and other colour spaces through their ICC
    profile where present, 16-bit and 32-bit greyscale scaled (not clipped) to 8 bits, alpha composited on white."""
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        pass  # unreadable EXIF: keep the stored orientation
    icc = img.info.get("icc_profile")
    if img.mode in ("CMYK", "RGB", "LAB") and (img.mode == "CMYK" or not _is_srgb(icc)) and icc:
        with contextlib.suppress(ImageCms.PyCMSError, OSError):
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            img = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    if img.mode == "LAB":
        img = ImageCms.profileToProfile(
            img, ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode == "F":  # float images: [0, 1] when they fit, else 8-bit values
            arr = arr * 255 if arr.max(initial=0) <= 1.0 else arr
        elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:  # 16-bit range: 65535 -> 255
            arr = arr / 257
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(raw: bytes, ext: str, cfg: PrepareDataConfig) -> tuple[str, bytes]:
    """Check and normalise one image: returns (ext, bytes) to store, the original bytes when the image already is
    plain sRGB JPEG/PNG/WebP, else a PNG of its RGB conversion (`to_rgb`). Raises Reject saying what is wrong."""
    if not raw:
        raise Reject("empty file", f"{ext}: empty file")
    with _own_pixel_limit():
        try:
            img = Image.open(io.BytesIO(raw))
        except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            fmt = next((f for magic, f in SNIFF.items() if raw.startswith(magic)), None)
            if fmt is not None:
                raise Reject(
                    "corrupt image",
                    f"{ext}: a {fmt} file whose header cannot be read (truncated or corrupt: {e.__class__.__name__})",
                ) from None
            raise Reject("not an image", f"{ext}: not an image (starts with {repr(raw[:12])[1:]})") from None
        w, h = img.size
        if w * h > cfg.max_pixels:
            raise Reject(
                "decompression bomb", f"{ext}: decompression bomb: {w} x {h} exceeds max_pixels={cfg.max_pixels}"
            )
        if min(w, h) < cfg.min_side:
            raise Reject("image too small", f"{ext}: {w} x {h} is below min_side={cfg.min_side}")
        if max(w, h) > cfg.max_side:
            raise Reject("image too large", f"{ext}: {w} x {h} is above max_side={cfg.max_side}")
        try:
            img.load()  # full decode: catches truncated files that open() accepts
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            if "truncated" in str(e).lower() or isinstance(e, EOFError):
                raise Reject("truncated image", f"{ext}: truncated {img.format} ({e})") from None
            raise Reject("corrupt image", f"{ext}: corrupt {img.format} ({e.__class__.__name__}: {e})") from None
        plain = (
            img.format in PASSTHROUGH
            and img.mode in ("RGB", "L")
            and "transparency" not in img.info
            and img.getexif().get(ExifTags.Base.Orientation, 1) == 1
            and (img.mode == "L" or _is_srgb(img.info.get("icc_profile")))
        )
        if plain:
            return PASSTHROUGH[img.format], raw
        try:
            rgb = to_rgb(img)
        except (ValueError, OSError, ImageCms.PyCMSError) as e:
            raise Reject("unsupported image mode", f"{ext}: no conversion from mode {img.mode} to RGB ({e})") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return "png", buf.getvalue()


# ----------------------------------------------------------------------------------------------- records


def validate(record: dict, cfg: PrepareDataConfig, seen: set[str], need: tuple[str, int] | None) -> str | None:
    """Return why the record must be dropped, or None; normalises it in place (see `check_record`)."""
    try:
        check_record(record, cfg, seen, need)
    except Reject as e:
        return str(e)
    return None


def check_record(record: dict, cfg: PrepareDataConfig, seen: set[str], need: tuple[str, int] | None) -> None:
    """Validate and normalise one raw record in place to {"__key__", <ext>: bytes, "json": meta}; raises Reject.

    Readers may add "__error__" (+ "__reason__") for a record they could not read, and "__fields__" {kind: field
    spec} so caption rejects name the source field (canonical shards: json.captions.<kind>)."""
    key = safe_key(record.get("__key__"))
    if key in seen:
        raise Reject("duplicate key", f"duplicate key {key!r} (the first record with it is kept)")
    if "__error__" in record:
        raise Reject(record.get("__reason__", "unreadable record"), record["__error__"])
    fields = record.get("__fields__") or {}
    meta = record.get("json")
    if isinstance(meta, bytes | str):
        try:
            meta = json.loads(meta)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Reject("bad metadata", f"json: not valid UTF-8 JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("captions"), dict):
        raise Reject("no caption", "missing field: json.captions")
    clean: dict[str, list[str]] = {}
    for kind, texts in meta["captions"].items():
        if kind not in CAPTION_KINDS:
            raise Reject("unknown caption kind", f"json.captions.{kind}: unknown caption kind (one of {CAPTION_KINDS})")
        texts = texts if isinstance(texts, list) else [texts]
        field = fields.get(kind, f"json.captions.{kind}")
        for i, t in enumerate(texts):
            clean.setdefault(kind, []).append(clean_caption(t, f"caption {kind}[{i}] of {key!r} (field {field!r})"))
    if not clean:
        looked = ", ".join(f"{k}={v!r}" for k, v in fields.items()) or "json.captions"
        raise Reject("no caption", f"no caption found (looked up {looked})")
    if need is not None and len(clean.get(need[0], [])) < need[1]:
        raise Reject("too few captions", f"json.captions.{need[0]}: this benchmark needs at least {need[1]}")
    ext = next((e for e in IMAGE_EXTS if e in record), None)
    if ext is None:
        raise Reject("no image", f"missing field: image (one of {IMAGE_EXTS})")
    ext, image = decode_image(record[ext], ext, cfg)
    record.clear()
    record.update({"__key__": key, ext: image, "json": {**meta, "key": key, "captions": clean}})


def parse_eval_source(spec: str) -> tuple[str, str, str, str]:
    """ "NAME=FORMAT:URI[:IMAGES]" -> (name, format, uri, images root); the default images root is "" for
    urban1k (<root>/image) and the folder "images" beside the annotation file for the others."""
    name, _, rest = spec.partition("=")
    fmt, _, location = rest.partition(":")
    if location.startswith(("s3:", "minio:")):  # keep the scheme's colon: s3://b/x.json[:s3://b/images]
        scheme, _, tail = location.partition("://")
        uri, _, images = tail.partition(":")
        uri = f"{scheme}://{uri}"
    else:
        uri, _, images = location.partition(":")
    if not images and fmt != "urban1k":
        images = storage.join(uri.rsplit("/", 1)[0], "images")
    return name, fmt, uri, images


def _eval_source(spec: str) -> tuple[str, Iterable[dict], tuple[str, int]]:
    from llm2clip import formats

    name, fmt, uri, images = parse_eval_source(spec)
    readers = {
        "karpathy": formats.karpathy_records,
        "docci": formats.docci_records,
        "sharegpt4v": formats.sharegpt4v_records,
        "urban1k": formats.urban1k_records,  # a directory, not a file: image/ and caption/ below it
    }
    return name, readers[fmt](uri, images), EVAL_FORMATS[fmt]


def _source_records(cfg: PrepareDataConfig) -> tuple[dict[str, Iterable[dict]], dict[str, tuple[str, int]]]:
    """Records per split, and the (caption kind, minimum count) each eval split is scored on. Real eval sets
    (`eval_sources`) come on top of any train source, the synthetic one included."""
    from llm2clip import formats

    evals = [_eval_source(spec) for spec in cfg.eval_sources]
    eval_records = {n: r for n, r, _ in evals}
    eval_needs = {n: need for n, _, need in evals}
    if cfg.source == "synthetic":
        return {
            "train": synthetic.generate("train", cfg.num_train, cfg.train_group_size, 2, cfg.image_size, cfg.seed),
            # each eval set carries only the caption kind it is scored on, as COCO (short) and Urban-1K (long) do
            "synthetic_short": synthetic.generate("short", cfg.num_eval, 1, 2, cfg.image_size, cfg.seed, ("short",)),
            "synthetic_long": synthetic.generate(
                "long", cfg.num_eval, cfg.eval_group_size, 1, cfg.image_size, cfg.seed, ("long",)
            ),
            # the same scenes as synthetic_long (split "long": same keys, images and groups), captioned only in
            # wordings no training caption uses: seen vs unseen wording is a paired comparison on identical images
            "synthetic_reworded": synthetic.generate(
                "long", cfg.num_eval, cfg.eval_group_size, 1, cfg.image_size, cfg.seed, ("long",), wording="eval"
            ),
            **eval_records,
        }, {**BENCHMARKS, **eval_needs}
    if cfg.source_format == "img2dataset":
        train = formats.img2dataset_records(cfg.source, cfg.raw_field or "txt", cfg.short_field, cfg.long_field)
        return {"train": train, **eval_records}, eval_needs
    if cfg.source_format == "table":
        train = formats.table_records(
            cfg.source,
            cfg.images,
            image_column=cfg.image_column,
            key_column=cfg.key_column,
            raw=cfg.raw_field or "caption",
            short=cfg.short_field,
            long=cfg.long_field,
        )
        return {"train": train, **eval_records}, eval_needs
    out: dict[str, Iterable[dict]] = {}
    for split in ["train", *BENCHMARKS]:
        shards = storage.list_files(storage.join(cfg.source, split_path(split)), ".tar")
        if split == "train" and not shards:
            raise FileNotFoundError(f"source {cfg.source!r}: no train/*.tar shards (the canonical layout)")
        if shards:
            out[split] = (s for sh in shards for s in wds.WebDataset(sh, shardshuffle=False, empty_check=False))
    return {**out, **eval_records}, {**{b: n for b, n in BENCHMARKS.items() if b in out}, **eval_needs}


def _prepare_split(
    cfg: PrepareDataConfig,
    split: str,
    records: Iterable[dict],
    need: tuple[str, int] | None,
    out_dir: str,
    rejects: list[dict],
    stats: dict[str, dict],
) -> None:
    """Validate one split's records and write its shards; fills stats[split] (also when it ends up empty)."""
    seen: set[str] = set()
    reasons: Counter[str] = Counter()
    found: Counter[str] = Counter()  # caption kinds the reader found, to catch a field that matches nothing

    def kept() -> Iterator[dict]:
        for i, rec in enumerate(records):
            key = rec.get("__key__")
            if isinstance(rec.get("json"), dict):
                found.update(rec["json"].get("captions", {}))
            try:
                check_record(rec, cfg, seen, need)
            except Reject as e:
                reasons[e.reason] += 1
                rejects.append({"split": split, "index": i, "key": key, "reason": e.reason, "message": str(e)})
                continue
            seen.add(rec["__key__"])
            yield rec

    sizes = write_split(kept(), storage.join(out_dir, split_path(split)), cfg.shard_size)
    count = sum(sizes.values())
    stats[split] = {
        "kept": count,
        "rejected": sum(reasons.values()),
        "shards": len(sizes),
        "reject_reasons": dict(reasons),
    }
    where = f"split {split!r} of source {cfg.source!r}"
    if count == 0:
        if not reasons:
            raise ValueError(f"{where}: no record at all (is the path right?)")
        counts = ", ".join(f"{r}: {n}" for r, n in reasons.most_common())
        raise ValueError(
            f"{where}: no usable record; {sum(reasons.values())} rejected ({counts}); "
            f"see {storage.join(out_dir, 'rejects.jsonl')}"
        )
    if split == "train" and cfg.source_format != "canonical":
        for kind, field in (("raw", cfg.raw_field), ("short", cfg.short_field), ("long", cfg.long_field)):
            if field and not found[kind]:
                raise ValueError(
                    f"{kind}_field={field!r}: matches nothing in the {count + sum(reasons.values())} records of {where}"
                )


def prepare_data(cfg: PrepareDataConfig, out_dir: str) -> dict:
    """Validate every record of the source and write canonical shards, stats and rejects. Returns stats.

    rejects.jsonl ({"split", "index", "key", "reason", "message"} per dropped record) and stats.json are written
    even when a split fails, so a run that found nothing usable still says what it dropped and why."""
    t0 = time.time()
    rejects: list[dict] = []
    stats: dict[str, dict] = {}
    sources, needs = _source_records(cfg)
    try:
        for split, records in sources.items():
            _prepare_split(cfg, split, records, needs.get(split), out_dir, rejects, stats)
    finally:
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
