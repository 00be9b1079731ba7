"""`llm2clip submit`: upload the compiled pipeline to a Kubeflow Pipelines API server as a named, hashed version and
start a run (or a recurring run) of exactly that version.

The version is named `<package version>-<git sha12>` and its description carries the compiled pipeline's sha256
(`spec_sha256`), so a version on the server can always be traced to a commit and checked against what this checkout
compiles: the same name with the same hash is reused, the same name with another hash is refused. Runs are created
from the version (not from an inline spec), so every run in the UI links to the version it ran, as the project's
runner ServiceAccount unless told otherwise.

Before anything is uploaded the server's release is checked against MIN_KFP_BACKEND (its healthz), and a
multi-user server must be given a namespace (each request then carries the caller's identity: a bearer token,
which the API server checks with a TokenReview, or the kubeflow-userid header the Kubeflow gateway adds).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import llm2clip

DEFAULT_EXPERIMENT = "llm2clip"
# The runs' pods run as the project's runner (manifests/names.json service_account; a test checks they agree): in
# single-user KFP the server's default, pipeline-runner, may not create TrainJobs (trainer.kubeflow.org), so a
# multi-node stage 2 would get 403. --service-account '' leaves it to the server.
RUNNER_SERVICE_ACCOUNT = "llm2clip-runner"
# The oldest KFP backend (API server and driver) the compiled pipeline runs on, and why: `submit` refuses older ones.
MIN_KFP_BACKEND = "2.16.0"
MIN_KFP_BACKEND_REASON = "the pipeline is compiled by the kfp 2.17 SDK, whose fields older API servers and drivers drop"
TOKEN_ENV = "KF_PIPELINES_TOKEN"  # a bearer token (e.g. `kubectl create token ...`); --token-file wins over it
REVISION_ENV = "LLM2CLIP_REVISION"  # the commit an installed (non-git) copy was built from, e.g. set in the image
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp's own: a projected ServiceAccount token file inside a pod
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"  # kfp's default for it
POLL_SECONDS = 10.0  # --wait: seconds between two GET /runs/{id}
FINISHED = ("SUCCEEDED", "SKIPPED", "FAILED", "CANCELED")  # a run in one of these states changes no more
SOURCE_ROOT = Path(llm2clip.__file__).resolve().parents[2]  # the checkout, when installed from one (editable)
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Package:
    """A compiled pipeline ready to upload: the YAML file, its hash and the version it becomes on the server."""

    path: Path
    sha256: str
    version_name: str
    description: str


# ---------------------------------------------------------------------------------------------------------- naming


def git_state(root: Path) -> tuple[str, bool] | None:
    """(HEAD commit, whether the work tree has changes) of the git checkout whose top is `root`; None if none is."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != root.resolve():
            return None  # e.g. installed into a venv that happens to sit inside some other repository
        sha = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain").strip())  # untracked files count: a new module changes the build
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha, dirty


def source_revision(force: bool) -> tuple[str, bool]:
    """The commit this code was built from and whether it differs from it; refuses a dirty tree unless `force`."""
    state = git_state(SOURCE_ROOT)
    if state is None:
        sha = os.environ.get(REVISION_ENV, "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{12,40}", sha):
            raise SystemExit(
                f"cannot name the pipeline version: {SOURCE_ROOT} is not a git checkout and {REVISION_ENV} "
                f"({sha or 'unset'}) is not a commit sha (12-40 hex digits); set it to the commit this copy was "
                "built from"
            )
        return sha, False
    sha, dirty = state
    if dirty and not force:
        raise SystemExit(
            f"the git tree at {SOURCE_ROOT} has uncommitted changes (git status --porcelain): a version named after "
            f"{sha[:12]} would not be that commit. Commit them, or pass --force to upload a version marked dirty"
        )
    return sha, dirty


def package_version() -> str:
    from importlib.metadata import version

    return version("llm2clip-kfp")


