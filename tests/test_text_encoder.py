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


def add_bos_eos(encoder):
    """Make the tiny tokenizer wrap every text as Llama/Mistral tokenizers do: BOS ... EOS (</s> plays both)."""
    from tokenizers.processors import TemplateProcessing

    eos = encoder.tokenizer.eos_token_id
    encoder.tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="</s> $A </s>", special_tokens=[("</s>", eos)]
    )
    return encoder


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("instruction", ["", "Describe this picture: "])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_pooling_averages_exactly_the_captions_own_tokens(tiny_encoder, padding_side, instruction, bidirectional):
    """Brute force: run each caption alone, unpadded, and average the states at the positions between BOS +
    instruction tokens and EOS (counted by tokenizing the instruction by itself)."""
    enc = add_bos_eos(tiny_encoder)
    te.set_attention(enc, bidirectional)
    enc.instruction = instruction
    enc.tokenizer.padding_side = padding_side
    n_instruction = len(enc.tokenizer(instruction.rstrip(), add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        pooled = te.embed(enc, CAPTIONS)
        for i, caption in enumerate(CAPTIONS):
            ids = torch.tensor([enc.tokenizer(instruction + caption)["input_ids"]])
            assert ids[0, 0] == ids[0, -1] == enc.tokenizer.eos_token_id  # BOS and EOS are there
            states = te.hidden_states(enc, ids, torch.ones_like(ids))[0]
            own = states[1 + n_instruction : -1]
            assert len(own) >= 2
            torch.testing.assert_close(pooled[i], own.mean(0), atol=1e-5, rtol=1e-5)
            # the excluded positions matter: averaging over all tokens (BOS, EOS, instruction) would differ
            assert not torch.allclose(pooled[i], states.mean(0), atol=1e-4)


def test_instruction_is_attended_to_but_not_pooled(tiny_encoder):
    """The instruction changes the caption tokens' states (attention sees it), yet the mask covers the same count of
    tokens as the caption has without it."""
    enc = add_bos_eos(tiny_encoder)
    plain = te.tokenize(enc, CAPTIONS)
    with torch.no_grad():
        without = te.embed(enc, CAPTIONS)
        enc.instruction = "Describe this picture: "
        with_instruction = te.embed(enc, CAPTIONS)
    prefixed = te.tokenize(enc, CAPTIONS)
    assert torch.equal(plain["embed_mask"].sum(1), prefixed["embed_mask"].sum(1))
    assert prefixed["input_ids"].shape[1] > plain["input_ids"].shape[1]
    for a, b in zip(without, with_instruction, strict=True):
        assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("instruction", ["", "Describe this picture: "])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_per_caption_instructions_are_attended_to_and_never_pooled(tiny_encoder, instruction, padding_side):
    """Stage 1's query instructions: each caption may carry its own instruction after the encoder's. Brute force
    per caption (alone, unpadded, averaged between BOS + both instructions and EOS); a caption given "" embeds
    exactly as without any per-caption instruction, in one mixed batch, padded either side."""
    enc = add_bos_eos(tiny_encoder)
    enc.instruction = instruction
    enc.tokenizer.padding_side = padding_side
    own = ["Given a sentence, retrieve a detailed relevant sentence; ", "", "Find the short one; "]
    with torch.no_grad():
        pooled = te.embed(enc, CAPTIONS, own)
        plain = te.embed(enc, CAPTIONS)
        for i, caption in enumerate(CAPTIONS):
            prefix = instruction + own[i]
            n_prefix = len(enc.tokenizer(prefix.rstrip(), add_special_tokens=False)["input_ids"]) if prefix else 0
            ids = torch.tensor([enc.tokenizer(prefix + caption)["input_ids"]])
            states = te.hidden_states(enc, ids, torch.ones_like(ids))[0]
            torch.testing.assert_close(pooled[i], states[1 + n_prefix : -1].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[1], plain[1], atol=1e-5, rtol=1e-5)  # the document: no instruction of its own
    for i in (0, 2):  # attended to: the query's own tokens see it
        assert not torch.allclose(pooled[i], plain[i], atol=1e-4)
    counts = te.tokenize(enc, CAPTIONS, own)["embed_mask"].sum(1)
    assert torch.equal(counts, te.tokenize(enc, CAPTIONS)["embed_mask"].sum(1))  # the caption's tokens only
    length_sorted, _ = te.embed_by_length(enc, CAPTIONS, max_tokens=32, max_batch=2, instructions=own)
    torch.testing.assert_close(length_sorted, pooled, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="instructions: 2 given for 3 captions"):
        te.tokenize(enc, CAPTIONS, own[:2])


def test_bos_and_padding_never_enter_the_pooling_mask(tiny_encoder):
    enc = add_bos_eos(tiny_encoder)
    enc.tokenizer.padding_side = "left"
    batch = te.tokenize(enc, CAPTIONS)
    special = torch.isin(batch["input_ids"], torch.tensor(enc.tokenizer.all_special_ids))
    assert special.any() and not (batch["embed_mask"].bool() & special).any()
    assert torch.equal(batch["embed_mask"].bool(), batch["attention_mask"].bool() & ~special)


def test_a_caption_with_no_token_of_its_own_is_an_error(tiny_encoder):
    tiny_encoder.instruction = "Describe this picture in many words please: "
    tiny_encoder.max_length = 8  # the instruction alone fills it
    with pytest.raises(ValueError, match="no token of its own"):
        te.tokenize(tiny_encoder, CAPTIONS)


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
