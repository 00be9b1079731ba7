"""The library stages chained on CPU with the tiny random Llama: prepare -> tune -> cache -> train -> evaluate."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm2clip import artifacts, data, embedding_cache, evaluate, text_encoder, train_clip, tune


@pytest.fixture(scope="module")
def chain(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    out = {k: str(root / k) for k in ("lora", "cache_a", "cache_b", "raw", "llm2clip", "rawm", "clip", "eval")}
    tuned = tune.tune_caption_encoder(
        tune.TuneConfig(llm=text_encoder.TINY_LLAMA, steps=6, batch_size=4, lr=1e-3, lora_r=4, warmup_steps=1),
        tiny_dataset,
        out["lora"],
    )
    caches = []
    for i, key in enumerate(("cache_a", "cache_b")):  # two shard groups, as the pipeline fans out
        embedding_cache.cache_caption_embeddings(
            embedding_cache.CacheConfig(group_index=i, num_groups=2), tiny_dataset, out["lora"], out[key]
        )
        caches.append(out[key])
    embedding_cache.cache_caption_embeddings(
        embedding_cache.CacheConfig(use_adapter=False), tiny_dataset, out["lora"], out["raw"]
    )
    tcfg = dict(epochs=2, batch_size=8, warmup_steps=2)
    train_clip.train_clip(train_clip.TrainClipConfig(**tcfg), tiny_dataset, out["llm2clip"], caches)
    train_clip.train_clip(train_clip.TrainClipConfig(**tcfg), tiny_dataset, out["rawm"], [out["raw"]])
    train_clip.train_clip(train_clip.TrainClipConfig(text_source="clip", **tcfg), tiny_dataset, out["clip"])
    summary = evaluate.evaluate(
        evaluate.EvaluateConfig(),
        tiny_dataset,
        out["lora"],
        {"llm2clip": out["llm2clip"], "llm2clip_raw_llm": out["rawm"], "clip_baseline": out["clip"]},
        {"llm2clip": caches, "llm2clip_raw_llm": [out["raw"]]},
        out["eval"],
    )
    return {"dirs": out, "tuned": tuned, "summary": summary, "caches": caches, "data": tiny_dataset}


def test_tuning_reports_cra_and_writes_adapter(chain):
    assert 0.0 <= chain["tuned"]["cra_before"] <= 1.0 and 0.0 <= chain["tuned"]["cra_after"] <= 1.0
    assert chain["tuned"]["loss_last"] < chain["tuned"]["loss_first"]
    manifest = artifacts.read_manifest(chain["dirs"]["lora"], "tune_caption_encoder")
    assert manifest["pooling"] == "mean" and manifest["config"]["lora_r"] == 4
    assert (Path(chain["dirs"]["lora"]) / "adapter" / "adapter_model.safetensors").exists()


def test_cache_covers_every_caption_exactly_once(chain):
    ds = chain["data"]
    expected = {}
    for split in ["train", *data.BENCHMARKS]:
        for _, key, meta in data.read_captions(str(Path(ds) / data.split_path(split))):
            expected[key] = len(data.caption_list(meta))
    got = {}
    for d in chain["caches"]:
        for f in Path(d).rglob("*.safetensors"):
            for k, v in load_file(f).items():
                assert k not in got, f"{k} cached twice"
                got[k] = v.shape[0]
                assert v.dtype == torch.float16
    assert got == expected
    m = [artifacts.read_manifest(d, "cache_caption_embeddings") for d in chain["caches"]]
    assert sum(x["count"] for x in m) == sum(expected.values())
    assert m[0]["encoder"]["adapter_fingerprint"] is not None and m[0]["dim"] == 64


def test_cache_round_trip_matches_a_fresh_encoding(chain):
    """What the cache holds is what the tuned encoder computes now (fp16 storage)."""
    lora = chain["dirs"]["lora"]
    enc = text_encoder.load_caption_encoder(text_encoder.TINY_LLAMA)
    text_encoder.load_lora(enc, Path(lora) / "adapter")
    emb, _ = embedding_cache.load_embeddings(chain["caches"], "synthetic_long")
    metas = {k: m for _, k, m in data.read_captions(str(Path(chain["data"]) / "eval/synthetic_long"))}
    key = sorted(metas)[0]
    caps = [t for _, t in data.caption_list(metas[key])]
    fresh, _ = text_encoder.encode_all(enc, caps, "bfloat16")
    torch.testing.assert_close(emb[key].float(), fresh.half().float(), atol=2e-2, rtol=2e-2)


def test_cache_file_round_trip_is_exact(tmp_path):
    tensors = {"k1": torch.randn(3, 16).half(), "k2": torch.randn(1, 16).half()}
    path = tmp_path / "x.safetensors"
    path.write_bytes(embedding_cache._serialize(tensors))
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_raw_and_tuned_caches_refuse_to_mix(chain):
    with pytest.raises(ValueError, match="another encoder"):
        embedding_cache.load_embeddings([chain["caches"][0], chain["dirs"]["raw"]], "train")


def test_summary_contract(chain):
    s = json.loads((Path(chain["dirs"]["eval"]) / "summary.json").read_text())
    assert set(s["cra"]) == {"before", "after"}
    for bench in ("synthetic_short", "synthetic_long"):
        for model in ("llm2clip", "llm2clip_raw_llm", "clip_baseline"):
            vals = s["retrieval"][bench][model]
            for k in ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@10"):
                assert 0.0 <= vals[k] <= 1.0
            assert vals["image_to_text_R@1"] <= vals["image_to_text_R@5"] <= vals["image_to_text_R@10"]
    assert {
        "prepare_data",
        "tune_caption_encoder",
        "evaluate",
        "train_clip:llm2clip",
        "train_clip:llm2clip_raw_llm",
        "train_clip:clip_baseline",
    } <= set(s["timings_s"])
    html = (Path(chain["dirs"]["eval"]) / "report.html").read_text()
    assert "data:image/png;base64," in html and "synthetic_long" in html and "CLIP baseline" in html


def test_trained_model_reloads_identically(chain):
    model, manifest = train_clip.load_trained(chain["dirs"]["llm2clip"])
    assert manifest["config"]["text_source"] == "llm"
    x = torch.randn(2, manifest["llm_dim"])
    assert model.encode_text(x).shape == (2, 256)


def test_train_clip_needs_the_cache(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="needs the caption-embedding cache"):
        train_clip.train_clip(train_clip.TrainClipConfig(epochs=1, batch_size=8), tiny_dataset, str(tmp_path))


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="text_source='bert'"):
        train_clip.TrainClipConfig(text_source="bert")
    with pytest.raises(ValueError, match="model='no-such-model'"):
        train_clip.TrainClipConfig(model="no-such-model")
    with pytest.raises(ValueError, match="batch_size=1"):
        tune.TuneConfig(batch_size=1)
    with pytest.raises(ValueError, match="group_index=2"):
        embedding_cache.CacheConfig(group_index=2, num_groups=2)
