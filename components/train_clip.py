"""train_clip component: stage 2, a vision tower + the LLM2CLIP adapter on cached caption embeddings."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output
from llm2clip.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_clip(
    dataset: Input[Dataset],
    caption_embeddings: Input[list[Dataset]],
    vision_model: Output[Model],
    model: str,
    pretrained: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
):
    """Checkpoint + manifest. Reads only the cache: the LLM is not loaded."""
    from llm2clip.artifacts import output_location, point, resolve
    from llm2clip.train_clip import TrainClipConfig, train_clip

    cfg = TrainClipConfig(
        text_source="llm",
        model=model,
        pretrained=pretrained or None,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
    out = output_location(vision_model.path, vision_model.uri)
    result = train_clip(cfg, resolve(dataset.path), out, [resolve(a.path) for a in caption_embeddings])
    point(vision_model.path, out)
    vision_model.metadata.update({"text_source": "llm", "location": out, **result})
