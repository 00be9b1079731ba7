"""The synthetic captions' two wordings: nothing of the eval-only wording (synthetic_reworded) ever appears in a
training caption, an eval caption still says everything the training long caption says, and synthetic_reworded
shows exactly synthetic_long's images under the same keys."""

import random
import re
import string
from pathlib import Path

import pytest

from llm2clip import data, synthetic

TRAIN, EVAL = synthetic.TRAIN_WORDING, synthetic.EVAL_WORDING
FRAME_FIELDS = ("openings", "style", "details", "short")
PHRASE_FIELDS = ("size", "fill", "fill_clause", "background")
FUNCTION_WORDS = {"a", "an", "and", "in", "is", "it", "of", "on", "the", "with"}


def training_captions() -> list[str]:
    """Every caption of 3 x 1,000 training images (two short and one long each), three seeds, as prepare_data
    writes the train split."""
    out = []
    for seed in (0, 1, 2):
        for record in synthetic.generate("train", 1000, 2, 2, 16, seed):
            caps = record["json"]["captions"]
            out += caps["short"] + caps["long"]
    return out


def reworded_records(seed: int, n: int = 200) -> list[dict]:
    return list(synthetic.generate("long", n, 4, 1, 16, seed, ("long",), wording="eval"))


def frame_pieces(template: str) -> list[str]:
    """The literal text of a frame between its slots, lower case, trimmed of spaces and punctuation; only pieces
    of two words or more with a word other than FUNCTION_WORDS ("in the", "it is" belong to no wording)."""
    pieces = [literal for literal, *_ in string.Formatter().parse(template)]
    cleaned = [p.strip(string.whitespace + string.punctuation).lower() for p in pieces]
    return [p for p in cleaned if len(p.split()) >= 2 and set(re.findall(r"[\w']+", p)) - FUNCTION_WORDS]


def phrasings(wording: synthetic.Wording) -> set[str]:
    """Every attribute phrasing of a wording: size, fill (adjective and clause), position, background."""
    out = set(wording.cell)
    for name in PHRASE_FIELDS:
        out |= set(getattr(wording, name).values())
    return out


def contains_phrase(text: str, phrase: str) -> bool:
    """`phrase` as whole words in `text`, case-insensitive ("outline" is not in "outlined")."""
    return re.search(rf"\b{re.escape(phrase.lower())}\b", text.lower()) is not None


@pytest.fixture(scope="module")
def train_text() -> str:
    captions = training_captions()
    assert len(captions) == 9000
    return "\n".join(c.lower() for c in captions)


def test_the_two_wordings_are_disjoint():
    for name in FRAME_FIELDS:
        assert not set(getattr(TRAIN, name)) & set(getattr(EVAL, name)), name
    assert not phrasings(TRAIN) & phrasings(EVAL)
    # no eval phrasing contains a training one as a word (as "big circle" would contain "circle"), nor the reverse
    for ours in phrasings(EVAL):
        for theirs in phrasings(TRAIN):
            assert not contains_phrase(ours, theirs) and not contains_phrase(theirs, ours), (ours, theirs)
    # the attribute values are the same; only their words differ
    assert set(EVAL.size) == set(synthetic.SIZES) and set(EVAL.fill) == set(EVAL.fill_clause) == set(synthetic.FILLS)
    assert set(EVAL.background) == set(synthetic.BACKGROUNDS) and len(EVAL.cell) == len(synthetic.CELLS)
    assert len(set(EVAL.cell)) == len(EVAL.cell)  # nine distinct positions


def test_no_eval_frame_or_phrasing_appears_in_any_training_caption(train_text):
    for name in FRAME_FIELDS:
        for frame in getattr(EVAL, name):
            pieces = frame_pieces(frame)
            assert pieces, f"eval frame {frame!r} has no literal text of its own"
            for piece in pieces:
                assert not contains_phrase(train_text, piece), f"eval frame piece {piece!r} ({frame!r}) in training"
    for phrase in phrasings(EVAL):
        assert not contains_phrase(train_text, phrase), f"eval phrasing {phrase!r} is in a training caption"


