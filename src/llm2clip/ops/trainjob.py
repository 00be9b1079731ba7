"""Stage 2 on several nodes: a Kubeflow Trainer v2.3 TrainJob built as data, then created, followed and removed.

`build_trainjob` is pure: TrainClipConfig fields + input/output locations + placement -> the TrainJob object
(trainer.kubeflow.org/v1alpha1, field names of Trainer v2.3.0). `run_trainjob` drives it through the Kubernetes
API: create (or adopt the one a previous attempt created), poll `status.conditions` until Complete or Failed,
stream the node-0 trainer's log to our stdout meanwhile, delete it once it completed, or at once when the launcher
is told to stop (SIGTERM: the KFP run was terminated or deleted). `train_on_nodes` is the launcher component's one
call.

How the nodes find each other: the TrainJob references our namespaced TrainingRuntime `llm2clip-torch` (torch ML
policy); Trainer's torch plugin injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK (the pod's Job completion
index), PET_MASTER_ADDR (`<trainjob>-node-0-0.<trainjob>`, node 0's stable hostname) and PET_MASTER_PORT (29500)
into the `node` container. torchrun reads every `--flag` it is not given from `PET_<FLAG>`, so the trainer command
is plain `python -m torch.distributed.run --module llm2clip.train_clip ...`: no --standalone (that would make each
node a world of its own), no --nnodes/--node-rank/--master-* (a flag on the command line would win over the
environment).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from llm2clip import artifacts, storage
from llm2clip.ops.lifeline import Stopped

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from llm2clip.train_clip import TrainClipConfig

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
RUNTIME = "llm2clip-torch"  # namespaced TrainingRuntime (manifests/), torch ML policy
NODE = "node"  # Trainer's torch convention: the trainer's replicated job and its container are both "node"
PART_OF = ("app.kubernetes.io/part-of", "llm2clip")  # on every llm2clip pod: the metrics PodMonitor selects it
COMPONENT = ("app.kubernetes.io/component", "train-clip")
OUTPUT_ANNOTATION = "llm2clip/output"  # the stage-2 output location this TrainJob writes (its name is its hash)
SPEC_ANNOTATION = "llm2clip/spec-sha256"  # what an adopting launcher compares: same request, same hash
PATCH_MANAGER = "llm2clip/launcher"  # runtimePatches owner (Trainer requires a domain-prefixed path)
NAME_PREFIX = "llm2clip-"
GPU_RESOURCE = "nvidia.com/gpu"
TASK_TIMEOUT_S = 72 * 3600  # the launcher task's pod timeout (pipelines/llm2clip_pipeline.py CPU_TASKS; tested)
# The launcher stops following, and the TrainJob's activeDeadlineSeconds ends it, this long before the launcher's
# pod is killed: time for the pod's start (driver, artifact downloads, imports) and for the timeout to be reported.
DEADLINE_MARGIN_S = 15 * 60
TIMEOUT_S = TASK_TIMEOUT_S - DEADLINE_MARGIN_S  # the launcher's poll timeout and the TrainJob's activeDeadlineSeconds
API_ERRORS = 30  # consecutive failed polls (429, 5xx, no connection) before the launcher gives up
# What every trainer pod gets is the runtime's (manifests/components/trainer/trainingruntime.yaml): llm2clip-config
# and llm2clip-s3 as env (secrets never in the TrainJob, where anyone who may read TrainJobs would see them), a
# writable HOME on /tmp, /dev/shm, the metrics port, the locked-down security context. The TrainJob adds only what
# differs per run: image, command, size, placement.
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# The labels JobSet (and the Job controller, Kubernetes >= 1.28) put on every trainer pod; node 0 is the pod of
# completion index 0 of the trainer's only Job (job-index 0).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # = the TrainJob's name
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
RESTART_ATTEMPT_LABEL = "jobset.sigs.k8s.io/restart-attempt"  # JobSet's restart count when the pod was made
# Where the pipeline's models_pvc is mounted, in the KFP tasks (pipelines/llm2clip_pipeline.py) and on every node
MODELS_PATH = "/models"
MODELS_VOLUME = "models"
# A PersistentVolumeClaim's name is a DNS-1123 subdomain (kubernetes/kubernetes v1.33.0,
# staging/src/k8s.io/apimachinery/pkg/util/validation/validation.go, IsDNS1123Subdomain)
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

_QUANTITY = re.compile(r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE]\+?[0-9]+))?$")
_TOLERATION_FIELDS = {"key", "operator", "value", "effect", "tolerationSeconds"}
_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")


class TrainJobFailed(RuntimeError):
    """The TrainJob's Failed condition became True; the TrainJob is left in place for inspection."""


