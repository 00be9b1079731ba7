"""prepare_data component: validate a source and write the canonical shards."""

from kfp import dsl
from kfp.dsl import Dataset, Output
from llm2clip.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data(
    dataset: Output[Dataset],
    source: str,
    source_options: dict,
    num_train: int,
    num_eval: int,
    image_size: int,
    seed: int,
    cache_groups: int,
    store: str = "",
) -> list[dict[str, int]]:
    """Validated train + eval shards, stats and rejects. Returns the shard groups the cache fans out over, typed so
    that each loop item compiles as a dict (STRUCT), the type of cache_caption_embeddings' `group` (the KFP driver
    refuses a STRING item there). `store` (LLM2CLIP_STORE, from locate_store) only enters the cache key."""
    from llm2clip.artifacts import output_location, point
    from llm2clip.params import prepare_data_config, shard_groups
    from llm2clip.prepare_data import prepare_data

    values = dict(source=source, source_options=source_options, num_train=num_train, num_eval=num_eval)
    cfg = prepare_data_config(dict(values, image_size=image_size, seed=seed))
    groups = shard_groups(cache_groups)
    out = output_location(dataset.path, dataset.uri)
    stats = prepare_data(cfg, out)
    point(dataset.path, out)
    dataset.metadata.update({"location": out, **stats})
    return groups
