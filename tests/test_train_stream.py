"""Stage 2 at scale: the shard stream (disjoint slots, exact resume), torchrun DDP and checkpoint resume."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm2clip import artifacts, data, storage, streaming, train_clip
from llm2clip.loading import ImagePreprocess

HERE = Path(__file__).parent
DIM = 32


def fake_cache(dataset_dir: str, out: Path) -> str:
    """A caption-embedding cache in the stage's layout (one file per data shard, rows in caption_list order), with
    seeded random vectors: stage 2 reads only this contract."""
    gen = torch.Generator().manual_seed(0)
    split, count = storage.join(dataset_dir, "train"), 0
    for shard in storage.listdir(split, ".tar"):
        rows = {
            key: torch.randn(len(data.caption_list(meta)), DIM, generator=gen).half()
            for _, key, meta in data.read_captions_of_shard(shard)
        }
        count += sum(len(r) for r in rows.values())
        (out / "train").mkdir(parents=True, exist_ok=True)
        save_file(rows, str(out / "train" / Path(shard).name.replace(".tar", ".safetensors")))
    artifacts.write_manifest(
        str(out), "cache_caption_embeddings", {}, {}, encoder={"base_model": "fake"}, dim=DIM, count=count
    )
    return str(out)


@pytest.fixture(scope="module")
def cache(tiny_dataset, tmp_path_factory) -> str:
    return fake_cache(tiny_dataset, tmp_path_factory.mktemp("cache"))


def _keys(stream: streaming.TrainStream, slot: int, slots: int, epoch: int) -> list[str]:
    units = streaming.slot_units(stream.sizes, slots, slot, stream.seed, epoch)
    return [s["__key__"] for s in stream._shuffled(units, random.Random(0))]


# ----------------------------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("slots", [1, 2, 3, 5, 7])
def test_every_pass_deals_each_sample_to_exactly_one_slot(tiny_dataset, cache, slots):
    stream = streaming.TrainStream(tiny_dataset, "train", ImagePreprocess(size=32), cache_dirs=[cache])
    all_keys = sorted(k for _, k, _ in data.read_captions(storage.join(tiny_dataset, "train")))
    for epoch in (0, 1):
        seen = [k for slot in range(slots) for k in _keys(stream, slot, slots, epoch)]
        assert sorted(seen) == all_keys  # every sample once: none lost, none read by two slots


@pytest.mark.parametrize("shard_size", [12, 24])
def test_two_ranks_of_two_workers_read_every_sample_once_per_pass(tmp_path, shard_size):
    """Through the real DataLoader: 2 ranks x 2 worker processes = 4 readers over 48 samples, as 4 whole shards
    (shard_size 12) or 2 shards cut into 2 interleaved parts each (24). Every reader owns 12 samples a pass, so a
    rank's first 6 batches of 4 are one pass of each of its workers (the DataLoader takes batch j from worker
    j % 2: torch 2.14.1 torch/utils/data/dataloader.py cycles the workers, line 1260, and returns batches in
    order, in_order=True by default, line 274). Batches carry no keys; each yielded text is a cached vector,
    random and unique per caption, so it names its sample. Every sample of the pass is read exactly once across
    the 4 readers."""
    from llm2clip.prepare_data import PrepareDataConfig, prepare_data

    dataset = str(tmp_path / "data")
    prepare_data(PrepareDataConfig(num_train=48, num_eval=4, shard_size=shard_size), dataset)
    cache = fake_cache(dataset, tmp_path / "cache")
    owner = {}  # cached vector (bytes) -> sample key
    for f in (tmp_path / "cache" / "train").glob("*.safetensors"):
        for key, rows in load_file(str(f)).items():
            owner.update({row.numpy().tobytes(): key for row in rows})
    all_keys = sorted(k for _, k, _ in data.read_captions(storage.join(dataset, "train")))
    assert len(all_keys) == 48 and len(set(owner.values())) == 48 and len(owner) > 48  # one vector per caption
    seen: dict[tuple[int, int], list[str]] = {}
    for rank in range(2):
        stream = streaming.TrainStream(
            dataset, "train", ImagePreprocess(size=16), cache_dirs=[cache], rank=rank, world=2, batch_size=4
        )
        batches = iter(streaming.loader(stream, 4, 2, pin_memory=False))
        for j in range(6):
            _, texts = next(batches)
            seen.setdefault((rank, j % 2), []).extend(owner[t.numpy().tobytes()] for t in texts)
        del batches  # stops the workers
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(set(keys)) == 12 for keys in seen.values()), {r: len(set(k)) for r, k in seen.items()}
    assert sorted(k for keys in seen.values() for k in keys) == all_keys  # none lost, none read twice


def test_passes_differ_and_units_follow_the_seed(tiny_dataset):
    sizes = streaming.split_sizes(storage.join(tiny_dataset, "train"))
    assert len(sizes) == 3 and sum(sizes.values()) == 48  # 20 + 20 + 8
    a = [streaming.slot_units(sizes, 2, s, 0, 0) for s in range(2)]
    assert a == [streaming.slot_units(sizes, 2, s, 0, 0) for s in range(2)]
    orders = {tuple(u.shard for u in streaming.slot_units(sizes, 1, 0, 0, e)) for e in range(6)}
    assert len(orders) > 1  # the shard order changes from pass to pass


def test_resumed_workers_take_the_roles_of_the_dataloader_round_robin():
    assert streaming.worker_roles(0, 2, 4) == [(0, 0), (1, 0)]
    # batches 0 2 4 came from role 0, 1 3 from role 1; batch 5 (the resumed loader's first, from its worker 0)
    # is role 1's third batch, after the 8 samples of its two
    assert streaming.worker_roles(5, 2, 4) == [(1, 8), (0, 12)]
    assert streaming.worker_roles(5, 0, 4) == [(0, 20)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_exactly(tiny_dataset, cache, workers):
    """Batches k.. of a stream restarted at batch k equal batches k.. of the uninterrupted stream, across a pass
    boundary (48 samples, batch 8: pass 0 ends at batch 6), images and texts alike."""
    prep = ImagePreprocess(size=32)

    def batches(skip_batches: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        stream = streaming.TrainStream(
            tiny_dataset, "train", prep, cache_dirs=[cache], shuffle_buffer=10, start_batch=skip_batches, batch_size=8
        )
        it = iter(streaming.loader(stream, 8, workers, pin_memory=False))
        return [next(it) for _ in range(n)]

    full = batches(0, 9)
    resumed = batches(5, 4)
    for (ai, at), (bi, bt) in zip(full[5:], resumed, strict=True):
        assert torch.equal(ai, bi) and torch.equal(at, bt)
    assert not torch.equal(full[0][0], full[1][0])
    assert full[0][0].dtype == torch.uint8 and full[0][0].shape == (8, 3, 32, 32) and full[0][1].shape == (8, DIM)


def test_stream_refuses_a_missing_embedding(tiny_dataset, tmp_path):
    cache = fake_cache(tiny_dataset, tmp_path / "c")
    first = sorted((tmp_path / "c" / "train").glob("*.safetensors"))[0]
    rows = load_file(str(first))
    dropped = sorted(rows)[0]
    save_file({k: v for k, v in rows.items() if k != dropped}, str(first))
    stream = streaming.TrainStream(
        tiny_dataset, "train", ImagePreprocess(size=32), cache_dirs=[cache], shuffle_buffer=1
    )
    with pytest.raises(KeyError, match=dropped):
        for _ in zip(range(48), stream, strict=False):
            pass


# ----------------------------------------------------------------------------------------------- the entry point


def _cli(*args: str, env: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "llm2clip.train_clip", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}


def test_help_documents_every_setting():
    out = subprocess.run(_cli("--help"), capture_output=True, text=True, check=True).stdout
    for flag in ("--dataset", "--caption-embeddings", "--batch-size", "--workers", "--checkpoint-every", "torchrun"):
        assert flag in out


def test_cli_names_a_bad_setting(tiny_dataset, tmp_path):
    r = subprocess.run(
        _cli("--dataset", tiny_dataset, "--output", str(tmp_path), "--text-source", "bert"),
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "text_source" in r.stderr


def test_sigkill_midway_then_rerun_matches_an_uninterrupted_run(tiny_dataset, cache, tmp_path):
    """The training process is killed (SIGKILL: no cleanup) after its second checkpoint; the same command run again
    resumes from it and ends with the uninterrupted run's losses and weights."""
    args = [
        "--dataset",
        tiny_dataset,
        "--caption-embeddings",
        cache,
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "4",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--dtype",
        "float32",
    ]  # an equality check: fp32 on every CPU
    whole = tmp_path / "whole"
    subprocess.run(_cli(*args, "--output", str(whole)), check=True, env=_env(), capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(*args, "--output", str(killed)), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    latest = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 600
    while not (latest.exists() and json.loads(latest.read_text())["step"] >= 8):
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before its checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()

    rerun = subprocess.run(_cli(*args, "--output", str(killed)), env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from the checkpoint at step" in rerun.stdout
    a, b = (artifacts.read_manifest(str(d), "train_clip") for d in (whole, killed))
    assert b["metrics"]["resumed_at_step"] >= 8 and b["metrics"]["steps"] == a["metrics"]["steps"] == 18
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-4, abs=1e-5)
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (whole, killed))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), k
    assert not list((killed / "checkpoints").glob("*")) if (killed / "checkpoints").exists() else True