# ----------------------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class NodePlacement:
    """Where and how stage 2 runs: `nodes` pods of `nproc` torchrun processes each. Every node asks for `gpus`
    GPUs (nvidia.com/gpu; 0 = CPU nodes, gloo), `cpu` and `memory` (Kubernetes quantities, request = limit), and
    lands where `node_selector` and `tolerations` allow. `image` is the trainer image (the project's CUDA image,
    pinned by tag or digest). `models_pvc`: a PersistentVolumeClaim every node mounts read-only at /models (the
    pipeline's models_pvc, for `pretrained` paths under /models); "" mounts none."""

    nodes: int
    nproc: int
    image: str
    gpus: int = 0
    cpu: str = "8"
    memory: str = "64Gi"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    models_pvc: str = ""

    def __post_init__(self) -> None:
        check = artifacts.check
        for name in ("nodes", "nproc", "gpus"):  # KFP hands ints over as ints; a float or bool is a caller's bug
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
        check(self.nodes >= 1, "nodes", self.nodes, "must be >= 1")
        check(self.nproc >= 1, "nproc", self.nproc, "must be >= 1 (torchrun processes per node)")
        check(self.gpus >= 0, "gpus", self.gpus, "must be >= 0 (GPUs per node; 0 = CPU nodes)")
        check(
            self.gpus == 0 or self.nproc <= self.gpus,
            "nproc",
            self.nproc,
            f"must be <= gpus={self.gpus}: one process per GPU (NCCL cannot share a GPU between ranks)",
        )
        check(bool(self.image) and not re.search(r"\s", self.image), "image", self.image, "must be an image reference")
        for name in ("cpu", "memory"):
            value = getattr(self, name)
            check(
                isinstance(value, str) and bool(_QUANTITY.match(value)) and _nonzero(value),
                name,
                value,
                "must be a positive Kubernetes quantity such as '8', '500m', '64Gi'",
            )
        check(isinstance(self.node_selector, Mapping), "node_selector", self.node_selector, "must be a JSON object")
        for k, v in self.node_selector.items():
            check(
                isinstance(k, str) and isinstance(v, str) and bool(k),
                "node_selector",
                {k: v},
                "keys and values must be strings (node label = value)",
            )
        check(
            isinstance(self.tolerations, Sequence) and not isinstance(self.tolerations, str),
            "tolerations",
            self.tolerations,
            "must be a JSON list of tolerations",
        )
        check(
            isinstance(self.models_pvc, str)
            and (self.models_pvc == "" or bool(_DNS1123_SUBDOMAIN.fullmatch(self.models_pvc)))
            and len(self.models_pvc) <= 253,
            "models_pvc",
            self.models_pvc,
            "must be a PersistentVolumeClaim name (lower-case DNS-1123 subdomain) or empty",
        )
        object.__setattr__(self, "tolerations", tuple(_toleration(t, i) for i, t in enumerate(self.tolerations)))
        object.__setattr__(self, "node_selector", dict(self.node_selector))


def _nonzero(quantity: str) -> bool:
    return any(c in "123456789" for c in re.split(r"[A-Za-z]", quantity, maxsplit=1)[0])


def _toleration(t: object, i: int) -> dict:
    """A toleration as Kubernetes takes it; tolerationSeconds back to an int (KFP turns JSON numbers into floats)."""
    where = f"tolerations[{i}]"
    artifacts.check(isinstance(t, Mapping), where, t, "must be an object")
    unknown = sorted(set(t) - _TOLERATION_FIELDS)
    artifacts.check(not unknown, where, t, f"has unknown fields {unknown} (allowed: {sorted(_TOLERATION_FIELDS)})")
    out = dict(t)
    artifacts.check(
        out.get("operator", "Equal") in ("Equal", "Exists"),
        f"{where}.operator",
        out.get("operator"),
        "must be Equal or Exists",
    )
    effect = out.get("effect", "")
    artifacts.check(effect in _EFFECTS, f"{where}.effect", effect, f"must be one of {_EFFECTS}")
    if "tolerationSeconds" in out:
        seconds = out["tolerationSeconds"]
        artifacts.check(
            isinstance(seconds, int | float) and seconds == int(seconds),
            f"{where}.tolerationSeconds",
            seconds,
            "must be a whole number of seconds",
        )
        out["tolerationSeconds"] = int(seconds)
    return out


