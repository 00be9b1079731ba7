"""LLM2CLIP: LLM-taught CLIP vision encoders as a Kubeflow Pipelines v2 workflow."""

import os as _os

if _os.environ.get("LLM2CLIP_PARENT_PID"):  # a task of a local run: end with the CLI (llm2clip.ops.lifeline)
    from llm2clip.ops import lifeline as _lifeline

    _lifeline.watch_parent()
