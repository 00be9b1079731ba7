"""Stage 2 on several nodes (llm2clip.ops.trainjob and the train_clip_trainjob component).

The TrainJob is checked against Kubeflow Trainer v2.3.0's CRD schema (a committed fixture), strictly. The API
side runs through the real `kubernetes` client against tests/fake_k8s_api.py, which stands in for the Kubernetes
API server with Trainer's CRD (none can run here): what passes is the client contract and our reaction to the
answers, not a cluster's behaviour. In the end-to-end test the fake's create hook also stands in for Trainer, JobSet
and the kubelet: it starts the TrainJob's own command and environment as two local "nodes" with the PET_*
variables Trainer's torch plugin injects, so the real stage 2 trains as a 2-node torchrun world against a real
S3-protocol server (moto) and the launcher reads back what rank 0 wrote.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import kubernetes
import pytest
import yaml
from crd_schema import validate
from fake_k8s_api import FakeK8sApi
from s3_servers import free_port

from llm2clip import artifacts, storage
from llm2clip.ops import trainjob
from llm2clip.ops.trainjob import NodePlacement

ROOT = Path(__file__).resolve().parents[1]
NAMES = json.loads((ROOT / "manifests" / "names.json").read_text())
RUNTIME = ROOT / "manifests" / "components" / "trainer" / "trainingruntime.yaml"  # the TrainingRuntime we refer to
NS = "team-a"
CONFIG = {"text_source": "llm", "epochs": 2, "batch_size": 64, "lr": 1e-3}
GPU_NODES = NodePlacement(
    nodes=4,
    nproc=8,
    image="ghcr.io/llm2clip-kfp/llm2clip:0.1.0",
    gpus=8,
    cpu="64",
    memory="512Gi",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 300.0}],
)
CPU_NODES = NodePlacement(nodes=2, nproc=1, image="llm2clip-cpu:0.1.0", gpus=0, cpu="500m", memory="2Gi")


def build(placement: NodePlacement = GPU_NODES, output: str = "s3://b/runs/1/train/vision_model", **kw) -> dict:
    return trainjob.build_trainjob(CONFIG, "s3://b/data", output, ["s3://b/cache-0", "s3://b/cache-1"], placement, **kw)


def client(api: FakeK8sApi) -> kubernetes.client.ApiClient:
    cfg = kubernetes.client.Configuration()
    cfg.host = api.host
    return kubernetes.client.ApiClient(cfg)


def run(api: FakeK8sApi, obj: dict, out: io.StringIO | None = None, **kw) -> tuple[dict, str]:
    """run_trainjob against the fake, polling every 20 ms; (its result, what it printed)."""
    out = out or io.StringIO()
    kw = {"poll_s": 0.02, "timeout_s": 20, **kw}
    return trainjob.run_trainjob(client(api), NS, obj, out=out, **kw), out.getvalue()


def trainjobs_path(name: str | None = None) -> str:
    base = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
    return f"{base}/{name}" if name else base


def pod_patch(obj: dict) -> dict:
    """The pod template patch of the TrainJob's trainer (runtimePatches -> replicated job `node`)."""
    rjob = obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    return rjob["template"]["spec"]["template"]


def node_lines(printed: str) -> list[str]:
    return [line.removeprefix("node-0 | ") for line in printed.splitlines() if line.startswith("node-0 | ")]


# ----------------------------------------------------------------------------------------------- the object


@pytest.mark.parametrize("placement", [GPU_NODES, CPU_NODES], ids=["gpu", "cpu"])
def test_the_trainjob_passes_the_v2_3_crd_schema_strictly(placement):
    obj = build(placement)
    validate(obj)
    # What the schema leaves to CEL rules and Trainer's webhooks, checked here by hand:
    name = obj["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63  # TrainJob's CEL rules
    assert len(f"{name}-node-0-{placement.nodes - 1}") <= 63  # node hostnames (JobSet: <jobset>-<job>-<i>-<j>)
    env = [e["name"] for e in obj["spec"]["trainer"]["env"]]
    assert len(env) == len(set(env)), "env is a list map keyed by name"
    assert not {n for n in env if n.startswith("PET_")}, "Trainer's torch plugin rejects the PET_* it injects"
    patch = obj["spec"]["runtimePatches"][0]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[\w.-]+", patch["manager"])  # IsDomainPrefixedPath
    for rjob in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
        assert rjob["name"] == trainjob.NODE  # the runtime's only replicated job
        for c in rjob["template"]["spec"]["template"].get("spec", {}).get("containers", []):
            assert c["name"] == trainjob.NODE and "env" not in c  # the webhook forbids env patches for "node"


def test_the_schema_check_rejects_typos_and_wrong_types():
    """Not vacuous: the same validator fails an unknown field at several depths and a wrongly typed value."""
    obj = build()
    for mutate in (
        lambda o: o["spec"]["trainer"].update(numNode=2),
        lambda o: o["spec"].update(runtimeRefs=o["spec"]["runtimeRef"]),
        lambda o: o["spec"]["trainer"]["resourcesPerNode"].update(limit={"cpu": "1"}),
        lambda o: pod_patch(o)["spec"].update(toleration=[]),
        lambda o: o["spec"]["trainer"].update(numNodes="4"),
        lambda o: o["spec"]["trainer"]["resourcesPerNode"]["limits"].update(memory="lots"),
    ):
        bad = copy.deepcopy(obj)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)


