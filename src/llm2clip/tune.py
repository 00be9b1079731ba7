"""Stage 1, tune_caption_encoder: caption-contrastive LoRA tuning of an LLM (supervised SimCSE), with CRA."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from llm2clip import artifacts, data, devices, storage, text_encoder
from llm2clip.metrics import caption_retrieval_accuracy, info_nce


@dataclass(frozen=True)
class TuneConfig:
    """Stage-1 settings; defaults follow the LLM2CLIP code (LoRA r16/alpha32 on all projections, scale 50)."""

    llm: str = text_encoder.SMOLLM2
    bidirectional: bool = True
    max_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = text_encoder.LORA_TARGETS
    scale: float = 50.0
    hard_negatives: bool = True  # a caption of another image per row, as the official code adds
    steps: int = 40
    batch_size: int = 16  # images per step: 2 captions each (+ 1 hard negative)
    lr: float = 2e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    device: str = "auto"  # cuda if available, else cpu (llm2clip.devices)
    dtype: str = "auto"  # autocast dtype; auto = bf16 on GPU / CPUs with native bf16, else fp32. Pooling and loss: fp32
    merge: bool = False  # also save the base model with the adapter merged in
    cra_max_captions: int = 1000
    max_tokens: int = 1024  # padded tokens per forward chunk (length-sorted)
    log_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        check = artifacts.check
        check(self.max_length >= 8, "max_length", self.max_length, "must be >= 8")
        check(self.lora_r >= 1, "lora_r", self.lora_r, "must be >= 1")
        check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        check(len(self.lora_targets) > 0, "lora_targets", self.lora_targets, "needs at least one module name")
        check(self.scale > 0, "scale", self.scale, "must be > 0")
        check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        check(self.batch_size >= 2, "batch_size", self.batch_size, "needs >= 2 images for in-batch negatives")
        check(0 < self.lr < 1, "lr", self.lr, "must be in (0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.device in devices.DEVICES, "device", self.device, f"must be one of {devices.DEVICES}")
        check(self.dtype in devices.DTYPES, "dtype", self.dtype, f"must be one of {devices.DTYPES}")


def cra(encoder: text_encoder.CaptionEncoder, queries: list[str], pool: list[str], dtype: str) -> float:
    q, _ = text_encoder.encode_all(encoder, queries, dtype)
    p, _ = text_encoder.encode_all(encoder, pool, dtype)
    return caption_retrieval_accuracy(q, p)


def cra_pairs(dataset_dir: str, limit: int) -> tuple[list[str], list[str]]:
    """Held-out pairs: caption 1 of each image queries caption 2 of all, from synthetic_short if present, else
    the first eval set scored on short captions (a Karpathy-split set: COCO / Flickr30k)."""
    kinds = data.benchmarks(dataset_dir)
    for bench in sorted(kinds, key=lambda b: b != "synthetic_short"):
        if kinds[bench] != "short":
            continue
        split = storage.join(dataset_dir, data.split_path(bench))
        pairs = [m["captions"]["short"][:2] for _, _, m in data.read_captions(split)
                 if len(m["captions"].get("short", [])) >= 2][:limit]  # fmt: skip
        if len(pairs) >= 2:
            return [a for a, _ in pairs], [b for _, b in pairs]
    raise ValueError(f"{dataset_dir}: CRA needs an eval set with two short captions per image (has {kinds})")


def loss_step(
    encoder: text_encoder.CaptionEncoder, groups: list[list[str]], cfg: TuneConfig, rng: random.Random, dtype: str
) -> torch.Tensor:
    """One batch: per image two distinct captions (anchor, positive), plus one caption of another image."""
    batch = rng.sample(range(len(groups)), cfg.batch_size)
    anchors, positives, negatives = [], [], []
    for i in batch:
        a, p = rng.sample(groups[i], 2)
        anchors.append(a)
        positives.append(p)
        if cfg.hard_negatives:
            j = rng.choice([j for j in range(len(groups)) if j not in batch] or [i])
            negatives.append(rng.choice(groups[j]))
    with devices.autocast(devices.module_device(encoder.model), dtype):
        emb, _ = text_encoder.embed_by_length(encoder, anchors + positives + negatives, cfg.max_tokens)
    b = cfg.batch_size
    return info_nce(emb[:b], emb[b : 2 * b], emb[2 * b :] if negatives else None, cfg.scale)


def tune_caption_encoder(cfg: TuneConfig, dataset_dir: str, out_dir: str) -> dict:
    """Tune the LLM with LoRA on the train captions; write the adapter + manifest; return CRA and loss."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    # ---- data: caption groups (>= 2 captions of the same image) and held-out CRA pairs
    train = storage.join(dataset_dir, data.split_path("train"))
    groups = [[t for _, t in data.caption_list(m)] for _, _, m in data.read_captions(train)]
    groups = [g for g in groups if len(g) >= 2]
    if len(groups) < cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size}: only {len(groups)} train images have 2+ captions")
    queries, pool = cra_pairs(dataset_dir, cfg.cra_max_captions)

    # ---- model
    device, dtype = devices.setup(cfg.device, cfg.dtype)
    print(f"device {device}, compute dtype {dtype}", flush=True)
    encoder = text_encoder.load_caption_encoder(
        cfg.llm, bidirectional=cfg.bidirectional, max_length=cfg.max_length, device=device
    )
    cra_before = cra(encoder, queries, pool, dtype)
    print(f"CRA before tuning: {cra_before:.4f} on {len(queries)} held-out caption pairs", flush=True)
    # Seed here, after loading: a first run that converts or builds the base model consumes random numbers,
    # and the LoRA init and dropout must not depend on whether the model was already in the local cache.
    torch.manual_seed(cfg.seed)
    text_encoder.add_lora(encoder, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    params = [p for p in encoder.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)

    # ---- train
    losses = []
    encoder.model.train()
    for step in range(cfg.steps):
        loss = loss_step(encoder, groups, cfg, rng, dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            print(
                f"step {step:4d}/{cfg.steps} loss {loss.item():.4f} lr {scheduler.get_last_lr()[0]:.2e}",
                flush=True,
            )

    # ---- evaluate and save
    cra_after = cra(encoder, queries, pool, dtype)
    print(f"CRA after tuning: {cra_after:.4f}", flush=True)
    with storage.staged_dir(storage.join(out_dir, "adapter")) as adapter_dir:
        encoder.model.save_pretrained(adapter_dir)
        adapter_fingerprint = text_encoder.adapter_fingerprint(adapter_dir)
    if cfg.merge:
        with storage.staged_dir(storage.join(out_dir, "merged")) as merged_dir:
            encoder.model.merge_and_unload().save_pretrained(merged_dir)
            encoder.tokenizer.save_pretrained(merged_dir)
    seconds = time.time() - t0
    metrics = {
        "cra_before": cra_before,
        "cra_after": cra_after,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "trainable_params": sum(p.numel() for p in params),
        "seconds": seconds,
    }
    artifacts.write_manifest(
        out_dir,
        "tune_caption_encoder",
        cfg,
        {"dataset": dataset_dir},
        base_model=cfg.llm,
        base_fingerprint=text_encoder.model_fingerprint(cfg.llm),
        adapter="adapter",
        adapter_fingerprint=adapter_fingerprint,
        pooling="mean",
        embedding_dim=encoder.dim,
        compute=devices.describe(device, dtype),
        metrics=metrics,
        losses=losses,
        timings_s={"tune_caption_encoder": seconds},
    )
    return metrics
