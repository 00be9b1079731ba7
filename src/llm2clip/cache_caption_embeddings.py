"""cache_caption_embeddings: run the frozen (tuned) LLM once over every caption; fp16 safetensors per shard.

Embeddings are content-addressed: an entry's address is the encoder fingerprint (base model and adapter weights,
pooling, max length, attention, dtypes) plus the caption text, so a caption already embedded by the same encoder
is never embedded again, across runs and tasks. The store under `<root>/<encoder key>/`:
    packs/<uuid>.safetensors    {caption sha256: [D]}     written first
    packs/<uuid>.keys.json      the pack's caption hashes  written last: a pack without it does not exist
Each task writes its own packs (parallel tasks never touch each other's files): one every `pack_size` new
embeddings and one with the rest at the end of each shard, so a task killed midway loses at most one pack.

A task streams its shard group: read one shard's captions, look them up, embed the misses, write the shard's
file, free, next shard; memory holds one shard, whatever the group's size. The groups are balanced by the tokens
the LLM will run over (`shard_groups`), not by shard count. A restarted task skips every shard whose file exists:
files are written atomically (`storage.open_write`), so one that exists is complete.

Layout of one stage output (one shard group), what training reads:
    <split path>/<shard>.safetensors   {sample key: [n_captions, D] fp16}, rows in data.caption_list order;
                                       its metadata names the store key of the encoder that wrote it
    manifest.json                      written last: model + adapter fingerprints, pooling, max length, dim, dtype,
                                       counts, and per shard its samples, captions and tokens
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import resource
import struct
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load, save

from llm2clip import artifacts, data, devices, monitoring, storage, text_encoder

ATTENTION = ("as_tuned", "causal", "bidirectional")
T = TypeVar("T")


def default_token_budget(device: str = "auto") -> tuple[int, int]:
    """(max_tokens, max_batch) per length-sorted batch for the device the cache runs on. CPU: chosen by measurement
    (`llm2clip benchmark` sweep, README "Benchmarks"): 2,048-token batches had the best median speed-up over the
    official recipe; 8,192 padded the most and was the slowest setting. GPU: reasoned, not measured: a few thousand
    tokens per batch keep an H100's matmuls busy (batch 32 of short captions starves it) and 8,192 tokens of an 8B
    model's activations fit easily. "auto" is resolved where the config is built (the cache task's machine)."""
    return (8192, 256) if devices.resolve_device(device).type == "cuda" else (2048, 256)


@dataclass(frozen=True)
class CacheConfig:
    """Which adapter to apply, which shards this task owns (group `group_index` of `num_groups` token-balanced
    groups, see `shard_groups`), and how captions are batched."""

    use_adapter: bool = True  # False: embed with the raw (not tuned) base LLM, for the raw-LLM baseline
    # "as_tuned": the attention stage 1 tuned with; "causal": the LLM as it is (the paper's raw-LLM baseline);
    # "bidirectional": the causal mask removed
    attention: str = "as_tuned"
    group_index: int = 0
    num_groups: int = 1
    # padded tokens and captions per length-sorted batch; default per device (of "auto"), see default_token_budget
    max_tokens: int = field(default_factory=lambda: default_token_budget()[0])
    max_batch: int = field(default_factory=lambda: default_token_budget()[1])
    device: str = "auto"  # cuda if available, else cpu
    dtype: str = "auto"  # compute dtype; auto = bf16 on GPU / CPUs with native bf16, else fp32 (recorded in the key)
    store_dtype: str = "float16"
    # new embeddings per pack written to the content-addressed store (and one smaller pack per shard for the rest):
    # the most a killed task loses
    pack_size: int = 2048
    store_root: str | None = None  # default: $LLM2CLIP_STORE/embedding-cache, else the local model cache
    allow_hub: bool = False  # True: the cluster reaches a hub, so a hub-id base LLM is downloaded (see model_sources)

    def __post_init__(self) -> None:
        check = artifacts.check
        check(self.attention in ATTENTION, "attention", self.attention, f"must be one of {ATTENTION}")
        check(self.num_groups >= 1, "num_groups", self.num_groups, "must be >= 1")
        check(
            0 <= self.group_index < self.num_groups,
            "group_index",
            self.group_index,
            "must be in [0, num_groups)",
        )
        check(self.max_tokens >= 64, "max_tokens", self.max_tokens, "must be >= 64")
        check(self.max_batch >= 1, "max_batch", self.max_batch, "must be >= 1")
        check(self.pack_size >= 1, "pack_size", self.pack_size, "must be >= 1")
        check(self.device in devices.DEVICES, "device", self.device, f"must be one of {devices.DEVICES}")
        check(self.dtype in devices.DTYPES, "dtype", self.dtype, f"must be one of {devices.DTYPES}")
        check(
            self.store_dtype in ("float32", "float16", "bfloat16"),
            "store_dtype",
            self.store_dtype,
            "unknown dtype",
        )


def all_shards(dataset_dir: str) -> list[tuple[str, str]]:
    """(split path, shard file) for every shard of the prepared dataset, in a stable order."""
    manifest = artifacts.read_manifest(dataset_dir, "prepare_data")
    out = []
    for split in sorted(manifest["splits"]):
        path = manifest["splits"][split]["path"]
        out += [(path, Path(s).name) for s in storage.listdir(storage.join(dataset_dir, path), ".tar")]
    return out


def encoder_identity(text_lora_dir: str, use_adapter: bool) -> dict:
    """What the embeddings depend on; two caches agree only when these agree. The pooling rule and the instruction
    prefix are part of it: a different instruction (or an older pooling rule) is a different cache.

    With the adapter of a stage 1 that put query instructions before its queries, `query_instructions` records
    them ({"short_to_long", "long_to_short"}): the cache embeds every caption without them, as a document (only
    `instruction` goes before it), and says so. Absent otherwise, so the addresses of other caches stay as they
    were."""
    tuned = artifacts.read_manifest(text_lora_dir, "tune_caption_encoder")
    cfg = tuned["config"]
    identity = {
        "base_model": tuned["base_model"],
        "base_fingerprint": tuned["base_fingerprint"],
        "adapter_fingerprint": tuned["adapter_fingerprint"] if use_adapter else None,
        "bidirectional": cfg["bidirectional"],
        "pooling": tuned["pooling"],
        "instruction": cfg.get("instruction", ""),  # manifests before the instruction field had none
        "max_length": cfg["max_length"],
    }
    if use_adapter and tuned.get("query_instructions"):
        identity["query_instructions"] = tuned["query_instructions"]
    return identity


def base_encoder(
    identity: dict, device: torch.device, dtype: str, allow_hub: bool = False
) -> text_encoder.CaptionEncoder:
    """The base LLM (no adapter) set up as an encoder identity says: attention, max length, instruction. On a GPU
    the weights are stored in the compute dtype (an 8B model: 16 GB, not 32); on a CPU they stay fp32 and autocast
    casts per op."""
    return text_encoder.load_caption_encoder(
        identity["base_model"],
        bidirectional=identity["bidirectional"],
        max_length=identity["max_length"],
        instruction=identity.get("instruction", ""),
        dtype=getattr(torch, dtype) if device.type == "cuda" else torch.float32,
        device=device,
        allow_hub=allow_hub,
    )


def caption_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_store_root() -> str:
    store = os.environ.get(artifacts.STORE_ENV)
    return storage.join(store, "embedding-cache") if store else str(text_encoder.cache_root() / "embedding-cache")


class EmbeddingStore:
    """Content-addressed caption embeddings of one encoder: caption hash -> [D] vector, in immutable packs."""

    def __init__(self, root: str, identity: dict) -> None:
        self.identity = identity
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
        self.packs = storage.join(root, self.key, "packs")
        self.index: dict[str, str] = {}  # caption hash -> pack URI
        for keys_file in storage.list_files(self.packs, ".keys.json"):
            pack = keys_file.removesuffix(".keys.json") + ".safetensors"
            for h in storage.read_json(keys_file)["keys"]:
                self.index.setdefault(h, pack)

    def add(self, vectors: dict[str, torch.Tensor]) -> None:
        """Write one pack; the keys file goes last, so readers never see a partial pack."""
        name = uuid.uuid4().hex
        storage.write_bytes(storage.join(self.packs, f"{name}.safetensors"), _serialize(vectors))
        storage.write_json(
            storage.join(self.packs, f"{name}.keys.json"), {"keys": sorted(vectors), "encoder": self.identity}
        )
        self.index.update({h: storage.join(self.packs, f"{name}.safetensors") for h in vectors})

    def get(self, hashes: set[str]) -> dict[str, torch.Tensor]:
        by_pack: dict[str, list[str]] = defaultdict(list)
        for h in hashes:
            by_pack[self.index[h]].append(h)
        out = {}
        for pack, wanted in by_pack.items():
            tensors = load(storage.read_bytes(pack))
            out.update({h: tensors[h] for h in wanted})
        return out


# ----------------------------------------------------------------------------------------------- shard groups


def shard_token_costs(dataset_dir: str, identity: dict, allow_hub: bool = False) -> list[tuple[tuple[str, str], int]]:
    """((split path, shard file), tokens) for every shard of `all_shards`: the tokens the encoder runs over, as
    `text_encoder.token_lengths` counts them (instruction and special tokens included, each caption capped at
    max_length). Only the base model's tokenizer is loaded, never its weights. Reads every shard's captions (the
    tar is streamed, images are not decoded), one shard at a time."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_encoder.resolve_model_dir(identity["base_model"], allow_hub))
    out = []
    for split_path, shard in all_shards(dataset_dir):
        texts = [
            identity["instruction"] + text
            for _, _, meta in data.read_captions_of_shard(storage.join(dataset_dir, split_path, shard))
            for _, text in data.caption_list(meta)
        ]
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
        out.append(((split_path, shard), sum(min(len(x), identity["max_length"]) for x in ids)))
    return out