def test_resources_placement_and_labels():
    obj = build()
    trainer, meta = obj["spec"]["trainer"], obj["metadata"]
    assert obj["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
        "name": "llm2clip-torch",
    }
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    per_node = {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
    assert trainer["resourcesPerNode"] == {"requests": per_node, "limits": per_node}
    assert "nvidia.com/gpu" not in json.dumps(build(CPU_NODES)["spec"]["trainer"]["resourcesPerNode"])
    pod = pod_patch(obj)
    assert pod["metadata"]["labels"][NAMES["pod_label"]["key"]] == NAMES["pod_label"]["value"]  # scraped
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["spec"]["tolerations"][0]["tolerationSeconds"] == 300  # an int again (KFP hands over 300.0)
    assert set(pod["spec"]) == {"nodeSelector", "tolerations"}  # the rest of the pod is the runtime's
    assert meta["labels"][NAMES["pod_label"]["key"]] == NAMES["pod_label"]["value"]
    assert meta["annotations"][trainjob.OUTPUT_ANNOTATION] == "s3://b/runs/1/train/vision_model"
    assert meta["annotations"][trainjob.SPEC_ANNOTATION] == trainjob.spec_digest(obj["spec"])
    assert obj["spec"]["activeDeadlineSeconds"] == trainjob.TIMEOUT_S


def test_the_name_follows_the_output_only():
    a, b = build(), build(output="s3://b/runs/2/train/vision_model")
    assert a["metadata"]["name"] == build(CPU_NODES)["metadata"]["name"]  # a retry (same output) finds it
    assert a["metadata"]["name"] != b["metadata"]["name"]
    assert a["metadata"]["name"] == trainjob.trainjob_name("s3://b/runs/1/train/vision_model")
    assert (
        a["metadata"]["annotations"][trainjob.SPEC_ANNOTATION]
        != build(CPU_NODES)["metadata"]["annotations"][trainjob.SPEC_ANNOTATION]
    )


def test_the_command_is_torchrun_taking_the_world_from_trainer():
    """torchrun must read nodes, processes, rank and master from PET_*: a flag would override them, --standalone
    would make every node a world of its own. The args are what `python -m llm2clip.train_clip` parses back into
    the same TrainClipConfig."""
    from llm2clip.train_clip import TrainClipConfig, parser

    cfg = TrainClipConfig(epochs=3, batch_size=32, pretrained=None, center_text=False, seed=7, allow_hub=True)
    obj = trainjob.build_trainjob(
        dataclasses.asdict(cfg), "s3://b/d", "s3://b/o", ["s3://b/c0", "s3://b/c1"], CPU_NODES
    )
    command, args = obj["spec"]["trainer"]["command"], obj["spec"]["trainer"]["args"]
    assert command == ["python", "-m", "torch.distributed.run", "--module", "llm2clip.train_clip"]
    assert not [a for a in command + args if re.match(r"--(standalone|nnodes|nproc|node.rank|master|rdzv)", a)]
    parsed = parser().parse_args(args)
    assert (parsed.dataset, parsed.output) == ("s3://b/d", "s3://b/o")
    assert parsed.caption_embeddings == ["s3://b/c0", "s3://b/c1"]
    assert TrainClipConfig(**json.loads(parsed.config)) == cfg


def runtime_node() -> tuple[dict, dict]:
    """The committed TrainingRuntime llm2clip-torch, and its trainer container."""
    runtime = yaml.safe_load(RUNTIME.read_text())
    rjob = next(j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == trainjob.NODE)
    return runtime, next(c for c in rjob["template"]["spec"]["template"]["spec"]["containers"] if c["name"] == "node")


def test_the_trainjob_fits_the_committed_runtime():
    """What Trainer matches between the two: the runtime's name and kind, the torch policy (PET_* injection), the
    replicated job and container `node` the trainer step (ancestor label) runs in, which the patch targets. The
    runtime gives every node the pipeline pods' environment: the settings and S3 keys of llm2clip-config and
    llm2clip-s3 by reference (the TrainJob names no secret), and the writable HOME."""
    from llm2clip.pipelines import llm2clip_pipeline as pipeline

    runtime, node = runtime_node()
    validate(runtime)
    assert (runtime["kind"], runtime["metadata"]["name"]) == ("TrainingRuntime", trainjob.RUNTIME)
    assert trainjob.RUNTIME == NAMES["training_runtime"] and "torch" in runtime["spec"]["mlPolicy"]
    rjob = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    assert rjob["name"] == "node" and rjob["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"
    }
    sources = {(k, v["name"]) for e in node.get("envFrom", []) for k, v in e.items()}
    assert sources == {("configMapRef", pipeline.CONFIG_MAP), ("secretRef", pipeline.S3_SECRET)}
    values = {e["name"]: e.get("value") for e in node["env"]}
    assert values | pipeline.WRITABLE_ENV == values
    env = build()["spec"]["trainer"]["env"]
    assert env == [{"name": "PYTHONUNBUFFERED", "value": "1"}]  # no secret, no PET_*, nothing the runtime has


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(nodes=0), "nodes"),
        (dict(nproc=0), "nproc"),
        (dict(gpus=-1), "gpus"),
        (dict(gpus=2, nproc=4), "nproc"),
        (dict(nodes=2.0), "nodes"),
        (dict(cpu="lots"), "cpu"),
        (dict(cpu="0"), "cpu"),
        (dict(memory="-1Gi"), "memory"),
        (dict(memory=64), "memory"),
        (dict(image=""), "image"),
        (dict(node_selector={"pool": 1}), "node_selector"),
        (dict(node_selector=["pool"]), "node_selector"),
        (dict(tolerations={"key": "x"}), "tolerations"),
        (dict(tolerations=[{"key": "x", "operator": "Exists", "efect": "NoSchedule"}]), r"tolerations\[0\]"),
        (dict(tolerations=[{"key": "x", "operator": "In"}]), r"tolerations\[0\]\.operator"),
        (dict(tolerations=[{"key": "x", "effect": "NoRun"}]), r"tolerations\[0\]\.effect"),
        (dict(tolerations=[{"key": "x", "tolerationSeconds": 1.5}]), r"tolerations\[0\]\.tolerationSeconds"),
        (dict(models_pvc="My_Models"), "models_pvc"),
        (dict(models_pvc=None), "models_pvc"),
    ],
)
def test_bad_placement_is_named(change, field):
    args = dict(nodes=2, nproc=1, image="img:1", gpus=0, cpu="1", memory="1Gi")
    with pytest.raises(ValueError, match=rf"^{field}="):
        NodePlacement(**{**args, **change})


