"""The library stages chained on CPU with the tiny random Llama: prepare -> tune -> cache -> train -> evaluate.

Every stage runs with dtype="float32", so the numbers compared here are the same on every CPU (dtype "auto" is
bf16 where the CPU has native bf16; tests/test_bf16_path.py runs that path)."""

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from llm2clip import (
    artifacts,
    cache_caption_embeddings,
    clip_model,
    data,
    evaluate,
    loading,
    text_encoder,
    train_clip,
    tune_caption_encoder,
)


@pytest.fixture(scope="module")
def chain(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    names = ("lora", "cache_a", "cache_b", "raw", "llm2clip", "rawm", "clip", "nocenter", "skipped", "eval")
    out = {k: str(root / k) for k in names}
    tuned = tune_caption_encoder.tune_caption_encoder(
        tune_caption_encoder.TuneConfig(
            llm=text_encoder.TINY_LLAMA, steps=6, batch_size=4, lr=1e-3, lora_r=4, warmup_steps=1, dtype="float32"
        ),
        tiny_dataset,
        out["lora"],
    )
    caches = []
    for i, key in enumerate(("cache_a", "cache_b")):  # two shard groups, as the pipeline fans out
        cache_caption_embeddings.cache_caption_embeddings(
            cache_caption_embeddings.CacheConfig(group_index=i, num_groups=2, dtype="float32"),
            tiny_dataset,
            out["lora"],
            out[key],
        )
        caches.append(out[key])
    cache_caption_embeddings.cache_caption_embeddings(
        cache_caption_embeddings.CacheConfig(use_adapter=False, attention="causal", dtype="float32"),
        tiny_dataset,
        out["lora"],
        out["raw"],
    )
    tcfg = dict(epochs=2, batch_size=8, warmup_steps=2, dtype="float32")
    trained = {}  # the models as training left them in memory, for the reload test
    real_build = train_clip.build_model

    def keep_built(cfg, llm_dim):
        trained[cfg.text_source] = real_build(cfg, llm_dim)
        return trained[cfg.text_source]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_clip, "build_model", keep_built)
        train_clip.train_clip(train_clip.TrainClipConfig(**tcfg), tiny_dataset, out["llm2clip"], caches)
        train_clip.train_clip(train_clip.TrainClipConfig(text_source="clip", **tcfg), tiny_dataset, out["clip"])
    train_clip.train_clip(train_clip.TrainClipConfig(**tcfg), tiny_dataset, out["rawm"], [out["raw"]])
    nocenter = train_clip.TrainClipConfig(center_text=False, **tcfg)
    train_clip.train_clip(nocenter, tiny_dataset, out["nocenter"], caches)
    artifacts.write_manifest(out["skipped"], "train_clip", nocenter, {}, skipped="not requested")  # as the component
    summary = evaluate.evaluate(
        evaluate.EvaluateConfig(),
        tiny_dataset,
        out["lora"],
        {
            "llm2clip": out["llm2clip"],
            "llm2clip_raw_llm": out["rawm"],
            "clip_baseline": out["clip"],
            "llm2clip_no_centring": out["nocenter"],
            "llm2clip_raw_llm_no_centring": out["skipped"],
        },
        {
            "llm2clip": caches,
            "llm2clip_raw_llm": [out["raw"]],
            "llm2clip_no_centring": caches,
            "llm2clip_raw_llm_no_centring": [out["raw"]],
        },
        out["eval"],
    )
    return {"dirs": out, "tuned": tuned, "summary": summary, "caches": caches, "data": tiny_dataset, "trained": trained}


def test_tuning_writes_adapter_and_leaves_cra_to_evaluate(chain):
    assert chain["tuned"]["cra_before"] is None and chain["tuned"]["cra_note"] == tune_caption_encoder.CRA_IN_EVALUATE
    cra = chain["summary"]["cra"]
    assert 0.0 <= cra["before"] <= 1.0 and 0.0 <= cra["after"] <= 1.0 and cra["pool_size"] >= 2
    assert chain["tuned"]["loss_last"] < chain["tuned"]["loss_first"]
    manifest = artifacts.read_manifest(chain["dirs"]["lora"], "tune_caption_encoder")
    assert manifest["pooling"].startswith("mean") and manifest["config"]["lora_r"] == 4
    assert (Path(chain["dirs"]["lora"]) / "adapter" / "adapter_model.safetensors").exists()


