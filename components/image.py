"""The one container image every component runs in (override per run with the pipeline's `image` parameter)."""

IMAGE = "ghcr.io/llm2clip-kfp/llm2clip:0.1.0"
