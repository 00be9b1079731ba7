"""Using a trained model: encode_text reproduces the cache path (LLM + adapter), encode_image the evaluation path,
for LLM2CLIP, the raw-LLM baseline and the CLIP baseline, from local directories and s3://."""

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llm2clip import (
    cache_caption_embeddings,
    data,
    evaluate,
    inference,
    loading,
    storage,
    text_encoder,
    train_clip,
    tune_caption_encoder,
)


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    out = {k: str(root / k) for k in ("lora", "cache", "raw", "llm2clip", "llm2clip_raw_llm", "clip_baseline")}
    cfg = tune_caption_encoder.TuneConfig(
        llm=text_encoder.TINY_LLAMA, steps=2, batch_size=4, lora_r=4, lora_alpha=8, device="cpu", dtype="float32"
    )
    tune_caption_encoder.tune_caption_encoder(cfg, tiny_dataset, out["lora"])
    for key, use_adapter, attention in (("cache", True, "as_tuned"), ("raw", False, "causal")):
        ccfg = cache_caption_embeddings.CacheConfig(
            use_adapter=use_adapter, attention=attention, device="cpu", dtype="float32", store_root=str(root / "store")
        )
        cache_caption_embeddings.cache_caption_embeddings(ccfg, tiny_dataset, out["lora"], out[key])
    tcfg = dict(epochs=1, batch_size=8, device="cpu", dtype="float32")
    train_clip.train_clip(train_clip.TrainClipConfig(**tcfg), tiny_dataset, out["llm2clip"], [out["cache"]])
    train_clip.train_clip(train_clip.TrainClipConfig(**tcfg), tiny_dataset, out["llm2clip_raw_llm"], [out["raw"]])
    train_clip.train_clip(train_clip.TrainClipConfig(text_source="clip", **tcfg), tiny_dataset, out["clip_baseline"])
    return out


# Tolerances, all in fp32 (every model here is loaded with dtype="float32", on every CPU). The cache stores the
# fp32 LLM vector rounded to fp16: half an fp16 ulp (2**-11 relative), one ulp (2**-10) when another batch padding
# moves the fp32 value across a rounding boundary; fp16 subnormals are spaced 2**-24 apart.
FP16_ULP, FP16_TINY = 2.0**-10, 2.0**-24
# Unit vectors (or their dot products) computed once from the fp32 LLM vector and once from its fp16 copy: the
# adapter carries the ~5e-4 relative input rounding to at most 4.7e-5 in any component (measured on the tiny run).
UNIT_ATOL = 2e-4


def eval_captions(dataset: str, split: str = "synthetic_long") -> tuple[list[str], list[dict]]:
    metas = [m for _, _, m in data.read_captions(str(Path(dataset) / data.split_path(split)))]
    return [m["key"] for m in metas], metas


@pytest.mark.parametrize("name,cache", [("llm2clip", "cache"), ("llm2clip_raw_llm", "raw")])
def test_encode_text_runs_the_llm_as_the_cache_did_then_the_adapter(run, tiny_dataset, name, cache):
    enc = inference.load_model(run[name], device="cpu", dtype="float32")
    assert enc.llm is not None and enc.llm.bidirectional == (name == "llm2clip")  # raw: causal, as the paper
    cached, _ = cache_caption_embeddings.load_embeddings([run[cache]], "synthetic_long")
    keys, metas = eval_captions(tiny_dataset)
    texts = [t for m in metas for _, t in data.caption_list(m)]
    expected_llm = torch.cat([cached[k] for k in keys]).float()  # fp16 storage
    torch.testing.assert_close(enc.text_inputs(texts), expected_llm, atol=FP16_TINY, rtol=FP16_ULP)
    with torch.no_grad():
        expected = enc.model.encode_text(expected_llm, normalize=True)
    torch.testing.assert_close(enc.encode_text(texts), expected, atol=UNIT_ATOL, rtol=0)


