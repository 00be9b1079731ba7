"""`llm2clip submit` through the real kfp 2.17 client against tests/fake_kfp_api.py, which stands in for the KFP API
server (none can run here): what is checked is the requests the client sends and how submit reacts to the answers,
not a real backend's behaviour. Where the real server is stricter than a naive stand-in (pages, 409s, multi-user
identity, its release in healthz), the stand-in follows the upstream source it cites."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kfp
import pytest
import yaml
from fake_kfp_api import FakeKfpApi

from llm2clip.ops import submit

SHA = "0123456789abcdef0123456789abcdef01234567"
git_state = submit.git_state  # the real one; the other tests see a clean checkout at SHA
ROOT = Path(__file__).resolve().parents[1]
NAMES = json.loads((ROOT / "manifests" / "names.json").read_text())
# `llm2clip submit` in a process of its own, from a clean checkout at SHA
SUBMIT = (
    "import argparse, sys\n"
    "from llm2clip.ops import submit\n"
    "submit.git_state = lambda root: ('" + SHA + "', False)\n"
    "p = argparse.ArgumentParser(); submit.add_parser(p.add_subparsers(dest='command'))\n"
    "sys.exit(submit.run(p.parse_args(sys.argv[1:])))\n"
)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No kfp context file, no endpoint or token from the environment, a clean checkout at SHA, no polling delay."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-kfp-context.json"))
    for var in (
        "KF_PIPELINES_ENDPOINT",
        "KF_PIPELINES_UI_ENDPOINT",
        submit.TOKEN_ENV,
        submit.SA_TOKEN_ENV,
        submit.REVISION_ENV,
    ):
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
    rc = llm2clip_submit(
        "--host",
        api.host,
        "--set",
        "num_train=32",
        "--set",
        "zero_shot=[]",
        "--set",
        "center_text=false",
        "--service-account",
        "llm2clip-runner",
    )
    assert rc == 0
    assert [(r.method, r.path) for r in api.requests] == [
        ("GET", "/healthz"),  # kfp.Client's constructor
        ("GET", "/healthz"),  # submit: the server's release and mode
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
        "from llm2clip.ops import submit\n"
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
    for seed in ("1", "3", "2", "4", "5"):  # until two seeds compile different bytes (1 and 3 did, not everywhere)
        if len(set(file_hashes)) > 1:
            break
        env = {**os.environ, "PYTHONHASHSEED": seed, "HOME": str(tmp_path)}  # HOME: no kfp context file
        done = subprocess.run(
            [sys.executable, "-c", script, "submit", "--host", api.host],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        file_hashes += [line.split()[1] for line in done.stderr.splitlines() if line.startswith("bytes ")]
    assert len(set(file_hashes)) > 1  # the premise: different files ...
    assert len(api.state.versions) == 1 and len(api.state.runs) == len(file_hashes)  # ... are one version


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
    [
        ("num_train=many", "--set num_train='many': expected an int"),
        ("zero_shot=synthetic", "--set zero_shot="),
        ("nonsense=1", "--set nonsense: unknown pipeline parameter"),
    ],
)
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


def test_runs_run_as_the_project_runner_unless_told_otherwise(api):
    """Single-user KFP runs a pipeline's pods as pipeline-runner (kubeflow/pipelines 2.16.0 backend/src/apiserver/
    common/const.go:59), whose Role grants nothing on trainer.kubeflow.org (2.16.0 manifests/kustomize/base/pipeline/
    pipeline-runner-role.yaml): the multi-node stage 2 would get 403 creating its TrainJob. So runs and recurring
    runs default to the runner manifests/ deploy (names.json), whose Role may create TrainJobs; '' is the server's."""
    assert submit.RUNNER_SERVICE_ACCOUNT == NAMES["service_account"]
    assert llm2clip_submit("--host", api.host) == 0
    assert llm2clip_submit("--host", api.host, "--schedule", "0 0 3 * * *") == 0
    assert llm2clip_submit("--host", api.host, "--service-account", "") == 0
    first, server_default = [r.body for r in api.calls("POST", "/runs")]
    assert first["service_account"] == NAMES["service_account"]
    assert api.calls("POST", "/recurringruns")[0].body["service_account"] == NAMES["service_account"]
    assert not server_default.get("service_account")