def test_no_training_frame_or_phrasing_appears_in_a_reworded_caption():
    """The reverse: a reworded caption shares only colour and shape nouns, count words and common function words
    with the training captions, never one of their frames or attribute words."""
    reworded = "\n".join(r["json"]["captions"]["long"][0].lower() for seed in (0, 1) for r in reworded_records(seed))
    for name in FRAME_FIELDS:
        for frame in getattr(TRAIN, name):
            for piece in frame_pieces(frame):
                assert not contains_phrase(reworded, piece), f"training frame piece {piece!r} is in a reworded caption"
    for phrase in phrasings(TRAIN):
        assert not contains_phrase(reworded, phrase), f"training phrasing {phrase!r} is in a reworded caption"


def test_a_reworded_caption_says_all_the_training_caption_says():
    """Every object's colour and shape, size, fill and position, in its own detail sentence (in object order, after
    the opening and the style sentence), the count, every object in the opening, and the background."""
    for seed in (0, 1, 2):
        scenes = {s.key: s for s in synthetic.scene_groups(random.Random(f"{seed}/long"), 50, 4, prefix="long_")}
        for record in reworded_records(seed):
            (caption,) = record["json"]["captions"]["long"]
            scene = scenes[record["__key__"]]
            sentences = re.split(r"(?<=\.) ", caption)
            assert len(sentences) == 2 + len(scene.objects), caption
            opening, details = sentences[0], sentences[2:]
            assert synthetic.NUMBERS[len(scene.objects)] in opening
            assert EVAL.background[scene.background] in opening
            for obj, sentence in zip(scene.objects, details, strict=True):
                assert f"{obj.colour} {obj.shape}" in opening and f"{obj.colour} {obj.shape}" in sentence, sentence
                assert contains_phrase(sentence, EVAL.size[obj.size]), sentence
                fill = EVAL.fill[obj.fill], EVAL.fill_clause[obj.fill]
                assert any(contains_phrase(sentence, f) for f in fill), sentence
                assert contains_phrase(sentence, EVAL.cell[obj.cell]), sentence
                other_cells = [c for i, c in enumerate(EVAL.cell) if i != obj.cell]
                assert not any(contains_phrase(sentence, c) for c in other_cells), sentence


def test_the_same_split_in_either_wording_shows_the_same_scenes():
    train_wording = list(synthetic.generate("long", 40, 4, 1, 16, 5, ("long",)))
    eval_wording = reworded_records(5, 40)
    assert [r["__key__"] for r in train_wording] == [r["__key__"] for r in eval_wording]
    assert all(a["png"] == b["png"] for a, b in zip(train_wording, eval_wording, strict=True))
    assert all(
        a["json"]["captions"]["long"] != b["json"]["captions"]["long"]
        for a, b in zip(train_wording, eval_wording, strict=True)
    )
    with pytest.raises(ValueError, match=r"wording='paraphrase'"):
        next(synthetic.generate("long", 4, 4, 1, 16, 0, wording="paraphrase"))


def test_synthetic_reworded_holds_synthetic_long_images_under_the_same_keys(tiny_dataset):
    """The prepared eval sets: same keys in the same order, byte-identical images, the same groups of hard
    negatives; only the long caption differs, and it is the set's only caption."""
    long, reworded = (
        list(data.read_split(str(Path(tiny_dataset) / data.split_path(s))))
        for s in ("synthetic_long", "synthetic_reworded")
    )
    assert len(long) == len(reworded) == 12
    assert [r["key"] for r in long] == [r["key"] for r in reworded]
    assert [r["shard"] for r in long] == [r["shard"] for r in reworded]
    for a, b in zip(long, reworded, strict=True):
        assert a["image"].tobytes() == b["image"].tobytes()
        assert a["meta"]["group"] == b["meta"]["group"]
        assert set(b["meta"]["captions"]) == {"long"} and len(b["meta"]["captions"]["long"]) == 1
        assert a["meta"]["captions"]["long"] != b["meta"]["captions"]["long"]
    assert data.benchmarks(tiny_dataset)["synthetic_reworded"] == "long"
