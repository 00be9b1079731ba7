"""A stand-in for the Kubeflow Pipelines API server (REST, v2beta1) on 127.0.0.1, for testing `llm2clip submit`.

No KFP API server can run here (it needs Kubernetes, MySQL and Argo), so the tests talk to this one through the
real kfp 2.17 client. It implements only the endpoints that client calls for submit, with the paths, query
parameters, multipart upload and JSON field names of kfp_server_api 2.17: healthz; pipelines list (filter on
display_name) and create; pipelines/upload_version; pipeline versions list; experiments list (filter, namespace)
and create; runs create and get; recurring runs list and create. State is in memory; every request is recorded in
`requests`.

Where the real server is less accommodating than a naive stand-in, this one follows it (kubeflow/pipelines 2.16.0):
- healthz is the JSON the API server writes by hand, with the release in `tag_name` (backend/src/apiserver/
  main.go:380-384);
- listings come in pages: 20 items unless `page_size` says otherwise, never more than 200 (backend/src/apiserver/
  list/list.go:383-403), filtered before paging, with an opaque `next_page_token` (base64 JSON, list.go:66-90) that
  is refused, 400, with a filter other than the one it was made for (server/list_request_util.go:192-211);
- creating a pipeline whose name exists answers 409 AlreadyExists (storage/pipeline_store.go:609-612); uploading a
  version name the pipeline already has answers 409 with the upload server's error body (server/
  pipeline_upload_server.go:307-311, writeErrorToResponse :388-397); `racing=n` holds each pipeline creation and
  each upload until n of them have arrived, so that n submits race for them;
- multi-user mode: experiments, runs and recurring runs need the caller's identity, the `kubeflow-userid` header
  (the multi-user install sets KUBEFLOW_USERID_HEADER to it, with no prefix: manifests/kustomize/base/installs/
  multi-user/api-service/deployment-patch.yaml:14-17) or else a bearer token that a TokenReview accepts (here:
  one of `tokens`, token -> user) (backend/src/apiserver/auth/auth.go:35-45, resource/resource_manager.go:1929-1945:
  401 without one, 403 when the user may not use the namespace, here when `namespaces` says so); an experiment
  needs a namespace (server/experiment_server.go:356-357); pipelines without a namespace are shared, open to all
  (server/pipeline_server.go:1094-1097).
It checks far less than a real server (no pipeline-spec validation, no RBAC beyond `namespaces`): what passes here
is the client contract, not the backend's behaviour.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from stub_server import StubServer, send_json

API = "/apis/v2beta1"
NOW = "2026-11-27T12:00:00Z"


@dataclass
class Request:
    """One request as the server saw it: query values are the last of each key; `body` is the JSON body, or the
    uploaded file's bytes for an upload; header names in lower case."""

    method: str
    path: str
    query: dict[str, str]
    body: object
    headers: dict[str, str]


@dataclass
class State:
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, dict] = field(default_factory=dict)  # version id -> version (with its pipeline_id)
    files: dict[str, bytes] = field(default_factory=dict)  # version id -> uploaded YAML
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring_runs: dict[str, dict] = field(default_factory=dict)


