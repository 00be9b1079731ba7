"""What differs from the LLM2CLIP paper and its official code, and why: one list, rendered into the README's
"Deviations from the paper" table and into every evaluation report (a test keeps the README equal to the render)."""

from __future__ import annotations

from typing import NamedTuple


class Deviation(NamedTuple):
    what: str
    paper: str  # the paper or the official code
    here: str  # what this project does
    why: str  # the reason, with what was measured


DEVIATIONS: tuple[Deviation, ...] = (
    Deviation(
        "centring of cached LLM embeddings",
        "adapter input = L2-normalised LLM embedding",
        "the same by default; `center_text=true` subtracts the training captions' mean embedding first (then every "
        "run also trains and reports LLM2CLIP without it)",
        "an option since a weak stage 1 needed it: with the old local stage 1 (any caption pairs, bidirectional, lr "
        "5e-4) LLM2CLIP without centring fell to 0.3 / 0.3 R@1 on synthetic_long (2026-11-27). With the official "
        "stage-1 recipe (below) the tuned LLM's mean cosine between different captions is 0.736 [0.729, 0.744] "
        "(raw LLM 0.945) and centring is worth nothing measurable: synthetic_long I->T / T->I R@1 15.5 / 14.5 "
        "with vs 13.0 / 15.0 without, paired differences +2.5 [-3.5, +9.0] / -0.5 [-6.5, +5.5] (default profile, "
        "fp32, 2-core AMD EPYC, 2026-12-07)",
    ),
    Deviation(
        "MNTP before caption-contrastive tuning",
        "optional in v1; v6 drops it (79.7 with vs 80.4 without, avg R@1)",
        "not implemented: stage 1 is caption-contrastive LoRA only",
        "the paper's own ablation",
    ),
    Deviation(
        "local default data, tower and LLM",
        "CC3M-60M, EVA02-L/14 pretrained, Llama-3-8B",
        "synthetic rendered scenes, a random-init tiny ViT (`llm2clip-vit-tiny`), SmolLM2-135M-Instruct; 400 "
        "training images in the local profile (the pipeline's default is 600)",
        "nothing else is available offline on a CPU; the numbers show the pipeline works and how the models "
        "compare on this data, not the paper's accuracy",
    ),
    Deviation(
        "stage-2 recipe with a random tower",
        "lr 1e-5, layer decay 0.85, no warm-up, batch 4096, 4 epochs (pretrained towers)",
        "lr 1e-3, no layer decay, 20 warm-up steps, batch 64, 15 epochs for a random tower (90 steps on the local "
        "profile's 400 images, 135 on 600); the official lr, layer decay and warm-up switch on when `pretrained` is "
        "set (a tag, a checkpoint file or an `s3://` object) unless given; batch size and epochs stay as set",
        "a random tower does not move at lr 1e-5 in a few hundred steps",
    ),
    Deviation(
        "image preprocessing",
        "RandomResizedCrop (scale 0.9-1.0, bicubic) of the full-resolution image, OpenAI mean/std (EVA02); "
        "evaluation resize + centre crop",
        "each tower's own open_clip preprocessing (mean/std, interpolation, resize mode) with the same crop; "
        "training keeps each image with its shortest side scaled down to the tower's input side and crops from "
        "that copy",
        "the same crop at a fraction of the resize cost per sample (stage 2 decodes every sample in its stream); the "
        "64-px synthetic images are not scaled at all. The crop costs 3% of stage-2 time on the pipeline's default "
        "settings (600 images, 135 steps: 78 s vs 75 s) and raises the final training loss a little (mean of the "
        "last 5 steps 1.01 vs 0.91)",
    ),
    Deviation(
        "compute dtype",
        "bf16",
        "`auto`: bf16 on GPUs and CPUs with native bf16, fp32 elsewhere",
        "bf16 is emulated and 7-160x slower on CPUs without it (see Devices and precision)",
    ),
    Deviation(
        "hard negatives in stage 1",
        "one random caption of another image per row",
        "the same, drawn in O(1) by rejection sampling and of the positive's caption kind",
        "as the official code",
    ),
    Deviation(
        "stage-1 attention and learning rate",
        "bidirectional attention (LLM2Vec), lr 2e-4 with 300 warm-up steps over batches of 512 (one epoch)",
        "causal attention (`bidirectional=false`) and lr 2e-3 over 16 steps of 8 images (2 warm-up steps); "
        "`bidirectional=true` removes the mask as the paper",
        "the paper's ablation finds causal and bidirectional about equal (80.0 vs 80.4 avg R@1). Measured on the "
        "local data with the official pairs, instructions and clipping (stage 1 alone, 200 held-out images, "
        "2026-12-07): bidirectional at lr 5e-4 left the mean cosine between different short / long captions at "
        "0.96 / 0.99 (raw LLM 0.94 / 0.98), bidirectional at lr 2e-3 at 0.99 / 0.99; causal at lr 2e-3 brought "
        "it to 0.79 / 0.77 and is the only setting under which stage 2 without centring learns",
    ),
    Deviation(
        "stage-1 caption pairs and query instructions",
        "a short caption with the long caption of the same image, the query side drawn 50/50; an instruction "
        'before the query only, by direction ("Given a sentence, retrieve a detailed relevant sentence; " / '
        '"Given a detailed sentence, retrieve a short relevant sentence; "), never pooled, none in the cache',
        "the same by default; `tune_pairs=any` pairs any two captions of an image and "
        "`tune_query_instructions=false` drops the instructions",
        "as the official code. CRA (caption 1 of an image retrieving caption 2, both short, no instruction) is not "
        "what short-long pairs train: it fell from 3.5 [1.5, 6.0] (any pairs) to 0.5 [0.0, 1.5], while retrieval "
        "on unseen wordings rose (see the report's wording gap)",
    ),
    Deviation(
        "stage-1 gradient clipping",
        "the gradient norm clipped to 1.0 (transformers' Trainer default; the official config sets none)",
        "the same by default (`tune_max_grad_norm`, 0 = off); the norm before clipping is logged every step "
        "(`llm2clip_grad_norm`, the manifest's `grad_norms`)",
        "as the official code; at lr 2e-3 the first step's norm is about 65",
    ),
    Deviation(
        "stage-1 learning-rate schedule",
        "300 warm-up steps, then linear decay to 0 (transformers' Trainer default schedule), one epoch",
        "a warm-up of an eighth of the steps by default (`tune_warmup_steps` sets it; the first step already "
        "trains), then cosine to 10% of the lr",
        "300 warm-up steps exceed a whole local stage 1 (16 steps); the warm-up scales with the steps. Cosine vs "
        "linear decay is not measured here",
    ),
    Deviation(
        "raw-LLM baseline",
        "the raw LLM (untuned, causal attention) under LLM2CLIP's stage 2",
        "the frozen untuned LLM, causal, through exactly LLM2CLIP's stage-2 recipe (centring too when it is on); with "
        "`TuneConfig.cra` the report also gives CRA of the untuned LLM with the mask removed",
        "tuning is then the only difference between the two rows; removing the mask without tuning damages an LLM "
        "(LLM2Vec), so that is not the baseline",
    ),
    Deviation(
        "where CRA is measured",
        "the tuned LLM's CRA, measured in stage 1",
        "evaluate computes CRA of the raw (causal) and the tuned LLM from the fp16 caption caches the pipeline "
        "builds anyway (the same held-out pairs); `TuneConfig.cra` measures it in stage 1 as before",
        "the local budget: the three CRA passes in stage 1 (400 captions each, SmolLM2-135M, no native bf16) cost "
        "129 CPU-seconds, about a third of the stage (fp32, 2-core AMD EPYC, 2026-11-27). CRA is a ranking, so "
        "fp16 only flips near-ties; on a 600-image run both values equalled stage 1's own (0.0 and 9.0)",
    ),
)

HEADER = ("what", "paper / official code", "here", "why, measured")


def markdown_table(rows: tuple[Deviation, ...] = DEVIATIONS) -> str:
    """The deviations as a Markdown table (header, rule, one line per row), exactly as the README carries it."""
    for row in rows:
        for field, text in row._asdict().items():
            if "|" in text or "\n" in text:
                raise ValueError(
                    f"deviation {row.what!r}: field {field!r} contains '|' or a newline, which breaks "
                    "the Markdown table"
                )
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
