"""The LLM as caption encoder: attention direction, padding-independent pooling, length batching."""

import pytest
import torch

from llm2clip import text_encoder as te

CAPTIONS = ["a red circle and a blue square", "a picture of a green triangle", "an orange cross"]


def first_token_state(encoder, ids, mask):
    return te.hidden_states(encoder, ids, mask)[:, 0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True])
def test_bidirectional_probe(attn, padded):
    """Changing the LAST token changes the FIRST token's state only when attention is bidirectional."""
    for bidirectional in (True, False):
        enc = te.load_caption_encoder(te.TINY_LLAMA, bidirectional=bidirectional, attn_implementation=attn)
        ids = torch.tensor([[5, 17, 42, 99, 7, 0], [5, 17, 42, 99, 8, 0]])
        mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]) if padded else torch.ones_like(ids)
        if not padded:
            ids = ids[:, :5]
            mask = mask[:, :5]
        with torch.no_grad():
            h = first_token_state(enc, ids, mask)
        changed = not torch.allclose(h[0], h[1], atol=1e-6)
        assert changed == bidirectional, f"bidirectional={bidirectional} attn={attn} padded={padded}"


@pytest.mark.parametrize("bidirectional", [True, False])
def test_pooling_ignores_padding_side(tiny_encoder, bidirectional):
    """Left and right padding give the same caption embeddings, equal to embedding each caption alone."""
    tiny_encoder.bidirectional = bidirectional
    te.set_bidirectional(tiny_encoder.model, bidirectional)
    with torch.no_grad():
        tiny_encoder.tokenizer.padding_side = "left"
        left = te.embed(tiny_encoder, CAPTIONS)
        tiny_encoder.tokenizer.padding_side = "right"
        right = te.embed(tiny_encoder, CAPTIONS)
        alone = torch.cat([te.embed(tiny_encoder, [c]) for c in CAPTIONS])
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)


def test_mean_pool_matches_manual():
    states = torch.randn(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    expected = torch.stack([states[0, 1:].mean(0), states[1, :2].mean(0)])
    torch.testing.assert_close(te.mean_pool(states, mask), expected)


def test_length_batches_cover_everything_within_budget():
    lengths = [5, 40, 7, 40, 12, 3, 39]
    batches = te.length_batches(lengths, max_tokens=80, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 80
        assert lengths[b[0]] == max(lengths[i] for i in b)  # first is the longest: padding is to it


def test_encode_all_keeps_input_order(tiny_encoder):
    captions = CAPTIONS + ["a long caption " * 20, "x"]
    batched, padded = te.encode_all(tiny_encoder, captions, "float32", max_tokens=64)
    with torch.no_grad():
        one_by_one = torch.cat([te.embed(tiny_encoder, [c]) for c in captions])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    assert padded >= sum(te.token_lengths(tiny_encoder, captions))


def test_lora_targets_all_projections(tiny_encoder):
    te.add_lora(tiny_encoder, r=4, alpha=8, dropout=0.0, targets=te.LORA_TARGETS)
    trainable = [n for n, p in tiny_encoder.model.named_parameters() if p.requires_grad]
    for proj in te.LORA_TARGETS:
        assert any(f"{proj}.lora_A" in n for n in trainable), proj
    assert all("lora_" in n for n in trainable)


def test_adapter_fingerprint_ignores_target_module_order_and_base_path(tmp_path):
    import json

    a, b = tmp_path / "a", tmp_path / "b"
    for d, order, base in ((a, ["q_proj", "v_proj"], "/x"), (b, ["v_proj", "q_proj"], "/y")):
        d.mkdir()
        (d / "adapter_config.json").write_text(
            json.dumps({"r": 4, "target_modules": order, "base_model_name_or_path": base})
        )
        (d / "adapter_model.safetensors").write_bytes(b"weights")
    assert te.adapter_fingerprint(a) == te.adapter_fingerprint(b)
    (b / "adapter_model.safetensors").write_bytes(b"other weights")
    assert te.adapter_fingerprint(a) != te.adapter_fingerprint(b)
