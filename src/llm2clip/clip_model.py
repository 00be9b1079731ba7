"""Stage-2 models: an open_clip vision tower + new head + the LLM2CLIP adapter, and the plain CLIP baseline."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from torch import nn

from llm2clip import model_sources

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


def create_clip(model_name: str, pretrained: str | None, allow_hub: bool = False, **model_kwargs) -> nn.Module:
    """open_clip.create_model with the weights `pretrained` names (see model_sources.resolve_checkpoint): a local
    checkpoint file (a full open_clip state dict: .pt / .bin / .safetensors, as open_clip.create_model accepts),
    an s3:// / minio:// object holding one (fetched once into the download cache), or an open_clip pretrained tag
    (downloaded only with `allow_hub`, else from the local Hugging Face cache). `model_kwargs` override the model
    config (e.g. embed_dim). The model's `pretrained_source` records where the weights came from and their sha256
    (None without weights)."""
    source = model_sources.resolve_checkpoint(pretrained, model_name, allow_hub=allow_hub)
    if source is None:
        clip = open_clip.create_model(model_name, pretrained=None, **model_kwargs)
    elif source.kind == "open_clip-tag":  # by its tag, so open_clip applies the tag's own preprocessing settings
        with model_sources.hub_access(online=allow_hub):
            clip = open_clip.create_model(model_name, pretrained=pretrained, **model_kwargs)
    else:
        clip = open_clip.create_model(model_name, pretrained=str(source.path), **model_kwargs)
    clip.pretrained_source = (
        None if source is None else {**source.describe(), "sha256": model_sources.file_sha256(source.path)}
    )
    return clip


@dataclass
class VisionTower:
    """An open_clip vision tower without its CLIP projection, the width of its pooled features, and the logit
    scale of the CLIP it came from (None when no pretrained weights were loaded)."""

    visual: nn.Module
    width: int
    logit_scale: float | None
    source: dict | None = None  # create_clip's pretrained_source


def create_vision_tower(model_name: str, pretrained: str | None, allow_hub: bool = False) -> VisionTower:
    """The open_clip vision tower of `model_name` with its old projection removed, so that the new head is the only
    projection (preprocessing cfg kept on it, see llm2clip.loading.preprocess_of).

    - open_clip ViT (`visual.transformer`): `proj` dropped; features are the pooled `width`-d token.
    - timm trunk (`visual.trunk`, e.g. EVA02-*): `trunk.reset_classifier(0)` drops timm's head (for the EVA02
      configs that head *is* the CLIP projection) and open_clip's own head/proj is removed; features are the
      trunk's pooled `num_features`. An attention pool of the open_clip head (abs_attn / rot_attn) is kept, as the
      trunk's features are unpooled there.
    - other towers (ModifiedResNet...): kept whole, width measured.
    """
    clip = create_clip(model_name, pretrained, allow_hub)
    visual = clip.visual
    logit_scale = float(clip.logit_scale.detach()) if pretrained else None
    if isinstance(visual, TimmModel):
        visual.trunk.reset_classifier(0)
        pool = getattr(visual.head, "pool", None)
        visual.head = nn.Identity() if pool is None else nn.Sequential(OrderedDict(pool=pool))
        width = visual.trunk.num_features if pool is None else _feature_width(visual)
    elif isinstance(getattr(visual, "proj", None), nn.Parameter):
        width = visual.proj.shape[0]
        visual.proj = None
    else:
        width = _feature_width(visual)
    return VisionTower(visual, width, logit_scale, clip.pretrained_source)


def _feature_width(visual: nn.Module) -> int:
    size = getattr(visual, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    was_training = visual.training
    with torch.no_grad():
        width = visual.eval()(torch.zeros(1, 3, h, w)).shape[-1]
    visual.train(was_training)
    return width


def config_embed_dim(model_name: str) -> int:
    return open_clip.get_model_config(model_name)["embed_dim"]


class LLM2CLIP(nn.Module):
    """Vision tower + new projection head, and the adapter over cached LLM caption embeddings."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        llm_dim: int,
        adapter_blocks: int = 4,
        embed_dim: int | None = None,
        allow_hub: bool = False,
    ) -> None:
        """embed_dim: width of the joint space (official LLM2CLIP: 1280); None = the open_clip config's.
        pretrained, allow_hub: see create_clip."""
        super().__init__()
        tower = create_vision_tower(model_name, pretrained, allow_hub)
        self.visual, width = tower.visual, tower.width
        self.pretrained_source = tower.source
        embed_dim = embed_dim or config_embed_dim(model_name)
        self.head = nn.Linear(width, embed_dim)
        nn.init.normal_(self.head.weight, std=width**-0.5 * 0.5)  # small init: a new head on a tower
        nn.init.zeros_(self.head.bias)
        self.adapter = LLM2CLIPAdapter(llm_dim, embed_dim, blocks=adapter_blocks)
        # The temperature starts from the pretrained CLIP's when there is one (as the official recipe, which loads
        # the EVA02-CLIP checkpoint whole), else CLIP's initial 1/0.07.
        init = tower.logit_scale if tower.logit_scale is not None else math.log(1 / 0.07)
        self.logit_scale = nn.Parameter(torch.tensor(float(init)))
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


