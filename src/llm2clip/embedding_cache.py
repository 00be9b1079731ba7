"""cache_caption_embeddings: run the frozen (tuned) LLM once over every caption; fp16 safetensors per shard.

Embeddings are content-addressed: an entry's address is the encoder fingerprint (base model and adapter weights,
pooling, max length, attention, dtypes) plus the caption text, so a caption already embedded by the same encoder
is never embedded again, across runs and tasks. The store under `<root>/<encoder key>/`:
    packs/<uuid>.safetensors    {caption sha256: [D]}     written first
    packs/<uuid>.keys.json      the pack's caption hashes  written last: a pack without it does not exist
Each task writes its own packs (parallel tasks never touch each other's files) every `pack_size` new captions,
so a task killed midway resumes from its last pack.

Layout of one stage output (one shard group), what training reads:
    <split path>/<shard>.safetensors   {sample key: [n_captions, D] fp16}, rows in data.caption_list order
    manifest.json                      model + adapter fingerprints, pooling, max length, dim, dtype, counts
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save

from llm2clip import artifacts, data, devices, storage, text_encoder

ATTENTION = ("as_tuned", "causal", "bidirectional")


def default_token_budget(device: str = "auto") -> tuple[int, int]:
    """(max_tokens, max_batch) per length-sorted batch for the device the cache runs on. CPU: chosen by measurement
    (`llm2clip benchmark` sweep, README "Benchmarks"): 2,048-token batches had the best median speed-up over the
    official recipe; 8,192 padded the most and was the slowest setting. GPU: reasoned, not measured: a few thousand
    tokens per batch keep an H100's matmuls busy (batch 32 of short captions starves it) and 8,192 tokens of an 8B
    model's activations fit easily. "auto" is resolved where the config is built (the cache task's machine)."""
    return (8192, 256) if devices.resolve_device(device).type == "cuda" else (2048, 256)


@dataclass(frozen=True)
class CacheConfig:
    """Which adapter to apply, which shards this task owns, and how captions are batched."""

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
    pack_size: int = 2048  # new embeddings per pack written to the content-addressed store
    store_root: str | None = None  # default: $LLM2CLIP_STORE/embedding-cache, else the local model cache

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
    prefix are part of it: a different instruction (or an older pooling rule) is a different cache."""
    tuned = artifacts.read_manifest(text_lora_dir, "tune_caption_encoder")
    cfg = tuned["config"]
    return {
        "base_model": tuned["base_model"],
        "base_fingerprint": tuned["base_fingerprint"],
        "adapter_fingerprint": tuned["adapter_fingerprint"] if use_adapter else None,
        "bidirectional": cfg["bidirectional"],
        "pooling": tuned["pooling"],
        "instruction": cfg.get("instruction", ""),  # manifests before the instruction field had none
        "max_length": cfg["max_length"],
    }


def base_encoder(identity: dict, device: torch.device, dtype: str) -> text_encoder.CaptionEncoder:
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
        storage.write_json(storage.join(self.packs, f"{name}.keys.json"),
                           {"keys": sorted(vectors), "encoder": self.identity})  # fmt: skip
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


def cache_caption_embeddings(cfg: CacheConfig, dataset_dir: str, text_lora_dir: str, out_dir: str) -> dict:
    """Embed every caption of this task's shard group; returns counts and throughput."""
    t0 = time.time()
    identity = encoder_identity(text_lora_dir, cfg.use_adapter)
    if cfg.attention != "as_tuned":
        identity["bidirectional"] = cfg.attention == "bidirectional"
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

    # ---- look every caption up in the content-addressed store; embed only the misses, a pack at a time
    device, dtype = devices.setup(cfg.device, cfg.dtype)
    store = EmbeddingStore(cfg.store_root or default_store_root(), {**identity, "dtype": dtype,
                                                                    "store_dtype": cfg.store_dtype})  # fmt: skip
    hashes = [caption_hash(t) for t in texts]
    missing = sorted({h: t for h, t in zip(hashes, texts, strict=True) if h not in store.index}.items())
    hits = len(set(hashes)) - len(missing)
    print(f"{len(texts)} captions, {len(set(hashes))} distinct: {hits} cached, {len(missing)} to embed", flush=True)
    padded_tokens, t_embed, dim = 0, time.time(), None
    if missing:
        print(f"device {device}, compute dtype {dtype}", flush=True)
        encoder = base_encoder(identity, device, dtype)
        if cfg.use_adapter:
            with storage.local_dir(storage.join(text_lora_dir, "adapter")) as adapter_dir:
                text_encoder.load_lora(encoder, adapter_dir)
        for start in range(0, len(missing), cfg.pack_size):
            chunk = missing[start : start + cfg.pack_size]
            emb, padded = text_encoder.encode_all(encoder, [t for _, t in chunk], dtype, cfg.max_tokens,
                                                  cfg.max_batch)  # fmt: skip
            store.add({h: v.to(getattr(torch, cfg.store_dtype)) for (h, _), v in zip(chunk, emb, strict=True)})
            padded_tokens += padded
    embed_seconds = time.time() - t_embed
    vectors = store.get(set(hashes))
    emb = torch.stack([vectors[h] for h in hashes]) if hashes else torch.empty(0)
    dim = int(emb.shape[-1]) if hashes else None

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
        "hits": hits,
        "misses": len(missing),
        "shards": len(mine),
        "padded_tokens": padded_tokens,
        "embed_seconds": embed_seconds,
        "embedded_per_s": len(missing) / max(embed_seconds, 1e-9),
        "seconds": seconds,
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
            out.update(load(storage.read_bytes(f)))
    if identity is None:
        raise ValueError("no caption-embedding cache given")
    return out, {"encoder": identity, "dim": dim}
