"""Readers for real input layouts, each yielding raw records for prepare_data's validation:
{"__key__", <image ext>: bytes, "json": {"captions": {kind: [text]}}, "__fields__": {kind: source field}} or, when
the record cannot be read, {"__key__", "__error__": message, "__reason__": class} so that it is counted and written
to the rejects file, never silently lost. Readers do not judge captions or images: `prepare_data.check_record` does, the
same way for every layout.

Train sources: img2dataset webdataset tars (jpg/txt/json; which fields hold which caption kind is configurable,
so DreamLIP-style recaptioned shards work; the failed downloads listed in each shard's parquet are counted) and
caption tables (CSV, TSV, JSONL, Parquet) with image paths relative to an images root (local directory or s3://
prefix), read row by row so one bad row is one reject.
Evaluation sets: Karpathy-split JSON (Flickr30k / COCO, five captions per image), DOCCI jsonlines, Urban-1K
(image/ + caption/ folders) and ShareGPT4V JSON (one long caption per image).
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds

from llm2clip import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TABLE_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".jsonlines": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}


def _error(key: str, reason: str, message: str) -> dict:
    return {"__key__": key, "__error__": message, "__reason__": reason}


def _name(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def safe_relpath(path: str) -> str | None:
    """A relative image path, normalised; None when it is absolute, a URL or climbs out with `..`."""
    path = str(path).replace("\\", "/")
    if "://" in path or path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return None
    norm = posixpath.normpath(path)
    return None if norm == ".." or norm.startswith("../") else norm


def _image_record(key: str, images: str, rel: str, captions: dict[str, list], fields: dict[str, str]) -> dict:
    """Read one image (a path relative to the images root) into a raw record."""
    safe = safe_relpath(rel)
    if safe is None:
        return _error(key, "unsafe image path", f"image path {rel!r} is absolute, a URL or leaves {images}")
    image_uri = storage.join(images, safe)
    try:
        image = storage.read_bytes(image_uri)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return _error(key, "image file not found", f"image file not found: {image_uri}")
    ext = safe.rsplit(".", 1)[-1].lower()
    ext = ext if ext in IMAGE_EXTS else "jpg"  # the bytes decide the format; the name only has to be an image one
    return {"__key__": key, ext: image, "json": {"captions": captions}, "__fields__": fields}


def _must_exist(uri: str, what: str) -> None:
    if not storage.exists(uri):
        raise FileNotFoundError(f"{what}: {uri} does not exist")


# ----------------------------------------------------------------------------------------------- img2dataset


def sample_fields(sample: dict) -> list[str]:
    """The caption field specs a webdataset sample offers: its files ("txt") and its JSON keys ("json.caption")."""
    out = sorted(k for k in sample if not k.startswith("__") and k not in IMAGE_EXTS)
    for ext in [k for k in out if k == "json" or k.endswith(".json")]:
        try:
            obj = json.loads(sample[ext])
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
            continue
        if isinstance(obj, dict):
            out += [f"{ext}.{k}" for k in obj]
    return out


def field_values(sample: dict, spec: str) -> list:
    """A caption field of a webdataset sample: "txt" (a file), or "json.key" / "json.a.b" (a JSON field); values
    are returned undecoded (bytes or JSON values) for prepare_data.clean_caption to judge."""
    ext, _, path = spec.partition(".")
    value = sample.get(ext)
    if value is None:
        return []
    if not path:
        return [value]
    obj = json.loads(value) if isinstance(value, bytes | str) else value
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    if obj is None:
        return []
    return obj if isinstance(obj, list) else [obj]


def failed_downloads(shard: str) -> Iterator[dict]:
    """Rejects for the rows img2dataset could not fetch, from the parquet written beside each shard
    (columns key, status, error_message): they are not in the tar, so without this they would vanish."""
    table_uri = shard.removesuffix(".tar") + ".parquet"
    if not storage.exists(table_uri):
        return
    table = _parquet(table_uri)
    columns = table.schema_arrow.names
    if "status" not in columns:
        return
    wanted = [c for c in ("key", "status", "error_message") if c in columns]
    for row in table.read(columns=wanted).to_pylist():
        if row["status"] == "success":
            continue
        reason = "failed download" if row["status"] == "failed_to_download" else f"img2dataset {row['status']}"
        message = f"{_name(table_uri)}: {row['status']} ({row.get('error_message') or 'no message'})"
        yield _error(str(row.get("key")), reason, message)


def img2dataset_records(uri: str, raw: str = "txt", short: str = "", long: str = "") -> Iterator[dict]:
    """Samples of img2dataset tars under `uri`; `raw`, `short`, `long` name the field of each caption kind."""
    shards = storage.list_files(uri, ".tar", recursive=True)
    if not shards:
        raise FileNotFoundError(f"img2dataset source: no .tar shards under {uri}")
    fields = {k: spec for k, spec in (("raw", raw), ("short", short), ("long", long)) if spec}
    for shard in shards:
        yield from failed_downloads(shard)
        for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False):
            key = sample["__key__"]
            try:
                captions = {k: field_values(sample, spec) for k, spec in fields.items()}
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield _error(
                    key,
                    "bad metadata",
                    f"{_name(shard)}: a caption field's JSON is not valid UTF-8 JSON ({e.__class__.__name__}: {e})",
                )
                continue
            record = {"__key__": key, "json": {"captions": {k: v for k, v in captions.items() if v}}}
            record["__fields__"] = fields
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext:
                record[ext] = sample[ext]
            yield record


def shard_success_count(uri: str) -> int | None:
    """Images in an img2dataset source per its *_stats.json files ("successes"); None when a shard has none."""
    total = 0
    for shard in storage.list_files(uri, ".tar", recursive=True):
        stats_uri = shard.removesuffix(".tar") + "_stats.json"
        if not storage.exists(stats_uri):
            return None
        total += int(storage.read_json(stats_uri).get("successes", 0))
    return total


# ----------------------------------------------------------------------------------------------- caption tables


def table_format(uri: str) -> str:
    fmt = TABLE_FORMATS.get(Path(_name(uri)).suffix.lower())
    if fmt is None:
        raise ValueError(f"caption table {uri}: expected one of {sorted(TABLE_FORMATS)}")
    return fmt


def _text_lines(uri: str) -> Iterator[str]:
    """The table's lines, each decoded on its own: an undecodable byte becomes a lone surrogate (surrogateescape)
    that the row's checks report, instead of a UnicodeDecodeError that kills the whole file."""
    with storage.open_read(uri) as f:
        for i, line in enumerate(f):
            text = line.decode("utf-8", errors="surrogateescape")
            yield text.removeprefix("\ufeff") if i == 0 else text


