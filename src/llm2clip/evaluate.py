"""evaluate: zero-shot retrieval (multi-caption protocol) of LLM2CLIP and its baselines, CRA, the report."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llm2clip import artifacts, data, report, storage, train_clip
from llm2clip.metrics import retrieval_metrics

MODELS = ("llm2clip", "llm2clip_raw_llm", "clip_baseline")


@dataclass(frozen=True)
class EvaluateConfig:
    benchmarks: tuple[str, ...] = ()  # empty: every eval set of the prepared dataset
    ks: tuple[int, ...] = (1, 5, 10)
    batch_size: int = 256

    def __post_init__(self) -> None:
        artifacts.check(len(self.ks) > 0 and min(self.ks) >= 1, "ks", self.ks, "must be positive ranks")


@torch.no_grad()
def score_model(
    model_dir: str, dataset_dir: str, benchmark: str, cache_dirs: list[str] | None, cfg: EvaluateConfig
) -> dict[str, float]:
    """Retrieval metrics of one trained stage-2 model on one benchmark."""
    model, manifest = train_clip.load_trained(model_dir)
    mcfg = manifest["config"]
    kind = data.benchmarks(dataset_dir)[benchmark]
    split_dir = storage.join(dataset_dir, data.split_path(benchmark))
    keys, metas, images = train_clip.load_images(split_dir, train_clip.image_size_of(mcfg["model"]))
    if mcfg["text_source"] == "llm":
        table = train_clip.llm_text_table(cache_dirs or [], benchmark, keys, metas)
    else:
        table = train_clip.clip_text_table(mcfg["model"], metas)
    rows, owner = [], []
    for i in range(len(keys)):
        r = table.rows(i, kind)
        rows += r
        owner += [i] * len(r)
    image_emb = torch.cat(
        [
            model.encode_image(train_clip.normalize_images(images[s : s + cfg.batch_size]))
            for s in range(0, len(keys), cfg.batch_size)
        ]
    )
    texts = table.texts[rows]
    text_emb = torch.cat(
        [model.encode_text(texts[s : s + cfg.batch_size]) for s in range(0, len(rows), cfg.batch_size)]
    )
    return retrieval_metrics(image_emb, text_emb, torch.tensor(owner), cfg.ks)


def evaluate(
    cfg: EvaluateConfig,
    dataset_dir: str,
    text_lora_dir: str,
    models: dict[str, str],
    caches: dict[str, list[str]],
    out_dir: str,
    extra_timings: dict[str, float] | None = None,
) -> dict:
    """Score every model on every benchmark; write summary.json, report.md, report.html.

    models: {"llm2clip": dir, "llm2clip_raw_llm": dir, "clip_baseline": dir}
    caches: cache dirs each LLM-text model reads ({"llm2clip": [...], "llm2clip_raw_llm": [...]}).
    """
    t0 = time.time()
    unknown = set(models) - set(MODELS)
    if unknown:
        raise ValueError(f"models: unknown model names {sorted(unknown)} (expected {MODELS})")
    available = data.benchmarks(dataset_dir)
    names = cfg.benchmarks or tuple(available)
    unknown_benchmarks = [b for b in names if b not in available]
    if unknown_benchmarks:
        raise ValueError(f"benchmarks: {unknown_benchmarks} are not in the dataset (it has {list(available)})")
    retrieval = {
        b: {name: score_model(d, dataset_dir, b, caches.get(name), cfg) for name, d in models.items()} for b in names
    }
    tuned = artifacts.read_manifest(text_lora_dir, "tune_caption_encoder")
    timings: dict[str, float] = {}
    for d in [dataset_dir, text_lora_dir]:
        timings.update(artifacts.read_manifest(d)["timings_s"])
    for name, d in models.items():
        timings[f"train_clip:{name}"] = artifacts.read_manifest(d, "train_clip")["metrics"]["seconds"]
    cache_manifests = [artifacts.read_manifest(d, "cache_caption_embeddings") for ds in caches.values() for d in ds]
    cache_stats = {k: sum(m["metrics"][k] for m in cache_manifests) for k in ("hits", "misses")}
    for name, dirs in caches.items():
        timings[f"cache_caption_embeddings:{name}"] = sum(  # task-seconds: parallel groups add up
            artifacts.read_manifest(d)["timings_s"]["cache_caption_embeddings"] for d in dirs
        )
    timings.update(extra_timings or {})
    timings["evaluate"] = time.time() - t0
    summary = {
        "cra": {"before": tuned["metrics"]["cra_before"], "after": tuned["metrics"]["cra_after"]},
        "retrieval": retrieval,
        "timings_s": timings,
        "cache": cache_stats,
        "models": {name: _describe(d) for name, d in models.items()},
        "llm": tuned["base_model"],
        "report": storage.join(out_dir, "report.html"),
    }
    storage.write_json(storage.join(out_dir, "summary.json"), summary)
    report.write_reports(summary, out_dir)
    artifacts.write_manifest(
        out_dir,
        "evaluate",
        cfg,
        {"dataset": dataset_dir, "models": models, "caches": caches},
        timings_s={"evaluate": timings["evaluate"]},
    )
    return summary


def _describe(model_dir: str) -> dict:
    m = artifacts.read_manifest(model_dir, "train_clip")
    c = m["config"]
    return {
        "text_source": c["text_source"],
        "vision": c["model"],
        "pretrained": c["pretrained"],
        "epochs": c["epochs"],
        "batch_size": c["batch_size"],
        "parameters": m["parameters"],
        "encoder": (m.get("cache") or {}).get("encoder"),
    }
