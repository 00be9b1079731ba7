"""evaluate component: retrieval of LLM2CLIP and both baselines, CRA, the HTML/Markdown report."""

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
    """summary.json + reports in `evaluation`; R@k per benchmark and model as KFP metrics. The two ablation
    models are left out of the report when their task was told to skip (ablations=False)."""
    import shutil

    from llm2clip.artifacts import resolve
    from llm2clip.evaluate import EvaluateConfig, evaluate

    models = {
        "llm2clip": resolve(llm2clip_model.path),
        "llm2clip_raw_llm": resolve(raw_llm_model.path),
        "clip_baseline": resolve(clip_model.path),
        "llm2clip_no_centring": resolve(llm2clip_no_centring_model.path),
        "llm2clip_raw_llm_no_centring": resolve(raw_llm_no_centring_model.path),
    }
    tuned, raw = [resolve(a.path) for a in tuned_embeddings], [resolve(a.path) for a in raw_embeddings]
    caches = {"llm2clip": tuned, "llm2clip_raw_llm": raw, "llm2clip_no_centring": tuned,
              "llm2clip_raw_llm_no_centring": raw}  # fmt: skip
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
