"""`llm2clip submit` through the real kfp 2.17 client against tests/fake_kfp_api.py, which stands in for the KFP API
server (none can run here): what is checked is the requests the client sends and how submit reacts to the answers,
not a real backend's behaviour."""

import argparse
import json
import os
import re
import subprocess
import sys

import kfp
import pytest
import yaml
from fake_kfp_api import FakeKfpApi

from llm2clip import submit

SHA = "0123456789abcdef0123456789abcdef01234567"
git_state = submit.git_state  # the real one; the other tests see a clean checkout at SHA


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No kfp context file, no endpoint or token from the environment, a clean checkout at SHA, no polling delay."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-kfp-context.json"))
    for var in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", submit.TOKEN_ENV, submit.SA_TOKEN_ENV,
                submit.REVISION_ENV):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(submit, "git_state", lambda root: (SHA, False))
    monkeypatch.setattr(submit, "POLL_SECONDS", 0.0)


@pytest.fixture()
def api():
    with FakeKfpApi() as server:
        yield server


def llm2clip_submit(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="llm2clip")
    submit.add_parser(parser.add_subparsers(dest="command"))
    return submit.run(parser.parse_args(["submit", *argv]))


def version_name(*suffix: str) -> str:
    return "-".join([f"{submit.package_version()}-{SHA[:12]}", *suffix])


def posts(api: FakeKfpApi) -> list[str]:
    return [r.path for r in api.requests if r.method == "POST"]


def all_tasks(spec: dict) -> dict[tuple[str, str], dict]:
    """(DAG, task name) -> task, over the root and every sub-DAG (task names repeat across sub-DAGs)."""
    dags = {"root": spec["root"]["dag"], **{k: c["dag"] for k, c in spec["components"].items() if "dag" in c}}
    return {(d, name): task for d, dag in dags.items() for name, task in dag["tasks"].items()}


# ----------------------------------------------------------------------------------------------- first, second


def test_first_submit_uploads_pipeline_version_experiment_and_run(api, capsys):
    rc = llm2clip_submit("--host", api.host, "--set", "num_train=32", "--set", "zero_shot=[]",
                         "--set", "center_text=false", "--service-account", "llm2clip-runner")  # fmt: skip
    assert rc == 0
    assert [(r.method, r.path) for r in api.requests] == [
        ("GET", "/healthz"),  # kfp.Client's constructor
        ("GET", "/pipelines"),
        ("POST", "/pipelines"),
        ("GET", "/pipelines/pipeline-1/versions"),
        ("POST", "/pipelines/upload_version"),
        ("GET", "/experiments"),
        ("POST", "/experiments"),
        ("POST", "/runs"),
    ]
    assert json.loads(api.calls("GET", "/pipelines")[0].query["filter"])["predicates"][0]["stringValue"] == "llm2clip"
    assert api.calls("POST", "/pipelines")[0].body["display_name"] == "llm2clip"
    upload = api.calls("POST", "/pipelines/upload_version")[0]
    digest = submit.spec_sha256(upload.body.decode())
    assert upload.query["name"] == version_name() and upload.query["pipelineid"] == "pipeline-1"
    assert f"sha256:{digest}" in upload.query["description"] and SHA in upload.query["description"]
    assert next(yaml.safe_load_all(upload.body))["pipelineInfo"]["name"] == "llm2clip"
    assert api.calls("POST", "/experiments")[0].body["display_name"] == "llm2clip"
    run = api.calls("POST", "/runs")[0].body
    assert run["pipeline_version_reference"] == {"pipeline_id": "pipeline-1", "pipeline_version_id": "version-2"}
    assert run["experiment_id"] == "experiment-3" and run["service_account"] == "llm2clip-runner"
    assert run["runtime_config"]["parameters"] == {"num_train": 32, "zero_shot": [], "center_text": False}
    assert run["display_name"].startswith(f"llm2clip {version_name()} ")
    out = capsys.readouterr().out
    assert f"version   {version_name()}  (sha256 {digest})" in out
    assert out.rstrip().endswith(f"{api.host}/#/runs/details/run-4")  # the run's UI link, last


