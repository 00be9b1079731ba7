"""The GPU suite's code on tiny shapes on a CPU (`smoke`): the JSON it writes, its FLOP counts against the analytic
formula, the time limit, and the peak table. The real shapes need a GPU (`llm2clip benchmark --device cuda`)."""

import json

import pytest
import torch

from llm2clip.benchmarks import gpu as gpu_benchmark


@pytest.fixture(scope="module")
def suite():
    return gpu_benchmark.run_gpu_suite("cpu", smoke=True, time_limit_s=600)


def test_suite_json_shape(suite):
    json.dumps(suite)  # serialisable as the CLI writes it
    assert suite["smoke"] and suite["compute"]["device"] == "cpu" and suite["notes"] == []
    [tower] = suite["stage2"]
    assert tower["model"] == gpu_benchmark.SMOKE.towers[0][0] and tower["batch"] == gpu_benchmark.SMOKE.towers[0][1]
    assert tower["images_per_s"] > 0 and tower["steps_timed"] >= 3 and tower["flops_per_step_counted"] > 0
    assert tower["step_ms"]["min"] <= tower["step_ms"]["median"] <= tower["step_ms"]["max"]
    assert tower["mfu"] is None and suite["peak_bf16_tflops"] is None  # no known peak for a CPU
    [llm] = suite["caching"]
    assert llm["real_tokens_per_s"] > 0 and llm["padded_tokens_per_s"] >= llm["real_tokens_per_s"]
    assert 0 <= llm["padding_fraction"] < 0.5 and llm["batches_timed"] >= 3 and llm["flops_per_padded_token"] > 0
    assert suite["derived_cached_vs_online_speedup"][tower["model"]] > 1


def test_flop_count_matches_the_analytic_vit_formula(suite):
    """The counter sees the tower (plus the small head, adapter and loss) about as 6 x params x tokens + attention."""
    [tower] = suite["stage2"]
    assert tower["flops_per_step_analytic_vit"] == pytest.approx(tower["flops_per_step_counted"], rel=0.25)


def test_llm_flops_per_token_are_about_twice_the_parameters(suite):
    [llm] = suite["caching"]
    shape = llm["shape"]
    non_embedding = llm["parameters"] - shape["vocab_size"] * shape["hidden_size"]
    assert llm["flops_per_padded_token"] == pytest.approx(2 * non_embedding, rel=0.5)


def test_time_limit_skips_with_a_note():
    out = gpu_benchmark.run_gpu_suite("cpu", smoke=True, time_limit_s=0)
    assert out["stage2"] == [] and out["caching"] == [] and len(out["notes"]) == 2
    assert all("skipped" in n for n in out["notes"]) and "derived_cached_vs_online_speedup" not in out


def test_caption_lengths_are_a_short_and_long_mix():
    lengths = gpu_benchmark.caption_token_lengths(2000)
    assert min(lengths) >= 6 and max(lengths) <= 320
    short = [n for n in lengths if n <= 48]
    assert 0.4 < len(short) / len(lengths) < 0.6 and 50 < sum(lengths) / len(lengths) < 80


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_by_gpu_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu_benchmark.peak_flops(torch.device("cuda")) == peak
    assert gpu_benchmark.peak_flops(torch.device("cpu")) is None


def test_cli_runs_the_smoke_suite(tmp_path):
    from llm2clip.ops import cli

    out = tmp_path / "gpu.json"
    assert cli.main(["benchmark", "--device", "cpu", "--only", "gpu", "--gpu-smoke", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["parts"] == ["gpu"] and result["gpu"]["smoke"] and result["gpu"]["stage2"][0]["images_per_s"] > 0
