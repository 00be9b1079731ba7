"""Benchmarks that report numbers (ratios measured in one run): caption caching and shard streaming.

llm2clip benchmark --output runs/benchmark.json [--llm smollm2-135m-instruct] [--captions 480]
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
from collections.abc import Iterator

import torch

from llm2clip import data, storage, synthetic, text_encoder


def caption_mix(n: int, seed: int = 0) -> list[str]:
    """A realistic mix: per image two short captions and one long dense caption, shuffled."""
    recs = synthetic.generate("bench", -(-n // 3), 2, 2, 32, seed)
    caps = [t for r in recs for _, t in data.caption_list(r["json"])][:n]
    random.Random(seed).shuffle(caps)
    return caps


@torch.no_grad()
def naive_encode(encoder, captions: list[str], batch: int, dtype: str, fixed_length: int | None) -> int:
    """Input order, fixed batch size; pad to `fixed_length` (or to each batch's longest when None).
    Returns padded tokens processed."""
    padded = 0
    encoder.model.eval()
    for s in range(0, len(captions), batch):
        kw = {"padding": "max_length", "max_length": fixed_length} if fixed_length else {"padding": "longest"}
        tok = encoder.tokenizer(captions[s : s + batch], truncation=True, return_tensors="pt", **kw)
        with text_encoder.autocast(dtype):
            states = text_encoder.hidden_states(encoder, tok["input_ids"], tok["attention_mask"])
            text_encoder.mean_pool(states, tok["attention_mask"])
        padded += tok["input_ids"].numel()
    return padded


def _measure(name: str, fn, captions: list[str], real_tokens: int) -> dict:
    t0 = time.perf_counter()
    padded = fn(captions)
    seconds = time.perf_counter() - t0
    row = {
        "variant": name,
        "captions": len(captions),
        "seconds": seconds,
        "captions_per_s": len(captions) / seconds,
        "real_tokens_per_s": real_tokens / seconds,
        "padded_tokens": padded,
        "padding_fraction": 1 - real_tokens / padded,
    }
    print(f"  {name:<40} {row['captions_per_s']:8.1f} captions/s {row['real_tokens_per_s']:9.1f} tokens/s "
          f"padding {100 * row['padding_fraction']:5.1f}%", flush=True)  # fmt: skip
    return row


def caching_benchmark(llm: str, n: int, naive_n: int, fixed_length: int) -> dict:
    """Length-bucketed bf16 (ours) vs naive fixed-length padding vs the official recipe, same model/captions."""
    encoder = text_encoder.load_caption_encoder(llm, max_length=fixed_length)
    captions = caption_mix(n)
    subset = captions[:naive_n]  # the slow variants run on a prefix of the same shuffled mix

    def real(caps: list[str]) -> int:
        return sum(text_encoder.token_lengths(encoder, caps))

    text_encoder.encode_all(encoder, captions[:16], "bfloat16")  # warm-up
    rows = [
        _measure("bucketed_bf16 (ours)", lambda c: text_encoder.encode_all(encoder, c, "bfloat16")[1],
                 captions, real(captions)),
        _measure(f"naive_fixed_{fixed_length}_bf16_batch32",
                 lambda c: naive_encode(encoder, c, 32, "bfloat16", fixed_length), subset, real(subset)),
        _measure("official_recipe_fp32_batch32_input_order",
                 lambda c: naive_encode(encoder, c, 32, "float32", None), subset, real(subset)),
    ]  # fmt: skip
    ours = rows[0]["captions_per_s"]
    return {
        "llm": llm,
        "captions": n,
        "naive_captions": naive_n,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "bucketed_vs_naive_fixed": ours / rows[1]["captions_per_s"],
        "bucketed_vs_official_recipe": ours / rows[2]["captions_per_s"],
        "cache_bytes_per_caption": {"ours_fp16": 2 * encoder.dim, "official_fp32": 4 * encoder.dim},
    }


@contextlib.contextmanager
def _s3_for_benchmark() -> Iterator[str]:
    """The configured S3 endpoint, or a moto server on 127.0.0.1 (dev extra) for the duration."""
    if os.environ.get("MINIO_ENDPOINT"):
        yield os.environ.get("LLM2CLIP_BENCH_BUCKET", "s3://llm2clip-bench/stream")
        return
    import logging
    import socket

    from minio import Minio
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"MINIO_ENDPOINT": f"127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        Minio(env["MINIO_ENDPOINT"], "bench", "bench", secure=False).make_bucket("llm2clip-bench")
        yield "s3://llm2clip-bench/stream"
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def streaming_benchmark(num_images: int, image_size: int) -> dict:
    """Read (and decode) the same canonical shards from local disk and from the S3 server."""
    cfg = data.PrepareDataConfig(num_train=num_images, num_eval=8, image_size=image_size, shard_size=200)
    out = {}
    with tempfile.TemporaryDirectory() as tmp, _s3_for_benchmark() as s3:
        for where, root in (("local", tmp), ("s3", s3)):
            data.prepare_data(cfg, root)
            split = storage.join(root, "train")
            nbytes = sum(len(storage.read_bytes(f)) for f in storage.list_files(split, ".tar"))
            t0 = time.perf_counter()
            count = sum(1 for _ in data.read_split(split))
            seconds = time.perf_counter() - t0
            out[where] = {"images": count, "seconds": seconds, "images_per_s": count / seconds,
                          "MB_per_s": nbytes / seconds / 1e6}  # fmt: skip
            print(f"  stream {where:<6} {count / seconds:8.1f} images/s {nbytes / seconds / 1e6:7.2f} MB/s", flush=True)
    out["s3_vs_local"] = out["s3"]["images_per_s"] / out["local"]["images_per_s"]
    return out


def run_benchmarks(llm: str, captions: int, naive_captions: int, fixed_length: int, stream_images: int) -> dict:
    print("caption caching:", flush=True)
    caching = caching_benchmark(llm, captions, naive_captions, fixed_length)
    print("shard streaming:", flush=True)
    streaming = streaming_benchmark(stream_images, 64)
    return {"caching": caching, "streaming": streaming, "machine": {"cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available()}}  # fmt: skip
