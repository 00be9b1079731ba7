"""Checks a run's parameters against the world before any task starts: models, object-store settings, source and
eval paths, field names against a first sample, batch sizes against split sizes. Each problem is one sentence that
names the parameter and its value; `check_run` raises one ValueError listing them all.

Models (`model_problems`) are classified as llm2clip.model_sources resolves them: an s3:// copy needs the store's
settings, a path must exist, a hub id is fine with allow_hub and must be in the local Hugging Face cache without it.
On a cluster (`llm2clip submit`) the pods resolve them: paths under /models (the models_pvc volume) and the object
store's settings (the llm2clip-config ConfigMap) are theirs, and their Hugging Face cache is empty.

What is not checked here, and why: a Hugging Face hub id when downloads are allowed (that needs the network), the
content of every record (prepare_data validates each one and writes rejects.jsonl), and how many records survive
validation (only an upper bound is known before prepare_data runs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from llm2clip import formats, model_sources, prepare_data, storage
from llm2clip.params import prepare_data_config


def check_run(params: Mapping[str, object], env: Mapping[str, str] | None = None) -> None:
    """Raise ValueError listing every problem of a pipeline run's parameters (see the module docstring)."""
    problems = run_problems(params, os.environ if env is None else env)
    if problems:
        raise ValueError(
            problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(problems)
        )


def run_problems(params: Mapping[str, object], env: Mapping[str, str]) -> list[str]:
    cfg = prepare_data_config(params)
    problems = model_problems(params, env)
    uris = {"source": cfg.source, "images": cfg.images}
    uris.update({f"eval_sources[{i}]": prepare_data.parse_eval_source(s)[2] for i, s in enumerate(cfg.eval_sources)})
    store_problems = [p for name, uri in uris.items() if uri for p in object_store_problems(name, uri, env)]
    problems += store_problems
    if store_problems:
        return problems  # the checks below read the source
    problems += eval_source_problems(cfg)
    problems += field_problems(cfg)
    problems += batch_size_problems(params, cfg)
    return problems


def placement_problems(params: Mapping[str, object]) -> list[str]:
    """Counts the pipeline turns into pod resources and torchrun sizes: caught before a run, not in its first task."""
    limits = {"gpus": 0, "train_nodes": 1, "train_nproc": 1, "cache_groups": 1}
    return [
        f"{name}={params[name]!r}: must be a whole number >= {low}"
        for name, low in limits.items()
        if name in params and (not isinstance(params[name], int) or params[name] < low)
    ]


def model_problems(params: Mapping[str, object], env: Mapping[str, str], on_cluster: bool = False) -> list[str]:
    """`llm` and `pretrained` (see the module docstring); `on_cluster`: checked for a run on a cluster's pods.
    A parameter missing from `params` (submit passes only those set) keeps its default, which needs no check."""
    allow_hub = bool(params.get("allow_hub", False))
    problems = llm_problems(str(params["llm"]), env, allow_hub, on_cluster) if "llm" in params else []
    problems += pretrained_problems(str(params.get("pretrained") or ""), env, on_cluster)
    if on_cluster and "models_pvc" in params and not params["models_pvc"]:
        problems.append(
            f"models_pvc={params.get('models_pvc')!r}: Kubeflow Pipelines fails every model-loading task whose PVC "
            "name is empty; keep the default (llm2clip-models, created by manifests/base) or name a claim of yours"
        )
    return problems


def _on_models_volume(reference: str) -> bool:
    from llm2clip.ops.trainjob import MODELS_PATH

    return reference.startswith(MODELS_PATH + "/")