def shard_groups(shard_costs: Sequence[tuple[T, int]], num_groups: int) -> list[list[T]]:
    """Partition shards into `num_groups` groups of near-equal total cost, deterministically (every task computes
    the same groups): greedy longest-processing-time, the costliest shard first, each to the least-loaded group,
    ties to the earlier shard and the lower group. The costliest group is at most 4/3 of the best possible
    (Graham, 1969). Each group keeps its shards in input order; with more groups than shards some stay empty."""
    order = sorted(range(len(shard_costs)), key=lambda i: (-shard_costs[i][1], i))
    loads = [(0, g) for g in range(num_groups)]  # a heap of (total cost, group index)
    members: list[list[int]] = [[] for _ in range(num_groups)]
    for i in order:
        cost, g = heapq.heappop(loads)
        members[g].append(i)
        heapq.heappush(loads, (cost + shard_costs[i][1], g))
    return [[shard_costs[i][0] for i in sorted(m)] for m in members]


# ----------------------------------------------------------------------------------------------- the stage


def cache_caption_embeddings(cfg: CacheConfig, dataset_dir: str, text_lora_dir: str, out_dir: str) -> dict:
    """Embed every caption of this task's shard group, one shard at a time; returns counts and throughput.

    Restarted with the same config, it skips the shards whose file exists (from another encoder: a ValueError)
    and embeds only captions missing from the store. Metrics: `captions` of the whole group; `hits` (distinct
    captions per shard found in the store) and `misses` (captions embedded) of the shards done in this run;
    `skipped_shards` done by an earlier run; `peak_rss_mb` this process's peak resident memory. Observed through
    llm2clip.monitoring: one step per shard embedded (its hits, misses, tokens, read time as data wait)."""
    # the tuned and the raw LLM's fan-outs run at the same time: each task its own Pushgateway group
    variant = f"{'tuned' if cfg.use_adapter else 'raw'}-group-{cfg.group_index}-of-{cfg.num_groups}"
    with monitoring.stage("cache_caption_embeddings", variant, out_dir) as m:
        return _cache(cfg, dataset_dir, text_lora_dir, out_dir, m)


