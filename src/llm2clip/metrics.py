"""Contrastive losses and retrieval metrics: InfoNCE for captions, CRA, multi-caption recall@k."""

from __future__ import annotations

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


def caption_retrieval_accuracy(queries: torch.Tensor, pool: torch.Tensor) -> float:
    """CRA: query i ([N, D]) must retrieve pool item i ([N, D]) top-1 by cosine similarity."""
    sim = F.normalize(queries.float(), dim=-1) @ F.normalize(pool.float(), dim=-1).T
    return (sim.argmax(dim=1) == torch.arange(len(queries))).float().mean().item()


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Multi-caption retrieval. image_emb [N, D], text_emb [M, D], text_image [M] = image index of each text.

    text->image: per caption, a hit when its image ranks within k. image->text: a hit when ANY caption of the
    image ranks within k. Ties count against the query (rank = number of strictly better candidates).
    """
    sim = F.normalize(text_emb.float(), dim=-1) @ F.normalize(image_emb.float(), dim=-1).T  # [M, N]
    idx = torch.arange(len(text_emb))
    correct = sim[idx, text_image]  # [M]
    t2i_rank = (sim > correct[:, None]).sum(1)  # [M]
    # image -> text: rank of each caption among all captions for its own image, best caption per image
    sim_t = sim.T  # [N, M]
    own = sim_t[text_image, idx]  # [M]: similarity of each caption to its image
    i2t_rank_per_caption = (sim_t[text_image] > own[:, None]).sum(1)  # [M]
    best = torch.full((len(image_emb),), len(text_emb), dtype=torch.long)
    best = best.scatter_reduce(0, text_image, i2t_rank_per_caption, reduce="amin")
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (best < k).float().mean().item()
        out[f"text_to_image_R@{k}"] = (t2i_rank < k).float().mean().item()
    return out
