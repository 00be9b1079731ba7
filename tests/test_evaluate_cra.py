"""CRA and anisotropy in evaluate, read from the caption-embedding caches: against brute force on hand-made caches,
paired intervals, stage 1's fallback, and agreement with stage 1's own measurement on the tiny Llama."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llm2clip import artifacts, cache_caption_embeddings, data, evaluate, text_encoder, tune_caption_encoder
from llm2clip.metrics import bootstrap_indices, ci95

SPLIT = "synthetic_short"
DIM = 8


def write_cache(cache_dir: Path, vectors: dict[str, torch.Tensor], bidirectional: bool, adapter: str | None) -> str:
    """A cache as cache_caption_embeddings writes it: one shard file of fp16 rows, a manifest naming the encoder."""
    identity = {"base_model": "m", "adapter_fingerprint": adapter, "bidirectional": bidirectional}
    shard = cache_dir / data.split_path(SPLIT) / "shard-000000.safetensors"
    shard.parent.mkdir(parents=True)
    save_file({k: v.half() for k, v in vectors.items()}, shard)
    artifacts.write_manifest(
        str(cache_dir),
        "cache_caption_embeddings",
        {},
        {},
        encoder=identity,
        dim=DIM,
        dtype="float16",
        count=sum(len(v) for v in vectors.values()),
    )
    return str(cache_dir)


def stage1_manifest(**metrics) -> dict:
    return {
        "config": {"cra_max_captions": 5000},
        "metrics": {**tune_caption_encoder.cra_metrics(None, None, None), **metrics},
    }


def brute_force_hits(metas: dict[str, dict], vectors: dict[str, torch.Tensor]) -> list[bool]:
    """Per image with two short captions: its first short caption's vector is strictly closer (cosine) to its second
    one's than to any other image's second short caption."""
    rows = {}
    for key, meta in metas.items():
        caps = data.caption_list(meta)
        short = [i for i, (kind, _) in enumerate(caps) if kind == "short"]
        if len(short) >= 2:
            rows[key] = (vectors[key][short[0]].float(), vectors[key][short[1]].float())
    hits = []
    for key, (q, _) in rows.items():
        own = F.cosine_similarity(q, rows[key][1], dim=0)
        others = [F.cosine_similarity(q, p, dim=0) for k, (_, p) in rows.items() if k != key]
        hits.append(all(own > s for s in others))
    return hits


@pytest.fixture(scope="module")
def fake_caches(tiny_dataset, tmp_path_factory):
    """Raw: random vectors. Tuned: each image's second short caption is its first plus noise for 9 of 12 images."""
    root = tmp_path_factory.mktemp("fake_caches")
    metas = {k: m for _, k, m in data.read_captions(f"{tiny_dataset}/{data.split_path(SPLIT)}")}
    gen = torch.Generator().manual_seed(0)
    raw = {k: torch.randn(len(data.caption_list(m)), DIM, generator=gen) for k, m in metas.items()}
    tuned = {}
    for i, (k, m) in enumerate(sorted(metas.items())):
        v = torch.randn(len(data.caption_list(m)), DIM, generator=gen)
        short = [j for j, (kind, _) in enumerate(data.caption_list(m)) if kind == "short"]
        if i % 4:
            v[short[1]] = v[short[0]] + 0.05 * torch.randn(DIM, generator=gen)
        tuned[k] = v
    caches = evaluate.pipeline_caches(
        [write_cache(root / "tuned", tuned, True, "adapter")], [write_cache(root / "raw", raw, False, None)]
    )
    return {"metas": metas, "raw": raw, "tuned": tuned, "caches": caches}


def test_cra_from_caches_matches_brute_force_with_paired_intervals(tiny_dataset, fake_caches):
    cfg = evaluate.EvaluateConfig(bootstrap=200, seed=3)
    got = evaluate.caption_metrics_from_caches(tiny_dataset, fake_caches["caches"], stage1_manifest(), cfg)["cra"]
    hits = {}
    for name, vectors in (("before", fake_caches["raw"]), ("after", fake_caches["tuned"])):
        # the cache holds fp16: the brute force reads the same rounded vectors
        hits[name] = torch.tensor(brute_force_hits(fake_caches["metas"], {k: v.half() for k, v in vectors.items()}))
        assert got[name] == pytest.approx(hits[name].float().mean().item())
        lo, hi = got[f"{name}_ci95"]
        assert lo <= got[name] <= hi
    assert got["after"] > got["before"]  # the tuned cache was built to retrieve its pairs
    draws = bootstrap_indices(12, 200, 3)
    a, b = hits["after"].double().numpy(), hits["before"].double().numpy()
    assert got["difference"] == pytest.approx(got["after"] - got["before"])
    assert got["difference_ci95"] == pytest.approx(ci95(a[draws].mean(1) - b[draws].mean(1)))  # the same draws
    assert got["pool_size"] == 12 and got["source"] == SPLIT
    assert got["before_attention"] == "causal" and got["store_dtype"] == "float16"
    assert "before_bidirectional" not in got  # stage 1 did not measure it


def test_stage1_bidirectional_cra_is_carried_over(tiny_dataset, fake_caches):
    tuned = stage1_manifest(cra_before_bidirectional=0.25, cra_before_bidirectional_ci95=[0.0, 0.5])
    got = evaluate.caption_metrics_from_caches(tiny_dataset, fake_caches["caches"], tuned, evaluate.EvaluateConfig())[
        "cra"
    ]
    assert got["before_bidirectional"] == 0.25 and got["before_bidirectional_ci95"] == [0.0, 0.5]