def version_name(sha: str, dirty: bool, no_cache: bool, spec_sha: str) -> str:
    """`<package version>-<sha12>`, `-nocache` for the caching-off build, `-dirty.<sha8 of the spec>` for a forced dirty
    tree.

    A dirty build is named after its content as well, so each edit gets its own version instead of clashing with
    the clean commit's (or the previous edit's) hash."""
    name = f"{package_version()}-{sha[:12]}"
    if no_cache:
        name += "-nocache"
    if dirty:
        name += f"-dirty.{spec_sha[:8]}"
    return name


# --------------------------------------------------------------------------------------------------------- compile


def disable_caching(path: Path) -> None:
    """Rewrite a compiled pipeline so that no task may be served from the cache.

    Why here and not on the run: the API server ignores a run's `enable_caching` when the run references an
    uploaded version (the kfp client applies it only to an inline pipeline spec), so a run of a version always
    caches as compiled. Every task in every DAG (root and ParallelFor/sub-DAGs) is switched off, also those that set
    caching explicitly; the result is written by the kfp compiler's own writer, so it reads like `llm2clip compile`.
    """
    import yaml
    from google.protobuf import json_format
    from kfp.compiler import pipeline_spec_builder
    from kfp.pipeline_spec import pipeline_spec_pb2

    from llm2clip.pipelines.llm2clip_pipeline import llm2clip_pipeline

    docs = list(yaml.safe_load_all(path.read_text()))
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(docs[1] if len(docs) > 1 else {}, pipeline_spec_pb2.PlatformSpec())
    dags = [spec.root.dag] + [c.dag for c in spec.components.values() if c.HasField("dag")]
    for dag in dags:
        for task in dag.tasks.values():
            task.caching_options.enable_cache = False
    pipeline_spec_builder.write_pipeline_spec_to_file(spec, llm2clip_pipeline.description, platform, str(path))