def create_clip_baseline(
    model_name: str, pretrained: str | None, embed_dim: int | None = None, allow_hub: bool = False
) -> nn.Module:
    """A standard open_clip CLIP with its own text tower (77-token context), for the baseline.

    embed_dim other than the config's changes both towers' projections, so it is refused with pretrained
    weights (their projections have the config's width): pass it to the LLM2CLIP models only."""
    native = config_embed_dim(model_name)
    if embed_dim is None or embed_dim == native:
        return create_clip(model_name, pretrained, allow_hub)
    if pretrained:
        raise ValueError(
            f"embed_dim={embed_dim}: the CLIP baseline with pretrained weights keeps its projections' width "
            f"({native}); set embed_dim for the LLM2CLIP models only"
        )
    return create_clip(model_name, None, embed_dim=embed_dim)


def clamp_logit_scale(model: nn.Module) -> None:
    """Keep the learnable temperature at or below ln(100), as CLIP and LLM2CLIP do after every step."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


# Parameters that get no weight decay whatever their shape (matched against any dotted part of the name):
# position embeddings and class / register / distillation tokens of open_clip and timm towers (timm's own
# `no_weight_decay()` lists the same), the temperature and bias, and the text tower's token embedding (kept
# from before: it was excluded as an "embedding").
NO_DECAY_NAMES = frozenset(
    {
        "positional_embedding",
        "class_embedding",
        "pos_embed",
        "cls_token",
        "reg_token",
        "dist_token",
        "token_embedding",
        "logit_scale",
        "logit_bias",
    }
)
# Parameters of the stem (layer 0 for lr decay): open_clip ViT and timm trunk names, after "visual." / "visual.trunk.".
_OPEN_CLIP_STEM = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_embed")
_TIMM_STEM = ("patch_embed", "cls_token", "reg_token", "dist_token", "pos_embed", "norm_pre")


def vision_depth(model: nn.Module) -> int:
    """Number of transformer blocks of the model's vision tower (open_clip ViT or timm trunk; 0 for others)."""
    visual = getattr(model, "visual", None)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        blocks = getattr(getattr(visual, "trunk", None), "blocks", None)
    return len(blocks) if blocks is not None else 0


def vision_layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay: the stem 0, block i -> i + 1, everything else (final norm,
    pooling, heads, adapter, text tower, logit scale) num_layers + 1. Covers open_clip ViTs
    (`visual.transformer.resblocks.N`) and timm trunks (`visual.trunk.blocks.N`, e.g. EVA02)."""
    if not name.startswith("visual."):
        return num_layers + 1
    rest = name[len("visual.") :]
    if rest.startswith("trunk."):
        rest, stem, blocks = rest[len("trunk.") :], _TIMM_STEM, "blocks."
    else:
        stem, blocks = _OPEN_CLIP_STEM, "transformer.resblocks."
    if rest.split(".")[0] in stem:
        return 0
    if rest.startswith(blocks):
        return int(rest[len(blocks) :].split(".")[0]) + 1
    return num_layers + 1


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norm weights and other 1-d parameters, plus NO_DECAY_NAMES (position embeddings, class tokens...)."""
    return p.ndim < 2 or any(part in NO_DECAY_NAMES for part in name.split("."))


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, position embeddings, class tokens and the logit scale
    (`no_weight_decay`); lr scaled by layer_decay ** (depth from the top) per vision block (1.0 = off), so the
    stem learns slowest and the new head, the adapter and the text tower at the full lr."""
    num_layers = vision_depth(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = no_weight_decay(name, p)
        layer = vision_layer_id(name, num_layers)
        scale = layer_decay ** (num_layers + 1 - layer)
        g = groups.setdefault(
            (layer, no_decay),
            {"params": [], "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay},
        )
        g["params"].append(p)
    return list(groups.values())
