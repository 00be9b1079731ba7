"""The container image components run in (images/Dockerfile builds it; images/README.md says how).

Tags follow the package version. `IMAGE`, every component's default base image, is the one image images/ builds:
the CUDA build, which also runs on CPU nodes. A run should pin the exact image through the pipeline's `gpu_image`
and `cpu_image` parameters, by its immutable `<version>-<git sha>` tag or, better, its digest.
"""

VERSION = "0.1.0"  # pyproject's [project].version; tests/test_images.py checks they are equal
REPOSITORY = "ghcr.io/llm2clip-kfp/llm2clip"

IMAGE_GPU = f"{REPOSITORY}:{VERSION}"  # torch with its CUDA wheels (hash-locked)
IMAGE = IMAGE_GPU