def test_a_checkpoint_of_another_config_is_refused(tiny_dataset, cache, tmp_path):
    cfg = train_clip.TrainClipConfig(epochs=1, batch_size=8, checkpoint_every=2)
    train_clip.save_checkpoint(str(tmp_path), {"step": 2, "config": train_clip._resumable(cfg)})
    with pytest.raises(ValueError, match="another config.*epochs"):
        train_clip.load_checkpoint(str(tmp_path), train_clip.TrainClipConfig(epochs=2, batch_size=8))


# ----------------------------------------------------------------------------------------------- torchrun DDP


def _torchrun(nproc: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=900)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_dataset, cache, tmp_path):
    """ddp_fixed_batches.py runs the real `python -m llm2clip.train_clip` with one change: every step's global
    batch is fixed (seeded), each rank taking its half. 2 ranks (gloo, DDP, ClipLoss gathering with gradients)
    must train as 1 process does, all in fp32:
    - the first step's gradients (after DDP's all-reduce, before clipping) are the same on both ranks, and equal
      the 1-process gradients to fp32 rounding: per tensor within 2e-5 of its largest entry (the half-batch
      matmuls and the gather round differently; measured: at most 2.1e-6). This is the check that catches a
      gradient scaled by the world size (summed instead of averaged over ranks): AdamW divides each step by
      sqrt(v), so a constant factor on every gradient leaves the losses and weights below unchanged as long as
      clipping does not engage (with --grad-clip 1e9 they passed a doubled gradient);
    - the losses of all 3 steps agree within 1e-4 (relative), the final weights within 2e-4 (absolute; an AdamW
      step moves a weight by up to lr = 1e-3). Weights differ at all only where the true gradient is ~0 (e.g.
      the attention key bias, which softmax ignores): there AdamW's g / sqrt(v) turns float-rounding differences
      of the gathered features into steps of up to lr (measured: max 1.5e-4)."""
    args = [
        "--dataset",
        tiny_dataset,
        "--caption-embeddings",
        cache,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--checkpoint-every",
        "0",
        "--warmup-steps",
        "1",
        "--log-every",
        "1",
        "--dtype",
        "float32",
    ]  # an equality check: fp32 on every CPU (bf16 rounds at 4e-3)
    grads = {d: {"DDP_FIRST_GRADS": str(tmp_path / f"grads-{d}")} for d in ("one", "two")}
    one = _torchrun(1, str(HERE / "ddp_fixed_batches.py"), *args, "--output", str(tmp_path / "one"), env=grads["one"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, str(HERE / "ddp_fixed_batches.py"), *args, "--output", str(tmp_path / "two"), env=grads["two"])
    assert two.returncode == 0, two.stderr[-3000:]
    ga = load_file(str(tmp_path / "grads-one" / "rank-0.safetensors"))
    gb, gb1 = (load_file(str(tmp_path / "grads-two" / f"rank-{r}.safetensors")) for r in (0, 1))
    assert ga.keys() == gb.keys() == gb1.keys() and len(ga) > 10
    assert all(torch.equal(gb[k], gb1[k]) for k in gb)  # DDP gave both ranks the one averaged gradient
    worst = {k: ((gb[k] - ga[k]).abs().max() / ga[k].abs().max().clamp_min(1e-12)).item() for k in ga}
    bad = {k: v for k, v in worst.items() if v > 2e-5}
    assert not bad, f"2-rank gradients differ from 1-rank ones: {dict(sorted(bad.items())[:5])}"
    a, b = (artifacts.read_manifest(str(tmp_path / d), "train_clip") for d in ("one", "two"))
    assert b["compute"]["world_size"] == 2 and a["compute"]["world_size"] == 1
    assert a["metrics"]["steps"] == 3
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-4, abs=1e-5)
    assert a["losses"][0] != pytest.approx(a["losses"][-1], rel=1e-3)  # it trained
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=2e-4), k


