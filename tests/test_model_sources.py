"""Models from where a cluster user has them: an s3:// copy fetched once into a content-addressed cache, a path on a
mounted volume, a hub id only where the run says the cluster has a hub. Against the moto S3 server (s3_env); the
requests the server received are read from its own request log (moto's recorder)."""

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from llm2clip import artifacts, clip_model, model_sources, storage, text_encoder, train_clip, tune_caption_encoder

CAPTIONS = ["a red circle and a blue square", "a picture of a green triangle", "an orange cross on grey"]


@pytest.fixture()
def downloads(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "downloads"
    monkeypatch.setenv(model_sources.DOWNLOAD_CACHE_ENV, str(root))
    return root


@pytest.fixture()
def llama_on_s3(s3_env, downloads) -> tuple[str, Path]:
    """The tiny random Llama (built in code) saved with save_pretrained and uploaded under an s3:// prefix."""
    local = text_encoder.tiny_llama_dir()
    uri = storage.join(s3_env, "models", "tiny-llama")
    storage.upload_dir(local, uri)
    return uri, local


@pytest.fixture()
def requests_seen(tmp_path, monkeypatch):
    """A function returning the (method, path) of every request the moto server received since the fixture began.
    The log holds each request's body too: request it after large uploads (a 22 MB body came back torn)."""
    from moto.moto_api import recorder

    log = tmp_path / "moto-requests.jsonl"
    monkeypatch.setattr(recorder, "_location", str(log))
    recorder.reset_recording()
    recorder.start_recording()

    def seen() -> list[tuple[str, str]]:
        lines = log.read_text().splitlines() if log.exists() else []
        return [(e["method"], urlparse(e["url"]).path) for e in map(json.loads, lines)]

    yield seen
    recorder.stop_recording()


def object_gets(requests: list[tuple[str, str]]) -> list[str]:
    """Paths of GETs of an object (/bucket/key), not of a bucket listing (/bucket?list-type=2...)."""
    return [path for method, path in requests if method == "GET" and "/" in path.strip("/")]


def test_an_llm_from_s3_embeds_exactly_as_its_local_copy(llama_on_s3, downloads):
    uri, local = llama_on_s3
    source = text_encoder.model_source(uri)
    assert source.kind == "object-store" and source.path.parent.parent == downloads
    assert sorted(p.name for p in source.path.iterdir()) == sorted(p.name for p in local.iterdir())
    from_s3 = text_encoder.load_caption_encoder(uri)
    from_disk = text_encoder.load_caption_encoder(str(local))
    with torch.no_grad():
        assert torch.equal(text_encoder.embed(from_s3, CAPTIONS), text_encoder.embed(from_disk, CAPTIONS))
    # the same files, the same identity: caches made from either are one cache
    assert text_encoder.model_fingerprint(uri) == text_encoder.model_fingerprint(str(local))


def test_a_second_resolve_is_a_cache_hit_with_no_get(llama_on_s3, requests_seen):
    uri, _ = llama_on_s3
    first = model_sources.resolve_llm(uri)
    assert len(object_gets(requests_seen())) == len(list(first.path.iterdir()))  # the first fetch: one GET a file
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    seen_before = len(requests_seen())
    second = model_sources.resolve_llm(uri)
    assert second == first
    assert object_gets(requests_seen()[seen_before:]) == []  # only a listing
    assert (second.path / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_changed_object_is_fetched_again(llama_on_s3, downloads, requests_seen):
    uri, local = llama_on_s3
    first = model_sources.resolve_llm(uri)
    config = json.loads((local / "config.json").read_text())
    storage.write_json(storage.join(uri, "config.json"), {**config, "rms_norm_eps": 1e-5})
    seen_before = len(requests_seen())
    second = model_sources.resolve_llm(uri)
    assert second.key != first.key and second.path != first.path
    assert json.loads((second.path / "config.json").read_text())["rms_norm_eps"] == 1e-5
    assert json.loads((first.path / "config.json").read_text()) == config  # the old entry is left as it was
    assert len(object_gets(requests_seen()[seen_before:])) == len(list(second.path.iterdir()))
    assert sorted(p.name for p in downloads.iterdir()) == sorted([first.key, second.key])  # no temporary left


def test_a_prefix_without_config_json_is_refused_before_any_download(s3_env, downloads, requests_seen):
    uri = storage.join(s3_env, "not-a-model")
    storage.write_bytes(storage.join(uri, "model.safetensors"), b"x" * 100)
    with pytest.raises(ValueError, match=r"llm='s3://.*/not-a-model': no config.json under this prefix"):
        text_encoder.load_caption_encoder(uri)
    assert object_gets(requests_seen()) == []
    with pytest.raises(ValueError, match=r"llm='s3://.*/nothing-here': no objects under this prefix"):
        text_encoder.load_caption_encoder(storage.join(s3_env, "nothing-here"))


def test_a_missing_or_wrong_local_path_names_the_parameter(tmp_path):
    with pytest.raises(ValueError, match=r"llm='/models/llama-3-8b': no such directory .*mounted volume"):
        model_sources.resolve_llm("/models/llama-3-8b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="a file, not a model directory"):
        model_sources.resolve_llm(str(tmp_path / "file"))
    with pytest.raises(ValueError, match="no config.json in it"):
        model_sources.resolve_llm(str(tmp_path))


def test_a_hub_id_without_allow_hub_is_refused_with_what_to_do():
    with pytest.raises(ValueError) as e:
        text_encoder.load_caption_encoder("meta-llama/Meta-Llama-3-8B")
    message = str(e.value)
    assert message.startswith("llm='meta-llama/Meta-Llama-3-8B': a Hugging Face hub id, and this run is offline")
    assert "allow_hub=False" in message and "s3://BUCKET/PREFIX" in message and "mounted volume" in message


def test_allow_hub_downloads_with_the_hub_online_for_that_call_only(monkeypatch, tmp_path):
    """The image sets HF_HUB_OFFLINE=1 (so does conftest); allow_hub=True must reach the hub anyway, and only during
    the download. No hub is reachable here: snapshot_download is replaced by one that records the mode it was
    called in and returns a snapshot directory holding the tiny Llama."""
    import huggingface_hub
    from huggingface_hub import constants

    assert constants.is_offline_mode()
    snapshot = tmp_path / "snapshots" / "0123abcd"
    shutil.copytree(text_encoder.tiny_llama_dir(), snapshot)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, constants.is_offline_mode(), kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    source = model_sources.resolve_llm("org/tiny", allow_hub=True)
    assert source == model_sources.ModelSource("org/tiny", "hub", snapshot, "0123abcd")
    ((repo_id, offline, kwargs),) = calls
    assert repo_id == "org/tiny" and offline is False and not kwargs.get("local_files_only")
    assert "*.safetensors" in kwargs["allow_patterns"] and "*.bin" not in kwargs["allow_patterns"]
    assert constants.is_offline_mode()  # restored
    model_sources.resolve_llm("org/tiny", allow_hub=False)  # offline: the local cache only, no download
    assert calls[1][1] is True and calls[1][2]["local_files_only"] is True


def test_the_tune_manifest_records_where_the_llm_came_from(llama_on_s3, tiny_dataset, tmp_path):
    uri, local = llama_on_s3
    out = str(tmp_path / "tuned")
    cfg = tune_caption_encoder.TuneConfig(llm=uri, steps=1, batch_size=4, lora_r=2, warmup_steps=0)
    tune_caption_encoder.tune_caption_encoder(cfg, tiny_dataset, out)
    manifest = json.loads(Path(out, "manifest.json").read_text())
    assert manifest["base_model"] == uri
    assert manifest["base_fingerprint"] == text_encoder.model_fingerprint(str(local))
    source = manifest["base_source"]
    assert (source["reference"], source["kind"]) == (uri, "object-store")
    assert source["key"] == model_sources.resolve_llm(uri).key


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    """No hub is reachable here: snapshot_download is replaced by one that serves the tiny Llama as the snapshot of
    any repo when the hub is online for the call, and finds nothing in the local cache otherwise. Yields its calls
    as (repo id, offline during the call, kwargs)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    snapshot = tmp_path / "snapshots" / "0123abcd"
    shutil.copytree(text_encoder.tiny_llama_dir(), snapshot)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, constants.is_offline_mode(), kwargs))
        if kwargs.get("local_files_only") or constants.is_offline_mode():
            raise LocalEntryNotFoundError(f"{repo_id} is not in the local cache")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_hub_llm_goes_through_tune_and_cache_only_with_allow_hub(fake_hub, tiny_dataset, tmp_path):
    """Every stage that loads the LLM carries the flag: stage 1 and the caching fan-out (its token count and its
    encoder)."""
    from llm2clip import cache_caption_embeddings

    tuned = str(tmp_path / "tuned")
    cfg = tune_caption_encoder.TuneConfig(
        llm="org/tiny", allow_hub=True, steps=1, batch_size=4, lora_r=2, warmup_steps=0
    )
    tune_caption_encoder.tune_caption_encoder(cfg, tiny_dataset, tuned)
    source = artifacts.read_manifest(tuned, "tune_caption_encoder")["base_source"]
    assert (source["reference"], source["kind"], source["key"]) == ("org/tiny", "hub", "0123abcd")

    cache = dict(device="cpu", dtype="float32", store_root=str(tmp_path / "store"))
    with pytest.raises(ValueError, match=r"llm='org/tiny': a Hugging Face hub id, and this run is offline"):
        cache_caption_embeddings.cache_caption_embeddings(
            cache_caption_embeddings.CacheConfig(**cache), tiny_dataset, tuned, str(tmp_path / "offline")
        )
    metrics = cache_caption_embeddings.cache_caption_embeddings(
        cache_caption_embeddings.CacheConfig(allow_hub=True, **cache), tiny_dataset, tuned, str(tmp_path / "online")
    )
    assert metrics["misses"] > 0
    assert all(not offline for _, offline, kwargs in fake_hub if not kwargs.get("local_files_only"))


# ----------------------------------------------------------------------------------------------- vision tower


def test_a_vision_checkpoint_from_s3_loads_into_the_tower_with_equal_weights(s3_env, downloads, tmp_path, request):
    clip = open_clip.create_model(clip_model.DEFAULT_MODEL)
    with torch.no_grad():
        for p in clip.parameters():
            p.normal_()
    ckpt = tmp_path / "tower.pt"
    torch.save(clip.state_dict(), ckpt)
    uri = storage.join(s3_env, "towers", "tower.pt")
    storage.write_bytes(uri, ckpt.read_bytes())
    requests_seen = request.getfixturevalue("requests_seen")  # from here on: the upload's body is not logged

    tower = clip_model.create_vision_tower(clip_model.DEFAULT_MODEL, uri)
    expected = {k: v for k, v in clip.visual.state_dict().items() if k != "proj"}  # the tower drops its projection
    got = tower.visual.state_dict()
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert tower.source["kind"] == "object-store" and tower.source["sha256"] == model_sources.file_sha256(ckpt)
    assert len(object_gets(requests_seen())) == 1

    seen_before = len(requests_seen())
    model = clip_model.LLM2CLIP(clip_model.DEFAULT_MODEL, uri, llm_dim=16)
    assert object_gets(requests_seen()[seen_before:]) == []  # the second use is a cache hit
    assert model.pretrained_source == tower.source


def test_a_missing_checkpoint_object_or_file_is_an_error(s3_env, downloads):
    with pytest.raises(ValueError, match=r"pretrained='s3://.*/nope.pt': no such object"):
        clip_model.create_clip(clip_model.DEFAULT_MODEL, storage.join(s3_env, "nope.pt"))
    with pytest.raises(ValueError, match=r"pretrained='/models/eva02.pt': no such checkpoint file"):
        clip_model.create_clip(clip_model.DEFAULT_MODEL, "/models/eva02.pt")


def test_an_open_clip_tag_offline_comes_from_the_local_hub_cache_or_is_refused(monkeypatch, tmp_path):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ValueError) as e:
        model_sources.resolve_checkpoint("laion2b_s34b_b79k", "ViT-B-32")
    assert str(e.value).startswith(
        "pretrained='laion2b_s34b_b79k': an open_clip pretrained tag, and this run is offline"
    )
    assert "allow_hub=True" in str(e.value)
    # the same tag already in the local cache (the hub cache layout: refs/main -> snapshots/<commit>/<file>)
    repo = cache / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee")
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    (repo / "snapshots" / "c0ffee" / "open_clip_model.safetensors").write_bytes(b"weights")
    source = model_sources.resolve_checkpoint("laion2b_s34b_b79k", "ViT-B-32")
    assert source.kind == "open_clip-tag" and source.path.read_bytes() == b"weights"
    with pytest.raises(ValueError, match=r"pretrained='laion9b': .*tag of 'ViT-B-32' \(its tags: .*laion2b_s34b_b79k"):
        model_sources.resolve_checkpoint("laion9b", "ViT-B-32")


def test_allow_hub_lets_open_clip_download_a_tag(monkeypatch, tmp_path):
    """open_clip's own download runs with the hub online (it is replaced here: no hub is reachable)."""
    from huggingface_hub import constants

    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"weights")
    modes = []
    monkeypatch.setattr(
        open_clip, "download_pretrained", lambda cfg: modes.append(constants.is_offline_mode()) or weights
    )
    source = model_sources.resolve_checkpoint("laion2b_s34b_b79k", "ViT-B-32", allow_hub=True)
    assert source == model_sources.ModelSource("laion2b_s34b_b79k", "open_clip-tag", weights)
    assert modes == [False] and constants.is_offline_mode()


def test_the_train_clip_manifest_records_the_towers_source(s3_env, downloads, tiny_dataset, tmp_path):
    """Stage 2 (the CLIP baseline: no caption cache needed) from an s3:// checkpoint: its manifest says where the
    tower came from and the sha256 of the bytes it was built from."""
    ckpt = tmp_path / "tower.safetensors"
    save_file(open_clip.create_model(clip_model.DEFAULT_MODEL).state_dict(), ckpt)
    uri = storage.join(s3_env, "towers", "tower.safetensors")
    storage.write_bytes(uri, ckpt.read_bytes())
    cfg = train_clip.TrainClipConfig(text_source="clip", pretrained=uri, epochs=1, batch_size=8, dtype="float32")
    train_clip.train_clip(cfg, tiny_dataset, str(tmp_path / "run"))
    source = artifacts.read_manifest(str(tmp_path / "run"), "train_clip")["pretrained_source"]
    assert (source["reference"], source["kind"]) == (uri, "object-store")
    assert source["sha256"] == model_sources.file_sha256(ckpt)
    assert source["key"] == model_sources.resolve_checkpoint(uri, clip_model.DEFAULT_MODEL).key
