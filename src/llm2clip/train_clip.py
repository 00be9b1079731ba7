"""Stage 2, train_clip: a CLIP vision tower against cached LLM caption embeddings (or, for the baseline, a
standard CLIP with its own text tower on the same images, captions and budget)."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import open_clip
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import load, save

from llm2clip import artifacts, clip_model, devices, loading, storage
from llm2clip.loading import ImagePreprocess

TEXT_SOURCES = ("llm", "clip")
# Optimisation defaults by starting point; a field left None takes its recipe's value (see TrainClipConfig).
# "scratch": a random-init tower (the local default). "pretrained": the official LLM2CLIP stage-2 recipe on a
# pretrained tower (lr 1e-5, visual layer-wise lr decay 0.85, no warm-up).
RECIPES: dict[str, dict[str, float | int]] = {
    "scratch": {"lr": 1e-3, "layer_decay": 1.0, "warmup_steps": 20},
    "pretrained": {"lr": 1e-5, "layer_decay": 0.85, "warmup_steps": 0},
}


@dataclass(frozen=True)
class TrainClipConfig:
    """Stage-2 settings. text_source "llm" trains LLM2CLIP from the cache; "clip" the CLIP baseline.

    lr, layer_decay and warmup_steps left None take the recipe of the starting point (RECIPES): "pretrained" when
    `pretrained` is set, else "scratch". They are resolved in __post_init__, so the config object (and the
    manifest, which records it) holds the values actually used; a value given explicitly always wins.
    (dataclasses.replace keeps resolved values: pass lr=None etc. with a new `pretrained` to re-resolve them.)
    """

    text_source: str = "llm"
    model: str = clip_model.DEFAULT_MODEL  # any open_clip model-config name
    pretrained: str | None = None  # open_clip pretrained tag, or a checkpoint file (local path or s3://)
    embed_dim: int | None = None  # joint embedding width (official LLM2CLIP: 1280); None = the model config's
    adapter_blocks: int = 4
    center_text: bool = True  # subtract the train captions' mean LLM embedding before the adapter (see clip_model)
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # None: recipe (scratch 1e-3, pretrained 1e-5)
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # None: recipe (scratch 20, pretrained 0)
    layer_decay: float | None = None  # vision layer-wise lr decay; None: recipe (scratch 1.0 = off, pretrained 0.85)
    grad_clip: float = 5.0
    long_caption_prob: float = 0.5  # chance to train on the long caption of an image instead of a short one
    device: str = "auto"  # cuda if available, else cpu
    dtype: str = "auto"  # autocast; auto = bf16 on GPU / CPUs with native bf16, else fp32 (llm2clip.devices)
    log_every: int = 20
    seed: int = 0

    @property
    def recipe(self) -> str:
        return "pretrained" if self.pretrained else "scratch"

    def __post_init__(self) -> None:
        for field, value in RECIPES[self.recipe].items():  # frozen: resolve the None defaults in place
            if getattr(self, field) is None:
                object.__setattr__(self, field, value)
        check = artifacts.check
        check(
            self.text_source in TEXT_SOURCES,
            "text_source",
            self.text_source,
            f"must be one of {TEXT_SOURCES}",
        )
        check(self.model in open_clip.list_models(), "model", self.model, "is not an open_clip model config")
        check(self.embed_dim is None or self.embed_dim >= 1, "embed_dim", self.embed_dim, "must be >= 1 or None")
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


# ----------------------------------------------------------------------------------------------- training


def build_model(cfg: TrainClipConfig, llm_dim: int | None) -> torch.nn.Module:
    if cfg.text_source == "llm":
        return clip_model.LLM2CLIP(cfg.model, cfg.pretrained, llm_dim, cfg.adapter_blocks, cfg.embed_dim)
    return clip_model.create_clip_baseline(cfg.model, cfg.pretrained, cfg.embed_dim)


def loss_step(
    model,
    loss_fn: ClipLoss,
    images: torch.Tensor,
    texts: torch.Tensor,
    dtype: str,
    preprocess: ImagePreprocess,
) -> torch.Tensor:
    """images uint8 [B, 3, H, W], texts [B, ...], both on the model's device -> symmetric InfoNCE (fp32).
    Normalisation (the tower's mean/std) happens here, on the device."""
    with devices.autocast(images.device, dtype):
        image_features = model.encode_image(preprocess.normalize(images), normalize=True)
        text_features = model.encode_text(texts, normalize=True)
    return loss_fn(image_features.float(), text_features.float(), model.logit_scale.exp())


def train_clip(cfg: TrainClipConfig, dataset_dir: str, out_dir: str, cache_dirs: list[str] | None = None) -> dict:
    """Train stage 2 and save `model.safetensors` + manifest. The LLM is never loaded: text comes from the cache."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device, dtype = devices.setup(cfg.device, cfg.dtype)
    print(f"device {device}, compute dtype {dtype}", flush=True)

    # ---- model (the adapter's input width from the cache's manifest), then the data with its tower's preprocessing
    cache_info, llm_dim = None, None
    if cfg.text_source == "llm":
        if not cache_dirs:
            raise ValueError("text_source='llm' needs the caption-embedding cache (cache_dirs)")
        cache_manifest = artifacts.read_manifest(cache_dirs[0], "cache_caption_embeddings")
        cache_info = {"encoder": cache_manifest["encoder"], "dim": cache_manifest["dim"]}
        llm_dim = cache_manifest["dim"]
    model = build_model(cfg, llm_dim)
    preprocess = loading.preprocess_of(model)
    # whole images (a fresh random crop each step), uint8 on the CPU
    keys, metas, images = loading.load_images(storage.join(dataset_dir, "train"), preprocess, train=True)
    if cfg.text_source == "llm":
        table = loading.llm_text_table(cache_dirs, "train", keys, metas)
    else:
        table = loading.clip_text_table(cfg.model, metas)
    n = len(keys)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {n} training images")
    total_steps = cfg.epochs * steps_per_epoch

    # ---- loss, optimizer
    if cfg.text_source == "llm" and cfg.center_text:
        model.text_mean.copy_(table.texts.float().mean(0))
    model.to(device)
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
            batch_images = preprocess.augment_batch([images[i] for i in idx])  # uint8, on the CPU
            if device.type == "cuda":  # page-locked: the copy to the GPU is asynchronous
                batch_images = batch_images.pin_memory()
            batch_images = batch_images.to(device, non_blocking=True)
            texts = table.texts[rows].to(device, non_blocking=True)
            loss = loss_step(model, loss_fn, batch_images, texts, dtype, preprocess)
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
        recipe=cfg.recipe,
        preprocess=preprocess.to_dict(),
        metrics=metrics,
        losses=losses[:: max(1, len(losses) // 200)],
        timings_s={"train_clip": seconds},
        parameters=sum(p.numel() for p in model.parameters()),
    )
    return metrics


def load_trained(model_dir: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild a stage-2 model from its manifest and weights (eval mode), with the preprocessing it was trained
    with attached (llm2clip.loading.preprocess_of). The pretrained checkpoint is not read again: the saved weights
    replace it (the manifest's resolved lr etc. keep the config valid without it)."""
    manifest = artifacts.read_manifest(model_dir, "train_clip")
    cfg = TrainClipConfig(**{**manifest["config"], "pretrained": None})
    model = build_model(cfg, manifest["llm_dim"])
    model.load_state_dict(load(storage.read_bytes(storage.join(model_dir, "model.safetensors"))))
    if "preprocess" in manifest:  # older manifests: the tower's default preprocessing
        loading.set_preprocess(model, ImagePreprocess.from_dict(manifest["preprocess"]))
    return model.eval(), manifest
