"""A stand-in for the Kubernetes API server (with Kubeflow Trainer's TrainJob CRD) on 127.0.0.1, for testing the
TrainJob launcher (llm2clip.ops.trainjob) through the real `kubernetes` Python client.

No API server can run here, so the tests talk to this one. It serves only what the launcher calls, with the paths,
query parameters, status codes and JSON shapes of the Kubernetes API: TrainJob create (201; 409 AlreadyExists,
also while an object of that name is being deleted), get (404 NotFound), delete (DeleteOptions from the body, else
the query: propagationPolicy, preconditions.uid -> 409 Conflict); pod list by label selector (equality terms), pod
get, pod log (`container`, `follow`, `timestamps`, `sinceSeconds`; 400 while the container is waiting to start).

Deletion as the API server and its garbage collector do it: Background (the default for custom resources) removes
the TrainJob at once, its pods with it; Foreground keeps the TrainJob, with a deletionTimestamp and the
foregroundDeletion finalizer, until its dependents are gone (`gc_delay_s` later here), and its pods get their
deletionTimestamp meanwhile (kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/registry/generic/registry/
store.go, deletionFinalizersForGarbageCollection; Trainer v2.3.0 owns the JobSet with blockOwnerDeletion:
kubeflow/trainer v2.3.0 pkg/runtime/framework/plugins/jobset/jobset.go:427-433).

In place of Trainer, JobSet and the kubelet, a TrainJob's status follows a script: successive GETs report the
states in `states` (None: running, "Complete", "Failed"; the last repeats), and creating one makes its pods at
once, labelled as JobSet labels them, node 0 running through the logs in `node0_logs` (one list of lines per run).
Each further run comes about in one of three ways (`restart`):
- "container": the kubelet restarts the container in its pod (restartCount + 1): JobSet defaults the trainer's
  restartPolicy to OnFailure (kubernetes-sigs/jobset v0.12.0 pkg/webhooks/jobset_webhook.go:124-127);
- "pod": node 0's pod fails as a whole (evicted, its node drained or preempted) and the Job controller makes a new
  pod for its completion index, with a new name and uid, and keeps the failed one ("When a Pod fails, then the Job
  controller starts a new Pod", kubernetes.io/docs/concepts/workloads/controllers/job, Handling Pod and container
  failures); both carry the same labels and, to the second, often the same creationTimestamp;
- "jobset": a JobSet restart: every node's pod is deleted (deletionTimestamp, then gone) and replaced by a new one
  with the next `jobset.sigs.k8s.io/restart-attempt` (kubernetes-sigs/jobset v0.12.0
  pkg/controllers/jobset_controller.go:365-377 marks the Jobs of an older attempt, and deleteJobs, :761-783,
  deletes them with Foreground propagation; the Jobs made again make new pods).
Every request is recorded in `requests`. It checks far less than a real server (no auth, no schema, no webhooks,
no RBAC): what passes here is the client contract, not the cluster's behaviour.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from stub_server import StubServer, send_json

TRAINJOBS = re.compile(r"/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?")
PODS = re.compile(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?(/log)?")
EPOCH = datetime(2026, 11, 27, 13, 0, 0, tzinfo=UTC)


@dataclass
class Request:
    """One request as the server saw it: query values are the last of each key; `body` the parsed JSON, if any."""

    method: str
    path: str
    query: dict[str, str]
    body: object


@dataclass
class Container:
    """node 0's trainer container: which of the scripted logs it is on, and where its stream may drop."""

    incarnation: int = 0
    replaced: bool = False  # restart="pod": its pod was replaced after its run
    streamed: int = 0  # log streams served so far (drop_after applies to the first)
    lines: list[tuple[str, str, int]] = field(default_factory=list)  # (timestamp, text, run) written so far


