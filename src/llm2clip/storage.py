"""Storage for every stage: local paths and `s3://` / `minio://` URIs (minio SDK) behind one small API.

Object-store settings come from the environment, never from pipeline parameters:
    MINIO_ENDPOINT          host:port or http(s)://host:port (also read: AWS_ENDPOINT_URL)
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (optional)
    LLM2CLIP_S3_RETRIES (5), LLM2CLIP_S3_CONNECT_TIMEOUT (5 s), LLM2CLIP_S3_READ_TIMEOUT (30 s)
Writes are atomic: a local file is renamed into place, an object appears only once its upload (multipart for
large objects) completes. Transient errors are retried with backoff; refused credentials are not, and the error
names the endpoint and bucket (never the keys). A timeout is retried once only, then raised as a TimeoutError that
names the limit: a server that accepts connections and never answers fails a call after two read timeouts and
one backoff (2 x 30 + 0.5 s by default), not after every retry has waited out its timeout.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")
REMOTE_SCHEMES = ("s3", "minio")
PART_SIZE = 16 * 1024 * 1024
AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "InvalidToken",
    "ExpiredToken",
    "AccountProblem",
}
TRANSIENT_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "ServerError",
    "Throttling",
    "RequestLimitExceeded",
    "OperationAborted",
}


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class S3Settings:
    """Where the object store is; the secret never appears in repr, logs or errors."""

    endpoint: str
    secure: bool
    access_key: str
    secret_key: str
    region: str | None = None
    retries: int = 5
    backoff_s: float = 0.5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0  # the longest silence while waiting for a response or a chunk of one

    def __repr__(self) -> str:
        return f"S3Settings(endpoint={self.endpoint!r}, secure={self.secure})"

    @classmethod
    def from_env(cls) -> S3Settings:
        raw = os.environ.get("MINIO_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        if not raw:
            raise RuntimeError("an s3:// or minio:// location needs MINIO_ENDPOINT (host:port or http(s)://host:port)")
        parsed = urlparse(raw if "://" in raw else f"http://{raw}")
        secure = parsed.scheme == "https" if "://" in raw else os.environ.get("MINIO_SECURE", "false") == "true"
        return cls(
            endpoint=parsed.netloc,
            secure=secure,
            access_key=os.environ.get("AWS_ACCESS_KEY_ID", ""),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            region=os.environ.get("AWS_REGION") or None,
            retries=_env_number("LLM2CLIP_S3_RETRIES", 5, int),
            connect_timeout_s=_env_number("LLM2CLIP_S3_CONNECT_TIMEOUT", 5.0, float),
            read_timeout_s=_env_number("LLM2CLIP_S3_READ_TIMEOUT", 30.0, float),
        )


def _env_number(name: str, default: T, kind: Callable[[str], T]) -> T:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected {'an' if kind is int else 'a'} {kind.__name__}") from None
    if value < 0 or (kind is float and value == 0):
        raise ValueError(f"{name}={raw!r}: must be positive")
    return value


@functools.lru_cache(maxsize=4)
def _client(settings: S3Settings):
    import urllib3
    from minio import Minio

    # Our own retry loop (_retry) decides what is transient; urllib3 must not retry behind it (minio's default client
    # would: Retry(total=5, status_forcelist=[500, 502, 503, 504]), minio 7.2.20 minio/api.py lines 170-180).
    # urllib3.Retry alone is not enough: minio streams object bodies (preload_content=False), so a body cut short
    # fails in read() after urlopen has returned and its retries are spent (urllib3 2.8.0 response.py,
    # _error_catcher raises ProtocolError, line 949), and a status cannot tell S3's 400 RequestTimeout (worth a
    # retry) from a 400 that fails again. tests/test_storage.py::test_transient_faults_are_retried has the cases.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s),
        retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0),
        maxsize=16,
    )
    return Minio(
        settings.endpoint,
        settings.access_key,
        settings.secret_key,
        secure=settings.secure,
        region=settings.region,
        http_client=http,
    )


def is_remote(uri: str | Path) -> bool:
    return urlparse(str(uri)).scheme in REMOTE_SCHEMES


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key/path -> ("bucket", "key/path")."""
    parsed = urlparse(uri)
    if parsed.scheme not in REMOTE_SCHEMES or not parsed.netloc:
        raise ValueError(f"not an object-store URI: {uri!r} (expected s3://BUCKET/PREFIX or minio://BUCKET/PREFIX)")
    return parsed.netloc, parsed.path.lstrip("/")


