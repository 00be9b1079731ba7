"""Zero-shot classification: class names x prompt templates through a model's text side, images through its vision
side, top-k accuracy as CLIP_benchmark reports it (acc1, acc5, mean_per_class_recall), with bootstrap intervals.

Works for any stage-2 model through `inference.Encoder` (LLM2CLIP: the LLM + adapter; the CLIP baseline: its text
tower). The classifier is open_clip's `build_zero_shot_classifier`: per class, the mean of the L2-normalised
embeddings of its prompts, renormalised (one template: just that prompt). Data: a synthetic set from the scene
renderer (`synthetic_set`) or the usual real layout, an image folder per class (`folder_set`).

    encoder = inference.from_run(run_dir, "llm2clip")
    results = zero_shot_suite(encoder, synthetic_set(480, 64, seed=0))  # {"single": {...}, "ensemble": {...}}
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
from PIL import Image

from llm2clip import data, inference, storage, synthetic
from llm2clip.metrics import bootstrap_indices, ci95

# "single": CLIP's default prompt; "ensemble": open_clip's 7-template ImageNet set (SIMPLE_IMAGENET_TEMPLATES, the
# subset CLIP's authors found as good as all 80); "openai_80": the full OPENAI_IMAGENET_TEMPLATES (an LLM text side
# embeds 80 prompts per class: 11x the cost of "ensemble").
TEMPLATE_SETS: dict[str, tuple] = {
    "single": ("a photo of a {}.",),
    "ensemble": tuple(open_clip.SIMPLE_IMAGENET_TEMPLATES),
    "openai_80": tuple(open_clip.OPENAI_IMAGENET_TEMPLATES),
}
CLASSNAMES_FILE = "classnames.txt"
BOOTSTRAP_RESAMPLES = 1000
PROMPTS_PER_FORWARD = 256


@dataclass(frozen=True)
class ZeroShotSet:
    """Labelled images: images[i] (PIL, loaded lazily for folder sets) has class labels[i] named classnames[label]."""

    name: str
    classnames: list[str]
    images: Sequence[Image.Image]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels) or not self.labels:
            raise ValueError(f"{self.name}: {len(self.images)} images for {len(self.labels)} labels")
        if not all(0 <= y < len(self.classnames) for y in self.labels):
            raise ValueError(f"{self.name}: labels must index the {len(self.classnames)} class names")


def synthetic_set(num_images: int, image_size: int, seed: int) -> ZeroShotSet:
    """The dominant object's colour x shape (24 classes, balanced), rendered at `image_size`; deterministic."""
    images, labels, names = synthetic.classification_set(num_images, image_size, seed)
    return ZeroShotSet("synthetic_shapes", names, images, labels)


class _FolderImages(Sequence):
    """Images of a folder set, read (local or s3://) only when indexed."""

    def __init__(self, uris: list[str]) -> None:
        self.uris = uris

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Image.open(io.BytesIO(storage.read_bytes(self.uris[i]))).convert("RGB")


