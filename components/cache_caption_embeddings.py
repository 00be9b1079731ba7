"""cache_caption_embeddings component: embed one shard group's captions with the frozen LLM."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output
from llm2clip.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def cache_caption_embeddings(
    dataset: Input[Dataset],
    text_lora: Input[Model],
    caption_embeddings: Output[Dataset],
    group: dict,
    use_adapter: bool,
):
    """fp16 safetensors per shard keyed by sample key, with a manifest (use_adapter=False: the raw LLM)."""
    from llm2clip.embedding_cache import CacheConfig, cache_caption_embeddings

    cfg = CacheConfig(
        use_adapter=use_adapter, group_index=int(group["group_index"]), num_groups=int(group["num_groups"])
    )
    result = cache_caption_embeddings(cfg, dataset.path, text_lora.path, caption_embeddings.path)
    caption_embeddings.metadata.update(result)
