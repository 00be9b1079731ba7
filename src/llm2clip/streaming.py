"""Stage-2 training data as a stream: canonical shards (local or s3://) read in DataLoader workers, decoded and
augmented there, joined shard by shard with their cached caption embeddings (or CLIP tokens), through a shuffle
buffer. Memory is bounded by the buffer and one shard's embeddings per worker, not by the dataset.

Who reads what. A data pass ("epoch" of the stream) splits the train split into units: whole shards, or, when
there are fewer shards than reading slots (ranks x workers), every shard cut into `parts` interleaved parts
(sample i of a shard belongs to part i % parts). Each pass shuffles the units with the seed and deals them to the
slots round-robin, so no two slots ever read the same sample of a pass. Each slot streams its units pass after
pass without end; the trainer takes exactly the steps it needs.

Everything random is a function of (seed, pass, sample key): which caption an image is paired with, its random
resized crop. The shuffle buffer's draws are a function of (seed, pass, slot). So the stream of a slot is fixed
by its position alone, and resuming at step s replays the position arithmetically: whole passes are skipped by
count (the shards' sizes are known), the pass in progress is re-read without decoding images. A resumed run sees
exactly the samples, crops and captions the uninterrupted run would have seen.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from llm2clip import data, storage
from llm2clip.loading import ImagePreprocess


@dataclass(frozen=True)
class Unit:
    """Samples i of a shard with i % parts == part."""

    shard: str
    size: int  # samples in the whole shard
    part: int = 0
    parts: int = 1

    @property
    def count(self) -> int:
        return len(range(self.part, self.size, self.parts))


def split_sizes(split_dir: str) -> dict[str, int]:
    """{shard URI: samples} of a prepared split, from its sizes.json (written with the shards)."""
    if not storage.exists(storage.join(split_dir, "sizes.json")):
        raise FileNotFoundError(
            f"{split_dir}: no sizes.json, so not a split written by prepare_data "
            "(--dataset must be prepare_data's output)"
        )
    sizes = storage.read_json(storage.join(split_dir, "sizes.json"))
    return {storage.join(split_dir, name): int(n) for name, n in sorted(sizes.items()) if n > 0}


def slot_units(sizes: dict[str, int], slots: int, slot: int, seed: int, epoch: int) -> list[Unit]:
    """The units one reading slot owns in pass `epoch` (see the module docstring)."""
    parts = max(1, math.ceil(slots / len(sizes)))
    units = [Unit(shard, n, p, parts) for shard, n in sizes.items() for p in range(parts)]
    random.Random(f"{seed}:units:{epoch}").shuffle(units)
    return units[slot::slots]


def sample_rng(seed: int, epoch: int, key: str) -> tuple[random.Random, torch.Generator]:
    """The randomness of one sample in one pass: caption choice (Python) and crop (torch)."""
    rng = random.Random(f"{seed}:{epoch}:{key}")
    return rng, torch.Generator().manual_seed(rng.getrandbits(63))


def choose_caption(kinds: list[str], long_prob: float, rng: random.Random) -> int:
    """Row of the caption to train on: a long caption with probability long_prob (when the image has one), else a
    short or raw one (loading.CaptionTable.sample applies the same rule)."""
    longs = [i for i, k in enumerate(kinds) if k == "long"]
    others = [i for i, k in enumerate(kinds) if k in ("raw", "short")]
    pool = longs if longs and (not others or rng.random() < long_prob) else others
    return rng.choice(pool)


class TrainStream(IterableDataset):
    """Endless (image uint8 [3, h, w], text) samples of one rank; text is a cached embedding [D] (cache_dirs given)
    or the CLIP tokens [77] of the chosen caption (clip_model given)."""

    def __init__(
        self,
        dataset_dir: str,
        split: str,
        preprocess: ImagePreprocess,
        *,
        cache_dirs: list[str] | None = None,
        clip_model: str | None = None,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        long_caption_prob: float = 0.5,
        start_batch: int = 0,
        batch_size: int = 1,
    ) -> None:
        """start_batch: batches of `batch_size` this rank already trained on (resume): the stream starts after
        them, exactly where an uninterrupted stream would be (see `worker_roles`)."""
        if (cache_dirs is None) == (clip_model is None):
            raise ValueError("TrainStream needs exactly one text source: cache_dirs (LLM) or clip_model (CLIP)")
        split_path = data.split_path(split)
        split_dir = storage.join(dataset_dir, split_path)
        self.split_path, self.preprocess = split_path, preprocess
        self.split_path = split_path
        self.cache_dirs, self.clip_model = cache_dirs, clip_model
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle_buffer, self.long_caption_prob = max(1, shuffle_buffer), long_caption_prob
        self.start_batch, self.batch_size = start_batch, batch_size
        self.sizes = split_sizes(split_dir)
        if not self.sizes:
            raise ValueError(f"{split_dir}: the split has no samples (sizes.json lists no non-empty shard)")

    # ------------------------------------------------------------------------------------------- reading

    def _text_rows(self, unit: Unit) -> dict[str, torch.Tensor] | None:
        if self.cache_dirs is None:
            return None
        from llm2clip.cache_caption_embeddings import shard_embeddings

        return shard_embeddings(self.cache_dirs, self.split_path, Path(unit.shard).name)

    def _raw(self, unit: Unit) -> Iterator[dict]:
        """The unit's samples, undecoded, with their caption embeddings attached."""
        rows = self._text_rows(unit)
        # the units are split across ranks and workers here: webdataset's own node and worker splitting is off (it
        # would hand this one-shard list to one worker only and refuse to run under torchrun)
        shard = wds.WebDataset(
            unit.shard, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None
        )
        for i, sample in enumerate(shard):
            if i % unit.parts != unit.part:
                continue
            key = sample["__key__"]
            if rows is not None and key not in rows:
                raise KeyError(f"sample {key!r} of shard {unit.shard} has no cached caption embedding")
            yield {**sample, "text_rows": rows[key] if rows is not None else None}

    def _shuffled(self, units: list[Unit], rng: random.Random) -> Iterator[dict]:
        buffer: list[dict] = []
        for unit in units:
            for sample in self._raw(unit):
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, sample: dict, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        kinds = [k for k, _ in data.caption_list(meta)]
        if sample["text_rows"] is not None and sample["text_rows"].shape[0] != len(kinds):
            raise ValueError(
                f"sample {key!r}: cache has {sample['text_rows'].shape[0]} captions, shard has {len(kinds)}"
            )
        rng, generator = sample_rng(self.seed, epoch, key)
        row = choose_caption(kinds, self.long_caption_prob, rng)
        ext = next(e for e in data.IMAGE_EXTS if e in sample)
        with Image.open(io.BytesIO(sample[ext])) as img:
            pixels = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
        image = self.preprocess.augment_batch([self.preprocess.train_base(pixels)], generator)[0]
        if sample["text_rows"] is not None:
            return image, sample["text_rows"][row]
        return image, self._tokenizer([data.caption_list(meta)[row][1]])[0]

    # ------------------------------------------------------------------------------------------- the stream

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        role, skip = worker_roles(self.start_batch, workers, self.batch_size)[worker]
        slots, slot = self.world * workers, self.rank * workers + role
        if self.clip_model is not None:
            self._tokenizer = open_clip.get_tokenizer(self.clip_model)
        epoch = 0
        while True:
            units = slot_units(self.sizes, slots, slot, self.seed, epoch)
            count = sum(u.count for u in units)
            if count == 0:
                raise ValueError(
                    f"reading slot {slot} of {slots} got no samples: too many ranks x workers for "
                    f"{sum(self.sizes.values())} samples"
                )
            if skip >= count:  # a whole pass already delivered before the resume: skip it without reading
                skip -= count
                epoch += 1
                continue
            for sample in self._shuffled(units, random.Random(f"{self.seed}:buffer:{epoch}:{slot}")):
                if skip:
                    skip -= 1
                    continue
                yield self._decode(sample, epoch)
            epoch += 1


def worker_roles(start_batch: int, workers: int, batch_size: int) -> list[tuple[int, int]]:
    """(role, samples to skip) of each DataLoader worker of a rank resumed after `start_batch` batches.

    The DataLoader takes batches from its workers round-robin (batch j from worker j % workers; ours never run
    dry). In the uninterrupted run, batch j came from the worker in role j % workers; the resumed loader's worker
    w delivers its batches k = w, w + workers, ..., i.e. original batches start_batch + k, so it plays role
    (start_batch + w) % workers, and skips what that role delivered before: its batches among 0..start_batch-1."""
    workers = max(1, workers)
    roles = [(start_batch + w) % workers for w in range(workers)]
    return [(r, len(range(r, start_batch, workers)) * batch_size) for r in roles]


def loader(stream: TrainStream, batch_size: int, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches of `batch_size` samples from `workers` processes (0: in the training process)."""
    return torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
