"""Stage 2 reads one embedding space: caption caches of two encoders are refused, with or without centring."""

import pytest
from cache_helpers import run

from llm2clip import artifacts, text_encoder, train_clip, tune_caption_encoder


@pytest.fixture(scope="module")
def caches(tiny_dataset, lora, tmp_path_factory) -> dict[str, str]:
    """Three real caches of the tiny dataset: the tuned LLM of one stage-1 run, the raw LLM (no adapter, causal),
    and the tuned LLM of a second stage-1 run (another seed, so other adapter weights)."""
    root = tmp_path_factory.mktemp("encoders")
    second_lora = str(root / "lora2")
    cfg = tune_caption_encoder.TuneConfig(
        llm=text_encoder.TINY_LLAMA, steps=2, batch_size=4, lr=1e-3, lora_r=4, warmup_steps=1, seed=1
    )
    tune_caption_encoder.tune_caption_encoder(cfg, tiny_dataset, second_lora)
    run(tiny_dataset, lora, root / "tuned", root / "store")
    run(tiny_dataset, lora, root / "raw", root / "store", use_adapter=False, attention="causal")
    run(tiny_dataset, second_lora, root / "second_run", root / "store")
    return {name: str(root / name) for name in ("tuned", "raw", "second_run")}


def adapter_of(cache_dir: str) -> str | None:
    return artifacts.read_manifest(cache_dir, "cache_caption_embeddings")["encoder"]["adapter_fingerprint"]


@pytest.mark.parametrize("center_text", [True, False])
@pytest.mark.parametrize("other", ["raw", "second_run"])
def test_caches_of_two_encoders_are_refused(tiny_dataset, caches, tmp_path, center_text, other):
    """A tuned and a raw cache, or the caches of two stage-1 runs, passed as the shard groups of one training: the
    adapter would learn from two embedding spaces at once. Refused before anything trains, centring on or off,
    naming both caches and both encoders' fingerprints."""
    first, second = caches["tuned"], caches[other]
    a, b = adapter_of(first), adapter_of(second)
    assert a is not None and a != b  # the premise: two encoders
    cfg = train_clip.TrainClipConfig(epochs=1, batch_size=8, center_text=center_text)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="caption-embedding caches of two encoders") as refused:
        train_clip.train_clip(cfg, tiny_dataset, str(out), [first, second])
    message = str(refused.value)
    assert first in message and second in message
    assert f"adapter_fingerprint {a}" in message and f"adapter_fingerprint {b}" in message
    assert "adapter_fingerprint" in message.split(" differ in ", 1)[1]
    assert not (out / "model.safetensors").exists()
