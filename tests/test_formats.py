"""Real input layouts into the canonical shards: img2dataset tars, caption tables, Karpathy JSON, DOCCI."""

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from llm2clip import data, storage


def jpeg(seed: int, size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 40 % 255, 100, 200 - seed * 30 % 200)).save(buf, format="JPEG")
    return buf.getvalue()


def write_images(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        (root / n).write_bytes(jpeg(i))


def karpathy(root: Path) -> str:
    write_images(root / "images", [f"k{i}.jpg" for i in range(4)])
    images = [
        {
            "filename": f"k{i}.jpg",
            "imgid": i,
            "split": "test" if i < 3 else "train",
            "sentences": [{"raw": f"photo {i} caption {j}"} for j in range(5)],
        }
        for i in range(4)
    ]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    return f"flickr30k=karpathy:{root / 'dataset_flickr30k.json'}:{root / 'images'}"


def docci(root: Path) -> str:
    write_images(root / "images", [f"d{i}.jpg" for i in range(3)] + ["train.jpg"])
    rows = [
        {
            "example_id": f"test_{i}",
            "split": "test",
            "image_file": f"d{i}.jpg",
            "description": f"a long description of picture {i} " * 10,
        }
        for i in range(3)
    ]
    rows.append({"example_id": "train_0", "split": "train", "image_file": "train.jpg", "description": "x"})
    (root / "docci.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return f"docci=docci:{root / 'docci.jsonl'}:{root / 'images'}"


def test_img2dataset_dreamlip_shards(tmp_path):
    src = tmp_path / "laion"
    src.mkdir()
    with wds.TarWriter(str(src / "00000.tar")) as w:
        for i in range(5):
            meta = {"url": f"http://x/{i}", "short_caption": f"short {i}", "long_caption": f"long caption {i}"}
            w.write({"__key__": f"{i:09d}", "jpg": jpeg(i), "txt": f"alt text {i}", "json": json.dumps(meta)})
        w.write({"__key__": "bad_utf8", "jpg": jpeg(9), "txt": b"\xff\xfe", "json": json.dumps({})})
        w.write({"__key__": "no_image", "txt": "alt", "json": json.dumps({})})
        w.write({"__key__": "corrupt", "jpg": jpeg(1)[:100], "txt": "alt", "json": json.dumps({})})
    cfg = data.PrepareDataConfig(
        source=str(src),
        source_format="img2dataset",
        short_field="json.short_caption",
        long_field="json.long_caption",
        eval_sources=(karpathy(tmp_path / "f30k"), docci(tmp_path / "docci")),
    )
    out = tmp_path / "out"
    stats = data.prepare_data(cfg, str(out))
    assert stats["train_kept"] == 5 and stats["flickr30k_kept"] == 3 and stats["docci_kept"] == 3
    rec = next(data.read_split(str(out / "train")))
    assert rec["meta"]["captions"] == {"raw": ["alt text 0"], "short": ["short 0"], "long": ["long caption 0"]}
    reasons = {r["key"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert "unreadable" in reasons["bad_utf8"] or "not UTF-8" in reasons["bad_utf8"]
    assert "missing field: image" in reasons["no_image"] and "undecodable image" in reasons["corrupt"]
    assert data.benchmarks(str(out)) == {"flickr30k": "short", "docci": "long"}
    flickr = list(data.read_split(str(out / "eval" / "flickr30k")))
    assert len(flickr[0]["meta"]["captions"]["short"]) == 5


def test_caption_table_csv_with_a_missing_image(tmp_path):
    write_images(tmp_path / "imgs" / "sub", ["a.jpg", "b.jpg"])
    (tmp_path / "captions.csv").write_text(
        "image,caption,dense\nsub/a.jpg,a cat,a long dense caption of a cat\nsub/b.jpg,a dog,\nsub/zz.jpg,ghost,x\n"
    )
    cfg = data.PrepareDataConfig(
        source=str(tmp_path / "captions.csv"),
        source_format="table",
        images=str(tmp_path / "imgs"),
        long_field="dense",
        eval_sources=(karpathy(tmp_path / "f30k"),),
    )
    out = tmp_path / "out"
    stats = data.prepare_data(cfg, str(out))
    assert stats["train_kept"] == 1  # b has an empty dense caption, zz.jpg does not exist
    reasons = [json.loads(r)["reason"] for r in (out / "rejects.jsonl").read_text().splitlines()]
    assert any("empty caption" in r for r in reasons)
    assert any(r.startswith("image file not found") and "zz.jpg" in r for r in reasons)


def test_caption_table_jsonl_on_s3(tmp_path, s3_env):
    for i in range(3):
        storage.write_bytes(storage.join(s3_env, "images", f"{i}.jpg"), jpeg(i))
    rows = "\n".join(json.dumps({"image": f"{i}.jpg", "caption": f"caption {i}"}) for i in range(3))
    storage.write_bytes(storage.join(s3_env, "table.jsonl"), rows.encode())
    write_images(tmp_path / "f30k" / "images", [])
    cfg = data.PrepareDataConfig(
        source=storage.join(s3_env, "table.jsonl"),
        source_format="table",
        images=storage.join(s3_env, "images"),
        eval_sources=(karpathy(tmp_path / "f30k"),),
    )
    stats = data.prepare_data(cfg, storage.join(s3_env, "prepared"))
    assert stats["train_kept"] == 3
    assert storage.exists(storage.join(s3_env, "prepared", "train", "shard-000000.tar"))


def test_bad_source_options_are_named():
    with pytest.raises(ValueError, match="source_format='parquet-ish'"):
        data.PrepareDataConfig(source_format="parquet-ish")
    with pytest.raises(ValueError, match="eval_sources='coco'"):
        data.PrepareDataConfig(eval_sources=("coco",))
    with pytest.raises(ValueError, match="images=''"):
        data.PrepareDataConfig(source="s3://b/t.csv", source_format="table")


def test_urban1k_and_sharegpt4v_eval_sets(tmp_path):
    urban = tmp_path / "Urban1k"
    write_images(urban / "image", ["1.jpg", "2.jpg"])
    (urban / "caption").mkdir()
    (urban / "caption" / "1.txt").write_text("A busy street with a red bus on the left and a cyclist. " * 5)
    (urban / "caption" / "2.txt").write_text("A quiet square at dusk. " * 5)
    (urban / "caption" / "3.txt").write_text("an image that does not exist")
    write_images(tmp_path / "sg" / "coco", ["a.jpg"])
    conv = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A detailed caption."}]
    (tmp_path / "sg" / "share.json").write_text(json.dumps([{"id": "a", "image": "coco/a.jpg", "conversations": conv}]))
    src = tmp_path / "canonical"
    data.prepare_data(data.PrepareDataConfig(num_train=8, num_eval=4), str(src))
    cfg = data.PrepareDataConfig(
        source=str(src),
        eval_sources=(
            f"urban1k=urban1k:{urban}",
            f"sharegpt4v=sharegpt4v:{tmp_path / 'sg' / 'share.json'}:{tmp_path / 'sg'}",
        ),
    )
    out = tmp_path / "out"
    stats = data.prepare_data(cfg, str(out))
    assert stats["urban1k_kept"] == 2 and stats["sharegpt4v_kept"] == 1 and stats["synthetic_long_kept"] == 4
    reasons = [json.loads(r)["reason"] for r in (out / "rejects.jsonl").read_text().splitlines()]
    assert any("image file not found" in r and "3.jpg" in r for r in reasons)
    assert data.benchmarks(str(out))["urban1k"] == "long"
