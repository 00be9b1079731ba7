"""Shared fixtures: everything offline, a tiny random Llama, a tiny prepared dataset."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Converted/tiny models live in a per-session cache unless LLM2CLIP_CACHE is set by the caller."""
    if "LLM2CLIP_CACHE" not in os.environ:
        os.environ["LLM2CLIP_CACHE"] = str(tmp_path_factory.mktemp("llm2clip-cache"))
    return os.environ["LLM2CLIP_CACHE"]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    from llm2clip.prepare_data import PrepareDataConfig, prepare_data

    out = str(tmp_path_factory.mktemp("data"))
    prepare_data(PrepareDataConfig(num_train=48, num_eval=12, shard_size=20), out)
    return out


@pytest.fixture()
def tiny_encoder():
    from llm2clip.text_encoder import TINY_LLAMA, load_caption_encoder

    return load_caption_encoder(TINY_LLAMA)


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server for the session; tests set its endpoint in the environment through `s3_env`."""
    from s3_servers import Moto

    server = Moto()
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def s3_env(moto_server, monkeypatch):
    """Point llm2clip.storage at the moto server and give a fresh bucket; yields its s3:// base URI."""
    import uuid

    from s3_servers import make_bucket

    for k, v in moto_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LLM2CLIP_S3_RETRIES", "3")
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    make_bucket(bucket)
    return f"s3://{bucket}/prefix"


@pytest.fixture(scope="module")
def lora(tiny_dataset, tmp_path_factory) -> str:
    """A LoRA adapter tuned for 2 steps on the tiny Llama (the caching tests' stage-1 output)."""
    from llm2clip import text_encoder, tune_caption_encoder

    out = str(tmp_path_factory.mktemp("lora"))
    cfg = tune_caption_encoder.TuneConfig(
        llm=text_encoder.TINY_LLAMA, steps=2, batch_size=4, lr=1e-3, lora_r=4, warmup_steps=1
    )
    tune_caption_encoder.tune_caption_encoder(cfg, tiny_dataset, out)
    return out