# ------------------------------------------------------------------------------------------------- the backend


@pytest.mark.parametrize("tag", ["2.15.0", "2.5.1", "v2.15.2"])
def test_an_older_backend_is_refused_naming_both_versions_and_why(tag):
    with FakeKfpApi(tag_name=tag) as api:
        with pytest.raises(SystemExit) as e:
            llm2clip_submit("--host", api.host)
    message = str(e.value)
    assert f"is version {tag}; llm2clip needs a Kubeflow Pipelines backend {submit.MIN_KFP_BACKEND} or newer" in message
    assert submit.MIN_KFP_BACKEND_REASON in message
    assert [r.path for r in api.requests] == ["/healthz", "/healthz"]  # checked before anything else


@pytest.mark.parametrize("tag", [submit.MIN_KFP_BACKEND, "2.17.0", "3.0.0rc1", "unknown"])
def test_a_current_backend_is_accepted(tag, capsys):
    with FakeKfpApi(tag_name=tag) as api:
        assert llm2clip_submit("--host", api.host) == 0
    warned = "cannot check it is" in capsys.readouterr().err
    assert warned == (tag == "unknown")  # a build without TAG_NAME: said, not refused


def test_a_pipeline_version_and_experiment_beyond_the_first_page_are_found(api, capsys):
    """The API server pages every listing (20 unless asked, at most 200, kubeflow/pipelines 2.16.0 backend/src/
    apiserver/list/list.go:383-403). A crowded server: ours come after 45 other pipelines and experiments and 230
    other versions. The second submit must find all three (the filtered lookups, and every page of versions) and
    create nothing but the run."""
    assert llm2clip_submit("--host", api.host) == 0
    state = api.state
    ours = {
        kind: dict(items) for kind, items in (("p", state.pipelines), ("v", state.versions), ("e", state.experiments))
    }
    for items in (state.pipelines, state.versions, state.experiments):
        items.clear()
    for i in range(45):
        api.add_pipeline(f"other-{i}")
        api.add_experiment(f"other-{i}")
    for i in range(230):
        api.add_version("pipeline-1", f"0.0.{i}-{i:012x}")
    state.pipelines |= ours["p"]
    state.versions |= ours["v"]
    state.experiments |= ours["e"]
    before = len(api.requests)
    assert llm2clip_submit("--host", api.host) == 0
    assert [r.path for r in api.requests[before:] if r.method == "POST"] == ["/runs"]
    listed = api.calls("GET", "/pipelines/pipeline-1/versions")[-3:]
    assert [bool(r.query.get("page_token")) for r in listed] == [False, True, True]  # 231 versions, 100 a page
    assert "version   exists, same sha256" in capsys.readouterr().out


def test_two_submits_racing_for_one_version_both_run_it(tmp_path):
    """Two submits of one checkout at once (two nightly jobs, a person and the nightly job): both find no pipeline
    and no version, both create and upload; the server keeps the first of each and answers the second 409
    (kubeflow/pipelines 2.16.0 backend/src/apiserver/storage/pipeline_store.go:609-612, server/
    pipeline_upload_server.go:307-311). The loser must find what the winner made, check its hash, and run it."""
    with FakeKfpApi(racing=2) as racing:
        env = {**os.environ, "HOME": str(tmp_path)}
        argv = [sys.executable, "-c", SUBMIT, "submit", "--host", racing.host]
        submits = [
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
        ]
        done = [p.communicate(timeout=300) for p in submits]
    assert [p.returncode for p in submits] == [0, 0], [err[-2000:] for _, err in done]
    outs = sorted(out for out, _ in done)
    assert [o.count("version   uploaded") for o in outs] in ([0, 1], [1, 0])
    assert sum(o.count("version   exists, same sha256") for o in outs) == 1
    assert sum(o.count("pipeline  exists") for o in outs) == 1
    assert len(racing.calls("POST", "/pipelines/upload_version")) == 2  # both raced...
    assert len(racing.state.pipelines) == len(racing.state.versions) == 1 and len(racing.state.runs) == 2  # ...one won


