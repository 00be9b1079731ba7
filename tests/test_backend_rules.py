"""Rules the real KFP backend applies to a compiled pipeline, checked on what we upload.

kfp.local and our stand-in servers accept pipelines that the backend driver refuses or quietly runs without their
GPUs. Each rule here is written from the driver's source, kubeflow/pipelines at tags 2.16.0 and 2.17.0 (read them
with `git show 2.16.0:backend/src/v2/driver/resolve.go`), cited by file and line in its check. Each rule is
checked on pipelines/llm2clip.yaml, on the `--no-cache` variant `llm2clip submit` uploads, and on a small pipeline
built here that breaks it, so that every check is seen to fail. LLM2CLIP_CHECK_SPEC=PATH checks another compiled
pipeline in place of the committed one (e.g. `git show OLD:pipelines/llm2clip.yaml > /tmp/old.yaml`).
"""

import os
import re
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl
from llm2clip.pipelines import llm2clip_pipeline as pipeline

from llm2clip.ops import submit

# ---- reading a compiled spec

PLACEHOLDER = re.compile(r"^\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}$")
NUMBERS = {"NUMBER_INTEGER", "NUMBER_DOUBLE"}
FIXED = (2, 17, 0)  # the first backend whose artifact dsl.OneOf takes the branch that ran (issue 13436)


def load(path: Path) -> dict:
    """The pipeline spec (the first YAML document; the second, if any, is the Kubernetes platform spec)."""
    return next(yaml.safe_load_all(Path(path).read_text()))


def load_platform(path: Path) -> dict:
    """The Kubernetes platform spec's executors (the second YAML document), {} where there is none."""
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}


def dags(spec: dict) -> dict[str, dict]:
    """Every DAG by component name ("root" for the pipeline), each with its `dag` and `inputDefinitions`."""
    return {"root": spec["root"], **{k: c for k, c in spec["components"].items() if "dag" in c}}


def component(spec: dict, name: str) -> dict:
    return spec["root"] if name == "root" else spec["components"][name]


def users(spec: dict, component_name: str) -> list[tuple[str, str, dict]]:
    """(dag, task name, task) of every task that runs `component_name`."""
    return [
        (d, n, t)
        for d, c in dags(spec).items()
        for n, t in c["dag"]["tasks"].items()
        if t["componentRef"]["name"] == component_name
    ]


def declared(spec: dict, component_name: str, param: str) -> str:
    return component(spec, component_name)["inputDefinitions"]["parameters"][param]["parameterType"]


