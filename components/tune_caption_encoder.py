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
    pairs: str = "any",
    query_instructions: bool = False,
    max_grad_norm: float = 0.0,
    warmup_steps: int = 0,
):
    """LoRA adapter + manifest; logs the loss (CRA is measured in evaluate, from the caption caches)."""
    import json
    from pathlib import Path

    from llm2clip.artifacts import output_location, point, resolve, scalar_metrics
    from llm2clip.params import tune_config
    from llm2clip.tune_caption_encoder import tune_caption_encoder

    values = dict(llm=llm, allow_hub=allow_hub, bidirectional=bidirectional, lora_r=lora_r, seed=seed)
    values.update(tune_steps=steps, tune_batch_size=batch_size, tune_lr=lr, device=device, dtype=dtype)
    values.update(tune_pairs=pairs, tune_query_instructions=query_instructions, tune_max_grad_norm=max_grad_norm)
    values.update(tune_warmup_steps=warmup_steps)  # 0: an eighth of the steps (llm2clip.params.tune_config)
    cfg = tune_config(values)
    out = output_location(text_lora.path, text_lora.uri)
    result = tune_caption_encoder(cfg, resolve(dataset.path), out)
    point(text_lora.path, out)
    metrics.metadata.update(scalar_metrics(result))  # CRA is None when skipped (no eval set with two short captions)
    text_lora.metadata.update({"base_model": llm, "location": out, **result})
    Path(metrics.path).write_text(json.dumps(result))  # a file, so local caching can hit
