"""Where models come from: a local path (the image, a mounted volume), an s3:// / minio:// copy fetched once into a
content-addressed local cache, or a Hugging Face hub id where the cluster reaches a hub (`allow_hub`).

Offline is the default (the image sets HF_HUB_OFFLINE=1): without `allow_hub` a hub id or an open_clip pretrained
tag is taken from the local Hugging Face cache only, never downloaded. With it, the hub is reached for that one
download whatever HF_HUB_OFFLINE says; `allow_hub` is the run's statement that the cluster has a hub.

The download cache (LLM2CLIP_DOWNLOAD_CACHE, else `<model cache>/downloads` where the model cache is writable,
else $XDG_CACHE_HOME/llm2clip/downloads: the image's model cache is read-only, its /tmp is not):
    <root>/<key>/files/...        the objects under their names relative to the prefix (or the one object)
    <root>/<key>/source.json      the URI and the listing the key was made from
`key` is a sha256 over the listing (relative name, size, ETag of every object): a changed object changes its ETag
or size, hence the key, and is fetched again; an unchanged listing is a cache hit that costs one LIST and no GET.
An entry is built under a temporary name and renamed into place, so a reader never sees a partial one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from llm2clip import storage

DOWNLOAD_CACHE_ENV = "LLM2CLIP_DOWNLOAD_CACHE"
HUB_FLAG = "allow_hub"
# What a hub snapshot of an LLM brings down: configs, tokenizer files and safetensors weights; never pickled
# .bin/.pth weights, GGUF or ONNX copies, or remote code.
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken")
# A Hugging Face repo id: [org/]name of letters, digits, '-', '_', '.'.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    """A model reference resolved to local files. `kind`: "path" (a local or mounted path), "object-store" (a
    fetched copy), "hub" (a hub snapshot), "open_clip-tag" (a tag's downloaded file), "project" (a model the
    project builds itself). `key`: the object listing's content key, or the hub snapshot's commit."""

    reference: str
    kind: str
    path: Path
    key: str | None = None

    def describe(self) -> dict:
        """What a manifest records (the local path only says where this machine had it)."""
        return {**asdict(self), "path": str(self.path)}


def cache_root() -> Path:
    """Where converted models live (LLM2CLIP_CACHE, else ~/.cache/llm2clip)."""
    return Path(os.environ.get("LLM2CLIP_CACHE", Path.home() / ".cache" / "llm2clip"))


def download_root() -> Path:
    """Where fetched copies live (see the module docstring)."""
    if os.environ.get(DOWNLOAD_CACHE_ENV):
        return Path(os.environ[DOWNLOAD_CACHE_ENV])
    existing = next(p for p in (cache_root(), *cache_root().parents) if p.exists())
    if os.access(existing, os.W_OK):
        return cache_root() / "downloads"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm2clip" / "downloads"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place (concurrent loaders race safely)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------- classify


def classify(reference: str) -> str:
    """ "object-store", "path" or "hub", from the reference alone (nothing is read). A hub id is `[org/]name`;
    a reference that exists on disk, or starts with '/', '.', '~' or ends like a checkpoint file, is a path."""
    if storage.is_remote(reference):
        return "object-store"
    if "://" in reference:
        raise ValueError(f"unsupported model location {reference!r} (a path, s3://, minio:// or a hub id org/name)")
    if Path(reference).expanduser().exists() or reference.startswith(("/", ".", "~")):
        return "path"
    if reference.endswith(CHECKPOINT_SUFFIXES) or not HUB_ID.fullmatch(reference) or ".." in reference:
        return "path"
    return "hub"


# ----------------------------------------------------------------------------------------------- object store


def fetch(uri: str, *, parameter: str, single_file: bool, required: tuple[str, ...] = ()) -> ModelSource:
    """A local copy of the object `uri` (single_file) or of every object below the prefix `uri`, fetched into the
    content-addressed download cache unless the same listing is there already. `required`: names the prefix must
    hold (checked on the listing, before any download)."""
    listing = _listing(uri, parameter, single_file)
    missing = [name for name in required if name not in {n for n, _, _ in listing}]
    if missing:
        raise ValueError(
            f"{parameter}={uri!r}: no {', '.join(missing)} under this prefix (expected a Hugging Face model "
            "directory: config.json, the tokenizer files and *.safetensors weights, as save_pretrained writes them)"
        )
    key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    final = download_root() / key
    if not (final / "source.json").is_file():
        with atomic_dir(final) as tmp:
            base = uri.rstrip("/")
            for name, size, _ in listing:
                target = tmp / "files" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with storage.open_read(base if single_file else f"{base}/{name}") as src, open(target, "wb") as f:
                    shutil.copyfileobj(src, f, length=1 << 24)
                if target.stat().st_size != size:
                    raise OSError(
                        f"{parameter}={uri!r}: {name} came back with {target.stat().st_size} bytes, not {size}"
                    )
            if _listing(uri, parameter, single_file) != listing:  # a GET may have read a newer object than listed
                raise RuntimeError(f"{parameter}={uri!r}: objects changed during the download; run it again")
            (tmp / "source.json").write_text(json.dumps({"uri": uri, "listing": listing}, indent=2))
    path = final / "files" / listing[0][0] if single_file else final / "files"
    return ModelSource(uri, "object-store", path, key)


def _listing(uri: str, parameter: str, single_file: bool) -> list[tuple[str, int, str]]:
    """[(name relative to the prefix, size, ETag)], sorted; the object's own file name when single_file."""
    base = uri.rstrip("/")
    infos = storage.object_infos(base)
    if single_file:
        infos = [o for o in infos if o.uri == base]
        if not infos:
            raise ValueError(
                f"{parameter}={uri!r}: no such object (expected one checkpoint file, e.g. .pt/.safetensors)"
            )
        return [(PurePosixPath(base).name, infos[0].size, infos[0].etag)]
    infos = [o for o in infos if o.uri.startswith(base + "/")]
    if not infos:
        raise ValueError(f"{parameter}={uri!r}: no objects under this prefix")
    listing = []
    for o in infos:
        name = o.uri[len(base) + 1 :]
        if any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"{parameter}={uri!r}: object {o.uri!r} has a name that is no safe relative path")
        listing.append((name, o.size, o.etag))
    return listing


