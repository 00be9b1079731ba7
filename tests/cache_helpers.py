"""Shared by the caching tests: run the cache stage into `out` with a store under `root`, in fp32 unless `dtype` is
given (the tests compare vectors bit for bit; dtype "auto" would be bf16 on a CPU with native bf16)."""

from llm2clip.cache_caption_embeddings import CacheConfig, cache_caption_embeddings


def run(dataset, lora, out, root, **kw):
    return cache_caption_embeddings(
        CacheConfig(store_root=str(root), **{"dtype": "float32", **kw}), dataset, lora, str(out)
    )
