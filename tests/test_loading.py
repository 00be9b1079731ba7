"""Shared data loading: the tower's own preprocessing (eval resize + centre crop, train RandomResizedCrop, its
mean/std), split loading and caption tables."""

import json
import random

import open_clip
import pytest
import torch
from tiny_towers import TIMM_EVA
from torchvision.transforms import InterpolationMode

from llm2clip import clip_model, loading, storage


def _bands(h: int, w: int, band: int) -> torch.Tensor:
    """uint8 [3, h, w]: green, with red bands `band` pixels wide at the left and right edges."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[1] = 255
    img[:, :, :band] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    img[:, :, w - band :] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    return img


def test_eval_resizes_the_shortest_side_and_crops_the_centre():
    prep = loading.ImagePreprocess(size=32)
    out = prep.eval_image(_bands(48, 96, 24))  # -> 32 x 64, centre 32 columns are the green middle
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert out[0, :, 2:-2].max() < 40 and out[1].float().mean() > 240  # no red: nothing squashed in
    squashed = loading.ImagePreprocess(size=32, resize_mode="squash").eval_image(_bands(48, 96, 24))
    assert squashed.shape == (3, 32, 32) and squashed[0, :, :4].float().mean() > 200  # the bands squeezed in
    padded = loading.ImagePreprocess(size=32, resize_mode="longest").eval_image(_bands(48, 96, 24))
    assert padded.shape == (3, 32, 32) and padded[:, :6].max() == 0 and padded[:, -6:].max() == 0  # 16-row image


def test_non_square_tower_size():
    prep = loading.ImagePreprocess(size=(24, 40))
    assert prep.eval_image(_bands(30, 30, 3)).shape == (3, 24, 40)
    assert prep.augment_batch([_bands(30, 50, 3)]).shape == (1, 3, 24, 40)


def test_train_augmentation_is_random_resized_crop_0_9_to_1():
    prep = loading.ImagePreprocess(size=32)
    t = prep.train_transform()
    assert t.scale == (0.9, 1.0) and t.interpolation == InterpolationMode.BICUBIC and list(t.size) == [32, 32]
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    torch.manual_seed(3)
    a = prep.augment_batch([img, img, img])
    torch.manual_seed(3)
    b = prep.augment_batch([img, img, img])
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)  # repeatable under the seed
    assert not torch.equal(a[0], a[1])  # a fresh crop per image


def test_crop_boxes_follow_torchvision_random_resized_crop():
    prep = loading.ImagePreprocess(size=32)
    torch.manual_seed(0)
    for top, left, h, w in prep.crop_boxes([(60, 80)] * 200):
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.88 <= h * w / (60 * 80) <= 1.0 and 0.73 <= w / h <= 1.36  # scale 0.9-1, ratio 3/4-4/3 (rounded)
    # an aspect ratio no crop of that area can match: the centre crop at the clamped ratio (torchvision's fallback)
    assert prep.crop_boxes([(40, 100)]) == [(0, 23, 40, 53)]
    assert prep.crop_boxes([(100, 40)]) == [(23, 0, 53, 40)]


def test_train_base_keeps_the_whole_image_downscaled():
    prep = loading.ImagePreprocess(size=32)
    assert prep.train_base(_bands(40, 80, 4)).shape == (3, 32, 64)  # shortest side to 32, aspect kept
    small = _bands(20, 20, 2)
    assert prep.train_base(small) is small  # never upscaled in memory


def test_normalize_uses_the_tower_mean_and_std():
    prep = loading.ImagePreprocess(size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    x = torch.tensor([0, 255], dtype=torch.uint8).repeat(1, 3, 2, 1)  # [1, 3, 2, 2]
    out = prep.normalize(x)
    assert out[0, 0, 0].tolist() == [-1.0, 1.0] and out[0, 1, 0].tolist() == [-2.0, 2.0]
    openai = loading.ImagePreprocess(size=4).normalize(x)
    mean, std = open_clip.OPENAI_DATASET_MEAN[0], open_clip.OPENAI_DATASET_STD[0]
    assert openai[0, 0, 0, 0].item() == pytest.approx(-mean / std)


def test_preprocess_of_a_model_and_its_round_trip():
    model = clip_model.LLM2CLIP(TIMM_EVA, None, llm_dim=8)
    prep = loading.preprocess_of(model)
    assert prep.size == (32, 32) and prep.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    siglip = loading.ImagePreprocess(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
    loading.set_preprocess(model, siglip)
    assert loading.preprocess_of(model) == siglip
    assert loading.ImagePreprocess.from_dict(json.loads(json.dumps(siglip.to_dict()))) == siglip
    baseline = clip_model.create_clip_baseline(clip_model.DEFAULT_MODEL, None)
    assert loading.preprocess_of(baseline).size == (64, 64)
    with pytest.raises(ValueError, match="resize_mode='crop'"):
        loading.ImagePreprocess(size=32, resize_mode="crop")


def test_load_images_for_eval_and_training(tiny_dataset):
    prep = loading.ImagePreprocess(size=48)
    split = storage.join(tiny_dataset, "train")
    keys, metas, images = loading.load_images(split, prep)
    assert images.shape == (len(keys), 3, 48, 48) and images.dtype == torch.uint8 and len(metas) == len(keys)
    keys2, _, whole = loading.load_images(split, prep, train=True)
    assert keys2 == keys and whole.shape[-2:] == (48, 48)  # 64-px squares scaled to the tower's side
    _, _, native = loading.load_images(split, loading.ImagePreprocess(size=96), train=True)
    assert native.shape[-2:] == (64, 64)  # smaller than the tower: kept as they are, the crop resizes


def test_caption_table_rows_and_sampling():
    metas = [
        {"captions": {"short": ["a", "b"], "long": ["c"]}},
        {"captions": {"short": ["d"], "long": []}},
    ]
    table = loading.CaptionTable(metas, torch.arange(4))
    assert table.rows(0, "short") == [0, 1] and table.rows(0, "long") == [2] and table.rows(1, "short") == [3]
    rng = random.Random(0)
    assert {table.sample(0, 1.0, rng) for _ in range(10)} == {2}
    assert {table.sample(1, 1.0, rng) for _ in range(10)} == {3}  # no long caption: a short one
