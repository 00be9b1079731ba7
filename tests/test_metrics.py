"""Losses and retrieval metrics against hand computations and brute force."""

import math

import torch
import torch.nn.functional as F

from llm2clip.metrics import caption_retrieval_accuracy, info_nce, retrieval_metrics


def test_info_nce_matches_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    n = torch.tensor([[-1.0, 0.0]])
    scale = 10.0
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    pool = [p[0], p[1], n[0]]
    expected = 0.0
    for i in range(2):
        logits = [scale * cos(a[i], c) for c in pool]
        expected += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    expected /= 2
    assert abs(info_nce(a, p, n, scale).item() - expected) < 1e-5
    without_neg = info_nce(a, p, None, scale).item()
    assert without_neg < info_nce(a, p, n, scale).item() + 1e-6  # an extra negative can only add loss


def test_cra():
    pool = torch.eye(4)
    queries = torch.eye(4)[[0, 1, 3, 2]]  # two of four swapped
    assert caption_retrieval_accuracy(queries, pool) == 0.5


def brute_force(image_emb, text_emb, owner, k):
    """Loop version of the multi-caption protocol."""
    sim = F.normalize(text_emb, dim=-1) @ F.normalize(image_emb, dim=-1).T
    t2i = []
    for t in range(len(text_emb)):
        order = sorted(range(len(image_emb)), key=lambda i: -sim[t, i].item())
        t2i.append(owner[t] in order[:k])
    i2t = []
    for i in range(len(image_emb)):
        order = sorted(range(len(text_emb)), key=lambda t: -sim[t, i].item())
        i2t.append(any(owner[t] == i for t in order[:k]))
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


def test_retrieval_matches_brute_force_multi_caption():
    torch.manual_seed(0)
    n_img, caps = 12, [1, 2, 3, 5] * 3
    image_emb = torch.randn(n_img, 8)
    owner = [i for i in range(n_img) for _ in range(caps[i])]
    text_emb = image_emb[owner] + 1.2 * torch.randn(len(owner), 8)
    got = retrieval_metrics(image_emb, text_emb, torch.tensor(owner), ks=(1, 2, 5))
    for k in (1, 2, 5):
        i2t, t2i = brute_force(image_emb, text_emb, owner, k)
        assert abs(got[f"image_to_text_R@{k}"] - i2t) < 1e-6, k
        assert abs(got[f"text_to_image_R@{k}"] - t2i) < 1e-6, k
    assert 0 < got["image_to_text_R@1"] < 1  # the case is not trivial


def test_image_to_text_hit_when_any_caption_ranks_first():
    image_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # image 0 has a good and a bad caption; image 1 one good caption
    text_emb = torch.tensor([[-1.0, 0.0], [1.0, 0.1], [0.1, 1.0]])
    got = retrieval_metrics(image_emb, text_emb, torch.tensor([0, 0, 1]), ks=(1,))
    assert got["image_to_text_R@1"] == 1.0
    assert abs(got["text_to_image_R@1"] - 2 / 3) < 1e-6
