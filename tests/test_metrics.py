"""Losses and retrieval metrics against hand computations and brute force."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm2clip import evaluate, report
from llm2clip.metrics import (
    bootstrap_cross_image_cosine,
    bootstrap_indices,
    bootstrap_retrieval,
    caption_retrieval_accuracy,
    ci95,
    info_nce,
    mean_cross_image_cosine,
    retrieval_hits,
    retrieval_metrics,
)


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


def test_collapsed_model_scores_nothing_not_everything():
    # every embedding identical: before the fix ties went to the query and this scored R@1 = 1.0 both ways
    image_emb = torch.ones(10, 4)
    text_emb = torch.ones(20, 4)
    owner = torch.arange(10).repeat_interleave(2)
    got = retrieval_metrics(image_emb, text_emb, owner, ks=(1, 5))
    chance_i2t_r1 = 2 / 20  # 2 of 20 captions are an image's own
    for k in ("image_to_text_R@1", "text_to_image_R@1"):
        assert got[k] <= chance_i2t_r1, (k, got[k])
    assert got["text_to_image_R@1"] == 0.0 and got["image_to_text_R@1"] == 0.0
    assert caption_retrieval_accuracy(torch.ones(5, 3), torch.ones(5, 3)) == 0.0


def test_caption_duplicated_on_two_images_is_no_free_hit():
    image_emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    # images 0 and 1 carry the very same caption text (so the same embedding); image 2 its own caption
    same = [1.0, 0.3]
    text_emb = torch.tensor([same, same, [0.0, 1.0]])
    owner = torch.tensor([0, 1, 2])
    got = retrieval_metrics(image_emb, text_emb, owner, ks=(1, 2))
    # image->text: image 0's best own caption ties with image 1's identical caption -> rank 1 -> miss at R@1
    assert abs(got["image_to_text_R@1"] - 1 / 3) < 1e-6  # only image 2
    assert got["image_to_text_R@2"] == 1.0
    # text->image: caption 0 (image 0) beats image 1 genuinely; caption 1 (image 1) ranks image 0 higher
    assert abs(got["text_to_image_R@1"] - 2 / 3) < 1e-6


def test_ties_count_against_the_query_brute_force():
    torch.manual_seed(1)
    # quantised embeddings: many exact ties
    image_emb = torch.randint(0, 2, (15, 3)).float() + 0.01
    owner = torch.randint(0, 15, (40,))
    text_emb = torch.randint(0, 2, (40, 3)).float() + 0.01
    sim = F.normalize(text_emb, dim=-1) @ F.normalize(image_emb, dim=-1).T
    hits = retrieval_hits(image_emb, text_emb, owner, ks=(1, 3))
    for k in (1, 3):
        for t in range(40):  # rank = other images scoring >= the right one
            rank = sum(1 for i in range(15) if i != owner[t] and sim[t, i] >= sim[t, owner[t]])
            assert bool(hits[f"text_to_image_R@{k}"][t]) == (rank < k)
        for i in range(15):
            own = [t for t in range(40) if owner[t] == i]
            if not own:
                assert not hits[f"image_to_text_R@{k}"][i]
                continue
            best = max(sim[t, i] for t in own)
            rank = sum(1 for t in range(40) if owner[t] != i and sim[t, i] >= best)
            assert bool(hits[f"image_to_text_R@{k}"][i]) == (rank < k)


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_n():
    owner = torch.arange(400).repeat_interleave(2)
    rng = torch.Generator().manual_seed(0)
    hits = {
        "image_to_text_R@1": torch.rand(400, generator=rng) < 0.3,
        "text_to_image_R@1": torch.rand(800, generator=rng) < 0.3,
    }
    reps = bootstrap_retrieval(hits, owner, bootstrap_indices(400, 1000, seed=0))
    for name, h in hits.items():
        lo, hi = ci95(reps[name])
        assert lo < h.float().mean().item() < hi
        assert 0.05 < hi - lo < 0.15  # binomial: 2 * 1.96 * sqrt(.3 * .7 / 400) = 0.09
    small = bootstrap_retrieval(
        {k: v[: len(v) // 4] for k, v in hits.items()}, owner[:200], bootstrap_indices(100, 1000, seed=0)
    )
    assert np.ptp(ci95(small["image_to_text_R@1"])) > np.ptp(ci95(reps["image_to_text_R@1"]))
    # seeded: the same draws give the same interval
    again = bootstrap_retrieval(hits, owner, bootstrap_indices(400, 1000, seed=0))
    assert ci95(again["text_to_image_R@1"]) == ci95(reps["text_to_image_R@1"])


def test_bootstrap_resamples_images_with_all_their_captions():
    """Captions of one image are not independent queries, so a replicate draws IMAGES, each with all its captions.
    Construction where the two protocols differ: 100 images with 4, 8, 12 or 16 captions, and the captions of one
    image all hit or all miss text->image (whole groups of four images hit). Resampling images, T->I R@1 varies like
    a mean over 100 images (95% width about 0.21); resampling the 1000 captions as if independent gives a width
    about sqrt(10) smaller (0.06). Both are computed here by brute force; the implementation must give the first."""
    counts = [4, 8, 12, 16] * 25
    owner = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
    image_hit = torch.tensor([(i // 4) % 2 == 0 for i in range(len(counts))])
    hits = {"text_to_image_R@1": image_hit[owner], "image_to_text_R@1": image_hit}
    draws = bootstrap_indices(len(counts), 1000, seed=0)
    reps = bootstrap_retrieval(hits, owner, draws)

    # brute force, per image: a replicate pools the captions of the drawn images (an image drawn twice counts twice)
    t2i, i2t = hits["text_to_image_R@1"].tolist(), image_hit.tolist()
    captions_of = [[t for t in range(len(owner)) if owner[t] == i] for i in range(len(counts))]
    per_image = np.array([np.mean([t2i[t] for i in d for t in captions_of[i]]) for d in draws])
    np.testing.assert_allclose(reps["text_to_image_R@1"], per_image, rtol=0, atol=1e-12)
    np.testing.assert_allclose(reps["image_to_text_R@1"], [np.mean([i2t[i] for i in d]) for d in draws], atol=1e-12)

    # brute force, per caption (the wrong protocol): its interval is far narrower on this construction
    rng = np.random.default_rng(1)
    per_caption = np.array([np.mean([t2i[t] for t in rng.integers(0, len(t2i), len(t2i))]) for _ in range(1000)])
    width_image, width_caption = np.ptp(ci95(per_image)), np.ptp(ci95(per_caption))
    assert width_image > 3 * width_caption, (width_image, width_caption)  # the construction tells them apart
    assert np.ptp(ci95(reps["text_to_image_R@1"])) == pytest.approx(width_image, abs=1e-12)


def test_two_identical_models_differ_by_exactly_zero(monkeypatch):
    """The paired difference of a model with itself: every bootstrap replicate draws the same images for both, so
    each replicate's difference is 0 and so is the interval, exactly (an unpaired draw per model would give an
    interval around 0 as wide as the models' own). Goes through evaluate.score_benchmark, which owns the pairing;
    only the model scoring is replaced, by the same real hits for both models."""
    torch.manual_seed(0)
    image_emb = torch.randn(50, 8)
    owner = torch.arange(50).repeat_interleave(3)
    text_emb = image_emb[owner] + 1.5 * torch.randn(150, 8)
    hits = retrieval_hits(image_emb, text_emb, owner)
    monkeypatch.setattr(evaluate, "score_model", lambda *args: (hits, owner))
    scores, comparisons, _ = evaluate.score_benchmark(
        "unused", "synthetic_long", {"llm2clip": "a", "twin": "b"}, {}, evaluate.EvaluateConfig()
    )
    assert 0 < scores["llm2clip"]["image_to_text_R@1"] < 1  # not a degenerate case whose every replicate is equal
    pair = comparisons["llm2clip vs twin"]
    assert set(pair) == set(hits)
    for metric, c in pair.items():
        assert c["difference"] == 0.0 and c["difference_ci95"] == [0.0, 0.0], metric
        assert c["intervals_overlap"] and not c["difference_excludes_zero"], metric
    sentence = report.comparison_sentences({"comparisons": {"synthetic_long": {"llm2clip vs twin": pair}}})
    assert sentence == [
        "synthetic_long, LLM2CLIP vs twin: I→T R@1 +0.0 points (paired 95% CI +0.0 to +0.0): within the noise: the "
        "intervals overlap; T→I R@1 +0.0 points (paired 95% CI +0.0 to +0.0): within the noise: the intervals overlap."
    ]


def test_cross_image_cosine_against_a_pairwise_loop():
    """The closed form against every ordered pair of captions of two different drawn images (3 captions per image,
    draws that repeat images); exact answers at both ends: captions along one direction give 1, captions that are
    distinct basis vectors give 0."""
    gen = torch.Generator().manual_seed(0)
    captions = torch.randn(7, 3, 5, generator=gen) + torch.tensor([2.0, 0, 0, 0, 0])  # [N, K, D], a shared offset
    draws = np.array([[0, 0, 3, 5, 5, 5, 6], [1, 2, 3, 4, 5, 6, 0], [2, 2, 2, 2, 2, 2, 4]])
    unit = F.normalize(captions.double(), dim=-1)

    def loop(draw) -> float:
        sims = [
            float(u @ v) for a in draw for b in draw if a != b for u in unit[a] for v in unit[b]
        ]  # an image drawn twice never pairs with itself
        return float(np.mean(sims))

    np.testing.assert_allclose(bootstrap_cross_image_cosine(captions, draws), [loop(d) for d in draws], atol=1e-12)
    assert mean_cross_image_cosine(captions) == pytest.approx(loop(range(7)), abs=1e-12)
    same_way = torch.rand(4, 2, 1, generator=gen) + 0.5  # positive multiples of one vector
    assert mean_cross_image_cosine(same_way * torch.ones(1, 1, 6)) == pytest.approx(1.0, abs=1e-12)
    assert mean_cross_image_cosine(torch.eye(8).reshape(4, 2, 8)) == 0.0
    # a single drawn image has no pair of different images
    assert np.isnan(bootstrap_cross_image_cosine(captions, np.array([[3, 3, 3, 3, 3, 3, 3]]))[0])
