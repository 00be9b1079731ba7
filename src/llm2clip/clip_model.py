"""Stage-2 models: an open_clip vision tower + new head + the LLM2CLIP adapter, and the plain CLIP baseline."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "llm2clip-vit-tiny"
LOGIT_SCALE_MAX = math.log(100.0)
open_clip.add_model_config(MODEL_CONFIGS)


class ResidualMLPBlock(nn.Module):
    """x + Linear(2d->d)(GELU(Linear(d->2d)(LN(x)))): pre-LN residual MLP, expansion 2."""

    def __init__(self, dim: int, expansion: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.fc2 = nn.Linear(expansion * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class LLM2CLIPAdapter(nn.Module):
    """Cached LLM embedding [B, d] -> L2-norm -> 4 residual MLP blocks -> LayerNorm -> Linear -> [B, out_dim].

    About 16 d^2 parameters (4 blocks x 2 linears x 2 d^2).
    """

    def __init__(self, dim: int, out_dim: int, blocks: int = 4, expansion: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[ResidualMLPBlock(dim, expansion) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.blocks(F.normalize(x.float(), dim=-1))))


def create_vision_tower(model_name: str, pretrained: str | None) -> tuple[nn.Module, int]:
    """The open_clip vision tower of `model_name` without its projection; returns (tower, feature width)."""
    clip = open_clip.create_model(model_name, pretrained=pretrained)
    visual = clip.visual
    proj = getattr(visual, "proj", None)
    if isinstance(proj, nn.Parameter):  # open_clip ViT: drop the old head, the new one replaces it
        width = proj.shape[0]
        visual.proj = None
    else:  # timm / other towers: keep their output and learn a head on top
        size = visual.image_size if hasattr(visual, "image_size") else 224
        size = size if isinstance(size, int) else size[0]
        with torch.no_grad():
            width = visual(torch.zeros(1, 3, size, size)).shape[-1]
    return visual, width


class LLM2CLIP(nn.Module):
    """Vision tower + new projection head, and the adapter over cached LLM caption embeddings."""

    def __init__(self, model_name: str, pretrained: str | None, llm_dim: int, adapter_blocks: int = 4) -> None:
        super().__init__()
        self.visual, width = create_vision_tower(model_name, pretrained)
        embed_dim = open_clip.get_model_config(model_name)["embed_dim"]
        self.head = nn.Linear(width, embed_dim)
        nn.init.normal_(self.head.weight, std=width**-0.5 * 0.5)  # small init: a new head on a tower
        nn.init.zeros_(self.head.bias)
        self.adapter = LLM2CLIPAdapter(llm_dim, embed_dim, blocks=adapter_blocks)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Mean of the training captions' LLM embeddings, subtracted before the adapter's L2 norm (zeros = off).
        # Decoder LLMs put most of an embedding's norm in a few "massive activation" dimensions shared by every
        # caption (SmolLM2: mean cosine 0.98 between different captions); centring removes that shared part.
        self.register_buffer("text_mean", torch.zeros(llm_dim))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, E]."""
        x = self.head(self.visual(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, llm_embeddings: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """cached caption embeddings [B, d] -> [B, E]."""
        x = self.adapter(llm_embeddings.float() - self.text_mean)
        return F.normalize(x, dim=-1) if normalize else x


def create_clip_baseline(model_name: str, pretrained: str | None) -> nn.Module:
    """A standard open_clip CLIP with its own text tower (77-token context), for the baseline."""
    return open_clip.create_model(model_name, pretrained=pretrained)


def clamp_logit_scale(model: nn.Module) -> None:
    """Keep the learnable temperature at or below ln(100), as CLIP and LLM2CLIP do after every step."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


def vision_layer_id(name: str, num_layers: int) -> int:
    """Depth of a vision parameter for layer-wise lr decay: stem 0, block i -> i + 1, the rest on top."""
    if name.startswith("visual."):
        rest = name[len("visual.") :]
        if rest.startswith(("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_embed")):
            return 0
        if rest.startswith("transformer.resblocks."):
            return int(rest.split(".")[2]) + 1
    return num_layers + 1


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, embeddings tokens and the logit scale; lr decays with
    depth by `layer_decay` per vision block (1.0 = off)."""
    blocks = getattr(getattr(getattr(model, "visual", None), "transformer", None), "resblocks", [])
    num_layers = len(blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "logit_scale" in name or "embedding" in name or "norm" in name.split(".")[-2:][0]
        layer = vision_layer_id(name, num_layers)
        scale = layer_decay ** (num_layers + 1 - layer)
        g = groups.setdefault(
            (layer, no_decay),
            {"params": [], "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay},
        )
        g["params"].append(p)
    return list(groups.values())
