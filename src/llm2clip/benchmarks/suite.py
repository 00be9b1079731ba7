"""Benchmarks that report numbers (ratios measured in one run, variants interleaved): caption caching, shard
streaming, stage-2 training, stage-2 memory, and the GPU suite (llm2clip.benchmarks.gpu).

Caption caching compares, on the same model and the same caption mix:
- `official_recipe`: what microsoft/LLM2CLIP `llm2clip/data/extract_embedding.py` does: the LLM loaded in bf16
  (weights and compute), LLM2Vec's `encode` (captions sorted by character length, longest first, in batches of 32,
  each padded to its own longest), one process, embeddings stored as fp32 raw bytes;
- `official_recipe_in_our_dtype`: the same batching in our resolved compute dtype, so dtype and batching effects
  are measured apart;
- `ours`: what the cache stage runs: `CacheConfig` defaults, compute dtype resolved per device (`devices.setup`),
  token-budget batches of length-sorted captions (`text_encoder.encode_all`), stored in `CacheConfig.store_dtype`;
- `naive_fixed`: input order, batch 32, every caption padded to a fixed length (on a prefix of the mix);
- `sweep`: our batching over a grid of (max_tokens, max_batch), to choose the per-device default by measurement.
Each round runs every variant once (A B C A B C ...), so load from other processes hits all alike; ratios are taken
per round and reported as median and min-max over rounds.

Stage 2 (`stage2`, `memory`), on a synthetic set chained as the pipeline does (prepare -> a LoRA-tuned tiny Llama
-> cache -> train):
- `stage2.images_per_s`, `stage2.data_wait_share`: `train_clip.train_clip` itself (streaming DataLoader and all);
- `stage2.cached_vs_online_speedup`: the paper's Table A4 claim (cached features 4.2x faster than running the LLM
  online), as the median over interleaved rounds of (a step whose text embeddings come from running the frozen LLM
  on the batch's captions) / (the same step on cached embeddings); same tower, batch, images and optimizer;
- `memory.rss_mb_1x`, `memory.rss_mb_10x`: peak RSS of `python -m llm2clip.train_clip` in a fresh process on N and
  on 10N images (the N images copied 10 times under new keys), same epochs, batch and workers; memory must not
  grow with the data (target ratio <= 1.3).

llm2clip benchmark --output runs/benchmark.json [--device cpu|cuda] [--only caching,streaming,stage2,memory,gpu]
    [--llm smollm2-135m-instruct] [--captions 32] [--repeats 3] [--stage2-images 500] ...
The defaults are sized for about 10 minutes on a quiet 2-core CPU (the caching mix is small because the official
recipe's bf16 is emulated on CPUs without avx512_bf16); on a GPU node add `--device cuda` (GPU suite included).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from open_clip.loss import ClipLoss

from llm2clip import (
    artifacts,
    cache_caption_embeddings,
    clip_model,
    data,
    devices,
    loading,
    prepare_data,
    storage,
    synthetic,
    text_encoder,
    train_clip,
    tune_caption_encoder,
)
from llm2clip.cache_caption_embeddings import CacheConfig

OFFICIAL_BATCH = 32  # LLM2Vec.encode's default batch size, which extract_embedding.py keeps
DEFAULT_SWEEP_MAX_TOKENS = (512, 1024, 2048, 4096, 8192)
DEFAULT_SWEEP_MAX_BATCH = (256,)
NOISY_SPREAD = 0.10  # rounds of one variant differing by more than this (max/min - 1) get a note in the JSON


def caption_mix(n: int, seed: int = 0) -> list[str]:
    """A realistic mix: per image two short captions and one long dense caption, shuffled."""
    # synthetic.generate's scenes and captions without rendering the images (render draws no random numbers)
    rng = random.Random(f"{seed}/bench")
    scenes = synthetic.scene_groups(rng, -(-n // 6), 2, prefix="bench_")[: -(-n // 3)]
    caps = [t for s in scenes for _, t in data.caption_list({"captions": synthetic.captions(s, rng, 2)})][:n]
    random.Random(seed).shuffle(caps)
    return caps


# ----------------------------------------------------------------------------------------------- the variants


@torch.no_grad()
def official_recipe_encode(
    encoder: text_encoder.CaptionEncoder, captions: Sequence[str], dtype: str, batch_size: int = OFFICIAL_BATCH
) -> tuple[torch.Tensor, list[dict]]:
    """LLM2Vec's `encode` as LLM2CLIP's extraction script calls it: captions sorted by character length, longest
    first (llm2vec's `_text_length` of a string is `len(str)`); fixed batches of `batch_size`, each padded to its
    longest; embeddings cast to fp32 (the script writes them as fp32 raw bytes). The forward and pooling are ours
    (`text_encoder.embed`), so only order, batching and dtype differ from our variant. Computes under `dtype`
    autocast over the encoder's weights: the official recipe loads the weights in bf16, so all of it runs in bf16.

    Returns ([N, D] fp32 on the CPU, in input order; per batch {"indices", "padded_length", "real_tokens"})."""
    encoder.model.eval()
    order = sorted(range(len(captions)), key=lambda i: -len(captions[i]))
    lengths = text_encoder.token_lengths(encoder, captions)  # what `tokenize` pads to, without a second tokenizer pass
    parts, batches = [], []
    with devices.autocast(devices.module_device(encoder.model), dtype):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            parts.append(text_encoder.embed(encoder, [captions[i] for i in idx]).cpu())
            batches.append(
                {
                    "indices": idx,
                    "padded_length": max(lengths[i] for i in idx),
                    "real_tokens": sum(lengths[i] for i in idx),
                }
            )
    out = torch.cat(parts)[torch.argsort(torch.tensor(order))]
    return out.to(torch.float32), batches


@torch.no_grad()
def naive_encode(
    encoder: text_encoder.CaptionEncoder, captions: Sequence[str], batch: int, dtype: str, fixed_length: int
) -> int:
    """Input order, fixed batch size, every caption padded to `fixed_length`. Returns padded tokens processed."""
    padded = 0
    encoder.model.eval()
    device = devices.module_device(encoder.model)
    for s in range(0, len(captions), batch):
        tok = encoder.tokenizer(
            list(captions[s : s + batch]),
            truncation=True,
            return_tensors="pt",
            padding="max_length",
            max_length=fixed_length,
        )
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        with devices.autocast(device, dtype):
            text_encoder.mean_pool(text_encoder.hidden_states(encoder, ids, mask), mask)
        padded += ids.numel()
    return padded


def official_padding(lengths: Sequence[int], order: Sequence[int], batch_size: int = OFFICIAL_BATCH) -> float:
    """Padding fraction of fixed batches over `order`, each padded to its longest (tokens per caption `lengths`)."""
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return 1 - sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in batches)


def padded_tokens(batches: list[dict]) -> int:
    return sum(b["padded_length"] * len(b["indices"]) for b in batches)


def spread(values: Sequence[float]) -> dict:
    """Median and min-max of per-round values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ----------------------------------------------------------------------------------------------- the benchmark


def caching_benchmark(
    llm: str,
    n: int,
    naive_n: int,
    fixed_length: int,
    repeats: int = 3,
    sweep_max_tokens: Sequence[int] = DEFAULT_SWEEP_MAX_TOKENS,
    sweep_max_batch: Sequence[int] = DEFAULT_SWEEP_MAX_BATCH,
) -> dict:
    """The official recipe vs ours (plus naive padding and our token-budget sweep), same model and captions."""
    # ---- setup: the cache stage's own choices for ours, the official script's for the official recipe
    cfg = CacheConfig()
    device, dtype = devices.setup(cfg.device, cfg.dtype)
    weights = getattr(torch, dtype) if device.type == "cuda" else torch.float32  # as the cache stage loads them
    ours_enc = text_encoder.load_caption_encoder(llm, max_length=fixed_length, dtype=weights, device=device)
    official_enc = text_encoder.load_caption_encoder(llm, max_length=fixed_length, dtype=torch.bfloat16, device=device)
    captions = caption_mix(n)
    subset = captions[:naive_n]  # naive padding is slow: it runs on a prefix of the same shuffled mix
    lengths = text_encoder.token_lengths(ours_enc, captions)
    real = {"all": sum(lengths), "subset": sum(text_encoder.token_lengths(ours_enc, subset))}

    # sweep settings that give the same batches as an earlier one (max_batch not binding) are measured once
    ours_setting = (cfg.max_tokens, cfg.max_batch)
    settings = list(dict.fromkeys([(t, b) for t in sweep_max_tokens for b in sweep_max_batch] + [ours_setting]))
    plan = {s: text_encoder.length_batches(lengths, *s) for s in settings}
    # a small benchmark mix pads large batches more than the cache stage's packs of `pack_size` captions do: report
    # the padding each batching gets on a pack-sized mix too (tokenizer only), to read the sweep at scale
    pack = caption_mix(cfg.pack_size)
    pack_lengths = text_encoder.token_lengths(ours_enc, pack)
    by_chars = sorted(range(len(pack)), key=lambda i: -len(pack[i]))
    pack_padding = {
        "official": official_padding(pack_lengths, by_chars),
        **{
            s: 1
            - sum(pack_lengths)
            / sum(len(b) * pack_lengths[b[0]] for b in text_encoder.length_batches(pack_lengths, *s))
            for s in settings
        },
    }
    same_as: dict[tuple[int, int], tuple[int, int]] = {}
    for s in settings:
        same_as[s] = next((m for m in dict.fromkeys(same_as.values()) if plan[m] == plan[s]), s)

    variants: dict[str, Callable[[], int]] = {
        "official_recipe": lambda: padded_tokens(official_recipe_encode(official_enc, captions, "bfloat16")[1]),
        "official_recipe_in_our_dtype": lambda: padded_tokens(official_recipe_encode(ours_enc, captions, dtype)[1]),
        "naive_fixed": lambda: naive_encode(ours_enc, subset, OFFICIAL_BATCH, dtype, fixed_length),
    }
    for t, b in dict.fromkeys(same_as.values()):
        variants[f"bucketed_{t}_{b}"] = lambda t=t, b=b: text_encoder.encode_all(ours_enc, captions, dtype, t, b)[1]

    # ---- warm-up (first calls allocate and pick kernels), then rounds: every variant once per round
    official_recipe_encode(official_enc, captions[:8], "bfloat16")
    official_recipe_encode(ours_enc, captions[:8], dtype)
    naive_encode(ours_enc, subset[:2], 2, dtype, fixed_length)
    text_encoder.encode_all(ours_enc, captions[:8], dtype)
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    padded: dict[str, int] = {}
    for r in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            padded[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
            tokens = real["subset" if name == "naive_fixed" else "all"]
            print(f"  round {r + 1}/{repeats} {name:<30} {tokens / seconds[name][-1]:8.1f} real tokens/s", flush=True)
    load_after = os.getloadavg()

    # ---- storage: bytes per caption as each recipe writes them
    official_emb, official_batches = official_recipe_encode(official_enc, captions, "bfloat16")
    official_bytes = len(official_emb[0].numpy().tobytes())  # extract_embedding.py: embeddings[k][i].numpy().tobytes()
    ours_stored = text_encoder.encode_all(ours_enc, captions[:2], dtype)[0][0].to(getattr(torch, cfg.store_dtype))
    ours_bytes = ours_stored.element_size() * ours_stored.numel()

    # ---- rows and ratios (per round, so a slow round slows both sides of a ratio alike)
    def row(name: str, **info) -> dict:
        caps, tokens = (subset, real["subset"]) if name == "naive_fixed" else (captions, real["all"])
        return {
            "variant": name,
            **info,
            "captions": len(caps),
            "real_tokens": tokens,
            "padded_tokens": padded[name],
            "padding_fraction": 1 - tokens / padded[name],
            "seconds": seconds[name],
            "captions_per_s": spread([len(caps) / s for s in seconds[name]]),
            "real_tokens_per_s": spread([tokens / s for s in seconds[name]]),
            "padded_tokens_per_s": spread([padded[name] / s for s in seconds[name]]),
        }

    def ratio(a: str, b: str) -> dict:
        """Real tokens/s of variant a over variant b, per round."""
        rate = {v: [real["subset" if v == "naive_fixed" else "all"] / s for s in seconds[v]] for v in (a, b)}
        return spread([x / y for x, y in zip(rate[a], rate[b], strict=True)])

    ours_name = "bucketed_{}_{}".format(*same_as[ours_setting])
    official_batching = {
        "order": "character length, longest first",
        "batch_size": OFFICIAL_BATCH,
        "padding": "to each batch's longest",
        "processes": 1,
    }
    out = {
        "llm": llm,
        "captions": n,
        "naive_captions": naive_n,
        "repeats": repeats,
        "compute": devices.describe(device, dtype),
        "official_recipe": row(
            "official_recipe",
            weights_dtype="bfloat16",
            compute_dtype="bfloat16",
            **official_batching,
            store_dtype="float32",
            store_bytes_per_caption=official_bytes,
            batches=len(official_batches),
            padding_fraction_at_pack_size=pack_padding["official"],
        ),
        "official_recipe_in_our_dtype": row(
            "official_recipe_in_our_dtype", weights_dtype=str(weights)[6:], compute_dtype=dtype, **official_batching
        ),
        "ours": row(
            ours_name,
            weights_dtype=str(weights)[6:],
            compute_dtype=dtype,
            order="token length, longest first",
            max_tokens=cfg.max_tokens,
            max_batch=cfg.max_batch,
            padding="to each batch's longest",
            batches=len(plan[ours_setting]),
            padding_fraction_at_pack_size=pack_padding[ours_setting],
            store_dtype=cfg.store_dtype,
            store_bytes_per_caption=ours_bytes,
        ),
        "naive_fixed": row(
            "naive_fixed",
            compute_dtype=dtype,
            order="input",
            batch_size=OFFICIAL_BATCH,
            padding=f"to {fixed_length} tokens",
        ),
        "ratio_ours_vs_official": ratio(ours_name, "official_recipe"),
        "ratio_ours_vs_official_in_our_dtype": ratio(ours_name, "official_recipe_in_our_dtype"),
        "ratio_official_in_our_dtype_vs_official": ratio("official_recipe_in_our_dtype", "official_recipe"),
        "bucketed_vs_naive_fixed": ratio(ours_name, "naive_fixed"),
        "sweep": [
            {
                **row("bucketed_{}_{}".format(*same_as[s])),
                "variant": f"bucketed_{s[0]}_{s[1]}",
                "max_tokens": s[0],
                "max_batch": s[1],
                "batches": len(plan[s]),
                "padding_fraction_at_pack_size": pack_padding[s],
                "ratio_vs_official": ratio("bucketed_{}_{}".format(*same_as[s]), "official_recipe"),
                "ratio_vs_official_in_our_dtype": ratio(
                    "bucketed_{}_{}".format(*same_as[s]), "official_recipe_in_our_dtype"
                ),
                **({"same_batches_as": list(same_as[s])} if same_as[s] != s else {}),
            }
            for s in settings
        ],
        "cache_bytes_per_caption": {"official_fp32": official_bytes, f"ours_{cfg.store_dtype}": ours_bytes},
        "pack_size": cfg.pack_size,
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "notes": [],
    }
    # ranked by the per-round ratio to the official recipe: load that slows a whole round cancels out
    out["sweep_best"] = max(out["sweep"], key=lambda r: r["ratio_vs_official"]["median"])["variant"]
    noisy = {v: max(s) / min(s) - 1 for v, s in seconds.items() if max(s) / min(s) - 1 > NOISY_SPREAD}
    if noisy:
        worst = max(noisy, key=noisy.get)
        out["notes"].append(
            f"rounds of {len(noisy)} variant(s) differ by more than {NOISY_SPREAD:.0%} (up to {noisy[worst]:.0%}, "
            f"{worst}): this machine is shared ({os.cpu_count()} CPUs, 1-min load average {load_before[0]:.1f} "
            f"before, {load_after[0]:.1f} after); compare the per-round ratios, not single rates"
        )
    return out


@contextlib.contextmanager
def _s3_for_benchmark() -> Iterator[str]:
    """The configured S3 endpoint, or a moto server on 127.0.0.1 (dev extra) for the duration."""
    if os.environ.get("MINIO_ENDPOINT"):
        yield os.environ.get("LLM2CLIP_BENCH_BUCKET", "s3://llm2clip-bench/stream")
        return
    import logging
    import socket

    from minio import Minio
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"MINIO_ENDPOINT": f"127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        Minio(env["MINIO_ENDPOINT"], "bench", "bench", secure=False).make_bucket("llm2clip-bench")
        yield "s3://llm2clip-bench/stream"
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def streaming_benchmark(num_images: int, image_size: int) -> dict:
    """Read (and decode) the same canonical shards from local disk and from the S3 server."""
    cfg = prepare_data.PrepareDataConfig(num_train=num_images, num_eval=8, image_size=image_size, shard_size=200)
    out = {}
    with tempfile.TemporaryDirectory() as tmp, _s3_for_benchmark() as s3:
        for where, root in (("local", tmp), ("s3", s3)):
            prepare_data.prepare_data(cfg, root)
            split = storage.join(root, "train")
            nbytes = sum(len(storage.read_bytes(f)) for f in storage.list_files(split, ".tar"))
            t0 = time.perf_counter()
            count = sum(1 for _ in data.read_split(split))
            seconds = time.perf_counter() - t0
            out[where] = {
                "images": count,
                "seconds": seconds,
                "images_per_s": count / seconds,
                "MB_per_s": nbytes / seconds / 1e6,
            }
            print(f"  stream {where:<6} {count / seconds:8.1f} images/s {nbytes / seconds / 1e6:7.2f} MB/s", flush=True)
    out["s3_vs_local"] = out["s3"]["images_per_s"] / out["local"]["images_per_s"]
    return out


# ----------------------------------------------------------------------------------------------- stage 2

PARTS = ("caching", "streaming", "stage2", "memory", "gpu")
MEMORY_SCALE = 10  # the larger training set of the memory benchmark has this many times the images
MEMORY_TARGET_RATIO = 1.3  # peak RSS at MEMORY_SCALE x the images over peak RSS at 1x: memory must not grow with data
SHARD_SIZE = 100  # images per shard of the benchmark's datasets (the 10x set: 50 shards)


@dataclass(frozen=True)
class Stage2BenchConfig:
    """Sizes of the stage-2 and memory benchmarks; the defaults take a few minutes on a 2-core CPU."""

    images: int = 500  # the 1x training set (the memory benchmark also trains on MEMORY_SCALE x this)
    image_size: int = 64
    model: str = clip_model.DEFAULT_MODEL  # the vision tower (open_clip config name)
    epochs: int = 2  # of the stage-2 run; the memory runs train 1 epoch
    batch_size: int = 64
    workers: int | None = None  # train_clip's DataLoader processes; None: train_clip's own default
    llm: str = text_encoder.SMOLLM2  # the frozen LLM the online variant runs
    online_batch: int = 32  # batch of the cached-vs-online steps
    online_rounds: int = 3
    online_steps: int = 2  # steps of each variant per round
    device: str = "cpu"

    def __post_init__(self) -> None:
        check = artifacts.check
        check(self.images >= 2 * self.batch_size, "images", self.images, f"needs >= 2 batches ({2 * self.batch_size})")
        check(16 <= self.image_size <= 1024, "image_size", self.image_size, "must be in [16, 1024]")
        check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        check(self.batch_size >= 2, "batch_size", self.batch_size, "needs >= 2 for in-batch negatives")
        check(self.workers is None or self.workers >= 0, "workers", self.workers, "must be >= 0 or None")
        check(self.online_batch >= 2, "online_batch", self.online_batch, "needs >= 2 for in-batch negatives")
        check(self.online_rounds >= 1, "online_rounds", self.online_rounds, "must be >= 1")
        check(self.online_steps >= 1, "online_steps", self.online_steps, "must be >= 1")
        check(self.device in ("cpu", "cuda"), "device", self.device, "must be 'cpu' or 'cuda'")


def copied_dataset(dataset_dir: str, copies: int, out_dir: str, image_size: int) -> str:
    """A prepared dataset whose train split is `copies` copies of `dataset_dir`'s (keys suffixed `-copyN`), so
    `copies` times the images with the same captions. Written as a canonical-layout source and run through
    prepare_data like any source; no eval sets (training does not read them)."""
    source = out_dir + "-source"
    shards = storage.list_files(storage.join(dataset_dir, "train"), ".tar")

    def records() -> Iterator[dict]:
        for c in range(copies):
            for shard in shards:
                for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False):
                    yield {**sample, "__key__": f"{sample['__key__']}-copy{c}"}

    data.write_split(records(), storage.join(source, "train"), SHARD_SIZE)
    prepare_data.prepare_data(
        prepare_data.PrepareDataConfig(source=source, image_size=image_size, shard_size=SHARD_SIZE), out_dir
    )
    return out_dir


def train_images(dataset_dir: str) -> int:
    return artifacts.read_manifest(dataset_dir, "prepare_data")["stats"]["train"]["kept"]


def stage2_inputs(root: str, bench: Stage2BenchConfig, scales: Sequence[int]) -> dict[int, tuple[str, list[str]]]:
    """{scale: (dataset dir, caption-embedding cache dirs)} under `root`, chained as the pipeline does. Scale 1: a
    synthetic set of `bench.images` images; scale k: its train images copied k times (`copied_dataset`). One tiny
    Llama, LoRA-tuned for two steps, embeds both: its content-addressed store embeds each distinct caption once, so
    the copies cost no LLM passes (the embeddings' values do not matter here, only their width and count)."""
    base = os.path.join(root, "data-1x")
    cfg = prepare_data.PrepareDataConfig(
        num_train=bench.images, num_eval=8, image_size=bench.image_size, shard_size=SHARD_SIZE
    )
    prepare_data.prepare_data(cfg, base)
    lora = os.path.join(root, "text_lora")
    tune_cfg = tune_caption_encoder.TuneConfig(
        llm=text_encoder.TINY_LLAMA, steps=2, batch_size=4, lora_r=4, warmup_steps=0, device="cpu"
    )
    tune_caption_encoder.tune_caption_encoder(tune_cfg, base, lora)
    cache_cfg = CacheConfig(store_root=os.path.join(root, "embedding-store"), device="cpu")
    out = {}
    for k in sorted(set(scales)):
        dataset = base if k == 1 else copied_dataset(base, k, os.path.join(root, f"data-{k}x"), bench.image_size)
        cache = os.path.join(root, f"caption_embeddings-{k}x")
        cache_caption_embeddings.cache_caption_embeddings(cache_cfg, dataset, lora, cache)
        out[k] = (dataset, [cache])
    return out


def train_fields(bench: Stage2BenchConfig, epochs: int) -> dict:
    """TrainClipConfig fields for a benchmark run."""
    return {
        "model": bench.model,
        "epochs": epochs,
        "batch_size": bench.batch_size,
        "device": bench.device,
        **({} if bench.workers is None else {"workers": bench.workers}),
    }


def stage2_training(dataset: str, caches: list[str], out_dir: str, bench: Stage2BenchConfig) -> dict:
    """One `train_clip.train_clip` run in this process; its own images/s and data-wait share."""
    fields = train_fields(bench, bench.epochs)
    if bench.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    metrics = train_clip.train_clip(train_clip.TrainClipConfig(**fields), dataset, out_dir, caches)
    compute = artifacts.read_manifest(out_dir, "train_clip")["compute"]
    return {
        "images_per_s": metrics["images_per_s"],
        "data_wait_share": metrics["data_wait_share"],
        "images": train_images(dataset),
        "epochs": bench.epochs,
        "batch_size": bench.batch_size,
        "model": bench.model,
        "image_size": bench.image_size,
        "workers": compute["data_workers"],
        "compute": compute,
        "gpu_peak_mb": metrics.get("gpu_peak_mb"),
        "metrics": metrics,
    }


def cached_vs_online(bench: Stage2BenchConfig) -> dict:
    """Seconds per stage-2 step with cached caption embeddings vs the same step with the embeddings made by running
    the frozen LLM on the batch's captions first (tokenize + forward under no_grad, length-batched at the cache
    stage's token budget). Same tower, images [B, 3, S, S], captions and optimizer; variants interleaved per round
    (cached, online, cached, online, ...); the ratio online/cached is taken per round."""
    # ---- setup: the LLM as the cache stage loads it, a stage-2 model as train_clip builds it (random init)
    device, dtype = devices.setup(bench.device, "auto")
    weights = getattr(torch, dtype) if device.type == "cuda" else torch.float32
    encoder = text_encoder.load_caption_encoder(bench.llm, dtype=weights, device=device)
    encoder.model.eval().requires_grad_(False)
    torch.manual_seed(0)
    model = clip_model.LLM2CLIP(bench.model, None, encoder.dim).to(device).train()
    preprocess = loading.preprocess_of(model)
    size = loading.image_size_of(bench.model)
    batch = bench.online_batch
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    captions = caption_mix(batch)
    max_tokens, max_batch = cache_caption_embeddings.default_token_budget(device.type)
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(clip_model.param_groups(model, 1e-4, 0.05, 1.0))

    @torch.no_grad()
    def llm_embeddings() -> torch.Tensor:  # [B, D] fp32 on the device
        with devices.autocast(device, dtype):
            return text_encoder.embed_by_length(encoder, captions, max_tokens, max_batch)[0]

    cached = llm_embeddings().to(torch.float16)  # as the cache stores them

    def step(texts: torch.Tensor) -> None:
        loss = train_clip.loss_step(model, loss_fn, images, texts, dtype, preprocess)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_clip.TrainClipConfig.grad_clip)
        optimizer.step()
        clip_model.clamp_logit_scale(model)
        loss.item()  # waits for the device

    variants: dict[str, Callable[[], None]] = {"cached": lambda: step(cached), "online": lambda: step(llm_embeddings())}

    # ---- warm-up, then rounds: each variant `online_steps` steps per round
    for fn in variants.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(bench.online_rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(bench.online_steps):
                fn()
            seconds[name].append((time.perf_counter() - t0) / bench.online_steps)
        print(
            f"  round {r + 1}/{bench.online_rounds} step cached {seconds['cached'][-1]:.3f} s, online "
            f"{seconds['online'][-1]:.3f} s",
            flush=True,
        )
    per_round = list(zip(seconds["cached"], seconds["online"], strict=True))
    return {
        "speedup": spread([o / c for c, o in per_round]),
        "llm_share_of_online_step": spread([(o - c) / o for c, o in per_round]),
        "llm": bench.llm,
        "model": bench.model,
        "image_size": size,
        "batch": batch,
        "caption_tokens_per_batch": sum(text_encoder.token_lengths(encoder, captions)),
        "compute": devices.describe(device, dtype),
        "rounds": bench.online_rounds,
        "steps_per_round": bench.online_steps,
        "step_seconds": seconds,
        "note": "the ratio grows with the LLM's cost over the tower's: the paper's 4.2x pairs an 8B LLM with "
        "EVA02-L/14-336 (see the GPU suite's derived ratio for ViT-L-14 and an 8B-shaped Llama)",
    }


# ----------------------------------------------------------------------------------------------- memory


def train_command(dataset: str, caches: list[str], out_dir: str, fields: dict) -> list[str]:
    """`python -m llm2clip.train_clip --dataset D --output O --caption-embeddings C ... --kebab-field V ...`."""
    cmd = [sys.executable, "-m", "llm2clip.train_clip", "--dataset", dataset, "--output", out_dir]
    for c in caches:
        cmd += ["--caption-embeddings", c]
    for k, v in fields.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    return cmd


def tree_pss_mb(pid: int) -> float | None:
    """Proportional set size (MB) of a process and all its descendants: pages shared between processes (forked
    DataLoader workers) are split between them, so the sum is the memory the tree really holds. None without
    /proc (not Linux)."""
    total_kb, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):  # gone meanwhile, or no /proc
            continue
    return total_kb / 1024 if total_kb else None


