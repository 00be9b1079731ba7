"""evaluate: zero-shot retrieval (multi-caption protocol) of LLM2CLIP, its baselines and ablations, with bootstrap
95% intervals and paired differences; the gap between seen and unseen caption wordings; CRA and the anisotropy of
the caption embeddings from the caption-embedding caches; the report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from llm2clip import (
    artifacts,
    cache_caption_embeddings,
    data,
    devices,
    inference,
    loading,
    report,
    storage,
    train_clip,
    tune_caption_encoder,
    zeroshot,
)
from llm2clip.metrics import (
    bootstrap_cross_image_cosine,
    bootstrap_indices,
    bootstrap_retrieval,
    caption_retrieval_hits,
    ci95,
    mean_cross_image_cosine,
    retrieval_hits,
)

# The model every comparison is made against, then its baselines, then the ablations (present when asked for).
MAIN = "llm2clip"
RAW = "llm2clip_raw_llm"  # reads the raw-LLM cache: the frozen LLM, causal, no adapter
MODELS = ("llm2clip", "llm2clip_raw_llm", "clip_baseline", "llm2clip_no_centring", "llm2clip_raw_llm_no_centring")
# The wording gap: the same images captioned in the training wordings (seen) and in held-out ones (unseen).
SEEN, UNSEEN = "synthetic_long", "synthetic_reworded"
R1 = ("image_to_text_R@1", "text_to_image_R@1")


@dataclass(frozen=True)
class EvaluateConfig:
    benchmarks: tuple[str, ...] = ()  # empty: every eval set of the prepared dataset
    ks: tuple[int, ...] = (1, 5, 10)
    batch_size: int = 256
    bootstrap: int = 1000  # resamples of the eval images for the 95% intervals
    seed: int = 0  # the bootstrap draws; the same draws serve every model, so differences are paired
    device: str = "auto"
    zero_shot: tuple[str, ...] = field(
        default=("synthetic",),
        metadata={
            "help": 'zero-shot classification sets: "synthetic" (colour x shape scenes at the dataset\'s image size) '
            'and/or "NAME=URI" (an image folder per class, local or s3://, optional classnames.txt); none: empty'
        },
    )
    zero_shot_images: int = 480  # size of the synthetic set (20 per class)
    zero_shot_templates: tuple[str, ...] = ("single", "ensemble")
    allow_hub: bool = False  # zero-shot loads the LLM-taught models' base LLM again: a hub id downloads only with it

    def __post_init__(self) -> None:
        artifacts.check(len(self.ks) > 0 and min(self.ks) >= 1, "ks", self.ks, "must be positive ranks")
        artifacts.check(self.bootstrap >= 100, "bootstrap", self.bootstrap, "needs >= 100 resamples")
        artifacts.check(self.device in devices.DEVICES, "device", self.device, f"must be one of {devices.DEVICES}")
        for spec in self.zero_shot:
            artifacts.check(spec == "synthetic" or "=" in spec, "zero_shot", spec, "expected 'synthetic' or NAME=URI")
        artifacts.check(self.zero_shot_images >= 24, "zero_shot_images", self.zero_shot_images, "must be >= 24")


@torch.no_grad()
def score_model(
    model_dir: str, dataset_dir: str, benchmark: str, cache_dirs: list[str] | None, cfg: EvaluateConfig
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-query retrieval hits of one trained stage-2 model on one benchmark (see metrics.retrieval_hits), and
    the image index of every scored caption [M]. Computed in fp32 on the configured device."""
    device = devices.resolve_device(cfg.device)
    model, manifest = train_clip.load_trained(model_dir)
    model.to(device)
    mcfg = manifest["config"]
    kind = data.benchmarks(dataset_dir)[benchmark]
    split_dir = storage.join(dataset_dir, data.split_path(benchmark))
    preprocess = loading.preprocess_of(model)  # the tower's own: resize + centre crop, its mean/std
    keys, metas, images = loading.load_images(split_dir, preprocess)
    if mcfg["text_source"] == "llm":
        table = loading.llm_text_table(cache_dirs or [], benchmark, keys, metas)
    else:
        table = loading.clip_text_table(mcfg["model"], metas)
    rows, owner = [], []
    for i in range(len(keys)):
        r = table.rows(i, kind)
        rows += r
        owner += [i] * len(r)
    image_emb = torch.cat(
        [
            model.encode_image(preprocess.normalize(images[s : s + cfg.batch_size].to(device))).cpu()
            for s in range(0, len(keys), cfg.batch_size)
        ]
    )
    texts = table.texts[rows]
    text_emb = torch.cat(
        [model.encode_text(texts[s : s + cfg.batch_size].to(device)).cpu() for s in range(0, len(rows), cfg.batch_size)]
    )
    owner_t = torch.tensor(owner)
    return retrieval_hits(image_emb, text_emb, owner_t, cfg.ks), owner_t