def test_cache_covers_every_caption_exactly_once(chain):
    ds = chain["data"]
    expected = {}  # keyed by split too: synthetic_reworded holds synthetic_long's keys
    for split in ["train", *data.BENCHMARKS]:
        split_path = data.split_path(split)
        for _, key, meta in data.read_captions(str(Path(ds) / split_path)):
            expected[split_path, key] = len(data.caption_list(meta))
    got = {}
    for d in chain["caches"]:
        for f in Path(d).rglob("*.safetensors"):
            split_path = str(f.parent.relative_to(d))
            for k, v in load_file(f).items():
                assert (split_path, k) not in got, f"{k} of {split_path} cached twice"
                got[split_path, k] = v.shape[0]
                assert v.dtype == torch.float16
    assert got == expected
    m = [artifacts.read_manifest(d, "cache_caption_embeddings") for d in chain["caches"]]
    assert sum(x["count"] for x in m) == sum(expected.values())
    assert m[0]["encoder"]["adapter_fingerprint"] is not None and m[0]["dim"] == 64


def test_cache_round_trip_matches_a_fresh_encoding(chain):
    """What the cache holds is what the tuned encoder computes now, both in fp32, stored as fp16: within one fp16
    ulp (2**-10 relative: half an ulp of rounding, plus an fp32 difference of another batch padding that may cross
    a rounding boundary; 2**-24 is the fp16 subnormal spacing). A 1% error in the stored vectors fails."""
    lora = chain["dirs"]["lora"]
    enc = text_encoder.load_caption_encoder(text_encoder.TINY_LLAMA)
    text_encoder.load_lora(enc, Path(lora) / "adapter")
    emb, _ = cache_caption_embeddings.load_embeddings(chain["caches"], "synthetic_long")
    metas = {k: m for _, k, m in data.read_captions(str(Path(chain["data"]) / "eval/synthetic_long"))}
    keys = sorted(metas)[:3]
    caps = [t for k in keys for _, t in data.caption_list(metas[k])]
    fresh, _ = text_encoder.encode_all(enc, caps, "float32")
    cached = torch.cat([emb[k] for k in keys]).float()
    assert artifacts.read_manifest(chain["caches"][0], "cache_caption_embeddings")["compute"]["dtype"] == "float32"
    torch.testing.assert_close(fresh, cached, atol=2.0**-24, rtol=2.0**-10)


def test_cache_file_round_trip_is_exact(tmp_path):
    tensors = {"k1": torch.randn(3, 16).half(), "k2": torch.randn(1, 16).half()}
    path = tmp_path / "x.safetensors"
    path.write_bytes(cache_caption_embeddings._serialize(tensors))
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_raw_and_tuned_caches_refuse_to_mix(chain):
    with pytest.raises(ValueError, match=r"two encoders.*differ in \['adapter_fingerprint', 'bidirectional'\]"):
        cache_caption_embeddings.load_embeddings([chain["caches"][0], chain["dirs"]["raw"]], "train")