def test_a_multi_user_server_needs_a_namespace_and_an_identity(monkeypatch, tmp_path):
    """Multi-user KFP: experiments and runs belong to a namespace (kubeflow/pipelines 2.16.0 backend/src/apiserver/
    server/experiment_server.go:356-357), and each request must say who sends it (resource/resource_manager.go:
    1929-1945, 401 without): the kubeflow-userid header, which the multi-user install names as the identity header
    (manifests/kustomize/base/installs/multi-user/api-service/deployment-patch.yaml:14-17), or a bearer token the
    server checks with a TokenReview (auth/auth.go:35-45). submit refuses to start without a namespace, explains a
    401, and carries a token, or the header a kfp context sets, on every request."""
    users = {"alice-token": "alice@example.com"}
    with FakeKfpApi(multi_user=True, tokens=users, namespaces={"alice@example.com": {"team-a"}}) as api:
        with pytest.raises(SystemExit, match="multi-user mode.*pass --namespace"):
            llm2clip_submit("--host", api.host)
        assert [r.path for r in api.requests] == ["/healthz", "/healthz"]  # refused before any upload
        with pytest.raises(SystemExit, match="HTTP 401.*bearer token.*kubeflow-userid header"):
            llm2clip_submit("--host", api.host, "--namespace", "team-a")
        token = tmp_path / "token"
        token.write_text("alice-token")
        with pytest.raises(SystemExit, match="HTTP 403.*User 'alice@example.com' is not authorized"):
            llm2clip_submit("--host", api.host, "--namespace", "team-b", "--token-file", str(token))
        api.requests.clear()
        assert llm2clip_submit("--host", api.host, "--namespace", "team-a", "--token-file", str(token)) == 0
        assert {r.headers.get("authorization") for r in api.requests} == {"Bearer alice-token"}
        # a kfp context with the identity header and the namespace, as a person outside the cluster may have
        context = tmp_path / "context.json"
        context.write_text(
            json.dumps(
                {
                    "namespace": "team-a",
                    "client_authentication_header_name": "kubeflow-userid",
                    "client_authentication_header_value": "alice@example.com",
                }
            )
        )
        monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(context))
        api.requests.clear()
        assert llm2clip_submit("--host", api.host) == 0
        assert {r.headers.get("kubeflow-userid") for r in api.requests} == {"alice@example.com"}
    experiments = [e for e in api.state.experiments.values() if e["display_name"] == submit.DEFAULT_EXPERIMENT]
    assert [e["namespace"] for e in experiments] == ["team-a"] and len(api.state.runs) == 2


# ----------------------------------------------------------------------------------------- from the built image


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory) -> Path:
    """The project installed as images/Dockerfile installs it: its sources copied, then `pip install --no-index
    --no-deps --no-build-isolation` (not editable), here into a directory of its own with no git checkout above."""
    root = tmp_path_factory.mktemp("image")
    source = root / "opt-src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("src", "components", "pipelines"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(root / "site"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "site"


def test_submit_from_the_built_image_names_the_version_after_the_baked_revision(installed_copy, api, tmp_path):
    """In the image there is no git checkout: `llm2clip submit` (the nightly submitter's command) names the version
    after LLM2CLIP_REVISION, which images/Dockerfile bakes into ENV, and refuses, saying so, without it."""
    revision = "fedcba9876543210fedcba9876543210fedcba98"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "KF_PIPELINES_", "LLM2CLIP_"))}
    env |= {"PYTHONPATH": str(installed_copy), "HOME": str(tmp_path), submit.REVISION_ENV: revision}
    where = subprocess.run(
        [sys.executable, "-c", "import llm2clip; print(llm2clip.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(installed_copy))  # the installed copy runs, not this checkout
    llm2clip_cli = Path(sys.executable).parent / "llm2clip"  # the console script, as the image's PATH has it
    done = subprocess.run(
        [str(llm2clip_cli), "submit", "--host", api.host],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    upload = api.calls("POST", "/pipelines/upload_version")[0]
    assert upload.query["name"] == f"{submit.package_version()}-{revision[:12]}"
    assert f"at git {revision}" in upload.query["description"] and "uncommitted" not in upload.query["description"]
    before = len(api.requests)
    del env[submit.REVISION_ENV]
    done = subprocess.run(
        [str(llm2clip_cli), "submit", "--host", api.host],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and len(api.requests) == before  # nothing sent
    assert f"is not a git checkout and {submit.REVISION_ENV} (unset) is not a commit sha" in done.stderr