def spec_sha256(text: str) -> str:
    """sha256 of a compiled pipeline's YAML documents as canonical JSON (sorted keys, no whitespace).

    Not of the file's bytes: kfp 2.17's header comments print non-empty dict defaults (a toleration, say) in
    hash-seed dependent key order, so the same commit compiled in two processes can give two files that differ in
    comments only. The canonical form changes exactly when the pipeline does."""
    import yaml

    docs = list(yaml.safe_load_all(text))
    return hashlib.sha256(json.dumps(docs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def compile_package(directory: Path, *, sha: str, dirty: bool, no_cache: bool) -> Package:
    """Compile the pipeline into `directory`/llm2clip.yaml and name the version it becomes."""
    from llm2clip.pipelines.llm2clip_pipeline import compile_pipeline

    path = compile_pipeline(directory / "llm2clip.yaml")
    if no_cache:
        disable_caching(path)
    digest = spec_sha256(path.read_text())
    description = (
        f"sha256:{digest} (compiled pipeline, canonical JSON); llm2clip-kfp {package_version()} at git {sha}"
        + (" with uncommitted changes" if dirty else "")
        + ("; caching disabled in every task" if no_cache else "")
    )
    return Package(path, digest, version_name(sha, dirty, no_cache, digest), description)


# -------------------------------------------------------------------------------------------------------- server


def make_client(host: str | None, token_file: Path | None):
    """A kfp.Client; the endpoint from --host, else KF_PIPELINES_ENDPOINT, else in-cluster or the kubeconfig (via the
    Kubernetes API server's service proxy to ml-pipeline in `kubeflow`); a bearer token from --token-file, else
    $KF_PIPELINES_TOKEN, else a projected ServiceAccount token (KF_PIPELINES_SA_TOKEN_PATH or kfp's default path)."""
    import kfp

    kwargs: dict = {}
    if token_file is not None:  # re-read on every request: projected tokens rotate
        kwargs["credentials"] = kfp.client.ServiceAccountTokenVolumeCredentials(path=str(token_file))
    elif os.environ.get(TOKEN_ENV):
        kwargs["existing_token"] = os.environ[TOKEN_ENV]
    elif os.environ.get(SA_TOKEN_ENV) or Path(SA_TOKEN_PATH).exists():
        kwargs["credentials"] = kfp.client.ServiceAccountTokenVolumeCredentials()
    with warnings.catch_warnings():  # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later"
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=host, **kwargs)


def quiet():
    """The kfp client prints its own 'X details: <link>' lines; submit prints one summary of its own instead."""
    return contextlib.redirect_stdout(io.StringIO())


def find_version(client, pipeline_id: str, name: str):
    """The pipeline's version named `name`, or None; every page is read (the API server returns at most 200 items a
    page, 20 unless asked: kubeflow/pipelines 2.16.0 backend/src/apiserver/list/list.go:383-403)."""
    token = ""
    while True:
        page = client.list_pipeline_versions(pipeline_id, page_token=token, page_size=100)
        for v in page.pipeline_versions or []:
            if v.display_name == name:
                return v
        token = page.next_page_token or ""
        if not token:
            return None


@dataclass(frozen=True)
class Backend:
    """What the KFP API server says of itself: its release (`tag_name`, "unknown" in a build without one) and
    whether it runs in multi-user mode."""

    version: str
    multi_user: bool


def backend_info(client) -> Backend:
    """The server's healthz, read as raw JSON: the API server writes `tag_name` into it by hand (kubeflow/pipelines
    2.16.0 backend/src/apiserver/main.go:380-384, from its TAG_NAME, set at release builds), and kfp_server_api's
    model of the reply has no such field (backend/api/v2beta1/healthz.proto: multi_user, pipeline_store)."""
    response = client.healthzs.healthz_service_get_healthz(_preload_content=False)
    info = json.loads(response.data or b"{}")
    return Backend(str(info.get("tag_name") or "unknown"), bool(info.get("multi_user")))


def check_backend_version(where: str, version: str) -> None:
    """Refuse a server older than MIN_KFP_BACKEND, naming both versions and why; only warn when it names none."""
    from packaging.version import InvalidVersion, Version

    try:
        found = Version(version.removeprefix("v"))
    except InvalidVersion:
        print(
            f"warning: the KFP API server {where} reports version {version!r}, not a release: cannot check it is "
            f"{MIN_KFP_BACKEND} or newer ({MIN_KFP_BACKEND_REASON})",
            file=sys.stderr,
        )
        return
    if found < Version(MIN_KFP_BACKEND):
        raise SystemExit(
            f"the KFP API server {where} is version {version}; llm2clip needs a Kubeflow Pipelines backend "
            f"{MIN_KFP_BACKEND} or newer: {MIN_KFP_BACKEND_REASON}. Nothing was uploaded"
        )


def recorded_sha256(version) -> str | None:
    match = _SHA256.search(version.description or "")
    return match.group(1) if match else None


def check_same(version, package: Package) -> None:
    recorded = recorded_sha256(version)
    if recorded != package.sha256:
        raise SystemExit(
            f"pipeline version {package.version_name} already exists with pipeline sha256 {recorded or 'unknown'}"
            f", but this checkout compiles to sha256 {package.sha256}: the same commit built differently (another kfp "
            "SDK? another environment?). Nothing was uploaded; find the difference, or commit and submit again"
        )


def ensure_pipeline(client, name: str, description: str) -> tuple[str, bool]:
    """(pipeline id, created): the pipeline named `name`, created without any version if it is missing."""
    import kfp_server_api

    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id:
        return pipeline_id, False
    # POST /pipelines creates the pipeline alone; /pipelines/upload would also add a version named "llm2clip" that
    # carries no commit and no hash. Every version of ours arrives through upload_version below.
    body = kfp_server_api.V2beta1Pipeline(name=name, display_name=name, description=description)
    try:
        return client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id, True
    except kfp_server_api.ApiException as e:
        pipeline_id = client.get_pipeline_id(name) if e.status == 409 else None  # a concurrent submit created it
        if not pipeline_id:
            raise
        return pipeline_id, False


def ensure_version(client, pipeline_id: str, package: Package) -> tuple[str, bool]:
    """(version id, uploaded): the version named `package.version_name`, uploaded if missing; an existing one must
    carry the same pipeline hash."""
    import kfp_server_api

    existing = find_version(client, pipeline_id, package.version_name)
    if existing is not None:
        check_same(existing, package)
        return existing.pipeline_version_id, False
    try:
        with quiet():
            uploaded = client.upload_pipeline_version(
                str(package.path),
                pipeline_version_name=package.version_name,
                pipeline_id=pipeline_id,
                description=package.description,
            )
    except kfp_server_api.ApiException as e:
        # 409: a concurrent submit uploaded it first (kubeflow/pipelines 2.16.0 backend/src/apiserver/server/
        # pipeline_upload_server.go:307-311)
        existing = find_version(client, pipeline_id, package.version_name) if e.status == 409 else None
        if existing is None:
            raise
        check_same(existing, package)
        return existing.pipeline_version_id, False
    return uploaded.pipeline_version_id, True


def schedule_name(version: str, cron: str, params: dict, service_account: str | None) -> str:
    """A recurring run's name says what it runs; the same schedule of the same version is then found, not doubled."""
    key = json.dumps([cron, params, service_account], sort_keys=True)
    return f"llm2clip {version} schedule {hashlib.sha256(key.encode()).hexdigest()[:8]}"


def find_recurring_run(client, experiment_id: str, name: str):
    token = ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, experiment_id=experiment_id)
        for r in page.recurring_runs or []:
            if r.display_name == name:
                return r
        token = page.next_page_token or ""
        if not token:
            return None


