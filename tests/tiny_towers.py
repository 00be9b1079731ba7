"""Tiny open_clip configs of both tower kinds for tests: the shipped open_clip ViT (`llm2clip-vit-tiny`) and
timm-trunk towers built in code (an EVA02-like trunk, the paper's tower family, and a ViT with a register token),
registered with timm and open_clip under test-only names. No weights are downloaded."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import open_clip
from timm.models import register_model
from timm.models.eva import _create_eva
from timm.models.vision_transformer import _create_vision_transformer

from llm2clip import clip_model

TIMM_EVA = "llm2clip-test-eva02-tiny"  # open_clip config names
TIMM_VIT_REG = "llm2clip-test-vit-reg-tiny"
TOWERS = (clip_model.DEFAULT_MODEL, TIMM_EVA, TIMM_VIT_REG)
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)


@register_model
def llm2clip_test_eva02_tiny(pretrained: bool = False, **kwargs):
    """EVA02 layout (SwiGLU MLP, rotary position embedding) at toy size; eva02_tiny's cfg, never downloaded."""
    args = dict(TINY, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4))
    return _create_eva("eva02_tiny_patch14_224", pretrained=False, **dict(args, **kwargs))


@register_model
def llm2clip_test_vit_reg_tiny(pretrained: bool = False, **kwargs):
    """A timm ViT with one register token at toy size; vit_tiny's cfg, never downloaded."""
    return _create_vision_transformer("vit_tiny_patch16_224", pretrained=False, **dict(TINY, reg_tokens=1, **kwargs))


def _config(timm_name: str) -> dict:
    return {
        "embed_dim": 24,
        "vision_cfg": {
            "image_size": TINY["img_size"],
            "timm_model_name": timm_name,
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,  # as the EVA02 configs: timm's classifier head is the CLIP projection
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        "custom_text": True,
    }


def register() -> None:
    """Add the timm-trunk configs to open_clip's registry (idempotent)."""
    if TIMM_EVA in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as d:
        for name, timm_name in ((TIMM_EVA, "llm2clip_test_eva02_tiny"), (TIMM_VIT_REG, "llm2clip_test_vit_reg_tiny")):
            (Path(d) / f"{name}.json").write_text(json.dumps(_config(timm_name)))
        open_clip.add_model_config(d)


register()