def _undecodable(values: object) -> str | None:
    for v in values if isinstance(values, list) else [values]:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return v
    return None


def _parquet(uri: str):
    import pyarrow.parquet as pq  # a declared dependency; imported here so text tables do not load Arrow

    # ParquetFile seeks (the footer first): a local file by path, an object read into memory
    return pq.ParquetFile(
        io.BytesIO(storage.read_bytes(uri)) if storage.is_remote(uri) else uri.removeprefix("file://")
    )


def table_rows(uri: str) -> Iterator[tuple[int, dict | str]]:
    """(row number from 1, row as a dict) for each row of a caption table, or (row number, what is wrong)."""
    fmt, name = table_format(uri), _name(uri)
    if fmt in ("csv", "tsv"):
        reader = csv.reader(_text_lines(uri), delimiter="," if fmt == "csv" else "\t")
        header = next(reader, None)
        if not header:
            return
        for n, values in enumerate(reader, 1):
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                yield n, f"row {n} of {name}: {len(values)} values for {len(header)} columns"
                continue
            yield n, dict(zip(header, values, strict=True))
    elif fmt == "jsonl":
        n = 0
        for line in _text_lines(uri):
            if not line.strip():
                continue
            n += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, f"row {n} of {name}: not valid JSON ({e})"
                continue
            yield n, row if isinstance(row, dict) else f"row {n} of {name}: a JSON {type(row).__name__}, not an object"
    else:
        n = 0
        for batch in _parquet(uri).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, row


def table_columns(uri: str) -> list[str]:
    """The columns of a caption table, from its header / first row."""
    for _, row in table_rows(uri):
        if isinstance(row, dict):
            return list(row)
    return []


def table_row_count(uri: str) -> int | None:
    """An upper bound on a table's rows without reading it all (None when that would be slow): Parquet metadata,
    or the lines of a local text table."""
    fmt = table_format(uri)
    if fmt == "parquet":
        return _parquet(uri).metadata.num_rows
    if storage.is_remote(uri):
        return None
    with storage.open_read(uri) as f:
        lines = sum(1 for line in f if line.strip())
    return lines - 1 if fmt in ("csv", "tsv") else lines