class FakeK8sApi(StubServer):
    """Start with `with FakeK8sApi(...) as api:`; `api.host` is the endpoint for kubernetes.client.Configuration.

    `states`: what successive GETs of a TrainJob report (None running, "Complete", "Failed"; the last repeats).
    `failure`: (reason, message) of a Failed condition. `node0_logs`: node 0's log, one list per container run.
    `drop_after`: the first log stream closes after this many lines while the container still runs (a dropped
    connection). `line_delay_s`: pause between streamed lines. `on_create(api, namespace, trainjob)` runs when a
    TrainJob is created, before the answer: a test can stand in for the controller there (run the trainer, then
    set `states` and `node0_logs` from what happened). `unavailable`: that many TrainJob GETs after the first
    answer 503 ServiceUnavailable, as an API server does while it restarts. `restart`: how node 0's further runs
    in `node0_logs` come about: "container" (restarted in its pod), "pod" (a new pod replaces node 0's failed one,
    which stays) or "jobset" (new pods replace every node's, which are deleted).
    `gc_delay_s`: how long a foreground deletion (and a replaced pod's) takes."""

    def __init__(
        self,
        states: tuple[str | None, ...] = (None, None, "Complete"),
        failure: tuple[str, str] = ("JobSetFailed", "node-1: container node exited with code 1"),
        node0_logs: tuple[tuple[str, ...], ...] = (("epoch 0 step 0 loss 2.0", "epoch 0 step 1 loss 1.5"),),
        drop_after: int | None = None,
        line_delay_s: float = 0.005,
        on_create: Callable[[FakeK8sApi, str, dict], None] | None = None,
        unavailable: int = 0,
        restart: str = "container",
        gc_delay_s: float = 0.2,
    ) -> None:
        assert restart in ("container", "pod", "jobset"), restart
        self.unavailable, self.restart, self.gc_delay_s = unavailable, restart, gc_delay_s
        self._timers: list[threading.Timer] = []
        self._replaced: set[str] = set()  # uids of pods that failed and were replaced
        self.states, self.failure, self.node0_logs, self.on_create = states, failure, node0_logs, on_create
        self.drop_after, self.line_delay_s = drop_after, line_delay_s
        self.requests: list[Request] = []
        self.trainjobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.containers: dict[str, Container] = {}  # pod uid -> node 0 container
        self._gets: dict[tuple[str, str], int] = {}
        self._ticks = itertools.count(1)
        self._lock = threading.RLock()
        super().__init__(_handler(self))

    def calls(self, method: str | None = None, pattern: str | None = None) -> list[Request]:
        """Recorded requests, optionally only those with this method and a path matching this regex."""
        return [
            r for r in self.requests if method in (None, r.method) and (pattern is None or re.search(pattern, r.path))
        ]

    # --------------------------------------------------------------------------------------------- state

    def now(self) -> str:
        """A fresh timestamp, as the kubelet writes log timestamps (RFC 3339, nanoseconds, trailing zeros cut)."""
        t = EPOCH + timedelta(microseconds=137 * next(self._ticks))
        text = t.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
        return text + "Z"

    def add_trainjob(self, namespace: str, obj: dict, state: str | None = None) -> dict:
        """Put a TrainJob (and its pods) in place as if an earlier launcher had created it, in `state`."""
        with self._lock:
            stored = self._store(namespace, obj)
            self._set_state(namespace, stored, state)
            return stored

    def _store(self, namespace: str, obj: dict) -> dict:
        name = obj["metadata"]["name"]
        meta = {
            **obj["metadata"],
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "generation": 1,
            "resourceVersion": str(next(self._ticks)),
            "creationTimestamp": self.now()[:19] + "Z",
        }
        stored = {**obj, "metadata": meta, "status": {}}
        self.trainjobs[(namespace, name)] = stored
        self._make_pods(namespace, stored, attempt=0, run=0)
        return stored

    def _make_pods(self, namespace: str, trainjob: dict, attempt: int, run: int, nodes: range | None = None) -> None:
        """The pods of one JobSet restart attempt (or of `nodes` only): one per node, named as the Job controller
        names them (<jobset>-<replicated job>-<job index>-<completion index>-<random>), node 0's on scripted run
        `run`."""
        name = trainjob["metadata"]["name"]
        for i in nodes or range(trainjob["spec"]["trainer"].get("numNodes", 1)):
            pod_name = f"{name}-node-0-{i}-{uuid.uuid4().hex[:5]}"
            labels = {
                "jobset.sigs.k8s.io/jobset-name": name,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "jobset.sigs.k8s.io/job-index": "0",
                "batch.kubernetes.io/job-completion-index": str(i),
                "jobset.sigs.k8s.io/restart-attempt": str(attempt),
            }
            uid = str(uuid.uuid4())
            self.pods[(namespace, pod_name)] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "namespace": namespace,
                    "uid": uid,
                    "labels": labels,
                    "creationTimestamp": self.now()[:19] + "Z",  # seconds: a replacement often ties with the old
                },
                "spec": {"containers": [{"name": "node", "image": trainjob["spec"]["trainer"].get("image", "")}]},
                "status": {"phase": "Pending"},
            }
            if i == 0:
                self.containers[uid] = Container(incarnation=run)
            self._container_state(self.pods[(namespace, pod_name)], "waiting")

    def _replace_pods(self, namespace: str, name: str, node0: dict) -> None:
        """Node 0's run `node0` ran to its end and failed: replace its pod ("pod") or every pod ("jobset")."""
        trainjob = self.trainjobs.get((namespace, name))
        if trainjob is None:
            return
        run = self.containers[node0["metadata"]["uid"]].incarnation + 1
        attempt = int(node0["metadata"]["labels"]["jobset.sigs.k8s.io/restart-attempt"])
        if self.restart == "pod":
            node0["status"]["phase"] = "Failed"
            self._container_state(node0, "terminated")
            self._replaced.add(node0["metadata"]["uid"])
            self._make_pods(namespace, trainjob, attempt, run, nodes=range(1))
            return
        old = [p for p in self._pods_of(namespace, name) if not p["metadata"].get("deletionTimestamp")]
        for pod in old:
            pod["status"]["phase"] = "Failed"
            self._container_state(pod, "terminated")
            pod["metadata"]["deletionTimestamp"] = self.now()[:19] + "Z"
        self._later(lambda: self._remove_pods(old))
        self._make_pods(namespace, trainjob, attempt + 1, run)

    def _remove_pods(self, pods: list[dict]) -> None:
        for pod in pods:
            key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
            if self.pods.get(key) is pod:
                del self.pods[key]

    def _later(self, action: Callable[[], None]) -> None:
        """Run `action` (under the lock) `gc_delay_s` from now, as the garbage collector would."""

        def run() -> None:
            with self._lock:
                action()

        timer = threading.Timer(self.gc_delay_s, run)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def delete_trainjob(self, namespace: str, name: str, options: dict | None = None) -> tuple[int, dict]:
        """DELETE as the API server does it, with these DeleteOptions (propagationPolicy, preconditions)."""
        with self._lock:
            options = options or {}
            trainjob = self.trainjobs.get((namespace, name))
            if trainjob is None:
                return 404, status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
            uid = (options.get("preconditions") or {}).get("uid")
            if uid is not None and uid != trainjob["metadata"]["uid"]:
                return 409, status(
                    409,
                    "Conflict",
                    f"Precondition failed: UID in precondition: {uid}, UID in "
                    f"object meta: {trainjob['metadata']['uid']}",
                )
            pods = self._pods_of(namespace, name)
            if options.get("propagationPolicy") != "Foreground":  # Background (default) or Orphan: gone at once
                self._remove_pods(pods)
                del self.trainjobs[(namespace, name)]
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name}}
            meta = trainjob["metadata"]
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = self.now()[:19] + "Z"
                meta["finalizers"] = [*meta.get("finalizers", []), "foregroundDeletion"]
                for pod in pods:
                    pod["metadata"].setdefault("deletionTimestamp", meta["deletionTimestamp"])

                def collect() -> None:  # dependents first, then the owner
                    self._remove_pods(self._pods_of(namespace, name))
                    if self.trainjobs.get((namespace, name)) is trainjob:
                        del self.trainjobs[(namespace, name)]

                self._later(collect)
            return 200, trainjob

    def __exit__(self, *exc) -> None:
        for timer in self._timers:
            timer.cancel()
        super().__exit__(*exc)

    def _container_state(self, pod: dict, state: str, restart_count: int = 0) -> None:
        detail = {
            "waiting": {"reason": "ContainerCreating"},
            "running": {"startedAt": self.now()[:19] + "Z"},
            "terminated": {"exitCode": 0 if pod["status"].get("phase") != "Failed" else 1, "reason": "Completed"},
        }[state]
        pod["status"]["containerStatuses"] = [
            {
                "name": "node",
                "image": pod["spec"]["containers"][0]["image"],
                "imageID": "",
                "ready": state == "running",
                "restartCount": restart_count,
                "state": {state: detail},
            }
        ]

    def _pods_of(self, namespace: str, name: str) -> list[dict]:
        return [
            p
            for (ns, _), p in self.pods.items()
            if ns == namespace and p["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"] == name
        ]

    def _set_state(self, namespace: str, trainjob: dict, state: str | None) -> None:
        """The TrainJob's conditions and its pods' phases for a scripted state."""
        name = trainjob["metadata"]["name"]
        phase = {None: "Running", "Complete": "Succeeded", "Failed": "Failed"}[state]
        for pod in self._pods_of(namespace, name):
            if pod["metadata"].get("deletionTimestamp") or pod["metadata"]["uid"] in self._replaced:
                continue  # on its way out, or failed and replaced: stays as it ended
            restarts = pod["status"].get("containerStatuses", [{}])[0].get("restartCount", 0)
            pod["status"]["phase"] = phase
            self._container_state(pod, "running" if state is None else "terminated", restarts)
        if state is None:
            trainjob["status"] = {}
            return
        reason, message = ("JobSetCompleted", "jobset completed successfully") if state == "Complete" else self.failure
        trainjob["status"] = {
            "conditions": [
                {
                    "type": state,
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": self.now()[:19] + "Z",
                }
            ]
        }

    # --------------------------------------------------------------------------------------------- endpoints

    def handle(self, method: str, path: str, query: dict[str, str], body: object) -> tuple[int, object]:
        """JSON answers; a log read returns (200, Request) and the handler streams it (see `log_lines`)."""
        if m := TRAINJOBS.fullmatch(path):
            ns, name = m[1], m[2]
            if method == "POST" and name is None:
                name = body["metadata"]["name"]
                if (ns, name) in self.trainjobs:
                    return 409, status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists')
                stored = self._store(ns, body)
                if self.on_create is not None:
                    self.on_create(self, ns, stored)
                return 201, stored
            if (ns, name) not in self.trainjobs:
                return 404, status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
            if method == "GET" and self._gets.get((ns, name)) and self.unavailable > 0:
                self.unavailable -= 1
                return 503, status(503, "ServiceUnavailable", "the server is currently unable to handle the request")
            if method == "GET":
                n = self._gets[(ns, name)] = self._gets.get((ns, name), 0) + 1
                trainjob = self.trainjobs[(ns, name)]
                # a finished one stays finished (e.g. adopted as it is); one being deleted changes no more
                if not condition_true(trainjob) and not trainjob["metadata"].get("deletionTimestamp"):
                    self._set_state(ns, trainjob, self.states[min(n, len(self.states)) - 1])
                return 200, trainjob
            if method == "DELETE":  # DeleteOptions: the body when there is one, else the query parameters
                options = body if body else {k: v for k, v in query.items() if k == "propagationPolicy"}
                return self.delete_trainjob(ns, name, options)
        if (m := PODS.fullmatch(path)) and method == "GET":
            ns, pod_name, log = m[1], m[2], m[3]
            if pod_name is None:
                wanted = dict(term.split("=", 1) for term in query.get("labelSelector", "").split(",") if term)
                labelled = [p for (pns, _), p in self.pods.items() if pns == ns]
                items = [p for p in labelled if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
                return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
            pod = self.pods.get((ns, pod_name))
            if pod is None:
                return 404, status(404, "NotFound", f'pods "{pod_name}" not found')
            if not log:
                return 200, pod
            state = pod["status"]["containerStatuses"][0]["state"]
            if "waiting" in state:
                return 400, status(
                    400, "BadRequest", f'container "node" in pod "{pod_name}" is waiting to start: ContainerCreating'
                )
            return 200, pod
        return 404, status(404, "NotFound", f"the fake Kubernetes API has no {method} {path}")

    def log_lines(self, pod: dict, query: dict[str, str]):
        """Node 0's log as the kubelet streams it: what the container wrote so far, then (follow=true) each new
        line as it is written, until the container ends (or the scripted connection drop). Here a container
        writes its next scripted line whenever a reader has caught up with it, and a finished one all of them.
        After its last line, a container with another log in `node0_logs` restarts (restartCount + 1)."""
        container = self.containers.get(pod["metadata"]["uid"])
        if container is None:  # not node 0: nothing scripted
            return
        with self._lock:
            first_stream, run = container.streamed == 0, container.incarnation
            container.streamed += 1
            script = self.node0_logs[run]
            # sinceSeconds: "the lines of the last N seconds"; here the last 2 written, so a resumed reader must
            # drop what it already printed
            sent = max(0, len(self._written(container, run)) - 2) if "sinceSeconds" in query else 0
        while True:
            with self._lock:
                written = self._written(container, run)
                if sent >= len(written) and len(written) < len(script):  # the container prints its next line
                    container.lines.append((self.now(), script[len(written)], run))
                    written = self._written(container, run)
            if sent < len(written):
                stamp, text, _ = written[sent]
                sent += 1
                yield (f"{stamp} {text}" if go_bool(query.get("timestamps")) else text) + "\n"
                if first_stream and self.drop_after is not None and sent >= self.drop_after:
                    return
                time.sleep(self.line_delay_s)
                continue
            with self._lock:  # every line written and sent
                status_ = pod["status"]["containerStatuses"][0]
                if run + 1 < len(self.node0_logs):
                    if self.restart == "container" and container.incarnation == run:
                        container.incarnation += 1
                        status_["restartCount"] += 1
                    elif self.restart != "container" and not container.replaced:
                        container.replaced = True
                        jobset = pod["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"]
                        self._replace_pods(pod["metadata"]["namespace"], jobset, pod)
                    return
                alive = (
                    self.pods.get((pod["metadata"]["namespace"], pod["metadata"]["name"])) is pod
                    and "running" in status_["state"]
                )
            if not go_bool(query.get("follow")) or not alive:
                return
            time.sleep(self.line_delay_s)

    @staticmethod
    def _written(container: Container, run: int) -> list[tuple[str, str, int]]:
        return [line for line in container.lines if line[2] == run]


def go_bool(value: str | None) -> bool:
    """A boolean query parameter as the API server parses it (Go's strconv.ParseBool: the client sends "True")."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def condition_true(trainjob: dict) -> bool:
    return any(
        c.get("status") == "True" and c["type"] in ("Complete", "Failed")
        for c in trainjob.get("status", {}).get("conditions", [])
    )


def status(code: int, reason: str, message: str) -> dict:
    """A metav1.Status, as the API server answers an error."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _handler(api: FakeK8sApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: tests read api.requests instead
            pass

        def serve(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.loads(raw) if raw else None
            with api._lock:
                api.requests.append(Request(self.command, url.path, query, body))
                try:
                    code, payload = api.handle(self.command, url.path, query, body)
                except Exception as e:  # answer, so the client fails at once
                    code, payload = 500, status(500, "InternalError", f"fake Kubernetes API: {e!r}")
            if url.path.endswith("/log") and code == 200:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Connection", "close")
                self.end_headers()
                for line in api.log_lines(payload, query):
                    self.wfile.write(line.encode())
                    self.wfile.flush()
                return
            send_json(self, code, payload)

        do_GET = do_POST = do_DELETE = serve

    return Handler
