"""The container images components run in (images/Dockerfile builds them; images/README.md says how).

Tags follow the package version. `IMAGE`, every component's default base image, is the CUDA build: it also runs
on CPU nodes. A run should pin the exact images through the pipeline's `gpu_image` and `cpu_image` parameters,
by their immutable `<version>-<git sha>` tags or, better, their digests.
"""

VERSION = "0.1.0"  # pyproject's [project].version; tests/test_images.py checks they are equal
REPOSITORY = "ghcr.io/llm2clip-kfp/llm2clip"

IMAGE_GPU = f"{REPOSITORY}:{VERSION}"  # VARIANT=cuda: torch with its CUDA wheels
IMAGE_CPU = f"{REPOSITORY}-cpu:{VERSION}"  # VARIANT=cpu: torch's CPU build, several GB smaller
IMAGE = IMAGE_GPU