def test_the_models_pvc_is_mounted_read_only_on_every_node_where_pretrained_lies_in_it():
    """The pipeline's models_pvc reaches each node at /models (the KFP tasks' mount path), read-only, through the
    runtime patch (volumes and the `node` container's volumeMounts, list maps keyed by name in Trainer v2.3.0's
    CRD). Only when `pretrained` is under /models: the nodes load nothing else from it, and the default
    placeholder claim is ReadWriteOnce, which a block volume grants to one node at a time."""
    from llm2clip.pipelines import llm2clip_pipeline as pipeline

    placement = dataclasses.replace(GPU_NODES, models_pvc="team-models")
    config = {**CONFIG, "pretrained": "/models/vit-b-16/open_clip_model.safetensors"}
    obj = trainjob.build_trainjob(config, "s3://b/d", "s3://b/o", ["s3://b/c"], placement)
    validate(obj)
    spec = pod_patch(obj)["spec"]
    volume = {"name": "models", "persistentVolumeClaim": {"claimName": "team-models", "readOnly": True}}
    assert spec["volumes"] == [volume]
    mount = {"name": "models", "mountPath": pipeline.MODELS_PATH, "readOnly": True}
    assert spec["containers"] == [{"name": trainjob.NODE, "volumeMounts": [mount]}]
    _, node = runtime_node()
    assert "models" not in {m["name"] for m in node["volumeMounts"]}, "a name of the runtime's own would merge"
    for pretrained in (None, "s3://b/vit.safetensors", "/modelsx/vit.pt"):
        other = trainjob.build_trainjob(
            {**config, "pretrained": pretrained}, "s3://b/d", "s3://b/o", ["s3://b/c"], placement
        )
        assert "volumes" not in pod_patch(other)["spec"] and "containers" not in pod_patch(other)["spec"], pretrained
    assert "volumes" not in pod_patch(build())["spec"]  # no claim named: none mounted


