"""Synthetic data and prepare_data: determinism, long-caption property, every bad record rejected with a reason."""

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import webdataset as wds
from PIL import Image

from llm2clip import data, prepare_data, synthetic


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


def _rejects(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def test_prepare_data_rejects_bad_records_and_keeps_good_ones(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    truncated = png.getvalue()[:60]
    train = [
        _sample("good1", {"short": ["a red circle", "a circle, red"]}),
        _sample("corrupt", {"short": ["x"]}, image=truncated),
        _sample("empty", {"short": ["  "]}),
        {"__key__": "noimage", "json": json.dumps({"captions": {"short": ["x"]}}).encode()},
        _sample("good1", {"short": ["duplicate key"]}),
        _sample("tiny", {"short": ["x"]}, image=_png(2, 2)),
        {"__key__": "badjson", "png": _png(32, 32), "json": b"\xff\xfe{"},
        _sample("good2", {"long": ["a long caption"]}),
    ]
    _write_source(tmp_path / "src", train)
    out = tmp_path / "out"
    stats = prepare_data.prepare_data(prepare_data.PrepareDataConfig(source=str(tmp_path / "src")), str(out))
    assert stats["train_kept"] == 2
    kept = [r["key"] for r in data.read_split(str(out / "train"))]
    assert kept == ["good1", "good2"]
    rejects = _rejects(out)
    assert rejects["corrupt"]["reason"] == "truncated image"
    assert rejects["corrupt"]["message"] == "png: truncated PNG (image file is truncated)"
    assert rejects["empty"]["message"] == (
        "caption short[0] of 'empty' (field 'json.captions.short'): empty after stripping whitespace"
    )
    assert rejects["noimage"]["message"] == "missing field: image (one of ('png', 'jpg', 'jpeg', 'webp'))"
    assert rejects["tiny"]["message"] == "png: 2 x 2 is below min_side=8"
    assert rejects["badjson"]["reason"] == "bad metadata" and "not valid UTF-8 JSON" in rejects["badjson"]["message"]
    assert rejects["good1"]["message"] == "duplicate key 'good1' (the first record with it is kept)"
    assert json.loads((out / "train" / "sizes.json").read_text()) == {"shard-000000.tar": 2}
    assert json.loads((out / "stats.json").read_text())["train"]["reject_reasons"] == {
        "truncated image": 1,
        "blank caption": 1,
        "no image": 1,
        "duplicate key": 1,
        "image too small": 1,
        "bad metadata": 1,
    }


def _png(w, h, mode="RGB", color=0, **save):
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format="PNG", **save)
    return buf.getvalue()


def _encoded(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _cmyk_profile(ink_lab: tuple[int, int, int]) -> bytes:
    """A minimal ICC v2 CMYK printer profile (lut8 A2B0, 2-point grid): paper white, K black, and any C/M/Y ink
    the Lab colour `ink_lab` (8-bit encoded). Full cyan through it is grey, where PIL's naive formula gives cyan,
    so the converted pixels show whether the embedded profile decided them."""
    import struct

    lut = b"mft1" + bytes(4) + bytes([4, 3, 2, 0])
    lut += b"".join(struct.pack(">i", v) for v in (65536, 0, 0, 0, 65536, 0, 0, 0, 65536))
    corners = [(0, 128, 128) if i & 1 else (255, 128, 128) if i == 0 else ink_lab for i in range(16)]  # K fastest
    lut += bytes(range(256)) * 4 + b"".join(bytes(c) for c in corners) + bytes(range(256)) * 3
    desc = b"desc" + bytes(4) + struct.pack(">I", 5) + b"test\0" + bytes(4 + 4 + 2 + 1 + 67)
    wtpt = b"XYZ " + bytes(4) + struct.pack(">iii", 63190, 65536, 54061)
    tags = [(b"A2B0", lut), (b"desc", desc), (b"wtpt", wtpt)]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, payload in tags:
        payload += bytes(-len(payload) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(payload))
        body += payload
    header = struct.pack(">I", offset + len(body)) + b"lcms" + struct.pack(">I", 0x02100000) + b"prtrCMYKLab "
    header += bytes(12) + b"acsp" + bytes(24) + struct.pack(">I", 0) + struct.pack(">iii", 63190, 65536, 54061)
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def _exif_rotated() -> bytes:
    """A 40x20 JPEG, red on its left half, whose EXIF says "rotate 90 degrees clockwise to display" (6)."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded(img, "JPEG", exif=exif, quality=95)


def _image_classes() -> dict[str, tuple[bytes, tuple[int, int, int], tuple[int, int]]]:
    """name -> (file bytes, expected RGB at the probe pixel, probe pixel (x, y)) for every decodable kind."""
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (16, 0, 32, 32))  # right half fully transparent (black, if alpha were dropped)
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    cmyk_red = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    cyan = Image.new("CMYK", (32, 32), (255, 0, 0, 0))
    return {
        "cmyk jpeg": (_encoded(cmyk_red, "JPEG", quality=95), (255, 0, 0), (5, 5)),
        "cmyk jpeg with icc": (
            _encoded(cyan, "JPEG", quality=95, icc_profile=_cmyk_profile((128, 128, 128))),
            (119, 119, 119),  # Lab(50, 0, 0) in sRGB; PIL's naive CMYK formula would give cyan (0, 255, 255)
            (5, 5),
        ),
        "16-bit grey png": (_encoded(Image.fromarray(ramp), "PNG"), (128, 128, 128), (32, 0)),  # 33288/257: not 255
        "greyscale": (_png(32, 32, "L", 77), (77, 77, 77), (0, 0)),
        "palette": (_encoded(palette, "PNG"), (10, 200, 30), (3, 3)),
        "palette with transparency": (_encoded(palette, "PNG", transparency=1), (255, 255, 255), (3, 3)),
        "rgba": (_encoded(rgba, "PNG"), (255, 255, 255), (24, 5)),
        "grey + alpha": (_encoded(Image.new("LA", (32, 32), (0, 0)), "PNG"), (255, 255, 255), (0, 0)),
        "exif rotated jpeg": (_exif_rotated(), (255, 0, 0), (10, 5)),  # displayed 20x40: red on top
        "webp": (_encoded(Image.new("RGB", (32, 32), (0, 128, 0)), "WEBP", lossless=True), (0, 128, 0), (0, 0)),
        "gif": (_encoded(Image.new("RGB", (32, 32), (0, 0, 255)), "GIF"), (0, 0, 255), (0, 0)),
    }


def test_every_decodable_image_is_kept_as_rgb(tmp_path):
    classes = _image_classes()
    names = list(classes)
    train = [_sample(f"k{i}", {"short": [name]}, image=classes[name][0], ext="jpg") for i, name in enumerate(names)]
    _write_source(tmp_path / "src", train)
    out = tmp_path / "out"
    stats = prepare_data.prepare_data(prepare_data.PrepareDataConfig(source=str(tmp_path / "src")), str(out))
    assert stats["train_kept"] == len(classes) and stats["rejected"] == 0
    got = {r["meta"]["captions"]["short"][0]: r["image"] for r in data.read_split(str(out / "train"))}
    for name, (_, rgb, xy) in classes.items():
        img = got[name]
        assert img.mode == "RGB"
        assert np.abs(np.subtract(img.getpixel(xy), rgb)).max() <= 6, (name, img.getpixel(xy), rgb)
    assert got["exif rotated jpeg"].size == (20, 40)
    # plain sRGB images are stored byte for byte; converted ones as PNG of their RGB pixels
    raw = {s["__key__"]: s for s in wds.WebDataset(str(out / "train" / "shard-000000.tar"), shardshuffle=False)}
    assert raw[f"k{names.index('webp')}"]["webp"] == classes["webp"][0]
    assert "png" in raw[f"k{names.index('cmyk jpeg')}"]


def test_unreadable_images_say_what_is_wrong(tmp_path):
    noise = _encoded(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG")
    cases = {
        "empty": (b"", "empty file", "jpg: empty file"),
        "html": (
            b"<html><body>Not found</body></html>",
            "not an image",
            "jpg: not an image (starts with '<html><body>')",
        ),
        "truncated": (noise[: len(noise) // 2], "truncated image", "jpg: truncated JPEG (image file is truncated"),
        "header only": (_png(32, 32)[:20], "corrupt image", "jpg: a PNG file whose header cannot be read"),
        "bomb": (
            _png(3000, 3000, "L"),
            "decompression bomb",
            "jpg: decompression bomb: 3000 x 3000 exceeds max_pixels=1000000",
        ),
        "huge side": (_png(2000, 9, "L"), "image too large", "jpg: 2000 x 9 is above max_side=1024"),
    }
    train = [_sample("ok", {"short": ["fine"]})]
    train += [_sample(name, {"short": ["x"]}, image=raw, ext="jpg") for name, (raw, _, _) in cases.items()]
    _write_source(tmp_path / "src", train)
    out = tmp_path / "out"
    cfg = prepare_data.PrepareDataConfig(source=str(tmp_path / "src"), max_pixels=1_000_000, max_side=1024)
    assert prepare_data.prepare_data(cfg, str(out))["train_kept"] == 1
    rejects = _rejects(out)
    assert set(rejects) == set(cases)
    for name, (_, reason, message) in cases.items():
        assert rejects[name]["reason"] == reason
        assert rejects[name]["message"].startswith(message), rejects[name]["message"]
        assert "BytesIO" not in rejects[name]["message"]


def test_captions_go_through_one_check(tmp_path):
    """Lone surrogates (from a JSON escape), non-text, blank: rejected naming key, kind and field; length is no
    reason (a 20,000-character caption is kept)."""
    long_caption = "a very long caption " * 1000
    train = [
        {"__key__": "surrogate", "png": _png(32, 32), "json": b'{"captions": {"long": ["ok", "bad \\udcff"]}}'},
        _sample("number", {"short": [42]}),
        _sample("tab", {"raw": ["\t \n"]}),
        _sample("long", {"long": [long_caption]}),
    ]
    _write_source(tmp_path / "src", train)
    out = tmp_path / "out"
    assert (
        prepare_data.prepare_data(prepare_data.PrepareDataConfig(source=str(tmp_path / "src")), str(out))["train_kept"]
        == 1
    )
    assert next(data.read_split(str(out / "train")))["meta"]["captions"]["long"] == [long_caption.strip()]
    rejects = _rejects(out)
    assert rejects["surrogate"]["reason"] == "caption not UTF-8"
    assert rejects["surrogate"]["message"] == (
        "caption long[1] of 'surrogate' (field 'json.captions.long'): lone surrogate U+DCFF, undecodable byte 0xff "
        "at character 4"
    )
    assert rejects["number"]["message"] == (
        "caption short[0] of 'number' (field 'json.captions.short'): a int, not a string (42)"
    )
    assert rejects["tab"]["reason"] == "blank caption"
    with pytest.raises(prepare_data.Reject, match=r"^here: invalid byte 0xc3 at byte 3$"):
        prepare_data.clean_caption(b"caf\xc3", "here")


def test_unsafe_keys_are_refused_and_keys_normalised(tmp_path):
    import tarfile

    train = [
        _sample("../../x", {"short": ["climbs out"]}),
        _sample("/abs/y", {"short": ["absolute"]}),
        _sample("./a//b", {"short": ["normalised to a/b"]}),
        _sample("ok", {"short": ["fine"]}),
    ]
    _write_source(tmp_path / "src", train)
    out = tmp_path / "out"
    assert (
        prepare_data.prepare_data(prepare_data.PrepareDataConfig(source=str(tmp_path / "src")), str(out))["train_kept"]
        == 2
    )
    rejects = _rejects(out)
    assert rejects["../../x"]["message"] == "key '../../x' climbs out of its directory with '..'"
    assert rejects["/abs/y"]["message"] == "key '/abs/y' is an absolute path"
    with tarfile.open(out / "train" / "shard-000000.tar") as tf:
        assert sorted(tf.getnames()) == ["a/b.json", "a/b.png", "ok.json", "ok.png"]
    assert prepare_data.safe_key("img.001") == "img_001"  # webdataset would cut "img.001.jpg" at the first dot


def test_source_with_nothing_usable_fails_clearly_and_still_writes_rejects(tmp_path):
    _write_source(tmp_path / "src", [_sample("e", {"short": [""]}), _sample("f", {"short": ["x"]}, image=b"")])
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        prepare_data.prepare_data(prepare_data.PrepareDataConfig(source=str(tmp_path / "src")), str(out))
    assert str(err.value) == (
        f"split 'train' of source '{tmp_path / 'src'}': no usable record; 2 rejected (blank caption: 1, "
        f"empty file: 1); see {out / 'rejects.jsonl'}"
    )
    assert set(_rejects(out)) == {"e", "f"}
    reasons = json.loads((out / "stats.json").read_text())["train"]["reject_reasons"]
    assert reasons == {"blank caption": 1, "empty file": 1}


def test_synthetic_train_with_real_eval_sets_uses_them(tmp_path):
    from test_formats import karpathy

    cfg = prepare_data.PrepareDataConfig(num_train=4, num_eval=2, eval_sources=(karpathy(tmp_path / "f30k"),))
    stats = prepare_data.prepare_data(cfg, str(tmp_path / "out"))
    assert stats["flickr30k_kept"] == 3 and stats["synthetic_short_kept"] == 2
    assert data.benchmarks(str(tmp_path / "out"))["flickr30k"] == "short"


def test_eval_set_needs_enough_captions(tmp_path):
    """synthetic_short needs two short captions per image (CRA); a record with one is rejected, named."""
    rec = _sample("one", {"short": ["only one"]})
    verdict = prepare_data.validate(rec, prepare_data.PrepareDataConfig(), set(), data.BENCHMARKS["synthetic_short"])
    assert verdict == "json.captions.short: this benchmark needs at least 2"


def test_config_names_bad_field():
    with pytest.raises(ValueError, match=r"num_train=1"):
        prepare_data.PrepareDataConfig(num_train=1)
    with pytest.raises(ValueError, match=r"source='/no/such/dir'"):
        prepare_data.PrepareDataConfig(source="/no/such/dir")
    with pytest.raises(ValueError, match=r"short_field='json.short': only read from img2dataset and table"):
        prepare_data.PrepareDataConfig(short_field="json.short")
    with pytest.raises(ValueError, match=r"key_column='id': only read from caption tables"):
        prepare_data.PrepareDataConfig(key_column="id")


def test_prepared_layout(tiny_dataset):
    root = Path(tiny_dataset)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["stage"] == "prepare_data"
    assert set(manifest["splits"]) == {"train", "synthetic_short", "synthetic_long", "synthetic_reworded"}
    sizes = json.loads((root / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 48 and len(sizes) == 3  # shard_size 20
    rec = next(data.read_split(str(root / "eval" / "synthetic_short")))
    assert len(rec["meta"]["captions"]["short"]) == 2 and rec["image"].mode == "RGB"


def test_synthetic_eval_sets_carry_only_the_kind_they_are_scored_on(tiny_dataset):
    kinds = {
        "synthetic_short": {"short"},
        "synthetic_long": {"long"},
        "synthetic_reworded": {"long"},
        "train": {"short", "long"},
    }
    for split, expected in kinds.items():
        metas = [m for _, _, m in data.read_captions(str(Path(tiny_dataset) / data.split_path(split)))]
        assert metas and all(set(m["captions"]) == expected for m in metas), split
    # dropping the unused kind leaves the images and the kept captions as they were
    full = next(synthetic.generate("long", 4, 4, 1, 32, 0))
    only_long = next(synthetic.generate("long", 4, 4, 1, 32, 0, ("long",)))
    assert full["png"] == only_long["png"] and full["json"]["captions"]["long"] == only_long["json"]["captions"]["long"]