# Runs a command as its child and writes the child's rusage to a file. Linux carries a process's peak RSS across
# exec from the memory it was forked with, so a command started straight from this (large) process would report at
# least this process's RSS as its own peak; started from this small launcher, it starts from the launcher's ~10 MB.
_LAUNCHER = (
    "import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(p.pid, 0); "
    "code = os.waitstatus_to_exitcode(status); "
    "open(sys.argv[1], 'w').write(json.dumps({'exit': code, 'maxrss_kb': usage.ru_maxrss})); sys.exit(code)"
)


def peak_rss_of_training(cmd: list[str], log_path: str, sample_every_s: float = 0.2) -> dict:
    """Run `cmd` to completion in a fresh process tree; its peak RSS from the kernel (wait4's ru_maxrss: the
    largest of the process and its reaped children, i.e. the training process or one DataLoader worker) and the
    peak PSS of the whole tree, sampled every `sample_every_s` seconds."""
    t0 = time.perf_counter()
    peak_pss = 0.0
    usage_path = log_path + ".rusage.json"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, usage_path, *cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        while proc.poll() is None:
            peak_pss = max(peak_pss, tree_pss_mb(proc.pid) or 0.0)
            time.sleep(sample_every_s)
    if proc.returncode:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"stage-2 training failed (exit {proc.returncode}): {' '.join(cmd[:4])} ...\n{tail}")
    usage = json.loads(Path(usage_path).read_text())
    return {
        "peak_rss_mb": usage["maxrss_kb"] / 1024,
        "tree_pss_mb_peak_sampled": peak_pss or None,
        "seconds": time.perf_counter() - t0,
    }