# ----------------------------------------------------------------------------------------------- the TrainJob


def trainjob_name(output: str) -> str:
    """The TrainJob's name, a function of the stage-2 output location only: a KFP retry reruns the launcher with
    the same output URI and so finds (and adopts) the TrainJob of its previous attempt instead of starting a
    second one. `llm2clip-` + 16 hex digits: a DNS-1035 label of 25 characters, so that the pods' hostnames
    (`<name>-node-0-<i>`) stay far below 63."""
    return NAME_PREFIX + hashlib.sha256(output.encode()).hexdigest()[:16]


def trainer_command() -> list[str]:
    """torchrun, which takes nodes, processes per node, node rank and master from Trainer's PET_* variables."""
    return ["python", "-m", "torch.distributed.run", "--module", "llm2clip.train_clip"]


def trainer_args(config: Mapping[str, Any], dataset: str, output: str, caption_embeddings: Sequence[str]) -> list[str]:
    """The arguments of `python -m llm2clip.train_clip` (its parser()): the whole TrainClipConfig as JSON."""
    args = ["--config", json.dumps(dict(config), sort_keys=True), "--dataset", dataset, "--output", output]
    for uri in caption_embeddings:
        args += ["--caption-embeddings", uri]
    return args


def trainer_env() -> list[dict]:
    """The trainer container's env beyond the runtime's: log lines reach the launcher as they are printed."""
    return [{"name": "PYTHONUNBUFFERED", "value": "1"}]


def build_trainjob(
    config: Mapping[str, Any],
    dataset: str,
    output: str,
    caption_embeddings: Sequence[str],
    placement: NodePlacement,
    timeout_s: int = TIMEOUT_S,
) -> dict:
    """The TrainJob (a plain dict, as `kubectl apply` would take it) that trains stage 2 with `config` (the fields
    of a TrainClipConfig) on `placement`. Every location must be in the object store (s3:// or minio://): the
    nodes share no filesystem with the launcher. `timeout_s` (seconds) becomes activeDeadlineSeconds, so the
    TrainJob ends even if no launcher follows it any more. Raises ValueError naming a bad argument."""
    for name, uri in [("dataset", dataset), ("output", output)] + [
        (f"caption_embeddings[{i}]", u) for i, u in enumerate(caption_embeddings)
    ]:
        artifacts.check(
            isinstance(uri, str) and storage.is_remote(uri),
            name,
            uri,
            "must be an s3:// or minio:// location: the trainer nodes cannot read the launcher's "
            "filesystem (set LLM2CLIP_STORE, as the llm2clip-config ConfigMap does)",
        )
    artifacts.check(
        len(caption_embeddings) >= 1,
        "caption_embeddings",
        list(caption_embeddings),
        "needs at least one cache output (stage 2 trains on cached caption embeddings)",
    )
    artifacts.check(isinstance(timeout_s, int) and timeout_s >= 1, "timeout_s", timeout_s, "must be >= 1 second")
    artifacts.check(isinstance(placement, NodePlacement), "placement", placement, "must be a NodePlacement")
    name = trainjob_name(output)
    resources = {"cpu": placement.cpu, "memory": placement.memory}
    if placement.gpus:
        resources[GPU_RESOURCE] = str(placement.gpus)
    pod_spec: dict[str, Any] = {}
    if placement.node_selector:
        pod_spec["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in placement.tolerations]
    # The nodes load no LLM (stage 2 reads the caption cache), only `pretrained`: the claim is mounted when that is a
    # path under /models. So the default placeholder claim (ReadWriteOnce, manifests/base/models-pvc.yaml) is never
    # asked of several nodes at once, where a block volume attaches to only one. The lists merge into the runtime's
    # by name (listType map in the TrainJob CRD, tests/fixtures/crds).
    if placement.models_pvc and str(config.get("pretrained") or "").startswith(MODELS_PATH + "/"):
        claim = {"claimName": placement.models_pvc, "readOnly": True}
        pod_spec["volumes"] = [{"name": MODELS_VOLUME, "persistentVolumeClaim": claim}]
        mount = {"name": MODELS_VOLUME, "mountPath": MODELS_PATH, "readOnly": True}
        pod_spec["containers"] = [{"name": NODE, "volumeMounts": [mount]}]
    # The part-of label is the runtime's too; said again here because the PodMonitor and MinIO's NetworkPolicy
    # select trainer pods by it, whatever the runtime becomes.
    pod_patch: dict[str, Any] = {"metadata": {"labels": dict([PART_OF])}}
    if pod_spec:
        pod_patch["spec"] = pod_spec
    spec = {
        "runtimeRef": {"apiGroup": GROUP, "kind": "TrainingRuntime", "name": RUNTIME},
        "trainer": {
            "image": placement.image,
            "command": trainer_command(),
            "args": trainer_args(config, dataset, output, caption_embeddings),
            "env": trainer_env(),
            "numNodes": placement.nodes,
            "numProcPerNode": placement.nproc,
            "resourcesPerNode": {"requests": dict(resources), "limits": dict(resources)},
        },
        "runtimePatches": [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": pod_patch}}}],
                        }
                    }
                },
            }
        ],
        "activeDeadlineSeconds": timeout_s,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "labels": dict([PART_OF, COMPONENT]),
            "annotations": {OUTPUT_ANNOTATION: output, SPEC_ANNOTATION: spec_digest(spec)},
        },
        "spec": spec,
    }


