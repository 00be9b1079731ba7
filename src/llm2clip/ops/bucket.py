"""Create the bucket of an object-store location if it is missing: `llm2clip storage ensure-bucket s3://BUCKET/...`.

The bucket Job in manifests/components/bucket runs this once per `kubectl apply`; it must be safe to run again and
again, and by two pods at once. The endpoint and credentials come from the environment exactly as for every other
object-store access (`llm2clip.storage.S3Settings`); the keys never appear in output or errors.
"""

from __future__ import annotations

import argparse
import os
import sys

from llm2clip import artifacts, storage


def ensure_bucket(uri: str) -> bool:
    """Create the bucket named by an s3:// or minio:// URI unless it already exists.

    Returns True when this call created it, False when it was already there (nothing is changed then: no policy,
    no objects, no versioning). Only the bucket is created; a prefix in the URI needs no creating in S3. Two calls
    racing to create it both succeed; the loser returns False, except in AWS region us-east-1, where S3 answers 200
    to a re-create of one's own bucket, so both return True there.
    Raises ValueError for a URI that is not an object-store location or names an invalid bucket, PermissionError
    when the credentials are refused, ConnectionError/TimeoutError when the endpoint cannot be reached (after
    storage's retries), and RuntimeError when the name is taken by another account.
    """
    from minio.error import S3Error
    from minio.helpers import check_bucket_name

    bucket, _ = storage.split_uri(uri)

    def check_name(strict: bool) -> None:
        # minio-py 7.2.20 minio/api.py: every request checks the name (bucket_exists, line 698), make_bucket
        # strictly (line 639): a legacy name (capitals, underscores) can exist but cannot be created.
        try:
            check_bucket_name(bucket, strict=strict)
        except ValueError as e:
            raise ValueError(
                f"{uri}: {e} (a new S3 bucket name has 3 to 63 lowercase letters, digits, dots and hyphens, and "
                "starts and ends with a letter or digit)"
            ) from None

    check_name(strict=False)  # before any request
    settings = storage.S3Settings.from_env()
    client = storage._client(settings)  # the same client, timeouts and retry policy as every storage call

    def create() -> bool:
        if client.bucket_exists(bucket):
            return False
        check_name(strict=True)
        try:
            client.make_bucket(bucket, location=settings.region)
        except S3Error as e:
            if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            # Created between our check and our create (another Job, a person): fine if we can see it.
            try:
                ours = client.bucket_exists(bucket)
            except S3Error:
                ours = False
            if not ours:
                raise RuntimeError(
                    f"bucket {bucket!r} at {settings.endpoint} belongs to another account; choose another bucket "
                    f"in {artifacts.STORE_ENV}"
                ) from None
            return False
        return True

    return storage._retry("ensure-bucket", uri, create)


# ----------------------------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `storage ensure-bucket [URI]` to the `llm2clip` command; returns the `storage` parser."""
    store = subparsers.add_parser(
        "storage", help="object-store housekeeping", description="Object-store housekeeping for a cluster."
    )
    actions = store.add_subparsers(dest="storage_command", required=True)
    ensure = actions.add_parser(
        "ensure-bucket",
        help="create the store's bucket if it is missing (idempotent)",
        description="Create the bucket of an s3:// or minio:// location if it does not exist; an existing bucket "
        "is left as it is. Endpoint and credentials come from MINIO_ENDPOINT (or AWS_ENDPOINT_URL), MINIO_SECURE, "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION.",
    )
    ensure.add_argument(
        "uri",
        nargs="?",
        default=None,
        metavar="s3://BUCKET/PREFIX",
        help=f"the location whose bucket to create (default: ${artifacts.STORE_ENV})",
    )
    return store


def run(args: argparse.Namespace) -> int:
    """Run a parsed `storage ...` command; returns the process exit code (0 ok, 1 failed, 2 bad usage)."""
    if args.storage_command != "ensure-bucket":
        raise ValueError(f"storage_command={args.storage_command!r}: unknown storage command")
    uri = args.uri or os.environ.get(artifacts.STORE_ENV)
    if not uri:
        print(f"llm2clip storage ensure-bucket: give a URI or set {artifacts.STORE_ENV}", file=sys.stderr)
        return 2
    try:
        created = ensure_bucket(uri)
    except ValueError as e:
        print(f"llm2clip storage ensure-bucket: {e}", file=sys.stderr)
        return 2
    except (PermissionError, ConnectionError, TimeoutError, RuntimeError) as e:
        print(f"llm2clip storage ensure-bucket: {e}", file=sys.stderr)
        return 1
    bucket = storage.split_uri(uri)[0]
    endpoint = storage.S3Settings.from_env().endpoint
    print(f"bucket {bucket!r} at {endpoint}: {'created' if created else 'already exists'}")
    return 0
