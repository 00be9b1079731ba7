"""Zero-shot classification: the synthetic set, the folder reader (local and s3://), accuracy against brute force
(ties count against), and the classifier against one built prompt by prompt."""

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from llm2clip import inference, loading, storage, synthetic, text_encoder, train_clip, zeroshot


def test_synthetic_set_is_deterministic_balanced_and_shows_its_class():
    a, b = zeroshot.synthetic_set(48, 64, seed=3), zeroshot.synthetic_set(48, 64, seed=3)
    assert a.labels == b.labels and all(x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images, strict=True))
    assert a.labels != zeroshot.synthetic_set(48, 64, seed=4).labels
    assert len(a.classnames) == 24 and np.bincount(a.labels).tolist() == [2] * 24
    assert a.images[0].size == (64, 64)
    for image, label in zip(a.images, a.labels, strict=True):
        pixels = np.asarray(image).reshape(-1, 3).astype(int)
        counts = {c: int((np.abs(pixels - rgb).sum(1) < 30).sum()) for c, rgb in synthetic.COLOURS.items()}
        assert max(counts, key=counts.get) == a.classnames[label].split()[0]  # the dominant object's colour wins


def brute_force_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    acc = {1: [], 5: []}
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        rank = sum(1 for c, v in enumerate(row) if c != y and v >= row[y])
        for k in acc:
            acc[k].append(rank < k)
    per_class = [
        np.mean([h for h, y in zip(acc[1], labels.tolist(), strict=True) if y == c]) for c in set(labels.tolist())
    ]
    return {"acc1": np.mean(acc[1]), "acc5": np.mean(acc[5]), "mean_per_class_recall": np.mean(per_class)}


def test_accuracy_matches_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (200, 8), generator=g).float()  # many ties
    labels = torch.randint(0, 8, (200,), generator=g)
    got = zeroshot.accuracy(logits, labels)
    for name, value in brute_force_accuracy(logits, labels).items():
        assert got[name] == pytest.approx(value), name
    lo, hi = got["acc1_ci95"]
    assert lo <= got["acc1"] <= hi
    collapsed = zeroshot.accuracy(torch.zeros(40, 8), torch.arange(40) % 8)
    assert collapsed["acc1"] == collapsed["acc5"] == collapsed["mean_per_class_recall"] == 0.0


def untrained_encoder(text_source: str) -> inference.Encoder:
    """An inference.Encoder over a freshly built stage-2 model (the zero-shot plumbing does not need training)."""
    torch.manual_seed(0)
    cfg = train_clip.TrainClipConfig(text_source=text_source)
    llm = text_encoder.load_caption_encoder(text_encoder.TINY_LLAMA) if text_source == "llm" else None
    model = train_clip.build_model(cfg, llm.dim if llm else None).eval()
    tokenizer = open_clip.get_tokenizer(cfg.model) if llm is None else None
    manifest = {"config": {"text_source": text_source, "model": cfg.model}}
    return inference.Encoder(
        model, manifest, loading.preprocess_of(model), torch.device("cpu"), "float32", llm, tokenizer
    )


@pytest.mark.parametrize("text_source", ["llm", "clip"])
def test_zero_shot_equals_a_classifier_built_class_by_class(text_source):
    enc = untrained_encoder(text_source)
    full = zeroshot.synthetic_set(48, 32, seed=0)
    keep = [i for i, y in enumerate(full.labels) if y < 6]  # 6 of the 24 classes keep the test cheap
    dataset = zeroshot.ZeroShotSet(
        "six", full.classnames[:6], [full.images[i] for i in keep], [full.labels[i] for i in keep]
    )
    templates = zeroshot.TEMPLATE_SETS["ensemble"]
    columns = []
    for name in dataset.classnames:
        prompts = enc.encode_text([t(name) for t in templates])  # [T, E], unit rows
        columns.append(F.normalize(prompts.mean(0), dim=0))
    expected = torch.stack(columns, dim=1)  # [E, C]
    torch.testing.assert_close(zeroshot.classifier(enc, dataset.classnames, templates), expected, atol=1e-4, rtol=1e-4)
    single = zeroshot.classifier(enc, dataset.classnames, zeroshot.TEMPLATE_SETS["single"])
    plain = enc.encode_text([f"a photo of a {c}." for c in dataset.classnames]).T
    torch.testing.assert_close(single, plain, atol=1e-5, rtol=1e-5)
    result = zeroshot.zero_shot(enc, dataset, templates)
    logits = enc.encode_image(dataset.images) @ expected
    for name, value in brute_force_accuracy(logits, torch.tensor(dataset.labels)).items():
        assert result[name] == pytest.approx(value), name
    assert result["num_classes"] == 6 and result["num_images"] == 12 and result["num_templates"] == len(templates)
    suite = zeroshot.zero_shot_suite(enc, dataset, ("single",))
    assert set(suite) == {"single"} and 0.0 <= suite["single"]["acc1"] <= 1.0


def write_folder_set(root, names: list[str] | None) -> list[tuple[str, bytes]]:
    images = zeroshot.synthetic_set(6, 32, seed=1).images
    folders = ["b_cls", "a_cls", "c_cls"]
    written = []
    for i, image in enumerate(images):
        folder = Path(root) / folders[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img{i}.png")
        written.append((folders[i % 3], image.tobytes()))
    (Path(root) / "README").write_text("not an image folder")
    if names is not None:
        (Path(root) / zeroshot.CLASSNAMES_FILE).write_text("\n".join(names) + "\n")
    return written


def check_folder_set(ds, written):
    assert ds.classnames == ["apple", "bee", "cat"]  # line i names the i-th folder in sorted order
    by_folder = {"a_cls": 0, "b_cls": 1, "c_cls": 2}
    assert sorted(ds.labels) == [0, 0, 1, 1, 2, 2]
    got = sorted((ds.labels[i], ds.images[i].tobytes()) for i in range(len(ds.labels)))
    assert got == sorted((by_folder[f], b) for f, b in written)


def test_folder_set_reads_the_class_folder_layout_locally_and_from_s3(tmp_path, s3_env):
    written = write_folder_set(tmp_path / "set", ["apple", "bee", "cat"])
    check_folder_set(zeroshot.folder_set(str(tmp_path / "set")), written)
    storage.upload_dir(tmp_path / "set", storage.join(s3_env, "set"))
    remote = zeroshot.folder_set(storage.join(s3_env, "set"))
    assert remote.name == "set"
    check_folder_set(remote, written)


def test_folder_set_names_default_to_folders_and_must_match_them(tmp_path):
    write_folder_set(tmp_path / "plain", None)
    assert zeroshot.folder_set(str(tmp_path / "plain")).classnames == ["a cls", "b cls", "c cls"]
    write_folder_set(tmp_path / "bad", ["apple", "bee"])
    with pytest.raises(ValueError, match="2 class names for 3 class folders"):
        zeroshot.folder_set(str(tmp_path / "bad"))


def test_images_of_a_folder_set_are_read_lazily(tmp_path, monkeypatch):
    write_folder_set(tmp_path / "set", ["apple", "bee", "cat"])
    reads = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: reads.append(uri) or real(uri))
    ds = zeroshot.folder_set(str(tmp_path / "set"))
    assert all(not r.endswith(".png") for r in reads)
    assert ds.images[1:3][0].size == (32, 32) and sum(r.endswith(".png") for r in reads) == 2
