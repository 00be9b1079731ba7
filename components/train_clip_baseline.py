"""train_clip_baseline component: a standard CLIP (own 77-token text tower) on the same data and budget."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output
from llm2clip.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_clip_baseline(
    dataset: Input[Dataset],
    vision_model: Output[Model],
    model: str,
    pretrained: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    dtype: str,
    nproc: int = 1,
    allow_hub: bool = False,
):
    """Checkpoint + manifest of the CLIP baseline; it needs no LLM and no cache, so it runs beside stage 1."""
    from llm2clip.artifacts import output_location, point, resolve
    from llm2clip.params import train_clip_config
    from llm2clip.train_clip import launch

    values = dict(vision_model=model, pretrained=pretrained, train_epochs=epochs, train_batch_size=batch_size)
    values.update(train_lr=lr, seed=seed, device=device, dtype=dtype, allow_hub=allow_hub)
    cfg = train_clip_config(values, text_source="clip")
    out = output_location(vision_model.path, vision_model.uri)
    result = launch(cfg, resolve(dataset.path), out, None, nproc)
    point(vision_model.path, out)
    vision_model.metadata.update({"text_source": "clip", "location": out, **result})
