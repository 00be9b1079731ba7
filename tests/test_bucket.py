"""llm2clip.ops.bucket (`llm2clip storage ensure-bucket`) against real S3-protocol servers (moto; nanio refuses)."""

import argparse
import io
import os
import uuid

import pytest
from minio import Minio
from minio.error import S3Error

from llm2clip import storage
from llm2clip.ops import bucket


def fresh_bucket_uri(scheme: str = "s3") -> str:
    return f"{scheme}://b-{uuid.uuid4().hex[:12]}/llm2clip/store"


def cli(argv: list[str]) -> int:
    """Parse and run as `llm2clip` would once cli.py adds the parser."""
    parser = argparse.ArgumentParser(prog="llm2clip")
    bucket.add_parser(parser.add_subparsers(dest="command", required=True))
    return bucket.run(parser.parse_args(argv))


def test_creates_a_missing_bucket_once_and_keeps_what_is_in_it(s3_env):
    uri = fresh_bucket_uri()
    assert bucket.ensure_bucket(uri) is True
    storage.write_bytes(storage.join(uri, "kept.txt"), b"still here")
    assert bucket.ensure_bucket(uri) is False  # idempotent: the second run changes nothing
    assert bucket.ensure_bucket(uri) is False
    assert storage.read_bytes(storage.join(uri, "kept.txt")) == b"still here"


def test_minio_scheme_and_an_existing_bucket(s3_env):
    existing = s3_env.split("/")[2]  # s3_env made this bucket already
    assert bucket.ensure_bucket(f"minio://{existing}/other/prefix") is False
    assert bucket.ensure_bucket(fresh_bucket_uri("minio")) is True


@pytest.mark.parametrize("region, created", [("eu-west-1", False), ("us-east-1", True)])
def test_a_lost_race_still_succeeds(s3_env, monkeypatch, region, created):
    """Two Jobs at once: ours finds no bucket, then the other Job (a second client on the same server) creates it
    and writes to it before our create call. Ours must succeed and leave the other's bucket and objects alone.

    Outside us-east-1 the re-create is refused with BucketAlreadyOwnedByYou and ensure_bucket answers False (it did
    not create the bucket). In us-east-1, S3 answers 200 to a re-create of one's own bucket, so neither Job can
    tell it lost and both answer True; moto models this (getmoto/moto tag 5.2.5, moto/s3/responses.py lines
    1139-1146, "us-east-1 has different behavior - creating a bucket there is an idempotent operation").
    """
    monkeypatch.setenv("AWS_REGION", region)
    uri = fresh_bucket_uri()
    name = storage.split_uri(uri)[0]
    env = os.environ
    other = Minio(
        env["MINIO_ENDPOINT"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], secure=False, region=region
    )  # the other Job's own client (storage caches and shares its client)
    minio_class = type(other)
    real_exists, real_make = minio_class.bucket_exists, minio_class.make_bucket
    checks, creates = [], []

    def the_other_job_wins(self, bucket_name):
        found = real_exists(self, bucket_name)
        if self is not other and not checks:  # our first check sees no bucket; then the other Job creates it
            real_make(other, bucket_name, location=region)
            other.put_object(bucket_name, "theirs.txt", io.BytesIO(b"the other Job's"), 15)
        checks.append(found)
        return found

    def recording_make(self, bucket_name, location=None, object_lock=False):
        try:
            real_make(self, bucket_name, location=location, object_lock=object_lock)
        except S3Error as e:
            creates.append(e.code)
            raise
        creates.append("ok")

    monkeypatch.setattr(minio_class, "bucket_exists", the_other_job_wins)
    monkeypatch.setattr(minio_class, "make_bucket", recording_make)
    assert bucket.ensure_bucket(uri) is created
    if created:  # us-east-1: the create call went through; there was no race to detect
        assert checks == [False] and creates == ["ok"]
    else:  # the race branch: the refused create, then a check that finds the bucket ours
        assert checks == [False, True] and creates == ["BucketAlreadyOwnedByYou"]
    assert storage.read_bytes(storage.join(f"s3://{name}", "theirs.txt")) == b"the other Job's"
    assert bucket.ensure_bucket(uri) is False  # and from now on, for every Job, the bucket exists


@pytest.mark.parametrize("uri", ["/tmp/local/dir", "file:///tmp/x", "s3:///no-bucket", "gs://b/p"])
def test_rejects_what_is_not_an_object_store_location(s3_env, uri):
    with pytest.raises(ValueError, match="not an object-store URI"):
        bucket.ensure_bucket(uri)