def spec_digest(spec: Mapping[str, Any]) -> str:
    """sha256 of the spec as canonical JSON: equal for equal requests, whatever the key order."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- the API side


def load_client() -> ApiClient:
    """An API client from the pod's service account (in the cluster), else from ~/.kube/config (a laptop)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # read now: the client's is import-time
    return client.ApiClient()


def current_namespace() -> str:
    """The namespace this pod runs in (its service-account namespace file), else kubeconfig's current context's."""
    if SA_NAMESPACE_FILE.exists():
        return SA_NAMESPACE_FILE.read_text().strip()
    from kubernetes import config

    try:
        _, context = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
    except config.ConfigException as e:
        raise RuntimeError(f"no namespace: not in a pod ({SA_NAMESPACE_FILE} missing) and no kubeconfig ({e})") from e
    return context.get("context", {}).get("namespace") or "default"


def condition(trainjob: Mapping[str, Any], kind: str) -> dict | None:
    """The status condition of type `kind` (Complete, Failed, Suspended) if it is True, else None."""
    for c in (trainjob.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def run_trainjob(
    api: ApiClient,
    namespace: str,
    trainjob: Mapping[str, Any],
    poll_s: float = 10.0,
    timeout_s: float = TIMEOUT_S,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Create `trainjob` in `namespace` (or adopt the one already there under its name, if it was built from the
    same request), poll it every `poll_s` seconds until its Complete or Failed condition, copy node 0's trainer log
    to `out` (default stdout) meanwhile, delete it once Complete and return its last state.

    Failed: raises TrainJobFailed with the condition's reason and message, and leaves the TrainJob for inspection
    (a retried launcher replaces it: see `_create_or_adopt`). Not finished after `timeout_s` seconds: raises
    TimeoutError and leaves it running (its activeDeadlineSeconds, equal to `timeout_s` in `train_on_nodes`, ends
    it; a retried launcher adopts it).

    SIGTERM (terminating or deleting the KFP run stops the launcher's pod this way; called from the main thread
    only, where Python runs signal handlers): deletes the TrainJob if it carries this request's spec digest, with
    propagationPolicy Foreground (its JobSet and pods go first), then raises SystemExit(128 + SIGTERM). Without
    this the nodes would hold their GPUs until activeDeadlineSeconds. A retry of the task creates it again, and
    stage 2 resumes from the output's latest checkpoint.

    No ownerReference to the launcher pod: KFP retries a failed task with a new pod, and a TrainJob owned by the
    old pod would be garbage-collected under the new launcher that adopted it. Deleting on success and on SIGTERM,
    and the deadline, keep TrainJobs from piling up instead.
    """
    from kubernetes import client

    out = out or sys.stdout
    objects, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    name = trainjob["metadata"]["name"]
    with _sigterm_raises():
        try:
            current = _follow_to_the_end(objects, core, namespace, trainjob, poll_s, timeout_s, out, clock)
            _delete(objects, namespace, name)
        except Stopped as t:
            _delete_on_termination(objects, namespace, trainjob, t.signum, out)
            raise SystemExit(128 + t.signum) from None
    print(f"TrainJob {name}: complete, deleted", file=out, flush=True)
    return current


@contextlib.contextmanager
def _sigterm_raises():
    """While inside: SIGTERM raises lifeline.Stopped (a BaseException: the `except Exception` that retries transient
    API errors cannot swallow it) in the main thread; elsewhere no signal handler can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_IGN)  # one clean-up: a second SIGTERM must not interrupt it
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _delete_on_termination(objects, namespace: str, trainjob: Mapping[str, Any], signum: int, out: TextIO) -> None:
    """The launcher was told to stop: delete the TrainJob if it is this request's (by its spec digest; that very
    object, by uid). Foreground: the API server keeps it, with a deletionTimestamp, until the garbage collector
    has deleted its JobSet, Jobs and pods (Trainer v2.3.0 makes the TrainJob the JobSet's controller owner with
    blockOwnerDeletion: kubeflow/trainer v2.3.0 pkg/runtime/framework/plugins/jobset/jobset.go:427-433); not waited
    for, the pod's grace period is short and the deletion goes on without us."""
    name = trainjob["metadata"]["name"]
    what = signal.Signals(signum).name
    existing = _get(objects, namespace, name)
    if existing is None:
        print(f"TrainJob {name}: {what}; it does not exist, nothing to delete", file=out, flush=True)
        return
    meta = existing.get("metadata") or {}
    if (meta.get("annotations") or {}).get(SPEC_ANNOTATION) != trainjob["metadata"]["annotations"][SPEC_ANNOTATION]:
        print(
            f"TrainJob {name}: {what}; the TrainJob of that name is not this request's, left alone",
            file=out,
            flush=True,
        )
        return
    _delete(objects, namespace, name, uid=meta.get("uid"), foreground=True)
    print(
        f"TrainJob {name}: {what}; deleted it (foreground: its pods go first, releasing their GPUs). A retry of "
        "this task creates it again and resumes from the latest checkpoint",
        file=out,
        flush=True,
    )


def _follow_to_the_end(
    objects,
    core,
    namespace: str,
    trainjob: Mapping[str, Any],
    poll_s: float,
    timeout_s: float,
    out: TextIO,
    clock: Callable[[], float],
) -> dict:
    """Create or adopt, then poll until Complete (returned) or Failed/timeout (raised), following node 0's log."""
    name = trainjob["metadata"]["name"]
    _create_or_adopt(objects, namespace, trainjob, out, poll_s, clock)
    stop = threading.Event()
    follower = threading.Thread(
        target=_follow_node0_log, args=(core, namespace, name, out, stop, poll_s), name=f"log {name}", daemon=True
    )
    follower.start()
    deadline, suspended, finished, errors = clock() + timeout_s, False, False, 0
    try:
        while True:
            try:
                current = _get(objects, namespace, name)
                errors = 0
            except Exception as e:  # an API server restarting or overloaded: the TrainJob runs on meanwhile
                errors += 1
                if not _transient(e) or errors > API_ERRORS or clock() >= deadline:
                    raise
                print(f"TrainJob {name}: API error {_brief(e)} ({errors}/{API_ERRORS}); retrying", file=out, flush=True)
                time.sleep(poll_s)
                continue
            if current is None:
                raise RuntimeError(f"TrainJob {namespace}/{name} disappeared while running (deleted by someone else?)")
            if (current.get("metadata") or {}).get("deletionTimestamp"):
                raise RuntimeError(f"TrainJob {namespace}/{name} is being deleted (by someone else?) while running")
            if condition(current, "Complete"):
                finished = True
                return current
            if failed := condition(current, "Failed"):
                finished = True
                raise TrainJobFailed(
                    f"TrainJob {namespace}/{name} failed: {failed.get('reason', '?')}: {failed.get('message', '')} "
                    f"(left for inspection: kubectl -n {namespace} describe trainjob {name}; "
                    f"kubectl -n {namespace} logs -l {JOBSET_NAME_LABEL}={name})"
                )
            if bool(condition(current, "Suspended")) != suspended:  # e.g. queued by Kueue
                suspended = not suspended
                print(f"TrainJob {name}: {'suspended (queued?)' if suspended else 'resumed'}", file=out, flush=True)
            if clock() >= deadline:
                raise TimeoutError(
                    f"TrainJob {namespace}/{name} not finished after {timeout_s:.0f} s; left running (a retried "
                    f"launcher adopts it; to stop it: kubectl -n {namespace} delete trainjob {name})"
                )
            time.sleep(poll_s)
    finally:
        stop.set()  # the log of a finished container ends by itself; a running one's (timeout) is not waited for
        follower.join(timeout=max(30.0, 3 * poll_s) if finished else 0)


def _transient(e: Exception) -> bool:
    """An error worth another poll: 429/5xx from the API server, or no connection to it."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    if isinstance(e, ApiException):
        return e.status in (429, 500, 502, 503, 504)
    return isinstance(e, urllib3.exceptions.HTTPError | ConnectionError)


def _brief(e: Exception) -> str:
    status = getattr(e, "status", None)
    return f"{status} {getattr(e, 'reason', '')}".strip() if status else type(e).__name__


def _get(objects, namespace: str, name: str) -> dict | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _delete(objects, namespace: str, name: str, uid: str | None = None, foreground: bool = False) -> None:
    """Delete the TrainJob (only the object with `uid`, if given; not a newer one of the same name); already gone is
    fine. `foreground`: propagationPolicy Foreground, the object stays (with a deletionTimestamp) until its
    dependents are gone. The options travel in the body: the API server reads DeleteOptions from the body when
    there is one, from the query only otherwise (kubernetes/kubernetes
    staging/src/k8s.io/apiserver/pkg/endpoints/handlers/delete.go, DeleteResource, at 02e16cb)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    options = client.V1DeleteOptions(
        propagation_policy="Foreground" if foreground else None,
        preconditions=client.V1Preconditions(uid=uid) if uid else None,
    )
    try:
        objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body=options)
    except ApiException as e:
        if e.status == 404 or (e.status == 409 and uid):  # 409: the uid precondition failed, that one is gone
            return
        raise