def test_second_identical_submit_creates_only_a_run(api, capsys):
    assert llm2clip_submit("--host", api.host) == 0
    before = len(api.requests)
    assert llm2clip_submit("--host", api.host, "--experiment", "llm2clip") == 0
    assert posts(api)[-1:] == ["/runs"] and posts(api).count("/runs") == 2
    assert [r.path for r in api.requests[before:] if r.method == "POST"] == ["/runs"]
    assert len(api.state.versions) == 1 and len(api.state.experiments) == 1
    assert "version   exists, same sha256" in capsys.readouterr().out


def test_same_version_name_with_another_hash_is_refused(api, monkeypatch):
    assert llm2clip_submit("--host", api.host) == 0
    first = submit.spec_sha256(next(iter(api.state.files.values())).decode())
    from llm2clip.pipelines import llm2clip_pipeline as module

    compile_pipeline, seconds = module.compile_pipeline, []

    def compiled_differently(path):  # the same commit compiled by another SDK
        out = compile_pipeline(path)
        out.write_text(re.sub(r"(?m)^sdkVersion: .*$", "sdkVersion: kfp-9.9.9", out.read_text()))
        seconds.append(submit.spec_sha256(out.read_text()))
        return out

    monkeypatch.setattr(module, "compile_pipeline", compiled_differently)
    before = len(api.requests)
    with pytest.raises(SystemExit) as e:
        llm2clip_submit("--host", api.host)
    assert version_name() in str(e.value) and first in str(e.value) and seconds[0] in str(e.value) != first
    assert not [r for r in api.requests[before:] if r.method == "POST"]  # nothing uploaded, no run


