"""Shared by the caching tests: run the cache stage into `out` with a store under `root`."""

from llm2clip.embedding_cache import CacheConfig, cache_caption_embeddings


def run(dataset, lora, out, root, **kw):
    return cache_caption_embeddings(CacheConfig(store_root=str(root), **kw), dataset, lora, str(out))
