"""The GPU benchmark suite: stage-2 step throughput and MFU of real-size vision towers on cached 4096-d caption
embeddings, and caption-caching tokens/s of a 1B- and an 8B-shaped Llama. Random weights and synthetic inputs:
nothing is downloaded, so it runs on a node with no network.

One GPU, under 5 minutes on an H100 (each measurement is bounded by a time budget, warm-up steps then timed steps,
and the whole suite by `time_limit_s`; a measurement that would not fit is skipped with a note):

    llm2clip benchmark --device cuda --only gpu --output runs/gpu.json

(`llm2clip benchmark --device cuda --output runs/benchmark-cuda.json` runs it first, then every other benchmark.)
`--device cpu --only gpu --gpu-smoke` runs the same code on tiny shapes, as the tests do.

What is measured:
- `stage2`: one stage-2 step as `train_clip` runs it (`train_clip.loss_step`: the tower on uint8 images normalised
  on the device, the adapter on [B, 4096] embeddings, ClipLoss; backward, grad clipping, AdamW) under bf16
  autocast, for open_clip ViT-B-16 and ViT-L-14 at 224 px. Data loading is not included (the inputs already sit on
  the GPU): this is the ceiling the data pipeline must feed. FLOPs per step are counted once with
  torch.utils.flop_counter; MFU is against the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s).
- `caching`: the cache stage's forward (`text_encoder.hidden_states` with the bidirectional mask, then
  `mean_pool`) in bf16 weights over length-bucketed batches (`text_encoder.length_batches` at the cache stage's
  token budget for the device) of a realistic caption-length mix. Tokenization is not included (random token
  ids of the drawn lengths).
- `derived_cached_vs_online_speedup`: a stage-2 step with the LLM run online costs the cached step plus embedding
  the batch's captions; from the two measurements above (derived, not a measured step).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from open_clip.loss import ClipLoss
from torch.utils.flop_counter import FlopCounterMode

from llm2clip import clip_model, devices, loading, text_encoder, train_clip
from llm2clip.cache_caption_embeddings import default_token_budget

# Dense bf16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name; first match wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
PRACTICAL_CEILING = 0.80  # best measured bf16 matmul on an H100 reaches ~80% of the spec (performance anchors)
LLM_DIM = 4096  # an 8B Llama's hidden size: the width of the cached embeddings the adapter reads


@dataclass(frozen=True)
class SuiteShapes:
    """What the suite builds: vision towers (open_clip config name, batch per GPU) and Llama shapes."""

    towers: tuple[tuple[str, int], ...]
    llms: tuple[tuple[str, dict], ...]
    llm_dim: int
    warmup: int  # steps / batches before timing
    tower_budget_s: float  # timed seconds per tower
    llm_budget_s: float  # timed seconds per LLM
    captions: int  # captions in the length mix the LLMs embed (batched once, cycled through until the budget)


# Llama-3.2-1B and Llama-3.1-8B shapes (their config.json), built with random weights.
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)
LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)
FULL = SuiteShapes(
    towers=(("ViT-B-16", 256), ("ViT-L-14", 128)),
    llms=(("llama-1b-shaped", LLAMA_1B), ("llama-8b-shaped", LLAMA_8B)),
    llm_dim=LLM_DIM,
    warmup=3,
    tower_budget_s=30.0,
    llm_budget_s=25.0,
    captions=8192,
)
SMOKE = SuiteShapes(  # the same code on tiny shapes, for a CPU
    towers=((clip_model.DEFAULT_MODEL, 4),),
    llms=(
        (
            "llama-tiny-shaped",
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=1000,
            ),
        ),
    ),
    llm_dim=64,
    warmup=1,
    tower_budget_s=0.5,
    llm_budget_s=0.5,
    captions=256,
)
GRAD_CLIP = train_clip.TrainClipConfig.grad_clip
MIN_BATCH = 8  # a tower whose batch runs out of memory is retried at half the batch, down to this


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where not known (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], None], device: torch.device, warmup: int, budget_s: float, min_steps: int = 3
) -> list[float]:
    """Seconds of each timed call of `fn`: `warmup` untimed calls, then calls until `budget_s` has passed (at least
    `min_steps`)."""
    for _ in range(warmup):
        fn()
    sync(device)
    seconds: list[float] = []
    start = time.perf_counter()
    while len(seconds) < min_steps or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions, attention; forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    return None if peak is None else flops_per_s / peak


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------- stage 2


def vit_flops_per_image(model: torch.nn.Module) -> float | None:
    """Analytic training FLOPs per image of an open_clip ViT tower (a cross-check of the counter): 3 x forward,
    forward = 2 x parameters x tokens + 4 x layers x tokens^2 x width (QK^T and AV)."""
    visual = model.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        return None
    size, patch = visual.image_size, visual.patch_size
    tokens = (size[0] // patch[0]) * (size[1] // patch[1]) + 1
    params = sum(p.numel() for p in visual.parameters())
    width = visual.transformer.width
    return 3 * (2 * params * tokens + 4 * len(blocks) * tokens**2 * width)


def stage2_step_benchmark(
    model_name: str, batch: int, llm_dim: int, device: torch.device, dtype: str, warmup: int, budget_s: float
) -> dict:
    """Images/s and MFU of stage-2 steps on `model_name` (random weights) with uint8 images [B, 3, S, S] and cached
    embeddings [B, llm_dim], both already on `device`."""
    _release(device)
    model = clip_model.LLM2CLIP(model_name, None, llm_dim).to(device)
    preprocess = loading.preprocess_of(model)
    size = loading.image_size_of(model_name)
    optimizer = torch.optim.AdamW(clip_model.param_groups(model, 1e-5, 0.05, 1.0))  # as train_clip builds it
    loss_fn = ClipLoss()
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    texts = torch.randn(batch, llm_dim, device=device).to(torch.float16)  # the cache stores fp16

    def step() -> None:
        loss = train_clip.loss_step(model, loss_fn, images, texts, dtype, preprocess)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        clip_model.clamp_logit_scale(model)

    model.train()
    flops = count_flops(step)  # also the first warm-up step
    seconds = timed(step, device, max(0, warmup - 1), budget_s)
    step_s = statistics.median(seconds)
    per_image = vit_flops_per_image(model)
    peak = peak_flops(device)
    return {
        "model": model_name,
        "image_size": size,
        "batch": batch,
        "llm_dim": llm_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_timed": len(seconds),
        "step_ms": {"median": 1e3 * step_s, "min": 1e3 * min(seconds), "max": 1e3 * max(seconds)},
        "images_per_s": batch / step_s,
        "flops_per_step_counted": flops,
        "flops_per_step_analytic_vit": None if per_image is None else per_image * batch,
        "tflops_per_s": flops / step_s / 1e12,
        "mfu": mfu(flops / step_s, peak),
        "peak_memory_gb": _peak_memory_gb(device),
    }


def stage2_with_retry(
    model_name: str, batch: int, llm_dim: int, device: torch.device, dtype: str, warmup: int, budget_s: float
) -> dict:
    """`stage2_step_benchmark`, halving the batch on a CUDA out-of-memory error (down to MIN_BATCH)."""
    notes = []
    while True:
        try:
            out = stage2_step_benchmark(model_name, batch, llm_dim, device, dtype, warmup, budget_s)
            return {**out, "notes": notes} if notes else out
        except torch.OutOfMemoryError:
            if batch // 2 < MIN_BATCH:
                raise
            notes.append(f"batch {batch} ran out of GPU memory; retried at {batch // 2}")
            batch //= 2
            _release(device)


# ----------------------------------------------------------------------------------------------- caption caching


def caption_token_lengths(n: int, seed: int = 0) -> list[int]:
    """A realistic caption-length mix in tokens (BOS included): half short alt-text captions (median 16, 6-48),
    half long dense captions (median 110, 40-320). Assumed, not measured: one short + one long caption per image
    gives ~126 tokens per image, the figure behind the anchors' "about 3 h for CC3M short+long captions at
    30-40k tokens/s"."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        median, low, high = (16, 6, 48) if i % 2 == 0 else (110, 40, 320)
        out.append(min(high, max(low, round(median * math.exp(rng.gauss(0, 0.35))))))
    rng.shuffle(out)
    return out