def _cache(cfg: CacheConfig, dataset_dir: str, text_lora_dir: str, out_dir: str, m: monitoring.StageMetrics) -> dict:
    t0 = time.time()
    identity = encoder_identity(text_lora_dir, cfg.use_adapter)
    if cfg.attention != "as_tuned":
        identity["bidirectional"] = cfg.attention == "bidirectional"
    device, dtype = devices.setup(cfg.device, cfg.dtype)
    store_dtype = getattr(torch, cfg.store_dtype)
    store = EmbeddingStore(
        cfg.store_root or default_store_root(), {**identity, "dtype": dtype, "store_dtype": cfg.store_dtype}
    )

    # ---- this task's shards: every task computes the same token-balanced partition
    costs = shard_token_costs(dataset_dir, identity, cfg.allow_hub)
    tokens = dict(costs)
    mine = shard_groups(costs, cfg.num_groups)[cfg.group_index]
    print(
        f"group {cfg.group_index}/{cfg.num_groups}: {len(mine)} of {len(costs)} shards, "
        f"{sum(tokens[s] for s in mine)} of {sum(tokens.values())} tokens",
        flush=True,
    )

    # ---- one shard at a time: look its captions up, embed the misses a pack at a time, write its file
    encoder = None  # loaded at the first miss: a rerun over a full store never loads the LLM
    shards: dict[str, dict] = {}
    hits = misses = padded_tokens = skipped = 0
    embed_seconds, dim = 0.0, None
    for n, (split_path, shard) in enumerate(mine, 1):
        out_file = storage.join(out_dir, split_path, shard.replace(".tar", ".safetensors"))
        done = _finished_shard(out_file, store.key)
        if done is not None:
            dim, skipped = done.pop("dim") or dim, skipped + 1
            shards[f"{split_path}/{shard}"] = {**done, "tokens": tokens[(split_path, shard)]}
            continue
        t_shard = time.perf_counter()
        captions = [
            (key, [text for _, text in data.caption_list(meta)])
            for _, key, meta in data.read_captions_of_shard(storage.join(dataset_dir, split_path, shard))
        ]
        texts = {caption_hash(t): t for _, caps in captions for t in caps}
        t_read = time.perf_counter()
        missing = sorted(h for h in texts if h not in store.index)
        vectors = store.get(set(texts) - set(missing))
        hits, misses = hits + len(vectors), misses + len(missing)
        print(
            f"shard {n}/{len(mine)} {split_path}/{shard}: {len(texts)} distinct captions, "
            f"{len(vectors)} cached, {len(missing)} to embed",
            flush=True,
        )
        if missing and encoder is None:
            print(f"device {device}, compute dtype {dtype}", flush=True)
            encoder = _load_encoder(identity, cfg.use_adapter, text_lora_dir, device, dtype, cfg.allow_hub)
        t_embed, padded_before = time.time(), padded_tokens
        for start in range(0, len(missing), cfg.pack_size):
            chunk = missing[start : start + cfg.pack_size]
            emb, padded = text_encoder.encode_all(
                encoder, [texts[h] for h in chunk], dtype, cfg.max_tokens, cfg.max_batch
            )
            new = {h: v.clone() for h, v in zip(chunk, emb.to(store_dtype), strict=True)}
            store.add(new)
            vectors.update(new)
            padded_tokens += padded
        embed_seconds += time.time() - t_embed
        tensors = {key: torch.stack([vectors[caption_hash(t)] for t in caps]) for key, caps in captions}
        storage.write_bytes(out_file, _serialize(tensors, encoder=store.key))
        n_captions = sum(len(caps) for _, caps in captions)
        shards[f"{split_path}/{shard}"] = {
            "samples": len(captions),
            "captions": n_captions,
            "tokens": tokens[(split_path, shard)],
        }
        dim = int(next(iter(tensors.values())).shape[-1]) if tensors else dim
        m.step(
            samples=len(missing),
            tokens=padded_tokens - padded_before,
            hits=len(texts) - len(missing),
            misses=len(missing),
            step_s=time.perf_counter() - t_shard,
            wait_s=t_read - t_shard,
        )
        del captions, texts, vectors, tensors  # the next shard starts from nothing

    # ---- the manifest, written last: its presence marks the group as complete
    seconds = time.time() - t0
    metrics = {
        "captions": sum(s["captions"] for s in shards.values()),
        "hits": hits,
        "misses": misses,
        "shards": len(mine),
        "skipped_shards": skipped,
        "padded_tokens": padded_tokens,
        "embed_seconds": embed_seconds,
        "embedded_per_s": misses / max(embed_seconds, 1e-9),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
    }
    artifacts.write_manifest(
        out_dir,
        "cache_caption_embeddings",
        cfg,
        {"dataset": dataset_dir, "text_lora": text_lora_dir},
        encoder=identity,
        compute=devices.describe(device, dtype),
        dim=dim,
        store=store.packs,
        dtype=cfg.store_dtype,
        count=metrics["captions"],
        tokens=sum(s["tokens"] for s in shards.values()),
        shards=shards,
        metrics=metrics,
        timings_s={"cache_caption_embeddings": seconds},
    )
    return metrics


