"""cache_caption_embeddings: run the frozen (tuned) LLM once over every caption; fp16 safetensors per shard.

Layout of one cache output (one shard group):
    <split path>/<shard>.safetensors   {sample key: [n_captions, D] fp16}, rows in data.caption_list order
    manifest.json                      model + adapter fingerprints, pooling, max length, dim, dtype, counts
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from llm2clip import artifacts, data, storage, text_encoder


@dataclass(frozen=True)
class CacheConfig:
    """Which adapter to apply, which shards this task owns, and how captions are batched."""

    use_adapter: bool = True  # False: embed with the raw (not tuned) base LLM, for the raw-LLM baseline
    group_index: int = 0
    num_groups: int = 1
    max_tokens: int = 8192  # padded tokens per batch (length-sorted batches)
    max_batch: int = 256
    dtype: str = "bfloat16"  # compute dtype
    store_dtype: str = "float16"

    def __post_init__(self) -> None:
        check = artifacts.check
        check(self.num_groups >= 1, "num_groups", self.num_groups, "must be >= 1")
        check(
            0 <= self.group_index < self.num_groups,
            "group_index",
            self.group_index,
            "must be in [0, num_groups)",
        )
        check(self.max_tokens >= 64, "max_tokens", self.max_tokens, "must be >= 64")
        check(self.max_batch >= 1, "max_batch", self.max_batch, "must be >= 1")
        check(self.dtype in ("float32", "bfloat16", "float16"), "dtype", self.dtype, "unknown dtype")
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
    """What the embeddings depend on; two caches agree only when these agree."""
    tuned = artifacts.read_manifest(text_lora_dir, "tune_caption_encoder")
    cfg = tuned["config"]
    return {
        "base_model": tuned["base_model"],
        "base_fingerprint": tuned["base_fingerprint"],
        "adapter_fingerprint": tuned["adapter_fingerprint"] if use_adapter else None,
        "bidirectional": cfg["bidirectional"],
        "pooling": tuned["pooling"],
        "max_length": cfg["max_length"],
    }


def cache_caption_embeddings(cfg: CacheConfig, dataset_dir: str, text_lora_dir: str, out_dir: str) -> dict:
    """Embed every caption of this task's shard group; returns counts and throughput."""
    t0 = time.time()
    identity = encoder_identity(text_lora_dir, cfg.use_adapter)
    mine = all_shards(dataset_dir)[cfg.group_index :: cfg.num_groups]

    # ---- captions of the owned shards, flattened
    texts: list[str] = []
    rows: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)  # shard -> [(key, n captions)]
    for split_path, shard in mine:
        path = storage.join(dataset_dir, split_path, shard)
        for _, key, meta in data.read_captions_of_shard(path):
            caps = [t for _, t in data.caption_list(meta)]
            rows[(split_path, shard)].append((key, len(caps)))
            texts += caps

    # ---- embed once, batched by length
    encoder = text_encoder.load_caption_encoder(
        identity["base_model"], bidirectional=identity["bidirectional"], max_length=identity["max_length"]
    )
    if cfg.use_adapter:
        text_encoder.load_lora(encoder, storage.local_path(storage.join(text_lora_dir, "adapter")))
    t_embed = time.time()
    emb, padded_tokens = text_encoder.encode_all(encoder, texts, cfg.dtype, cfg.max_tokens, cfg.max_batch)
    embed_seconds = time.time() - t_embed
    emb = emb.to(getattr(torch, cfg.store_dtype))

    # ---- write one safetensors file per shard
    offset = 0
    for (split_path, shard), keyed in rows.items():
        tensors = {}
        for key, n in keyed:
            tensors[key] = emb[offset : offset + n].clone()
            offset += n
        with storage.open_write(storage.join(out_dir, split_path, shard.replace(".tar", ".safetensors"))) as f:
            f.write(_serialize(tensors))
    seconds = time.time() - t0
    metrics = {
        "captions": len(texts),
        "shards": len(mine),
        "padded_tokens": padded_tokens,
        "embed_seconds": embed_seconds,
        "captions_per_s": len(texts) / max(embed_seconds, 1e-9),
        "seconds": seconds,
    }
    artifacts.write_manifest(
        out_dir,
        "cache_caption_embeddings",
        cfg,
        {"dataset": dataset_dir, "text_lora": text_lora_dir},
        encoder=identity,
        dim=encoder.dim,
        dtype=cfg.store_dtype,
        count=len(texts),
        shards=[f"{p}/{s}" for p, s in mine],
        metrics=metrics,
        timings_s={"cache_caption_embeddings": seconds},
    )
    return metrics


def _serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors, metadata={"format": "pt"})


def load_embeddings(cache_dirs: list[str], split: str) -> tuple[dict[str, torch.Tensor], dict]:
    """{sample key: [n_captions, D]} for one split across shard groups; the groups must share one encoder."""
    identity, dim, out = None, None, {}
    for d in cache_dirs:
        manifest = artifacts.read_manifest(d, "cache_caption_embeddings")
        if identity is None:
            identity, dim = manifest["encoder"], manifest["dim"]
        elif manifest["encoder"] != identity or manifest["dim"] != dim:
            raise ValueError(f"cache {d} was made by another encoder than {cache_dirs[0]}: {manifest['encoder']}")
        for f in storage.listdir(storage.join(d, data.split_path(split)), ".safetensors"):
            out.update(load_file(storage.local_path(f)))
    if identity is None:
        raise ValueError("no caption-embedding cache given")
    return out, {"encoder": identity, "dim": dim}
