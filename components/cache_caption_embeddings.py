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
    attention: str,
    device: str,
    dtype: str,
    allow_hub: bool = False,
):
    """fp16 safetensors per shard keyed by sample key, with a manifest (use_adapter=False: the raw LLM;
    attention "causal": the LLM as it is, the paper's raw-LLM baseline)."""
    from llm2clip.artifacts import output_location, point, resolve
    from llm2clip.cache_caption_embeddings import cache_caption_embeddings
    from llm2clip.params import cache_config

    values = dict(allow_hub=allow_hub, device=device, dtype=dtype)
    cfg = cache_config(values, group=group, use_adapter=use_adapter, attention=attention)
    out = output_location(caption_embeddings.path, caption_embeddings.uri)
    result = cache_caption_embeddings(cfg, resolve(dataset.path), resolve(text_lora.path), out)
    point(caption_embeddings.path, out)
    caption_embeddings.metadata.update({"location": out, **result})