def test_the_same_checkout_submitted_from_two_processes_is_one_version(api, tmp_path):
    """Two invocations have two hash seeds, and kfp 2.17 prints non-empty dict defaults in its YAML header comments
    in seed-dependent key order (seeds 1 and 3 differ): the version is still reused, not refused."""
    script = (
        "import argparse, hashlib, sys\n"
        "from pathlib import Path\n"
        "from kfp import compiler\n"
        "from llm2clip import submit\n"
        "from llm2clip.pipelines import llm2clip_pipeline as m\n"
        "def compile_pipeline(path):\n"
        "    options = {'source_format': 'img2dataset', 'short_field': 'txt', 'long_field': 'json.long'}\n"
        "    overrides = {'source_options': options}\n"
        "    compiler.Compiler().compile(m.llm2clip_pipeline, str(path), pipeline_parameters=overrides)\n"
        "    print('bytes', hashlib.sha256(Path(path).read_bytes()).hexdigest(), file=sys.stderr)\n"
        "    return Path(path)\n"
        "m.compile_pipeline = compile_pipeline\n"
        "submit.git_state = lambda root: ('" + SHA + "', False)\n"
        "p = argparse.ArgumentParser(); submit.add_parser(p.add_subparsers(dest='command'))\n"
        "sys.exit(submit.run(p.parse_args(sys.argv[1:])))\n"
    )
    file_hashes = []
    for seed in ("1", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "HOME": str(tmp_path)}  # HOME: no kfp context file
        done = subprocess.run([sys.executable, "-c", script, "submit", "--host", api.host], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        file_hashes += [line.split()[1] for line in done.stderr.splitlines() if line.startswith("bytes ")]
    assert len(file_hashes) == 2 and file_hashes[0] != file_hashes[1]  # the premise: two different files ...
    assert len(api.state.versions) == 1 and len(api.state.runs) == 2  # ... are one version


def test_the_hash_ignores_comments_and_key_order_but_not_content():
    # the compiler prints dict defaults in its header comments in hash-seed dependent order
    a = "# default: {'effect': 'NoSchedule', 'key': 'gpu'}\nroot:\n  a: 1\n  b: [1, 2]\n"
    b = "# default: {'key': 'gpu', 'effect': 'NoSchedule'}\nroot:\n  b: [1, 2]\n  a: 1\n"
    assert submit.spec_sha256(a) == submit.spec_sha256(b) != submit.spec_sha256(b.replace("a: 1", "a: 2"))


# ---------------------------------------------------------------------------------------------------- refusals


def test_dirty_tree_is_refused_unless_forced(api, monkeypatch, capsys):
    monkeypatch.setattr(submit, "git_state", lambda root: (SHA, True))
    with pytest.raises(SystemExit, match="uncommitted changes.*--force"):
        llm2clip_submit("--host", api.host)
    assert api.requests == []
    assert llm2clip_submit("--host", api.host, "--force") == 0
    upload = api.calls("POST", "/pipelines/upload_version")[0]
    digest = submit.spec_sha256(upload.body.decode())
    assert upload.query["name"] == version_name(f"dirty.{digest[:8]}")
    assert "uncommitted changes" in upload.query["description"]


def test_git_state_reads_a_real_checkout(tmp_path):
    def git(*args):
        cmd = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()

    assert git_state(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    assert git_state(tmp_path) == (git("rev-parse", "HEAD"), False)
    (tmp_path / "b.py").write_text("")  # untracked: a new module changes what compiles
    assert git_state(tmp_path)[1] is True
    (tmp_path / "b.py").unlink()
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path)[1] is True
    (tmp_path / "sub").mkdir()
    assert git_state(tmp_path / "sub") is None  # inside some checkout, but not at its top


def test_without_git_the_revision_comes_from_the_environment(api, monkeypatch):
    monkeypatch.setattr(submit, "git_state", lambda root: None)
    with pytest.raises(SystemExit, match=submit.REVISION_ENV):
        llm2clip_submit("--host", api.host, "--dry-run")
    monkeypatch.setenv(submit.REVISION_ENV, SHA)
    assert llm2clip_submit("--host", api.host) == 0
    assert api.calls("POST", "/pipelines/upload_version")[0].query["name"] == version_name()


@pytest.mark.parametrize(
    "pair, message",
    [("num_train=many", "--set num_train='many': expected an int"), ("zero_shot=synthetic", "--set zero_shot="),
     ("nonsense=1", "--set nonsense: unknown pipeline parameter")],
)  # fmt: skip
def test_set_typing_errors_name_the_key_before_any_request(api, pair, message):
    with pytest.raises(SystemExit) as e:
        llm2clip_submit("--host", api.host, "--set", pair)
    assert str(e.value).startswith(message)
    assert api.requests == []


def test_dry_run_sends_nothing(api, capsys):
    assert llm2clip_submit("--host", api.host, "--dry-run", "--set", "train_epochs=3") == 0
    assert api.requests == []
    out = capsys.readouterr().out
    assert "dry run: nothing sent" in out and version_name() in out and '{"train_epochs": 3}' in out


def test_five_field_cron_is_refused_with_a_hint():
    with pytest.raises(SystemExit, match="'0 0 3 \\* \\* \\*' if you meant"):
        llm2clip_submit("--schedule", "0 3 * * *", "--dry-run")


# ------------------------------------------------------------------------------------------ wait, cache, schedule


def test_wait_returns_nonzero_on_a_failed_run(capsys):
    with FakeKfpApi(run_states=("PENDING", "RUNNING", "FAILED")) as api:
        assert llm2clip_submit("--host", api.host, "--wait") == 1
        assert len(api.calls("GET", "/runs/run-4")) == 3
    err = capsys.readouterr().err
    assert "run failed: task train_clip failed" in err and "/#/runs/details/run-4" in err


def test_wait_returns_zero_on_success(api, capsys):
    assert llm2clip_submit("--host", api.host, "--wait") == 0
    assert "run succeeded" in capsys.readouterr().out


def test_no_cache_uploads_a_caching_off_version(api, tmp_path):
    from llm2clip.pipelines.llm2clip_pipeline import compile_pipeline

    assert llm2clip_submit("--host", api.host, "--no-cache") == 0
    upload = api.calls("POST", "/pipelines/upload_version")[0]
    assert upload.query["name"] == version_name("nocache") and "caching disabled" in upload.query["description"]
    uploaded = list(yaml.safe_load_all(upload.body))
    cached = list(yaml.safe_load_all(compile_pipeline(tmp_path / "cached.yaml").read_text()))
    tasks = all_tasks(uploaded[0])
    assert len(tasks) == len(all_tasks(cached[0])) > 5  # ParallelFor bodies included
    assert not [n for n, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")]
    assert [n for n, t in all_tasks(cached[0]).items() if t.get("cachingOptions", {}).get("enableCache")]
    for task in all_tasks(cached[0]).values():  # nothing else changed
        task.pop("cachingOptions", None)
    for task in tasks.values():
        task.pop("cachingOptions", None)
    assert uploaded == cached
    run = api.calls("POST", "/runs")[0].body
    assert "pipeline_spec" not in run  # a run of a version: nothing of it could switch caching off


def test_schedule_creates_one_recurring_run_per_schedule(api, capsys):
    argv = ("--host", api.host, "--schedule", "0 0 3 * * *", "--set", "seed=1")
    assert llm2clip_submit(*argv) == 0
    [created] = api.calls("POST", "/recurringruns")
    body = created.body
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}} and body["mode"] == "ENABLE"
    assert body["runtime_config"]["parameters"] == {"seed": 1} and body["no_catchup"] is True
    assert body["pipeline_version_reference"]["pipeline_version_id"] == "version-2"
    assert f"{api.host}/#/recurringrun/details/recurring-4" in capsys.readouterr().out
    assert llm2clip_submit(*argv) == 0  # the same schedule of the same version: found, not doubled
    assert len(api.calls("POST", "/recurringruns")) == 1
    assert "recurring run exists" in capsys.readouterr().out
    assert llm2clip_submit("--host", api.host, "--schedule", "0 0 4 * * *", "--set", "seed=1") == 0
    assert len(api.calls("POST", "/recurringruns")) == 2
    with pytest.raises(SystemExit, match="--wait"):
        llm2clip_submit(*argv, "--wait")


