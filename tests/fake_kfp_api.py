"""A stand-in for the Kubeflow Pipelines API server (REST, v2beta1) on 127.0.0.1, for testing `llm2clip submit`.

No KFP API server can run here (it needs Kubernetes, MySQL and Argo), so the tests talk to this one through the
real kfp 2.17 client. It implements only the endpoints that client calls for submit, with the paths, query
parameters, multipart upload and JSON field names of kfp_server_api 2.17: healthz; pipelines list (filter on
display_name) and create; pipelines/upload_version; pipeline versions list (paged); experiments list (filter,
namespace) and create; runs create and get; recurring runs list and create. State is in memory; every request is
recorded in `requests`. It checks far less than a real server (no auth, no pipeline-spec validation, no
namespaces' access rules): what passes here is the client contract, not the backend's behaviour.
"""

from __future__ import annotations

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

    `run_states`: what successive GET /runs/{id} report for every run (the last one repeats)."""

    def __init__(self, run_states: tuple[str, ...] = ("RUNNING", "SUCCEEDED"), multi_user: bool = False) -> None:
        self.state = State()
        self.requests: list[Request] = []
        self.run_states = run_states
        self.multi_user = multi_user
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

    def handle(self, method: str, path: str, query: dict[str, str], body: object) -> tuple[int, dict]:
        s = self.state
        if (method, path) == ("GET", "/healthz"):
            return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}
        if (method, path) == ("GET", "/pipelines"):
            return 200, page(matching(s.pipelines.values(), query), query, "pipelines")
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
                return 409, error(6, f"pipeline version {name} already exists")
            v = {"pipeline_id": pipeline_id, "pipeline_version_id": self.new_id("version"), "display_name": name,
                 "name": name, "description": query.get("description", ""), "created_at": NOW}  # fmt: skip
            s.versions[v["pipeline_version_id"]] = v
            s.files[v["pipeline_version_id"]] = body
            return 200, v
        if m := re.fullmatch(r"/pipelines/([^/]+)/versions", path):
            versions = [v for v in s.versions.values() if v["pipeline_id"] == m[1]]
            return 200, page(matching(versions, query), query, "pipeline_versions")
        if (method, path) == ("GET", "/experiments"):
            scoped = [e for e in s.experiments.values() if e.get("namespace", "") == query.get("namespace", "")]
            return 200, page(matching(scoped, query), query, "experiments")
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
            return 200, page(matching(scoped, query), query, "recurringRuns")  # sic: kfp_server_api's JSON name
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


def page(items: list[dict], query: dict[str, str], key: str) -> dict:
    start, size = int(query.get("page_token") or 0), int(query.get("page_size") or 10)
    more = start + size < len(items)
    return {key: items[start : start + size], "total_size": len(items), "next_page_token": str(start + size) if more
            else ""}  # fmt: skip


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
                files = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                         for part in msg.iter_parts()}  # fmt: skip
                body = files.get("uploadfile")
            else:
                body = json.loads(raw) if raw else None
            path = url.path.removeprefix(API) if url.path.startswith(API) else "/not-the-api" + url.path
            with api._lock:
                api.requests.append(
                    Request(self.command, path, query, body, {k.lower(): v for k, v in self.headers.items()})
                )
                try:
                    status, payload = api.handle(self.command, path, query, body)
                except Exception as e:  # answer, so the client fails at once instead of retrying
                    status, payload = 500, error(13, f"fake KFP API: {e!r}")
            send_json(self, status, payload)

        do_GET = do_POST = serve

    return Handler