def score_benchmark(
    dataset_dir: str, benchmark: str, models: dict[str, str], caches: dict[str, list[str]], cfg: EvaluateConfig
) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """Every model on one benchmark: recall@k with 95% intervals, and each other model's paired difference from
    LLM2CLIP (the same bootstrap draws of the same images for every model; the draws depend only on the number of
    images and cfg.seed, so two sets of the same images get the same draws too).

    Returns ({model: {metric: value, metric_ci95: [lo, hi]}}, {"llm2clip vs <model>": {metric: {...}}},
    {model: {metric: bootstrap replicates [resamples]}}).
    """
    scores, replicates = {}, {}
    draws = None
    for name, model_dir in models.items():
        hits, owner = score_model(model_dir, dataset_dir, benchmark, caches.get(name), cfg)
        n_images = int(owner.max()) + 1 if len(owner) else 0
        if draws is None:
            draws = bootstrap_indices(n_images, cfg.bootstrap, cfg.seed)
        reps = bootstrap_retrieval(hits, owner, draws)
        values: dict = {"images": n_images, "captions": len(owner)}
        for metric, h in hits.items():
            values[metric] = h.float().mean().item()
            values[f"{metric}_ci95"] = ci95(reps[metric])
        scores[name], replicates[name] = values, reps
    comparisons = {}
    if MAIN in scores:
        for other in scores:
            if other == MAIN:
                continue
            comparisons[f"{MAIN} vs {other}"] = {
                metric: compare(
                    scores[MAIN], scores[other], metric, replicates[MAIN][metric] - replicates[other][metric]
                )
                for metric in replicates[MAIN]
            }
    return scores, comparisons, replicates


def compare(a: dict, b: dict, metric: str, diff_replicates: np.ndarray) -> dict:
    """A's lead over B on one metric: the difference, its paired 95% interval, and whether the two models' own
    intervals overlap (the plain reading: overlapping intervals cannot carry a ranking)."""
    (alo, ahi), (blo, bhi) = a[f"{metric}_ci95"], b[f"{metric}_ci95"]
    lo, hi = ci95(diff_replicates)
    return {
        "difference": a[metric] - b[metric],
        "difference_ci95": [lo, hi],
        "intervals_overlap": bool(alo <= bhi and blo <= ahi),
        "difference_excludes_zero": bool(lo > 0 or hi < 0),
    }


def wording_gap(
    dataset_dir: str, retrieval: dict[str, dict[str, dict]], replicates: dict[str, dict[str, dict[str, np.ndarray]]]
) -> dict:
    """Per model, R@1 (both directions) on captions in the training wordings (SEEN) minus on the same images captioned
    in held-out wordings (UNSEEN): how much a model loses when a caption says the same thing in words it never
    trained on. Paired per image: the two sets hold the same images under the same keys in the same order (checked
    here), and score_benchmark drew the same bootstrap resamples for both, so the gap's interval is of the paired
    difference (replicate r of SEEN minus replicate r of UNSEEN).

    Returns {"seen": SEEN, "unseen": UNSEEN, "images": N, "models": {model: {metric: {"seen", "seen_ci95",
    "unseen", "unseen_ci95", "gap", "gap_ci95", "gap_excludes_zero"}}}}, values in [0, 1] (gap in [-1, 1]); or
    {"seen", "unseen", "note"} when the two sets do not hold the same images.
    """
    keys = {
        b: [k for _, k, _ in data.read_captions(storage.join(dataset_dir, data.split_path(b)))] for b in (SEEN, UNSEEN)
    }
    if keys[SEEN] != keys[UNSEEN]:
        return {
            "seen": SEEN,
            "unseen": UNSEEN,
            "note": f"no wording gap: {SEEN} and {UNSEEN} do not hold the same keys in the same order",
        }
    models: dict[str, dict] = {}
    for model, seen in retrieval[SEEN].items():
        unseen = retrieval[UNSEEN].get(model)
        if unseen is None:
            continue
        models[model] = {}
        for metric in R1:
            lo, hi = ci95(replicates[SEEN][model][metric] - replicates[UNSEEN][model][metric])
            models[model][metric] = {
                "seen": seen[metric],
                "seen_ci95": seen[f"{metric}_ci95"],
                "unseen": unseen[metric],
                "unseen_ci95": unseen[f"{metric}_ci95"],
                "gap": seen[metric] - unseen[metric],
                "gap_ci95": [lo, hi],
                "gap_excludes_zero": bool(lo > 0 or hi < 0),
            }
    return {"seen": SEEN, "unseen": UNSEEN, "images": len(keys[SEEN]), "models": models}