def _wait_gone(objects, namespace: str, name: str, poll_s: float, clock: Callable[[], float], what: str) -> None:
    """Wait (up to 600 s) until the TrainJob `name` no longer exists: a foreground deletion removes its pods first."""
    gone_by = clock() + 600
    while _get(objects, namespace, name) is not None:
        if clock() >= gone_by:
            raise TimeoutError(f"TrainJob {namespace}/{name}: {what} is still being deleted after 600 s")
        time.sleep(poll_s)


def _create_or_adopt(
    objects, namespace: str, trainjob: Mapping[str, Any], out: TextIO, poll_s: float, clock: Callable[[], float]
) -> None:
    """Create; on 409 adopt the existing TrainJob if it carries our spec digest, else raise naming it. An existing
    one that had Failed is the previous attempt of a retried task: replaced (deleted, then created again), so the
    retry trains (resuming from the output's latest checkpoint) instead of reporting the old failure again. One
    that is being deleted (a terminated launcher's, say) is waited for, then created again."""
    from kubernetes.client.exceptions import ApiException

    name, want = trainjob["metadata"]["name"], trainjob["metadata"]["annotations"][SPEC_ANNOTATION]
    for _ in range(3):
        try:
            objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dict(trainjob))
            print(f"TrainJob {name}: created in {namespace}", file=out, flush=True)
            return
        except ApiException as e:
            if e.status != 409:
                raise
        existing = _get(objects, namespace, name)
        if existing is None:  # deleted between our POST and GET: try again
            continue
        meta = existing.get("metadata") or {}
        have = (meta.get("annotations") or {}).get(SPEC_ANNOTATION)
        if have != want:
            raise RuntimeError(
                f"TrainJob {namespace}/{name} already exists and was not created for this request (its "
                f"{SPEC_ANNOTATION} is {have!r}, this request's {want!r}); delete it "
                f"(kubectl -n {namespace} delete trainjob {name}) or write to another output"
            )
        if meta.get("deletionTimestamp"):  # a POST gets 409 until the object is really gone
            print(f"TrainJob {name}: an earlier one is being deleted; waiting for it to go", file=out, flush=True)
            _wait_gone(objects, namespace, name, poll_s, clock, "the earlier one")
            continue
        failed = condition(existing, "Failed")
        if not failed:
            print(f"TrainJob {name}: adopted (created by an earlier attempt)", file=out, flush=True)
            return
        print(
            f"TrainJob {name}: the earlier attempt failed ({failed.get('reason')}: {failed.get('message')}); "
            "replacing it",
            file=out,
            flush=True,
        )
        _delete(objects, namespace, name, uid=meta.get("uid"), foreground=True)
        _wait_gone(objects, namespace, name, poll_s, clock, "the failed one")
    raise RuntimeError(f"TrainJob {namespace}/{name}: could neither create nor adopt it")