def build_llama(shape: dict, device: torch.device, dtype: torch.dtype) -> text_encoder.CaptionEncoder:
    """A Llama decoder stack of `shape` with random weights, created directly on `device` in `dtype` (no CPU init:
    an 8B model initialised on a CPU takes minutes), as a bidirectional caption encoder."""
    from transformers import AutoModel, LlamaConfig

    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    text_encoder.set_bidirectional(model, True)
    return text_encoder.CaptionEncoder(model, None, "random-llama", bidirectional=True, max_length=512)


def caching_tokens_benchmark(
    name: str, shape: dict, device: torch.device, dtype: str, warmup: int, budget_s: float, captions: int = 8192
) -> dict:
    """Real (unpadded) tokens/s of the cache stage's forward over length-bucketed batches of `captions` captions;
    batches run in a shuffled order (longest-first would time the slowest batches only), cycling until the budget."""
    _release(device)
    encoder = build_llama(shape, device, getattr(torch, dtype) if device.type == "cuda" else torch.float32)
    max_tokens, max_batch = default_token_budget(device.type)
    lengths = caption_token_lengths(captions)
    batches = text_encoder.length_batches(lengths, max_tokens, max_batch)
    random.Random(0).shuffle(batches)
    inputs = []
    for idx in batches:  # right-padded random token ids; positions count real tokens only (hidden_states)
        lens = torch.tensor([lengths[i] for i in idx], device=device)
        mask = (torch.arange(int(lens.max()), device=device) < lens[:, None]).long()
        ids = torch.randint(1, shape["vocab_size"], mask.shape, device=device) * mask
        inputs.append((ids, mask, int(lens.sum())))
    cursor = {"i": 0, "real": 0, "padded": 0}

    @torch.no_grad()
    def embed(ids: torch.Tensor, mask: torch.Tensor) -> None:
        with devices.autocast(device, dtype):
            text_encoder.mean_pool(text_encoder.hidden_states(encoder, ids, mask), mask)

    def forward() -> None:
        ids, mask, real = inputs[cursor["i"] % len(inputs)]
        embed(ids, mask)
        cursor["i"] += 1
        cursor["real"] += real
        cursor["padded"] += ids.numel()

    full = max(inputs, key=lambda x: x[0].numel())  # the fullest batch, to count FLOPs per padded token
    flops_per_token = count_flops(lambda: embed(full[0], full[1])) / full[0].numel()
    for _ in range(warmup):
        forward()
    sync(device)
    cursor.update(i=0, real=0, padded=0)
    seconds = sum(timed(forward, device, 0, budget_s))
    peak = peak_flops(device)
    params = sum(p.numel() for p in encoder.model.parameters())
    return {
        "llm": name,
        "shape": shape,
        "parameters": params,
        "weights_dtype": str(next(encoder.model.parameters()).dtype).removeprefix("torch."),
        "compute_dtype": dtype,
        "max_tokens": max_tokens,
        "max_batch": max_batch,
        "batches_timed": cursor["i"],
        "seconds": seconds,
        "real_tokens_per_s": cursor["real"] / seconds,
        "padded_tokens_per_s": cursor["padded"] / seconds,
        "padding_fraction": 1 - cursor["real"] / cursor["padded"],
        "mean_tokens_per_caption": statistics.mean(lengths),
        "flops_per_padded_token": flops_per_token,
        "mfu": mfu(flops_per_token * cursor["padded"] / seconds, peak),
        "peak_memory_gb": _peak_memory_gb(device),
    }


