"""S3 credentials never leave the environment (issue 9 item 5): not in the compiled pipeline, logs, reports,
manifests or artifact metadata of a whole run against an S3 server that accepts only those credentials."""

import base64
import json

import pytest
from llm2clip.pipelines.llm2clip_pipeline import COMPILED, compile_pipeline

from llm2clip import artifacts, storage
from llm2clip.ops import cli

# Known fake credentials, distinctive enough that any copy of them shows up in a byte search.
ACCESS_KEY = "LLM2CLIPFAKEKEY7Q3ZX9"
SECRET_KEY = "fake-secret-Vq7Lm2Xc9Rt4Bn8Kw3Jp6Hs1"


def leaks(data: bytes) -> list[str]:
    """Which credential appears in `data`, as it is or base64-encoded."""
    found = []
    for secret in (ACCESS_KEY, SECRET_KEY):
        if secret.encode() in data or base64.b64encode(secret.encode()) in data:
            found.append(secret)
    return found


@pytest.mark.slow
def test_credentials_appear_in_no_output_of_a_run(tmp_path, monkeypatch, capfd):
    from s3_servers import make_bucket, nanio

    out, store = tmp_path / "run", "s3://llm2clip-run/prefix"
    with nanio(tmp_path / "s3-data", ACCESS_KEY, SECRET_KEY) as port:  # refuses any other credentials
        for key, value in {
            "MINIO_ENDPOINT": f"127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv(artifacts.STORE_ENV, store)  # restored after the test (the CLI sets it for its tasks)
        make_bucket("llm2clip-run")
        assert cli.main(["run", "--local", "--profile", "tiny", "--output", str(out), "--store", store]) == 0
        stored = {uri: storage.read_bytes(uri) for uri in storage.list_files(store, recursive=True)}
    compiled = compile_pipeline(tmp_path / "llm2clip.yaml")
    logs = capfd.readouterr()

    # the run used the store, so the credentials were in every task's environment
    assert any(uri.endswith(artifacts.MANIFEST) for uri in stored)
    assert json.loads((out / "summary.json").read_text())["retrieval"]
    files = [compiled, COMPILED, *(p for p in out.rglob("*") if p.is_file())]
    assert any(p.name == "executor_output.json" for p in files)  # the artifact metadata KFP keeps
    assert len(files) > 20 and len(stored) > 20
    found = {str(p): leaks(p.read_bytes()) for p in files}
    found |= {uri: leaks(data) for uri, data in stored.items()}
    found |= {"stdout": leaks(logs.out.encode()), "stderr": leaks(logs.err.encode())}
    assert not {where: which for where, which in found.items() if which}