def test_the_component_hands_allow_hub_and_models_pvc_to_the_trainjob(monkeypatch, tmp_path):
    """allow_hub travels in the TrainClipConfig the nodes run (the TrainJob's --config), models_pvc in the
    placement (the volume above)."""
    from kfp import dsl

    from llm2clip import components

    seen = {}

    def train_on_nodes(cfg, dataset, output, caches, placement):
        seen.update(cfg=cfg, placement=placement)
        artifacts.write_manifest(output, "train_clip", {}, {})  # what rank 0 would leave
        return {"steps": 1}

    monkeypatch.setattr(trainjob, "train_on_nodes", train_on_nodes)
    for key in ("dataset", "cache"):  # KFP artifacts pointing at written outputs (a manifest is all resolve reads)
        (tmp_path / "store" / key).mkdir(parents=True)
        (tmp_path / "store" / key / artifacts.MANIFEST).write_text("{}")
        (tmp_path / key).mkdir()
        (tmp_path / key / "location.json").write_text(json.dumps({"uri": str(tmp_path / "store" / key)}))
    monkeypatch.setenv(artifacts.STORE_ENV, str(tmp_path / "store"))
    components.train_clip_trainjob.python_func(
        dataset=dsl.Dataset(uri=str(tmp_path / "dataset")),
        caption_embeddings=[dsl.Dataset(uri=str(tmp_path / "cache"))],
        vision_model=dsl.Model(uri=str(tmp_path / "vision_model")),
        model="llm2clip-vit-tiny",
        pretrained="/models/vit.safetensors",
        epochs=1,
        batch_size=8,
        lr=0.0,
        seed=0,
        center_text=True,
        device="cpu",
        dtype="auto",
        nodes=2,
        nproc=1,
        gpus=0,
        node_cpu="1",
        node_memory="2Gi",
        node_selector={},
        tolerations=[],
        image="llm2clip-cpu:test",
        allow_hub=True,
        models_pvc="team-models",
    )
    assert seen["cfg"].allow_hub is True and seen["cfg"].pretrained == "/models/vit.safetensors"
    assert seen["placement"].models_pvc == "team-models"


def test_locations_the_nodes_cannot_reach_are_refused():
    with pytest.raises(ValueError, match=r"^output='/tmp/out': must be an s3:// or minio:// location"):
        trainjob.build_trainjob(CONFIG, "s3://b/d", "/tmp/out", ["s3://b/c"], CPU_NODES)
    with pytest.raises(ValueError, match=r"^caption_embeddings\[1\]='cache'"):
        trainjob.build_trainjob(CONFIG, "s3://b/d", "s3://b/o", ["s3://b/c", "cache"], CPU_NODES)
    with pytest.raises(ValueError, match=r"^caption_embeddings=\[\]"):
        trainjob.build_trainjob(CONFIG, "s3://b/d", "s3://b/o", [], CPU_NODES)
    with pytest.raises(ValueError, match=r"^timeout_s=0"):
        trainjob.build_trainjob(CONFIG, "s3://b/d", "s3://b/o", ["s3://b/c"], CPU_NODES, timeout_s=0)


# ----------------------------------------------------------------------------------------------- the API flow


def test_create_follow_stream_and_delete():
    obj = build()
    name = obj["metadata"]["name"]
    logs = tuple(f"epoch 0 step {i} loss {2.0 - i / 10:.2f}" for i in range(6))
    with FakeK8sApi(states=(None, None, None, "Complete"), node0_logs=(logs,)) as api:
        final, printed = run(api, obj)
    posts = api.calls("POST")
    assert [(r.path, r.body) for r in posts] == [(trainjobs_path(), obj)]  # exactly what was built, once
    gets = api.calls("GET", f"^{re.escape(trainjobs_path(name))}$")
    assert len(gets) == 4  # polled until the 4th GET reported Complete
    lists = api.calls("GET", rf"^/api/v1/namespaces/{NS}/pods$")
    assert lists and {r.query["labelSelector"] for r in lists} == {
        f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node,"
        "jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"
    }
    reads = api.calls("GET", r"/log$")
    assert reads and all(r.query["container"] == "node" and r.query["follow"] == "True" for r in reads)
    assert reads[0].path.startswith(f"/api/v1/namespaces/{NS}/pods/{name}-node-0-0-")
    assert [(r.method, r.path) for r in api.requests[-1:]] == [("DELETE", trainjobs_path(name))]
    assert node_lines(printed) == list(logs)  # every line, once, in order, before "complete"
    assert printed.index(logs[-1]) < printed.index("complete, deleted")
    assert trainjob.condition(final, "Complete") and not api.trainjobs


def test_a_retry_adopts_the_trainjob_of_its_earlier_attempt():
    obj = build()
    name = obj["metadata"]["name"]
    with FakeK8sApi(states=(None, "Complete")) as api:
        api.add_trainjob(NS, obj, state=None)  # the earlier launcher pod created it, then died
        final, printed = run(api, obj)
    assert len(api.calls("POST")) == 1  # the 409, no second create
    assert "adopted" in printed and trainjob.condition(final, "Complete")
    assert api.requests[-1].method == "DELETE" and not api.trainjobs
    assert node_lines(printed) == ["epoch 0 step 0 loss 2.0", "epoch 0 step 1 loss 1.5"]
    assert api.calls("GET", f"^{re.escape(trainjobs_path(name))}$")


