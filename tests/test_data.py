"""Synthetic data and prepare_data: determinism, long-caption property, every bad record rejected with a reason."""

import io
import json
from pathlib import Path

import open_clip
import pytest
import webdataset as wds
from PIL import Image

from llm2clip import data, synthetic


def test_synthetic_is_deterministic_by_seed():
    a = [r["json"] for r in synthetic.generate("train", 6, 2, 2, 32, seed=1)]
    b = [r["json"] for r in synthetic.generate("train", 6, 2, 2, 32, seed=1)]
    c = [r["json"] for r in synthetic.generate("train", 6, 2, 2, 32, seed=2)]
    assert a == b and a != c


def test_hard_negatives_share_objects_and_differ_only_in_long_caption_details():
    recs = list(synthetic.generate("long", 8, 4, 1, 32, seed=0))
    group = [r for r in recs if r["json"]["group"] == 0]
    assert len(group) == 4
    longs = [r["json"]["captions"]["long"][0] for r in group]
    assert len(set(longs)) == 4
    assert len({r["png"] for r in group}) == 4
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    # the last object's details sit entirely past CLIP's 77-token window (start and end tokens included)
    for lc in longs:
        before_last_sentence = lc[: lc.rstrip(".").rfind(". ") + 1]
        assert len(tokenizer.encode(before_last_sentence)) + 1 >= 76
        assert int((tokenizer([lc])[0] != 0).sum()) == 77  # truncated


def _sample(key, captions, image=None, ext="png"):
    if image is None:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, format="PNG")
        image = buf.getvalue()
    return {"__key__": key, ext: image, "json": json.dumps({"captions": captions}).encode()}


def _write_source(root: Path, train: list[dict]):
    good = [_sample(f"s{i}", {"short": ["a b", "c d"], "long": ["e f"]}) for i in range(3)]
    for split, records in (("train", train), ("eval/synthetic_short", good), ("eval/synthetic_long", good)):
        (root / split).mkdir(parents=True)
        with wds.TarWriter(str(root / split / "shard-000000.tar")) as w:
            for r in records:
                w.write(r)


def test_prepare_data_rejects_bad_records_and_keeps_good_ones(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    truncated = png.getvalue()[:60]
    cmyk = io.BytesIO()
    Image.new("CMYK", (32, 32)).save(cmyk, format="JPEG")
    train = [
        _sample("good1", {"short": ["a red circle", "a circle, red"]}),
        _sample("corrupt", {"short": ["x"]}, image=truncated),
        _sample("empty", {"short": ["  "]}),
        {"__key__": "noimage", "json": json.dumps({"captions": {"short": ["x"]}}).encode()},
        _sample("good1", {"short": ["duplicate key"]}),
        _sample("tiny", {"short": ["x"]}, image=_png(2, 2)),
        _sample("cmyk", {"short": ["x"]}, image=cmyk.getvalue(), ext="jpg"),
        {"__key__": "badjson", "png": _png(32, 32), "json": b"\xff\xfe{"},
        _sample("good2", {"long": ["a long caption"]}),
    ]
    _write_source(tmp_path / "src", train)
    out = tmp_path / "out"
    stats = data.prepare_data(data.PrepareDataConfig(source=str(tmp_path / "src")), str(out))
    assert stats["train_kept"] == 2
    kept = [r["key"] for r in data.read_split(str(out / "train"))]
    assert kept == ["good1", "good2"]
    rejects = {r["key"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert "undecodable image" in rejects["corrupt"]
    assert "empty caption" in rejects["empty"]
    assert "missing field: image" in rejects["noimage"]
    assert "absurd image size 2x2" in rejects["tiny"]
    assert "unsupported image mode CMYK" in rejects["cmyk"]
    assert "not valid UTF-8 JSON" in rejects["badjson"]
    assert any(
        r["reason"].startswith("duplicate key")
        for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())
    )
    assert json.loads((out / "train" / "sizes.json").read_text()) == {"shard-000000.tar": 2}


def _png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_source_with_nothing_usable_fails_clearly(tmp_path):
    _write_source(tmp_path / "src", [_sample("e", {"short": [""]})])
    with pytest.raises(ValueError, match="split 'train'.*no usable record"):
        data.prepare_data(data.PrepareDataConfig(source=str(tmp_path / "src")), str(tmp_path / "out"))


def test_eval_set_needs_enough_captions(tmp_path):
    """synthetic_short needs two short captions per image (CRA); a record with one is rejected, named."""
    rec = _sample("one", {"short": ["only one"]})
    verdict = data.validate(rec, data.PrepareDataConfig(), set(), data.BENCHMARKS["synthetic_short"])
    assert verdict == "json.captions.short: this benchmark needs at least 2"


def test_config_names_bad_field():
    with pytest.raises(ValueError, match=r"num_train=1"):
        data.PrepareDataConfig(num_train=1)
    with pytest.raises(ValueError, match=r"source='/no/such/dir'"):
        data.PrepareDataConfig(source="/no/such/dir")


def test_prepared_layout(tiny_dataset):
    root = Path(tiny_dataset)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["stage"] == "prepare_data"
    assert set(manifest["splits"]) == {"train", "synthetic_short", "synthetic_long"}
    sizes = json.loads((root / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 48 and len(sizes) == 3  # shard_size 20
    rec = next(data.read_split(str(root / "eval" / "synthetic_short")))
    assert len(rec["meta"]["captions"]["short"]) == 2 and rec["image"].mode == "RGB"