def _local(uri: str | Path) -> Path:
    uri = str(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r} (local path, file://, s3:// or minio://)")
    return Path(uri.removeprefix("file://"))


# ----------------------------------------------------------------------------------------------- retries


def _timeout(error: BaseException) -> str | None:
    """ "connect" or "read" when the error is a timeout (urllib3 wraps it in MaxRetryError), else None."""
    import urllib3

    reason = getattr(error, "reason", None) if isinstance(error, urllib3.exceptions.MaxRetryError) else error
    if isinstance(reason, urllib3.exceptions.NewConnectionError):  # a refused connection (a subclass, oddly)
        return None
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return "connect"
    if isinstance(reason, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return "read"
    return None


def _retry(what: str, uri: str, fn: Callable[[], T]) -> T:
    """Run fn with exponential backoff on transient failures; auth failures raise PermissionError at once,
    a second timeout raises TimeoutError naming the limit."""
    import urllib3
    from minio.error import S3Error, ServerError

    settings = S3Settings.from_env()
    bucket = split_uri(uri)[0]
    timeouts = 0
    for attempt in range(settings.retries + 1):
        try:
            return fn()
        except S3Error as e:
            if e.code in AUTH_CODES:
                raise PermissionError(
                    f"{what} {uri}: the object store at {settings.endpoint} refused access to "
                    f"bucket {bucket!r} ({e.code}); check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY"
                ) from None
            if e.code == "NoSuchBucket":
                raise FileNotFoundError(
                    f"{what} {uri}: bucket {bucket!r} does not exist at {settings.endpoint}"
                ) from None
            if e.code not in TRANSIENT_CODES or attempt == settings.retries:
                raise
        except ServerError as e:
            if e.status_code in (401, 403):
                raise PermissionError(
                    f"{what} {uri}: the object store at {settings.endpoint} refused access to "
                    f"bucket {bucket!r} (HTTP {e.status_code}); check the credentials"
                ) from None
            if attempt == settings.retries:
                raise
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError) as e:
            kind = _timeout(e)
            timeouts += kind is not None
            if kind is not None and (timeouts == 2 or attempt == settings.retries):
                limit, env = (
                    (settings.connect_timeout_s, "LLM2CLIP_S3_CONNECT_TIMEOUT")
                    if kind == "connect"
                    else (settings.read_timeout_s, "LLM2CLIP_S3_READ_TIMEOUT")
                )
                raise TimeoutError(
                    f"{what} {uri}: timeout: {settings.endpoint} did not "
                    f"{'accept a connection' if kind == 'connect' else 'answer'} within the {kind} timeout of "
                    f"{limit:g} s ({env}), {timeouts} times in {attempt + 1} attempts"
                ) from None
            if attempt == settings.retries:
                raise ConnectionError(
                    f"{what} {uri}: {settings.endpoint} unreachable after {settings.retries + 1} attempts"
                ) from None
        time.sleep(settings.backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def _s3():
    return _client(S3Settings.from_env())


# ----------------------------------------------------------------------------------------------- API


def join(base: str | Path, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(_local(base).joinpath(*parts))


def exists(uri: str | Path) -> bool:
    """True for an existing file/object, or a directory/prefix holding something."""
    uri = str(uri)
    if not is_remote(uri):
        return _local(uri).exists()
    from minio.error import S3Error

    bucket, key = split_uri(uri)

    def stat() -> bool:
        try:
            _s3().stat_object(bucket, key)
            return True
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"):
                return any(True for _ in _s3().list_objects(bucket, prefix=key.rstrip("/") + "/"))
            raise

    return _retry("exists", uri, stat)


def list_files(uri: str | Path, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted URIs of the files directly under `uri` (or all below, if recursive) ending with `suffix`."""
    uri = str(uri)
    if not is_remote(uri):
        root = _local(uri)
        if not root.is_dir():
            return []
        found = root.rglob("*") if recursive else root.iterdir()
        return sorted(str(p) for p in found if p.is_file() and p.name.endswith(suffix) and not p.name.startswith("."))
    bucket, key = split_uri(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    objects = _retry("list", uri, lambda: list(_s3().list_objects(bucket, prefix=prefix, recursive=recursive)))
    scheme = urlparse(uri).scheme
    return sorted(
        f"{scheme}://{bucket}/{o.object_name}" for o in objects if not o.is_dir and o.object_name.endswith(suffix)
    )


def listdir(uri: str | Path, suffix: str = "") -> list[str]:
    return list_files(uri, suffix)


@dataclass(frozen=True)
class ObjectInfo:
    """One object as a listing shows it: a changed object has another ETag or size."""

    uri: str
    size: int
    etag: str


def object_infos(uri: str) -> list[ObjectInfo]:
    """Every object at the remote `uri` itself (a file) or below it (a prefix), sorted by URI; one LIST, no GET."""
    bucket, key = split_uri(uri)
    objects = _retry("list", uri, lambda: list(_s3().list_objects(bucket, prefix=key, recursive=True)))
    scheme, inside = urlparse(uri).scheme, key.rstrip("/") + "/"
    return sorted(
        (
            ObjectInfo(f"{scheme}://{bucket}/{o.object_name}", o.size, (o.etag or "").strip('"'))
            for o in objects
            if not o.is_dir and (o.object_name == key or o.object_name.startswith(inside) or not key)
        ),
        key=lambda o: o.uri,
    )


def read_bytes(uri: str | Path) -> bytes:
    uri = str(uri)
    if not is_remote(uri):
        return _local(uri).read_bytes()
    bucket, key = split_uri(uri)

    def get() -> bytes:
        resp = _s3().get_object(bucket, key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    return _retry("read", uri, get)


class _ObjectStream(io.RawIOBase):
    """A streaming read of one object that resumes from its offset after a dropped connection."""

    def __init__(self, uri: str) -> None:
        self.uri, (self.bucket, self.key) = uri, split_uri(uri)
        self.offset, self.resp = 0, None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        def read() -> bytes:
            if self.resp is None:
                self.resp = _s3().get_object(self.bucket, self.key, offset=self.offset)
            try:
                return self.resp.read(len(buf))
            except Exception:
                self._drop()
                raise

        data = _retry("read", self.uri, read)
        buf[: len(data)] = data
        self.offset += len(data)
        return len(data)

    def _drop(self) -> None:
        if self.resp is not None:
            with contextlib.suppress(Exception):
                self.resp.close()
                self.resp.release_conn()
            self.resp = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_read(uri: str | Path) -> BinaryIO:
    """A readable binary stream; objects are streamed, not downloaded first."""
    uri = str(uri)
    if not is_remote(uri):
        return open(_local(uri), "rb")
    return io.BufferedReader(_ObjectStream(uri), buffer_size=1 << 20)


@contextlib.contextmanager
def open_write(uri: str | Path) -> Iterator[BinaryIO]:
    """Write under the final name only on success: local tmp + rename; S3 spool + (multipart) upload."""
    uri = str(uri)
    if is_remote(uri):
        bucket, key = split_uri(uri)
        with tempfile.TemporaryFile() as f:
            yield f
            size = f.tell()

            def put() -> None:
                f.seek(0)
                _s3().put_object(bucket, key, f, length=size, part_size=PART_SIZE if size > PART_SIZE else 0)

            _retry("write", uri, put)
        return
    path = _local(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the file gets the mode open() would give it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def write_bytes(uri: str | Path, data: bytes) -> None:
    with open_write(uri) as f:
        f.write(data)


def delete(uri: str | Path) -> None:
    """Remove a file/object, or everything under a directory/prefix."""
    uri = str(uri)
    if not is_remote(uri):
        p = _local(uri)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        return
    bucket, key = split_uri(uri)
    for f in [uri, *list_files(uri, recursive=True)]:
        _retry("delete", f, lambda f=f: _s3().remove_object(bucket, split_uri(f)[1]))
    del key


def write_json(uri: str | Path, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str | Path) -> Any:
    return json.loads(read_bytes(uri))


def upload_dir(local_dir: str | Path, uri: str | Path) -> None:
    """Copy every file below a local directory to `uri` (same relative names)."""
    for p in sorted(Path(local_dir).rglob("*")):
        if p.is_file():
            write_bytes(join(uri, *p.relative_to(local_dir).parts), p.read_bytes())


@contextlib.contextmanager
def local_dir(uri: str | Path) -> Iterator[Path]:
    """A local directory holding the files under `uri` (the directory itself when local)."""
    uri = str(uri)
    if not is_remote(uri):
        yield _local(uri)
        return
    with tempfile.TemporaryDirectory(prefix="llm2clip-") as tmp:
        base = uri.rstrip("/") + "/"
        for f in list_files(uri, recursive=True):
            target = Path(tmp, *f[len(base) :].split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read_bytes(f))
        yield Path(tmp)


@contextlib.contextmanager
def staged_dir(uri: str | Path) -> Iterator[Path]:
    """A local directory to write into; its files land under `uri` when the block succeeds."""
    uri = str(uri)
    if not is_remote(uri):
        _local(uri).mkdir(parents=True, exist_ok=True)
        yield _local(uri)
        return
    with tempfile.TemporaryDirectory(prefix="llm2clip-") as tmp:
        yield Path(tmp)
        upload_dir(tmp, uri)


def _webdataset_opener(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> BinaryIO:
    if "r" not in mode:
        raise ValueError(f"{url}: webdataset writes go through storage.open_write")
    return open_read(url)


def register_webdataset_schemes() -> None:
    """Let webdataset stream s3:// and minio:// shards through this module."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")

    for scheme in REMOTE_SCHEMES:
        gopen.gopen_schemes[scheme] = _webdataset_opener
