"""Stage-2 model pieces: adapter size, logit-scale clamp, parameter groups, one step lowers the loss."""

import math

import torch
from open_clip.loss import ClipLoss

from llm2clip import clip_model


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
