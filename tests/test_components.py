"""Each component's python_func with real artifacts on the tiny profile; the compiled pipeline is current."""

import ast
import json
from pathlib import Path

import pytest
from kfp import dsl
from llm2clip.pipelines.llm2clip_pipeline import COMPILED, compile_pipeline

from llm2clip import components, tune_caption_encoder


def art(cls, path: Path):
    path.mkdir(parents=True, exist_ok=True)
    return cls(uri=str(path))


def file_art(cls, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return cls(uri=str(path))


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """prepare -> tune -> cache (2 groups) -> train -> baseline -> evaluate, each through python_func."""
    root = tmp_path_factory.mktemp("components")
    out = {}
    dataset = art(dsl.Dataset, root / "dataset")
    out["groups"] = components.prepare_data.python_func(
        dataset=dataset,
        source="synthetic",
        source_options={},
        num_train=32,
        num_eval=8,
        image_size=64,
        seed=0,
        cache_groups=2,
    )
    lora, metrics = art(dsl.Model, root / "lora"), file_art(dsl.Metrics, root / "metrics.json")
    components.tune_caption_encoder.python_func(
        dataset=dataset,
        text_lora=lora,
        metrics=metrics,
        llm="tiny-random-llama",
        bidirectional=True,
        steps=2,
        batch_size=4,
        lr=1e-3,
        lora_r=4,
        seed=0,
        device="auto",
        dtype="auto",
    )
    caches = {}
    for name, use_adapter, attention in (("tuned", True, "as_tuned"), ("raw", False, "causal")):
        caches[name] = []
        for g in out["groups"]:
            c = art(dsl.Dataset, root / f"cache_{name}_{g['group_index']}")
            components.cache_caption_embeddings.python_func(
                dataset=dataset,
                text_lora=lora,
                caption_embeddings=c,
                group=g,
                use_adapter=use_adapter,
                attention=attention,
                device="auto",
                dtype="auto",
            )
            caches[name].append(c)
    train_args = dict(
        model="llm2clip-vit-tiny", pretrained="", epochs=1, batch_size=8, lr=1e-3, seed=0, device="auto", dtype="auto"
    )
    models = {k: art(dsl.Model, root / k) for k in ("llm2clip", "raw", "clip", "nocenter", "skipped")}
    llm_args = dict(dataset=dataset, center_text=True, **train_args)
    out["location"] = components.train_clip.python_func(
        caption_embeddings=caches["tuned"], vision_model=models["llm2clip"], **llm_args
    )
    components.train_clip.python_func(caption_embeddings=caches["raw"], vision_model=models["raw"], **llm_args)
    llm_args["center_text"] = False
    components.train_clip.python_func(caption_embeddings=caches["tuned"], vision_model=models["nocenter"], **llm_args)
    out["skipped_location"] = components.train_clip.python_func(
        caption_embeddings=caches["raw"], vision_model=models["skipped"], enabled=False, **llm_args
    )
    components.train_clip_baseline.python_func(dataset=dataset, vision_model=models["clip"], **train_args)
    outputs = {
        "retrieval_metrics": file_art(dsl.Metrics, root / "eval" / "metrics.json"),
        "report": file_art(dsl.HTML, root / "eval" / "report.html"),
        "report_markdown": file_art(dsl.Markdown, root / "eval" / "report.md"),
        "evaluation": art(dsl.Artifact, root / "eval" / "evaluation"),
    }
    components.evaluate.python_func(
        dataset=dataset,
        text_lora=lora,
        llm2clip_model=models["llm2clip"],
        raw_llm_model=models["raw"],
        clip_model=models["clip"],
        llm2clip_no_centring_model=models["nocenter"],
        raw_llm_no_centring_model=models["skipped"],
        tuned_embeddings=caches["tuned"],
        raw_embeddings=caches["raw"],
        device="auto",
        zero_shot=["synthetic"],
        **outputs,
    )
    out.update(dataset=dataset, lora=lora, metrics=metrics, caches=caches, models=models, outputs=outputs)
    return out


def test_prepare_data_component(flow):
    assert flow["groups"] == [{"group_index": 0, "num_groups": 2}, {"group_index": 1, "num_groups": 2}]
    assert flow["dataset"].metadata["train_kept"] == 32
    assert (Path(flow["dataset"].path) / "manifest.json").exists()


def test_tune_component_logs_its_loss(flow):
    assert "loss_last" in flow["metrics"].metadata
    assert json.loads(Path(flow["metrics"].path).read_text())["cra_note"] == tune_caption_encoder.CRA_IN_EVALUATE
    assert flow["lora"].metadata["base_model"] == "tiny-random-llama"


STAGE1_OPTIONS = {  # component input -> the pipeline parameter the compiled pipeline binds it to
    "pairs": "tune_pairs",
    "query_instructions": "tune_query_instructions",
    "max_grad_norm": "tune_max_grad_norm",
    "warmup_steps": "tune_warmup_steps",
}


def test_the_stage1_options_reach_tune_config_from_the_pipeline_parameters(tmp_path, monkeypatch):
    """The compiled pipeline binds each option of the tune component to its tune_* parameter, and the component
    hands the values to TuneConfig (the stage itself replaced: this checks the wiring, test_tune runs it)."""
    import yaml

    spec = next(yaml.safe_load_all(COMPILED.read_text()))  # the pipeline spec; the platform spec follows
    root = spec["root"]["dag"]["tasks"]["tune-caption-encoder"]
    bound = {k: v.get("componentInputParameter") for k, v in root["inputs"]["parameters"].items()}
    assert {k: bound.get(k) for k in STAGE1_OPTIONS} == STAGE1_OPTIONS
    seen = []

    def fake_stage(cfg, dataset_dir, out):
        seen.append(cfg)
        return {"loss_last": 1.0}

    monkeypatch.setattr(tune_caption_encoder, "tune_caption_encoder", fake_stage)
    common = dict(llm="tiny-random-llama", bidirectional=True, steps=16, batch_size=4, lr=1e-3, lora_r=4, seed=0)
    common.update(device="cpu", dtype="float32")
    for n, (options, warmup) in enumerate(
        [
            (dict(pairs="short_long", query_instructions=True, max_grad_norm=0.5, warmup_steps=3), 3),
            ({}, 2),  # the component's defaults: today's behaviour, the warm-up an eighth of the steps
        ]
    ):
        components.tune_caption_encoder.python_func(
            dataset=art(dsl.Dataset, tmp_path / "data"),
            text_lora=art(dsl.Model, tmp_path / f"lora{n}"),
            metrics=file_art(dsl.Metrics, tmp_path / f"metrics{n}.json"),
            **common,
            **options,
        )
        cfg = seen[-1]
        got = (cfg.pairs, cfg.query_instructions, cfg.max_grad_norm, cfg.warmup_steps)
        assert got == (
            options.get("pairs", "any"),
            options.get("query_instructions", False),
            options.get("max_grad_norm", 0.0),
            warmup,
        )


def test_cache_components_split_the_work(flow):
    counts = [c.metadata["captions"] for c in flow["caches"]["tuned"]]
    assert all(n > 0 for n in counts)
    assert sum(counts) == sum(c.metadata["captions"] for c in flow["caches"]["raw"])


def test_train_components(flow):
    assert flow["models"]["llm2clip"].metadata["text_source"] == "llm"
    assert flow["models"]["clip"].metadata["text_source"] == "clip"
    for name, m in flow["models"].items():
        assert (Path(m.path) / "model.safetensors").exists() == (name != "skipped")
    skipped = json.loads((Path(flow["models"]["skipped"].path) / "manifest.json").read_text())
    assert "not requested" in skipped["skipped"] and skipped["config"]["center_text"] is False


def test_train_component_returns_where_its_model_is(flow):
    """What train_clip_on_nodes hands to collect_vision_model; without a store, the artifact's own directory."""
    assert flow["location"] == flow["models"]["llm2clip"].path
    assert flow["skipped_location"] == flow["models"]["skipped"].path


def test_format_gpu_limit_component():
    """The accelerator count as text (the KFP driver reads a number there as ''); a bad `gpus` is named."""
    assert [components.format_gpu_limit.python_func(gpus=n) for n in (0, 1, 8)] == ["0", "1", "8"]
    with pytest.raises(ValueError, match=r"^gpus=-1: must be a whole number >= 0"):
        components.format_gpu_limit.python_func(gpus=-1)


def test_collect_vision_model_component_points_at_the_store(s3_env, tmp_path):
    """The stage-2 model of the branch that ran, as an artifact pointing at its location in the store."""
    from llm2clip import artifacts, storage

    trained, skipped = storage.join(s3_env, "trained"), storage.join(s3_env, "skipped")
    artifacts.write_manifest(trained, "train_clip", {"text_source": "llm"}, {}, metrics={"loss_last": 0.5})
    artifacts.write_manifest(skipped, "train_clip", {"text_source": "llm"}, {}, skipped="not requested")
    for location, metadata in ((trained, {"loss_last": 0.5}), (skipped, {"skipped": "not requested"})):
        model = art(dsl.Model, tmp_path / location.rsplit("/", 1)[-1])
        components.collect_vision_model.python_func(location=location, vision_model=model)
        assert artifacts.resolve(model.path) == location
        assert model.metadata == {"location": location, **metadata}
        copied = json.loads((Path(model.path) / artifacts.MANIFEST).read_text())
        assert copied == storage.read_json(storage.join(location, artifacts.MANIFEST))
    with pytest.raises(ValueError, match=r"^location='/pod/local': .* set LLM2CLIP_STORE"):
        components.collect_vision_model.python_func(location="/pod/local", vision_model=art(dsl.Model, tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="nothing-here has no manifest.json"):
        gone = storage.join(s3_env, "nothing-here")
        components.collect_vision_model.python_func(location=gone, vision_model=art(dsl.Model, tmp_path / "y"))


def test_evaluate_component(flow):
    metrics = flow["outputs"]["retrieval_metrics"].metadata
    assert "synthetic_long/llm2clip/image_to_text_R@1" in metrics
    assert "synthetic_short/clip_baseline/text_to_image_R@10" in metrics
    assert "<table>" in Path(flow["outputs"]["report"].path).read_text()
    summary = json.loads((Path(flow["outputs"]["evaluation"].path) / "summary.json").read_text())
    assert (
        summary["retrieval"]["synthetic_long"]["llm2clip"]["image_to_text_R@1"]
        == metrics["synthetic_long/llm2clip/image_to_text_R@1"]
    )
    # the ablation that was asked for is reported, the skipped one is not; zero-shot covers every reported model
    assert "synthetic_long/llm2clip_no_centring/image_to_text_R@1" in metrics
    assert not any("llm2clip_raw_llm_no_centring" in k for k in metrics)
    assert set(summary["zero_shot"]["synthetic_shapes/single"]) == set(summary["retrieval"]["synthetic_long"])
    assert 0.0 <= summary["zero_shot"]["synthetic_shapes/ensemble"]["llm2clip"]["acc1"] <= 1.0


# What a component body may contain (STYLE rule 2: a component is a wrapper; logic belongs in the library).
# Statements, at the top of the body or inside an `if`: the docstring, `import` / `from ... import`, an assignment
# (`=`), an expression statement that is a call, `if` / `else`, `return`, `raise`. Nowhere: loops (`for`, `while`),
# comprehensions other than `[resolve(a.path) for a in <input list>]` (input artifacts to their locations),
# `def`, `lambda`, `class`, `try`, `with`.
# Every call's callee (the name at the root of `f(...)`, `m.f(...)`, `x.metadata.update(...)`, `Path(p).write_text`)
# is one of: (a) a builtin of BUILTINS; (b) a parameter of the component (its artifacts: metadata, log_metric);
# (c) a name imported from the standard library (STDLIB: writing output files); (d) a name imported from
# llm2clip.artifacts (locations, manifests: recording inputs and outputs); (e) a method of a value the body
# assigned (reading a result: `manifest.get(...)`); (f) a name imported from llm2clip.params: pipeline parameters
# to the stage config (`*_config`, at most one call) or to values the pipeline needs (`shard_groups`); (g) a class
# (CapWords) imported from llm2clip: a settings dataclass, at most one; (h) any other name imported from
# llm2clip (library or ops): the stage's one call, at most one call site.
STATEMENTS = (ast.Expr, ast.Import, ast.ImportFrom, ast.Assign, ast.If, ast.Return, ast.Raise)
FORBIDDEN = (ast.For, ast.AsyncFor, ast.While, ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
FORBIDDEN += (ast.Try, ast.With, ast.AsyncWith, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
BUILTINS = {"dict", "int", "str", "float", "bool", "list", "tuple", "zip", "len", "isinstance", "ValueError"}
STDLIB = {"os", "json", "shutil", "pathlib"}


def component_functions(folder: Path) -> dict[str, ast.FunctionDef]:
    """Every `@dsl.component` function of the .py files in `folder`, by name."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef) and any("component" in ast.unparse(d) for d in node.decorator_list):
                found[node.name] = node
    return found


def _is_resolved_inputs(node: ast.AST, origin: dict[str, str]) -> bool:
    """`[resolve(a.path) for a in X]`: the locations of a list of input artifacts."""
    return (
        isinstance(node, ast.ListComp)
        and len(node.generators) == 1
        and not node.generators[0].ifs
        and isinstance(node.elt, ast.Call)
        and isinstance(node.elt.func, ast.Name)
        and origin.get(node.elt.func.id) == "llm2clip.artifacts"
    )


def _root(func: ast.expr) -> ast.expr:
    while isinstance(func, ast.Attribute | ast.Call):
        func = func.value if isinstance(func, ast.Attribute) else func.func
    return func


def component_problems(fn: ast.FunctionDef) -> list[str]:
    """Why the body of component `fn` is more than a wrapper (empty: it is one)."""
    problems = []
    inside = [node for stmt in fn.body for node in ast.walk(stmt)]  # the body: not the decorator, not the signature
    origin: dict[str, str] = {}  # imported name -> its module
    for node in inside:
        if isinstance(node, ast.Import):
            origin.update({(a.asname or a.name).split(".")[0]: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom):
            origin.update({a.asname or a.name: node.module or "" for a in node.names})
    params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    results = {t.id for n in inside if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}

    def statements(stmts: list[ast.stmt]) -> None:
        for stmt in stmts:
            call = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            if isinstance(stmt, FORBIDDEN):
                continue  # reported below, wherever it stands
            if not isinstance(stmt, STATEMENTS) or (isinstance(stmt, ast.Expr) and not call):
                problems.append(f"line {stmt.lineno}: a {type(stmt).__name__} statement")
            if isinstance(stmt, ast.If):
                statements(stmt.body)
                statements(stmt.orelse)

    statements(fn.body[1:] if ast.get_docstring(fn) else fn.body)
    resolved = {id(n) for n in inside if _is_resolved_inputs(n, origin)}
    for node in inside:
        if isinstance(node, FORBIDDEN) and id(node) not in resolved:
            problems.append(f"line {node.lineno}: a {type(node).__name__}")
    config, settings, library = [], [], []
    for node in inside:
        if not isinstance(node, ast.Call):
            continue
        root = _root(node.func)
        name = root.id if isinstance(root, ast.Name) else ""
        module = origin.get(name, "")
        where = f"line {node.lineno}: {ast.unparse(node.func)}"
        if name in BUILTINS or name in params or module.split(".")[0] in STDLIB or module == "llm2clip.artifacts":
            continue
        if name in results and isinstance(node.func, ast.Attribute):
            continue  # reading a value the body got back: result.get(...)
        if module == "llm2clip.params":
            if name.endswith("_config"):
                config.append(where)
        elif module.split(".")[0] == "llm2clip" and name[:1].isupper():
            settings.append(where)
        elif module.split(".")[0] == "llm2clip":
            library.append(where)
        else:
            problems.append(f"{where}: calls something that is not a builtin, a parameter or an import")
    for calls, what in (
        (config, "llm2clip.params configs"),
        (settings, "settings classes"),
        (library, "library calls"),
    ):
        if len(calls) > 1:
            problems.append(f"{len(calls)} {what} (at most one): {calls}")
    return problems


def test_a_component_only_builds_a_config_calls_one_function_and_records_outputs():
    """STYLE rule 2, read from each component's AST (the rules above STATEMENTS)."""
    found = component_functions(Path(components.__file__).parent)
    assert len(found) >= 10 and "train_clip" in found and "evaluate" in found
    problems = {name: p for name, fn in found.items() if (p := component_problems(fn))}
    assert not problems


def test_scalar_metrics_are_the_float_leaves_of_a_result():
    """What the tune and evaluate components log as KFP metrics: floats only (not intervals, counts or None)."""
    from llm2clip.artifacts import scalar_metrics

    result = {"loss_last": 0.5, "cra_after": None, "steps": 4, "synthetic_short": {"llm2clip": {"R@1": 0.25}}}
    result["synthetic_short"]["llm2clip"].update({"R@1_ci95": [0.1, 0.4], "images": 16})
    assert scalar_metrics(result) == {"loss_last": 0.5, "synthetic_short/llm2clip/R@1": 0.25}


PLANTED = '''
@dsl.component
def c(data: Input[Dataset], out: Output[Model], steps: int):
    """doc"""
    from llm2clip.artifacts import resolve
    from llm2clip.params import tune_config
    from llm2clip.tune_caption_encoder import other, tune_caption_encoder

    cfg = tune_config(dict(tune_steps=steps))
    result = tune_caption_encoder(cfg, resolve(data.path), out.path)
    for k in result:
        out.metadata[k] = result[k]
    other(result)
    def f():
        pass
'''


def test_the_component_check_sees_a_loop_a_second_call_and_a_nested_def():
    module = ast.parse(PLANTED)
    problems = component_problems(module.body[0])
    assert problems[:2] == ["line 11: a For", "line 14: a FunctionDef"]
    assert problems[-1].startswith("2 library calls (at most one): ['line 10: tune_caption_encoder'")
    del module.body[0].body[-3:]
    assert component_problems(module.body[0]) == []


def test_compiled_pipeline_is_current(tmp_path):
    fresh = compile_pipeline(tmp_path / "llm2clip.yaml")
    assert fresh.read_text() == COMPILED.read_text(), "pipelines/llm2clip.yaml is stale: run `llm2clip compile`"


def test_compiled_pipeline_has_every_stage_and_parameter():
    text = COMPILED.read_text()
    for stage in (
        "prepare-data",
        "tune-caption-encoder",
        "cache-caption-embeddings",
        "train-clip",
        "train-clip-baseline",
        "evaluate",
        "for-loop",
    ):
        assert f"comp-{stage}" in text, stage
    for param in ("tune_steps", "cache_groups", "vision_model", "image", "center_text", "ablations", "zero_shot"):
        assert f"    {param}:" in text, param
