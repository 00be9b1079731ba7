"""Using a trained model: encode_text reproduces the cache path (LLM + adapter), encode_image the evaluation path,
for LLM2CLIP, the raw-LLM baseline and the CLIP baseline, from local directories and s3://."""

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from llm2clip import data, embedding_cache, inference, loading, storage, text_encoder, train_clip, tune


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    out = {k: str(root / k) for k in ("lora", "cache", "raw", "llm2clip", "llm2clip_raw_llm", "clip_baseline")}
    cfg = tune.TuneConfig(
        llm=text_encoder.TINY_LLAMA, steps=2, batch_size=4, lora_r=4, lora_alpha=8, device="cpu", dtype="float32"
    )
    tune.tune_caption_encoder(cfg, tiny_dataset, out["lora"])
    for key, use_adapter, attention in (("cache", True, "as_tuned"), ("raw", False, "causal")):
        ccfg = embedding_cache.CacheConfig(use_adapter=use_adapter, attention=attention, device="cpu",
                                           dtype="float32", store_root=str(root / "store"))  # fmt: skip
        embedding_cache.cache_caption_embeddings(ccfg, tiny_dataset, out["lora"], out[key])
    tcfg = dict(epochs=1, batch_size=8, device="cpu", dtype="float32")
    train_clip.train_clip(train_clip.TrainClipConfig(**tcfg), tiny_dataset, out["llm2clip"], [out["cache"]])
    train_clip.train_clip(train_clip.TrainClipConfig(**tcfg), tiny_dataset, out["llm2clip_raw_llm"], [out["raw"]])
    train_clip.train_clip(train_clip.TrainClipConfig(text_source="clip", **tcfg), tiny_dataset, out["clip_baseline"])
    return out


def eval_captions(dataset: str, split: str = "synthetic_long") -> tuple[list[str], list[dict]]:
    metas = [m for _, _, m in data.read_captions(str(Path(dataset) / data.split_path(split)))]
    return [m["key"] for m in metas], metas


@pytest.mark.parametrize("name,cache", [("llm2clip", "cache"), ("llm2clip_raw_llm", "raw")])
def test_encode_text_runs_the_llm_as_the_cache_did_then_the_adapter(run, tiny_dataset, name, cache):
    enc = inference.load_model(run[name], device="cpu", dtype="float32")
    assert enc.llm is not None and enc.llm.bidirectional == (name == "llm2clip")  # raw: causal, as the paper
    cached, _ = embedding_cache.load_embeddings([run[cache]], "synthetic_long")
    keys, metas = eval_captions(tiny_dataset)
    texts = [t for m in metas for _, t in data.caption_list(m)]
    expected_llm = torch.cat([cached[k] for k in keys]).float()  # fp16 storage
    torch.testing.assert_close(enc.text_inputs(texts), expected_llm, atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        expected = enc.model.encode_text(expected_llm, normalize=True)
    torch.testing.assert_close(enc.encode_text(texts), expected, atol=2e-2, rtol=2e-2)


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


def test_images_rank_for_a_sentence(run, tiny_dataset):
    """The README use: retrieve images for a sentence; scores are cosine similarities of unit vectors."""
    enc = inference.load_model(run["llm2clip"], device="cpu", dtype="float32")
    pil = [r["image"] for r in data.read_split(str(Path(tiny_dataset) / data.split_path("synthetic_short")))]
    scores = (enc.encode_image(pil) @ enc.encode_text(["a red circle"]).T).squeeze(1)
    assert scores.shape == (len(pil),) and bool((scores.abs() <= 1 + 1e-5).all())


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


def test_from_run_loads_every_model_from_s3(run, s3_env):
    uris = {}
    for key in ("lora", "llm2clip", "llm2clip_raw_llm", "clip_baseline"):
        uris[key] = storage.join(s3_env, key)
        storage.upload_dir(run[key], uris[key])
    models = {k: uris[k] for k in ("llm2clip", "llm2clip_raw_llm", "clip_baseline")}
    storage.write_json(storage.join(s3_env, "eval", "summary.json"),
                       {"artifacts": {"text_lora": uris["lora"], "models": models}})  # fmt: skip
    texts = ["a red circle and a blue square"]
    for name in models:
        remote = inference.from_run(storage.join(s3_env, "eval"), name, device="cpu", dtype="float32")
        local = inference.load_model(run[name], text_lora_dir=run["lora"], device="cpu", dtype="float32")
        torch.testing.assert_close(remote.encode_text(texts), local.encode_text(texts))
    with pytest.raises(ValueError, match="has models"):
        inference.from_run({"artifacts": {"models": models}}, "nope")
