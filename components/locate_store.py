"""locate_store component: the object store this run writes to, as a value that enters the cache keys."""

from kfp import dsl
from llm2clip.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def locate_store() -> str:
    """LLM2CLIP_STORE of the task's environment (the ConfigMap on a cluster, `--store` locally); "" for none.

    Never cached: prepare_data takes the value as an input, so a run against another store misses the cache."""
    import os

    from llm2clip.artifacts import STORE_ENV

    return os.environ.get(STORE_ENV, "")