def folder_set(uri: str, name: str | None = None) -> ZeroShotSet:
    """The usual real layout, local or s3://: `uri/<class folder>/<image>` (png/jpg/jpeg/webp), class index = rank
    of the folder name in sorted order (as torchvision's ImageFolder), and optionally `uri/classnames.txt` with one
    readable name per line in that order (else the folder names, underscores as spaces)."""
    base = str(uri).rstrip("/")
    by_class: dict[str, list[str]] = {}
    for f in storage.list_files(base, recursive=True):
        parts = f[len(base) + 1 :].split("/")
        if len(parts) == 2 and parts[1].lower().rsplit(".", 1)[-1] in data.IMAGE_EXTS:
            by_class.setdefault(parts[0], []).append(f)
    if not by_class:
        raise ValueError(f"{uri}: no <class folder>/<image> files found")
    folders = sorted(by_class)
    names_file = storage.join(base, CLASSNAMES_FILE)
    if storage.exists(names_file):
        names = [line.strip() for line in storage.read_bytes(names_file).decode().splitlines() if line.strip()]
        if len(names) != len(folders):
            raise ValueError(f"{names_file}: {len(names)} class names for {len(folders)} class folders")
    else:
        names = [f.replace("_", " ") for f in folders]
    uris = [u for f in folders for u in sorted(by_class[f])]
    labels = [i for i, f in enumerate(folders) for _ in by_class[f]]
    return ZeroShotSet(name or base.rsplit("/", 1)[-1], names, _FolderImages(uris), labels)


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def classifier(model: inference.Encoder, classnames: Sequence[str], templates: Sequence) -> torch.Tensor:
    """Zero-shot weights [E, C] (unit columns) by open_clip's builder: the encoder's `text_inputs` plays the
    tokenizer (LLM caption embeddings or CLIP tokens), the stage-2 model's `encode_text` the text side. About
    PROMPTS_PER_FORWARD prompts go through the text side at once."""
    weights = open_clip.build_zero_shot_classifier(
        model.model,
        model.text_inputs,
        list(classnames),
        list(templates),
        num_classes_per_batch=max(1, PROMPTS_PER_FORWARD // len(templates)),
        device=model.device,
    )
    return weights.float().cpu()


def zero_shot(
    model: inference.Encoder, dataset: ZeroShotSet, templates: Sequence = TEMPLATE_SETS["single"], seed: int = 0
) -> dict:
    """acc1, acc5 and mean_per_class_recall (CLIP_benchmark's names) of `model` on `dataset`, plus bootstrap 95%
    intervals of acc1 and acc5 (images resampled, seeded). A correct class ranks k-th when k - 1 other classes score
    >= it: ties count against the image, so a collapsed model scores 0, not the first class's share."""
    weights = classifier(model, dataset.classnames, templates)  # [E, C]
    images = torch.cat(
        [
            model.encode_image(dataset.images[s : s + model.batch_size])
            for s in range(0, len(dataset.labels), model.batch_size)
        ]
    )  # [N, E]
    return accuracy(images @ weights, torch.tensor(dataset.labels), seed) | {
        "num_classes": len(dataset.classnames),
        "num_images": len(dataset.labels),
        "num_templates": len(templates),
        "dataset": dataset.name,
    }


def accuracy(logits: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    """logits [N, C], labels [N] -> acc1, acc5, mean_per_class_recall and `_ci95` intervals of acc1 and acc5."""
    own = logits.gather(1, labels[:, None])  # [N, 1]
    rank = (logits >= own).sum(1) - 1  # other classes scoring at least as high
    draws = bootstrap_indices(len(labels), BOOTSTRAP_RESAMPLES, seed)
    out = {}
    for k in (1, 5):
        hits = (rank < k).numpy().astype(np.float64)
        out[f"acc{k}"] = float(hits.mean())
        out[f"acc{k}_ci95"] = ci95(hits[draws].mean(1))
    hits1 = (rank < 1).numpy().astype(np.float64)
    present = np.unique(labels.numpy())
    out["mean_per_class_recall"] = float(np.mean([hits1[labels.numpy() == c].mean() for c in present]))
    return out


def zero_shot_suite(
    model: inference.Encoder, dataset: ZeroShotSet, template_sets: Sequence[str] = ("single", "ensemble"), seed: int = 0
) -> dict[str, dict]:
    """`zero_shot` for each named template set of TEMPLATE_SETS: {"single": {...}, "ensemble": {...}}."""
    unknown = [t for t in template_sets if t not in TEMPLATE_SETS]
    if unknown:
        raise ValueError(f"template_sets: unknown {unknown} (known: {list(TEMPLATE_SETS)})")
    return {t: zero_shot(model, dataset, TEMPLATE_SETS[t], seed) for t in template_sets}