def test_a_trainjob_of_another_request_under_the_name_is_not_adopted():
    obj = build()
    other = build(CPU_NODES)  # same output, hence name; another spec
    with FakeK8sApi() as api:
        api.add_trainjob(NS, other, state=None)
        with pytest.raises(RuntimeError, match=rf"TrainJob {NS}/{obj['metadata']['name']} already exists and was not"):
            run(api, obj)
    assert not api.calls("DELETE") and len(api.trainjobs) == 1


def test_a_failed_earlier_attempt_is_replaced_and_the_retry_trains():
    obj = build()
    name = obj["metadata"]["name"]
    with FakeK8sApi(states=(None, "Complete")) as api:
        failed_uid = api.add_trainjob(NS, obj, state="Failed")["metadata"]["uid"]
        final, printed = run(api, obj)
    methods = [r.method for r in api.requests if r.path in (trainjobs_path(name), trainjobs_path())]
    assert methods[:3] == ["POST", "GET", "DELETE"] and methods.count("POST") == 2
    # its pods go before it does, and only that object (the options in the body: the API server then ignores the
    # query's, kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/handlers/delete.go at 02e16cb)
    assert api.calls("DELETE")[0].body == {"propagationPolicy": "Foreground", "preconditions": {"uid": failed_uid}}
    assert "earlier attempt failed (JobSetFailed" in printed and trainjob.condition(final, "Complete")


def test_an_earlier_trainjob_being_deleted_is_waited_for_then_created_again():
    """A foreground deletion keeps the object, with a deletionTimestamp, until its pods are gone; meanwhile a POST
    of the name gets 409 AlreadyExists. The retry of a terminated launcher meets exactly that: it must neither
    adopt the dying TrainJob nor fail, but wait for it to go and create its own."""
    obj = build()
    name = obj["metadata"]["name"]
    with FakeK8sApi(states=(None, "Complete"), gc_delay_s=0.5) as api:
        api.add_trainjob(NS, obj, state=None)
        api.delete_trainjob(NS, name, {"propagationPolicy": "Foreground"})
        final, printed = run(api, obj)
    assert "being deleted; waiting for it to go" in printed and "adopted" not in printed
    assert len(api.calls("POST")) == 2 and trainjob.condition(final, "Complete")


def test_a_trainjob_deleted_under_the_launcher_is_reported_at_once():
    obj = build()

    def someone_deletes_it(api: FakeK8sApi, namespace: str, created: dict) -> None:
        threading.Timer(
            0.1, api.delete_trainjob, (namespace, created["metadata"]["name"], {"propagationPolicy": "Foreground"})
        ).start()

    with FakeK8sApi(states=(None,), on_create=someone_deletes_it, gc_delay_s=5) as api:
        with pytest.raises(RuntimeError, match=rf"TrainJob {NS}/{obj['metadata']['name']} is being deleted"):
            run(api, obj)


LAUNCHER = """
import json, sys
from llm2clip.ops import trainjob
trainjob.run_trainjob(trainjob.load_client(), trainjob.current_namespace(), json.loads(sys.argv[1]), poll_s=0.05)
"""


def test_sigterm_deletes_the_trainjob_and_exits_nonzero(tmp_path):
    """Terminating or deleting a KFP run stops the launcher's pod with SIGTERM: Argo's emissary forwards it to the
    process group of the command it runs (argoproj/argo-workflows workflow/executor/osspecific/signal_darwin.go,
    Kill: syscall.Kill(-pgid); command_unix.go sets Setpgid; signal_linux.go is that file), and KFP's launcher runs
    our Python in its own group (kubeflow/pipelines 2.16.0 backend/src/v2/component/launcher_v2.go:602, a plain
    exec.Command). A real launcher process, sent SIGTERM while it follows a running TrainJob, must delete that
    TrainJob (Foreground, that uid) and exit 143; the fake then removes its pods and the TrainJob."""
    obj = build()
    name = obj["metadata"]["name"]
    with FakeK8sApi(states=(None,), gc_delay_s=0.3) as api:
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        env["KUBECONFIG"] = str(kubeconfig(tmp_path, api.host, NS))
        launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, json.dumps(obj)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            polls = rf"^{re.escape(trainjobs_path(name))}$"
            deadline = time.monotonic() + 120
            while len(api.calls("GET", polls)) < 3 and launcher.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # until it follows the TrainJob it created
            assert launcher.poll() is None and (NS, name) in api.trainjobs
            uid = api.trainjobs[(NS, name)]["metadata"]["uid"]
            launcher.send_signal(signal.SIGTERM)
            printed, _ = launcher.communicate(timeout=60)
        finally:
            launcher.kill()
        assert launcher.returncode == 128 + signal.SIGTERM, printed[-3000:]
        foreground_that_one = {"propagationPolicy": "Foreground", "preconditions": {"uid": uid}}
        assert [r.body for r in api.calls("DELETE")] == [foreground_that_one]
        assert f"TrainJob {name}: SIGTERM; deleted it" in printed
        gone_by = time.monotonic() + 10
        while (api.trainjobs or api.pods) and time.monotonic() < gone_by:
            time.sleep(0.05)
        assert not api.trainjobs and not api.pods