def constant_type(value) -> str:
    kinds = {bool: "BOOLEAN", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING", dict: "STRUCT"}
    return kinds.get(type(value), "LIST")


def sources(spec: dict, dag: str, source: dict, path: str) -> list[tuple[str, str]]:
    """The (type, path) of every value a task input `source` in `dag` can get, followed back through each DAG
    boundary to its origin: a pipeline input, a task's output or a constant. Every boundary is one more step of
    the path with its declared type, since each DAG's driver converts or refuses its inputs by their declared
    types (resolve.go handleParamTypeValidationAndConversion, 2.16.0:161-247, 2.17.0:169-255)."""
    if "runtimeValue" in source:
        return [(constant_type(source["runtimeValue"]["constant"]), f"{path} <- constant")]
    if "taskOutputParameter" in source:
        producer, key = (
            source["taskOutputParameter"]["producerTask"],
            source["taskOutputParameter"]["outputParameterKey"],
        )
        made = spec["components"][component(spec, dag)["dag"]["tasks"][producer]["componentRef"]["name"]]
        kind = made["outputDefinitions"]["parameters"][key]["parameterType"]
        return [(kind, f"{path} <- output {key} of task {producer} ({kind})")]
    param = source["componentInputParameter"]
    kind = declared(spec, dag, param)
    here = f"{path} <- {'pipeline input' if dag == 'root' else dag + ' input'} {param} ({kind})"
    found = [(kind, here)]
    for parent, name, task in users(spec, dag):
        if task.get("parameterIterator", {}).get("itemInput") == param:
            continue  # the loop item: its type is the one declared here
        found += sources(spec, parent, task["inputs"]["parameters"][param], f"{here} <- task {name}")
    return found


def accepts(declared_type: str, value_type: str) -> bool:
    """Whether the driver takes a value of `value_type` for an input declared `declared_type`: a STRING input
    takes anything (converted to its JSON text), any other type only a value of its kind (resolve.go, 2.16.0:
    195-209 for STRING, 210-245 for the rest, "type mismatch: expect %s, got %s"; 2.17.0:203-217 and 218-253)."""
    both_numbers = declared_type in NUMBERS and value_type in NUMBERS
    return declared_type == "STRING" or declared_type == value_type or both_numbers


# ---- the three rules


def loop_item_problems(spec: dict) -> list[str]:
    """Every ParallelFor item that reaches an input, with a type that input refuses.

    The iteration driver gives the loop DAG its item and converts it to the item's declared type, a dict to its
    JSON text when that type is STRING (resolve.go 2.16.0:260-290 then 195-209; 2.17.0:268-298 then 203-217). The
    task inside the loop is then checked against its own input's type (see `accepts`)."""
    problems = []
    for name, task in [(n, t) for c in dags(spec).values() for n, t in c["dag"]["tasks"].items()]:
        if "parameterIterator" not in task:
            continue
        loop, item = task["componentRef"]["name"], task["parameterIterator"]["itemInput"]
        problems += item_problems(spec, loop, item, declared(spec, loop, item), f"loop item {item} of {name}")
    return problems


def item_problems(spec: dict, dag: str, param: str, value_type: str, path: str) -> list[str]:
    """Follow the value of `param` (of type `value_type`) in `dag` into every task that reads it, and into DAGs."""
    problems = []
    for name, task in component(spec, dag)["dag"]["tasks"].items():
        for key, source in task.get("inputs", {}).get("parameters", {}).items():
            if source.get("componentInputParameter") != param or "parameterExpressionSelector" in source:
                continue
            target = task["componentRef"]["name"]
            kind = declared(spec, target, key)
            where = f"{path} -> {name}.{key} ({kind})"
            if not accepts(kind, value_type):
                problems.append(f"{where}: the driver refuses it, 'type mismatch: expect {kind}, got {value_type}'")
            elif "dag" in spec["components"][target]:
                problems += item_problems(spec, target, key, kind, where)
    return problems


def resource_fields(container: dict) -> dict[str, str]:
    resources = container.get("resources", {})
    fields = {"image": container.get("image", "")}
    for key in ("resourceCpuLimit", "resourceCpuRequest", "resourceMemoryLimit", "resourceMemoryRequest"):
        fields[key] = resources.get(key, "")
    accelerator = resources.get("accelerator", {})
    fields["accelerator.resourceCount"] = accelerator.get("resourceCount", "")
    fields["accelerator.resourceType"] = accelerator.get("resourceType", "")
    return fields


def resource_placeholder_problems(spec: dict) -> list[str]:
    """Every image, CPU, memory or accelerator field given by a placeholder whose value is not a string.

    The driver fills these fields of the pod with resolvePodSpecInputRuntimeParameter, which returns the input's
    `GetStringValue()`: "" for a number (resolve.go 2.16.0:810-823, 2.17.0:818-831). Then an empty CPU or memory
    value fails the task (ParseQuantity(""), driver.go getPodResource 2.16.0:165-189, 2.17.0:173-197), an empty
    accelerator count sets no GPU limit at all (driver.go 2.16.0:380-411, 2.17.0:415-446), and the pod does not
    get the image asked for (driver.go 2.16.0:414, 2.17.0:449). So the input a placeholder names must be STRING in
    the component (where it declares it: the SDK's `pipelinechannel--*` inputs it does not, and the driver converts
    only declared inputs, resolve.go 2.16.0:163) and at every step back to its source. The SDK gives every step the
    source's type, so all must be STRING (a STRING DAG input on the way would convert a number, but none is made)."""
    problems = []
    executors = spec["deploymentSpec"]["executors"]
    for comp_name, comp in spec["components"].items():
        if "executorLabel" not in comp:
            continue
        for field, value in resource_fields(executors[comp["executorLabel"]]["container"]).items():
            match = PLACEHOLDER.match(value)
            if not match:
                continue
            param = match.group(1)
            own = component(spec, comp_name).get("inputDefinitions", {}).get("parameters", {}).get(param)
            for dag, name, task in users(spec, comp_name):
                head = f"{field} of task {name} in {dag}: {param}"
                steps = [(own["parameterType"], f"{head} ({own['parameterType']})")] if own else []
                for kind, path in steps + sources(spec, dag, task["inputs"]["parameters"][param], head):
                    if kind != "STRING":
                        problems.append(f"{path}: a {kind} value reads as '' in the driver")
    return sorted(set(problems))


def pvc_mount_problems(spec: dict, platform: dict) -> list[str]:
    """Every PVC mount whose claim name can resolve to "" (or not at all).

    The driver resolves a mount's pvcNameParameter with resolveInputParameterStr, which refuses anything but a
    non-empty string ("Expected a non-empty string", resolve.go 2.17.0:501-524), and fails the task on an empty
    name or mount path (k8s.go makeVolumeMountPatch, 2.16.0:1076-1080, 2.17.0:1149-1153). A componentInputParameter
    is read from the parent DAG's inputs ("parent DAG does not have input parameter", resolve.go 2.17.0:389-397).
    So a constant must be a non-empty string, and an input must be STRING at every step back to its source, with a
    non-empty default where that source is a pipeline input."""
    problems = []
    for comp_name, comp in spec["components"].items():
        for mount in platform.get(comp.get("executorLabel"), {}).get("pvcMount", []):
            name = mount.get("pvcNameParameter", {})
            for dag, task, _ in users(spec, comp_name):
                head = f"pvc mount {mount.get('mountPath')!r} of task {task} in {dag}"
                if not mount.get("mountPath"):
                    problems.append(f"{head}: no mount path")
                if "runtimeValue" in name:
                    value = name["runtimeValue"]["constant"]
                    if not (isinstance(value, str) and value):
                        problems.append(f"{head}: claim name constant {value!r} is not a non-empty string")
                    continue
                param = name.get("componentInputParameter")
                if param not in component(spec, dag).get("inputDefinitions", {}).get("parameters", {}):
                    problems.append(f"{head}: parent DAG does not have input parameter {param!r}")
                    continue
                for kind, path in sources(spec, dag, name, head):
                    if kind != "STRING":
                        problems.append(f"{path}: a {kind} value is not a claim name")
                    origin = path.rsplit(" <- ", 1)[-1]
                    if origin.startswith("pipeline input "):
                        declared_input = spec["root"]["inputDefinitions"]["parameters"][origin.split()[2]]
                        if not declared_input.get("defaultValue"):
                            problems.append(f"{path}: its default {declared_input.get('defaultValue')!r} is empty")
    return sorted(set(problems))


def artifact_oneofs(spec: dict) -> list[str]:
    """Every DAG output that is a dsl.OneOf over artifacts (more than one artifact selector)."""
    return [
        f"{dag} output {key}"
        for dag, c in dags(spec).items()
        for key, out in c["dag"].get("outputs", {}).get("artifacts", {}).items()
        if len(out.get("artifactSelectors", [])) > 1
    ]


def version(text) -> tuple[int, ...]:
    return tuple(int(part) for part in str(text).lstrip("v").split(".")[:3])


def artifact_oneof_problems(spec: dict, minimum: tuple[int, ...] | None) -> list[str]:
    """An artifact dsl.OneOf is resolved from its LAST selector, whichever branch ran, on backends before 2.17.0
    (2.16.0 and 2.16.1 resolve.go GetProducerTask: `tempSelectors[len(tempSelectors)-1]`, 2.16.0:1037-1041;
    kubeflow/pipelines issue 13436). 2.17.0 takes the selector whose task completed (resolve.go:1057-1091). A
    parameter OneOf takes the first completed or cached selector in both (2.16.0:1061-1091, 2.17.0:1110-1146); a
    branch not taken is CANCELED (backend/src/v2/metadata/client.go 2.16.0:610-614)."""
    if minimum is not None and minimum >= FIXED:
        return []
    stated = "no minimum" if minimum is None else f"minimum {'.'.join(map(str, minimum))}"
    return [
        f"{where}: an artifact OneOf, and the code states {stated} for the backend (needs >= 2.17.0)"
        for where in artifact_oneofs(spec)
    ]


def stated_minimum() -> tuple[int, ...] | None:
    """The minimum KFP backend the code states (llm2clip.ops.submit.MIN_KFP_BACKEND), None if it states none."""
    value = getattr(submit, "MIN_KFP_BACKEND", None)
    return None if value is None else version(value)


# ---- the pipeline we upload


@pytest.fixture(scope="module", params=["committed", "no-cache"])
def spec(request, tmp_path_factory) -> dict:
    """pipelines/llm2clip.yaml (or LLM2CLIP_CHECK_SPEC), and what `llm2clip submit --no-cache` uploads."""
    committed = Path(os.environ.get("LLM2CLIP_CHECK_SPEC") or pipeline.COMPILED)
    if request.param == "committed":
        return load(committed)
    path = tmp_path_factory.mktemp("nocache") / "llm2clip.yaml"
    path.write_text(committed.read_text())
    submit.disable_caching(path)
    return load(path)


def test_every_loop_item_has_the_type_its_inputs_declare(spec):
    """A loop item reaches each input as the type the loop declares; STRUCT to STRUCT (issue 16 item 1: an untyped
    `-> list` made the item STRING, and cache_caption_embeddings' `group: dict` refused it)."""
    loops = [t for d in dags(spec) for _, _, t in users(spec, d) if "parameterIterator" in t]
    assert loops, "no ParallelFor: the check would pass vacuously"
    assert loop_item_problems(spec) == []


def test_every_resource_placeholder_is_a_string_at_its_source(spec):
    """Image, CPU, memory and GPU count by placeholder (issue 16 item 2: `gpus: int` gave no nvidia.com/gpu)."""
    executors = spec["deploymentSpec"]["executors"].values()
    given = [f for e in executors for f, v in resource_fields(e["container"]).items() if PLACEHOLDER.match(v)]
    assert "accelerator.resourceCount" in given and "image" in given  # the check sees what it is about
    assert resource_placeholder_problems(spec) == []


def test_no_artifact_oneof_unless_the_stated_minimum_backend_resolves_it(spec):
    """Issue 16 item 3: with train_nodes=1, evaluate would get the TrainJob branch's model, never written."""
    assert artifact_oneof_problems(spec, stated_minimum()) == []


@pytest.mark.parametrize("variant", ["committed", "no-cache"])
def test_every_pvc_mount_names_a_claim_and_models_reach_every_model_loading_task(variant, tmp_path):
    """Issue 16 item 9: models_pvc is mounted at /models in every task that loads a model, and its name can never
    resolve to "" (an empty models_pvc would fail each of those tasks in the driver, see pvc_mount_problems)."""
    path = Path(os.environ.get("LLM2CLIP_CHECK_SPEC") or pipeline.COMPILED)
    if variant == "no-cache":
        (tmp_path / "p.yaml").write_text(path.read_text())
        submit.disable_caching(tmp_path / "p.yaml")
        path = tmp_path / "p.yaml"
    spec, platform = load(path), load_platform(path)
    assert pvc_mount_problems(spec, platform) == []
    mounted = {}
    for comp_name, comp in spec["components"].items():
        for mount in platform.get(comp.get("executorLabel"), {}).get("pvcMount", []):
            for dag, task, _ in users(spec, comp_name):
                origins = sources(spec, dag, mount["pvcNameParameter"], task)
                mounted[(comp_name, task)] = (mount["mountPath"], origins[-1][1].rsplit(" <- ", 1)[-1])
    loading = ["tune-caption-encoder", "cache-caption-embeddings", "train-clip", "train-clip-baseline"]
    tasks = {task for _, task in mounted}
    assert tasks == set(loading) | {"cache-caption-embeddings-2", "evaluate"}, tasks  # none else loads a model
    assert set(mounted.values()) == {(pipeline.MODELS_PATH, "pipeline input models_pvc (STRING)")}, mounted
    assert len([c for c, task in mounted if task == "train-clip"]) == 4  # both models, with and without centring
    for comp_name, task in mounted:  # the pipeline's allow_hub reaches each model-loading task
        dag, _, used = next(u for u in users(spec, comp_name) if u[1] == task)
        given = used["inputs"]["parameters"].get("allow_hub")
        origin = given and sources(spec, dag, given, task)[-1][1].rsplit(" <- ", 1)[-1]
        assert origin == "pipeline input allow_hub (BOOLEAN)", (comp_name, task, given)


# ---- each rule fails where the backend would: small pipelines that break it


@dsl.component(base_image="python:3.11")
def groups_untyped() -> list:
    return [{"group_index": 0}]


@dsl.component(base_image="python:3.11")
def groups_typed() -> list[dict[str, int]]:
    return [{"group_index": 0}]


@dsl.component(base_image="python:3.11")
def use_group(group: dict) -> str:
    return str(group)


@dsl.component(base_image="python:3.11")
def model(model: dsl.Output[dsl.Model]):
    open(model.path, "w").close()


@dsl.component(base_image="python:3.11")
def read_model(model: dsl.Input[dsl.Model]):
    open(model.path).close()


def compiled(tmp_path: Path, fn) -> dict:
    compiler.Compiler().compile(fn, str(tmp_path / "p.yaml"))
    return load(tmp_path / "p.yaml")


@pytest.mark.parametrize("producer", [groups_untyped, groups_typed])
def test_the_loop_item_rule_refuses_an_untyped_list_of_dicts(tmp_path, producer):
    @dsl.pipeline
    def one_group(group: dict):
        use_group(group=group)

    @dsl.pipeline
    def fan_out():
        with dsl.ParallelFor(producer().output) as group:
            one_group(group=group)  # through a sub-pipeline to the task

    problems = loop_item_problems(compiled(tmp_path, fan_out))
    if producer is groups_typed:
        assert problems == []
    else:
        [problem] = problems
        assert "for-loop-1 -> one-group.group (STRUCT)" in problem and "got STRING" in problem


@pytest.mark.parametrize("gpus_type", [int, str])
def test_the_placeholder_rule_refuses_a_number_even_through_a_sub_pipeline(tmp_path, gpus_type):
    @dsl.pipeline
    def inner(gpus: gpus_type, image: str):
        task = use_group(group={}).set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
        task.set_container_image(image)

    @dsl.pipeline
    def outer(gpus: gpus_type = 1 if gpus_type is int else "1", image: str = "python:3.11"):
        inner(gpus=gpus, image=image)

    problems = resource_placeholder_problems(compiled(tmp_path, outer))
    if gpus_type is str:
        assert problems == []
    else:
        assert problems and all(p.startswith("accelerator.resourceCount of task use-group") for p in problems)
        assert any("pipeline input gpus (NUMBER_INTEGER)" in p for p in problems), problems


def test_the_oneof_rule_refuses_an_artifact_oneof_below_2_17(tmp_path):
    @dsl.pipeline
    def pick(one: bool = True) -> dsl.Model:
        with dsl.If(one == True):  # noqa: E712 (a KFP condition, not a Python comparison)
            a = model()
        with dsl.Else():
            b = model()
        chosen = dsl.OneOf(a.outputs["model"], b.outputs["model"])
        read_model(model=chosen)
        return chosen

    spec = compiled(tmp_path, pick)
    assert artifact_oneofs(spec)
    assert artifact_oneof_problems(spec, None) and artifact_oneof_problems(spec, (2, 16, 1))
    assert artifact_oneof_problems(spec, (2, 17, 0)) == []


@pytest.mark.parametrize("default", ["", "team-models"])
def test_the_pvc_rule_refuses_a_claim_name_that_can_be_empty(tmp_path, default):
    from kfp import kubernetes

    @dsl.pipeline
    def inner(pvc: str):
        kubernetes.mount_pvc(use_group(group={}), pvc_name=pvc, mount_path="/models")

    @dsl.pipeline
    def outer(pvc: str = default):
        inner(pvc=pvc)
        kubernetes.mount_pvc(use_group(group={}), pvc_name="", mount_path="/data")  # a constant "" is refused too

    compiler.Compiler().compile(outer, str(tmp_path / "p.yaml"))
    problems = pvc_mount_problems(load(tmp_path / "p.yaml"), load_platform(tmp_path / "p.yaml"))
    assert any("'/data'" in p and "claim name constant ''" in p for p in problems), problems
    empty_default = [p for p in problems if "pipeline input pvc (STRING): its default '' is empty" in p]
    assert bool(empty_default) == (default == ""), problems
