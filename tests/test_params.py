"""llm2clip.params: the one place where pipeline parameters become stage configs (components, `llm2clip run`'s
checks and --help, submit), and where each parameter's help comes from."""

import ast
import dataclasses
from pathlib import Path

import pytest

from llm2clip import params
from llm2clip.ops import cli

ROOT = Path(__file__).parent.parent


def pipeline_values(**overrides) -> dict:
    return {**cli.pipeline_parameters(), **cli.PROFILES["tiny"], **overrides}


def test_every_config_field_parameter_lands_in_its_field():
    values = pipeline_values(pretrained="", train_lr=0.0, zero_shot=["synthetic", "x=/tmp/x"], seed=7)
    configs = params.stage_configs(values)
    for name, (stage, field) in params.FIELDS.items():
        got = getattr(configs[stage], field)
        want = values[name]
        if name in params.NONE_VALUES:
            continue  # resolved below: None, then the recipe's value
        assert got == (tuple(want) if isinstance(want, list) else want), f"{name} -> {stage}.{field}"
    for name, stages in params.SHARED.items():
        for stage in stages:
            assert getattr(configs[stage], name) == values[name], f"{name} -> {stage}.{name}"


def test_the_pipeline_encodings_of_none_and_the_derived_tuning_fields():
    """ "" and 0 stand for None (the recipe's choice); LoRA alpha is 2 r, the warm-up an eighth of the steps."""
    values = pipeline_values(pretrained="", train_lr=0.0, lora_r=4, tune_steps=4)
    train = params.train_clip_config(values)
    assert train.pretrained is None and train.recipe == "scratch" and train.lr == 1e-3  # RECIPES["scratch"]
    assert params.train_clip_config({**values, "train_lr": 3e-4}).lr == 3e-4
    tune = params.tune_config(values)
    assert (tune.lora_r, tune.lora_alpha, tune.steps, tune.warmup_steps) == (4, 8, 4, 1)
    tune = params.tune_config({**values, "lora_r": 16, "tune_steps": 40})
    assert (tune.lora_alpha, tune.warmup_steps) == (32, 5)


def test_the_stage1_options_land_in_tune_config_and_bad_values_name_their_parameter():
    values = pipeline_values(tune_steps=40)
    tune = params.tune_config(values)
    # the pipeline's defaults: the official stage-1 recipe (issue 19's measurements chose it)
    assert (tune.pairs, tune.query_instructions, tune.max_grad_norm, tune.warmup_steps) == ("short_long", True, 1.0, 5)
    other = dict(tune_pairs="any", tune_query_instructions=False, tune_max_grad_norm=0.0, tune_warmup_steps=3)
    tune = params.tune_config({**values, **other})
    assert (tune.pairs, tune.query_instructions, tune.max_grad_norm, tune.warmup_steps) == ("any", False, 0.0, 3)
    for bad, name in (
        ({"tune_pairs": "long_long"}, "tune_pairs"),
        ({"tune_pairs": "any"}, "tune_query_instructions"),  # instructions need short_long pairs
        ({"tune_max_grad_norm": -0.5}, "tune_max_grad_norm"),
        ({"tune_warmup_steps": -2}, "tune_warmup_steps"),
    ):
        with pytest.raises(ValueError, match=rf"\(pipeline parameter {name}\)$"):
            params.tune_config({**values, **bad})


def test_the_clip_baseline_and_a_cache_group():
    baseline = params.train_clip_config(pipeline_values(), text_source="clip")
    assert baseline.text_source == "clip"
    group = {"group_index": 1, "num_groups": 2}
    cache = params.cache_config(pipeline_values(dtype="float32"), group=group, use_adapter=False, attention="causal")
    assert (cache.group_index, cache.num_groups, cache.use_adapter, cache.attention, cache.dtype) == (
        1,
        2,
        False,
        "causal",
        "float32",
    )
    with pytest.raises(ValueError, match=r"group=\{'group_index': 0\}: missing 'num_groups'"):
        params.cache_config(pipeline_values(), group={"group_index": 0}, use_adapter=True, attention="as_tuned")


def test_a_bad_value_names_the_pipeline_parameter_behind_the_field():
    with pytest.raises(ValueError, match=r"^steps=0: must be >= 1 \(pipeline parameter tune_steps\)$"):
        params.tune_config(pipeline_values(tune_steps=0))
    with pytest.raises(ValueError, match=r"^epochs=0: .* \(pipeline parameter train_epochs\)$"):
        params.train_clip_config(pipeline_values(train_epochs=0))
    with pytest.raises(ValueError, match=r"^device='tpu': .* \(pipeline parameter device\)$"):
        params.evaluate_config(pipeline_values(device="tpu"))
    with pytest.raises(ValueError, match=r"source_options: unknown keys \['nope'\]"):
        params.prepare_data_config(pipeline_values(source_options={"nope": 1}))


def test_the_tables_name_only_pipeline_parameters_and_real_config_fields():
    names = set(cli.pipeline_parameters())
    assert not set(params.FIELDS) & set(params.HELP), "a parameter is described twice"
    assert set(params.FIELDS) | set(params.SHARED) | set(params.HELP) == names
    for name, (stage, field) in params.FIELDS.items():
        assert field in {f.name for f in dataclasses.fields(params.config_class(stage))}, name
    for name, stages in params.SHARED.items():
        for stage in stages:
            assert name in {f.name for f in dataclasses.fields(params.config_class(stage))}, (name, stage)
    for name, (stage, field) in params.DERIVED.items():  # described in HELP, mapped by the stage's *_config
        assert name in params.HELP and field in {f.name for f in dataclasses.fields(params.config_class(stage))}


def test_shard_groups_are_the_cache_fan_outs_items():
    assert params.shard_groups(2) == [{"group_index": 0, "num_groups": 2}, {"group_index": 1, "num_groups": 2}]
    with pytest.raises(ValueError, match=r"^cache_groups=0: must be a whole number >= 1"):
        params.shard_groups(0)


def test_components_and_operations_build_stage_configs_only_through_params():
    """The mapping from pipeline parameters to a stage config is written once (here), not in each caller."""
    classes = {name for _, name in params.CONFIGS.values()}
    found = []
    for path in sorted([*(ROOT / "components").glob("*.py"), *(ROOT / "src/llm2clip/ops").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                callee = ast.unparse(node.func)
                if set(callee.split(".")) & classes:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {callee}")
    assert found == []