def test_without_both_caches_stage1_cra_stands(tiny_dataset, fake_caches):
    caches = {"llm2clip": fake_caches["caches"]["llm2clip"]}
    got = evaluate.caption_metrics_from_caches(tiny_dataset, caches, stage1_manifest(), evaluate.EvaluateConfig())[
        "cra"
    ]
    assert got["before"] is None and got["note"] == tune_caption_encoder.CRA_SKIPPED


def test_cra_from_caches_agrees_with_stage1_on_the_tiny_llama(tiny_dataset, tmp_path):
    """The raw-LLM cache is stage 1's "before" (causal, no adapter), the tuned cache its "after": the same pairs
    and draws, so only fp16 storage differs, which can flip a near-tie at most (one query of 12 here)."""
    cfg = tune_caption_encoder.TuneConfig(
        llm=text_encoder.TINY_LLAMA, steps=2, batch_size=4, lora_r=4, device="cpu", dtype="float32", cra=True
    )
    stage1 = tune_caption_encoder.tune_caption_encoder(cfg, tiny_dataset, str(tmp_path / "lora"))
    dirs = {}
    for name, use_adapter, attention in (("tuned", True, "as_tuned"), ("raw", False, "causal")):
        dirs[name] = str(tmp_path / name)
        cache_cfg = cache_caption_embeddings.CacheConfig(
            use_adapter=use_adapter,
            attention=attention,
            device="cpu",
            dtype="float32",
            store_root=str(tmp_path / "store"),
        )
        cache_caption_embeddings.cache_caption_embeddings(cache_cfg, tiny_dataset, str(tmp_path / "lora"), dirs[name])
    tuned = artifacts.read_manifest(str(tmp_path / "lora"), "tune_caption_encoder")
    both = evaluate.caption_metrics_from_caches(
        tiny_dataset, evaluate.pipeline_caches([dirs["tuned"]], [dirs["raw"]]), tuned, evaluate.EvaluateConfig()
    )
    got = both["cra"]
    assert got["pool_size"] == stage1["cra_pool_size"] == 12
    assert got["before"] == pytest.approx(stage1["cra_before"], abs=1 / 12 + 1e-9)
    assert got["after"] == pytest.approx(stage1["cra_after"], abs=1 / 12 + 1e-9)
    assert got["before_bidirectional"] == stage1["cra_before_bidirectional"]


def brute_force_cross_cosine(metas: dict[str, dict], vectors: dict[str, torch.Tensor], draw: list[int]) -> float:
    """Mean cosine over every pair of captions (both short captions of each CRA image) whose images differ, over
    the images at positions `draw` of the CRA images in shard order (an image drawn twice is one image)."""
    images = []
    for key in metas:
        short = [i for i, (kind, _) in enumerate(data.caption_list(metas[key])) if kind == "short"][:2]
        images.append((key, [vectors[key][i].double() for i in short]))
    drawn = [images[i] for i in draw]
    sims = [
        F.cosine_similarity(u, v, dim=0).item()
        for key_a, caps_a in drawn
        for key_b, caps_b in drawn
        if key_a != key_b
        for u in caps_a
        for v in caps_b
    ]
    return sum(sims) / len(sims)


def test_anisotropy_from_caches_matches_brute_force_with_paired_intervals(tiny_dataset, fake_caches):
    """The mean cosine between captions of different images, raw and tuned, on CRA's images and with CRA's draws:
    the value and the first bootstrap replicates against a pairwise loop over the stored fp16 vectors."""
    cfg = evaluate.EvaluateConfig(bootstrap=200, seed=3)
    got = evaluate.caption_metrics_from_caches(tiny_dataset, fake_caches["caches"], stage1_manifest(), cfg)
    cra, spread = got["cra"], got["anisotropy"]
    assert spread["pool_size"] == cra["pool_size"] == 12 and spread["source"] == cra["source"] == SPLIT
    assert spread["captions_per_image"] == 2
    draws = bootstrap_indices(12, 200, 3)
    replicates = {}
    for name, vectors in (("before", fake_caches["raw"]), ("after", fake_caches["tuned"])):
        fp16 = {k: v.half() for k, v in vectors.items()}
        assert spread[name] == pytest.approx(brute_force_cross_cosine(fake_caches["metas"], fp16, range(12)), abs=1e-9)
        replicates[name] = [brute_force_cross_cosine(fake_caches["metas"], fp16, d) for d in draws]
        assert spread[f"{name}_ci95"] == pytest.approx(ci95(replicates[name]), abs=1e-9)
    assert spread["before"] != spread["after"]  # the two caches are told apart
    assert spread["difference"] == pytest.approx(spread["after"] - spread["before"])
    paired = [a - b for a, b in zip(replicates["after"], replicates["before"], strict=True)]
    assert spread["difference_ci95"] == pytest.approx(ci95(paired), abs=1e-9)


def test_anisotropy_says_why_it_is_missing(tiny_dataset, fake_caches):
    caches = {"llm2clip": fake_caches["caches"]["llm2clip"]}
    got = evaluate.caption_metrics_from_caches(tiny_dataset, caches, stage1_manifest(), evaluate.EvaluateConfig())
    assert set(got["anisotropy"]) == {"note"} and "raw and tuned LLM" in got["anisotropy"]["note"]