def test_the_launcher_and_its_trainjob_end_before_the_launcher_pod_is_killed():
    """KFP's driver sets the task's timeout as the launcher pod's activeDeadlineSeconds (kubeflow/pipelines 2.16.0
    backend/src/v2/driver/k8s.go:526-528), after which the kubelet kills the pod, message or not. The launcher's
    own poll timeout and the TrainJob's activeDeadlineSeconds (from its creation: kubeflow/trainer v2.3.0
    pkg/controller/trainjob_controller.go:155-179) end DEADLINE_MARGIN_S before that, so the timeout is reported
    and the nodes released while the launcher still runs."""
    docs = list(yaml.safe_load_all((ROOT / "pipelines" / "llm2clip.yaml").read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    pod_timeouts = [
        int(e["activeDeadlineSeconds"]) for n, e in executors.items() if n.startswith("exec-train-clip-trainjob")
    ]
    assert pod_timeouts and set(pod_timeouts) == {trainjob.TASK_TIMEOUT_S}
    margin = trainjob.DEADLINE_MARGIN_S
    assert margin >= 600 and trainjob.TIMEOUT_S == trainjob.TASK_TIMEOUT_S - margin
    assert build()["spec"]["activeDeadlineSeconds"] == trainjob.TIMEOUT_S
    for launcher in (trainjob.run_trainjob, trainjob.train_on_nodes):
        assert inspect.signature(launcher).parameters["timeout_s"].default == trainjob.TIMEOUT_S


def test_failed_raises_its_reason_and_message_and_keeps_the_trainjob():
    obj, out = build(), io.StringIO()
    with FakeK8sApi(states=(None, "Failed"), failure=("JobSetFailed", "node-2: exit code 137 (OOMKilled)")) as api:
        with pytest.raises(trainjob.TrainJobFailed, match=r"failed: JobSetFailed: node-2: exit code 137 \(OOMKilled\)"):
            run(api, obj, out)
    assert not api.calls("DELETE") and (NS, obj["metadata"]["name"]) in api.trainjobs  # left for inspection
    assert node_lines(out.getvalue()) == ["epoch 0 step 0 loss 2.0", "epoch 0 step 1 loss 1.5"]  # its log came first


def test_a_trainjob_that_never_finishes_times_out_and_is_left_running():
    obj = build()
    with FakeK8sApi(states=(None,)) as api:
        with pytest.raises(TimeoutError, match=rf"TrainJob {NS}/{obj['metadata']['name']} not finished after 1 s"):
            run(api, obj, timeout_s=1)
    assert not api.calls("DELETE")


def test_polling_rides_out_a_restarting_api_server():
    with FakeK8sApi(states=(None, "Complete"), unavailable=3) as api:
        final, printed = run(api, build())
    assert printed.count("API error 503") == 3 and trainjob.condition(final, "Complete")
    assert api.requests[-1].method == "DELETE"
    out = io.StringIO()  # an API server that stays down: the launcher gives up after API_ERRORS retries in a row
    with FakeK8sApi(states=(None,), unavailable=10**6) as api:
        with pytest.raises(kubernetes.client.exceptions.ApiException, match="503"):
            run(api, build(), out)
    assert out.getvalue().count("retrying") == trainjob.API_ERRORS and not api.calls("DELETE")


def test_the_log_survives_a_restarted_container_and_a_dropped_stream():
    """node 0's container runs twice (restartCount 1) and the first stream drops mid-way: every line is printed
    once, in order (the resumed stream overlaps; the launcher drops what it printed by the log timestamps)."""
    first = tuple(f"run 1 line {i}" for i in range(5))
    second = tuple(f"run 2 line {i}" for i in range(3))
    with FakeK8sApi(states=(None,) * 15 + ("Complete",), node0_logs=(first, second), drop_after=3) as api:
        _, printed = run(api, build())
    assert node_lines(printed) == list(first + second)
    reads = api.calls("GET", r"/log$")
    assert len(reads) >= 3 and "sinceSeconds" in reads[1].query


@pytest.mark.parametrize("restart", ["pod", "jobset"])
def test_the_log_follows_node_0_into_the_pod_that_replaces_it(restart):
    """Pods are replaced, not only restarted: an evicted or preempted node's pod fails as a whole and the Job
    controller makes a new pod (new name, new uid) for its index, keeping the failed one (kubernetes.io/docs/
    concepts/workloads/controllers/job, Handling Pod and container failures); a JobSet restart deletes the Jobs of
    the old restart attempt (Foreground) and makes them again (kubernetes-sigs/jobset v0.12.0
    pkg/controllers/jobset_controller.go:365-377, :761-783). The old and new pods carry the same node-0 labels and,
    to the second, often the same creationTimestamp. The follower must read the old pod's log to its end, then the
    new pod's: each line once, in order."""
    first = tuple(f"attempt 0 line {i}" for i in range(4))
    second = tuple(f"attempt 1 line {i}" for i in range(3))
    with FakeK8sApi(states=(None,) * 25 + ("Complete",), node0_logs=(first, second), restart=restart) as api:
        _, printed = run(api, build())
    assert node_lines(printed) == list(first + second)
    read_from = list(dict.fromkeys(r.path.split("/")[-2] for r in api.calls("GET", r"/log$")))
    assert len(read_from) == 2  # the replaced pod's log, then its successor's
    assert f"node 0 Running (pod {read_from[1]})" in printed


def test_the_runner_role_allows_every_request_the_launcher_sends():
    """Each (verb, API group, resource[/subresource]) the launcher sent in the flows above is granted by the Role
    the pipeline's pods run as (manifests/base/runner-rbac.yaml), and nothing needs a cluster-wide grant."""
    obj = build()
    with FakeK8sApi(states=(None, "Complete"), drop_after=1) as api:
        api.add_trainjob(NS, obj, state="Failed")  # replace: create, get, delete
        run(api, obj)
    role = next(
        d
        for d in yaml.safe_load_all((ROOT / "manifests" / "base" / "runner-rbac.yaml").read_text())
        if d and d["kind"] == "Role"
    )
    needed = {rbac_request(r) for r in api.requests}
    assert needed == {
        ("create", "trainer.kubeflow.org", "trainjobs"),
        ("get", "trainer.kubeflow.org", "trainjobs"),
        ("delete", "trainer.kubeflow.org", "trainjobs"),
        ("list", "", "pods"),
        ("get", "", "pods"),
        ("get", "", "pods/log"),
    }
    for verb, group, resource in sorted(needed):
        assert any(
            group in rule["apiGroups"]
            and resource in rule["resources"]
            and verb in rule["verbs"]
            and not rule.get("resourceNames")
            for rule in role["rules"]
        ), (verb, group, resource)
    # ... and the rules added for the launcher grant nothing it does not send
    for rule in role["rules"]:
        if rule["resources"] in (["trainjobs"], ["pods/log"]):
            granted = {(v, g, r) for v in rule["verbs"] for g in rule["apiGroups"] for r in rule["resources"]}
            assert granted <= needed, granted - needed


def rbac_request(r) -> tuple[str, str, str]:
    """The RBAC attributes of a request: verb (from method, and item vs collection), group, resource[/sub]."""
    parts = r.path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    assert rest[0] == "namespaces" and rest[1] == NS, r.path
    resource = rest[2] + ("/" + rest[4] if len(rest) > 4 else "")
    item = len(rest) > 3
    verb = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}.get(r.method)
    if verb is None:
        verb = "get" if item else ("watch" if r.query.get("watch") in ("true", "True", "1") else "list")
    return verb, group, resource


def test_the_namespace_is_the_pods_own(tmp_path, monkeypatch):
    ns_file = tmp_path / "namespace"
    ns_file.write_text("kubeflow-user-example-com\n")
    monkeypatch.setattr(trainjob, "SA_NAMESPACE_FILE", ns_file)
    assert trainjob.current_namespace() == "kubeflow-user-example-com"


# ----------------------------------------------------------------------------------------------- end to end


def test_the_component_trains_on_two_nodes_through_its_trainjob(tiny_dataset, s3_env, tmp_path, monkeypatch):
    """train_clip_trainjob.python_func -> the kubernetes client (from a kubeconfig, as outside a pod) -> the fake
    API, whose create hook runs the TrainJob's command as 2 nodes x 1 process (gloo) with only the environment
    the TrainJob declares (the ConfigMap and Secret references resolved as the kubelet would) plus the PET_*
    variables -> the real stage 2 writes its model and manifest to the S3 store -> the component returns it."""
    from kfp import dsl
    from test_train_stream import fake_cache

    from llm2clip import components

    data_uri, cache_uri = f"{s3_env}/data", f"{s3_env}/cache"
    storage.upload_dir(tiny_dataset, data_uri)
    storage.upload_dir(fake_cache(tiny_dataset, tmp_path / "local-cache"), cache_uri)
    artifact = {}
    for key, uri in (("dataset", data_uri), ("cache", cache_uri)):  # KFP artifacts that point into the store
        (tmp_path / key).mkdir()
        (tmp_path / key / "location.json").write_text(json.dumps({"uri": uri}))
        artifact[key] = dsl.Dataset(uri=str(tmp_path / key))
    monkeypatch.setenv(artifacts.STORE_ENV, s3_env)
    config_map = {"MINIO_ENDPOINT": os.environ["MINIO_ENDPOINT"], "MINIO_SECURE": "false", "LLM2CLIP_STORE": s3_env}
    secret = {k: os.environ[k] for k in NAMES["secret"]["keys"]}
    nodes: list[subprocess.CompletedProcess] = []

    def trainer(api: FakeK8sApi, namespace: str, obj: dict) -> None:
        nodes.extend(run_nodes(obj, config_map, secret))
        api.node0_logs = (tuple(nodes[0].stdout.splitlines()),)
        api.states = ("Complete",) if all(p.returncode == 0 for p in nodes) else ("Failed",)

    monkeypatch.setattr(trainjob, "SA_NAMESPACE_FILE", tmp_path / "not-in-a-pod")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    vision = dsl.Model(uri=str(tmp_path / "train-clip-trainjob" / "vision_model"))
    with FakeK8sApi(on_create=trainer) as api:
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, api.host, NS)))
        components.train_clip_trainjob.python_func(
            dataset=artifact["dataset"],
            caption_embeddings=[artifact["cache"]],
            vision_model=vision,
            model="llm2clip-vit-tiny",
            pretrained="",
            epochs=1,
            batch_size=8,
            lr=1e-3,
            seed=0,
            center_text=True,
            device="cpu",
            dtype="auto",
            nodes=2,
            nproc=1,
            gpus=0,
            node_cpu="1",
            node_memory="2Gi",
            node_selector={},
            tolerations=[],
            image="llm2clip-cpu:test",
        )
    assert all(p.returncode == 0 for p in nodes), nodes[0].stdout[-3000:] + nodes[1].stdout[-3000:]
    assert "rank 0/2" in nodes[0].stdout and "rank 1/2" in nodes[1].stdout  # one world of two nodes
    location = json.loads((Path(vision.path) / "location.json").read_text())["uri"]
    manifest = artifacts.read_manifest(location, "train_clip")
    assert location.startswith(s3_env) and manifest["compute"]["world_size"] == 2
    assert vision.metadata["nodes"] == 2 and vision.metadata["steps"] == manifest["metrics"]["steps"] == 6
    assert api.calls("POST")[0].path == trainjobs_path() and api.requests[-1].method == "DELETE"
    assert storage.exists(storage.join(location, "model.safetensors"))