def test_a_caption_never_seen_in_training_is_embedded(run):
    enc = inference.load_model(run["llm2clip"], device="cpu", dtype="float32")
    unseen = ["a violet hexagon balanced on a striped zebra", "two red circles"]
    emb = enc.encode_text(unseen)
    assert emb.shape == (2, enc.model.adapter.proj.out_features)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)


@pytest.mark.parametrize("name", ["llm2clip", "clip_baseline"])
def test_encode_image_is_the_evaluation_path_for_pil_and_tensors(run, tiny_dataset, name):
    enc = inference.load_model(run[name], device="cpu", dtype="float32")
    split = str(Path(tiny_dataset) / data.split_path("synthetic_short"))
    pil = [r["image"] for r in data.read_split(split)]
    _, _, pixels = loading.load_images(split, enc.preprocess)
    with torch.no_grad():
        expected = enc.model.encode_image(enc.preprocess.normalize(pixels), normalize=True)
    from_pil = enc.encode_image(pil)
    torch.testing.assert_close(from_pil, expected, atol=1e-5, rtol=1e-5)
    raw = torch.stack([loading._to_tensor(im) for im in pil])  # full-size uint8, not yet preprocessed
    torch.testing.assert_close(enc.encode_image(raw), from_pil, atol=1e-6, rtol=1e-6)


def test_clip_baseline_text_is_its_own_tokenizer_and_text_tower(run):
    enc = inference.load_model(run["clip_baseline"], device="cpu", dtype="float32")
    assert enc.llm is None
    texts = ["a red circle", "a picture of a blue square and a green cross"]
    tokens = open_clip.get_tokenizer(enc.manifest["config"]["model"])(texts)
    with torch.no_grad():
        expected = enc.model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(enc.encode_text(texts), expected)


def test_images_rank_for_a_sentence_as_evaluation_ranks_them(run, tiny_dataset, monkeypatch):
    """The README use (images ranked for a sentence) gives evaluate's ranking: for every short caption of the
    benchmark, `encode_text(caption) @ encode_image(PIL images).T` equals the similarities evaluate scores from
    the cache and its own image path (captured where they enter retrieval_hits) within UNIT_ATOL, and orders
    every pair of images that evaluate's scores separate by more than twice that the same way. A wrong adapter,
    skipped image normalisation or a vector normalised along the wrong axis moves scores by 1e-2 and more."""
    captured = {}
    real_hits = evaluate.retrieval_hits

    def spy(image_emb, text_emb, *args, **kwargs):
        captured.update(images=image_emb, texts=text_emb)
        return real_hits(image_emb, text_emb, *args, **kwargs)

    monkeypatch.setattr(evaluate, "retrieval_hits", spy)
    evaluate.score_model(
        run["llm2clip"], tiny_dataset, "synthetic_short", [run["cache"]], evaluate.EvaluateConfig(device="cpu")
    )
    want = F.normalize(captured["texts"], dim=-1) @ F.normalize(captured["images"], dim=-1).T  # [M, N]

    split = str(Path(tiny_dataset) / data.split_path("synthetic_short"))
    pil = [r["image"] for r in data.read_split(split)]
    sentences = [t for _, _, m in data.read_captions(split) for kind, t in data.caption_list(m) if kind == "short"]
    enc = inference.load_model(run["llm2clip"], device="cpu", dtype="float32")
    got = enc.encode_text(sentences) @ enc.encode_image(pil).T
    assert got.shape == want.shape == (len(sentences), len(pil))
    torch.testing.assert_close(got, want, atol=UNIT_ATOL, rtol=0)
    gap = want[:, :, None] - want[:, None, :]  # [M, N, N]: image a over image b for each sentence
    separated = gap.abs() > 2 * UNIT_ATOL
    assert separated.float().mean() > 0.5  # most pairs are told apart, so the ranking below says something
    agree = torch.sign(got[:, :, None] - got[:, None, :]) == torch.sign(gap)
    assert bool(agree[separated].all()), f"{int((~agree[separated]).sum())} image pairs ranked the other way"