RULE = r"\(a new S3 bucket name has 3 to 63 lowercase letters"


@pytest.mark.parametrize("name", ["ab", "-dash-first", "a" * 64, "two..dots"])
def test_rejects_an_invalid_bucket_name_before_any_request(monkeypatch, name):
    """No endpoint is set: the name is refused before any request, with the URI and the rule."""
    for var in ("MINIO_ENDPOINT", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=rf"^s3://{name}/x: .*bucket name {name} .*{RULE}"):
        bucket.ensure_bucket(f"s3://{name}/x")


@pytest.mark.parametrize("name", ["Upper-Case", "under_score"])
def test_a_legacy_bucket_name_is_looked_up_but_never_created(s3_env, name):
    """S3 still serves buckets named before the strict rule (capitals, underscores), but creates none."""
    with pytest.raises(ValueError, match=rf"^s3://{name}/x: invalid bucket name {name} {RULE}"):
        bucket.ensure_bucket(f"s3://{name}/x")
    assert cli(["storage", "ensure-bucket", f"s3://{name}/x"]) == 2


def test_a_bucket_of_another_account_is_named_as_such(s3_env, monkeypatch):
    """S3 answers BucketAlreadyExists when the name is taken by someone else, whom we cannot see."""
    from minio.error import S3Error

    def taken(self, name, location=None, object_lock=False):
        raise S3Error(None, "BucketAlreadyExists", "taken", name, "req", "host", bucket_name=name)

    minio_class = type(storage._s3())
    monkeypatch.setattr(minio_class, "bucket_exists", lambda self, name: False)
    monkeypatch.setattr(minio_class, "make_bucket", taken)
    with pytest.raises(RuntimeError, match="belongs to another account"):
        bucket.ensure_bucket(fresh_bucket_uri())


def test_cli_reports_created_then_exists_and_reads_the_store_from_the_environment(s3_env, monkeypatch, capsys):
    uri = fresh_bucket_uri()
    assert cli(["storage", "ensure-bucket", uri]) == 0
    assert "created" in capsys.readouterr().out
    monkeypatch.setenv("LLM2CLIP_STORE", uri)
    assert cli(["storage", "ensure-bucket"]) == 0
    out = capsys.readouterr().out
    assert "already exists" in out and uri.split("/")[2] in out


def test_cli_usage_errors(s3_env, monkeypatch, capsys):
    monkeypatch.delenv("LLM2CLIP_STORE", raising=False)
    assert cli(["storage", "ensure-bucket"]) == 2
    assert "LLM2CLIP_STORE" in capsys.readouterr().err
    assert cli(["storage", "ensure-bucket", "/local/path"]) == 2
    assert "not an object-store URI: '/local/path'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        cli(["storage"])  # a storage command is required
    assert usage.value.code == 2 and "required: storage_command" in capsys.readouterr().err


def test_cli_without_an_endpoint_fails_clearly(monkeypatch, capsys):
    for var in ("MINIO_ENDPOINT", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    assert cli(["storage", "ensure-bucket", "s3://some-bucket/p"]) == 1
    assert "MINIO_ENDPOINT" in capsys.readouterr().err


def test_refused_credentials_fail_fast_and_never_print_the_secret(tmp_path, monkeypatch, capsys):
    from s3_servers import nanio

    with nanio(tmp_path, "right-key", "right-secret-value") as port:
        monkeypatch.setenv("MINIO_ENDPOINT", f"127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "right-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "right-secret-value")
        monkeypatch.setenv("LLM2CLIP_S3_RETRIES", "3")
        assert bucket.ensure_bucket("s3://data/x") is True
        assert bucket.ensure_bucket("s3://data/x") is False
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
        with pytest.raises(PermissionError, match="refused access"):
            bucket.ensure_bucket("s3://data/x")
        assert cli(["storage", "ensure-bucket", "s3://other/x"]) == 1
        err = capsys.readouterr().err
        assert "refused" in err and "wrong-secret-value" not in err and "right-secret-value" not in err


def test_unreachable_endpoint_fails_after_retries(monkeypatch, capsys):
    from s3_servers import free_port

    monkeypatch.setenv("MINIO_ENDPOINT", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("LLM2CLIP_S3_RETRIES", "1")
    assert cli(["storage", "ensure-bucket", "s3://some-bucket/p"]) == 1
    assert "unreachable after 2 attempts" in capsys.readouterr().err
