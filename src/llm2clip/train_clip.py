"""Stage 2, train_clip: a CLIP vision tower against cached LLM caption embeddings (or, for the baseline, a
standard CLIP with its own text tower on the same images, captions and budget).

One entry point for a component and a user alike, on one process or many:
    python -m llm2clip.train_clip --dataset D --caption-embeddings C --output O [--epochs 10 ...]
    torchrun --standalone --nproc_per_node 8 -m llm2clip.train_clip --dataset D --caption-embeddings C --output O
Data streams from the shards (llm2clip.streaming) in DataLoader workers; under torchrun every rank reads its own
shards, the model is wrapped in DistributedDataParallel and the contrastive loss gathers the features of all
ranks (open_clip ClipLoss with local_loss and gather_with_grad), so N processes with a global batch B train as one
process with batch B would. Rank 0 writes the outputs and the checkpoints; a restarted run resumes from the
latest checkpoint in `<output>/checkpoints/` (model, optimizer, step, losses; the data position follows from the
step, see llm2clip.streaming).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import open_clip
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import load, save

from llm2clip import (
    artifacts,
    cache_caption_embeddings,
    clip_model,
    data,
    devices,
    distributed,
    loading,
    monitoring,
    storage,
    streaming,
)
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
    model: str = dataclasses.field(
        default=clip_model.DEFAULT_MODEL,
        metadata={
            "help": "open_clip model config of the vision tower (llm2clip-vit-tiny ships in "
            "src/llm2clip/model_configs/)"
        },
    )
    pretrained: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "the vision tower's weights: None = random init; an open_clip pretrained tag (with allow_hub, or "
            "already cached) or a checkpoint file (local or s3://). Setting it switches to the official recipe "
            "(lr 1e-5, layer decay 0.85, no warm-up) for what is not given"
        },
    )
    allow_hub: bool = False  # True: the cluster reaches a hub, so a pretrained tag is downloaded (see model_sources)
    embed_dim: int | None = None  # joint embedding width (official LLM2CLIP: 1280); None = the model config's
    adapter_blocks: int = 4
    center_text: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "subtract the training captions' mean LLM embedding before the adapter (not in the paper; the "
            "pipeline's default is off, as the paper: see the README's deviations); applied to both LLM-taught models"
        },
    )
    epochs: int = dataclasses.field(
        default=10, metadata={"help": "epochs of stage 2 (the pipeline: LLM2CLIP and both baselines alike)"}
    )
    batch_size: int = dataclasses.field(
        default=64, metadata={"help": "global batch of stage 2, split over all ranks (>= 2: in-batch negatives)"}
    )
    lr: float | None = dataclasses.field(
        default=None,
        metadata={"help": "learning rate of stage 2; None takes the recipe's (1e-3 random tower, 1e-5 pretrained)"},
    )
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # None: recipe (scratch 20, pretrained 0)
    layer_decay: float | None = None  # vision layer-wise lr decay; None: recipe (scratch 1.0 = off, pretrained 0.85)
    grad_clip: float = 5.0
    long_caption_prob: float = 0.5  # chance to train on the long caption of an image instead of a short one
    device: str = "auto"  # cuda if available, else cpu
    dtype: str = "auto"  # autocast; auto = bf16 on GPU / CPUs with native bf16, else fp32 (llm2clip.devices)
    workers: int = -1  # DataLoader processes per rank decoding and augmenting; -1 = auto (default_workers)
    shuffle_buffer: int = 1000  # samples per reading slot (memory: this many encoded images + their embeddings)
    checkpoint_every: int = 500  # steps between checkpoints (0 = none); a restarted run resumes from the latest
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
        check(self.workers >= -1, "workers", self.workers, "must be >= 0, or -1 for auto")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "must be >= 0 (0 = none)")


# ----------------------------------------------------------------------------------------------- training


def build_model(cfg: TrainClipConfig, llm_dim: int | None) -> torch.nn.Module:
    if cfg.text_source == "llm":
        return clip_model.LLM2CLIP(cfg.model, cfg.pretrained, llm_dim, cfg.adapter_blocks, cfg.embed_dim, cfg.allow_hub)
    return clip_model.create_clip_baseline(cfg.model, cfg.pretrained, cfg.embed_dim, cfg.allow_hub)


class ContrastiveStep(torch.nn.Module):
    """uint8 images [B, 3, H, W] and texts -> (image features, text features, logit scale), both L2-normalised.
    One forward for both towers, so DistributedDataParallel sees every parameter used in one call."""

    def __init__(self, model: torch.nn.Module, preprocess: ImagePreprocess) -> None:
        super().__init__()
        self.model, self.preprocess = model, preprocess

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = self.model.encode_image(self.preprocess.normalize(images), normalize=True)
        text_features = self.model.encode_text(texts, normalize=True)
        return image_features, text_features, self.model.logit_scale.exp()


def loss_step(
    model,
    loss_fn: ClipLoss,
    images: torch.Tensor,
    texts: torch.Tensor,
    dtype: str,
    preprocess: ImagePreprocess,
) -> torch.Tensor:
    """images uint8 [B, 3, H, W], texts [B, ...], both on the model's device -> symmetric InfoNCE (fp32).
    Normalisation (the tower's mean/std) happens here, on the device. `model` is a stage-2 model, or a
    ContrastiveStep (possibly DDP-wrapped) around one."""
    step = model if isinstance(model, ContrastiveStep | torch.nn.parallel.DistributedDataParallel) else None
    with devices.autocast(images.device, dtype):
        if step is None:
            step = ContrastiveStep(model, preprocess)
        image_features, text_features, scale = step(images, texts)
    return loss_fn(image_features.float(), text_features.float(), scale.float())


def lr_scale(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of 0-based `step` as a fraction of the base: linear warm-up from 1/warmup_steps to 1 (the
    first step already trains), then cosine to 0 at `total_steps`.

    Kept instead of transformers.get_cosine_schedule_with_warmup, which equals it after the warm-up but starts the
    warm-up at 0 (step s gets s/warmup_steps: the first step trains nothing), and is a LambdaLR whose state a
    resumed run would have to checkpoint; this is a function of the step alone (tests/test_train_stream.py)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def default_workers(device: torch.device, world: distributed.World) -> int:
    """DataLoader processes per rank for workers=-1. GPU: up to 8 per GPU, within the CPUs the node's ranks share.
    CPU: none below 8 cores per rank, else a quarter of them, up to 4. On 2 cores (2026-11-27, 600 images of 64 px,
    batch 64, two runs each) 0 workers gave 102 and 137 images/s, 1 worker 109 and 116: a worker cuts the data-wait
    share from 7-8% to 2-3% but takes its core from the matmuls, and the noise was larger than the difference."""
    cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    if device.type == "cuda":
        return max(1, min(8, cpus // max(1, local) - 1))
    per_rank = cpus // max(1, local)
    return 0 if per_rank < 8 else min(4, per_rank // 4)


def caption_mean(cache_dirs: list[str]) -> torch.Tensor:
    """The mean LLM embedding of every training caption (for centring), streamed shard by shard."""
    mean, _ = cache_caption_embeddings.embedding_mean(cache_dirs, "train")
    return mean


# ----------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_dir(out_dir: str) -> str:
    return storage.join(out_dir, "checkpoints")


def _resumable(cfg: TrainClipConfig) -> dict:
    """The config fields a checkpoint must agree on to be resumed (not logging or loader settings, nor allow_hub:
    it says whether weights may be downloaded, not which)."""
    skip = ("workers", "log_every", "checkpoint_every", "allow_hub")
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def save_checkpoint(out_dir: str, state: dict, keep: int = 2) -> None:
    """Write `step-N.pt` (atomically: temp file + rename locally, one PUT on S3), then point `latest.json` at it,
    then delete all but the `keep` newest. A kill at any moment leaves `latest.json` naming a complete file."""
    ckpt = _checkpoint_dir(out_dir)
    name = f"step-{state['step']:08d}.pt"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(storage.join(ckpt, name), buffer.getvalue())
    storage.write_json(storage.join(ckpt, "latest.json"), {"step": state["step"], "file": name})
    for old in sorted(storage.list_files(ckpt, ".pt"))[:-keep]:
        storage.delete(old)


def load_checkpoint(out_dir: str, cfg: TrainClipConfig) -> dict | None:
    """The latest checkpoint of this output, or None; refused when it was made with another config."""
    latest = storage.join(_checkpoint_dir(out_dir), "latest.json")
    if not storage.exists(latest):
        return None
    name = storage.read_json(latest)["file"]
    state = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(_checkpoint_dir(out_dir), name))),
        map_location="cpu",
        weights_only=False,
    )
    if state["config"] != _resumable(cfg):
        changed = sorted(k for k in state["config"] if state["config"][k] != _resumable(cfg).get(k))
        raise ValueError(
            f"{out_dir}: its checkpoint {name} was made with another config (fields {changed}); "
            "use a new output or delete the checkpoints/ folder to start over"
        )
    return state


# ----------------------------------------------------------------------------------------------- training loop


def train_clip(cfg: TrainClipConfig, dataset_dir: str, out_dir: str, cache_dirs: list[str] | None = None) -> dict:
    """Train stage 2 and save `model.safetensors` + manifest (rank 0). The LLM is never loaded: text comes from
    the cache. Under torchrun, every rank calls this; `cfg.batch_size` is the global batch. Observed through
    llm2clip.monitoring (each step's loss, lr, samples, step time and data wait)."""
    t0 = time.time()
    world, device = distributed.init(cfg.device)
    variant = metrics_variant(cfg, cache_dirs)
    with monitoring.stage("train_clip", variant, out_dir, world.rank, world.local_rank) as m:
        return _train(cfg, dataset_dir, out_dir, cache_dirs, world, device, m, t0)


def metrics_variant(cfg: TrainClipConfig, cache_dirs: list[str] | None) -> str:
    """This training's Pushgateway group among the pipeline's five, which run at the same time on a cluster and
    must not replace each other's: "clip", or "tuned"/"raw" by the cache's encoder (with or without the LoRA
    adapter), "-uncentred" for the centring ablation."""
    if cfg.text_source == "clip":
        return "clip"
    encoder = artifacts.read_manifest(cache_dirs[0], "cache_caption_embeddings")["encoder"] if cache_dirs else {}
    return ("tuned" if encoder.get("adapter_fingerprint") else "raw") + ("" if cfg.center_text else "-uncentred")


def _train(
    cfg: TrainClipConfig,
    dataset_dir: str,
    out_dir: str,
    cache_dirs: list[str] | None,
    world: distributed.World,
    device: torch.device,
    m: monitoring.StageMetrics,
    t0: float,
) -> dict:
    _, dtype = devices.setup(device.type, cfg.dtype)
    torch.manual_seed(cfg.seed)
    if cfg.batch_size % world.size:
        raise ValueError(f"batch_size={cfg.batch_size} (the global batch) must divide by the {world.size} ranks")
    local_batch = cfg.batch_size // world.size

    # ---- model (the adapter's input width from the cache's manifest), then the data with its tower's preprocessing
    cache_info, llm_dim = None, None
    if cfg.text_source == "llm":
        if not cache_dirs:
            raise ValueError("text_source='llm' needs the caption-embedding cache (cache_dirs)")
        # every group, centring or not: groups of two encoders (two runs, a tuned and a raw cache) are refused
        shared = cache_caption_embeddings.cache_info(cache_dirs)
        cache_info, llm_dim = {"encoder": shared["encoder"], "dim": shared["dim"]}, shared["dim"]
    model = build_model(cfg, llm_dim)
    preprocess = loading.preprocess_of(model)
    n = sum(streaming.split_sizes(storage.join(dataset_dir, data.split_path("train"))).values())
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {n} training images")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.text_source == "llm" and cfg.center_text:
        model.text_mean.copy_(caption_mean(cache_dirs))

    # ---- loss, optimizer, and the state to resume from
    model.to(device)
    loss_fn = ClipLoss(
        local_loss=world.size > 1, gather_with_grad=world.size > 1, rank=world.rank, world_size=world.size
    )
    optimizer = torch.optim.AdamW(clip_model.param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    state = load_checkpoint(out_dir, cfg) if cfg.checkpoint_every else None
    start, losses = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, losses = state["step"], state["losses"]
        print(f"resuming from the checkpoint at step {start}/{total_steps}", flush=True)
    step_module = ContrastiveStep(model, preprocess)
    if world.size > 1:
        ids = [device] if device.type == "cuda" else None
        step_module = torch.nn.parallel.DistributedDataParallel(step_module, device_ids=ids)

    def set_lr(step: int) -> None:  # from the step alone: a resumed run needs no scheduler state
        f = lr_scale(step, cfg.warmup_steps, total_steps)
        for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = lr * f

    # ---- the data: this rank's stream, resumed at the position of `start`
    workers = cfg.workers if cfg.workers >= 0 else default_workers(device, world)
    text = {"cache_dirs": cache_dirs} if cfg.text_source == "llm" else {"clip_model": cfg.model}
    stream = streaming.TrainStream(
        dataset_dir,
        "train",
        preprocess,
        **text,
        rank=world.rank,
        world=world.size,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        long_caption_prob=cfg.long_caption_prob,
        start_batch=start,
        batch_size=local_batch,
    )
    batches = iter(streaming.loader(stream, local_batch, workers, pin_memory=device.type == "cuda"))
    print(
        f"rank {world.rank}/{world.size}: device {device}, compute dtype {dtype}, {workers} data workers, "
        f"local batch {local_batch}, steps {start}..{total_steps}",
        flush=True,
    )

    # ---- train
    waited, t_loop = 0.0, time.perf_counter()
    step_module.train()
    for step in range(start, total_steps):
        t_wait = time.perf_counter()
        images, texts = next(batches)
        wait = time.perf_counter() - t_wait
        waited += wait
        images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
        set_lr(step)
        loss = loss_step(step_module, loss_fn, images, texts, dtype, preprocess)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        clip_model.clamp_logit_scale(model)
        losses.append(world.mean(loss.item()))  # with local_loss each rank holds its rows' share: the mean is B's
        done = step + 1
        m.step(
            loss=losses[-1],
            lr=max(g["lr"] for g in optimizer.param_groups),
            samples=local_batch,
            step_s=time.perf_counter() - t_wait,
            wait_s=wait,
        )
        if step % cfg.log_every == 0 or done == total_steps:
            print(
                f"epoch {step // steps_per_epoch} step {step:5d}/{total_steps} loss {losses[-1]:.4f} "
                f"scale {model.logit_scale.exp().item():.1f}",
                flush=True,
            )
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total_steps:
            if world.main:
                save_checkpoint(
                    out_dir,
                    {
                        "step": done,
                        "model": model.state_dict(),
                        "losses": losses,
                        "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(),
                        "config": _resumable(cfg),
                    },
                )
            world.barrier()
    loop_seconds = time.perf_counter() - t_loop
    del batches  # stops the DataLoader workers

    # ---- save (rank 0)
    seconds = time.time() - t0
    trained = total_steps - start
    metrics = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": total_steps,
        "resumed_at_step": start,
        "images": n,
        "images_per_s": trained * cfg.batch_size / max(loop_seconds, 1e-9),
        "data_wait_share": world.mean(waited / max(loop_seconds, 1e-9)),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        metrics["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if world.main:
        weights = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
        storage.write_bytes(storage.join(out_dir, "model.safetensors"), weights)
        artifacts.write_manifest(
            out_dir,
            "train_clip",
            cfg,
            {"dataset": dataset_dir, "caption_embeddings": cache_dirs or []},
            llm_dim=llm_dim,
            cache=cache_info,
            compute={**devices.describe(device, dtype), "world_size": world.size, "data_workers": workers},
            recipe=cfg.recipe,
            pretrained_source=model.pretrained_source,  # where the tower's weights came from, and their sha256
            preprocess=preprocess.to_dict(),
            metrics=metrics,
            losses=losses[:: max(1, len(losses) // 200)],
            timings_s={"train_clip": seconds},
            parameters=sum(p.numel() for p in model.parameters()),
        )
        for f in storage.list_files(_checkpoint_dir(out_dir)):  # the model is out: the checkpoints are spent
            storage.delete(f)
    world.barrier()
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


# ----------------------------------------------------------------------------------------------- entry point


def launch(
    cfg: TrainClipConfig, dataset_dir: str, out_dir: str, cache_dirs: list[str] | None = None, nproc: int = 1
) -> dict:
    """Train in this process (nproc 1) or as `torchrun --standalone --nproc_per_node nproc` processes on this
    node (the component's path on a multi-GPU pod); returns the metrics rank 0 recorded."""
    if nproc <= 1:
        return train_clip(cfg, dataset_dir, out_dir, cache_dirs)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "llm2clip.train_clip",
        "--config",
        json.dumps(dataclasses.asdict(cfg)),
        "--dataset",
        dataset_dir,
        "--output",
        out_dir,
    ]
    for d in cache_dirs or []:
        cmd += ["--caption-embeddings", d]
    subprocess.run(cmd, check=True)
    return artifacts.read_manifest(out_dir, "train_clip")["metrics"]


def _flag_type(field: dataclasses.Field):
    default = field.default
    if isinstance(default, bool):
        return None
    if field.name in ("lr", "layer_decay"):
        return float
    if field.name in ("warmup_steps", "embed_dim"):
        return int
    return type(default) if default is not None else str


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llm2clip.train_clip",
        description="Stage 2 of LLM2CLIP: train a CLIP vision tower against cached LLM caption embeddings "
        "(--text-source clip: the standard CLIP baseline). Run it as it is on one process, or under "
        "`torchrun --standalone --nproc_per_node N -m llm2clip.train_clip ...` on N (GPUs: NCCL, CPUs: gloo); "
        "--batch-size is the global batch. A rerun with the same --output resumes from its latest checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help="prepared dataset (local path or s3://), from prepare_data")
    p.add_argument("--output", required=True, help="where model.safetensors, manifest.json and checkpoints go")
    p.add_argument(
        "--caption-embeddings",
        action="append",
        default=[],
        metavar="DIR",
        help="a caption-embedding cache output (repeat for every shard group)",
    )
    p.add_argument("--config", help="TrainClipConfig as JSON (inline or a file); flags given as well override it")
    for field in dataclasses.fields(TrainClipConfig):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {field.default})")
        else:
            p.add_argument(flag, type=_flag_type(field), default=None, help=f"(default {field.default})")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    settings = {}
    if args.config:
        text = args.config
        settings = json.loads(text if text.lstrip().startswith("{") else open(text).read())
    names = {f.name for f in dataclasses.fields(TrainClipConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise SystemExit(f"--config: unknown TrainClipConfig fields {unknown}")
    settings.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    try:
        cfg = TrainClipConfig(**settings)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    try:
        metrics = train_clip(cfg, args.dataset, args.output, args.caption_embeddings or None)
    finally:
        distributed.shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=1), flush=True)


if __name__ == "__main__":
    main()
