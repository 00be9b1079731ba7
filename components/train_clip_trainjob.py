"""train_clip_trainjob component: stage 2 on `nodes` nodes as a Kubeflow Trainer TrainJob this pod follows."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output
from llm2clip.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_clip_trainjob(
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
    nodes: int,
    nproc: int,
    gpus: int,
    node_cpu: str,
    node_memory: str,
    node_selector: dict,
    tolerations: list,
    image: str,
    enabled: bool = True,
    allow_hub: bool = False,
    models_pvc: str = "",
) -> str:
    """As train_clip, on nodes x nproc processes (gpus, node_cpu, node_memory, models_pvc per node); no GPU here."""
    from llm2clip.artifacts import NOT_REQUESTED, output_location, point, resolve, write_manifest

    out = output_location(vision_model.path, vision_model.uri)
    if not enabled:
        cfg = {"text_source": "llm", "model": model, "center_text": center_text, "epochs": epochs, "seed": seed}
        write_manifest(out, "train_clip", cfg, {}, skipped=NOT_REQUESTED)
        point(vision_model.path, out)
        return out
    from llm2clip.ops.trainjob import NodePlacement, train_on_nodes
    from llm2clip.params import train_clip_config

    values = dict(vision_model=model, pretrained=pretrained, train_epochs=epochs, train_batch_size=batch_size)
    values.update(train_lr=lr, seed=seed, center_text=center_text, device=device, dtype=dtype, allow_hub=allow_hub)
    cfg = train_clip_config(values, text_source="llm")
    place = NodePlacement(nodes, nproc, image, gpus, node_cpu, node_memory, node_selector, tolerations, models_pvc)
    result = train_on_nodes(cfg, resolve(dataset.path), out, [resolve(a.path) for a in caption_embeddings], place)
    point(vision_model.path, out)
    vision_model.metadata.update({"text_source": "llm", "location": out, "nodes": nodes, **result})
    return out
