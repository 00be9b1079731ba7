"""Contrastive losses and retrieval metrics: InfoNCE for captions, CRA, multi-caption recall@k, bootstrap CIs, the
mean cosine between captions of different images (anisotropy)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def info_nce(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None, scale: float = 50.0
) -> torch.Tensor:
    """Supervised SimCSE loss. anchors/positives [B, D], negatives [K, D] or None; cosine similarity x scale.

    Row i's positive is positives[i]; every other positive and every explicit negative is a negative.
    """
    a = F.normalize(anchors.float(), dim=-1)
    pool = positives if negatives is None else torch.cat([positives, negatives])
    logits = a @ F.normalize(pool.float(), dim=-1).T * scale
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def _rank_hits(sim: torch.Tensor, correct: torch.Tensor, k: int) -> torch.Tensor:
    """sim [Q, C] scores of each query against C candidates; correct [Q] its right candidate.

    Rank = how many OTHER candidates score >= the right one (ties count against the query): a collapsed model,
    whose scores are all equal, ranks every right answer last instead of first. Returns hits [Q] bool (rank < k).
    """
    own = sim.gather(1, correct[:, None])  # [Q, 1]
    at_least = (sim >= own).sum(1) - 1  # the right candidate itself is always >= its own score
    return at_least < k


def caption_retrieval_hits(queries: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Per-query CRA hits [N] bool: query i ([N, D]) retrieves pool item i ([N, D]) top-1 by cosine similarity,
    ties counted against the query."""
    sim = F.normalize(queries.float(), dim=-1) @ F.normalize(pool.float(), dim=-1).T
    return _rank_hits(sim, torch.arange(len(queries)), 1)


def caption_retrieval_accuracy(queries: torch.Tensor, pool: torch.Tensor) -> float:
    """CRA: share of queries i ([N, D]) that retrieve pool item i ([N, D]) top-1 (ties count against)."""
    return caption_retrieval_hits(queries, pool).float().mean().item()


def retrieval_hits(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, torch.Tensor]:
    """Per-query hits of the multi-caption protocol. image_emb [N, D], text_emb [M, D], text_image [M] = image
    index of each caption. Returns {"image_to_text_R@k": [N] bool, "text_to_image_R@k": [M] bool}.

    text->image, per caption: rank = images other than its own scoring >= its own image.
    image->text, per image: a hit when ANY of its captions ranks within k; rank = captions of OTHER images scoring
    >= the image's best own caption. Ties count against the query in both directions, so a caption that appears
    verbatim on two images is a hit for neither image (each sees the other's identical copy as a tie).
    """
    sim = F.normalize(text_emb.float(), dim=-1) @ F.normalize(image_emb.float(), dim=-1).T  # [M, N]
    n, m = len(image_emb), len(text_emb)
    own = torch.zeros(m, n, dtype=torch.bool)
    own[torch.arange(m), text_image] = True
    best_own = sim.masked_fill(~own, float("-inf")).max(0).values  # [N]: each image's best own caption
    i2t_rank = ((sim >= best_own[None, :]) & ~own).sum(0)  # [N]: other images' captions scoring >= it
    t2i_rank = (sim >= sim[torch.arange(m), text_image][:, None]).sum(1) - 1  # [M]
    has_caption = own.any(0)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t_rank < k) & has_caption
        out[f"text_to_image_R@{k}"] = t2i_rank < k
    return out


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Multi-caption recall@k in both directions (see `retrieval_hits`; ties count against the query)."""
    hits = retrieval_hits(image_emb, text_emb, text_image, ks)
    return {name: h.float().mean().item() for name, h in hits.items()}


# ----------------------------------------------------------------------------------------------- confidence


def bootstrap_indices(n: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[resamples, n] indices drawn with replacement (seeded): the same draws serve every model, so their
    differences are paired."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def ci95(samples: np.ndarray) -> list[float]:
    """Percentile 95% interval of bootstrap replicates."""
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_retrieval(
    hits: dict[str, torch.Tensor], text_image: torch.Tensor, draws: np.ndarray
) -> dict[str, np.ndarray]:
    """Bootstrap replicates [resamples] of every recall in `hits`, resampling IMAGES (each with all its
    captions: captions of one image are not independent queries). draws: bootstrap_indices(n_images)."""
    n = draws.shape[1]
    owner = text_image.numpy()
    captions_per_image = np.bincount(owner, minlength=n)
    out = {}
    for name, h in hits.items():
        h = h.numpy().astype(np.float64)
        if name.startswith("image_to_text"):
            out[name] = h[draws].mean(1)
        else:  # text->image: pooled over the captions of the drawn images
            per_image = np.bincount(owner, weights=h, minlength=n)
            out[name] = per_image[draws].sum(1) / np.maximum(captions_per_image[draws].sum(1), 1)
    return out


# ----------------------------------------------------------------------------------------------- anisotropy


def bootstrap_cross_image_cosine(captions: torch.Tensor, draws: np.ndarray) -> np.ndarray:
    """Mean cosine similarity between captions of DIFFERENT images, per bootstrap draw of the images: how far the
    embedding space is from isotropic (0: caption directions spread out; 1: every caption points the same way).

    captions [N, K, D]: K captions of each of N images. draws [R, M] image indices (bootstrap_indices; one row
    np.arange(N) gives the value itself). Within a draw every pair of captions of two different images counts
    once per ordered pair; an image drawn twice is still one image, so its captions never pair with each other.
    With w [R, N] the times each image is drawn and c_i the sum of image i's unit vectors, the sum over such pairs is
    |sum_i w_i c_i|^2 - sum_i w_i^2 |c_i|^2 over K^2 (M^2 - sum_i w_i^2) pairs: no [N, N] matrix. Returns [R], in
    float64 (a draw of a single image has no pair: nan)."""
    n, k = captions.shape[0], captions.shape[1]
    c = F.normalize(captions.double(), dim=-1).sum(1).numpy()  # [N, D]
    weights = np.zeros((len(draws), n))
    np.add.at(weights, (np.arange(len(draws))[:, None], draws), 1.0)
    total = ((weights @ c) ** 2).sum(1) - (weights**2) @ (c**2).sum(1)
    pairs = k * k * (draws.shape[1] ** 2 - (weights**2).sum(1))
    return total / np.where(pairs > 0, pairs, np.nan)


def mean_cross_image_cosine(captions: torch.Tensor) -> float:
    """Mean cosine similarity between captions of different images, captions [N, K, D] (see
    `bootstrap_cross_image_cosine`)."""
    return float(bootstrap_cross_image_cosine(captions, np.arange(len(captions))[None])[0])
