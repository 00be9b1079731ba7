"""Data loading shared by stage 2 (train_clip) and evaluation: images with the vision tower's own preprocessing,
and the caption tables (cached LLM embeddings or CLIP tokens) aligned with them.

Preprocessing follows the tower, as open_clip does (`open_clip.get_model_preprocess_cfg`: size, mean, std,
interpolation, resize mode), not one fixed recipe for every tower:
- evaluation: resize by the tower's resize mode ("shortest": shortest side to the input size, then a centre
  crop; "longest": longest side, then padding; "squash": both sides) and the tower's mean/std;
- training: RandomResizedCrop(scale 0.9-1.0, aspect ratio 3/4-4/3) of the whole image, the augmentation of the
  official LLM2CLIP recipe and of open_clip's training default, with the tower's interpolation (bicubic).
Images stay uint8 until `normalize`, which runs wherever the batch is (on the GPU in training).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import open_clip
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from llm2clip import cache_caption_embeddings, data

RESIZE_MODES = ("shortest", "longest", "squash")
TRAIN_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range (torchvision / open_clip default)
_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "random": InterpolationMode.BICUBIC,  # open_clip's "random" is a training-time choice; bicubic here
}


@dataclass(frozen=True)
class ImagePreprocess:
    """A tower's image preprocessing: open_clip's preprocess cfg plus the training augmentation."""

    size: tuple[int, int]  # (height, width) of the tower's input
    mean: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_MEAN)
    std: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_STD)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    train_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range (LLM2CLIP / open_clip default)

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(int(s) for s in self.size)
        object.__setattr__(self, "size", size)
        for name in ("mean", "std", "train_scale"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}: must be one of {RESIZE_MODES}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r}: must be one of {tuple(_INTERPOLATIONS)}")

    # ------------------------------------------------------------------------------------------- (de)serialise

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> ImagePreprocess:
        """From an open_clip preprocess cfg dict (keys size, mean, std, interpolation, resize_mode, fill_color)."""
        keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
        return cls(size=cfg["size"], **{k: cfg[k] for k in keys if cfg.get(k) is not None})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImagePreprocess:
        """Inverse of `to_dict` (what a manifest records)."""
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def open_clip_cfg(self) -> dict[str, Any]:
        """The open_clip preprocess cfg (for `open_clip.set_model_preprocess_cfg`)."""
        d = asdict(self)
        d.pop("train_scale")
        return {**d, "mode": "RGB"}

    # ------------------------------------------------------------------------------------------- transforms

    @property
    def _mode(self) -> InterpolationMode:
        return _INTERPOLATIONS[self.interpolation]

    def eval_image(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] -> uint8 [3, h, w] (the tower's size) by the tower's resize mode; no augmentation."""
        h, w = image.shape[-2:]
        th, tw = self.size
        if self.resize_mode == "squash":
            return TF.resize(image, [th, tw], interpolation=self._mode, antialias=True)
        scale = max(th / h, tw / w) if self.resize_mode == "shortest" else min(th / h, tw / w)
        new = [max(1, round(h * scale)), max(1, round(w * scale))]
        if new != [h, w]:
            image = TF.resize(image, new, interpolation=self._mode, antialias=True)
        if self.resize_mode == "longest" and (new[0] < th or new[1] < tw):  # pad to the size, centred
            top, left = (th - new[0]) // 2, (tw - new[1]) // 2
            image = TF.pad(image, [left, top, tw - new[1] - left, th - new[0] - top], fill=self.fill_color)
        return TF.center_crop(image, [th, tw])

    def train_base(self, image: torch.Tensor) -> torch.Tensor:
        """What training keeps in memory of an image: the whole image (the random crop needs all of it), scaled
        down so that its shortest side is the tower's larger input side when it is larger than that."""
        h, w = image.shape[-2:]
        side = max(self.size)
        if min(h, w) <= side:
            return image
        scale = side / min(h, w)
        return TF.resize(image, [round(h * scale), round(w * scale)], interpolation=self._mode, antialias=True)

    def train_transform(self) -> v2.RandomResizedCrop:
        """The training augmentation as a torchvision transform (one image at a time): RandomResizedCrop to the
        tower's size, area scale 0.9-1.0, ratio 3/4-4/3, the tower's interpolation. `augment_batch` does the same
        with the crop boxes of a whole batch drawn at once."""
        return v2.RandomResizedCrop(
            self.size, scale=self.train_scale, ratio=TRAIN_RATIO, interpolation=self._mode, antialias=True
        )

    def crop_boxes(
        self, shapes: list[tuple[int, int]], generator: torch.Generator | None = None
    ) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) of a random resized crop of each image [H, W], exactly as torchvision's
        RandomResizedCrop.get_params (up to 10 tries of area fraction ~ U(scale) and log aspect ~ U(log ratio),
        the first that fits; else the centre crop at the clamped ratio), with all draws taken from torch's
        global RNG (or `generator`) in one call instead of dozens of tiny tensor ops per image."""
        u = torch.rand(len(shapes), 10, 4, generator=generator).tolist()
        lo, hi = math.log(TRAIN_RATIO[0]), math.log(TRAIN_RATIO[1])
        boxes = []
        for (height, width), tries in zip(shapes, u, strict=True):
            for ua, ur, ui, uj in tries:
                area = height * width * (self.train_scale[0] + ua * (self.train_scale[1] - self.train_scale[0]))
                aspect = math.exp(lo + ur * (hi - lo))
                w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if 0 < w <= width and 0 < h <= height:
                    boxes.append((int(ui * (height - h + 1)), int(uj * (width - w + 1)), h, w))
                    break
            else:
                ratio = width / height
                if ratio < TRAIN_RATIO[0]:
                    w, h = width, round(width / TRAIN_RATIO[0])
                elif ratio > TRAIN_RATIO[1]:
                    w, h = round(height * TRAIN_RATIO[1]), height
                else:
                    w, h = width, height
                boxes.append(((height - h) // 2, (width - w) // 2, h, w))
        return boxes

    def augment_batch(self, images: list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images [3, H_i, W_i] -> uint8 [B, 3, h, w], a fresh random resized crop of each."""
        boxes = self.crop_boxes([tuple(img.shape[-2:]) for img in images], generator)
        return torch.stack(
            [
                TF.resized_crop(img, *box, list(self.size), interpolation=self._mode, antialias=True)
                for img, box in zip(images, boxes, strict=True)
            ]
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float with the tower's mean/std, on the images' device."""
        return normalize_images(images, self)


def normalize_images(images: torch.Tensor, preprocess: ImagePreprocess) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, (x / 255 - mean) / std with the tower's mean/std (on the images' device)."""
    mean = torch.tensor(preprocess.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def preprocess_of(model: torch.nn.Module) -> ImagePreprocess:
    """The preprocessing of a stage-2 model's vision tower (set by open_clip.create_model, or restored from a
    manifest by `set_preprocess`)."""
    return ImagePreprocess.from_open_clip(open_clip.get_model_preprocess_cfg(model))


def set_preprocess(model: torch.nn.Module, preprocess: ImagePreprocess) -> None:
    """Attach `preprocess` to the model's vision tower, where `preprocess_of` finds it."""
    open_clip.set_model_preprocess_cfg(model, preprocess.open_clip_cfg())


def image_size_of(model_name: str) -> int:
    """The input side of an open_clip model config's vision tower (the first side when it is not square)."""
    size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


# ----------------------------------------------------------------------------------------------- images


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def load_images(
    split_dir: str, preprocess: ImagePreprocess, train: bool = False
) -> tuple[list[str], list[dict], torch.Tensor | list[torch.Tensor]]:
    """Keys, metas and uint8 images of a prepared split.

    train=False: [N, 3, h, w], each image resized and cropped for evaluation (`ImagePreprocess.eval_image`).
    train=True: the whole images (`ImagePreprocess.train_base`) for a fresh random crop per step; one
    [N, 3, H, W] tensor when they share a size, else a list.
    """
    keys, metas, images = [], [], []
    prepare = preprocess.train_base if train else preprocess.eval_image
    for rec in data.read_split(split_dir):
        keys.append(rec["key"])
        metas.append(rec["meta"])
        images.append(prepare(_to_tensor(rec["image"])))
    if not train or len({tuple(i.shape) for i in images}) <= 1:
        return keys, metas, torch.stack(images)
    return keys, metas, images


# ----------------------------------------------------------------------------------------------- captions


class CaptionTable:
    """Every caption of every image as a row of a text input tensor (cached embeddings or CLIP tokens)."""

    def __init__(self, metas: list[dict], texts: torch.Tensor) -> None:
        self.kinds: list[list[str]] = [[k for k, _ in data.caption_list(m)] for m in metas]
        self.offsets = np.cumsum([0] + [len(k) for k in self.kinds])
        self.texts = texts  # [total captions, ...]

    def rows(self, image: int, kind: str) -> list[int]:
        return [int(self.offsets[image]) + j for j, k in enumerate(self.kinds[image]) if k == kind]

    def sample(self, image: int, long_prob: float, rng: random.Random) -> int:
        longs, others = self.rows(image, "long"), [r for k in ("raw", "short") for r in self.rows(image, k)]
        pool = longs if longs and (not others or rng.random() < long_prob) else others
        return rng.choice(pool)


def llm_text_table(cache_dirs: list[str], split: str, keys: list[str], metas: list[dict]) -> CaptionTable:
    """Cached embeddings for each sample, stacked in key order; a missing key is an error naming it."""
    emb, _ = cache_caption_embeddings.load_embeddings(cache_dirs, split)
    missing = [k for k in keys if k not in emb]
    if missing:
        raise KeyError(f"{len(missing)} samples of split {split!r} have no cached embedding, e.g. {missing[:3]}")
    for k, m in zip(keys, metas, strict=True):
        if emb[k].shape[0] != len(data.caption_list(m)):
            raise ValueError(
                f"sample {k!r}: cache has {emb[k].shape[0]} captions, shard has {len(data.caption_list(m))}"
            )
    return CaptionTable(metas, torch.cat([emb[k] for k in keys]))


def clip_text_table(model_name: str, metas: list[dict]) -> CaptionTable:
    """Every caption tokenized with the open_clip model's tokenizer."""
    tokenizer = open_clip.get_tokenizer(model_name)
    texts = [t for m in metas for _, t in data.caption_list(m)]
    return CaptionTable(metas, tokenizer(texts))