# ----------------------------------------------------------------------------------------------- the suite


def run_gpu_suite(device: str = "cuda", smoke: bool = False, time_limit_s: float = 280.0) -> dict:
    """Every measurement of the suite on one device; `smoke` shrinks every shape (the same code, for a CPU)."""
    t0 = time.perf_counter()
    shapes = SMOKE if smoke else FULL
    dev, dtype = devices.setup(device, "bfloat16" if device == "cuda" else "auto")
    peak = peak_flops(dev)
    out: dict = {
        "compute": devices.describe(dev, dtype),
        "smoke": smoke,
        "peak_bf16_tflops": None if peak is None else peak / 1e12,
        "practical_ceiling_tflops": None if peak is None else PRACTICAL_CEILING * peak / 1e12,
        "time_limit_s": time_limit_s,
        "stage2": [],
        "caching": [],
        "notes": [],
    }

    def fits(what: str, budget: float) -> bool:  # model building and warm-up take about as long as the timing
        left = time_limit_s - (time.perf_counter() - t0)
        if left < 2 * budget:
            out["notes"].append(f"{what} skipped: {left:.0f} s of the {time_limit_s:.0f} s suite limit left")
            return False
        return True

    for model_name, batch in shapes.towers:
        if fits(f"stage2 {model_name}", shapes.tower_budget_s):
            row = stage2_with_retry(model_name, batch, shapes.llm_dim, dev, dtype, shapes.warmup, shapes.tower_budget_s)
            out["stage2"].append(row)
            print(f"  stage2 {model_name:<20} {row['images_per_s']:9.1f} images/s  MFU {row['mfu']}", flush=True)
    for name, shape in shapes.llms:
        if fits(f"caching {name}", shapes.llm_budget_s):
            row = caching_tokens_benchmark(name, shape, dev, dtype, shapes.warmup, shapes.llm_budget_s, shapes.captions)
            out["caching"].append(row)
            print(f"  caching {name:<19} {row['real_tokens_per_s']:9.1f} real tokens/s  MFU {row['mfu']}", flush=True)

    # an online stage-2 step = the cached step + embedding the batch's captions with the largest LLM measured
    if out["stage2"] and out["caching"]:
        llm = out["caching"][-1]
        out["derived_cached_vs_online_speedup"] = {
            row["model"]: 1
            + row["batch"]
            * llm["mean_tokens_per_caption"]
            / llm["real_tokens_per_s"]
            / (row["step_ms"]["median"] / 1e3)
            for row in out["stage2"]
        }
        out["derived_with_llm"] = llm["llm"]
    out["seconds"] = time.perf_counter() - t0
    return out
