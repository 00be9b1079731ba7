"""llm2clip.bucket (`llm2clip storage ensure-bucket`) against real S3-protocol servers (moto; nanio for refusals)."""

import argparse
import uuid

import pytest

from llm2clip import bucket, storage


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


def test_a_lost_race_still_succeeds(s3_env, monkeypatch):
    """Two Jobs at once: both see no bucket, the other one creates it first; ours must not fail."""
    uri = fresh_bucket_uri()
    assert bucket.ensure_bucket(uri) is True
    minio_class = type(storage._s3())
    real, calls = minio_class.bucket_exists, []

    def first_sees_nothing(self, name):
        calls.append(name)
        return False if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(minio_class, "bucket_exists", first_sees_nothing)
    assert bucket.ensure_bucket(uri) in (True, False)  # S3 in us-east-1 answers 200 to a re-create of one's own
    assert len(calls) >= 1


@pytest.mark.parametrize("uri", ["/tmp/local/dir", "file:///tmp/x", "s3:///no-bucket", "gs://b/p"])
def test_rejects_what_is_not_an_object_store_location(s3_env, uri):
    with pytest.raises(ValueError, match="not an object-store URI"):
        bucket.ensure_bucket(uri)


def test_rejects_an_invalid_bucket_name(s3_env):
    with pytest.raises(ValueError):
        bucket.ensure_bucket("s3://ab/x")  # S3 bucket names have 3 to 63 characters


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
    with pytest.raises(SystemExit):
        cli(["storage"])  # a storage command is required


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
