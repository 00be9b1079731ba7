"""Pipeline parameters -> stage configs, in one place: the components, `llm2clip run`'s checks and --help, and
`llm2clip submit` read the pipeline's parameters through this module, under the pipeline's own parameter names.

A parameter that sets one field of one stage's config (FIELDS) is described by that field's metadata["help"];
every other parameter (one value for several stages, or a placement setting) by the HELP table. The stage modules
are imported only when a config is built or the help is asked for, so `--set` parsing stays light.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

# stage -> (module, config class)
CONFIGS = {
    "prepare_data": ("llm2clip.prepare_data", "PrepareDataConfig"),
    "tune_caption_encoder": ("llm2clip.tune_caption_encoder", "TuneConfig"),
    "cache_caption_embeddings": ("llm2clip.cache_caption_embeddings", "CacheConfig"),
    "train_clip": ("llm2clip.train_clip", "TrainClipConfig"),
    "evaluate": ("llm2clip.evaluate", "EvaluateConfig"),
}

# pipeline parameter -> (stage, config field), where the parameter is one field of one stage's config
FIELDS: dict[str, tuple[str, str]] = {
    "source": ("prepare_data", "source"),
    "num_train": ("prepare_data", "num_train"),
    "num_eval": ("prepare_data", "num_eval"),
    "image_size": ("prepare_data", "image_size"),
    "llm": ("tune_caption_encoder", "llm"),
    "bidirectional": ("tune_caption_encoder", "bidirectional"),
    "tune_steps": ("tune_caption_encoder", "steps"),
    "tune_batch_size": ("tune_caption_encoder", "batch_size"),
    "tune_lr": ("tune_caption_encoder", "lr"),
    "tune_pairs": ("tune_caption_encoder", "pairs"),
    "tune_query_instructions": ("tune_caption_encoder", "query_instructions"),
    "tune_max_grad_norm": ("tune_caption_encoder", "max_grad_norm"),
    "lora_r": ("tune_caption_encoder", "lora_r"),
    "vision_model": ("train_clip", "model"),
    "pretrained": ("train_clip", "pretrained"),
    "train_epochs": ("train_clip", "epochs"),
    "train_batch_size": ("train_clip", "batch_size"),
    "train_lr": ("train_clip", "lr"),
    "center_text": ("train_clip", "center_text"),
    "zero_shot": ("evaluate", "zero_shot"),
}

# pipeline parameters that set the field of the same name in several stages' configs
SHARED: dict[str, tuple[str, ...]] = {
    "seed": ("prepare_data", "tune_caption_encoder", "train_clip"),
    "allow_hub": ("tune_caption_encoder", "cache_caption_embeddings", "train_clip", "evaluate"),
    "device": ("tune_caption_encoder", "cache_caption_embeddings", "train_clip", "evaluate"),
    "dtype": ("tune_caption_encoder", "cache_caption_embeddings", "train_clip"),
}

# A KFP parameter has no None: these pipeline values stand for the config field's None (the recipe's choice).
NONE_VALUES: dict[str, object] = {"pretrained": "", "train_lr": 0.0}

# pipeline parameters that set one config field by a rule of their own (in the stage's *_config function), so a
# bad value still names the parameter
DERIVED: dict[str, tuple[str, str]] = {"tune_warmup_steps": ("tune_caption_encoder", "warmup_steps")}

# The help of every pipeline parameter that is not one config field (FIELDS).
HELP: dict[str, str] = {
    "source_options": 'how to read a real source: a JSON object of PrepareDataConfig fields, e.g. {"source_format": '
    '"img2dataset", "short_field": "json.short_caption", "long_field": "json.long_caption"}; a caption table (CSV, '
    'TSV, JSONL, Parquet) names its columns with "image_column", "key_column" and the *_field keys; "eval_sources" '
    '(["NAME=FORMAT:URI[:IMAGES]"]) also adds real eval sets to the synthetic source; unknown keys are errors',
    "seed": "seed of the synthetic data, of stage-1 tuning and of every stage-2 training",
    "tune_warmup_steps": "stage-1 steps of linear learning-rate warm-up before the cosine decay; 0 = an eighth of "
    "tune_steps (at least 1). The first step already trains at 1/tune_warmup_steps of tune_lr, so 1 is no warm-up",
    "allow_hub": "allow downloading a hub id (llm) or an open_clip pretrained tag (pretrained) from the Hugging Face "
    "hub in tuning, caching and stage 2; without it (the default) a hub id must already be in the local cache",
    "device": '"auto" (cuda where the task sees a GPU, else cpu), "cpu" or "cuda", for every model-running task',
    "dtype": 'compute dtype of tuning, caching and stage 2: "auto" (bf16 on GPUs and on CPUs with native bf16, else '
    'fp32), "float32", "bfloat16" or "float16"; every manifest records the one used',
    "cache_groups": "parallel caching tasks the shards are split over, balanced by token count (at most 4 run at once)",
    "train_nproc": "stage-2 processes per training task (torchrun --nproc_per_node); the batch is global, split over "
    "them. On GPU nodes set it to gpus; with gpus 0 they are CPU processes (gloo)",
    "train_nodes": "nodes per LLM2CLIP stage-2 training (cluster only): 1 trains in the task's own pod, more runs a "
    "Kubeflow Trainer TrainJob of train_nodes x train_nproc processes; the CLIP baseline always trains on one node",
    "ablations": "also train the raw-LLM model without centring and report it beside the others (LLM2CLIP without "
    "centring, the paper's stage 2, is trained and reported whenever center_text is on)",
    "cpu_image": "(cluster) image of the CPU tasks (store lookup, prepare_data, evaluate); pin your pushed "
    "<version>-<git sha12> tag or digest",
    "gpu_image": "(cluster) image of the GPU tasks (stage 1, both cache fan-outs, every stage-2 training); it runs on "
    "CPU nodes too",
    "models_pvc": "(cluster) a PersistentVolumeClaim mounted read-only at /models in every model-loading task, so llm "
    "and pretrained can be paths under /models; empty = none",
    "gpus": "(cluster) GPUs each GPU task requests (nvidia.com/gpu); only stage 2 uses more than one (train_nproc); 0 "
    "runs the GPU tasks on CPU nodes",
    "gpu_node_selector": '(cluster) the GPU tasks\' nodeSelector, a JSON object, e.g. {"nvidia.com/gpu.product": '
    '"NVIDIA-H100-80GB-HBM3"}',
    "gpu_tolerations": '(cluster) the GPU tasks\' tolerations, a JSON list, e.g. [{"key": "nvidia.com/gpu", '
    '"operator": "Exists", "effect": "NoSchedule"}]',
    "gpu_task_cpu": "(cluster) CPU request = limit of a GPU task (a Kubernetes quantity)",
    "gpu_task_memory": "(cluster) memory request = limit of a GPU task (a Kubernetes quantity), including its 16Gi "
    "/dev/shm",
}


def config_class(stage: str) -> type:
    """The config dataclass of `stage` (imports the stage module)."""
    if stage not in CONFIGS:
        raise ValueError(f"stage={stage!r}: not a pipeline stage with a config (known: {sorted(CONFIGS)})")
    module, name = CONFIGS[stage]
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------------------------- configs


def stage_fields(stage: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields of `stage` that the given pipeline parameters set (parameters not given are left to the
    config's defaults): FIELDS and SHARED, with NONE_VALUES made None and JSON lists made tuples."""
    out = {}
    for name, value in params.items():
        if FIELDS.get(name, ("", ""))[0] == stage:
            field = FIELDS[name][1]
        elif stage in SHARED.get(name, ()):
            field = name
        else:
            continue
        if name in NONE_VALUES and value == NONE_VALUES[name]:
            value = None
        out[field] = tuple(value) if isinstance(value, list) else value
    return out