def wait(client, run_id: str, url: str) -> int:
    """Poll the run until it finishes; 0 if it succeeded, 1 if it ended in any other state."""
    print(f"waiting for the run to finish (every {POLL_SECONDS:g} s; Ctrl-C stops waiting, not the run)", flush=True)
    last = None
    try:
        while True:
            got = client.get_run(run_id)
            state = str(got.state or "RUNTIME_STATE_UNSPECIFIED")
            if state != last:
                print(f"  {datetime.now(UTC):%H:%M:%S} {state}", flush=True)
                last = state
            if state in FINISHED:
                break
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        print(f"stopped waiting; the run goes on: {url}", file=sys.stderr)
        return 130
    if state == "SUCCEEDED":
        print(f"run succeeded: {url}")
        return 0
    error = got.error.message if got.error is not None and got.error.message else ""
    print(f"run {state.lower()}{': ' + error if error else ''}: {url}", file=sys.stderr)
    return 1


def ui_base(host: str | None) -> str | None:
    """Where the Pipelines UI is: KF_PIPELINES_UI_ENDPOINT, else the API endpoint (the UI and API share a host)."""
    base = os.environ.get("KF_PIPELINES_UI_ENDPOINT") or host or os.environ.get("KF_PIPELINES_ENDPOINT")
    if not base:
        return None
    return (base if base.startswith(("http://", "https://")) else "https://" + base).rstrip("/")


def link(base: str | None, kind: str, object_id: str) -> str:
    path = f"/#/{kind}/details/{object_id}"  # the KFP UI's routes: runs/details, recurringrun/details
    return base + path if base else f"{path} in the Kubeflow Pipelines UI (set KF_PIPELINES_UI_ENDPOINT for a link)"


