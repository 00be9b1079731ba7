"""The benchmarks end to end on tiny data and a tiny random Llama: the caching benchmark's JSON and that the
official-recipe variant batches as LLM2Vec's `encode` does (character-length order, batch 32, each batch padded to
its longest, fp32); the stage-2 and memory contract from real training runs; the 10x dataset's images; the CLI."""

import json
import sys
from collections import Counter

import pytest
import torch

from llm2clip import data, text_encoder, train_clip
from llm2clip.benchmarks import suite as benchmark
from llm2clip.ops import cli

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
    # Input order restored: row i is caption i's embedding, for EVERY i (checking one row misses a permutation that
    # happens to fix it). Brute force: embed each caption alone (no padding, no batch). Both runs do the same bf16
    # arithmetic on the same bf16 weights; padding to the batch's longest and the batch shape change only how the
    # matmuls round, so a right row is within a fraction of bf16's machine epsilon 2**-7 (measured: at most 0.0018
    # relative L2 over these 70 captions, most rows bit-identical). A wrong row holds another caption: median
    # distance 0.98, and under 2**-7 only for a few near-identical captions (one word apart: 0.0026 at least), so
    # any wrong order moves most rows far past the bound. Identical caption texts give identical rows either way.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        alone = torch.cat([text_encoder.embed(encoder, [c]).float() for c in captions])
    relative = (emb - alone).norm(dim=1) / alone.norm(dim=1)
    wrong = [(i, round(r, 4)) for i, r in enumerate(relative.tolist()) if r > 2**-7]
    assert not wrong, f"{len(wrong)} rows are not their own caption's embedding (row, relative L2): {wrong[:5]}"


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
    for key in (
        "ratio_ours_vs_official",
        "ratio_ours_vs_official_in_our_dtype",
        "ratio_official_in_our_dtype_vs_official",
        "bucketed_vs_naive_fixed",
    ):
        assert result[key]["min"] <= result[key]["median"] <= result[key]["max"]
    settings = [(r["max_tokens"], r["max_batch"]) for r in result["sweep"]]
    assert settings[:4] == [(256, 16), (256, 256), (1024, 16), (1024, 256)]
    assert (ours["max_tokens"], ours["max_batch"]) in settings
    assert result["sweep_best"] in {r["variant"] for r in result["sweep"]}
    assert isinstance(result["notes"], list)


# ----------------------------------------------------------------------------------------------- stage 2, memory

TINY_STAGE2 = benchmark.Stage2BenchConfig(
    images=32,
    image_size=32,
    epochs=1,
    batch_size=16,
    workers=0,
    llm=text_encoder.TINY_LLAMA,
    online_batch=4,
    online_rounds=2,
    online_steps=1,
)


@pytest.fixture(scope="module")
def stage2_result():
    return benchmark.run_benchmarks(
        text_encoder.TINY_LLAMA, 8, 2, 64, 8, parts=["stage2", "memory"], stage2=TINY_STAGE2
    )


def test_stage2_and_memory_contract(stage2_result):
    """The keys automation reads, with positive numbers, from real training runs on tiny data."""
    json.dumps(stage2_result)
    stage2, memory = stage2_result["stage2"], stage2_result["memory"]
    assert stage2["images_per_s"] > 0
    assert 0 < stage2["data_wait_share"] <= 1
    assert stage2["cached_vs_online_speedup"] > 0
    online = stage2["cached_vs_online"]
    assert online["speedup"]["min"] <= stage2["cached_vs_online_speedup"] <= online["speedup"]["max"]
    assert len(online["step_seconds"]["cached"]) == len(online["step_seconds"]["online"]) == 2
    assert stage2["training"]["images"] == 32 and stage2["training"]["metrics"]["steps"] == 2
    assert memory["rss_mb_1x"] > 0 and memory["rss_mb_10x"] > 0
    assert memory["ratio_10x_vs_1x"] == pytest.approx(memory["rss_mb_10x"] / memory["rss_mb_1x"])
    assert memory["images_1x"] == 32 and memory["images_10x"] == 320
    assert memory["runs"]["1x"]["steps"] == 2 and memory["runs"]["10x"]["steps"] == 20  # 1 epoch, batch 16 both
    assert memory["command"][1:3] == ["-m", "llm2clip.train_clip"]
    assert set(stage2_result) >= {"stage2", "memory", "machine"} and "caching" not in stage2_result


def test_copied_dataset_has_the_images_copies_times(tiny_dataset, tmp_path):
    """Brute force: every train record of the source appears exactly 10 times (new keys, same captions)."""
    out = benchmark.copied_dataset(tiny_dataset, 10, str(tmp_path / "x10"), 64)
    source = list(data.read_captions(f"{tiny_dataset}/train"))
    copied = list(data.read_captions(f"{out}/train"))
    assert len(copied) == 10 * len(source) == 10 * benchmark.train_images(tiny_dataset)
    assert benchmark.train_images(out) == len(copied)
    assert len({k for _, k, _ in copied}) == len(copied)

    def captions(records: list) -> Counter:
        return Counter(json.dumps(m["captions"], sort_keys=True) for _, _, m in records)

    assert captions(copied) == Counter({k: 10 * v for k, v in captions(source).items()})


def test_train_command_carries_every_field():
    fields = benchmark.train_fields(TINY_STAGE2, epochs=1)
    assert fields["workers"] == 0 and fields["epochs"] == 1
    cmd = benchmark.train_command("D", ["C1", "C2"], "O", fields)
    assert cmd[cmd.index("--batch-size") + 1] == "16" and cmd.count("--caption-embeddings") == 2
    args = train_clip.parser().parse_args(cmd[3:])  # what the entry point makes of it
    assert (args.dataset, args.output, args.caption_embeddings) == ("D", "O", ["C1", "C2"])
    assert (args.batch_size, args.epochs, args.workers, args.device) == (16, 1, 0, "cpu")


def test_cli_refuses_cuda_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        cli.main(["benchmark", "--device", "cuda", "--output", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="needs --device cuda"):
        cli.main(["benchmark", "--only", "gpu", "--output", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="unknown part"):
        cli.main(["benchmark", "--only", "stage3", "--output", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()


def test_peak_rss_is_the_commands_own(tmp_path):
    """A child forked from a large process starts with that process's peak RSS on Linux; the measurement must not.
    Here this process holds ~400 MB and the command ~100 MB (brute force: bytearrays written in full)."""
    held = bytearray(400 * 2**20)
    held[::4096] = b"x" * len(held[::4096])
    cmd = [sys.executable, "-c", "x = bytearray(100 * 2**20); x[::4096] = b'y' * len(x[::4096])"]
    run = benchmark.peak_rss_of_training(cmd, str(tmp_path / "log"))
    assert 100 <= run["peak_rss_mb"] < 250
    del held