def test_summary_contract(chain):
    s = json.loads((Path(chain["dirs"]["eval"]) / "summary.json").read_text())
    assert {"before", "after"} <= set(s["cra"])
    assert set(s["retrieval"]) == {"synthetic_short", "synthetic_long", "synthetic_reworded"}
    for bench in ("synthetic_short", "synthetic_long", "synthetic_reworded"):
        # the skipped ablation is left out, the trained one is in
        assert set(s["retrieval"][bench]) == {"llm2clip", "llm2clip_raw_llm", "clip_baseline", "llm2clip_no_centring"}
        for model in ("llm2clip", "llm2clip_raw_llm", "clip_baseline"):
            vals = s["retrieval"][bench][model]
            for k in ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@10"):
                assert 0.0 <= vals[k] <= 1.0
                lo, hi = vals[f"{k}_ci95"]
                assert lo <= vals[k] <= hi
            assert vals["image_to_text_R@1"] <= vals["image_to_text_R@5"] <= vals["image_to_text_R@10"]
            assert vals["images"] == 12
        for other in ("llm2clip_raw_llm", "clip_baseline", "llm2clip_no_centring"):
            c = s["comparisons"][bench][f"llm2clip vs {other}"]["image_to_text_R@1"]
            main, base = s["retrieval"][bench]["llm2clip"], s["retrieval"][bench][other]
            assert abs(c["difference"] - (main["image_to_text_R@1"] - base["image_to_text_R@1"])) < 1e-9
            assert c["difference_ci95"][0] <= c["difference"] <= c["difference_ci95"][1]
    assert set(s["retrieval_average"]) >= {"llm2clip", "clip_baseline"}
    gap = s["wording_gap"]
    assert (gap["seen"], gap["unseen"], gap["images"]) == ("synthetic_long", "synthetic_reworded", 12)
    assert set(gap["models"]) == set(s["retrieval"]["synthetic_long"])
    for model, metrics in gap["models"].items():
        for metric, g in metrics.items():
            seen, unseen = s["retrieval"]["synthetic_long"][model], s["retrieval"]["synthetic_reworded"][model]
            assert (g["seen"], g["unseen"]) == (seen[metric], unseen[metric])
            assert g["gap"] == pytest.approx(seen[metric] - unseen[metric], abs=1e-12)
            assert g["gap_ci95"][0] <= g["gap"] <= g["gap_ci95"][1], (model, metric)
    spread = s["anisotropy"]
    assert spread["source"] == s["cra"]["source"] and spread["pool_size"] == s["cra"]["pool_size"]
    for name in ("before", "after"):
        assert -1.0 <= spread[f"{name}_ci95"][0] <= spread[name] <= spread[f"{name}_ci95"][1] <= 1.0
    assert s["artifacts"]["models"]["llm2clip"] == chain["dirs"]["llm2clip"]
    assert "llm2clip_raw_llm_no_centring" not in s["artifacts"]["models"]
    assert s["cache"]["misses"] + s["cache"]["hits"] > 0
    raw_identity = s["models"]["llm2clip_raw_llm"]["encoder"]
    assert raw_identity["bidirectional"] is False and raw_identity["adapter_fingerprint"] is None
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


@pytest.mark.parametrize("name,source", [("llm2clip", "llm"), ("clip", "clip")])
def test_trained_model_reloads_identically(chain, name, source):
    """The model load_trained rebuilds from model.safetensors + manifest computes exactly what the trained model
    in memory computed (same fp32 weights, same ops, same CPU: bit for bit) on fixed images and texts, the
    centring mean and the temperature included; a freshly initialised model does not."""
    model, manifest = train_clip.load_trained(chain["dirs"][name])
    assert manifest["config"]["text_source"] == source
    original = chain["trained"][source].eval()
    gen = torch.Generator().manual_seed(0)
    h, w = manifest["preprocess"]["size"]
    images = torch.randn(4, 3, h, w, generator=gen)
    if source == "llm":
        texts = torch.randn(4, manifest["llm_dim"], generator=gen)
    else:
        texts = torch.randint(1, 1000, (4, 77), generator=gen)
    with torch.no_grad():
        outputs = [(m.encode_image(images), m.encode_text(texts), m.logit_scale.exp()) for m in (model, original)]
        fresh = train_clip.build_model(train_clip.TrainClipConfig(**manifest["config"]), manifest["llm_dim"]).eval()
        untrained = fresh.encode_image(images), fresh.encode_text(texts)
    for got, want, what in zip(*outputs, ("image features", "text features", "logit scale"), strict=True):
        assert torch.equal(got, want), what
    assert not torch.allclose(untrained[0], outputs[1][0], atol=1e-3)
    assert not torch.allclose(untrained[1], outputs[1][1], atol=1e-3)
    assert outputs[0][0].shape == (4, 256) and outputs[0][1].shape == (4, 256)