def average_over_benchmarks(retrieval: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Mean recall per model and metric over the evaluated sets (the paper's headline: the average of its five
    retrieval sets per direction). Only models scored on every set."""
    benches = list(retrieval)
    models = [m for m in retrieval[benches[0]] if all(m in retrieval[b] for b in benches)] if benches else []
    out = {}
    for m in models:
        metrics = [
            k
            for k, v in retrieval[benches[0]][m].items()
            if k.startswith(("image_to_text", "text_to_image")) and not k.endswith("_ci95")
        ]
        out[m] = {k: float(np.mean([retrieval[b][m][k] for b in benches])) for k in metrics}
    return out


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

    models: {"llm2clip": dir, "llm2clip_raw_llm": dir, "clip_baseline": dir, ablations...}; a model directory whose
        manifest says it was skipped (an ablation not asked for) is left out.
    caches: cache dirs each LLM-text model reads ({"llm2clip": [...], "llm2clip_raw_llm": [...], ...}).
    """
    t0 = time.time()
    unknown = set(models) - set(MODELS)
    if unknown:
        raise ValueError(f"models: unknown model names {sorted(unknown)} (expected {MODELS})")
    models = {name: d for name, d in models.items() if not artifacts.read_manifest(d, "train_clip").get("skipped")}
    available = data.benchmarks(dataset_dir)
    names = cfg.benchmarks or tuple(available)
    unknown_benchmarks = [b for b in names if b not in available]
    if unknown_benchmarks:
        raise ValueError(f"benchmarks: {unknown_benchmarks} are not in the dataset (it has {list(available)})")
    retrieval, comparisons, replicates = {}, {}, {}
    for b in names:
        retrieval[b], comparisons[b], replicates[b] = score_benchmark(dataset_dir, b, models, caches, cfg)
    t_zero_shot = time.time()
    zero_shot = zero_shot_all(cfg, dataset_dir, text_lora_dir, models)
    t_zero_shot = time.time() - t_zero_shot
    tuned = artifacts.read_manifest(text_lora_dir, "tune_caption_encoder")
    timings: dict[str, float] = {}
    for d in [dataset_dir, text_lora_dir]:
        timings.update(artifacts.read_manifest(d)["timings_s"])
    for name, d in models.items():
        timings[f"train_clip:{name}"] = artifacts.read_manifest(d, "train_clip")["metrics"]["seconds"]
    # ablations read the same caches as their main model: count each cache once, under the first model using it
    distinct: dict[tuple[str, ...], str] = {}
    for name, dirs in caches.items():
        distinct.setdefault(tuple(dirs), name)
    cache_manifests = [artifacts.read_manifest(d, "cache_caption_embeddings") for dirs in distinct for d in dirs]
    cache_stats = {k: sum(m["metrics"][k] for m in cache_manifests) for k in ("hits", "misses")}
    for dirs, name in distinct.items():
        timings[f"cache_caption_embeddings:{name}"] = sum(  # task-seconds: parallel groups add up
            artifacts.read_manifest(d)["timings_s"]["cache_caption_embeddings"] for d in dirs
        )
    timings.update(extra_timings or {})
    timings["evaluate"] = time.time() - t0
    timings["evaluate:zero_shot"] = t_zero_shot
    caption_space = caption_metrics_from_caches(dataset_dir, caches, tuned, cfg)
    summary = {
        "cra": caption_space["cra"],
        "anisotropy": caption_space["anisotropy"],
        "retrieval": retrieval,
        "comparisons": comparisons,
        "zero_shot": zero_shot,
        "timings_s": timings,
        "cache": cache_stats,
        "models": {name: _describe(d) for name, d in models.items()},
        "llm": tuned["base_model"],
        "bootstrap": {"resamples": cfg.bootstrap, "seed": cfg.seed, "unit": "eval images (with all their captions)"},
        "artifacts": {"dataset": dataset_dir, "text_lora": text_lora_dir, "models": models, "caches": caches},
        "report": storage.join(out_dir, "report.html"),
    }
    if len(retrieval) > 1:
        summary["retrieval_average"] = average_over_benchmarks(retrieval)
    if SEEN in retrieval and UNSEEN in retrieval:
        summary["wording_gap"] = wording_gap(dataset_dir, retrieval, replicates)
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


def zero_shot_sets(cfg: EvaluateConfig, dataset_dir: str) -> list[zeroshot.ZeroShotSet]:
    image_size = artifacts.read_manifest(dataset_dir, "prepare_data")["config"]["image_size"]
    out = []
    for spec in cfg.zero_shot:
        if spec == "synthetic":
            out.append(zeroshot.synthetic_set(cfg.zero_shot_images, image_size, cfg.seed))
        else:
            name, _, uri = spec.partition("=")
            out.append(zeroshot.folder_set(uri, name))
    return out


def zero_shot_all(cfg: EvaluateConfig, dataset_dir: str, text_lora_dir: str, models: dict[str, str]) -> dict:
    """{"<set>/<templates>": {model: {acc1, acc1_ci95, acc5, ...}}}: every model through its own text side (the
    LLM with its adapter and pooling as cached, or the CLIP text tower), one model loaded at a time."""
    sets = zero_shot_sets(cfg, dataset_dir)
    out: dict[str, dict] = {}
    for name, model_dir in models.items():
        encoder = inference.load_model(
            model_dir, text_lora_dir=text_lora_dir, device=cfg.device, allow_hub=cfg.allow_hub
        )
        for ds in sets:
            for templates, result in zeroshot.zero_shot_suite(encoder, ds, cfg.zero_shot_templates, cfg.seed).items():
                out.setdefault(f"{ds.name}/{templates}", {})[name] = result
        del encoder
    return out


def pipeline_caches(tuned: list[str], raw: list[str]) -> dict[str, list[str]]:
    """Which caption-embedding caches each model of the pipeline reads: the ablations read their main model's."""
    return {
        "llm2clip": tuned,
        "llm2clip_raw_llm": raw,
        "llm2clip_no_centring": tuned,
        "llm2clip_raw_llm_no_centring": raw,
    }


def evaluate_pipeline_models(
    cfg: EvaluateConfig,
    dataset_dir: str,
    text_lora_dir: str,
    model_dirs: list[str],
    tuned: list[str],
    raw: list[str],
    out_dir: str,
) -> dict:
    """`evaluate` as the pipeline's evaluate task calls it: the model directories in MODELS order and the two
    caption-cache fan-outs (tuned LLM, raw LLM) as they come, each model reading its caches (pipeline_caches)."""
    artifacts.check(len(model_dirs) == len(MODELS), "model_dirs", model_dirs, f"expected one per model of {MODELS}")
    models = dict(zip(MODELS, model_dirs, strict=True))
    return evaluate(cfg, dataset_dir, text_lora_dir, models, pipeline_caches(tuned, raw), out_dir)


def cra_summary(tune_metrics: dict) -> dict:
    """CRA as stage 1 measured it: every `cra_*` metric, without the prefix ("before", "after_ci95", ...); all None
    with a "note" when stage 1 did not measure it."""
    return {k.removeprefix("cra_"): v for k, v in tune_metrics.items() if k.startswith("cra_")}


def caption_metrics_from_caches(
    dataset_dir: str, caches: dict[str, list[str]], tuned: dict, cfg: EvaluateConfig
) -> dict[str, dict]:
    """CRA and anisotropy of the raw and the tuned LLM, read from the caption-embedding caches the pipeline embeds
    anyway. Returns {"cra": {...}, "anisotropy": {...}}.

    CRA: "before" is the raw-LLM cache (frozen LLM, causal, no adapter: the paper's raw-LLM row); "after" the tuned
    cache. The pairs and the metric are stage 1's (`tune_caption_encoder.cra_pairs` up to its cra_max_captions;
    caption 1 of each image retrieves caption 2 among all, ties counted against the query), and both are resampled
    with the same bootstrap draws of the queries, so "difference" (after - before) has a paired 95% interval.
    "before_bidirectional" (mask removed, untuned) has no cache: it is stage 1's, when stage 1 measured it
    (TuneConfig.cra), with stage 1's draws. Without both caches, stage 1's own CRA (or its note) is returned.
    {before, before_ci95, after, after_ci95, difference, difference_ci95, [before_bidirectional,
    before_bidirectional_ci95,] pool_size, source, before_attention, store_dtype, measured_in}; values in [0, 1].

    Anisotropy: the mean cosine similarity between captions of different images (metrics.bootstrap_cross_image_cosine)
    over both captions of each CRA image, for the same two LLMs with the same draws: {before, before_ci95, after,
    after_ci95, difference, difference_ci95, pool_size, captions_per_image, source, measured_in}, or {"note"} when
    there is nothing to measure. A value near 1 says every caption embedding points almost the same way (what
    train_clip's centring is for).

    tuned: the stage-1 manifest.
    """
    stage1 = cra_summary(tuned["metrics"])
    if MAIN not in caches or RAW not in caches:
        return {"cra": stage1, "anisotropy": {"note": "anisotropy needs the caption caches of the raw and tuned LLM"}}
    pairs = tune_caption_encoder.cra_pairs(dataset_dir, tuned["config"].get("cra_max_captions", 5000))
    if pairs is None:
        skipped = "no eval set has two short captions per image"
        cra = {
            "before": None,
            "before_ci95": None,
            "after": None,
            "after_ci95": None,
            "pool_size": 0,
            "source": None,
            "note": tune_caption_encoder.CRA_SKIPPED,
        }
        return {
            "cra": cra,
            "anisotropy": {"note": "anisotropy skipped: it is measured on CRA's captions, and " + skipped},
        }
    draws = bootstrap_indices(len(pairs.rows), cfg.bootstrap, cfg.seed)
    out: dict = {}
    spread: dict = {}
    replicates, cosines, encoders = {}, {}, {}
    for name, model in (("before", RAW), ("after", MAIN)):
        emb, encoders[name] = cache_caption_embeddings.load_embeddings(caches[model], pairs.source)
        # The caches store float16 vectors (CacheConfig.store_dtype), stage 1 measured in its compute dtype. CRA
        # is a ranking, so the rounding can only flip near-ties (cosines within ~1e-3 of each other).
        queries = torch.stack([emb[key][q] for key, q, _ in pairs.rows])  # [N, D]
        pool = torch.stack([emb[key][p] for key, _, p in pairs.rows])  # [N, D]
        hits = caption_retrieval_hits(queries, pool).numpy().astype(np.float64)
        replicates[name] = hits[draws].mean(1)
        out[name], out[f"{name}_ci95"] = float(hits.mean()), ci95(replicates[name])
        captions = torch.stack([queries, pool], 1)  # [N, 2, D]
        cosines[name] = bootstrap_cross_image_cosine(captions, draws)
        spread[name], spread[f"{name}_ci95"] = mean_cross_image_cosine(captions), ci95(cosines[name])
    out["difference"] = out["after"] - out["before"]
    out["difference_ci95"] = ci95(replicates["after"] - replicates["before"])
    spread["difference"] = spread["after"] - spread["before"]
    spread["difference_ci95"] = ci95(cosines["after"] - cosines["before"])
    if stage1.get("before_bidirectional") is not None:
        out["before_bidirectional"] = stage1["before_bidirectional"]
        out["before_bidirectional_ci95"] = stage1.get("before_bidirectional_ci95")
    where = {"pool_size": len(pairs.rows), "source": pairs.source, "measured_in": "evaluate (caches)"}
    cra = {
        **out,
        **where,
        "before_attention": "bidirectional" if encoders["before"]["encoder"]["bidirectional"] else "causal",
        "store_dtype": artifacts.read_manifest(caches[RAW][0], "cache_caption_embeddings").get("dtype"),
    }
    return {"cra": cra, "anisotropy": {**spread, **where, "captions_per_image": 2}}


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
