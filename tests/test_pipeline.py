"""The whole pipeline through kfp.local.SubprocessRunner on the tiny profile, via the real CLI entry point."""

import json
import subprocess
import sys

import pytest
import torch

from llm2clip.ops import cli


def test_whole_pipeline_tiny_profile(tmp_path):
    assert cli.main(["run", "--local", "--profile", "tiny", "--output", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for bench in ("synthetic_short", "synthetic_long"):
        assert set(summary["retrieval"][bench]) == {"llm2clip", "llm2clip_raw_llm", "clip_baseline"}
        for values in summary["retrieval"][bench].values():
            for k, v in values.items():
                if k.endswith("_ci95"):
                    assert 0.0 <= v[0] <= values[k.removesuffix("_ci95")] <= v[1] <= 1.0, k
                elif k.startswith(("image_to_text", "text_to_image")):
                    assert 0.0 <= v <= 1.0, k
    assert 0.0 <= summary["cra"]["before"] <= 1.0
    for stage in (
        "prepare_data",
        "tune_caption_encoder",
        "cache_caption_embeddings:llm2clip",
        "cache_caption_embeddings:llm2clip_raw_llm",
        "train_clip:llm2clip",
        "train_clip:llm2clip_raw_llm",
        "train_clip:clip_baseline",
        "evaluate",
        "pipeline_wall",
    ):
        assert summary["timings_s"][stage] > 0, stage
    assert (tmp_path / "report.html").exists() and summary["report"].endswith("report.html")
    # the README's "Using a trained model": the run's models load back and embed captions never seen in training
    from llm2clip import inference

    model = inference.from_run(str(tmp_path))
    text = model.encode_text(["a sentence the model never saw", "another one"])
    assert text.shape[0] == 2 and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-4)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "llm2clip.ops.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_help(capsys):
    """`run --help` lists every parameter of the pipeline function once, as `--set` takes it back, with its default
    and the profiles that change it (its description: tests/test_cli.py, from llm2clip.params)."""
    import inspect

    from llm2clip.pipelines.llm2clip_pipeline import llm2clip_pipeline

    for args in ([], ["run"], ["compile"]):
        r = run_cli(*args, "--help")
        assert r.returncode == 0 and "usage: llm2clip" in r.stdout
    assert "pipeline parameters" in run_cli("run", "--help").stdout

    with pytest.raises(SystemExit) as done:
        cli.main(["run", "--help"])
    assert done.value.code == 0
    listing = capsys.readouterr().out.split("pipeline parameters (--set KEY=VALUE", 1)[1].splitlines()[1:]
    heads = [line for line in listing if line.startswith("  ") and not line.startswith("      ")]
    defaults = {k: p.default for k, p in inspect.signature(llm2clip_pipeline.pipeline_func).parameters.items()}
    seen = []
    for head in heads:
        setting = head.strip().split("  (--profile ")[0]
        name = setting.split("=")[0]
        assert cli.parse_overrides([setting], defaults) == {name: defaults[name]}, setting
        seen.append(name)
    assert seen == list(defaults)  # every parameter once, in the pipeline's order
    profiles = cli.PROFILES  # the values `run --local` uses: each profile's, where it changes the default
    num_train = f"  num_train={defaults['num_train']}  (--profile default {profiles['default']['num_train']}, tiny "
    assert num_train + f"{profiles['tiny']['num_train']})" in heads


def test_cli_rejects_bad_parameters(tmp_path):
    r = run_cli("run", "--local", "--output", str(tmp_path), "--set", "train_epochs=zero")
    assert r.returncode != 0 and "train_epochs='zero': expected an int" in r.stderr
    r = run_cli("run", "--local", "--output", str(tmp_path), "--set", "no_such=1")
    assert r.returncode != 0 and "no_such: unknown pipeline parameter" in r.stderr
    r = run_cli("run", "--local", "--output", str(tmp_path), "--set", "tune_batch_size=1")
    assert r.returncode != 0 and "batch_size=1" in r.stderr
    r = run_cli("run", "--local", "--profile", "huge")
    assert r.returncode != 0 and "invalid choice: 'huge'" in r.stderr
    # device, dtype and zero-shot sets fail before any task, not inside stage 1
    r = run_cli("run", "--local", "--output", str(tmp_path), "--set", "dtype=fp8")
    assert r.returncode != 0 and "dtype='fp8': must be one of" in r.stderr
    r = run_cli("run", "--local", "--output", str(tmp_path), "--set", 'zero_shot=["imagenet"]')
    assert r.returncode != 0 and "zero_shot='imagenet'" in r.stderr
    if not torch.cuda.is_available():
        r = run_cli("run", "--local", "--output", str(tmp_path), "--set", "device=cuda")
        assert r.returncode != 0 and "no CUDA device is visible" in r.stderr
    assert not (tmp_path / "pipeline_root").exists()  # nothing started


def test_whole_pipeline_on_s3_then_rerun_hits_the_cache(tmp_path, s3_env, monkeypatch):
    """Shards, cache and checkpoints live in the S3 store; KFP artifacts only point there; a rerun embeds nothing."""
    from llm2clip import artifacts, storage

    monkeypatch.setenv(artifacts.STORE_ENV, s3_env)  # restored after the test (the CLI sets it for its tasks)
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main(["run", "--local", "--profile", "tiny", "--output", str(first), "--store", s3_env]) == 0
    assert cli.main(["run", "--local", "--profile", "tiny", "--output", str(second), "--store", s3_env]) == 0
    s1 = json.loads((first / "summary.json").read_text())
    s2 = json.loads((second / "summary.json").read_text())
    assert s1["cache"]["misses"] > 0
    assert s2["cache"] == {"hits": s1["cache"]["hits"] + s1["cache"]["misses"], "misses": 0}
    assert not list(first.rglob("*.tar")) and not list(first.rglob("model.safetensors"))  # nothing bulky locally
    pointers = list(first.rglob(artifacts.LOCATION))
    assert len(pointers) >= 6
    for p in pointers:
        uri = json.loads(p.read_text())["uri"]
        assert uri.startswith(s3_env) and storage.exists(storage.join(uri, artifacts.MANIFEST))
    assert storage.list_files(storage.join(s3_env, "embedding-cache"), ".keys.json", recursive=True)


def test_cli_rejects_an_unusable_store(tmp_path, s3_env):
    for store, message in (
        ("s3://no-such-bucket/x", "bucket 'no-such-bucket' does not exist"),
        ("/local/dir", "not an object-store URI"),
    ):
        with pytest.raises(SystemExit, match=message):
            cli.main(["run", "--local", "--profile", "tiny", "--output", str(tmp_path), "--store", store])