def test_torchrun_two_ranks_on_the_real_stream(tiny_dataset, cache, tmp_path, capfd, monkeypatch):
    """The component's path with nproc=2 (`launch`: torchrun --standalone --nproc_per_node 2 -m
    llm2clip.train_clip --config JSON ...) on the real data path: each rank streams its own shards, rank 0 alone
    writes the outputs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "out")
    cfg = train_clip.TrainClipConfig(epochs=1, batch_size=8, workers=1)
    metrics = train_clip.launch(cfg, tiny_dataset, out, [cache], nproc=2)
    printed = capfd.readouterr().out
    manifest = artifacts.read_manifest(out, "train_clip")
    assert manifest["compute"]["world_size"] == 2 and metrics["steps"] == 6 == manifest["metrics"]["steps"]
    assert "rank 1/2" in printed and "rank 0/2" in printed
    model, _ = train_clip.load_trained(out)
    assert model.adapter is not None


def test_a_folder_that_is_not_a_prepared_dataset_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a split written by prepare_data"):
        streaming.split_sizes(str(tmp_path / "train"))


# ----------------------------------------------------------------------------------------------- lr schedule


@pytest.mark.parametrize(("warmup", "total"), [(20, 100), (20, 40), (3, 12), (0, 18)])
def test_lr_schedule_is_transformers_cosine_but_warms_up_from_the_first_step(warmup, total):
    """Step by step against transformers.get_cosine_schedule_with_warmup (stepped as a loop steps it): equal within
    1e-12 after the warm-up and without one (the pretrained recipe); during the warm-up ours is the library's next
    step, (s+1)/warmup where it has s/warmup, so step 0 trains at 1/warmup of the lr instead of 0."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, library = get_cosine_schedule_with_warmup(optimizer, warmup, total), []
    for _ in range(total):
        library.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [train_clip.lr_scale(s, warmup, total) for s in range(total)]
    for s in range(total):
        assert ours[s] == pytest.approx((s + 1) / warmup if s < warmup else library[s], abs=1e-12), s
    if warmup:
        assert library[0] == 0 and ours[0] == 1 / warmup
    assert min(ours) > 0 and ours[-1] == pytest.approx(0.5 * (1 - math.cos(math.pi / (total - warmup))))


def test_training_steps_at_the_scheduled_lr(tiny_dataset, cache, tmp_path, monkeypatch):
    """Every step of the stage runs at lr * lr_scale(step) (18 steps: 3 epochs of 48 samples in batches of 8)."""
    from llm2clip import monitoring

    seen, step = [], monitoring.StageMetrics.step

    def record(self, *args, **kw):
        seen.append(kw["lr"])
        return step(self, *args, **kw)

    monkeypatch.setattr(monitoring.StageMetrics, "step", record)
    cfg = train_clip.TrainClipConfig(
        epochs=3, batch_size=8, workers=0, checkpoint_every=0, lr=1e-3, warmup_steps=4, dtype="float32"
    )
    train_clip.train_clip(cfg, tiny_dataset, str(tmp_path / "out"), [cache])
    assert seen == pytest.approx([1e-3 * train_clip.lr_scale(s, 4, 18) for s in range(18)], rel=1e-12)
