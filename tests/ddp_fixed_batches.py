"""`python -m llm2clip.train_clip` with fixed global batches, for the DDP equivalence test (run under torchrun).

Step s's global batch (images and caption embeddings) is drawn from a generator seeded with s; rank r of N takes
rows [r B/N, (r+1) B/N). Everything else (model, DDP, ClipLoss gathering, optimizer, clipping, outputs) is the
real stage 2, so 1 process and N processes see the same data and must train alike.

With DDP_FIRST_GRADS=DIR in the environment, every rank also writes the gradients of the first step, as
train_clip's backward left them (after DDP's all-reduce, before clipping), to DIR/rank-<r>.safetensors: AdamW and
clipping would hide a gradient off by a constant factor, the gradients themselves do not.
"""

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from llm2clip import streaming, train_clip

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))


def fixed_loader(stream, batch_size, workers, pin_memory):
    h, w = stream.preprocess.size
    dim = train_clip.artifacts.read_manifest(stream.cache_dirs[0], "cache_caption_embeddings")["dim"]
    step = 0
    while True:
        gen = torch.Generator().manual_seed(1000 + step)
        images = torch.randint(0, 256, (batch_size * WORLD, 3, h, w), dtype=torch.uint8, generator=gen)
        texts = torch.randn(batch_size * WORLD, dim, generator=gen).half()
        rows = slice(RANK * batch_size, (RANK + 1) * batch_size)
        yield images[rows], texts[rows]
        step += 1


def record_first_gradients(out_dir: str) -> None:
    """Wrap build_model (to know the model's parameter names) and clip_grad_norm_ (train_clip calls it right after
    loss.backward()) so that the first call saves this rank's gradients."""
    built = {}
    real_build, real_clip = train_clip.build_model, torch.nn.utils.clip_grad_norm_

    def build_model(cfg, llm_dim):
        built["model"] = real_build(cfg, llm_dim)
        return built["model"]

    def clip_grad_norm_(parameters, *args, **kwargs):
        if not built.get("saved"):
            grads = {n: p.grad.detach().clone() for n, p in built["model"].named_parameters() if p.grad is not None}
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            save_file(grads, str(Path(out_dir) / f"rank-{RANK}.safetensors"))
            built["saved"] = True
        return real_clip(parameters, *args, **kwargs)

    train_clip.build_model = build_model
    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_


streaming.loader = fixed_loader
if os.environ.get("DDP_FIRST_GRADS"):
    record_first_gradients(os.environ["DDP_FIRST_GRADS"])
train_clip.main()
