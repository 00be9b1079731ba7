"""LLM2CLIP: LLM-taught CLIP vision encoders as a Kubeflow Pipelines v2 workflow."""
