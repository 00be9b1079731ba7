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
    center_text: bool,
    device: str,
    dtype: str,
    nproc: int = 1,
    enabled: bool = True,
    allow_hub: bool = False,
) -> str:
    """Model + manifest from the cache (no LLM); returns their location, which the cluster pipeline hands on
    (train_clip_on_nodes). enabled=False writes a "skipped" manifest evaluate leaves out."""
    from llm2clip.artifacts import NOT_REQUESTED, output_location, point, resolve, write_manifest

    out = output_location(vision_model.path, vision_model.uri)
    if not enabled:  # before importing the ML stack (~6 s of a task's start on 2 cores)
        cfg = {"text_source": "llm", "model": model, "center_text": center_text, "epochs": epochs, "seed": seed}
        write_manifest(out, "train_clip", cfg, {}, skipped=NOT_REQUESTED)
        point(vision_model.path, out)
        return out
    from llm2clip.params import train_clip_config
    from llm2clip.train_clip import launch

    values = dict(vision_model=model, pretrained=pretrained, train_epochs=epochs, train_batch_size=batch_size)
    values.update(train_lr=lr, seed=seed, center_text=center_text, device=device, dtype=dtype, allow_hub=allow_hub)
    cfg = train_clip_config(values, text_source="llm")
    result = launch(cfg, resolve(dataset.path), out, [resolve(a.path) for a in caption_embeddings], nproc)
    point(vision_model.path, out)
    vision_model.metadata.update({"text_source": "llm", "location": out, **result})
    return out