# ----------------------------------------------------------------------------------------------- node-0 log


def node0_selector(name: str) -> str:
    """Label selector of node 0's pod(s) of TrainJob `name` (several while a restarted one replaces an old one)."""
    return f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={NODE},{JOB_INDEX_LABEL}=0,{COMPLETION_INDEX_LABEL}=0"


def _follow_node0_log(core, namespace: str, name: str, out: TextIO, stop: threading.Event, poll_s: float) -> None:
    """Copy node 0's trainer log to `out`, prefixed `node-0 | `, until `stop`. Each container (a pod's uid and the
    container's restart count) is followed once from its start, the oldest first: a container restarted in its
    pod, and a pod replaced by a new one (new name and uid: an evicted pod's successor, a JobSet restart's new
    attempt), are each read to the end before the next. A stream that ends while the same container still runs (a
    dropped connection) resumes after the last line seen (log timestamps), so nothing prints twice. The log is a
    convenience: should following it break, the TrainJob is still followed to its end."""
    try:
        _follow(core, namespace, name, out, stop, poll_s)
    except Exception as e:
        print(f"TrainJob {name}: stopped following node 0's log ({e!r})", file=out, flush=True)


def _pod_age(pod) -> tuple:
    """Sort key, older first: JobSet restart attempt, then creation time (whole seconds), then a finished pod
    before a running one (an evicted pod and its replacement often share the creation second)."""
    labels = pod.metadata.labels or {}
    attempt = int(labels.get(RESTART_ATTEMPT_LABEL, "0") or 0)
    created = pod.metadata.creation_timestamp or datetime.min.replace(tzinfo=UTC)
    phase = pod.status.phase if pod.status else None
    return attempt, created, phase not in ("Succeeded", "Failed")


