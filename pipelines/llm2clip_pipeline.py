"""The LLM2CLIP pipeline: data -> LLM caption-contrastive tuning -> embedding cache -> CLIP training -> evaluation.

Data moves between tasks only as artifacts. Two LLM-text models are trained (tuned LLM and, as a baseline, the raw
LLM) plus a standard CLIP baseline on the same data and budget; `evaluate` compares them in one report.
"""

from pathlib import Path

from kfp import compiler, dsl
from llm2clip.components import (
    IMAGE,
    cache_caption_embeddings,
    evaluate,
    prepare_data,
    train_clip,
    train_clip_baseline,
    tune_caption_encoder,
)

PIPELINE_NAME = "llm2clip"
COMPILED = Path(__file__).parent / "llm2clip.yaml"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="LLM2CLIP: tune an LLM as caption encoder, cache its embeddings, train a CLIP vision encoder "
    "against them, and compare with a raw-LLM and a standard CLIP baseline.",
)
def llm2clip_pipeline(
    source: str = "synthetic",
    source_options: dict = {},  # noqa: B006 (a KFP parameter default, never mutated)
    num_train: int = 600,
    num_eval: int = 100,
    image_size: int = 64,
    seed: int = 0,
    llm: str = "smollm2-135m-instruct",
    bidirectional: bool = True,
    tune_steps: int = 16,
    tune_batch_size: int = 8,
    tune_lr: float = 5e-4,
    lora_r: int = 16,
    cache_groups: int = 2,
    vision_model: str = "llm2clip-vit-tiny",
    pretrained: str = "",
    train_epochs: int = 15,
    train_batch_size: int = 64,
    train_lr: float = 0.0,
    train_nproc: int = 1,
    center_text: bool = True,
    ablations: bool = False,
    zero_shot: list = ["synthetic"],  # noqa: B006 (a KFP parameter default, never mutated)
    device: str = "auto",
    dtype: str = "auto",
    image: str = IMAGE,
) -> dsl.Artifact:
    """Parameters:
    source: "synthetic" (built-in generator), a directory / s3:// prefix of canonical shards (train/,
        eval/<benchmark>/), img2dataset tars or a caption table (see source_options).
    source_options: how to read a real source, e.g. {"source_format": "img2dataset", "short_field":
        "json.short_caption", "long_field": "json.long_caption", "eval_sources": ["coco=karpathy:s3://b/
        dataset_coco.json:s3://b/coco"]}; a caption table (CSV, TSV, JSONL, Parquet) names its columns with
        "image_column", "key_column" and the *_field keys; eval_sources also add real eval sets to the synthetic
        source. Keys are PrepareDataConfig fields.
    num_train / num_eval / image_size / seed: size and seed of the synthetic data.
    llm: "smollm2-135m-instruct" (embedded default), "tiny-random-llama" (tests) or a Hugging Face model path.
    bidirectional: remove the causal mask in the LLM (LLM2Vec-style); False keeps it causal.
    tune_steps / tune_batch_size / tune_lr / lora_r: stage 1 (caption-contrastive LoRA; alpha = 2 r).
    cache_groups: how many parallel caching tasks the shards are split over.
    vision_model / pretrained: open_clip model config and pretrained tag, or a checkpoint file (local or s3://);
        "" = random init.
    train_epochs / train_batch_size / train_lr: stage 2, identical for LLM2CLIP and both baselines; train_lr 0
        takes the recipe's learning rate (1e-3 for a random tower; with `pretrained`, the official recipe: 1e-5,
        layer decay 0.85, no warm-up).
    train_nproc: stage-2 processes per training task (torchrun --nproc_per_node: the GPUs of the pod); the
        batch is global, split over them.
    center_text: subtract the training captions' mean LLM embedding before the adapter (a deviation from the
        paper, see the README); applies to both LLM-taught models.
    ablations: also train both LLM-taught models without centring and report them beside the others.
    zero_shot: zero-shot classification sets: "synthetic" (colour x shape scenes) and/or "NAME=URI" (an image
        folder per class, local or s3://, optional classnames.txt); [] for none.
    device: "auto" (cuda if the task sees a GPU, else cpu), "cpu" or "cuda", for every model-running task.
    dtype: compute dtype, "auto" (bf16 on GPUs and on CPUs with native bf16, else fp32), "float32",
        "bfloat16" or "float16"; every manifest records the one used.
    image: the container image every task runs in.
    Returns the evaluation artifact (summary.json, report.html, report.md).
    """
    data = prepare_data(
        source=source,
        source_options=source_options,
        num_train=num_train,
        num_eval=num_eval,
        image_size=image_size,
        seed=seed,
        cache_groups=cache_groups,
    )
    tuned = tune_caption_encoder(
        dataset=data.outputs["dataset"],
        llm=llm,
        bidirectional=bidirectional,
        steps=tune_steps,
        batch_size=tune_batch_size,
        lr=tune_lr,
        lora_r=lora_r,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    train_args = dict(
        model=vision_model,
        pretrained=pretrained,
        epochs=train_epochs,
        batch_size=train_batch_size,
        lr=train_lr,
        nproc=train_nproc,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    # LLM2CLIP embeds with the tuned LLM as it was tuned; the raw-LLM baseline with the frozen LLM as it is
    # (causal, no adapter), as the paper's raw-LLM row. Both are then trained with exactly the same recipe.
    trained, embeddings, ablated = {}, {}, {}
    for name, use_adapter, attention in (("llm2clip", True, "as_tuned"), ("llm2clip_raw_llm", False, "causal")):
        with dsl.ParallelFor(data.outputs["Output"], parallelism=0) as group:
            cache = cache_caption_embeddings(
                dataset=data.outputs["dataset"],
                text_lora=tuned.outputs["text_lora"],
                group=group,
                use_adapter=use_adapter,
                attention=attention,
                device=device,
                dtype=dtype,
            )
            cache.set_display_name(f"cache_caption_embeddings ({name})").set_container_image(image)
        embeddings[name] = cache.outputs["caption_embeddings"]
        trained[name] = train_clip(
            dataset=data.outputs["dataset"],
            caption_embeddings=dsl.Collected(embeddings[name]),
            center_text=center_text,
            **train_args,
        )
        trained[name].set_display_name(f"train_clip ({name})")
        # the centring ablation: trains only when `ablations` asks for it, else writes a "skipped" manifest
        ablated[name] = train_clip(
            dataset=data.outputs["dataset"],
            caption_embeddings=dsl.Collected(embeddings[name]),
            center_text=False,
            enabled=ablations,
            **train_args,
        )
        ablated[name].set_display_name(f"train_clip ({name}, no centring)").set_container_image(image)
    baseline = train_clip_baseline(dataset=data.outputs["dataset"], **train_args)
    result = evaluate(
        dataset=data.outputs["dataset"],
        text_lora=tuned.outputs["text_lora"],
        llm2clip_model=trained["llm2clip"].outputs["vision_model"],
        raw_llm_model=trained["llm2clip_raw_llm"].outputs["vision_model"],
        clip_model=baseline.outputs["vision_model"],
        llm2clip_no_centring_model=ablated["llm2clip"].outputs["vision_model"],
        raw_llm_no_centring_model=ablated["llm2clip_raw_llm"].outputs["vision_model"],
        tuned_embeddings=dsl.Collected(embeddings["llm2clip"]),
        raw_embeddings=dsl.Collected(embeddings["llm2clip_raw_llm"]),
        device=device,
        zero_shot=zero_shot,
    )
    for task in (data, tuned, trained["llm2clip"], trained["llm2clip_raw_llm"], baseline, result):
        task.set_container_image(image)
    return result.outputs["evaluation"]


def compile_pipeline(path: str | Path = COMPILED) -> Path:
    compiler.Compiler().compile(llm2clip_pipeline, str(path))
    return Path(path)