# --------------------------------------------------------------------------------------------------------- command


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `submit` to the `llm2clip` command's subparsers."""
    p = subparsers.add_parser(
        "submit",
        help="upload the pipeline as a versioned pipeline to Kubeflow Pipelines and start a run",
        description="Compile the pipeline, upload it (once) as version <package version>-<git sha12> with the "
        "compiled pipeline's sha256 in its description, get or create the experiment and start a run of that version "
        f"(or a recurring run with --schedule). Needs a KFP backend {MIN_KFP_BACKEND} or newer.",
    )
    p.add_argument(
        "--host",
        default=None,
        metavar="URL",
        help="KFP API endpoint, e.g. http://localhost:8888 after `kubectl -n kubeflow port-forward "
        "svc/ml-pipeline 8888`, or https://KUBEFLOW/pipeline (default: $KF_PIPELINES_ENDPOINT, else "
        "in-cluster, else the kubeconfig's cluster through its service proxy)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"file holding a bearer token, read on every request (default: ${TOKEN_ENV}, else a "
        f"projected ServiceAccount token at ${SA_TOKEN_ENV} or {SA_TOKEN_PATH}, else none)",
    )
    p.add_argument(
        "--namespace",
        default=None,
        metavar="NS",
        help="namespace of the experiment and its runs (multi-user Kubeflow: your profile namespace, "
        "required; default: the kfp context's, or the pod's own in a cluster)",
    )
    p.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        metavar="NAME",
        help=f"experiment to run in, created if missing (default {DEFAULT_EXPERIMENT})",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a pipeline parameter for this run, typed as in `llm2clip run` (repeatable)",
    )
    p.add_argument(
        "--service-account",
        default=RUNNER_SERVICE_ACCOUNT,
        metavar="SA",
        help=f"Kubernetes ServiceAccount the run's pods use (default {RUNNER_SERVICE_ACCOUNT}, which "
        "manifests/ deploy with the rights the pipeline needs, TrainJobs included; '' for the server's "
        "default: pipeline-runner, or default-editor in a profile namespace)",
    )
    p.add_argument(
        "--schedule",
        default=None,
        metavar="CRON",
        help="create a recurring run instead, on a 6-field cron with seconds first ('0 0 3 * * *' is 03:00 "
        "daily) or @every 24h; the same schedule of the same version is not created twice",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="run every task afresh: uploads a version compiled with caching off in every task, named "
        "...-nocache (a run of a version ignores a run-level caching switch)",
    )
    p.add_argument(
        "--wait", action="store_true", help="wait until the run finishes; exit 0 if it succeeded, 1 otherwise"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="compile and print what would be uploaded and run; send nothing to the server",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="submit from a git tree with uncommitted changes (the version is named "
        "...-dirty.<sha8 of the compiled spec>)",
    )
    return p


def check_schedule(cron: str) -> None:
    if not (cron.startswith("@") or len(cron.split()) == 6):
        raise SystemExit(
            f"--schedule {cron!r}: KFP takes a 6-field cron with seconds first (e.g. '0 {cron}' if you meant a "
            "5-field cron) or a descriptor such as @daily or '@every 6h'"
        )


@contextlib.contextmanager
def api_errors(host: str | None):
    """Turn the kfp client's failures into one line that names the server."""
    import kfp_server_api
    import urllib3

    where = host or "(in-cluster or from the kubeconfig)"
    try:
        yield
    except kfp_server_api.ApiException as e:
        body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else str(e.body or "")
        hint = ""
        if e.status == 401:  # kubeflow/pipelines 2.16.0 backend/src/apiserver/resource/resource_manager.go:1929-1945
            hint = (
                ". A multi-user server needs to know who sends each request: a bearer token (--token-file, "
                f"${TOKEN_ENV}, or a projected ServiceAccount token with audience pipelines.kubeflow.org at "
                f"${SA_TOKEN_ENV}), or the kubeflow-userid header: the Kubeflow gateway adds it after you log in, or "
                "a kfp context (~/.config/kfp/context.json) sets it with client_authentication_header_name/_value"
            )
        raise SystemExit(f"KFP API server {where}: HTTP {e.status} {e.reason}: {body[:500]}{hint}") from None
    except (urllib3.exceptions.HTTPError, TimeoutError, ConnectionError) as e:
        raise SystemExit(f"cannot reach the KFP API server {where}: {e}") from None
    except ValueError as e:  # kfp: several pipelines or experiments of one name
        raise SystemExit(f"KFP API server {where}: {e}") from None


def print_plan(args: argparse.Namespace, host: str | None, package: Package, run_name: str, params: dict) -> None:
    """--dry-run: what `submit` would do, from the compiled package alone (no request is sent)."""
    from llm2clip.pipelines.llm2clip_pipeline import PIPELINE_NAME

    kind = f"recurring run ({args.schedule})" if args.schedule else "run"
    print(f"dry run: nothing sent to {host or 'the API server found in-cluster or through the kubeconfig'}. Would:")
    print(f"  create pipeline {PIPELINE_NAME!r} if missing")
    print(f"  upload version {package.version_name!r} if missing (refused if it exists with another hash)")
    print(f"  get or create experiment {args.experiment!r} in namespace {args.namespace or '(context default)'}")
    print(f"  create {kind} {run_name!r} as " + (args.service_account or "the server's default ServiceAccount"))
    print(f"  with parameters {json.dumps(params, sort_keys=True) if params else '(the version defaults)'}")


