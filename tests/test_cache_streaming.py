"""The streaming cache stage: token-balanced shard groups, one shard in memory at a time, resume at the first shard
without output, atomic shard files, and the per-shard readers stage 2 uses."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cache_helpers import run

from llm2clip import artifacts, cache_caption_embeddings, data, storage, text_encoder
from llm2clip.cache_caption_embeddings import shard_groups

# ----------------------------------------------------------------------------------------------- shard groups


def test_token_balanced_groups_beat_round_robin_on_skewed_shards():
    # a few shards of long captions among many of short ones, in an order round-robin handles badly
    costs = [(f"shard-{i:06d}.tar", 9000 if i % 4 == 0 else 1000) for i in range(16)]
    balanced = shard_groups(costs, 4)
    round_robin = [[s for s, _ in costs[g::4]] for g in range(4)]
    cost = dict(costs)

    def spread(groups):
        totals = [sum(cost[s] for s in g) for g in groups]
        return max(totals) - min(totals)

    assert spread(round_robin) == 32000
    assert spread(balanced) == 0  # 4 x (9000 + 3 x 1000)


def test_every_shard_is_in_exactly_one_group_and_every_task_agrees():
    rng = random.Random(0)
    for n_shards, num_groups in ((1, 1), (7, 3), (50, 8), (3, 5)):
        costs = [((f"split{i % 2}", f"shard-{i:06d}.tar"), rng.choice([0, 1, 10, 1000])) for i in range(n_shards)]
        groups = shard_groups(costs, num_groups)
        assert len(groups) == num_groups
        assert sorted(s for g in groups for s in g) == sorted(s for s, _ in costs)
        assert groups == shard_groups(list(costs), num_groups)  # deterministic: another task gets the same
        order = [s for s, _ in costs]
        assert all(g == sorted(g, key=order.index) for g in groups)  # a group keeps the dataset order
        # greedy longest-first: no group exceeds the mean by more than the largest single shard
        totals = [sum(c for s, c in costs if s in g) for g in groups]
        assert max(totals) <= sum(totals) / num_groups + max(c for _, c in costs)


# ----------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def reference(tiny_dataset, lora, tmp_path_factory):
    """One uninterrupted run over every shard with one embedding call per shard (pack_size above any shard)."""
    root = tmp_path_factory.mktemp("reference")
    metrics = run(tiny_dataset, lora, root / "out", root / "store", pack_size=1000)
    return {"out": str(root / "out"), "metrics": metrics}


def shard_files(out: str) -> dict[str, dict[str, torch.Tensor]]:
    """{split path/shard file: {key: [n, D]}} of one stage output, read back file by file."""
    found = storage.list_files(out, ".safetensors", recursive=True)
    return {f[len(out) + 1 :]: cache_caption_embeddings.load(storage.read_bytes(f)) for f in found}


def assert_same_outputs(out: str, expected: str) -> None:
    got, want = shard_files(out), shard_files(expected)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys()
        assert all(torch.equal(got[name][k], want[name][k]) for k in want[name]), name
    assert artifacts.read_manifest(out)["shards"] == artifacts.read_manifest(expected)["shards"]


def test_groups_split_the_dataset_by_tokens(tiny_dataset, lora, tmp_path):
    outs = [tmp_path / f"g{i}" for i in range(2)]
    for i, out in enumerate(outs):
        run(tiny_dataset, lora, out, tmp_path / "store", group_index=i, num_groups=2)
    manifests = [artifacts.read_manifest(str(o)) for o in outs]
    identity = cache_caption_embeddings.encoder_identity(lora, use_adapter=True)
    costs = {f"{p}/{s}": c for (p, s), c in cache_caption_embeddings.shard_token_costs(tiny_dataset, identity)}
    assert sorted(s for m in manifests for s in m["shards"]) == sorted(costs)  # each shard in one group
    for m in manifests:
        assert m["tokens"] == sum(costs[s] for s in m["shards"]) == sum(x["tokens"] for x in m["shards"].values())
    assert abs(manifests[0]["tokens"] - manifests[1]["tokens"]) <= max(costs.values())


def test_killed_task_resumes_at_the_first_shard_without_output(tiny_dataset, lora, reference, tmp_path, monkeypatch):
    real_encode = text_encoder.encode_all
    calls: list[int] = []

    def encode_then_die(encoder, captions, *args):
        calls.append(len(captions))
        if len(calls) == 3:
            raise KeyboardInterrupt("pod killed")
        return real_encode(encoder, captions, *args)

    monkeypatch.setattr(text_encoder, "encode_all", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dataset, lora, tmp_path / "x", tmp_path / "store", pack_size=1000)
    assert len(shard_files(str(tmp_path / "x"))) == 2 and not (tmp_path / "x" / "manifest.json").exists()
    stored = sum(len(storage.read_json(str(f))["keys"]) for f in (tmp_path / "store").rglob("*.keys.json"))

    calls.clear()
    monkeypatch.setattr(text_encoder, "encode_all", lambda *a: calls.append(len(a[1])) or real_encode(*a))
    resumed = run(tiny_dataset, lora, tmp_path / "x", tmp_path / "store", pack_size=1000)
    assert resumed["skipped_shards"] == 2 and len(calls) == resumed["shards"] - 2  # one call per shard left
    assert resumed["misses"] == reference["metrics"]["misses"] - stored == sum(calls)
    assert resumed["captions"] == reference["metrics"]["captions"]
    # streaming: an embedding call never holds more than one shard's captions
    per_shard = artifacts.read_manifest(str(tmp_path / "x"))["shards"]
    assert max(calls) <= max(s["captions"] for s in per_shard.values())
    assert_same_outputs(str(tmp_path / "x"), reference["out"])


def test_a_lost_shard_file_is_rebuilt_from_the_store_without_the_llm(
    tiny_dataset, lora, reference, tmp_path, monkeypatch
):
    run(tiny_dataset, lora, tmp_path / "x", tmp_path / "store", pack_size=1000)
    lost = tmp_path / "x" / "train" / "shard-000001.safetensors"
    n_captions = sum(len(v) for v in cache_caption_embeddings.load(lost.read_bytes()).values())
    lost.unlink()

    def no_llm(*_):
        raise AssertionError("the LLM was loaded although every caption is in the store")

    monkeypatch.setattr(cache_caption_embeddings, "base_encoder", no_llm)
    again = run(tiny_dataset, lora, tmp_path / "x", tmp_path / "store", pack_size=1000)
    assert again["misses"] == 0 and 0 < again["hits"] <= n_captions
    assert again["skipped_shards"] == again["shards"] - 1
    assert_same_outputs(str(tmp_path / "x"), reference["out"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shard_file_torn_mid_write_never_looks_complete(tiny_dataset, lora, tmp_path, monkeypatch, where, request):
    base = storage.join(request.getfixturevalue("s3_env"), "run") if where == "s3" else str(tmp_path)
    out, root = storage.join(base, "x"), storage.join(base, "store")
    real_write = storage.write_bytes

    def torn_write(uri, payload):
        if uri.endswith("shard-000001.safetensors"):
            with storage.open_write(uri) as f:
                f.write(payload[: len(payload) // 2])
                raise KeyboardInterrupt("pod killed mid-write")
        real_write(uri, payload)

    monkeypatch.setattr(storage, "write_bytes", torn_write)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dataset, lora, out, root)
    monkeypatch.setattr(storage, "write_bytes", real_write)
    torn = storage.join(out, "train", "shard-000001.safetensors")
    assert not storage.exists(torn)
    assert [f for f in storage.list_files(out, recursive=True) if "shard-000001" in f] == []
    resumed = run(tiny_dataset, lora, out, root)
    # the shards before the torn one are skipped (every eval set's and train's first); it and the last are done now
    before = [name for split, name in cache_caption_embeddings.all_shards(tiny_dataset)].index("shard-000001.tar")
    assert before == len(data.BENCHMARKS) + 1
    assert resumed["skipped_shards"] == before
    samples = data.read_captions_of_shard(storage.join(tiny_dataset, "train", "shard-000001.tar"))
    assert cache_caption_embeddings.load(storage.read_bytes(torn)).keys() == {key for _, key, _ in samples}


# the stage as a process of its own: fp32 on the CPU, 4 new embeddings per pack (several packs per shard)
CACHE_PROCESS = (
    "import sys; from llm2clip.cache_caption_embeddings import CacheConfig, cache_caption_embeddings; "
    "store, dataset, lora, out = sys.argv[1:]; "
    "cache_caption_embeddings(CacheConfig(store_root=store, pack_size=4, device='cpu', dtype='float32'), dataset, "
    "lora, out)"
)


def cache_process(dataset: str, lora: str, out: Path, store: Path) -> list[str]:
    return [sys.executable, "-c", CACHE_PROCESS, str(store), dataset, lora, str(out)]


def assert_store_consistent(store: Path) -> set[str]:
    """Every pack the store shows (one with a keys file) is whole: it loads and holds exactly its keys. Returns
    the caption hashes the store holds."""
    held = set()
    for keys_file in store.rglob("*.keys.json"):
        keys = storage.read_json(str(keys_file))["keys"]
        pack = keys_file.with_name(keys_file.name.removesuffix(".keys.json") + ".safetensors")
        assert sorted(cache_caption_embeddings.load(pack.read_bytes())) == keys, pack
        held.update(keys)
    return held


def test_sigkill_midway_then_rerun_matches_an_uninterrupted_run(lora, tmp_path):
    """A real caching process over 22 shards is killed with SIGKILL (no exception, no cleanup, unlike the tests
    above), twice: the moment its fifth shard file appears (were writes not atomic, that file would be half
    written), then, rerun, in the middle of a shard (after the tenth file, once a pack of the next shard is
    stored). After each kill every visible shard file and every visible pack is whole. A last run of the same
    command finishes the job, embedding only what the killed runs had not stored, and its output equals an
    uninterrupted run's: the same shard files with the same vectors (fp32 both times, so bit for bit), the same
    manifest shards, the same store contents."""
    from llm2clip.prepare_data import PrepareDataConfig, prepare_data

    dataset = str(tmp_path / "data")
    prepare_data(PrepareDataConfig(num_train=64, num_eval=8, shard_size=4), dataset)
    n_shards = len(cache_caption_embeddings.all_shards(dataset))
    assert n_shards == 16 + 2 * len(data.BENCHMARKS)  # 16 train + 2 per eval set
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # every run alike
    whole = subprocess.run(
        cache_process(dataset, lora, tmp_path / "whole", tmp_path / "whole-store"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = shard_files(str(tmp_path / "whole"))
    out, store = tmp_path / "killed", tmp_path / "store"

    def shards_out() -> int:
        return len(list(out.rglob("shard-*.safetensors")))

    def packs_stored() -> int:
        return len(list(store.rglob("*.keys.json")))

    def run_and_kill(wait) -> tuple[int, set[str]]:
        """Start the command, `wait(wait_for)`, SIGKILL it; check what it left; (shard files out, hashes stored)."""
        proc = subprocess.Popen(
            cache_process(dataset, lora, out, store), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 600

        def wait_for(what: str, condition) -> None:
            while not condition():
                assert proc.poll() is None and time.time() < deadline, f"caching ended or stalled before {what}"
                time.sleep(0.005)

        wait(wait_for)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "manifest.json").exists()
        done = shard_files(str(out))
        assert len(done) < n_shards, f"{len(done)} of {n_shards} shards out: the kill was not midway"
        for name, tensors in done.items():  # what is visible is whole
            assert tensors.keys() == reference[name].keys() and all(
                torch.equal(tensors[k], reference[name][k]) for k in tensors
            ), name
        return len(done), assert_store_consistent(store)

    def into_the_next_shard(wait_for) -> None:
        wait_for("its tenth shard", lambda: shards_out() >= 10)
        packs = packs_stored()
        wait_for("another pack", lambda: packs_stored() > packs)

    first, _ = run_and_kill(lambda wait_for: wait_for("its fifth shard", lambda: shards_out() >= 5))
    done, held = run_and_kill(into_the_next_shard)
    assert 5 <= first < done and done >= 10

    rerun = subprocess.run(cache_process(dataset, lora, out, store), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    metrics = artifacts.read_manifest(str(out))["metrics"]
    everything = assert_store_consistent(tmp_path / "whole-store")
    assert metrics["skipped_shards"] == done
    assert metrics["misses"] == len(everything - held) > 0  # what the killed runs stored is not embedded again
    assert_same_outputs(str(out), str(tmp_path / "whole"))
    assert assert_store_consistent(store) == everything


def test_outputs_of_another_encoder_are_never_resumed(tiny_dataset, lora, tmp_path):
    run(tiny_dataset, lora, tmp_path / "x", tmp_path / "store")
    with pytest.raises(ValueError, match="another encoder"):
        run(tiny_dataset, lora, tmp_path / "x", tmp_path / "store", use_adapter=False)


# ----------------------------------------------------------------------------------------------- readers


def test_shard_readers_agree_with_the_whole_split(tiny_dataset, lora, tmp_path):
    caches = [str(tmp_path / f"g{i}") for i in range(2)]
    for i, out in enumerate(caches):
        run(tiny_dataset, lora, out, tmp_path / "store", group_index=i, num_groups=2)
    for split in ("train", "synthetic_long"):
        whole, _ = cache_caption_embeddings.load_embeddings(caches, split)
        by_shard = {}
        for split_path, shard in cache_caption_embeddings.all_shards(tiny_dataset):
            if split_path == data.split_path(split):
                one = cache_caption_embeddings.shard_embeddings(caches, split_path, shard)
                stem = cache_caption_embeddings.shard_embeddings(caches, split_path, shard.removesuffix(".tar"))
                assert one.keys() == stem.keys() and not one.keys() & by_shard.keys()
                by_shard.update(one)
        assert by_shard.keys() == whole.keys() and all(torch.equal(by_shard[k], whole[k]) for k in whole)

        mean, count = cache_caption_embeddings.embedding_mean(caches, split)
        rows = torch.cat([whole[k] for k in whole]).float()  # brute force: every caption row in memory
        assert count == len(rows) and mean.dtype == torch.float32 and mean.shape == (rows.shape[1],)
        torch.testing.assert_close(mean, rows.mean(0), atol=1e-6, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="train/shard-000099"):
        cache_caption_embeddings.shard_embeddings(caches, "train", "shard-000099.tar")


def test_metrics_report_peak_memory(reference):
    m = reference["metrics"]
    assert {
        "captions",
        "hits",
        "misses",
        "shards",
        "padded_tokens",
        "embed_seconds",
        "embedded_per_s",
        "seconds",
    } <= set(m)
    assert m["peak_rss_mb"] > 0
