"""Storage access for every stage: local paths today; object-store URIs go through this same module."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def _local(uri: str | Path) -> Path:
    uri = str(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"object-store URIs are not supported yet: {uri!r} (use a local path)")
    return Path(uri.removeprefix("file://"))


def join(base: str | Path, *parts: str) -> str:
    return str(_local(base).joinpath(*parts))


def exists(uri: str | Path) -> bool:
    return _local(uri).exists()


def listdir(uri: str | Path, suffix: str = "") -> list[str]:
    """Sorted full paths of the entries directly under `uri` whose names end with `suffix`."""
    root = _local(uri)
    return sorted(str(p) for p in root.iterdir() if p.name.endswith(suffix)) if root.is_dir() else []


@contextlib.contextmanager
def open_write(uri: str | Path) -> Iterator[BinaryIO]:
    """Write to a temporary name beside the target and rename on success: no half-written file is visible."""
    path = _local(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def open_read(uri: str | Path) -> BinaryIO:
    return open(_local(uri), "rb")


def write_json(uri: str | Path, obj: Any) -> None:
    with open_write(uri) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str | Path) -> Any:
    with open_read(uri) as f:
        return json.load(f)


def local_path(uri: str | Path) -> Path:
    """A local filesystem path for libraries that need one (safetensors, webdataset)."""
    return _local(uri)
