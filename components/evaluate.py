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
):
    """summary.json + reports in `evaluation`; R@k as KFP metrics. Skipped ablations are left out."""
    import shutil

    from llm2clip.artifacts import resolve
    from llm2clip.evaluate import MODELS, EvaluateConfig, evaluate, pipeline_caches

    trained = [llm2clip_model, raw_llm_model, clip_model, llm2clip_no_centring_model, raw_llm_no_centring_model]
    models = dict(zip(MODELS, [resolve(m.path) for m in trained], strict=True))
    caches = pipeline_caches([resolve(a.path) for a in tuned_embeddings], [resolve(a.path) for a in raw_embeddings])
    summary = evaluate(
        EvaluateConfig(device=device, zero_shot=tuple(zero_shot)),
        resolve(dataset.path),
        resolve(text_lora.path),
        models,
        caches,
        evaluation.path,
    )
    for bench, by_model in summary["retrieval"].items():
        for name, values in by_model.items():
            for k, v in values.items():
                if isinstance(v, float):  # the value, not its interval or counts
                    retrieval_metrics.log_metric(f"{bench}/{name}/{k}", v)
    shutil.copy(f"{evaluation.path}/report.html", report.path)
    shutil.copy(f"{evaluation.path}/report.md", report_markdown.path)
    shutil.copy(f"{evaluation.path}/summary.json", retrieval_metrics.path)
