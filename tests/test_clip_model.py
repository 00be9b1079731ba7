"""Stage-2 model pieces: adapter size, logit-scale clamp, parameter groups, one step lowers the loss; both tower
kinds (open_clip ViT, timm trunk) built from tiny random configs and loaded back from a pretrained checkpoint."""

import math

import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from tiny_towers import TIMM_EVA, TIMM_VIT_REG, TOWERS

from llm2clip import clip_model, storage


def test_adapter_parameter_count_is_about_16_d_squared():
    d, out = 256, 64
    adapter = clip_model.LLM2CLIPAdapter(d, out)
    n = sum(p.numel() for p in adapter.parameters())
    assert abs(n - 16 * d * d) / (16 * d * d) < 0.1  # biases, norms and the d->out head on top
    assert len(adapter.blocks) == 4


def test_adapter_blocks_are_pre_ln_residual():
    block = clip_model.ResidualMLPBlock(8)
    x = torch.randn(3, 8)
    expected = x + block.fc2(torch.nn.functional.gelu(block.fc1(block.norm(x))))
    torch.testing.assert_close(block(x), expected)
    assert block.fc1.out_features == 16


def test_logit_scale_clamped_at_ln_100():
    model = clip_model.LLM2CLIP(clip_model.DEFAULT_MODEL, None, llm_dim=32)
    assert abs(model.logit_scale.item() - math.log(1 / 0.07)) < 1e-6
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    clip_model.clamp_logit_scale(model)
    assert abs(model.logit_scale.item() - math.log(100)) < 1e-6


def test_param_groups_skip_decay_on_norms_biases_and_logit_scale():
    model = clip_model.LLM2CLIP(clip_model.DEFAULT_MODEL, None, llm_dim=32)
    groups = clip_model.param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["logit_scale"])]["weight_decay"] == 0.0
    assert by_id[id(named["adapter.blocks.0.norm.weight"])]["weight_decay"] == 0.0
    assert by_id[id(named["adapter.blocks.0.fc1.bias"])]["weight_decay"] == 0.0
    assert by_id[id(named["adapter.blocks.0.fc1.weight"])]["weight_decay"] == 0.05
    # layer-wise decay: the stem learns slower than the last block, the head at full lr
    assert (
        by_id[id(named["visual.conv1.weight"])]["lr"]
        < by_id[id(named["visual.transformer.resblocks.3.attn.in_proj_weight"])]["lr"]
    )
    assert by_id[id(named["head.weight"])]["lr"] == 1e-3
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_one_step_lowers_the_loss():
    torch.manual_seed(0)
    model = clip_model.LLM2CLIP(clip_model.DEFAULT_MODEL, None, llm_dim=32)
    images, texts = torch.randn(8, 3, 64, 64), torch.randn(8, 32)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(clip_model.param_groups(model, 1e-4, 0.0, 1.0))

    def loss():
        return loss_fn(model.encode_image(images), model.encode_text(texts), model.logit_scale.exp())

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


# ----------------------------------------------------------------------------------------------- both tower kinds


def _image_side(name: str) -> int:
    return open_clip.get_model_config(name)["vision_cfg"]["image_size"]


def _lr_and_decay(model, layer_decay=0.5, weight_decay=0.05):
    groups = clip_model.param_groups(model, lr=1.0, weight_decay=weight_decay, layer_decay=layer_decay)
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {n: (by_id[id(p)]["lr"], by_id[id(p)]["weight_decay"]) for n, p in model.named_parameters()}


# parameter names per tower kind: stem, block i (format), tokens that must get no weight decay
KINDS = {
    clip_model.DEFAULT_MODEL: (
        "visual.conv1.weight",
        "visual.transformer.resblocks.{}.attn.in_proj_weight",
        ["visual.positional_embedding", "visual.class_embedding"],
    ),
    TIMM_EVA: (
        "visual.trunk.patch_embed.proj.weight",
        "visual.trunk.blocks.{}.attn.qkv.weight",
        ["visual.trunk.pos_embed", "visual.trunk.cls_token"],
    ),
    TIMM_VIT_REG: (
        "visual.trunk.patch_embed.proj.weight",
        "visual.trunk.blocks.{}.attn.qkv.weight",
        ["visual.trunk.pos_embed", "visual.trunk.cls_token", "visual.trunk.reg_token"],
    ),
}


@pytest.mark.parametrize("name", TOWERS)
def test_tower_has_one_projection_the_new_head(name):
    model = clip_model.LLM2CLIP(name, None, llm_dim=16)
    embed_dim = open_clip.get_model_config(name)["embed_dim"]
    x = torch.randn(2, 3, _image_side(name), _image_side(name))
    assert model.encode_image(x).shape == (2, embed_dim)
    # nothing inside the tower maps to the joint width any more: the new head is the only projection
    assert not any(p.shape[0] == embed_dim or p.shape[-1] == embed_dim for p in model.visual.parameters())
    if name != clip_model.DEFAULT_MODEL:
        trunk = model.visual.trunk
        assert isinstance(trunk.head, torch.nn.Identity) and isinstance(model.visual.head, torch.nn.Identity)
        assert model.head.in_features == trunk.num_features
        assert trunk(x).shape == (2, trunk.num_features)  # reset_classifier(0): pooled features
    else:
        assert model.visual.proj is None and model.head.in_features == 192