def run_nodes(obj: dict, config_map: dict, secret: dict) -> list[subprocess.CompletedProcess]:
    """The TrainJob's trainer as Trainer + JobSet + the kubelet would start it, on this machine: numNodes
    processes of its command and args, with the environment of the runtime's `node` container (its envFrom
    resolved from `config_map` and `secret`, as the kubelet does with llm2clip-config and llm2clip-s3) merged with
    the TrainJob's env, and the PET_* variables of Trainer's torch plugin (node 0's address is 127.0.0.1 here).
    Nothing else of this process's environment. "python" is this venv's."""
    spec = obj["spec"]["trainer"]
    _, node = runtime_node()
    env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    for source in node.get("envFrom", []):  # the runtime's container: envFrom, then env, then the TrainJob's env
        env |= config_map if "configMapRef" in source else secret
    for e in node.get("env", []) + spec["env"]:
        assert "value" in e, f"{e}: resolve it here"
        env[e["name"]] = e["value"]
    port = str(free_port())
    command = [sys.executable if a == "python" else a for a in spec["command"]] + spec["args"]
    procs = [
        subprocess.Popen(
            command,
            env={
                **env,
                "PET_NNODES": str(spec["numNodes"]),
                "PET_NODE_RANK": str(rank),
                "PET_NPROC_PER_NODE": str(spec["numProcPerNode"]),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": port,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(spec["numNodes"])
    ]
    done = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:  # e.g. nodes that never form one world: fail, do not hang
            for q in procs:
                q.kill()
            out, _ = p.communicate()
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    return done


def kubeconfig(tmp_path: Path, server: str, namespace: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "launcher", "user": {"token": "not-a-secret"}}],
                "contexts": [
                    {"name": "fake", "context": {"cluster": "fake", "user": "launcher", "namespace": namespace}}
                ],
            }
        )
    )
    return path


def test_the_component_is_thin_and_its_pod_asks_for_no_gpu():
    from llm2clip import components

    # thin: what its body may contain is test_components' AST rule (one config, one library call), not a line count
    spec = components.train_clip_trainjob.component_spec
    assert spec.implementation.container.resources is None  # GPUs are the TrainJob's nodes', set by trainjob.py
    assert list(spec.inputs) == [
        "dataset",
        "caption_embeddings",
        "model",
        "pretrained",
        "epochs",
        "batch_size",
        "lr",
        "seed",
        "center_text",
        "device",
        "dtype",
        "nodes",
        "nproc",
        "gpus",
        "node_cpu",
        "node_memory",
        "node_selector",
        "tolerations",
        "image",
        "enabled",
        "allow_hub",
        "models_pvc",
    ]