def test_a_different_adapter_or_pooling_is_refused(run, tmp_path):
    other = tmp_path / "lora"
    shutil.copytree(run["lora"], other)
    weights = other / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights)
    with pytest.raises(ValueError, match="not the one"):
        inference.load_model(run["llm2clip"], text_lora_dir=str(other), device="cpu")
    old = tmp_path / "old_model"
    shutil.copytree(run["llm2clip"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["cache"]["encoder"]["pooling"] = "mean"  # embeddings made with BOS/specials in the mean
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="pooled by 'mean'"):
        inference.load_model(str(old), device="cpu")


def test_a_hub_llm_is_downloaded_only_with_allow_hub(run, tmp_path, monkeypatch):
    """The base LLM a model's cache recorded is resolved as the stages resolve it (llm2clip.model_sources): a hub id
    not in the local cache is refused offline, naming allow_hub, and reaches the hub only with allow_hub=True."""
    from llm2clip import model_sources

    hub_model = tmp_path / "hub_model"
    shutil.copytree(run["llm2clip"], hub_model)
    manifest = json.loads((hub_model / "manifest.json").read_text())
    manifest["cache"]["encoder"]["base_model"] = "acme/llm-not-in-any-cache"
    (hub_model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"^llm='acme/llm-not-in-any-cache': .*offline \(allow_hub=False\)"):
        inference.load_model(str(hub_model), text_lora_dir=run["lora"], device="cpu")
    asked = []

    def hub_snapshot(repo_id: str, *, parameter: str, allow_hub: bool):
        asked.append((repo_id, allow_hub))
        raise RuntimeError("the hub was reached")  # no network in tests

    monkeypatch.setattr(model_sources, "hub_snapshot", hub_snapshot)
    with pytest.raises(RuntimeError, match="the hub was reached"):
        inference.from_run(
            {"artifacts": {"text_lora": run["lora"], "models": {"llm2clip": str(hub_model)}}},
            device="cpu",
            allow_hub=True,
        )
    assert asked == [("acme/llm-not-in-any-cache", True)]


def test_from_run_loads_every_model_from_s3(run, s3_env):
    uris = {}
    for key in ("lora", "llm2clip", "llm2clip_raw_llm", "clip_baseline"):
        uris[key] = storage.join(s3_env, key)
        storage.upload_dir(run[key], uris[key])
    models = {k: uris[k] for k in ("llm2clip", "llm2clip_raw_llm", "clip_baseline")}
    storage.write_json(
        storage.join(s3_env, "eval", "summary.json"), {"artifacts": {"text_lora": uris["lora"], "models": models}}
    )
    texts = ["a red circle and a blue square"]
    for name in models:
        remote = inference.from_run(storage.join(s3_env, "eval"), name, device="cpu", dtype="float32")
        local = inference.load_model(run[name], text_lora_dir=run["lora"], device="cpu", dtype="float32")
        torch.testing.assert_close(remote.encode_text(texts), local.encode_text(texts))
    with pytest.raises(ValueError, match="has models"):
        inference.from_run({"artifacts": {"models": models}}, "nope")


def test_evaluate_loads_models_with_the_runs_allow_hub(tiny_dataset, monkeypatch):
    """evaluate's zero-shot reloads each model's text side through load_model: the run's allow_hub goes with it."""
    from llm2clip import evaluate

    loaded = []
    monkeypatch.setattr(inference, "load_model", lambda model_dir, **kw: loaded.append((model_dir, kw["allow_hub"])))
    for allow_hub in (False, True):
        cfg = evaluate.EvaluateConfig(zero_shot=(), allow_hub=allow_hub)
        assert evaluate.zero_shot_all(cfg, tiny_dataset, "lora", {"llm2clip": "model"}) == {}
    assert loaded == [("model", False), ("model", True)]