def llm_problems(llm: str, env: Mapping[str, str], allow_hub: bool = False, on_cluster: bool = False) -> list[str]:
    """A project name, a Hugging Face model directory (with config.json), an s3:// copy of one, or a hub id:
    without allow_hub, only one already in the local Hugging Face cache (none on a cluster's pods)."""
    from llm2clip.text_encoder import SMOLLM2, TINY_LLAMA

    if llm in (SMOLLM2, TINY_LLAMA):
        return []
    try:
        kind = model_sources.classify(llm)
    except ValueError as e:
        return [f"llm={llm!r}: {e}"]
    if kind == "object-store":
        return [] if on_cluster else object_store_problems("llm", llm, env)
    if kind == "hub":
        if allow_hub:
            return []
        if not on_cluster:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(llm, "config.json"), str):
                return []
        where = "the pods' Hugging Face cache is empty" if on_cluster else "it is not in the local Hugging Face cache"
        return [
            f"llm={llm!r}: a Hugging Face hub id, and the run is offline (allow_hub=False) while {where}: set "
            "allow_hub=true where the hub is reachable, or pass an s3:// copy or a model directory "
            f"(on a cluster under /models, with models_pvc), or {SMOLLM2!r} / {TINY_LLAMA!r}"
        ]
    if on_cluster and _on_models_volume(llm):
        return []  # on the models_pvc volume, which only the pods see
    path = Path(llm).expanduser()
    if not path.exists():
        return [f"llm={llm!r}: no such model directory (or use {SMOLLM2!r} / {TINY_LLAMA!r})"]
    if not path.is_dir():
        return [f"llm={llm!r}: a file, not a model directory"]
    if not (path / "config.json").is_file():
        return [f"llm={llm!r}: the directory holds no config.json (expected a Hugging Face model directory)"]
    return []


def pretrained_problems(pretrained: str, env: Mapping[str, str], on_cluster: bool = False) -> list[str]:
    """ "" (random init), an s3:// checkpoint, a checkpoint file, or an open_clip tag (resolved when the tower is
    built: only open_clip knows its tags, and importing it here would cost seconds)."""
    if not pretrained:
        return []
    try:
        kind = model_sources.classify(pretrained)
    except ValueError as e:
        return [f"pretrained={pretrained!r}: {e}"]
    if kind == "object-store":
        return [] if on_cluster else object_store_problems("pretrained", pretrained, env)
    if kind == "hub" or (on_cluster and _on_models_volume(pretrained)):
        return []
    if not Path(pretrained).expanduser().is_file():
        return [
            f"pretrained={pretrained!r}: no such checkpoint file"
            + (" (on a cluster, a path under /models on models_pvc, or s3://BUCKET/KEY)" if on_cluster else "")
        ]
    return []