class FakeKfpApi(StubServer):
    """Start with `with FakeKfpApi() as api:`; `api.host` is the endpoint for kfp.Client(host=...).

    `run_states`: what successive GET /runs/{id} report for every run (the last one repeats). `tag_name`: the
    release healthz reports. `multi_user`: identity and namespaces required as described above; `tokens`: the bearer
    tokens a TokenReview would accept (token -> user); `namespaces`: user -> the namespaces that user may use (a
    user not listed may use any). `racing`: each POST /pipelines and each upload waits until this many have arrived."""

    def __init__(
        self,
        run_states: tuple[str, ...] = ("RUNNING", "SUCCEEDED"),
        multi_user: bool = False,
        tag_name: str = "2.16.1",
        tokens: dict[str, str] | None = None,
        namespaces: dict[str, set[str]] | None = None,
        racing: int = 0,
    ) -> None:
        self.state = State()
        self.requests: list[Request] = []
        self.run_states = run_states
        self.multi_user, self.tag_name = multi_user, tag_name
        self.tokens, self.namespaces = dict(tokens or {}), dict(namespaces or {})
        self.races = (
            {("POST", p): threading.Barrier(racing, timeout=30) for p in ("/pipelines", "/pipelines/upload_version")}
            if racing > 1
            else {}
        )
        self._ids = itertools.count(1)
        self._gets: dict[str, int] = {}
        self._lock = threading.Lock()
        super().__init__(_handler(self))

    def calls(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """Recorded requests, optionally only those with this method and path (after /apis/v2beta1)."""
        return [r for r in self.requests if method in (None, r.method) and path in (None, r.path)]

    # --------------------------------------------------------------------------------------------- endpoints

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"

    def add_pipeline(self, name: str) -> dict:
        """A pipeline someone else created (shared: no namespace)."""
        p = {"display_name": name, "name": name, "pipeline_id": self.new_id("pipeline"), "created_at": NOW}
        self.state.pipelines[p["pipeline_id"]] = p
        return p

    def add_version(self, pipeline_id: str, name: str, description: str = "", spec: bytes = b"") -> dict:
        v = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": self.new_id("version"),
            "display_name": name,
            "name": name,
            "description": description,
            "created_at": NOW,
        }
        self.state.versions[v["pipeline_version_id"]] = v
        self.state.files[v["pipeline_version_id"]] = spec
        return v

    def add_experiment(self, name: str, namespace: str = "") -> dict:
        e = {
            "display_name": name,
            "experiment_id": self.new_id("experiment"),
            "created_at": NOW,
            "storage_state": "AVAILABLE",
            **({"namespace": namespace} if namespace else {}),
        }
        self.state.experiments[e["experiment_id"]] = e
        return e

    def identity(self, headers: dict[str, str]) -> str | None:
        """Who sent the request, as the multi-user API server's authenticators find it: the user id header, else a
        bearer token a TokenReview accepts."""
        if headers.get("kubeflow-userid"):
            return headers["kubeflow-userid"]
        auth = headers.get("authorization", "")
        return self.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None

    def refusal(self, method: str, path: str, query: dict[str, str], body: object, headers: dict[str, str]):
        """In multi-user mode, what the API server answers instead for want of an identity, a namespace or the
        right to use it; else None."""
        if not self.multi_user or not path.startswith(("/experiments", "/runs", "/recurringruns")):
            return None
        user = self.identity(headers)
        if user is None:
            return 401, error(
                16,
                "Failed to check authorization. User identity is empty in the request header: "
                "Request header error: there is no user identity header.",
            )
        namespace = query.get("namespace", "")
        if path == "/experiments" and method == "POST":
            namespace = body.get("namespace", "")
            if not namespace:
                return 400, error(
                    3, "Invalid input error: An experiment cannot have an empty namespace in multi-user mode"
                )
        elif path.startswith(("/runs", "/recurringruns")) and method == "POST":
            namespace = self.state.experiments.get(body.get("experiment_id"), {}).get("namespace", "")
        if namespace and user in self.namespaces and namespace not in self.namespaces[user]:
            return 403, error(7, f"User '{user}' is not authorized with reason: (request: namespace {namespace})")
        return None

    def handle(self, method: str, path: str, query: dict[str, str], body: object, headers: dict[str, str]):
        s = self.state
        if (method, path) == ("GET", "/healthz"):
            return 200, {
                "commit_sha": "0" * 40,
                "tag_name": self.tag_name,
                "multi_user": self.multi_user,
                "pipeline_store": "database",
            }
        if refused := self.refusal(method, path, query, body, headers):
            return refused
        if (method, path) == ("GET", "/pipelines"):
            return page(s.pipelines.values(), query, "pipelines")
        if (method, path) == ("POST", "/pipelines"):
            if any(p["display_name"] == body["display_name"] for p in s.pipelines.values()):
                return 409, error(6, f"pipeline {body['display_name']} already exists")
            p = {**body, "pipeline_id": self.new_id("pipeline"), "created_at": NOW}
            s.pipelines[p["pipeline_id"]] = p
            return 200, p
        if (method, path) == ("POST", "/pipelines/upload_version"):
            pipeline_id, name = query.get("pipelineid"), query.get("name")
            if pipeline_id not in s.pipelines:
                return 404, error(5, f"pipeline {pipeline_id} not found")
            versions = [v for v in s.versions.values() if v["pipeline_id"] == pipeline_id]
            if any(v["display_name"] == name for v in versions):
                details = f"Already exist error: pipeline version {name} already exists"
                return 409, {"error_message": "Failed to create a pipeline version", "error_details": details}
            v = {
                "pipeline_id": pipeline_id,
                "pipeline_version_id": self.new_id("version"),
                "display_name": name,
                "name": name,
                "description": query.get("description", ""),
                "created_at": NOW,
            }
            s.versions[v["pipeline_version_id"]] = v
            s.files[v["pipeline_version_id"]] = body
            return 200, v
        if m := re.fullmatch(r"/pipelines/([^/]+)/versions", path):
            versions = [v for v in s.versions.values() if v["pipeline_id"] == m[1]]
            return page(versions, query, "pipeline_versions")
        if (method, path) == ("GET", "/experiments"):
            scoped = [e for e in s.experiments.values() if e.get("namespace", "") == query.get("namespace", "")]
            return page(scoped, query, "experiments")
        if (method, path) == ("POST", "/experiments"):
            e = {**body, "experiment_id": self.new_id("experiment"), "created_at": NOW, "storage_state": "AVAILABLE"}
            s.experiments[e["experiment_id"]] = e
            return 200, e
        if (method, path) == ("POST", "/runs"):
            if problem := self.reference_problem(body):
                return 400, error(3, problem)
            r = {**body, "run_id": self.new_id("run"), "state": "PENDING", "created_at": NOW}
            s.runs[r["run_id"]] = r
            return 200, r
        if method == "GET" and (m := re.fullmatch(r"/runs/([^/:]+)", path)):
            if m[1] not in s.runs:
                return 404, error(5, f"run {m[1]} not found")
            n = self._gets[m[1]] = self._gets.get(m[1], 0) + 1
            s.runs[m[1]]["state"] = self.run_states[min(n, len(self.run_states)) - 1]
            if s.runs[m[1]]["state"] == "FAILED":
                s.runs[m[1]]["error"] = {"code": 2, "message": "task train_clip failed"}
            return 200, s.runs[m[1]]
        if (method, path) == ("GET", "/recurringruns"):
            scoped = [r for r in s.recurring_runs.values() if r["experiment_id"] == query.get("experiment_id")]
            return page(scoped, query, "recurringRuns")  # sic: kfp_server_api's JSON name
        if (method, path) == ("POST", "/recurringruns"):
            if problem := self.reference_problem(body):
                return 400, error(3, problem)
            r = {**body, "recurring_run_id": self.new_id("recurring"), "status": "ENABLED", "created_at": NOW}
            s.recurring_runs[r["recurring_run_id"]] = r
            return 200, r
        return 404, error(5, f"the fake KFP API has no {method} {API}{path}")

    def reference_problem(self, body: dict) -> str | None:
        """What a real server would reject in a run's references (missing experiment or version)."""
        if body.get("experiment_id") not in self.state.experiments:
            return f"experiment {body.get('experiment_id')} not found"
        ref = body.get("pipeline_version_reference") or {}
        version = self.state.versions.get(ref.get("pipeline_version_id"))
        if version is None or version["pipeline_id"] != ref.get("pipeline_id"):
            return f"pipeline version {ref} not found"
        return None


