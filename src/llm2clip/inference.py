"""Use a trained model: embed images and any caption (never seen in training included) into the joint space.

One entry point for every stage-2 model of a run (LLM2CLIP, the raw-LLM baseline, the CLIP baseline), from a
local directory or s3://:

    from llm2clip import inference
    model = inference.from_run("runs/default")          # summary.json's artifacts; or load_model(model_dir)
    images = model.encode_image(pil_images)            # [N, E], L2-normalised
    text = model.encode_text(["a red circle and a blue square"])  # [1, E]
    ranking = (images @ text.T).squeeze(1).argsort(descending=True)

For an LLM-taught model, `encode_text` rebuilds the caption encoder exactly as the cache that trained the model
recorded it (base model and its fingerprint, LoRA adapter, attention mode, pooling, instruction, max length), runs
it, then the stage-2 adapter (`model.encode_text`). Stage 1's query instructions (`TuneConfig.query_instructions`)
are never applied: the cache embedded every caption without them, so the adapter learned captions without them.
For the CLIP baseline it is open_clip's tokenizer and text tower. Images get the tower's evaluation
preprocessing (llm2clip.loading).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from llm2clip import artifacts, cache_caption_embeddings, devices, loading, storage, text_encoder, train_clip


@dataclass
class Encoder:
    """A stage-2 model ready to embed: images and strings in, L2-normalised fp32 [B, E] on the CPU out."""

    model: torch.nn.Module  # LLM2CLIP or an open_clip CLIP, eval mode, on `device`
    manifest: dict  # the model's train_clip manifest
    preprocess: loading.ImagePreprocess  # the tower's evaluation resize/crop and mean/std
    device: torch.device
    dtype: str  # compute (autocast) dtype
    llm: text_encoder.CaptionEncoder | None = None  # text_source "llm": the caption encoder the cache used
    tokenizer: object | None = None  # text_source "clip": the open_clip tokenizer
    batch_size: int = 64

    @property
    def text_source(self) -> str:
        return self.manifest["config"]["text_source"]

    def image_inputs(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images (any size/mode) or uint8 [B, 3, H, W] -> uint8 [B, 3, h, w] at the tower's input size."""
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise ValueError(
                    f"images: expected a uint8 [B, 3, H, W] tensor, got {images.dtype} {tuple(images.shape)}"
                )
            tensors = list(images)
        else:
            tensors = [torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1) for im in images]
        return torch.stack([self.preprocess.eval_image(t) for t in tensors])

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """Images (see `image_inputs`) -> [B, E] L2-normalised fp32 on the CPU."""
        pixels = self.image_inputs(images)
        out = []
        for s in range(0, len(pixels), self.batch_size):
            batch = self.preprocess.normalize(pixels[s : s + self.batch_size].to(self.device))
            with devices.autocast(self.device, self.dtype):
                features = self.model.encode_image(batch, normalize=False)
            out.append(F.normalize(features.float(), dim=-1).cpu())  # in fp32: bf16 norms are off by ~4e-3
        return torch.cat(out)

    @torch.no_grad()
    def text_inputs(self, texts: Sequence[str]) -> torch.Tensor:
        """What the stage-2 model's `encode_text` consumes: LLM caption embeddings [B, D] fp32 (text_source "llm")
        or open_clip token ids [B, 77] ("clip"). Has the shape of a tokenizer, so open_clip's zero-shot helpers
        can call it as one."""
        texts = list(texts)
        if not texts:
            raise ValueError("texts: no caption given")
        if self.llm is not None:
            emb, _ = text_encoder.encode_all(self.llm, texts, self.dtype)
            return emb
        return self.tokenizer(texts)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> [B, E] L2-normalised fp32 on the CPU (LLM + adapter, or the CLIP text tower)."""
        inputs = self.text_inputs(texts)
        out = []
        for s in range(0, len(inputs), self.batch_size):
            with devices.autocast(self.device, self.dtype):
                features = self.model.encode_text(inputs[s : s + self.batch_size].to(self.device), normalize=False)
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------- loading


def load_model(
    model_dir: str,
    text_lora_dir: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 64,
    allow_hub: bool = False,
) -> Encoder:
    """Load a stage-2 model directory (local or s3://) written by `train_clip.train_clip`.

    text_lora_dir: the stage-1 output (its `adapter/`) for a model trained on tuned embeddings; by default the one
    its cache recorded. device/dtype: "auto" or explicit, as every stage (llm2clip.devices). allow_hub: the base
    LLM its cache recorded may be downloaded from the Hugging Face hub when it is a hub id not in the local cache
    (llm2clip.model_sources; offline by default). A path or s3:// copy is resolved as the stages resolve it."""
    dev, compute = devices.setup(device, dtype)
    model, manifest = train_clip.load_trained(model_dir)
    model.to(dev)
    enc = Encoder(model, manifest, loading.preprocess_of(model), dev, compute, batch_size=batch_size)
    if manifest["config"]["text_source"] == "llm":
        enc.llm = caption_encoder_of(manifest, model_dir, text_lora_dir, dev, compute, allow_hub)
    else:
        enc.tokenizer = open_clip.get_tokenizer(manifest["config"]["model"])
    return enc


def from_run(
    run: str | dict, name: str = "llm2clip", device: str = "auto", dtype: str = "auto", allow_hub: bool = False
) -> Encoder:
    """Load model `name` of a run: its evaluate output directory (or summary.json, local or s3://, or the summary
    dict), whose `artifacts` gives {"text_lora": URI, "models": {name: URI}}. allow_hub: see load_model."""
    if isinstance(run, dict):
        summary = run
    else:
        summary = storage.read_json(run if str(run).endswith(".json") else storage.join(run, "summary.json"))
    found = summary.get("artifacts")
    if not found:
        raise ValueError(
            f"{run if isinstance(run, str) else 'summary'}: no 'artifacts' (a run from before they were recorded)"
        )
    models = found.get("models", {})
    if name not in models:
        raise ValueError(f"name={name!r}: the run has models {sorted(models)}")
    return load_model(
        models[name], text_lora_dir=found.get("text_lora"), device=device, dtype=dtype, allow_hub=allow_hub
    )


def caption_encoder_of(
    manifest: dict, model_dir: str, text_lora_dir: str | None, device: torch.device, dtype: str, allow_hub: bool = False
) -> text_encoder.CaptionEncoder:
    """The caption encoder the model's cache was made with, checked against the recorded fingerprints."""
    identity = (manifest.get("cache") or {}).get("encoder")
    if identity is None:
        raise ValueError(f"{model_dir}: its manifest records no caption-embedding cache encoder")
    if identity["pooling"] != text_encoder.POOLING:
        raise ValueError(
            f"{model_dir}: trained on embeddings pooled by {identity['pooling']!r}; this version pools by "
            f"{text_encoder.POOLING!r}, so its captions would not match what the adapter learned"
        )
    if text_encoder.model_fingerprint(identity["base_model"], allow_hub) != identity["base_fingerprint"]:
        raise ValueError(f"{model_dir}: the local {identity['base_model']!r} differs from the model its cache used")
    llm = cache_caption_embeddings.base_encoder(identity, device, dtype, allow_hub)  # exactly as the cache built it
    if identity["adapter_fingerprint"] is None:  # the raw-LLM baseline: no adapter
        return llm
    lora = text_lora_dir or recorded_text_lora(manifest)
    if lora is None or not storage.exists(storage.join(lora, "adapter")):
        raise ValueError(f"{model_dir}: trained on tuned embeddings; pass text_lora_dir (stage-1 output), not {lora!r}")
    with storage.local_dir(storage.join(lora, "adapter")) as adapter_dir:
        if text_encoder.adapter_fingerprint(adapter_dir) != identity["adapter_fingerprint"]:
            raise ValueError(f"{lora}: this LoRA adapter is not the one the model's caption cache was made with")
        text_encoder.load_lora(llm, adapter_dir)
    return llm


def recorded_text_lora(manifest: dict) -> str | None:
    """The stage-1 output the model's first cache was made from, as its manifest recorded it (None if unknown)."""
    caches = manifest.get("inputs", {}).get("caption_embeddings") or []
    if not caches or not storage.exists(storage.join(caches[0], artifacts.MANIFEST)):
        return None
    return artifacts.read_manifest(caches[0], "cache_caption_embeddings")["inputs"].get("text_lora")