def object_store_problems(name: str, uri: str, env: Mapping[str, str]) -> list[str]:
    """An s3:// or minio:// location needs the endpoint and the credentials in the environment."""
    if not storage.is_remote(uri):
        return []
    missing = [v for v in ("MINIO_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(v)]
    if "MINIO_ENDPOINT" in missing and env.get("AWS_ENDPOINT_URL"):
        missing.remove("MINIO_ENDPOINT")
    if not missing:
        return []
    return [f"{name}={uri!r}: an object-store location needs {', '.join(missing)} in the environment"]


def eval_source_problems(cfg: prepare_data.PrepareDataConfig) -> list[str]:
    """Every eval set's annotation file (Urban-1K: its caption/ folder) and images root exist."""
    problems = []
    for i, spec in enumerate(cfg.eval_sources):
        name, fmt, uri, images = prepare_data.parse_eval_source(spec)
        where = f"eval_sources[{i}] ({name})"
        if fmt == "urban1k":
            if not storage.list_files(storage.join(uri, "caption"), ".txt"):
                problems.append(f"{where}: no caption/*.txt under {uri} (the Urban-1K layout: caption/, image/)")
            images = images or storage.join(uri, "image")
        elif not storage.exists(uri):
            problems.append(f"{where}: {uri} does not exist")
        if not storage.exists(images):
            problems.append(f"{where}: images root {images} does not exist or is empty")
    return problems


def field_problems(cfg: prepare_data.PrepareDataConfig) -> list[str]:
    """Field and column names against the first sample of the source: a name that matches nothing is an error
    naming what is available, not an empty caption kind discovered after the run."""
    if cfg.source == "synthetic":
        return []
    if cfg.source_format == "canonical":
        if not storage.list_files(storage.join(cfg.source, "train"), ".tar"):
            return [f"source={cfg.source!r}: no train/*.tar shards (the canonical layout: train/, eval/<name>/)"]
        return []
    if cfg.source_format == "img2dataset":
        return _img2dataset_field_problems(cfg)
    return _table_column_problems(cfg)


def _img2dataset_field_problems(cfg: prepare_data.PrepareDataConfig) -> list[str]:
    import webdataset as wds

    shards = storage.list_files(cfg.source, ".tar", recursive=True)
    if not shards:
        return [f"source={cfg.source!r}: no .tar shards under it (the img2dataset layout)"]
    sample = next(iter(wds.WebDataset(shards[0], shardshuffle=False, empty_check=False)), None)
    if sample is None:
        return [f"source={cfg.source!r}: its first shard {shards[0]} holds no sample"]
    available = ", ".join(formats.sample_fields(sample))
    fields = {"raw_field": cfg.raw_field or "txt", "short_field": cfg.short_field, "long_field": cfg.long_field}
    problems, matched = [], 0
    for name, spec in fields.items():
        if not spec:
            continue
        try:
            found = bool(formats.field_values(sample, spec))
        except (ValueError, UnicodeDecodeError):
            found = False
        matched += found
        if not found and (name != "raw_field" or cfg.raw_field):
            problems.append(
                f"{name}={spec!r}: matches nothing in the first sample of {shards[0]} (available: {available})"
            )
    if not matched and not problems:
        problems.append(
            f"raw_field='txt' (the default): matches nothing in the first sample of {shards[0]} "
            f"(available: {available}); set raw_field, short_field or long_field"
        )
    return problems


def _table_column_problems(cfg: prepare_data.PrepareDataConfig) -> list[str]:
    try:
        columns = formats.table_columns(cfg.source)
    except ValueError as e:
        return [f"source={cfg.source!r}: {e}"]
    wanted = {
        "image_column": cfg.image_column,
        "key_column": cfg.key_column,
        "raw_field": cfg.raw_field or "caption",
        "short_field": cfg.short_field,
        "long_field": cfg.long_field,
    }
    problems = []
    for name, column in wanted.items():
        if column and column not in columns:
            default = " (the default)" if name == "raw_field" and not cfg.raw_field else ""
            problems.append(f"{name}={column!r}{default}: not a column of {cfg.source} (columns: {', '.join(columns)})")
    if not storage.exists(cfg.images):
        problems.append(f"images={cfg.images!r}: does not exist or is empty")
    return problems


def train_size(cfg: prepare_data.PrepareDataConfig) -> tuple[int, str] | None:
    """An upper bound on the train split's size before prepare_data runs, and where it comes from; None when
    it cannot be known cheaply."""
    if cfg.source == "synthetic":
        return cfg.num_train, "num_train"
    if cfg.source_format == "canonical":
        sizes = storage.join(cfg.source, "train", "sizes.json")
        return (sum(storage.read_json(sizes).values()), "train/sizes.json") if storage.exists(sizes) else None
    if cfg.source_format == "img2dataset":
        count = formats.shard_success_count(cfg.source)
        return None if count is None else (count, "the shards' *_stats.json")
    count = formats.table_row_count(cfg.source)
    return None if count is None else (count, "the table's rows")


def batch_size_problems(params: Mapping[str, object], cfg: prepare_data.PrepareDataConfig) -> list[str]:
    """Stage 1 and stage 2 draw whole batches of distinct training images: neither batch may exceed the split."""
    known = train_size(cfg)
    if known is None:
        return []
    count, origin = known
    return [
        f"{name}={params[name]!r}: larger than the {count} training images of source {cfg.source!r} ({origin})"
        for name in ("tune_batch_size", "train_batch_size")
        if int(params[name]) > count
    ]