# ----------------------------------------------------------------------------------------------- hub


@contextlib.contextmanager
def hub_access(online: bool) -> Iterator[None]:
    """Hub downloads on or off for the block, whatever HF_HUB_OFFLINE said at import. huggingface_hub reads the
    variable once, into `constants.HF_HUB_OFFLINE`, and refuses every HTTP request while it is true (upstream
    huggingface/huggingface_hub v1.28.0, src/huggingface_hub/constants.py line 192 and is_offline_mode at 195-211;
    src/huggingface_hub/utils/_http.py line 259), so the constant itself is what a run's `allow_hub` sets."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = not online
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def offline_error(parameter: str, reference: str, what: str) -> ValueError:
    return ValueError(
        f"{parameter}={reference!r}: {what}, and this run is offline ({HUB_FLAG}=False) and it is not in the local "
        "Hugging Face cache. Put it on the object store and pass s3://BUCKET/PREFIX (fetched once per machine), or "
        f"pass its path on a mounted volume, or set {HUB_FLAG}=True where the cluster reaches the hub"
    )


def hub_snapshot(repo_id: str, *, parameter: str, allow_hub: bool) -> ModelSource:
    """A hub model's local snapshot (HUB_FILES only): downloaded with allow_hub, else from the local cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        if allow_hub:
            with hub_access(online=True):
                path = snapshot_download(repo_id, allow_patterns=list(HUB_FILES))
        else:
            path = snapshot_download(repo_id, allow_patterns=list(HUB_FILES), local_files_only=True)
    except LocalEntryNotFoundError:
        if allow_hub:
            raise
        raise offline_error(parameter, repo_id, "a Hugging Face hub id") from None
    return ModelSource(repo_id, "hub", Path(path), Path(path).name)


# ----------------------------------------------------------------------------------------------- resolvers


def resolve_llm(reference: str, *, allow_hub: bool = False, parameter: str = "llm") -> ModelSource:
    """A Hugging Face model directory (config.json, tokenizer, weights) from a path, s3:// prefix or hub id."""
    kind = classify(reference)
    if kind == "object-store":
        return fetch(reference, parameter=parameter, single_file=False, required=("config.json",))
    if kind == "hub":
        return hub_snapshot(reference, parameter=parameter, allow_hub=allow_hub)
    path = Path(reference).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"{parameter}={reference!r}: "
            + ("a file, not a model directory" if path.exists() else "no such directory")
            + " (a Hugging Face model directory on a mounted volume, s3://BUCKET/PREFIX, or a hub id org/name)"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"{parameter}={reference!r}: no config.json in it (expected a Hugging Face model directory)")
    return ModelSource(reference, "path", path.resolve())


def resolve_checkpoint(
    reference: str | None, model_name: str, *, allow_hub: bool = False, parameter: str = "pretrained"
) -> ModelSource | None:
    """An open_clip checkpoint file for `model_name`: a path, an s3:// object, or an open_clip pretrained tag
    (downloaded by open_clip with allow_hub, else taken from the local Hugging Face cache). None: no weights."""
    if not reference:
        return None
    kind = classify(reference)
    if kind == "object-store":
        return fetch(reference, parameter=parameter, single_file=True)
    path = Path(reference).expanduser()
    if path.is_file():
        return ModelSource(reference, "path", path.resolve())
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if kind == "path" or reference not in tags:
        raise ValueError(
            f"{parameter}={reference!r}: no such checkpoint file, and not an open_clip pretrained tag of "
            f"{model_name!r} (its tags: {', '.join(tags) or 'none'}); pass a checkpoint file on a mounted volume or "
            "s3://BUCKET/KEY"
        )
    cfg = open_clip.get_pretrained_cfg(model_name, reference)
    if not allow_hub and not cfg.get("hf_hub"):  # fetched from a URL: nothing to look up offline
        raise offline_error(parameter, reference, "an open_clip pretrained tag downloaded from the web")
    try:
        with hub_access(online=allow_hub):
            file = open_clip.download_pretrained(cfg)
    except Exception as e:
        if allow_hub:
            raise RuntimeError(f"{parameter}={reference!r}: downloading the open_clip weights failed: {e}") from e
        raise offline_error(parameter, reference, "an open_clip pretrained tag") from e
    return ModelSource(reference, "open_clip-tag", Path(file))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
