"""The content-addressed embedding cache: reruns embed nothing, new data only what is new, a new adapter all,
a killed task resumes, and the store works the same on S3.

Hits are counted per shard (the distinct captions of each shard the store already held), so a caption repeated
in a later shard of the same run is a hit there: hits + misses is the same for every run over the same shards."""

import pytest
import torch
from cache_helpers import run

from llm2clip import artifacts, cache_caption_embeddings, storage


def test_rerun_embeds_nothing_and_gives_the_same_vectors(tiny_dataset, lora, tmp_path):
    first = run(tiny_dataset, lora, tmp_path / "a", tmp_path / "store")
    second = run(tiny_dataset, lora, tmp_path / "b", tmp_path / "store")
    assert first["misses"] > 0
    assert second == {**second, "hits": first["hits"] + first["misses"], "misses": 0}
    a, _ = cache_caption_embeddings.load_embeddings([str(tmp_path / "a")], "train")
    b, _ = cache_caption_embeddings.load_embeddings([str(tmp_path / "b")], "train")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_new_data_embeds_only_the_new_captions(tiny_dataset, lora, tmp_path):
    part = run(tiny_dataset, lora, tmp_path / "g0", tmp_path / "store", group_index=0, num_groups=2)
    whole = run(tiny_dataset, lora, tmp_path / "all", tmp_path / "store")
    fresh = run(tiny_dataset, lora, tmp_path / "ref", tmp_path / "other-store")
    assert whole["hits"] + whole["misses"] == fresh["hits"] + fresh["misses"]
    assert whole["misses"] == fresh["misses"] - part["misses"] > 0


def test_another_adapter_embeds_everything_again(tiny_dataset, lora, tmp_path):
    tuned = run(tiny_dataset, lora, tmp_path / "t", tmp_path / "store")
    raw = run(tiny_dataset, lora, tmp_path / "r", tmp_path / "store", use_adapter=False)
    assert raw["hits"] == tuned["hits"] and raw["misses"] == tuned["misses"]
    keys = {p.parent.parent.name for p in (tmp_path / "store").rglob("*.keys.json")}
    assert len(keys) == 2  # two encoder fingerprints, two address spaces


def test_killed_task_resumes_from_its_last_pack(tiny_dataset, lora, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_add = cache_caption_embeddings.EmbeddingStore.add

    def add_then_die(self, vectors):
        real_add(self, vectors)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("pod killed")

    monkeypatch.setattr(cache_caption_embeddings.EmbeddingStore, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dataset, lora, tmp_path / "x", tmp_path / "store", pack_size=16)
    stored = sum(len(storage.read_json(f)["keys"]) for f in (tmp_path / "store").rglob("*.keys.json"))
    monkeypatch.setattr(cache_caption_embeddings.EmbeddingStore, "add", real_add)
    resumed = run(tiny_dataset, lora, tmp_path / "x", tmp_path / "store", pack_size=16)
    reference = run(tiny_dataset, lora, tmp_path / "ref", tmp_path / "fresh-store", pack_size=16)
    assert stored > 0 and resumed["misses"] == reference["misses"] - stored  # the finished packs are not redone
    assert artifacts.read_manifest(str(tmp_path / "x"))["count"] == resumed["captions"] == reference["captions"]


def test_a_pack_without_its_keys_file_is_invisible(tiny_dataset, lora, tmp_path):
    run(tiny_dataset, lora, tmp_path / "a", tmp_path / "store", pack_size=1000)
    keys_file = sorted((tmp_path / "store").rglob("*.keys.json"))[0]
    lost = len(storage.read_json(str(keys_file))["keys"])
    keys_file.unlink()  # as if the writer died between the pack and its keys file
    again = run(tiny_dataset, lora, tmp_path / "b", tmp_path / "store", pack_size=1000)
    assert again["misses"] == lost > 0


def test_store_on_s3(tiny_dataset, lora, tmp_path, s3_env):
    root = storage.join(s3_env, "embedding-cache")
    first = run(tiny_dataset, lora, storage.join(s3_env, "out1"), root)
    second = run(tiny_dataset, lora, storage.join(s3_env, "out2"), root)
    assert first["misses"] > 0 and second["misses"] == 0 and second["hits"] == first["hits"] + first["misses"]
    emb, info = cache_caption_embeddings.load_embeddings([storage.join(s3_env, "out2")], "synthetic_long")
    assert len(emb) == 12 and info["dim"] == 64


def test_parallel_tasks_share_one_store_without_conflict(tiny_dataset, lora, tmp_path):
    import threading

    results = {}

    def task(i):
        results[i] = run(
            tiny_dataset, lora, tmp_path / f"g{i}", tmp_path / "store", group_index=i, num_groups=2, pack_size=8
        )

    threads = [threading.Thread(target=task, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = run(tiny_dataset, lora, tmp_path / "all", tmp_path / "store")
    reference = run(tiny_dataset, lora, tmp_path / "ref", tmp_path / "fresh-store")
    assert after["misses"] == 0 and after["hits"] == reference["hits"] + reference["misses"]
    assert results[0]["misses"] > 0 and results[1]["misses"] > 0
