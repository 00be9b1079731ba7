"""The bf16 path users get where `dtype=auto` picks it: a CPU with native bf16 (avx512_bf16 or AMX).

Every equality test elsewhere pins float32, so this file is where bf16 runs on purpose. bf16 keeps 8 bits of
mantissa: one rounding is a relative error of at most 2**-8 = 3.9e-3, so the tolerances below are a few of those.
On a CPU without native bf16 these tests are skipped with the reason (bf16 would be emulated, ~7x slower than fp32,
and `auto` never picks it there); `LLM2CLIP_CPU_NATIVE_BF16=1` runs them anyway.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from llm2clip import artifacts, cache_caption_embeddings, data, devices, storage, text_encoder, train_clip

pytestmark = pytest.mark.skipif(
    not devices.cpu_has_native_bf16(),
    reason=f"dtype=auto is float32 here: the CPU flags list {'no ' if not devices.cpu_hardware_bf16() else ''}"
    f"native bf16 (avx512_bf16/amx_bf16), {devices.NATIVE_BF16_ENV}="
    f"{os.environ.get(devices.NATIVE_BF16_ENV, '(unset)')}; set {devices.NATIVE_BF16_ENV}=1 to run the bf16 path",
)
BF16_EPS = 2.0**-8  # one bf16 rounding, relative


def test_auto_resolves_to_bf16_on_this_cpu():
    device, dtype = devices.setup("cpu", "auto")
    assert dtype == "bfloat16"
    with devices.autocast(device, dtype):
        assert (torch.randn(8, 8) @ torch.randn(8, 8)).dtype == torch.bfloat16


def test_caching_in_bf16_matches_float32_within_bf16_rounding(tiny_dataset, lora, tmp_path):
    """The cache with dtype=auto runs the LLM in bf16 (its manifest says so) and stores vectors whose direction
    is the fp32 encoder's up to bf16 rounding: cosine >= 1 - 8 eps per caption (a few roundings through 2 layers;
    a wrong pooling or mask gives cosines far below)."""
    out = str(tmp_path / "cache")
    cfg = cache_caption_embeddings.CacheConfig(use_adapter=False, store_root=str(tmp_path / "store"))
    cache_caption_embeddings.cache_caption_embeddings(cfg, tiny_dataset, lora, out)  # the raw LLM lora was tuned from
    manifest = artifacts.read_manifest(out, "cache_caption_embeddings")
    assert manifest["compute"]["dtype"] == "bfloat16"

    cached, _ = cache_caption_embeddings.load_embeddings([out], "train")
    keys = sorted(cached)[:8]
    metas = {k: m for _, k, m in data.read_captions(storage.join(tiny_dataset, "train"))}
    captions = [text for k in keys for _, text in data.caption_list(metas[k])]
    got = torch.cat([cached[k].float() for k in keys])
    encoder = cache_caption_embeddings.base_encoder(manifest["encoder"], torch.device("cpu"), "float32")
    want, _ = text_encoder.encode_all(encoder, captions, "float32")
    cos = F.cosine_similarity(got, want, dim=-1)
    assert cos.min() >= 1 - 8 * BF16_EPS, cos.min()
    assert not torch.equal(got, want.half().float())  # it did not run in fp32


def test_stage2_in_bf16_tracks_float32(tiny_dataset, tmp_path):
    """train_clip with dtype=auto autocasts to bf16 (recorded in its manifest); from the same init and batches its
    first loss equals the fp32 run's within a few bf16 roundings (|rel| <= 4 eps), and it still learns."""
    from test_train_stream import fake_cache

    cache = fake_cache(tiny_dataset, tmp_path / "cache")
    runs = {}
    for dtype in ("auto", "float32"):
        cfg = train_clip.TrainClipConfig(epochs=2, batch_size=8, workers=0, dtype=dtype, checkpoint_every=0)
        train_clip.train_clip(cfg, tiny_dataset, str(tmp_path / dtype), [cache])
        runs[dtype] = artifacts.read_manifest(str(tmp_path / dtype), "train_clip")
    bf16, fp32 = runs["auto"], runs["float32"]
    assert bf16["compute"]["dtype"] == "bfloat16" and fp32["compute"]["dtype"] == "float32"
    assert bf16["losses"][0] == pytest.approx(fp32["losses"][0], rel=4 * BF16_EPS)
    assert bf16["losses"][0] != fp32["losses"][0]  # the autocast really ran
    assert min(bf16["losses"][-3:]) < bf16["losses"][0]
