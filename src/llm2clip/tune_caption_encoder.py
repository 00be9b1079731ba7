"""Stage 1, tune_caption_encoder: caption-contrastive LoRA tuning of an LLM (supervised SimCSE); the CRA pairs and,
on request, CRA measured in the stage."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from llm2clip import artifacts, data, devices, monitoring, storage, text_encoder
from llm2clip.metrics import bootstrap_indices, caption_retrieval_hits, ci95, info_nce

BOOTSTRAP_RESAMPLES = 1000
# Rejection sampling of a hard negative gives up after this many draws (only when nearly every image is in the
# batch or lacks a caption of the positive's kind); the row then has in-batch negatives only.
MAX_NEGATIVE_DRAWS = 100
Group = list[tuple[str, str]]  # one image's captions as (kind, text), data.caption_list order
# How a step pairs an image's captions: "any", two distinct captions of any kinds; "short_long", a short caption
# with a long one, the query side drawn 50/50 per row (the official stage 1's pairs).
PAIRS = ("any", "short_long")
# The official stage 1's query instructions for caption pairs (llm2vec's E5 data format, "cc3m" entry, in
# microsoft/LLM2CLIP llm_caption_contrastive/dataset/E5_cc3m.py: "{instruction}; " before the query only).
SHORT_TO_LONG = "Given a sentence, retrieve a detailed relevant sentence; "
LONG_TO_SHORT = "Given a detailed sentence, retrieve a short relevant sentence; "
CRA_SKIPPED = "CRA skipped: no eval set has two short captions per image"
CRA_IN_EVALUATE = (
    "CRA is measured in evaluate, from the caption-embedding caches of the tuned and the raw LLM (TuneConfig.cra "
    "is off: stage 1 spends no LLM passes on it)"
)


@dataclass(frozen=True)
class TuneConfig:
    """Stage-1 settings; defaults follow the LLM2CLIP code (LoRA r16/alpha32 on all projections, scale 50)."""

    llm: str = field(
        default=text_encoder.SMOLLM2,
        metadata={
            "help": 'the LLM: "smollm2-135m-instruct" (embedded), "tiny-random-llama" (built in code, for tests), '
            "a Hugging Face model directory (a path, e.g. under /models with models_pvc, or an s3:// prefix, "
            "downloaded once into a content-addressed cache) or a hub id (with allow_hub)"
        },
    )
    allow_hub: bool = False  # True: the cluster reaches a hub, so a hub id is downloaded (offline by default)
    bidirectional: bool = field(
        default=True,
        metadata={"help": "remove the LLM's causal mask (LLM2Vec-style) for tuning and caching; False keeps it causal"},
    )
    max_length: int = 512
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of stage 1 (the pipeline sets alpha = 2 r)"})
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = text_encoder.LORA_TARGETS
    # Prepended to every caption in tuning, caching and inference (attended to, never pooled); part of the cache key.
    instruction: str = ""
    scale: float = 50.0
    hard_negatives: bool = True  # per row a caption of the positive's kind from an image outside the batch
    steps: int = field(default=40, metadata={"help": "steps of stage 1, caption-contrastive LoRA tuning"})
    batch_size: int = field(
        default=16, metadata={"help": "images per tuning step: two captions of each, plus a hard negative"}
    )
    lr: float = field(default=2e-4, metadata={"help": "learning rate of stage 1 (AdamW on the LoRA weights)"})
    warmup_steps: int = 5
    weight_decay: float = 0.0
    pairs: str = field(
        default="any",
        metadata={
            "help": 'how stage 1 pairs two captions of an image: "any" (two distinct captions of any kinds) or '
            '"short_long" (a short with a long caption of the same image, which one is the query drawn 50/50 per '
            "row, as the official stage 1; images without both kinds are left out of tuning). The hard negative is "
            "of the positive's kind either way"
        },
    )
    query_instructions: bool = field(
        default=False,
        metadata={
            "help": "prepend an instruction to the query of each stage-1 pair only, by direction (short->long or "
            "long->short, the official wording), attended to and not pooled; positives, negatives, the caption "
            "cache and inference carry none. Needs pairs short_long"
        },
    )
    short_to_long_instruction: str = field(
        default=SHORT_TO_LONG,
        metadata={"help": "query_instructions: the instruction before a short query whose positive is long"},
    )
    long_to_short_instruction: str = field(
        default=LONG_TO_SHORT,
        metadata={"help": "query_instructions: the instruction before a long query whose positive is short"},
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "clip the L2 norm of the stage-1 LoRA gradients to this value at every step; 0 = no clipping "
            "(the official stage 1 clips at 1.0, transformers' Trainer default, which its config leaves as is)"
        },
    )
    device: str = "auto"  # cuda if available, else cpu (llm2clip.devices)
    dtype: str = "auto"  # autocast dtype; auto = bf16 on GPU / CPUs with native bf16, else fp32. Pooling and loss: fp32
    merge: bool = False  # also save the base model with the adapter merged in
    # CRA in this stage: the raw LLM causal and with the mask removed, then the tuned LLM (three passes over the
    # pairs). Off: the pipeline's evaluate computes it from the caption caches it embeds anyway (the raw-LLM row
    # and the tuned one), which saves those passes; on: for a tuned LLM used without the pipeline's caches.
    cra: bool = False
    cra_max_captions: int = 5000  # CRA pool size cap: the paper's COCO 5K protocol
    max_tokens: int = 1024  # padded tokens per forward chunk (length-sorted)
    log_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        check = artifacts.check
        check(self.max_length >= 8, "max_length", self.max_length, "must be >= 8")
        check(self.lora_r >= 1, "lora_r", self.lora_r, "must be >= 1")
        check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        check(len(self.lora_targets) > 0, "lora_targets", self.lora_targets, "needs at least one module name")
        check(
            not self.instruction or not self.instruction[-1].isalnum(),
            "instruction",
            self.instruction,
            "must end with a space or punctuation (its last word would merge into the caption's first token)",
        )
        check(self.scale > 0, "scale", self.scale, "must be > 0")
        check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        check(self.batch_size >= 2, "batch_size", self.batch_size, "needs >= 2 images for in-batch negatives")
        check(0 < self.lr < 1, "lr", self.lr, "must be in (0, 1)")
        check(self.cra_max_captions >= 2, "cra_max_captions", self.cra_max_captions, "must be >= 2")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.pairs in PAIRS, "pairs", self.pairs, f"must be one of {PAIRS}")
        check(
            not self.query_instructions or self.pairs == "short_long",
            "query_instructions",
            self.query_instructions,
            f"needs pairs='short_long' (pairs={self.pairs!r}): the instruction says which way a query retrieves",
        )
        for name in ("short_to_long_instruction", "long_to_short_instruction"):
            text = getattr(self, name)
            check(
                bool(text.strip()) and not text[-1].isalnum(),
                name,
                text,
                "must be non-empty and end with a space or punctuation (its last word would merge into the caption)",
            )
        check(
            math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
            "max_grad_norm",
            self.max_grad_norm,
            "must be >= 0 (0 = no clipping)",
        )
        check(self.device in devices.DEVICES, "device", self.device, f"must be one of {devices.DEVICES}")
        check(self.dtype in devices.DTYPES, "dtype", self.dtype, f"must be one of {devices.DTYPES}")

    def query_instruction(self, query_kind: str, positive_kind: str) -> str:
        """The instruction before a query of `query_kind` whose positive is of `positive_kind` ("" when
        query_instructions is off)."""
        if not self.query_instructions:
            return ""
        directions = {
            ("short", "long"): self.short_to_long_instruction,
            ("long", "short"): self.long_to_short_instruction,
        }
        if (query_kind, positive_kind) not in directions:
            raise ValueError(
                f"query_instructions: no instruction for a {query_kind} query of a {positive_kind} caption"
            )
        return directions[query_kind, positive_kind]


# ----------------------------------------------------------------------------------------------- CRA


@dataclass(frozen=True)
class CraPairs:
    """Held-out caption pairs for CRA: queries[i] and pool[i] are two captions of the same image."""

    queries: list[str]
    pool: list[str]
    source: str  # the eval set they come from
    # per pair (sample key, query row, pool row): where the two captions sit among the sample's cached embeddings
    # (rows in data.caption_list order), so CRA can be read from the caption-embedding cache
    rows: tuple[tuple[str, int, int], ...] = ()


def cra_pairs(dataset_dir: str, limit: int) -> CraPairs | None:
    """Up to `limit` held-out pairs (caption 1 of each image queries caption 2 of all), from synthetic_short if
    present, else the first eval set scored on short captions (a Karpathy-split set: COCO 5K / Flickr30k).
    None when no eval set has two short captions per image."""
    kinds = data.benchmarks(dataset_dir)
    for bench in sorted(kinds, key=lambda b: b != "synthetic_short"):
        if kinds[bench] != "short":
            continue
        split = storage.join(dataset_dir, data.split_path(bench))
        pairs, rows = [], []
        for _, key, meta in data.read_captions(split):
            caps = data.caption_list(meta)
            short = [i for i, (kind, _) in enumerate(caps) if kind == "short"][:2]
            if len(short) == 2:
                pairs.append((caps[short[0]][1], caps[short[1]][1]))
                rows.append((key, short[0], short[1]))
            if len(pairs) == limit:
                break
        if len(pairs) >= 2:
            return CraPairs([a for a, _ in pairs], [b for _, b in pairs], bench, tuple(rows))
    return None


def cra(encoder: text_encoder.CaptionEncoder, pairs: CraPairs, draws: np.ndarray, dtype: str) -> dict:
    """CRA of the encoder as it is (attention mode, adapter) and its bootstrap 95% interval over queries.

    draws: [resamples, N] from `bootstrap_indices`; the same draws for every measurement make them paired."""
    q, _ = text_encoder.encode_all(encoder, pairs.queries, dtype)
    p, _ = text_encoder.encode_all(encoder, pairs.pool, dtype)
    hits = caption_retrieval_hits(q, p).numpy().astype(np.float64)
    return {"value": float(hits.mean()), "ci95": ci95(hits[draws].mean(1))}


def cra_untuned(encoder: text_encoder.CaptionEncoder, pairs: CraPairs, draws: np.ndarray, dtype: str) -> dict:
    """CRA before tuning, both ways: "causal", the frozen LLM as the paper's raw-LLM row uses it, and
    "bidirectional", the causal mask removed without any adaptation (what LLM2Vec shows damages an LLM).
    Leaves the encoder in the attention mode it came in."""
    mode = encoder.bidirectional
    out = {}
    for name, bidirectional in (("causal", False), ("bidirectional", True)):
        text_encoder.set_attention(encoder, bidirectional)
        out[name] = cra(encoder, pairs, draws, dtype)
    text_encoder.set_attention(encoder, mode)
    return out


def cra_metrics(before: dict | None, after: dict | None, pairs: CraPairs | None, note: str = CRA_SKIPPED) -> dict:
    """Flat CRA fields of the stage metrics: cra_before (causal, untuned: the paper's raw LLM),
    cra_before_bidirectional (untuned, mask removed), cra_after (tuned, as configured), each with a `_ci95`
    [lo, hi], the pool size and its source eval set; all None with `note` as `cra_note` when CRA was not measured
    (no pairs, or TuneConfig.cra off)."""
    if pairs is None or before is None or after is None:
        values = dict.fromkeys(["cra_before", "cra_before_bidirectional", "cra_after"])
        return {
            **values,
            **{f"{k}_ci95": None for k in values},
            "cra_pool_size": 0,
            "cra_source": None,
            "cra_note": note,
        }
    out = {}
    for name, m in (
        ("cra_before", before["causal"]),
        ("cra_before_bidirectional", before["bidirectional"]),
        ("cra_after", after),
    ):
        out[name], out[f"{name}_ci95"] = m["value"], m["ci95"]
    return {**out, "cra_pool_size": len(pairs.pool), "cra_source": pairs.source}


# ----------------------------------------------------------------------------------------------- sampling


def draw_negative(groups: Sequence[Group], kind: str, exclude: set[int], rng: random.Random) -> str | None:
    """A caption of `kind` from a random image not in `exclude`, by rejection sampling: O(1) expected draws when
    most images are outside the batch and have that kind (never a pass over all images). None after
    MAX_NEGATIVE_DRAWS misses."""
    for _ in range(MAX_NEGATIVE_DRAWS):
        j = rng.randrange(len(groups))
        if j in exclude:
            continue
        same_kind = [text for k, text in groups[j] if k == kind]
        if same_kind:
            return rng.choice(same_kind)
    return None


class Batch(NamedTuple):
    """The captions of one step; row i of anchors and positives are two captions of the same image."""

    anchors: list[str]  # [B] the queries
    positives: list[str]  # [B]
    negatives: list[str]  # [<= B] hard negatives, one per row that found one
    directions: list[tuple[str, str]]  # [B] (anchor kind, positive kind) of each row


def pairable(group: Group, pairs: str) -> bool:
    """Whether an image can give a pair of the `pairs` rule (PAIRS): two captions, or a short and a long one."""
    if pairs == "short_long":
        kinds = {kind for kind, _ in group}
        return "short" in kinds and "long" in kinds
    return len(group) >= 2


def draw_pair(group: Group, pairs: str, rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    """(anchor, positive), each (kind, text), from one image's captions by the `pairs` rule (PAIRS)."""
    if pairs == "any":
        anchor, positive = rng.sample(group, 2)
        return anchor, positive
    short = rng.choice([c for c in group if c[0] == "short"])
    long = rng.choice([c for c in group if c[0] == "long"])
    return (short, long) if rng.random() < 0.5 else (long, short)


def sample_batch(
    groups: Sequence[Group], batch_size: int, hard_negatives: bool, rng: random.Random, pairs: str = "any"
) -> Batch:
    """Captions of one step: anchors [B] and positives [B] (two captions of each of B random images, paired by
    the `pairs` rule, see PAIRS) and, with hard_negatives, up to B negatives, each of its row's positive's kind
    from an image outside the batch (as the official code pairs them). Every group must be `pairable` (the caller
    filters them once). Cost O(B), independent of the number of images."""
    batch = rng.sample(range(len(groups)), batch_size)
    in_batch = set(batch)
    out = Batch([], [], [], [])
    for i in batch:
        (anchor_kind, anchor), (kind, positive) = draw_pair(groups[i], pairs, rng)
        out.anchors.append(anchor)
        out.positives.append(positive)
        out.directions.append((anchor_kind, kind))
        if hard_negatives:
            negative = draw_negative(groups, kind, in_batch, rng)
            if negative is not None:
                out.negatives.append(negative)
    return out


def batch_instructions(batch: Batch, cfg: TuneConfig) -> list[str] | None:
    """Per caption of anchors + positives + negatives, the instruction before it: with cfg.query_instructions the
    anchor's by its direction, nothing before positives and negatives (as the official stage 1); else None."""
    if not cfg.query_instructions:
        return None
    queries = [cfg.query_instruction(*direction) for direction in batch.directions]
    return queries + [""] * (len(batch.positives) + len(batch.negatives))


def loss_step(
    encoder: text_encoder.CaptionEncoder, groups: Sequence[Group], cfg: TuneConfig, rng: random.Random, dtype: str
) -> tuple[torch.Tensor, int]:
    """One batch (see `sample_batch`) -> (InfoNCE over the anchors against every positive and negative (fp32),
    the tokens the LLM ran over, padding and query instructions included)."""
    batch = sample_batch(groups, cfg.batch_size, cfg.hard_negatives, rng, cfg.pairs)
    texts = batch.anchors + batch.positives + batch.negatives
    with devices.autocast(devices.module_device(encoder.model), dtype):
        emb, tokens = text_encoder.embed_by_length(
            encoder, texts, cfg.max_tokens, instructions=batch_instructions(batch, cfg)
        )
    b = cfg.batch_size
    return info_nce(emb[:b], emb[b : 2 * b], emb[2 * b :] if batch.negatives else None, cfg.scale), tokens


def clip_gradients(params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' total L2 norm to `max_norm` in place (0 = leave them) and return the norm before."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def lr_scale(step: int, warmup_steps: int, steps: int) -> float:
    """The learning rate of 0-based `step` as a fraction of the base: linear warm-up from 1/warmup_steps to 1 (the
    first step already trains), then cosine down to a floor of 10% at `steps`.

    Kept instead of transformers.get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=0.1), which equals it after
    the warm-up but starts the warm-up at 0 (step s gets s/warmup_steps): the first step would train nothing, one
    of the pipeline's default 16 tuning steps and one of the tiny profile's 4 (tests/test_tune.py)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def query_instructions(cfg: TuneConfig) -> dict[str, str] | None:
    """What the manifest records of the query instructions: {"short_to_long", "long_to_short"} when stage 1 put
    them before its queries, else None. Only queries in tuning had them: the cache and inference embed every
    caption without them (with `instruction` alone, as a document)."""
    if not cfg.query_instructions:
        return None
    return {"short_to_long": cfg.short_to_long_instruction, "long_to_short": cfg.long_to_short_instruction}


def tune_caption_encoder(cfg: TuneConfig, dataset_dir: str, out_dir: str) -> dict:
    """Tune the LLM with LoRA on the train captions; write the adapter + manifest; return the loss and, with
    cfg.cra, CRA before and after tuning (else the cra_* fields are None and cra_note says where CRA is measured).
    Observed through llm2clip.monitoring (each step's loss, lr, anchors, tokens and time)."""
    with monitoring.stage("tune_caption_encoder", output=out_dir) as m:
        return _tune(cfg, dataset_dir, out_dir, m)


def _tune(cfg: TuneConfig, dataset_dir: str, out_dir: str, m: monitoring.StageMetrics) -> dict:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    # ---- data: caption groups (the captions of one image, with their kinds, that can give a pair by cfg.pairs)
    # and, with cfg.cra, CRA pairs
    train = storage.join(dataset_dir, data.split_path("train"))
    groups = [data.caption_list(m) for _, _, m in data.read_captions(train)]
    images = len(groups)
    groups = [g for g in groups if pairable(g, cfg.pairs)]
    if len(groups) < cfg.batch_size and cfg.pairs == "any":
        raise ValueError(f"batch_size={cfg.batch_size}: only {len(groups)} train images have 2+ captions")
    if len(groups) < cfg.batch_size:
        raise ValueError(
            f"pairs={cfg.pairs!r}: only {len(groups)} of {images} train images have both a short and a long "
            f"caption, fewer than batch_size={cfg.batch_size}"
        )
    if len(groups) < images:
        print(f"pairs={cfg.pairs}: {images - len(groups)} of {images} train images cannot give a pair", flush=True)
    pairs = cra_pairs(dataset_dir, cfg.cra_max_captions) if cfg.cra else None
    draws = bootstrap_indices(len(pairs.queries), BOOTSTRAP_RESAMPLES, cfg.seed) if pairs else None
    cra_note = CRA_SKIPPED if cfg.cra else CRA_IN_EVALUATE

    # ---- model
    device, dtype = devices.setup(cfg.device, cfg.dtype)
    print(f"device {device}, compute dtype {dtype}", flush=True)
    encoder = text_encoder.load_caption_encoder(
        cfg.llm,
        bidirectional=cfg.bidirectional,
        max_length=cfg.max_length,
        device=device,
        instruction=cfg.instruction,
        allow_hub=cfg.allow_hub,
    )
    before = cra_untuned(encoder, pairs, draws, dtype) if pairs else None
    if before:
        print(
            f"CRA before tuning on {len(pairs.queries)} {pairs.source} caption pairs: causal "
            f"{before['causal']['value']:.4f}, bidirectional {before['bidirectional']['value']:.4f}",
            flush=True,
        )
    else:
        print(cra_note, flush=True)
    # Seed here, after loading: a first run that converts or builds the base model consumes random numbers,
    # and the LoRA init and dropout must not depend on whether the model was already in the local cache.
    torch.manual_seed(cfg.seed)
    text_encoder.add_lora(encoder, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    params = [p for p in encoder.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_scale(step, cfg.warmup_steps, cfg.steps))

    # ---- train
    losses, grad_norms = [], []
    encoder.model.train()
    for step in range(cfg.steps):
        t_step = time.perf_counter()
        loss, tokens = loss_step(encoder, groups, cfg, rng, dtype)
        lr = optimizer.param_groups[0]["lr"]  # this step's (scheduler.step() below moves it on)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(clip_gradients(params, cfg.max_grad_norm))  # the norm before clipping
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        step_s = time.perf_counter() - t_step
        m.step(loss=losses[-1], lr=lr, grad_norm=grad_norms[-1], samples=cfg.batch_size, tokens=tokens, step_s=step_s)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            print(
                f"step {step:4d}/{cfg.steps} loss {loss.item():.4f} grad norm {grad_norms[-1]:.3g} "
                f"lr {scheduler.get_last_lr()[0]:.2e}",
                flush=True,
            )

    # ---- evaluate and save
    after = cra(encoder, pairs, draws, dtype) if pairs else None
    if after:
        print(f"CRA after tuning: {after['value']:.4f} {after['ci95']}", flush=True)
    with storage.staged_dir(storage.join(out_dir, "adapter")) as adapter_dir:
        encoder.model.save_pretrained(adapter_dir)
        adapter_fingerprint = text_encoder.adapter_fingerprint(adapter_dir)
    if cfg.merge:
        with storage.staged_dir(storage.join(out_dir, "merged")) as merged_dir:
            encoder.model.merge_and_unload().save_pretrained(merged_dir)
            encoder.tokenizer.save_pretrained(merged_dir)
    seconds = time.time() - t0
    metrics = {
        **cra_metrics(before, after, pairs, cra_note),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "grad_norm_max": max(grad_norms),  # before clipping (the manifest's grad_norms has every step's)
        "grad_norm_last": grad_norms[-1],
        "trainable_params": sum(p.numel() for p in params),
        "seconds": seconds,
    }
    artifacts.write_manifest(
        out_dir,
        "tune_caption_encoder",
        cfg,
        {"dataset": dataset_dir},
        base_model=cfg.llm,
        base_fingerprint=text_encoder.model_fingerprint(cfg.llm, cfg.allow_hub),
        base_source=text_encoder.model_source(cfg.llm, cfg.allow_hub).describe(),
        adapter="adapter",
        adapter_fingerprint=adapter_fingerprint,
        pooling=text_encoder.POOLING,
        instruction=cfg.instruction,
        query_instructions=query_instructions(cfg),
        embedding_dim=encoder.dim,
        compute=devices.describe(device, dtype),
        metrics=metrics,
        losses=losses,
        grad_norms=grad_norms,
        timings_s={"tune_caption_encoder": seconds},
    )
    return metrics