def _load_encoder(
    identity: dict, use_adapter: bool, text_lora_dir: str, device: torch.device, dtype: str, allow_hub: bool
) -> text_encoder.CaptionEncoder:
    encoder = base_encoder(identity, device, dtype, allow_hub)
    if use_adapter:
        with storage.local_dir(storage.join(text_lora_dir, "adapter")) as adapter_dir:
            text_encoder.load_lora(encoder, adapter_dir)
    return encoder


def _serialize(tensors: dict[str, torch.Tensor], **metadata: str) -> bytes:
    return save(tensors, metadata={"format": "pt", **metadata})


def _header(uri: str) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, metadata), without reading its tensors."""
    with storage.open_read(uri) as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def _finished_shard(uri: str, store_key: str) -> dict | None:
    """{samples, captions, dim} of a shard file an earlier run wrote, or None if there is none. The file was
    written atomically, so it is complete; one written by another encoder is an error, never reused."""
    if not storage.exists(uri):
        return None
    header = _header(uri)
    written_by = header.pop("__metadata__", {}).get("encoder")
    if written_by != store_key:
        raise ValueError(
            f"{uri} holds embeddings of another encoder (store key {written_by}, this run's is {store_key}): "
            "write this run's cache to a fresh location"
        )
    shapes = [t["shape"] for t in header.values()]
    return {"samples": len(shapes), "captions": sum(s[0] for s in shapes), "dim": shapes[0][1] if shapes else None}


# ----------------------------------------------------------------------------------------------- reading


def cache_info(cache_dirs: list[str]) -> dict:
    """{"encoder", "dim", "count"} of shard-group caches that must share one encoder (else a ValueError)."""
    identity, dim, count = None, None, 0
    for d in cache_dirs:
        manifest = artifacts.read_manifest(d, "cache_caption_embeddings")
        if identity is None:
            identity, dim = manifest["encoder"], manifest["dim"]
        elif manifest["encoder"] != identity or manifest["dim"] != dim:
            other = manifest["encoder"]
            differ = sorted(k for k in identity.keys() | other.keys() if identity.get(k) != other.get(k))
            prints = [
                ", ".join(f"{k} {e.get(k)}" for k in ("base_fingerprint", "adapter_fingerprint"))
                for e in (identity, other)
            ]
            raise ValueError(
                f"caption-embedding caches of two encoders: {cache_dirs[0]} ({prints[0]}, dim {dim}) and {d} "
                f"({prints[1]}, dim {manifest['dim']}) differ in {differ or ['dim']}; stage 2 reads one embedding "
                "space: give the shard groups of one cache run (one LLM, one adapter or none)"
            )
        count += manifest["count"]
    if identity is None:
        raise ValueError("no caption-embedding cache given")
    return {"encoder": identity, "dim": dim, "count": count}


def load_embeddings(cache_dirs: list[str], split: str) -> tuple[dict[str, torch.Tensor], dict]:
    """{sample key: [n_captions, D]} for one split across shard groups, all in memory; the groups must share one
    encoder. For data larger than memory read shard by shard (`shard_embeddings`)."""
    info = cache_info(cache_dirs)
    out = {}
    for d in cache_dirs:
        for f in storage.listdir(storage.join(d, data.split_path(split)), ".safetensors"):
            out.update(load(storage.read_bytes(f)))
    return out, {"encoder": info["encoder"], "dim": info["dim"]}


def shard_embeddings(cache_dirs: list[str], split_path: str, shard_name: str) -> dict[str, torch.Tensor]:
    """{sample key: [n_captions, D]} of one data shard ("shard-000000.tar" or its stem) of the split stored under
    `split_path` ("train", "eval/<name>"), from whichever shard group holds it. Does not compare the groups'
    encoders: check that once with `cache_info`."""
    name = shard_name.removesuffix(".tar").removesuffix(".safetensors") + ".safetensors"
    for d in cache_dirs:
        uri = storage.join(d, split_path, name)
        if storage.exists(uri):
            return load(storage.read_bytes(uri))
    raise FileNotFoundError(f"shard {split_path}/{shard_name} has no cached embeddings in any of {cache_dirs}")


def embedding_mean(cache_dirs: list[str], split: str) -> tuple[torch.Tensor, int]:
    """(mean caption embedding, float32 [D]; number of captions) of one split, every caption row counted once,
    reading one shard file at a time (summed in float64)."""
    cache_info(cache_dirs)
    total, count = None, 0
    for d in cache_dirs:
        for f in storage.listdir(storage.join(d, data.split_path(split)), ".safetensors"):
            rows = list(load(storage.read_bytes(f)).values())
            if rows:
                part = torch.cat(rows).double().sum(0)
                total, count = part if total is None else total + part, count + sum(len(r) for r in rows)
    if total is None:
        raise ValueError(f"no cached caption embeddings of split {split!r} in {cache_dirs}")
    return (total / count).float(), count