def submit_package(
    client,
    args: argparse.Namespace,
    package: Package,
    run_name: str,
    params: dict,
    ui: str | None,
    namespace: str | None,
) -> int:
    """Pipeline, version and experiment (each reused if there), then the run or recurring run; the exit code."""
    from llm2clip.pipelines.llm2clip_pipeline import PIPELINE_NAME, llm2clip_pipeline

    pipeline_id, created = ensure_pipeline(client, PIPELINE_NAME, llm2clip_pipeline.description or "")
    print(f"pipeline  {'created' if created else 'exists'} ({pipeline_id})")
    version_id, uploaded = ensure_version(client, pipeline_id, package)
    print(f"version   {'uploaded' if uploaded else 'exists, same sha256'} ({version_id})")
    with quiet():
        experiment = client.create_experiment(args.experiment, namespace=namespace)  # gets or creates
    print(f"experiment {args.experiment} ({experiment.experiment_id})")
    if args.schedule:
        existing = find_recurring_run(client, experiment.experiment_id, run_name)
        if existing is not None:
            print(f"recurring run exists: {run_name}\n{link(ui, 'recurringrun', existing.recurring_run_id)}")
            return 0
        recurring = client.create_recurring_run(
            experiment.experiment_id,
            run_name,
            cron_expression=args.schedule,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=args.service_account or None,
            no_catchup=True,
            max_concurrency=1,
        )
        print(f"recurring run created: {run_name}\n{link(ui, 'recurringrun', recurring.recurring_run_id)}")
        return 0
    with quiet():
        created_run = client.run_pipeline(
            experiment.experiment_id,
            run_name,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=args.service_account or None,
        )
    url = link(ui, "runs", created_run.run_id)
    print(f"run created: {run_name}\n{url}", flush=True)
    return wait(client, created_run.run_id, url) if args.wait else 0


def run(args: argparse.Namespace) -> int:
    """`llm2clip submit`; returns the process exit code."""
    from llm2clip.params import defaults, parse_overrides
    from llm2clip.pipelines.llm2clip_pipeline import llm2clip_pipeline

    params = parse_overrides(
        args.overrides, defaults(llm2clip_pipeline.pipeline_func)
    )  # before anything slow or remote
    from llm2clip.ops.preflight import model_problems, placement_problems

    if problems := placement_problems(params) + model_problems(params, os.environ, on_cluster=True):
        raise SystemExit("bad pipeline parameter: " + "; ".join(problems))
    if args.schedule:
        check_schedule(args.schedule)
        if args.wait:
            raise SystemExit("--wait waits for one run; a recurring run (--schedule) has no end to wait for")
    if args.token_file is not None and not args.token_file.is_file():
        raise SystemExit(f"--token-file {args.token_file}: no such file")
    sha, dirty = source_revision(args.force)
    host = args.host or os.environ.get("KF_PIPELINES_ENDPOINT") or None
    with tempfile.TemporaryDirectory(prefix="llm2clip-submit-") as tmp:
        package = compile_package(Path(tmp), sha=sha, dirty=dirty, no_cache=args.no_cache)
        if args.schedule:
            run_name = schedule_name(package.version_name, args.schedule, params, args.service_account)
        else:
            run_name = f"llm2clip {package.version_name} {datetime.now(UTC):%Y-%m-%d %H:%M:%S}"
        print(f"version   {package.version_name}  (sha256 {package.sha256})")
        if args.dry_run:
            print_plan(args, host, package, run_name, params)
            return 0
        with api_errors(host):
            client = make_client(host, args.token_file)
            where = host or "(in-cluster or from the kubeconfig)"
            backend = backend_info(client)
            check_backend_version(where, backend.version)
            namespace = args.namespace or client.get_user_namespace() or None
            if backend.multi_user and not namespace:
                raise SystemExit(
                    f"the KFP API server {where} runs in multi-user mode, where every experiment and run belongs to a "
                    "namespace: pass --namespace (your Kubeflow profile's namespace). Nothing was uploaded"
                )
            return submit_package(client, args, package, run_name, params, ui_base(host), namespace)