def test_train_clip_needs_the_cache(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="needs the caption-embedding cache"):
        train_clip.train_clip(train_clip.TrainClipConfig(epochs=1, batch_size=8), tiny_dataset, str(tmp_path))


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="text_source='bert'"):
        train_clip.TrainClipConfig(text_source="bert")
    with pytest.raises(ValueError, match="model='no-such-model'"):
        train_clip.TrainClipConfig(model="no-such-model")
    with pytest.raises(ValueError, match="batch_size=1"):
        tune_caption_encoder.TuneConfig(batch_size=1)
    with pytest.raises(ValueError, match="group_index=2"):
        cache_caption_embeddings.CacheConfig(group_index=2, num_groups=2)


# ----------------------------------------------------------------------------------------------- stage 2 recipe


def test_stage2_recipe_follows_the_starting_point():
    scratch = train_clip.TrainClipConfig()
    assert scratch.recipe == "scratch"
    assert (scratch.lr, scratch.layer_decay, scratch.warmup_steps) == (1e-3, 1.0, 20)
    pretrained = train_clip.TrainClipConfig(pretrained="laion2b_s34b_b79k")
    assert pretrained.recipe == "pretrained"  # the official LLM2CLIP stage-2 recipe
    assert (pretrained.lr, pretrained.layer_decay, pretrained.warmup_steps) == (1e-5, 0.85, 0)
    overridden = train_clip.TrainClipConfig(pretrained="x.pt", lr=3e-5, warmup_steps=5)
    assert (overridden.lr, overridden.layer_decay, overridden.warmup_steps) == (3e-5, 0.85, 5)
    assert train_clip.TrainClipConfig(layer_decay=0.9).lr == 1e-3
    with pytest.raises(ValueError, match="embed_dim=0"):
        train_clip.TrainClipConfig(embed_dim=0)


def test_stage2_manifest_records_resolved_recipe_and_preprocessing(chain):
    manifest = artifacts.read_manifest(chain["dirs"]["llm2clip"], "train_clip")
    c = manifest["config"]
    assert manifest["recipe"] == "scratch" and (c["lr"], c["layer_decay"], c["warmup_steps"]) == (1e-3, 1.0, 2)
    assert manifest["preprocess"]["size"] == [64, 64] and manifest["preprocess"]["train_scale"] == [0.9, 1.0]
    model, _ = train_clip.load_trained(chain["dirs"]["llm2clip"])
    assert loading.preprocess_of(model) == loading.ImagePreprocess.from_dict(manifest["preprocess"])


def test_stage2_from_a_pretrained_checkpoint_file(chain, tmp_path):
    """A tower given as a checkpoint file: official recipe, the checkpoint's preprocessing and temperature, and
    the run reloads without the file (the saved weights replace it)."""
    clip = open_clip.create_model(clip_model.DEFAULT_MODEL)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(50.0))
    ckpt = tmp_path / "tower.pt"
    torch.save(clip.state_dict(), ckpt)
    cfg = train_clip.TrainClipConfig(pretrained=str(ckpt), epochs=1, batch_size=8, embed_dim=128, dtype="float32")
    out = str(tmp_path / "run")
    metrics = train_clip.train_clip(cfg, chain["data"], out, chain["caches"])
    assert math.isfinite(metrics["loss_last"])
    manifest = artifacts.read_manifest(out, "train_clip")
    c = manifest["config"]
    assert manifest["recipe"] == "pretrained" and (c["lr"], c["layer_decay"], c["warmup_steps"]) == (1e-5, 0.85, 0)
    ckpt.unlink()
    model, _ = train_clip.load_trained(out)
    assert model.head.out_features == 128
    assert abs(model.logit_scale.item() - math.log(50.0)) < 0.01  # started at the pretrained value, lr 1e-5