def _build(stage: str, make: Callable[[], Any]) -> Any:
    """`make()`, its ValueError ("field=value: why") also naming the pipeline parameter behind the field."""
    try:
        return make()
    except ValueError as e:
        match = re.match(r"(\w+)=", str(e))
        field = match[1] if match else None
        names = [p for p, (s, f) in {**FIELDS, **DERIVED}.items() if s == stage and f == field]
        names += [p for p, stages in SHARED.items() if p == field and stage in stages]
        raise ValueError(f"{e} (pipeline parameter {names[0]})" if names else str(e)) from None


def prepare_data_config(params: Mapping[str, Any]):
    """PrepareDataConfig from source, source_options, num_train, num_eval, image_size, seed."""
    cls = config_class("prepare_data")
    return _build(
        "prepare_data",
        lambda: cls.from_options(params.get("source_options", {}), **stage_fields("prepare_data", params)),
    )


def tune_config(params: Mapping[str, Any]):
    """TuneConfig from llm, allow_hub, bidirectional, tune_steps, tune_batch_size, tune_lr, tune_pairs,
    tune_query_instructions, tune_max_grad_norm, lora_r, seed, device, dtype; LoRA alpha = 2 r and, unless
    tune_warmup_steps is given (not 0), a warm-up of an eighth of the steps (at least one), as the paper's recipe
    scales."""
    fields = stage_fields("tune_caption_encoder", params)
    if "lora_r" in params:
        fields["lora_alpha"] = 2 * params["lora_r"]
    if params.get("tune_warmup_steps", 0) != 0:
        fields["warmup_steps"] = params["tune_warmup_steps"]
    elif "tune_steps" in params:
        fields["warmup_steps"] = max(1, params["tune_steps"] // 8)
    cls = config_class("tune_caption_encoder")
    return _build("tune_caption_encoder", lambda: cls(**fields))


def cache_config(params: Mapping[str, Any], *, group: Mapping[str, int], use_adapter: bool, attention: str):
    """CacheConfig of one caching task: shard group `group` ({"group_index", "num_groups"}, an item of
    prepare_data's output) with or without the tuned adapter; allow_hub, device and dtype from `params`."""
    for key in ("group_index", "num_groups"):
        if key not in group:
            raise ValueError(f"group={dict(group)!r}: missing {key!r} (an item of prepare_data's shard groups)")
    cls = config_class("cache_caption_embeddings")
    fields = stage_fields("cache_caption_embeddings", params)
    fields.update(use_adapter=use_adapter, attention=attention)
    fields.update(group_index=int(group["group_index"]), num_groups=int(group["num_groups"]))
    return _build("cache_caption_embeddings", lambda: cls(**fields))


def train_clip_config(params: Mapping[str, Any], *, text_source: str = "llm"):
    """TrainClipConfig of one stage-2 training ("llm": LLM2CLIP from the cache; "clip": the CLIP baseline) from
    vision_model, pretrained ("" = random init), train_epochs, train_batch_size, train_lr (0 = the recipe's),
    center_text, allow_hub, seed, device, dtype."""
    cls = config_class("train_clip")
    fields = {"text_source": text_source, **stage_fields("train_clip", params)}
    return _build("train_clip", lambda: cls(**fields))


def evaluate_config(params: Mapping[str, Any]):
    """EvaluateConfig from zero_shot, device and allow_hub."""
    cls = config_class("evaluate")
    return _build("evaluate", lambda: cls(**stage_fields("evaluate", params)))


def shard_groups(cache_groups: int) -> list[dict[str, int]]:
    """The items the caching fan-out loops over: one {"group_index", "num_groups"} per caching task."""
    if not isinstance(cache_groups, int) or cache_groups < 1:
        raise ValueError(f"cache_groups={cache_groups!r}: must be a whole number >= 1 (parallel caching tasks)")
    return [{"group_index": i, "num_groups": cache_groups} for i in range(cache_groups)]


def stage_configs(params: Mapping[str, Any]) -> dict[str, Any]:
    """Every stage's config from a full set of pipeline parameters (caching: its first group, tuned adapter), so
    a bad value fails before any task starts."""
    group = shard_groups(params.get("cache_groups", 1))[0]
    return {
        "prepare_data": prepare_data_config(params),
        "tune_caption_encoder": tune_config(params),
        "cache_caption_embeddings": cache_config(params, group=group, use_adapter=True, attention="as_tuned"),
        "train_clip": train_clip_config(params),
        "evaluate": evaluate_config(params),
    }


# ----------------------------------------------------------------------------------------------- help


def parameter_help(name: str) -> str:
    """What the pipeline parameter `name` means: its config field's metadata["help"] (FIELDS), else HELP's entry."""
    if name in FIELDS:
        stage, field = FIELDS[name]
        cls = config_class(stage)
        meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[field]
        text = meta.get("help", "")
        if not text:
            raise ValueError(f"pipeline parameter {name}: {cls.__name__}.{field} has no metadata['help']")
        if name in NONE_VALUES:
            text += f"; the pipeline's {format_value(NONE_VALUES[name]) or '(empty)'} stands for None"
        return text
    if name in HELP:
        return HELP[name]
    raise ValueError(f"pipeline parameter {name}: no help (map it to a config field in FIELDS or describe it in HELP)")


# ----------------------------------------------------------------------------------------------- --set values


def defaults(pipeline_func: Callable) -> dict[str, object]:
    """The parameters of a pipeline function with their defaults, in its signature's order."""
    return {k: p.default for k, p in inspect.signature(pipeline_func).parameters.items()}


def format_value(value: object) -> str:
    """A parameter value as `--set KEY=VALUE` takes it back (parse_overrides)."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value, separators=(",", ":")) if isinstance(value, dict | list) else str(value)


def parse_overrides(pairs: list[str], defaults: dict[str, object]) -> dict[str, object]:
    """KEY=VALUE pairs typed after the parameter's default; unknown keys and bad values raise SystemExit."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE")
        if key not in defaults:
            raise SystemExit(f"--set {key}: unknown pipeline parameter (known: {', '.join(sorted(defaults))})")
        kind = type(defaults[key])
        try:
            if kind in (dict, list):  # JSON: --set source_options='{"a": 1}' --set zero_shot='["synthetic"]'
                value = json.loads(raw)
                if not isinstance(value, kind):
                    raise ValueError(raw)
                out[key] = value
            elif kind is bool:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                out[key] = raw.lower() in ("true", "1")
            else:
                out[key] = kind(raw)
        except ValueError:
            raise SystemExit(f"--set {key}={raw!r}: expected {'an' if kind is int else 'a'} {kind.__name__}") from None
    return out