def memory_benchmark(inputs: dict[int, tuple[str, list[str]]], root: str, bench: Stage2BenchConfig) -> dict:
    """Peak RSS of stage-2 training (1 epoch, same batch and workers) in a fresh process on the 1x and the
    MEMORY_SCALE x dataset."""
    fields = train_fields(bench, epochs=1)
    runs = {}
    for k in (1, MEMORY_SCALE):
        dataset, caches = inputs[k]
        out_dir = os.path.join(root, f"memory-{k}x")
        cmd = train_command(dataset, caches, out_dir, fields)
        run = peak_rss_of_training(cmd, out_dir + ".log")
        metrics = artifacts.read_manifest(out_dir, "train_clip")["metrics"]
        run.update(
            images=train_images(dataset),
            steps=metrics.get("steps"),
            metrics={
                m: metrics.get(m)
                for m in ("peak_rss_mb", "workers_peak_rss_mb", "gpu_peak_mb", "images_per_s", "data_wait_share")
            },
        )
        runs[f"{k}x"] = run
        print(f"  memory {k:>2}x: {run['images']} images, peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
    small, large = runs["1x"], runs[f"{MEMORY_SCALE}x"]
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    out = {
        "rss_mb_1x": small["peak_rss_mb"],
        f"rss_mb_{MEMORY_SCALE}x": large["peak_rss_mb"],
        f"ratio_{MEMORY_SCALE}x_vs_1x": ratio,
        "target_ratio": MEMORY_TARGET_RATIO,
        "meets_target": ratio <= MEMORY_TARGET_RATIO,
        "images_1x": small["images"],
        f"images_{MEMORY_SCALE}x": large["images"],
        "measured_by": "wait4 ru_maxrss of a fresh training process (the largest single process: the trainer or "
        "a DataLoader worker); tree_pss_mb_peak_sampled adds up the whole process tree",
        "command": train_command("DATASET", ["CACHE"], "OUTPUT", fields),
        "runs": runs,
    }
    if bench.device == "cuda":
        out["gpu_peak_mb_1x"] = small["metrics"].get("gpu_peak_mb")
        out[f"gpu_peak_mb_{MEMORY_SCALE}x"] = large["metrics"].get("gpu_peak_mb")
    return out


# ----------------------------------------------------------------------------------------------- all of it


def default_parts(device: str) -> tuple[str, ...]:
    """Everything that runs on `device`: the GPU suite only on cuda."""
    return PARTS if device == "cuda" else tuple(p for p in PARTS if p != "gpu")


def run_benchmarks(
    llm: str,
    captions: int,
    naive_captions: int,
    fixed_length: int,
    stream_images: int,
    repeats: int = 3,
    sweep_max_tokens: Sequence[int] = DEFAULT_SWEEP_MAX_TOKENS,
    sweep_max_batch: Sequence[int] = DEFAULT_SWEEP_MAX_BATCH,
    streaming: bool = True,
    *,
    parts: Sequence[str] | None = None,
    stage2: Stage2BenchConfig | None = None,
    gpu_smoke: bool = False,
    gpu_time_limit_s: float = 280.0,
    save: Callable[[dict], None] | None = None,
) -> dict:
    """The benchmarks named in `parts` (default: `default_parts` of the stage-2 device); `save` is called with the
    results so far after each part, so a later failure keeps the earlier numbers."""
    stage2 = stage2 or Stage2BenchConfig(llm=llm)
    parts = [p for p in (parts or default_parts(stage2.device)) if streaming or p != "streaming"]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"parts={unknown}: unknown (known: {PARTS})")
    out: dict = {
        "parts": parts,
        "device": stage2.device,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": devices.cpu_name(),
            "cuda": torch.cuda.is_available(),
            "load_average_1min": os.getloadavg()[0],
        },
    }

    def done(name: str, result: dict) -> None:
        out[name] = result
        if save is not None:
            save(out)

    if "gpu" in parts:  # first: the scarce device time goes to the suite that needs it
        from llm2clip.benchmarks import gpu as gpu_benchmark

        print("GPU suite:", flush=True)
        done("gpu", gpu_benchmark.run_gpu_suite(stage2.device, smoke=gpu_smoke, time_limit_s=gpu_time_limit_s))
    if "caching" in parts:
        print("caption caching:", flush=True)
        done(
            "caching",
            caching_benchmark(llm, captions, naive_captions, fixed_length, repeats, sweep_max_tokens, sweep_max_batch),
        )
    if "streaming" in parts:
        print("shard streaming:", flush=True)
        done("streaming", streaming_benchmark(stream_images, 64))
    if "stage2" in parts or "memory" in parts:
        with tempfile.TemporaryDirectory(prefix="llm2clip-bench-") as root:
            print("stage-2 inputs (prepare, tune a tiny Llama, cache):", flush=True)
            inputs = stage2_inputs(root, stage2, [1, MEMORY_SCALE] if "memory" in parts else [1])
            if "stage2" in parts:
                print("stage-2 training:", flush=True)
                training = stage2_training(*inputs[1], os.path.join(root, "stage2"), stage2)
                print("stage-2 step, cached vs online LLM:", flush=True)
                online = cached_vs_online(stage2)
                done(
                    "stage2",
                    {
                        "images_per_s": training["images_per_s"],
                        "data_wait_share": training["data_wait_share"],
                        "cached_vs_online_speedup": online["speedup"]["median"],
                        "training": training,
                        "cached_vs_online": online,
                    },
                )
            if "memory" in parts:
                print("stage-2 memory:", flush=True)
                done("memory", memory_benchmark(inputs, root, stage2))
    return out
