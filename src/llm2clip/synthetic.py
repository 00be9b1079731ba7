"""Deterministic synthetic captioned scenes: rendered shapes with short captions and long dense captions.

Scenes come in groups that share the same objects and background and differ only in each object's size, fill
and position. Short captions name the objects; long captions add the per-object details after a general
description, so in a 77-token window the details of the later objects are cut off.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"light": (200, 200, 200), "dark": (60, 60, 60)}
SIZES = ("small", "large")
FILLS = ("filled", "outlined")
CELLS = (
    "top left",
    "top centre",
    "top right",
    "middle left",
    "centre",
    "middle right",
    "bottom left",
    "bottom centre",
    "bottom right",
)
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}

# ----------------------------------------------------------------------------------------------- wordings
# Two disjoint families of caption wordings. TRAIN_WORDING is the only one any training caption uses; EVAL_WORDING
# (the synthetic_reworded eval set) has its own sentence frames and its own words for size, fill, position and
# background, keeping only the colour and shape nouns (what is in the picture) and the count. An eval caption
# carries everything the training long caption of the same scene carries, so a model that fails on it fails to
# understand the wording, not for missing information. tests/test_synthetic.py checks that no eval frame or
# phrasing ever appears in a training caption.


@dataclass(frozen=True)
class Wording:
    """Sentence frames and the words for each attribute value. Frames take {bg}, {count}, {objects} (openings,
    short captions) and {colour}, {shape}, {size}, {fill}, {fill_clause}, {cell} (per-object details)."""

    openings: tuple[str, ...]
    style: tuple[str, ...]  # one sentence on the drawing style, no slots
    details: tuple[str, ...]
    short: tuple[str, ...]
    size: dict[str, str]  # SIZES -> adjective
    fill: dict[str, str]  # FILLS -> adjective
    fill_clause: dict[str, str]  # FILLS -> clause, for frames that say it as "..., and {fill_clause}"
    cell: tuple[str, ...]  # the name of each of the 9 CELLS, in CELLS order
    background: dict[str, str]  # BACKGROUNDS -> adjective


TRAIN_WORDING = Wording(
    openings=(
        "A simple rendered scene on a {bg} background showing {count} flat geometric objects: {objects}.",
        "This synthetic image has a {bg} background and contains {count} objects, namely {objects}.",
        "The picture is a plain computer drawing with {count} shapes, {objects}, on a {bg} background.",
    ),
    style=(
        "The shapes are drawn flat, without shading, shadows or perspective, like a clean diagram, and nothing "
        "else appears in the frame apart from the shapes themselves.",
        "There is no texture, no text and no border anywhere in the image; the colours are saturated and the edges "
        "are sharp, as in a simple vector illustration for a children's book.",
        "The composition is sparse and the objects do not overlap; each one sits in its own region of an invisible "
        "three by three grid that divides the square canvas.",
    ),
    details=(
        "The {colour} {shape} is {size} and {fill}, located in the {cell} of the image.",
        "In the {cell} there is the {colour} {shape}, which is {size} and {fill}.",
        "The {size} {colour} {shape} is {fill} and sits in the {cell}.",
    ),
    short=(
        "{objects}",
        "a picture of {objects}",
        "a {bg} image with {objects}",
    ),
    size={s: s for s in SIZES},
    fill={f: f for f in FILLS},
    fill_clause={f: f"it is {f}" for f in FILLS},  # no training frame says the fill as a clause
    cell=CELLS,
    background={b: b for b in BACKGROUNDS},
)

EVAL_WORDING = Wording(
    openings=(
        "Against a {bg} backdrop, someone has drawn {count} basic figures: {objects}.",
        "Here we see {objects}, {count} figures altogether, resting on a {bg} backdrop.",
        "Set on a {bg} backdrop, this graphic holds {count} figures in total, which are {objects}.",
    ),
    style=(
        "Everything is rendered in a flat, cartoon-like manner with crisp boundaries and no gradients, highlights "
        "or depth, so the drawing resembles a tidy piece of clip art and holds nothing more.",
        "No lettering, frame or pattern is visible anywhere; every hue is vivid and every boundary is crisp, the "
        "way a simple sticker sheet for kids might look.",
        "The figures never touch one another, and each keeps to a patch of its own on an unseen grid that cuts the "
        "picture into nine equal parts.",
    ),
    details=(
        "A {size}, {fill} {colour} {shape} can be found in the {cell}.",
        "Look at the {cell}: the {colour} {shape} found there is {size} and {fill}.",
        "Over in the {cell} sits the {colour} {shape}; it is {size}, and {fill_clause}.",
    ),
    short=(
        "an illustration showing {objects}",
        "{objects} against a {bg} backdrop",
        "some figures: {objects}",
    ),
    size={"small": "little", "large": "big"},
    fill={"filled": "solid", "outlined": "hollow"},
    fill_clause={"filled": "its inside is fully coloured", "outlined": "only its outline is drawn"},
    cell=(
        "upper left corner",
        "middle of the upper edge",
        "upper right corner",
        "middle of the left edge",
        "very middle",
        "middle of the right edge",
        "lower left corner",
        "middle of the lower edge",
        "lower right corner",
    ),
    background={"light": "pale grey", "dark": "charcoal grey"},
)
WORDINGS = {"train": TRAIN_WORDING, "eval": EVAL_WORDING}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    fill: str
    cell: int


@dataclass(frozen=True)
class Scene:
    key: str
    group: int
    background: str
    objects: tuple[Obj, ...]


def _article_list(names: list[str]) -> str:
    items = [f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def scene_groups(rng: random.Random, num_groups: int, group_size: int, prefix: str) -> list[Scene]:
    """`num_groups` x `group_size` scenes; scenes of one group share objects and background (hard negatives)."""
    scenes = []
    kinds = [(s, c) for s in SHAPES for c in COLOURS]
    for g in range(num_groups):
        count = rng.randint(2, 3)
        picked = rng.sample(kinds, count)
        background = rng.choice(list(BACKGROUNDS))
        seen: set[tuple] = set()
        while len(seen) < group_size:
            cells = rng.sample(range(9), count)
            objects = tuple(
                Obj(s, c, rng.choice(SIZES), rng.choice(FILLS), cell)
                for (s, c), cell in zip(picked, cells, strict=True)
            )
            if objects in seen:
                continue
            seen.add(objects)
            scenes.append(Scene(f"{prefix}{g:05d}_{len(seen) - 1}", g, background, objects))
    return scenes


def render(scene: Scene, size: int) -> Image.Image:
    """Draw the scene at 4x and downsample (anti-aliased edges)."""
    s = size * 4
    img = Image.new("RGB", (s, s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = s / 3
    for o in scene.objects:
        cx, cy = (o.cell % 3 + 0.5) * cell, (o.cell // 3 + 0.5) * cell
        r = cell * (0.42 if o.size == "large" else 0.22)
        colour = COLOURS[o.colour]
        fill, outline, width = (colour, colour, 1) if o.fill == "filled" else (None, colour, max(2, int(s / 40)))
        box = (cx - r, cy - r, cx + r, cy + r)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill, outline=outline, width=width)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill, outline=outline, width=width)
        elif o.shape == "triangle":
            pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
            draw.polygon(pts, fill=fill, outline=outline, width=width)
        else:  # cross
            t = r / 3
            pts = [
                (cx - t, cy - r),
                (cx + t, cy - r),
                (cx + t, cy - t),
                (cx + r, cy - t),
                (cx + r, cy + t),
                (cx + t, cy + t),
                (cx + t, cy + r),
                (cx - t, cy + r),
                (cx - t, cy + t),
                (cx - r, cy + t),
                (cx - r, cy - t),
                (cx - t, cy - t),
            ]
            draw.polygon(pts, fill=fill, outline=outline, width=width)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def captions(
    scene: Scene, rng: random.Random, num_short: int, wording: Wording = TRAIN_WORDING
) -> dict[str, list[str]]:
    """`num_short` differently worded short captions and one long dense caption, in the given wording."""
    w = wording
    names = [f"{o.colour} {o.shape}" for o in scene.objects]
    bg = w.background[scene.background]
    short_templates = rng.sample(w.short, num_short)
    short = []
    for t in short_templates:
        order = names[:]
        rng.shuffle(order)
        short.append(t.format(objects=_article_list(order), bg=bg))
    opening = rng.choice(w.openings).format(bg=bg, count=NUMBERS[len(names)], objects=_article_list(names))
    style = rng.choice(w.style)
    details = " ".join(
        rng.choice(w.details).format(
            colour=o.colour,
            shape=o.shape,
            size=w.size[o.size],
            fill=w.fill[o.fill],
            fill_clause=w.fill_clause[o.fill],
            cell=w.cell[o.cell],
        )
        for o in scene.objects
    )
    return {"short": short, "long": [f"{opening} {style} {details}"]}


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def generate(
    split: str,
    num_images: int,
    group_size: int,
    num_short: int,
    image_size: int,
    seed: int,
    kinds: tuple[str, ...] = ("short", "long"),
    wording: str = "train",
) -> Iterator[dict]:
    """Raw records {key, png, json} for one split, deterministic in (split, seed). `kinds` keeps only those
    caption kinds (an eval set needs only the kind it is scored on: embedding the others costs cache time for
    nothing); `wording` ("train" or "eval", see WORDINGS) picks the caption wording. The scenes, images, keys and
    groups depend only on (split, seed, sizes), so the same split in the other wording shows the same images."""
    if wording not in WORDINGS:
        raise ValueError(f"wording={wording!r}: must be one of {list(WORDINGS)}")
    rng = random.Random(f"{seed}/{split}")
    num_groups = -(-num_images // group_size)
    scenes = scene_groups(rng, num_groups, group_size, prefix=f"{split}_")[:num_images]
    source = f"synthetic/{split}" if wording == "train" else f"synthetic/{split}/{wording}-wording"
    for scene in scenes:
        caps = {k: v for k, v in captions(scene, rng, num_short, WORDINGS[wording]).items() if k in kinds}
        meta = {"key": scene.key, "group": scene.group, "captions": caps, "source": source}
        yield {"__key__": scene.key, "png": png_bytes(render(scene, image_size)), "json": meta}


def caption_corpus(seed: int, num_scenes: int = 400) -> Iterator[str]:
    """Caption text for training a tokenizer (tests' tiny model): training wordings only."""
    rng = random.Random(f"{seed}/corpus")
    for scene in scene_groups(rng, num_scenes, 1, prefix="c"):
        caps = captions(scene, rng, 2)
        yield from caps["short"]
        yield from caps["long"]


# ----------------------------------------------------------------------------------------------- classification
# A zero-shot classification set from the same renderer: the class of an image is its dominant object's colour
# and shape ("red circle"), drawn large and filled; up to two small objects of other classes are distractors.


def class_names() -> list[str]:
    """The synthetic classes, "<colour> <shape>", in a fixed order (class index = position)."""
    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


def classification_scenes(num_images: int, seed: int) -> list[tuple[Scene, int]]:
    """(scene, class index) pairs, classes balanced (image i has class i mod C, then shuffled); deterministic in
    the seed."""
    rng = random.Random(f"{seed}/classification")
    kinds = [(s, c) for s in SHAPES for c in COLOURS]  # class_names order
    labels = [i % len(kinds) for i in range(num_images)]
    rng.shuffle(labels)
    out = []
    for i, label in enumerate(labels):
        others = rng.sample([k for k in kinds if k != kinds[label]], rng.randint(0, 2))
        cells = rng.sample(range(9), 1 + len(others))
        dominant = Obj(*kinds[label], "large", "filled", cells[0])
        distractors = [
            Obj(s, c, "small", rng.choice(FILLS), cell) for (s, c), cell in zip(others, cells[1:], strict=True)
        ]
        scene = Scene(f"cls{i:06d}", label, rng.choice(list(BACKGROUNDS)), (dominant, *distractors))
        out.append((scene, label))
    return out


def classification_set(num_images: int, image_size: int, seed: int) -> tuple[list[Image.Image], list[int], list[str]]:
    """Rendered images, their class indices and the class names (see `classification_scenes`)."""
    pairs = classification_scenes(num_images, seed)
    return [render(scene, image_size) for scene, _ in pairs], [label for _, label in pairs], class_names()
