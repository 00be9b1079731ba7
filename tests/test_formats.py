"""Real input layouts into the canonical shards: img2dataset tars, caption tables, Karpathy JSON, DOCCI."""

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from llm2clip import data, prepare_data, storage


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


def _reasons(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def img2dataset_shard(src: Path, n: int = 5, failed: int = 0) -> None:
    """An img2dataset output folder: 00000.tar (DreamLIP-style caption keys in the json) and, with `failed`,
    00000.parquet listing that many failed downloads beside the successes, as img2dataset writes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(src / "00000.tar")) as w:
        for i in range(n):
            meta = {"url": f"http://x/{i}", "short_caption": f"short {i}", "long_caption": f"long caption {i}"}
            w.write({"__key__": f"{i:09d}", "jpg": jpeg(i), "txt": f"alt text {i}", "json": json.dumps(meta)})
    if failed:
        keys = [f"{i:09d}" for i in range(n + failed)]
        status = ["success"] * n + ["failed_to_download"] * failed
        errors = [None] * n + ["HTTP Error 404: Not Found"] * failed
        pq.write_table(pa.table({"key": keys, "status": status, "error_message": errors}), src / "00000.parquet")


def test_img2dataset_dreamlip_shards(tmp_path):
    src = tmp_path / "laion"
    img2dataset_shard(src, failed=2)
    with wds.TarWriter(str(src / "00001.tar")) as w:
        w.write({"__key__": "bad_utf8", "jpg": jpeg(9), "txt": b"caf\xe9", "json": json.dumps({})})
        w.write({"__key__": "no_image", "txt": "alt", "json": json.dumps({})})
        w.write({"__key__": "corrupt", "jpg": jpeg(1)[:100], "txt": "alt", "json": json.dumps({})})
        w.write({"__key__": "html", "jpg": b"<!DOCTYPE html><html>", "txt": "alt", "json": json.dumps({})})
        w.write({"__key__": "zero", "jpg": b"", "txt": "alt", "json": json.dumps({})})
    cfg = prepare_data.PrepareDataConfig(
        source=str(src),
        source_format="img2dataset",
        short_field="json.short_caption",
        long_field="json.long_caption",
        eval_sources=(karpathy(tmp_path / "f30k"), docci(tmp_path / "docci")),
    )
    out = tmp_path / "out"
    stats = prepare_data.prepare_data(cfg, str(out))
    assert stats["train_kept"] == 5 and stats["flickr30k_kept"] == 3 and stats["docci_kept"] == 3
    rec = next(data.read_split(str(out / "train")))
    assert rec["meta"]["captions"] == {"raw": ["alt text 0"], "short": ["short 0"], "long": ["long caption 0"]}
    reasons = _reasons(out)
    assert reasons["bad_utf8"]["message"] == "caption raw[0] of 'bad_utf8' (field 'txt'): invalid byte 0xe9 at byte 3"
    assert reasons["no_image"]["message"] == "missing field: image (one of ('png', 'jpg', 'jpeg', 'webp'))"
    assert reasons["corrupt"]["reason"] == "corrupt image"
    assert reasons["html"]["message"] == "jpg: not an image (starts with '<!DOCTYPE ht')"
    assert reasons["zero"]["message"] == "jpg: empty file"
    assert reasons["000000005"]["reason"] == "failed download"
    assert reasons["000000006"]["message"] == "00000.parquet: failed_to_download (HTTP Error 404: Not Found)"
    assert json.loads((out / "stats.json").read_text())["train"]["reject_reasons"]["failed download"] == 2
    assert data.benchmarks(str(out)) == {"flickr30k": "short", "docci": "long"}
    flickr = list(data.read_split(str(out / "eval" / "flickr30k")))
    assert len(flickr[0]["meta"]["captions"]["short"]) == 5


def test_tar_members_that_climb_out_are_refused(tmp_path):
    import tarfile

    src = tmp_path / "evil"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tf:
        for name, payload in (
            ("../../x.jpg", jpeg(1)),
            ("../../x.txt", b"climbs"),
            ("/abs/y.jpg", jpeg(2)),
            ("/abs/y.txt", b"absolute"),
            ("./ok//z.jpg", jpeg(3)),
            ("./ok//z.txt", b"fine"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    cfg = prepare_data.PrepareDataConfig(
        source=str(src), source_format="img2dataset", eval_sources=(docci(tmp_path / "d"),)
    )
    out = tmp_path / "out"
    assert prepare_data.prepare_data(cfg, str(out))["train_kept"] == 1
    reasons = _reasons(out)
    assert reasons["../../x"]["message"] == "key '../../x' climbs out of its directory with '..'"
    assert reasons["/abs/y"]["message"] == "key '/abs/y' is an absolute path"
    with tarfile.open(out / "train" / "shard-000000.tar") as tf:
        assert sorted(tf.getnames()) == ["ok/z.jpg", "ok/z.json"]


def test_caption_table_csv_with_a_missing_image(tmp_path):
    write_images(tmp_path / "imgs" / "sub", ["a.jpg", "b.jpg"])
    (tmp_path / "captions.csv").write_text(
        "image,caption,dense\nsub/a.jpg,a cat,a long dense caption of a cat\nsub/b.jpg,a dog,\nsub/zz.jpg,ghost,x\n"
    )
    cfg = prepare_data.PrepareDataConfig(
        source=str(tmp_path / "captions.csv"),
        source_format="table",
        images=str(tmp_path / "imgs"),
        long_field="dense",
        eval_sources=(karpathy(tmp_path / "f30k"),),
    )
    out = tmp_path / "out"
    stats = prepare_data.prepare_data(cfg, str(out))
    assert stats["train_kept"] == 1  # b has an empty dense caption, zz.jpg does not exist
    reasons = _reasons(out)
    assert reasons["row00000002"]["message"] == (
        "caption long[0] of 'row00000002' (field 'dense (row 2 of captions.csv)'): empty after stripping whitespace"
    )
    assert reasons["row00000003"]["message"] == f"image file not found: {tmp_path / 'imgs' / 'sub' / 'zz.jpg'}"


TABLE_ROWS = [  # (id, file, short caption, long caption)
    ("a", "a.jpg", "a cat", "a long caption of a cat"),
    ("b", "b.jpg", "a dog", "a long caption of a dog"),
    ("a", "c.jpg", "first key wins", "the second 'a' is a duplicate"),
    ("d", "../outside.jpg", "escapes", "an image path that leaves the images root"),
    ("e", "e.jpg", "   ", "blank short caption"),
    ("f", "f.jpg", "ok", "fine"),
]


def _write_table(path: Path, fmt: str) -> None:
    """The rows above in a common layout: columns id, filepath, title, description (no column named image)."""
    cols = ["id", "filepath", "title", "description"]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [r[i] for r in TABLE_ROWS] for i, c in enumerate(cols)}), path)
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(dict(zip(cols, r, strict=True))) for r in TABLE_ROWS) + "\n")
    else:
        sep = "," if fmt == "csv" else "\t"
        path.write_text("\n".join(sep.join(r) for r in [cols, *TABLE_ROWS]) + "\n")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_caption_tables_in_every_format(tmp_path, fmt):
    write_images(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg", "e.jpg", "f.jpg"])
    write_images(tmp_path, ["outside.jpg"])
    _write_table(tmp_path / f"captions.{fmt}", fmt)
    cfg = prepare_data.PrepareDataConfig(
        source=str(tmp_path / f"captions.{fmt}"),
        source_format="table",
        images=str(tmp_path / "imgs"),
        image_column="filepath",
        key_column="id",
        raw_field="title",
        long_field="description",
        eval_sources=(karpathy(tmp_path / "f30k"),),
    )
    out = tmp_path / "out"
    assert prepare_data.prepare_data(cfg, str(out))["train_kept"] == 3
    kept = {r["key"]: r["meta"]["captions"] for r in data.read_split(str(out / "train"))}
    assert kept == {
        "a": {"raw": ["a cat"], "long": ["a long caption of a cat"]},
        "b": {"raw": ["a dog"], "long": ["a long caption of a dog"]},
        "f": {"raw": ["ok"], "long": ["fine"]},
    }
    rejects = [json.loads(r) for r in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in rejects] == [
        ("a", "duplicate key"),
        ("d", "unsafe image path"),
        ("e", "blank caption"),
    ]
    assert rejects[1]["message"] == f"image path '../outside.jpg' is absolute, a URL or leaves {tmp_path / 'imgs'}"
    assert rejects[2]["message"] == (
        f"caption raw[0] of 'e' (field 'title (row 5 of captions.{fmt})'): empty after stripping whitespace"
    )


def test_a_bad_row_is_one_reject_not_a_dead_file(tmp_path):
    write_images(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "t.csv").write_bytes(b"image,caption\na.jpg,caf\xe9 au lait\nb.jpg,fine\nc.jpg,one,too many\n")
    (tmp_path / "t.jsonl").write_bytes(
        b'{"image": "a.jpg", "caption": "caf\xe9"}\n{"image": "b.jpg", "caption": '
        b'"fine"}\n{"image": "c.jpg", "caption": \n'
    )
    for name, bad in (
        ("t.csv", "row 3 of t.csv: 3 values for 2 columns"),
        ("t.jsonl", "row 3 of t.jsonl: not valid JSON"),
    ):
        cfg = prepare_data.PrepareDataConfig(
            source=str(tmp_path / name),
            source_format="table",
            images=str(tmp_path / "imgs"),
            eval_sources=(karpathy(tmp_path / "f30k"),),
        )
        out = tmp_path / f"out-{name}"
        assert prepare_data.prepare_data(cfg, str(out))["train_kept"] == 1
        reasons = _reasons(out)
        assert reasons["row00000001"]["message"] == (
            f"caption raw[0] of 'row00000001' (field 'caption (row 1 of {name})'): lone surrogate U+DCE9, "
            "undecodable byte 0xe9 at character 3"
        )
        assert reasons["row00000003"]["reason"] == "bad row" and reasons["row00000003"]["message"].startswith(bad)


def test_unknown_table_format_and_field_that_matches_nothing(tmp_path):
    write_images(tmp_path / "imgs", ["a.jpg"])
    (tmp_path / "t.xlsx").write_text("x")
    cfg = prepare_data.PrepareDataConfig(
        source=str(tmp_path / "t.xlsx"),
        source_format="table",
        images=str(tmp_path / "imgs"),
        eval_sources=(karpathy(tmp_path / "f30k"),),
    )
    with pytest.raises(ValueError, match=r"t.xlsx: expected one of \['.csv', "):
        prepare_data.prepare_data(cfg, str(tmp_path / "out"))
    src = tmp_path / "laion"
    img2dataset_shard(src, n=3)
    cfg = prepare_data.PrepareDataConfig(
        source=str(src),
        source_format="img2dataset",
        short_field="json.shrt_caption",
        eval_sources=(karpathy(tmp_path / "f30k"),),
    )
    with pytest.raises(ValueError, match=r"short_field='json.shrt_caption': matches nothing in the 3 records"):
        prepare_data.prepare_data(cfg, str(tmp_path / "out2"))


def test_missing_eval_sets_are_named(tmp_path):
    src = tmp_path / "canonical"
    prepare_data.prepare_data(prepare_data.PrepareDataConfig(num_train=4, num_eval=2), str(src))
    for spec, message in (
        (f"u=urban1k:{tmp_path / 'Urban1k'}", "urban1k eval set: no caption/\\*.txt under"),
        (f"k=karpathy:{tmp_path / 'nope.json'}", "karpathy eval set: .*nope.json does not exist"),
    ):
        with pytest.raises(FileNotFoundError, match=message):
            prepare_data.prepare_data(
                prepare_data.PrepareDataConfig(source=str(src), eval_sources=(spec,)), str(tmp_path / "o")
            )


def test_caption_table_jsonl_on_s3(tmp_path, s3_env):
    for i in range(3):
        storage.write_bytes(storage.join(s3_env, "images", f"{i}.jpg"), jpeg(i))
    rows = "\n".join(json.dumps({"image": f"{i}.jpg", "caption": f"caption {i}"}) for i in range(3))
    storage.write_bytes(storage.join(s3_env, "table.jsonl"), rows.encode())
    write_images(tmp_path / "f30k" / "images", [])
    cfg = prepare_data.PrepareDataConfig(
        source=storage.join(s3_env, "table.jsonl"),
        source_format="table",
        images=storage.join(s3_env, "images"),
        eval_sources=(karpathy(tmp_path / "f30k"),),
    )
    stats = prepare_data.prepare_data(cfg, storage.join(s3_env, "prepared"))
    assert stats["train_kept"] == 3
    assert storage.exists(storage.join(s3_env, "prepared", "train", "shard-000000.tar"))


def test_bad_source_options_are_named():
    with pytest.raises(ValueError, match="source_format='parquet-ish'"):
        prepare_data.PrepareDataConfig(source_format="parquet-ish")
    with pytest.raises(ValueError, match="eval_sources='coco'"):
        prepare_data.PrepareDataConfig(eval_sources=("coco",))
    with pytest.raises(ValueError, match="images=''"):
        prepare_data.PrepareDataConfig(source="s3://b/t.csv", source_format="table")


def test_urban1k_and_sharegpt4v_eval_sets(tmp_path):
    urban = tmp_path / "Urban1k"
    write_images(urban / "image", ["1.jpg", "2.jpg"])
    (urban / "caption").mkdir()
    (urban / "caption" / "1.txt").write_text("A busy street with a red bus on the left and a cyclist. " * 5)
    (urban / "caption" / "2.txt").write_text("A quiet square at dusk. " * 5)
    (urban / "caption" / "3.txt").write_text("an image that does not exist")
    (urban / "caption" / "4.txt").write_bytes(b"caf\xe9 in Latin-1")
    write_images(urban / "image", ["4.jpg"])
    write_images(tmp_path / "sg" / "coco", ["a.jpg"])
    conv = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A detailed caption."}]
    (tmp_path / "sg" / "share.json").write_text(json.dumps([{"id": "a", "image": "coco/a.jpg", "conversations": conv}]))
    src = tmp_path / "canonical"
    prepare_data.prepare_data(prepare_data.PrepareDataConfig(num_train=8, num_eval=4), str(src))
    cfg = prepare_data.PrepareDataConfig(
        source=str(src),
        eval_sources=(
            f"urban1k=urban1k:{urban}",
            f"sharegpt4v=sharegpt4v:{tmp_path / 'sg' / 'share.json'}:{tmp_path / 'sg'}",
        ),
    )
    out = tmp_path / "out"
    stats = prepare_data.prepare_data(cfg, str(out))
    assert stats["urban1k_kept"] == 2 and stats["sharegpt4v_kept"] == 1 and stats["synthetic_long_kept"] == 4
    assert _reasons(out)["3"]["message"] == f"image file not found: {urban / 'image' / '3.jpg'}"
    assert (
        _reasons(out)["4"]["message"] == "caption long[0] of '4' (field 'caption/4.txt'): invalid byte 0xe9 at byte 3"
    )
    assert data.benchmarks(str(out))["urban1k"] == "long"
