"""evaluate component: retrieval and zero-shot of LLM2CLIP, baselines and ablations; CRA; the report."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output
from llm2clip.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    text_lora: Input[Model],
    llm2clip_model: Input[Model],
    raw_llm_model: Input[Model],
    clip_model: Input[Model],
    llm2clip_no_centring_model: Input[Model],
    raw_llm_no_centring_model: Input[Model],
    tuned_embeddings: Input[list[Dataset]],
    raw_embeddings: Input[list[Dataset]],
    retrieval_metrics: Output[Metrics],
    report: Output[HTML],
    report_markdown: Output[Markdown],
    evaluation: Output[Artifact],
    device: str,
    zero_shot: list,
    allow_hub: bool = False,
):
    """summary.json + reports in `evaluation`; R@k as KFP metrics. Skipped ablations are left out."""
    import shutil

    from llm2clip.artifacts import resolve, scalar_metrics
    from llm2clip.evaluate import evaluate_pipeline_models
    from llm2clip.params import evaluate_config

    trained = [llm2clip_model, raw_llm_model, clip_model, llm2clip_no_centring_model, raw_llm_no_centring_model]
    summary = evaluate_pipeline_models(
        evaluate_config(dict(device=device, zero_shot=zero_shot, allow_hub=allow_hub)),
        resolve(dataset.path),
        resolve(text_lora.path),
        [resolve(m.path) for m in trained],
        [resolve(a.path) for a in tuned_embeddings],
        [resolve(a.path) for a in raw_embeddings],
        evaluation.path,
    )
    retrieval_metrics.metadata.update(scalar_metrics(summary["retrieval"]))  # values, not intervals or counts
    shutil.copy(f"{evaluation.path}/report.html", report.path)
    shutil.copy(f"{evaluation.path}/report.md", report_markdown.path)
    shutil.copy(f"{evaluation.path}/summary.json", retrieval_metrics.path)
