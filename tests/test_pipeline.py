"""The whole pipeline through kfp.local.SubprocessRunner on the tiny profile, via the real CLI entry point."""

import json
import subprocess
import sys

from llm2clip import cli


def test_whole_pipeline_tiny_profile(tmp_path):
    assert cli.main(["run", "--local", "--profile", "tiny", "--output", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for bench in ("synthetic_short", "synthetic_long"):
        assert set(summary["retrieval"][bench]) == {"llm2clip", "llm2clip_raw_llm", "clip_baseline"}
        for values in summary["retrieval"][bench].values():
            assert all(0.0 <= v <= 1.0 for v in values.values())
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


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llm2clip.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_help():
    for args in ([], ["run"], ["compile"]):
        r = run_cli(*args, "--help")
        assert r.returncode == 0 and "usage: llm2clip" in r.stdout


def test_cli_rejects_bad_parameters(tmp_path):
    r = run_cli("run", "--local", "--output", str(tmp_path), "--set", "train_epochs=zero")
    assert r.returncode != 0 and "train_epochs='zero': expected a int" in r.stderr
    r = run_cli("run", "--local", "--output", str(tmp_path), "--set", "no_such=1")
    assert r.returncode != 0 and "no_such: unknown pipeline parameter" in r.stderr
    r = run_cli("run", "--local", "--output", str(tmp_path), "--set", "tune_batch_size=1")
    assert r.returncode != 0 and "batch_size=1" in r.stderr
    r = run_cli("run", "--local", "--profile", "huge")
    assert r.returncode != 0 and "invalid choice: 'huge'" in r.stderr
    assert not (tmp_path / "pipeline_root").exists()  # nothing started