def _follow(core, namespace: str, name: str, out: TextIO, stop: threading.Event, poll_s: float) -> None:
    from kubernetes.client.exceptions import ApiException

    done: set[tuple[str, int]] = set()
    last: dict[tuple[str, int], str] = {}  # container -> timestamp of its last line printed
    shown_state, final = None, False

    def pause() -> bool:
        """Wait a poll interval; True once a last look after `stop` found nothing more to read."""
        nonlocal final
        if final:
            return True
        final = stop.wait(poll_s)
        return False

    while True:  # `stop` ends it only once nothing is left to read: the last lines of a finished run arrive too
        try:
            pods = core.list_namespaced_pod(namespace, label_selector=node0_selector(name)).items
        except ApiException as e:
            print(f"TrainJob {name}: cannot list its pods ({e.status} {e.reason})", file=out, flush=True)
            pods = None
        if not pods:
            if pause():
                return
            continue
        pods.sort(key=_pod_age)
        newest = ([p for p in pods if not p.metadata.deletion_timestamp] or pods)[-1]
        state = _describe(newest, _container_status(newest))
        if state != shown_state:  # Pending, ContainerCreating, ImagePullBackOff... once each, as they change
            print(f"TrainJob {name}: node 0 {state}", file=out, flush=True)
            shown_state = state
        unread = [(pod, key) for pod in pods if (key := _started(pod)) is not None and key not in done]
        if not unread:
            if pause():
                return
            continue
        pod, key = unread[0]  # the oldest container not read to its end
        try:
            _stream(core, namespace, pod.metadata.name, key, last, out)
        except ApiException as e:  # not started yet after all, or the pod went away: look again
            if e.status == 404:
                done.add(key)  # gone with its log
            elif e.status != 400:
                print(f"TrainJob {name}: reading node 0's log failed ({e.status} {e.reason})", file=out, flush=True)
            if pause():
                return
            continue
        except Exception as e:  # a dropped connection: the next round resumes after the last line
            print(f"TrainJob {name}: node 0's log stream broke ({e!r}); resuming", file=out, flush=True)
            if pause():
                return
            continue
        now = _container_status(_read_pod(core, namespace, pod.metadata.name))
        if now is None or now.state is None or now.state.terminated or (now.restart_count or 0) != key[1]:
            done.add(key)  # that container is over: its whole log was read
        elif stop.is_set():
            return