def table_records(
    uri: str,
    images: str,
    image_column: str = "image",
    key_column: str = "",
    raw: str = "caption",
    short: str = "",
    long: str = "",
) -> Iterator[dict]:
    """Rows of a caption table; image paths are relative to `images` (a directory or s3:// prefix). Records are
    keyed by `key_column` (default: the row number, "row00000001"); a cell that is empty is a blank caption."""
    _must_exist(uri, "caption table")
    name = _name(uri)
    columns = {k: c for k, c in (("raw", raw), ("short", short), ("long", long)) if c}
    for n, row in table_rows(uri):
        key = f"row{n:08d}"
        if isinstance(row, str):
            yield _error(key, "bad row", row)
            continue
        if key_column:
            value = row.get(key_column)
            if value is None or str(value).strip() == "":
                yield _error(key, "missing key", f"row {n} of {name}: empty key column {key_column!r}")
                continue
            key = str(value)
            if _undecodable(key) is not None:
                yield _error(f"row{n:08d}", "bad row", f"row {n} of {name}: key column {key_column!r} is not UTF-8")
                continue
        path = row.get(image_column)
        if path is None or str(path).strip() == "":
            yield _error(key, "no image", f"row {n} of {name}: empty image column {image_column!r}")
            continue
        if _undecodable(str(path)) is not None:
            yield _error(key, "bad row", f"row {n} of {name}: image column {image_column!r} is not UTF-8")
            continue
        captions = {k: v if isinstance(v, list) else [v] for k, c in columns.items() if (v := row.get(c)) is not None}
        fields = {k: f"{c} (row {n} of {name})" for k, c in columns.items()}
        yield _image_record(key, images, str(path), captions, fields)


# ----------------------------------------------------------------------------------------------- eval sets


def karpathy_records(uri: str, images: str, split: str = "test") -> Iterator[dict]:
    """Karpathy-split JSON (Flickr30k, COCO): {"images": [{"filename", "filepath"?, "split", "sentences"}]}."""
    _must_exist(uri, "karpathy eval set")
    for img in storage.read_json(uri)["images"]:
        if img.get("split") != split:
            continue
        rel = "/".join(p for p in (img.get("filepath"), img["filename"]) if p)
        caps = [s["raw"] if isinstance(s, dict) else s for s in img.get("sentences", [])]
        key = str(img.get("cocoid") or img.get("imgid") or img["filename"].rsplit(".", 1)[0])
        yield _image_record(key, images, rel, {"short": caps}, {"short": f"sentences ({_name(uri)})"})


def docci_records(uri: str, images: str, split: str = "test") -> Iterator[dict]:
    """DOCCI jsonlines: {"example_id", "split", "image_file", "description"} -> one long caption per image."""
    _must_exist(uri, "docci eval set")
    for n, row in table_rows(uri):
        if isinstance(row, str):
            yield _error(f"row{n:08d}", "bad row", row)
            continue
        if row.get("split") != split:
            continue
        key = str(row.get("example_id") or row["image_file"].rsplit(".", 1)[0])
        caption = row.get("description")
        yield _image_record(
            key,
            images,
            row["image_file"],
            {"long": [caption] if caption is not None else []},
            {"long": f"description ({_name(uri)})"},
        )


def urban1k_records(uri: str, images: str = "") -> Iterator[dict]:
    """Urban-1K: <root>/image/<name>.jpg with <root>/caption/<name>.txt holding its long caption.
    `uri` is the root; `images` overrides where the images are (default <root>/image)."""
    image_root = images or storage.join(uri, "image")
    caption_files = storage.list_files(storage.join(uri, "caption"), ".txt")
    if not caption_files:
        raise FileNotFoundError(
            f"urban1k eval set: no caption/*.txt under {uri} (expected <root>/caption/<name>.txt "
            "and <root>/image/<name>.jpg)"
        )
    for caption_file in caption_files:
        stem = _name(caption_file).removesuffix(".txt")
        text = storage.read_bytes(caption_file)  # bytes: prepare_data.clean_caption decodes and names the file
        yield _image_record(stem, image_root, f"{stem}.jpg", {"long": [text]}, {"long": f"caption/{stem}.txt"})


def sharegpt4v_records(uri: str, images: str) -> Iterator[dict]:
    """ShareGPT4V JSON: [{"id", "image": relative path, "conversations": [human prompt, gpt caption]}]."""
    _must_exist(uri, "sharegpt4v eval set")
    for item in storage.read_json(uri):
        answers = [c.get("value", "") for c in item.get("conversations", []) if c.get("from") == "gpt"]
        key = str(item.get("id") or item["image"].rsplit(".", 1)[0]).replace("/", "_")
        yield _image_record(
            key, images, item["image"], {"long": answers[:1]}, {"long": f"conversations ({_name(uri)})"}
        )