def error(code: int, message: str) -> dict:
    return {"error": message, "code": code, "message": message}


def matching(items, query: dict[str, str]) -> list[dict]:
    """Apply a list call's `filter` (EQUALS predicates, as the kfp client sends them)."""
    items = list(items)
    for pred in json.loads(query["filter"])["predicates"] if query.get("filter") else []:
        assert pred["operation"] in ("EQUALS", 1), pred  # the kfp client sends the enum's number
        want = pred.get("stringValue", pred.get("string_value"))
        items = [i for i in items if i.get(pred["key"]) == want]
    return items


DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 20, 200  # list.go:383-386


def page(items, query: dict[str, str], key: str) -> tuple[int, dict]:
    """One page of `items` after the request's filter, as the API server pages: page_size 0 -> 20, above 200 ->
    200; the next page's token carries the filter (and where to go on), and a page token with another filter is
    refused."""
    size = int(query.get("page_size") or 0)
    if size < 0:
        return 400, error(3, f"Invalid input error: The page size should be greater than 0. Got {size}")
    size = min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    filter_ = query.get("filter", "")
    start = 0
    if query.get("page_token"):
        try:
            token = json.loads(base64.b64decode(query["page_token"], validate=True))
        except ValueError:
            return 400, error(3, "Invalid input error: Invalid package token")
        if filter_ and filter_ != token["filter"]:
            return 400, error(
                3,
                "Invalid input error: page token does not match the supplied sort by and/or "
                "filtering criteria. Either specify the same criteria or leave the latter empty if page "
                "token is specified",
            )
        filter_, start = token["filter"], token["offset"]
    items = matching(items, {"filter": filter_})
    more = start + size < len(items)
    token = base64.b64encode(json.dumps({"filter": filter_, "offset": start + size}).encode()).decode()
    return 200, {key: items[start : start + size], "total_size": len(items), "next_page_token": token if more else ""}


def _handler(api: FakeKfpApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: tests read api.requests instead
            pass

        def serve(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ctype = self.headers.get("Content-Type", "")
            if ctype.startswith("multipart/form-data"):
                msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
                files = {
                    part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                    for part in msg.iter_parts()
                }
                body = files.get("uploadfile")
            else:
                body = json.loads(raw) if raw else None
            path = url.path.removeprefix(API) if url.path.startswith(API) else "/not-the-api" + url.path
            headers = {k.lower(): v for k, v in self.headers.items()}
            if (race := api.races.get((self.command, path))) is not None:
                with contextlib.suppress(threading.BrokenBarrierError):  # a racer that never came: go on alone
                    race.wait()  # every racing request has arrived; then one at a time
            with api._lock:
                api.requests.append(Request(self.command, path, query, body, headers))
                try:
                    status, payload = api.handle(self.command, path, query, body, headers)
                except Exception as e:  # answer, so the client fails at once instead of retrying
                    status, payload = 500, error(13, f"fake KFP API: {e!r}")
            send_json(self, status, payload)

        do_GET = do_POST = serve

    return Handler
