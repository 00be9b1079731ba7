"""tune_caption_encoder component: stage 1, caption-contrastive LoRA tuning of the LLM."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output
from llm2clip.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune_caption_encoder(
    dataset: Input[Dataset],
    text_lora: Output[Model],
    metrics: Output[Metrics],
    llm: str,
    bidirectional: bool,
    steps: int,
    batch_size: int,
    lr: float,
    lora_r: int,
    seed: int,
    device: str,
    dtype: str,
    allow_hub: bool = False,
):
    """LoRA adapter + manifest; logs the loss (CRA is measured in evaluate, from the caption caches)."""
    import json

    from llm2clip.artifacts import output_location, point, resolve
    from llm2clip.tune_caption_encoder import TuneConfig, tune_caption_encoder

    cfg = TuneConfig(
        llm=llm,
        bidirectional=bidirectional,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        warmup_steps=max(1, steps // 8),
        seed=seed,
        device=device,
        dtype=dtype,
        allow_hub=allow_hub,
    )
    out = output_location(text_lora.path, text_lora.uri)
    result = tune_caption_encoder(cfg, resolve(dataset.path), out)
    point(text_lora.path, out)
    for k in ("cra_before", "cra_before_bidirectional", "cra_after", "loss_last"):
        if isinstance(result.get(k), float):  # CRA is None when skipped (no eval set with two short captions)
            metrics.log_metric(k, result[k])
    text_lora.metadata.update({"base_model": llm, "location": out, **result})
    with open(metrics.path, "w") as f:  # a file, so local caching can hit
        json.dump(result, f)
