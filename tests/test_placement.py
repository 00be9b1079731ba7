"""Where the compiled pipeline runs on Kubernetes (issue 9 item 2), read from the committed pipelines/llm2clip.yaml.

kfp.local runs none of it (tests/test_pipeline.py); these checks are static: a real cluster must still confirm that
the backend turns them into the pods asserted here.
"""

import json
import re
from pathlib import Path

import pytest
import yaml
from llm2clip.components import image as images
from llm2clip.pipelines import llm2clip_pipeline as pipeline

NAMES = Path(__file__).parents[1] / "manifests" / "names.json"
GPU_COMPONENTS = {"tune-caption-encoder", "cache-caption-embeddings", "train-clip", "train-clip-baseline"}
CPU_COMPONENTS = {
    "locate-store",
    "format-gpu-limit",
    "prepare-data",
    "evaluate",
    "train-clip-trainjob",
    "collect-vision-model",
}
# The GPU steps' accelerator count: format_gpu_limit's output (a string, see tests/test_backend_rules.py), passed
# into each training sub-pipeline as its input gpu_limit.
GPU_LIMITS = ("format-gpu-limit-Output", "gpu_limit")


@pytest.fixture(scope="module")
def compiled() -> dict:
    """{"spec": the pipeline spec, "k8s": executor label -> kubernetes config, "tasks": [(dag, name, task)]}."""
    spec, platform = yaml.safe_load_all(pipeline.COMPILED.read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    dags = {"root": spec["root"]["dag"], **{k: c["dag"] for k, c in spec["components"].items() if "dag" in c}}
    tasks = [(dag, name, task) for dag, d in dags.items() for name, task in d["tasks"].items()]
    return {"spec": spec, "k8s": k8s, "tasks": tasks}


def executor(compiled: dict, task: dict) -> str | None:
    """The executor label a task runs (None for a sub-DAG such as a ParallelFor)."""
    return compiled["spec"]["components"][task["componentRef"]["name"]].get("executorLabel")


def kind(label: str) -> str:
    """ "gpu" or "cpu" from an executor label such as exec-train-clip-3."""
    base = label.removeprefix("exec-").rstrip("-0123456789")
    assert base in GPU_COMPONENTS | CPU_COMPONENTS, label
    return "gpu" if base in GPU_COMPONENTS else "cpu"


def param(name: str) -> str:
    return "{{$.inputs.parameters['pipelinechannel--" + name + "']}}"


def test_every_executor_is_known_and_each_step_kind_is_there(compiled):
    executors = compiled["spec"]["deploymentSpec"]["executors"]
    assert set(executors) == set(compiled["k8s"])  # every executor has Kubernetes settings
    bases = {label.removeprefix("exec-").rstrip("-0123456789") for label in executors}
    assert bases == GPU_COMPONENTS | CPU_COMPONENTS
    # 2 cache fan-outs, 2 LLM2CLIP trainings + 2 ablations, the baseline, stage 1
    assert sum(kind(label) == "gpu" for label in executors) == 8


def test_gpu_settings_only_on_gpu_executors(compiled):
    for label, ex in compiled["spec"]["deploymentSpec"]["executors"].items():
        container, k8s = ex["container"], compiled["k8s"][label]
        accelerator = container["resources"].get("accelerator")
        if kind(label) == "gpu":
            assert accelerator["resourceCount"] in [param(name) for name in GPU_LIMITS], label
            assert accelerator["resourceType"] == pipeline.GPU_RESOURCE, label
            assert container["image"] == param("gpu_image"), label
            assert k8s["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith("gpu_node_selector")
            [toleration] = k8s["tolerations"]
            assert toleration["tolerationJson"]["componentInputParameter"].endswith("gpu_tolerations")
            assert k8s["emptyDirMounts"] == [
                {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": pipeline.SHM_SIZE, "volumeName": "dshm"}
            ]
            resources = container["resources"]
            assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == param("gpu_task_cpu")
            assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == param("gpu_task_memory")
        else:
            assert accelerator is None, label
            assert container["image"] == param("cpu_image"), label
            assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(k8s), label


def test_every_task_has_resources_timeout_pull_policy_label_and_writable_home(compiled):
    names = json.loads(NAMES.read_text()) if NAMES.exists() else None
    label_key, label_value = pipeline.POD_LABEL
    if names:
        assert {label_key: label_value} == {names["pod_label"]["key"]: names["pod_label"]["value"]}
    for label, ex in compiled["spec"]["deploymentSpec"]["executors"].items():
        resources, k8s = ex["container"]["resources"], compiled["k8s"][label]
        for field in ("CpuRequest", "CpuLimit", "MemoryRequest", "MemoryLimit"):
            assert resources.get(f"resource{field}"), (label, field)
        assert k8s["imagePullPolicy"] == "IfNotPresent", label
        assert int(k8s["activeDeadlineSeconds"]) > 0, label
        assert k8s["podMetadata"]["labels"] == {label_key: label_value}, label
        env = {e["name"]: e["value"] for e in ex["container"]["env"]}
        assert env == {"HOME": "/tmp", "HF_HOME": "/tmp/huggingface", "MPLCONFIGDIR": "/tmp/matplotlib"}, label


def test_every_task_gets_the_s3_secret_and_the_config_map(compiled):
    """Names and keys as manifests/ ships them (manifests/names.json); the Secret name is a literal."""
    names = json.loads(NAMES.read_text()) if NAMES.exists() else None
    secret, config_map = pipeline.S3_SECRET, pipeline.CONFIG_MAP
    if names:
        assert (secret, list(pipeline.S3_SECRET_KEYS)) == (names["secret"]["name"], names["secret"]["keys"])
        assert (config_map, list(pipeline.CONFIG_MAP_KEYS)) == (names["configmap"]["name"], names["configmap"]["keys"])
    for label, k8s in compiled["k8s"].items():
        [from_secret] = k8s["secretAsEnv"]
        assert from_secret["secretNameParameter"] == {"runtimeValue": {"constant": secret}}, label
        assert {(e["secretKey"], e["envVar"]) for e in from_secret["keyToEnv"]} == {
            (k, k) for k in pipeline.S3_SECRET_KEYS
        }, label
        [from_config] = k8s["configMapAsEnv"]
        assert from_config["configMapNameParameter"] == {"runtimeValue": {"constant": config_map}}, label
        assert {(e["configMapKey"], e["envVar"]) for e in from_config["keyToEnv"]} == {
            (k, k) for k in pipeline.CONFIG_MAP_KEYS
        }, label


def test_every_parameter_a_task_reads_is_an_input_of_its_dag(compiled):
    """Inside ParallelFor a task reads its DAG's `pipelinechannel--*` inputs: placement parameters (resources, node
    selector, tolerations) must be passed in like the component's own (kfp 2.17 forgets resources by itself)."""
    spec = compiled["spec"]
    inputs = {"root": set(spec["root"]["inputDefinitions"]["parameters"])}
    inputs |= {k: set(c["inputDefinitions"]["parameters"]) for k, c in spec["components"].items() if "dag" in c}
    placeholder = re.compile(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}")
    for dag, name, task in compiled["tasks"]:
        read = {
            p["componentInputParameter"]
            for p in task["inputs"].get("parameters", {}).values()
            if "componentInputParameter" in p
        }
        label = executor(compiled, task)
        if label:
            k8s = json.dumps(compiled["k8s"][label])
            read |= set(re.findall(r'"componentInputParameter": "([^"]+)"', k8s))
            container = json.dumps(spec["deploymentSpec"]["executors"][label]["container"])
            passed = set(task["inputs"].get("parameters", {}))  # a container placeholder reads the task's inputs
            assert (
                not set(placeholder.findall(container.replace('\\"', '"')))
                - passed
                - set(
                    spec["components"][task["componentRef"]["name"]].get("inputDefinitions", {}).get("parameters", {})
                )
            ), name
        assert read <= inputs[dag], (dag, name, read - inputs[dag])


def test_placement_parameters_and_their_defaults(compiled):
    params = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    defaults = {k: v.get("defaultValue") for k, v in params.items()}
    assert defaults["gpus"] == 1 and defaults["train_nproc"] == 1
    assert defaults["gpu_node_selector"] == {}
    # [] and {}: a JSON object in a default is printed in the YAML's header in an order that changes between runs
    assert defaults["gpu_tolerations"] == []
    assert "image" not in defaults  # replaced by cpu_image and gpu_image
    assert (defaults["cpu_image"], defaults["gpu_image"]) == (pipeline.CPU_IMAGE, pipeline.GPU_IMAGE)
    # a default must build from the repository: the CUDA image does (hash-locked) and runs on CPU nodes too; the
    # VARIANT=cpu image's torch lock has no hashes (tests/test_images.py)
    assert defaults["cpu_image"] == defaults["gpu_image"] == images.IMAGE_GPU


def test_retries_with_backoff_on_gpu_steps_only(compiled):
    for _, name, task in compiled["tasks"]:
        label = executor(compiled, task)
        if label is None:
            continue
        if kind(label) == "gpu" or name == "train-clip-trainjob":  # a retried launcher adopts its TrainJob
            policy = task["retryPolicy"]
            assert policy["maxRetryCount"] == pipeline.GPU_RETRY["num_retries"] >= 1, name
            assert policy["backoffDuration"] == pipeline.GPU_RETRY["backoff_duration"], name
            assert policy["backoffFactor"] > 1, name
        else:
            assert "retryPolicy" not in task, name


def test_parallel_for_is_bounded(compiled):
    loops = [task for _, _, task in compiled["tasks"] if "parameterIterator" in task]
    assert len(loops) == 2  # the two cache fan-outs
    for task in loops:
        assert task["iteratorPolicy"]["parallelismLimit"] == pipeline.CACHE_PARALLELISM > 0


def test_every_task_has_a_display_name(compiled):
    """Tasks at the root and in the cache fan-outs; each LLM-taught training is a sub-pipeline (one node or a
    TrainJob) whose two tasks are named train_clip and train_clip_trainjob."""
    tasks = compiled["tasks"]
    shown = {t["taskInfo"]["name"] for d, _, t in tasks if executor(compiled, t) and not d.startswith("comp-condition")}
    shown |= {t["taskInfo"]["name"] for d, _, t in tasks if t["componentRef"]["name"].startswith("comp-train-clip-on")}
    inner = {t["taskInfo"]["name"] for d, _, t in tasks if d.startswith("comp-condition") and executor(compiled, t)}
    assert inner == {"train_clip", "train_clip_trainjob"}
    assert shown == {
        "locate_store",
        "prepare_data",
        "tune_caption_encoder",
        "cache_caption_embeddings (llm2clip)",
        "cache_caption_embeddings (llm2clip_raw_llm)",
        "train_clip (llm2clip)",
        "train_clip (llm2clip_raw_llm)",
        "train_clip (llm2clip, no centring)",
        "train_clip (llm2clip_raw_llm, no centring)",
        "train_clip_baseline",
        "evaluate",
        "format_gpu_limit",
        "collect_vision_model",  # one in each training sub-pipeline
    }


def test_the_store_enters_the_cache_key(compiled):
    """prepare_data takes the store from locate_store, which is never cached; every later task takes its dataset."""
    tasks = {name: task for dag, name, task in compiled["tasks"] if dag == "root"}
    assert tasks["locate-store"]["cachingOptions"].get("enableCache", False) is False
    store_input = tasks["prepare-data"]["inputs"]["parameters"]["store"]
    assert store_input == {"taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "locate-store"}}
    for dag, name, task in compiled["tasks"]:
        if executor(compiled, task) and name not in ("locate-store", "prepare-data"):
            assert task["cachingOptions"]["enableCache"] is True, name
            if name == "format-gpu-limit":  # a function of `gpus` alone, the same in every store
                assert set(task["inputs"]["parameters"]) == {"gpus", "pipelinechannel--cpu_image", "base_image"}
                continue
            if name == "collect-vision-model":  # the location a training wrote, a new one for a new dataset
                location = task["inputs"]["parameters"]["location"]["taskOutputParameter"]
                assert location["producerTask"].startswith("condition-branches"), name
                assert "artifacts" not in task["inputs"], name
                continue
            dataset = task["inputs"]["artifacts"]["dataset"]
            assert dataset.get("taskOutputArtifact", {}).get("producerTask") == "prepare-data" or (
                dag != "root"
                and dataset["componentInputArtifact"]
                in ("pipelinechannel--prepare-data-dataset", "pipelinechannel--dataset")
            ), name
    # each training sub-pipeline takes prepare_data's dataset; inside, its condition branches take that input
    for _, _, task in compiled["tasks"]:
        if task["componentRef"]["name"].startswith("comp-train-clip-on-nodes"):
            assert task["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]["producerTask"] == "prepare-data"


def test_training_processes_follow_train_nproc(compiled):
    """`gpus` sizes the pod, `train_nproc` the torchrun processes in it (the docstring asks to keep them equal)."""
    for dag, name, task in compiled["tasks"]:
        if name.startswith("train-clip"):
            nproc = task["inputs"]["parameters"]["nproc"]["componentInputParameter"]
            # in a training sub-pipeline, nproc is the sub-pipeline's own input, given train_nproc at the root
            assert nproc.endswith("train_nproc") or (
                dag.startswith("comp-condition") and nproc == "pipelinechannel--nproc"
            ), name
    at_root = [
        t for d, _, t in compiled["tasks"] if d == "root" and t["componentRef"]["name"].startswith("comp-train-clip-on")
    ]
    assert len(at_root) == 4
    for task in at_root:
        assert task["inputs"]["parameters"]["nproc"]["componentInputParameter"] == "train_nproc"
        assert task["inputs"]["parameters"]["nodes"]["componentInputParameter"] == "train_nodes"


def test_train_nodes_picks_one_pod_or_a_trainjob_whose_launcher_has_no_gpu(compiled):
    """train_nodes == 1: train_clip in a GPU pod; otherwise train_clip_trainjob, a CPU pod that passes the GPU
    placement on to the TrainJob's nodes; the sub-pipeline returns the model of whichever ran, through a parameter
    dsl.OneOf of their locations that collect_vision_model makes an artifact again (an artifact OneOf resolves to
    the last branch on KFP 2.16.x: tests/test_backend_rules.py)."""
    spec = compiled["spec"]
    conditions = {dag: task for dag, _, task in compiled["tasks"] if "triggerPolicy" in task}
    kinds = {}
    for dag, _, task in compiled["tasks"]:
        if dag.startswith("comp-condition") and executor(compiled, task):
            kinds[task["taskInfo"]["name"]] = (kind(executor(compiled, task)), dag)
    assert kinds["train_clip"][0] == "gpu" and kinds["train_clip_trainjob"][0] == "cpu"
    triggers = sorted(t["triggerPolicy"]["condition"] for t in conditions.values())
    assert any("== 1" in c for c in triggers) and any("!(" in c and "== 1" in c for c in triggers), triggers
    launcher = next(t for d, n, t in compiled["tasks"] if n == "train-clip-trainjob")
    passed = {k: v.get("componentInputParameter") for k, v in launcher["inputs"]["parameters"].items()}
    placement = {
        "nodes": "nodes",
        "gpus": "gpus",
        "node_cpu": "gpu_task_cpu",
        "node_memory": "gpu_task_memory",
        "node_selector": "gpu_node_selector",
        "tolerations": "gpu_tolerations",
        "image": "gpu_image",
    }
    for mine, theirs in placement.items():
        assert passed[mine] == f"pipelinechannel--{theirs}", mine
    sub = next(c for k, c in spec["components"].items() if k.startswith("comp-train-clip-on-nodes"))
    [output] = sub["dag"]["outputs"]["artifacts"].values()
    assert output["artifactSelectors"] == [
        {"outputArtifactKey": "vision_model", "producerSubtask": "collect-vision-model"}
    ]
    location = sub["dag"]["tasks"]["collect-vision-model"]["inputs"]["parameters"]["location"]["taskOutputParameter"]
    branches = spec["components"][sub["dag"]["tasks"][location["producerTask"]]["componentRef"]["name"]]
    [oneof] = branches["dag"]["outputs"]["parameters"].values()
    chosen = {(s["producerSubtask"], s["outputParameterKey"]) for s in oneof["valueFromOneof"]["parameterSelectors"]}
    assert chosen == {
        ("condition-2", "pipelinechannel--train-clip-Output"),
        ("condition-3", "pipelinechannel--train-clip-trainjob-Output"),
    }


def test_the_local_pipeline_has_the_same_parameters_and_no_pod_settings():
    """kfp.local runs `llm2clip_pipeline`: the compiled DAG's parameters, none of its pod settings (kfp.local would
    set HOME=/tmp and retry failed tasks on this machine)."""
    from google.protobuf import json_format

    local = pipeline.llm2clip_pipeline
    cluster = pipeline.build_pipeline(on_cluster=True)
    assert local.pipeline_spec.root.input_definitions == cluster.pipeline_spec.root.input_definitions
    assert not local.platform_spec.platforms and cluster.platform_spec.platforms["kubernetes"]
    executors = json_format.MessageToDict(local.pipeline_spec.deployment_spec)["executors"]
    for label, ex in executors.items():
        assert not {"env", "resources"} & set(ex["container"]), label
    spec = json_format.MessageToDict(local.pipeline_spec)
    dags = [c["dag"] for c in [spec["root"], *spec["components"].values()] if "dag" in c]
    tasks = [task for dag in dags for task in dag["tasks"].values()]
    assert tasks and not [t for t in tasks if "retryPolicy" in t]


def test_a_cache_hit_whose_objects_were_deleted_says_to_rerun_without_cache(tmp_path):
    from llm2clip import artifacts

    art = tmp_path / "artifact"
    art.mkdir()
    (art / artifacts.LOCATION).write_text(json.dumps({"uri": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match="without cache"):
        artifacts.resolve(str(art))


def test_the_no_centring_trainings_follow_center_text_and_ablations(compiled):
    """LLM2CLIP without centring (the paper's stage 2) trains whenever its main training centres, so every report
    shows what centring is worth (issue 19); the raw LLM's only with ablations=true. The centring flag of both is
    the constant False, never the pipeline's center_text."""
    by_display = {t["taskInfo"]["name"]: t for dag, _, t in compiled["tasks"] if dag == "root"}
    for display, enabled_by in (
        ("train_clip (llm2clip, no centring)", "center_text"),
        ("train_clip (llm2clip_raw_llm, no centring)", "ablations"),
    ):
        params = by_display[display]["inputs"]["parameters"]
        assert params["enabled"] == {"componentInputParameter": enabled_by}, display
        assert params["center_text"] == {"runtimeValue": {"constant": False}}, display
    main = by_display["train_clip (llm2clip)"]["inputs"]["parameters"]
    assert main["center_text"] == {"componentInputParameter": "center_text"}
    assert main["enabled"] == {"runtimeValue": {"constant": True}}