@pytest.mark.parametrize("name", TOWERS)
def test_layer_decay_follows_depth_and_tokens_get_no_weight_decay(name):
    model = clip_model.LLM2CLIP(name, None, llm_dim=16)
    stem, block, tokens = KINDS[name]
    depth = clip_model.vision_depth(model)
    assert depth >= 3
    lr = _lr_and_decay(model)
    # stem 0.5^(L+1), block i 0.5^(L-i), the new head and the adapter at the full lr
    assert lr[stem][0] == pytest.approx(0.5 ** (depth + 1))
    block_lrs = [lr[block.format(i)][0] for i in range(depth)]
    assert block_lrs == pytest.approx([0.5 ** (depth - i) for i in range(depth)])
    assert lr["head.weight"][0] == lr["adapter.proj.weight"][0] == lr["logit_scale"][0] == 1.0
    assert len({round(v[0], 12) for v in lr.values()}) == depth + 2  # every depth its own lr
    for t in tokens:  # position embeddings and class / register tokens: stem lr, no weight decay
        assert lr[t] == (pytest.approx(0.5 ** (depth + 1)), 0.0), t
    assert lr[stem][1] == 0.05 and lr[block.format(0)][1] == 0.05
    assert lr["logit_scale"][1] == 0.0 and lr["head.bias"][1] == 0.0
    # layer_decay 1.0 switches it off
    assert {v[0] for v in _lr_and_decay(model, layer_decay=1.0).values()} == {1.0}


@pytest.mark.parametrize("name", TOWERS)
def test_embed_dim_option_sets_the_joint_width(name):
    model = clip_model.LLM2CLIP(name, None, llm_dim=16, embed_dim=40)
    assert model.head.out_features == model.adapter.proj.out_features == 40
    x = torch.randn(2, 3, _image_side(name), _image_side(name))
    assert model.encode_image(x).shape == (2, 40) and model.encode_text(torch.randn(2, 16)).shape == (2, 40)
    baseline = clip_model.create_clip_baseline(name, None, embed_dim=40)
    assert baseline.encode_image(x).shape == (2, 40)


def _write_checkpoint(name: str, path, logit_scale: float) -> dict[str, torch.Tensor]:
    """A full open_clip state dict with random (non-init) weights, as a released checkpoint would be."""
    torch.manual_seed(1)
    clip = open_clip.create_model(name)
    with torch.no_grad():
        for p in clip.parameters():
            p.normal_(0, 0.05)
        clip.logit_scale.fill_(logit_scale)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return state


@pytest.mark.parametrize("name,suffix", [(n, s) for n in TOWERS for s in (".pt", ".safetensors")])
def test_pretrained_checkpoint_file_loads_back(name, suffix, tmp_path):
    path = tmp_path / f"ckpt{suffix}"
    saved = _write_checkpoint(name, path, math.log(42.0))
    model = clip_model.LLM2CLIP(name, str(path), llm_dim=16)
    tower = model.visual.state_dict()
    for k, v in tower.items():
        torch.testing.assert_close(v, saved[f"visual.{k}"], rtol=0, atol=0)
    dropped = {k for k in saved if k.startswith("visual.")} - {f"visual.{k}" for k in tower}
    if name == clip_model.DEFAULT_MODEL:
        assert dropped == {"visual.proj"}
    else:  # the timm classifier, which the EVA02-style configs use as the CLIP projection
        assert dropped == {"visual.trunk.head.weight", "visual.trunk.head.bias"}
    assert model.logit_scale.item() == pytest.approx(math.log(42.0))  # the pretrained temperature
    # and the pretrained tower trains with depth-wise lrs and token exemptions as the random one
    stem, block, tokens = KINDS[name]
    lr = _lr_and_decay(model, layer_decay=0.85)
    assert lr[stem][0] < lr[block.format(0)][0] < lr[block.format(2)][0] < lr["head.weight"][0]
    assert all(lr[t][1] == 0.0 for t in tokens)


def test_random_init_keeps_clip_initial_temperature():
    model = clip_model.LLM2CLIP(TIMM_EVA, None, llm_dim=16)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_pretrained_checkpoint_from_the_object_store(s3_env, tmp_path):
    saved = _write_checkpoint(TIMM_EVA, tmp_path / "ckpt.safetensors", math.log(30.0))
    uri = storage.join(s3_env, "ckpt.safetensors")
    storage.write_bytes(uri, (tmp_path / "ckpt.safetensors").read_bytes())
    model = clip_model.LLM2CLIP(TIMM_EVA, uri, llm_dim=16)
    torch.testing.assert_close(model.visual.trunk.pos_embed, saved["visual.trunk.pos_embed"])
    assert model.logit_scale.item() == pytest.approx(math.log(30.0))


def test_baseline_keeps_pretrained_projection_width(tmp_path):
    path = tmp_path / "ckpt.pt"
    _write_checkpoint(clip_model.DEFAULT_MODEL, path, math.log(20.0))
    baseline = clip_model.create_clip_baseline(clip_model.DEFAULT_MODEL, str(path))
    assert baseline.logit_scale.item() == pytest.approx(math.log(20.0))
    with pytest.raises(ValueError, match="embed_dim=1280"):
        clip_model.create_clip_baseline(clip_model.DEFAULT_MODEL, str(path), embed_dim=1280)
