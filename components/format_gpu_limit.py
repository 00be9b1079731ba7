"""format_gpu_limit component: the `gpus` pipeline parameter as the text a GPU step's accelerator count needs."""

from kfp import dsl
from llm2clip.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def format_gpu_limit(gpus: int) -> str:
    """`gpus` as a string: the KFP driver reads a resource placeholder's value as a string, so a number there reads
    as "" and the pod gets no nvidia.com/gpu limit (kubeflow/pipelines 2.16.0 and 2.17.0,
    backend/src/v2/driver/resolve.go resolvePodSpecInputRuntimeParameter: `val.GetStringValue()`)."""
    if not isinstance(gpus, int) or gpus < 0:
        raise ValueError(f"gpus={gpus!r}: must be a whole number >= 0 (GPUs per GPU step; 0 runs them on CPU nodes)")
    return str(gpus)
