"""Stage 2, train_clip: a CLIP vision tower against cached LLM caption embeddings (or, for the baseline, a
standard CLIP with its own text tower on the same images, captions and budget)."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import load, save

from llm2clip import artifacts, clip_model, data, devices, embedding_cache, storage

OPENAI_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
TEXT_SOURCES = ("llm", "clip")


@dataclass(frozen=True)
class TrainClipConfig:
    """Stage-2 settings. text_source "llm" trains LLM2CLIP from the cache; "clip" the CLIP baseline."""

    text_source: str = "llm"
    model: str = clip_model.DEFAULT_MODEL  # any open_clip model-config name
    pretrained: str | None = None  # open_clip pretrained tag when weights are available
    adapter_blocks: int = 4
    center_text: bool = True  # subtract the train captions' mean LLM embedding before the adapter (see clip_model)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    layer_decay: float = 1.0  # layer-wise lr decay for the vision tower (LLM2CLIP: 0.85 on pretrained towers)
    grad_clip: float = 5.0
    long_caption_prob: float = 0.5  # chance to train on the long caption of an image instead of a short one
    device: str = "auto"  # cuda if available, else cpu
    dtype: str = "auto"  # autocast; auto = bf16 on GPU / CPUs with native bf16, else fp32 (llm2clip.devices)
    log_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        check = artifacts.check
        check(
            self.text_source in TEXT_SOURCES,
            "text_source",
            self.text_source,
            f"must be one of {TEXT_SOURCES}",
        )
        check(self.model in open_clip.list_models(), "model", self.model, "is not an open_clip model config")
        check(self.adapter_blocks >= 0, "adapter_blocks", self.adapter_blocks, "must be >= 0")
        check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        check(self.batch_size >= 2, "batch_size", self.batch_size, "needs >= 2 for in-batch negatives")
        check(0 < self.lr < 1, "lr", self.lr, "must be in (0, 1)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(0 < self.layer_decay <= 1, "layer_decay", self.layer_decay, "must be in (0, 1]")
        check(self.grad_clip > 0, "grad_clip", self.grad_clip, "must be > 0")
        check(0 <= self.long_caption_prob <= 1, "long_caption_prob", self.long_caption_prob, "must be in [0, 1]")
        check(self.device in devices.DEVICES, "device", self.device, f"must be one of {devices.DEVICES}")
        check(self.dtype in devices.DTYPES, "dtype", self.dtype, f"must be one of {devices.DTYPES}")


# ----------------------------------------------------------------------------------------------- data


def load_images(split_dir: str, image_size: int) -> tuple[list[str], list[dict], torch.Tensor]:
    """Keys, metas and images [N, 3, S, S] uint8 of a prepared split (resized to the tower's input size)."""
    keys, metas, images = [], [], []
    for rec in data.read_split(split_dir):
        img = rec["image"]
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), resample=3)  # bicubic
        keys.append(rec["key"])
        metas.append(rec["meta"])
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return keys, metas, torch.stack(images)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, OpenAI mean/std (on the images' device)."""
    return (images.float() / 255.0 - OPENAI_MEAN.to(images.device)) / OPENAI_STD.to(images.device)


def image_size_of(model_name: str) -> int:
    size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


class CaptionTable:
    """Every caption of every image as a row of a text input tensor (cached embeddings or CLIP tokens)."""

    def __init__(self, metas: list[dict], texts: torch.Tensor) -> None:
        self.kinds: list[list[str]] = [[k for k, _ in data.caption_list(m)] for m in metas]
        self.offsets = np.cumsum([0] + [len(k) for k in self.kinds])
        self.texts = texts  # [total captions, ...]

    def rows(self, image: int, kind: str) -> list[int]:
        return [int(self.offsets[image]) + j for j, k in enumerate(self.kinds[image]) if k == kind]

    def sample(self, image: int, long_prob: float, rng: random.Random) -> int:
        longs, others = self.rows(image, "long"), [r for k in ("raw", "short") for r in self.rows(image, k)]
        pool = longs if longs and (not others or rng.random() < long_prob) else others
        return rng.choice(pool)


def llm_text_table(cache_dirs: list[str], split: str, keys: list[str], metas: list[dict]) -> CaptionTable:
    """Cached embeddings for each sample, stacked in key order; a missing key is an error naming it."""
    emb, _ = embedding_cache.load_embeddings(cache_dirs, split)
    missing = [k for k in keys if k not in emb]
    if missing:
        raise KeyError(f"{len(missing)} samples of split {split!r} have no cached embedding, e.g. {missing[:3]}")
    for k, m in zip(keys, metas, strict=True):
        if emb[k].shape[0] != len(data.caption_list(m)):
            raise ValueError(
                f"sample {k!r}: cache has {emb[k].shape[0]} captions, shard has {len(data.caption_list(m))}"
            )
    return CaptionTable(metas, torch.cat([emb[k] for k in keys]))


def clip_text_table(model_name: str, metas: list[dict]) -> CaptionTable:
    tokenizer = open_clip.get_tokenizer(model_name)
    texts = [t for m in metas for _, t in data.caption_list(m)]
    return CaptionTable(metas, tokenizer(texts))


# ----------------------------------------------------------------------------------------------- training


def build_model(cfg: TrainClipConfig, llm_dim: int | None) -> torch.nn.Module:
    if cfg.text_source == "llm":
        return clip_model.LLM2CLIP(cfg.model, cfg.pretrained, llm_dim, cfg.adapter_blocks)
    return clip_model.create_clip_baseline(cfg.model, cfg.pretrained)


def loss_step(model, loss_fn: ClipLoss, images: torch.Tensor, texts: torch.Tensor, dtype: str) -> torch.Tensor:
    """images uint8 [B, 3, H, W], texts [B, ...], both on the model's device -> symmetric InfoNCE (fp32)."""
    with devices.autocast(images.device, dtype):
        image_features = model.encode_image(normalize_images(images), normalize=True)
        text_features = model.encode_text(texts, normalize=True)
    return loss_fn(image_features.float(), text_features.float(), model.logit_scale.exp())


def train_clip(cfg: TrainClipConfig, dataset_dir: str, out_dir: str, cache_dirs: list[str] | None = None) -> dict:
    """Train stage 2 and save `model.safetensors` + manifest. The LLM is never loaded: text comes from the cache."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device, dtype = devices.setup(cfg.device, cfg.dtype)
    print(f"device {device}, compute dtype {dtype}", flush=True)

    # ---- data
    keys, metas, images = load_images(storage.join(dataset_dir, "train"), image_size_of(cfg.model))
    cache_info = None
    if cfg.text_source == "llm":
        if not cache_dirs:
            raise ValueError("text_source='llm' needs the caption-embedding cache (cache_dirs)")
        table = llm_text_table(cache_dirs, "train", keys, metas)
        _, cache_info = embedding_cache.load_embeddings(cache_dirs[:1], "synthetic_short")
        llm_dim = table.texts.shape[-1]
    else:
        table, llm_dim = clip_text_table(cfg.model, metas), None
    n = len(keys)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {n} training images")
    total_steps = cfg.epochs * steps_per_epoch

    # ---- model, loss, optimizer
    model = build_model(cfg, llm_dim)
    if cfg.text_source == "llm" and cfg.center_text:
        model.text_mean.copy_(table.texts.float().mean(0))
    model.to(device)
    if device.type == "cuda":  # page-locked host memory: batches copy to the GPU asynchronously
        images = images.pin_memory()
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(clip_model.param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay))
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    def set_lr(step: int) -> None:  # linear warm-up then cosine to zero
        if step < cfg.warmup_steps:
            f = (step + 1) / cfg.warmup_steps
        else:
            f = 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)))
        for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = lr * f

    # ---- train
    losses, step = [], 0
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(n).tolist()
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            rows = [table.sample(i, cfg.long_caption_prob, rng) for i in idx]
            set_lr(step)
            batch_images = images[idx].to(device, non_blocking=True)
            loss = loss_step(model, loss_fn, batch_images, table.texts[rows].to(device, non_blocking=True), dtype)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            clip_model.clamp_logit_scale(model)
            losses.append(loss.item())
            last = step == total_steps - 1
            if step % cfg.log_every == 0 or last:
                print(
                    f"epoch {epoch} step {step:5d}/{total_steps} loss {loss.item():.4f} "
                    f"scale {model.logit_scale.exp().item():.1f}",
                    flush=True,
                )
            step += 1

    # ---- save
    seconds = time.time() - t0
    weights = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    storage.write_bytes(storage.join(out_dir, "model.safetensors"), weights)
    metrics = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": total_steps,
        "images": n,
        "images_per_s": total_steps * cfg.batch_size / seconds,
        "seconds": seconds,
    }
    artifacts.write_manifest(
        out_dir,
        "train_clip",
        cfg,
        {"dataset": dataset_dir, "caption_embeddings": cache_dirs or []},
        llm_dim=llm_dim,
        cache=cache_info,
        compute=devices.describe(device, dtype),
        metrics=metrics,
        losses=losses[:: max(1, len(losses) // 200)],
        timings_s={"train_clip": seconds},
        parameters=sum(p.numel() for p in model.parameters()),
    )
    return metrics


def load_trained(model_dir: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild a stage-2 model from its manifest and weights (eval mode)."""
    manifest = artifacts.read_manifest(model_dir, "train_clip")
    cfg = TrainClipConfig(**{**manifest["config"], "pretrained": None})
    model = build_model(cfg, manifest["llm_dim"])
    model.load_state_dict(load(storage.read_bytes(storage.join(model_dir, "model.safetensors"))))
    return model.eval(), manifest