def _started(pod) -> tuple[str, int] | None:
    """(pod uid, restart count) of the pod's trainer container if it is running or ran, else None."""
    status = _container_status(pod)
    if status is None or status.state is None or not (status.state.running or status.state.terminated):
        return None
    return pod.metadata.uid, status.restart_count or 0


def _read_pod(core, namespace: str, pod: str):
    from kubernetes.client.exceptions import ApiException

    try:
        return core.read_namespaced_pod(pod, namespace)
    except ApiException:
        return None


def _container_status(pod):
    statuses = (pod.status.container_statuses or []) if pod is not None and pod.status else []
    return next((s for s in statuses if s.name == NODE), None)


def _describe(pod, status) -> str:
    if pod is None:
        return "has no pod yet"
    phase = pod.status.phase if pod.status else "Pending"
    waiting = status.state.waiting if status is not None and status.state else None
    if waiting is not None:
        return f"{phase}: {waiting.reason or 'waiting'} {waiting.message or ''}".rstrip()
    return f"{phase} (pod {pod.metadata.name})"


def _stream(core, namespace: str, pod: str, key: tuple[str, int], last: dict, out: TextIO) -> None:
    """Follow one container's log to its end; lines at or before `last[key]` (timestamps) are skipped."""
    since = None
    if key in last:  # resume: ask for a little more than needed, drop what was printed
        seen = _timestamp(last[key])
        since = max(1, int((datetime.now(UTC) - seen).total_seconds()) + 5) if seen else None
    response = core.read_namespaced_pod_log(
        pod, namespace, container=NODE, follow=True, timestamps=True, since_seconds=since, _preload_content=False
    )
    try:
        pending = b""
        for chunk in response.stream(4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                _emit(raw, key, last, out)
        if pending:
            _emit(pending, key, last, out)
    finally:
        response.release_conn()


def _emit(raw: bytes, key: tuple[str, int], last: dict, out: TextIO) -> None:
    stamp, _, text = raw.decode("utf-8", errors="replace").partition(" ")
    moment = _timestamp(stamp)
    if moment is None:  # no timestamp (should not happen with timestamps=true): print it as it is
        print(f"node-0 | {raw.decode('utf-8', errors='replace')}", file=out, flush=True)
        return
    if key in last and _order(stamp) <= _order(last[key]):
        return
    last[key] = stamp
    print(f"node-0 | {text}", file=out, flush=True)


def _timestamp(stamp: str) -> datetime | None:
    """An RFC 3339 timestamp as the kubelet writes it (up to nanoseconds, Z), to the second; None if it is not one."""
    try:
        return datetime.strptime(stamp.split(".")[0].rstrip("Z"), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _order(stamp: str) -> tuple[str, int]:
    """Sortable (seconds, nanoseconds) of a timestamp: RFC3339Nano drops trailing zeros, so strings do not sort."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return whole, int((frac + "000000000")[:9])


# ----------------------------------------------------------------------------------------------- entry point


def train_on_nodes(
    cfg: TrainClipConfig,
    dataset: str,
    output: str,
    caption_embeddings: Sequence[str],
    placement: NodePlacement,
    api: ApiClient | None = None,
    namespace: str | None = None,
    poll_s: float = 10.0,
    timeout_s: int = TIMEOUT_S,
    out: TextIO | None = None,
) -> dict:
    """Stage 2 as a TrainJob of `placement.nodes` nodes; returns the metrics its rank 0 recorded in the output's
    manifest (as `train_clip.launch` does). `api`/`namespace` default to this pod's (or kubeconfig's)."""
    trainjob = build_trainjob(dataclasses.asdict(cfg), dataset, output, caption_embeddings, placement, timeout_s)
    run_trainjob(api or load_client(), namespace or current_namespace(), trainjob, poll_s, timeout_s, out)
    return artifacts.read_manifest(output, "train_clip")["metrics"]
