"""`python -m llm2clip.train_clip` with fixed global batches, for the DDP equivalence test (run under torchrun).

Step s's global batch (images and caption embeddings) is drawn from a generator seeded with s; rank r of N takes
rows [r B/N, (r+1) B/N). Everything else (model, DDP, ClipLoss gathering, optimizer, clipping, outputs) is the
real stage 2, so 1 process and N processes see the same data and must train alike.
"""

import os

import torch

from llm2clip import streaming, train_clip


def fixed_loader(stream, batch_size, workers, pin_memory):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    h, w = stream.preprocess.size
    dim = train_clip.artifacts.read_manifest(stream.cache_dirs[0], "cache_caption_embeddings")["dim"]
    step = 0
    while True:
        gen = torch.Generator().manual_seed(1000 + step)
        images = torch.randint(0, 256, (batch_size * world, 3, h, w), dtype=torch.uint8, generator=gen)
        texts = torch.randn(batch_size * world, dim, generator=gen).half()
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        yield images[rows], texts[rows]
        step += 1


streaming.loader = fixed_loader
train_clip.main()
