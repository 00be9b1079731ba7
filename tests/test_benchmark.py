"""The caching benchmark end to end on a tiny random Llama: JSON structure, and that the official-recipe variant
batches as LLM2Vec's `encode` does (character-length order, batch 32, each batch padded to its longest, fp32)."""

import json

import pytest
import torch

from llm2clip import benchmark, text_encoder

N = 70  # three batches of the official recipe: 32, 32, 6


@pytest.fixture(scope="module")
def result():
    return benchmark.caching_benchmark(
        text_encoder.TINY_LLAMA, N, 4, 64, repeats=3, sweep_max_tokens=(256, 1024), sweep_max_batch=(16, 256)
    )


def test_official_recipe_batches_like_llm2vec():
    encoder = text_encoder.load_caption_encoder(text_encoder.TINY_LLAMA, dtype=torch.bfloat16)
    captions = benchmark.caption_mix(N)
    emb, batches = benchmark.official_recipe_encode(encoder, captions, "bfloat16")
    assert [len(b["indices"]) for b in batches] == [32, 32, N - 64]
    order = [i for b in batches for i in b["indices"]]
    assert sorted(order) == list(range(N))
    chars = [len(captions[i]) for i in order]
    assert chars == sorted(chars, reverse=True)  # longest first, by characters as llm2vec's _text_length
    for b in batches:  # padded to the batch's own longest (brute force: tokenize the batch as the model sees it)
        tok = text_encoder.tokenize(encoder, [captions[i] for i in b["indices"]])
        assert b["padded_length"] == tok["input_ids"].shape[1]
        assert b["real_tokens"] == int(tok["attention_mask"].sum())
    assert emb.dtype == torch.float32 and emb.shape == (N, encoder.dim)
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    # input order restored: the first caption's embedding equals embedding it alone (bf16 noise allowed)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        alone = text_encoder.embed(encoder, captions[:1]).float()
    assert torch.allclose(emb[0], alone[0], atol=0.1, rtol=0.1)


def test_caching_benchmark_json(result):
    json.dumps(result)  # serialisable as written by the CLI
    official, ours = result["official_recipe"], result["ours"]
    assert official["weights_dtype"] == "bfloat16" and official["compute_dtype"] == "bfloat16"
    assert official["batch_size"] == 32 and official["store_dtype"] == "float32"
    assert official["order"].startswith("character length") and official["batches"] == 3
    dim = text_encoder.load_caption_encoder(text_encoder.TINY_LLAMA).dim
    assert result["cache_bytes_per_caption"] == {"official_fp32": 4 * dim, "ours_float16": 2 * dim}
    assert official["store_bytes_per_caption"] == 4 * dim and ours["store_bytes_per_caption"] == 2 * dim
    assert result["official_recipe_in_our_dtype"]["compute_dtype"] == result["compute"]["dtype"]
    for row in (official, ours, result["official_recipe_in_our_dtype"], result["naive_fixed"]):
        assert len(row["seconds"]) == 3
        rate = row["real_tokens_per_s"]
        assert rate["min"] <= rate["median"] <= rate["max"]
        assert 0 <= row["padding_fraction"] < 1
    assert result["official_recipe"]["real_tokens"] == ours["real_tokens"]  # same captions, same tokens
    for key in ("ratio_ours_vs_official", "ratio_ours_vs_official_in_our_dtype",
                "ratio_official_in_our_dtype_vs_official", "bucketed_vs_naive_fixed"):  # fmt: skip
        assert result[key]["min"] <= result[key]["median"] <= result[key]["max"]
    settings = [(r["max_tokens"], r["max_batch"]) for r in result["sweep"]]
    assert settings[:4] == [(256, 16), (256, 256), (1024, 16), (1024, 256)]
    assert (ours["max_tokens"], ours["max_batch"]) in settings
    assert result["sweep_best"] in {r["variant"] for r in result["sweep"]}
    assert isinstance(result["notes"], list)