# ------------------------------------------------------------------------------------------------ credentials


def test_token_from_file_or_environment_reaches_every_request(api, monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("file-token\n")
    assert llm2clip_submit("--host", api.host, "--token-file", str(token)) == 0
    assert {r.headers.get("authorization") for r in api.requests} == {"Bearer file-token"}
    api.requests.clear()
    monkeypatch.setenv(submit.TOKEN_ENV, "env-token")
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", api.host)  # the endpoint from the environment too
    assert llm2clip_submit() == 0
    assert {r.headers.get("authorization") for r in api.requests} == {"Bearer env-token"}
    with pytest.raises(SystemExit, match="no such file"):
        llm2clip_submit("--token-file", str(tmp_path / "missing"))


def test_namespace_scopes_the_experiment(api):
    assert llm2clip_submit("--host", api.host, "--namespace", "team-a", "--experiment", "nightly") == 0
    assert api.calls("GET", "/experiments")[0].query["namespace"] == "team-a"
    assert api.calls("POST", "/experiments")[0].body == {"display_name": "nightly", "namespace": "team-a"}


def test_server_errors_become_a_message(api, monkeypatch):
    monkeypatch.setattr(api, "reference_problem", lambda body: "experiment not found")
    with pytest.raises(SystemExit, match="HTTP 400.*experiment not found"):
        llm2clip_submit("--host", api.host)
