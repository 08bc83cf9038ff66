"""Deterministic synthetic multimodal "demo world": the built-in demo data and test fixture.

Images (PNG, RGB, square) show one to three coloured shapes on a light background, each at
a distinct position. Every image has a structured description (``DemoObject`` list), from
which captions, paraphrases, contradictions, classification labels and VQA answers are
rendered. :func:`generate_demo_world` writes real files in the public formats the
pipeline's readers consume (all image paths are relative to ``root``)::

    images/train/00000.png ...          training images
    images/eval/00000.png ...           held-out images (descriptions disjoint from train)
    nli/nli_for_simcse.csv              SimCSE NLI: sent0,sent1,hard_neg (stage 1)
    mmeb_train/<dataset>.jsonl          MMEB-train rows: qry, qry_image_path, pos_text,
                                        pos_image_path, neg_text, neg_image_path (stage 2)
    mmeb_eval/<dataset>.jsonl           MMEB-eval rows: qry_text, qry_img_path,
                                        tgt_text[], tgt_img_path[]; ground truth = index 0
    sugarcrepe/<category>.json          {"0": {filename, caption, negative_caption}, ...}
    retrieval/captions.json             Karpathy style: {"images": [{filename, split,
                                        sentences: [{raw}, ... 5]}]}
    descriptions.jsonl                  per image: image_path, split, objects, caption
    README.md, world.json               what is here; generator arguments and version

Same arguments -> byte-identical files. ``world.json`` is written last: a folder without
it is incomplete.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.schemas import IMAGE_PLACEHOLDER

__all__ = [
    "CATEGORIES", "CLASS_LABELS", "COLORS", "COLOR_RGB", "COUNT_WORDS", "DEMO_WORLD_VERSION",
    "EVAL_DATASETS", "IMAGE_PLACEHOLDER", "MMEB_EVAL_KEYS", "MMEB_TRAIN_KEYS", "NLI_COLUMNS",
    "POSITIONS", "POSITION_PHRASES", "SHAPES", "SIZES", "SUGARCREPE_CATEGORIES", "SWAP_CATEGORIES",
    "TRAIN_DATASETS", "VQA_ANSWERS", "DemoObject", "DemoWorldFiles", "canonical_caption",
    "class_label", "description_key", "generate_demo_world", "render_caption", "render_image",
]

logger = logging.getLogger(__name__)

DEMO_WORLD_VERSION = 1

# --- vocabularies ------------------------------------------------------------------------

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 25),
    "purple": (140, 55, 180),
    "orange": (245, 135, 25),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
POSITIONS: tuple[str, ...] = ("left", "top", "center", "bottom", "right")  # canonical order
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "top": "at the top",
    "center": "in the center",
    "bottom": "at the bottom",
    "right": "on the right",
}
# Nominal shape centres as fractions of the image side (x, y): a cross in a 3x3 grid.
POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "left": (1 / 6, 1 / 2),
    "top": (1 / 2, 1 / 6),
    "center": (1 / 2, 1 / 2),
    "bottom": (1 / 2, 5 / 6),
    "right": (5 / 6, 1 / 2),
}
SIZES: tuple[str, ...] = ("small", "large")  # exactly one object per image is large
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
MAX_OBJECTS = len(COUNT_WORDS)
BACKGROUND_RGB: tuple[int, int, int] = (242, 240, 234)

# Classification label = colour and shape of the (single) large object.
CLASS_LABELS: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
VQA_ANSWERS: tuple[str, ...] = COLORS + SHAPES + POSITIONS + COUNT_WORDS

TRAIN_DATASETS: tuple[str, ...] = ("demo_t2i", "demo_i2t", "demo_cls", "demo_vqa")
EVAL_DATASETS: tuple[str, ...] = (*TRAIN_DATASETS, "demo_compositional")
SUGARCREPE_CATEGORIES: tuple[str, ...] = (
    "add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj",
)
CATEGORIES = SUGARCREPE_CATEGORIES  # short alias
SWAP_CATEGORIES: tuple[str, ...] = ("swap_att", "swap_obj")

NLI_COLUMNS: tuple[str, ...] = ("sent0", "sent1", "hard_neg")
MMEB_TRAIN_KEYS: tuple[str, ...] = (
    "qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path",
)
MMEB_EVAL_KEYS: tuple[str, ...] = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")

# VLM2Vec / MMEB style task instructions.
T2I_INSTRUCTION = "Find me an everyday image that matches the given caption: "
IMAGE_TARGET_TEXT = f"{IMAGE_PLACEHOLDER}\nRepresent the given image."
I2T_QUERY = f"{IMAGE_PLACEHOLDER}\nFind an image caption describing the given everyday image."
CLS_QUERY = f"{IMAGE_PLACEHOLDER}\nRepresent the given image for classification"
VQA_INSTRUCTION = f"{IMAGE_PLACEHOLDER}\nRepresent the given image with the following question: "

_RADIUS_FRACTION = {"small": 0.08, "large": 0.145}
_CENTER_JITTER_FRACTION = 0.015
_NOISE_STD = 3.0
_OBJECT_COUNT_PROBS = (0.2, 0.4, 0.4)
_NEG_PROBABILITY = 0.5
_SIZE_WORDS_PROBABILITY = 0.2
_T2I_NEG_POOL = 64
_MAX_UNIQUE_DESCRIPTIONS = 16_000  # of about 32.5k possible; keeps rejection sampling fast
_STREAMS = {"eval": 1, "train": 2, "nli": 3, "mmeb_train": 4, "mmeb_eval": 5, "sugarcrepe": 6,
            "retrieval": 7, "eval_image": 8, "train_image": 9}
_OWNED_ENTRIES = ("images", "nli", "mmeb_train", "mmeb_eval", "sugarcrepe", "retrieval",
                  "descriptions.jsonl", "README.md", "world.json")

# Caption templates: (prefix, first clause, other clauses, joiner). Template 0 is canonical.
_CLAUSES = {"plain": "{obj} {pos}", "is": "{obj} is {pos}", "there": "{pos} there is {obj}"}
_TEMPLATES: tuple[tuple[str, str, str, str], ...] = (
    ("", "plain", "plain", "list"),
    ("an image showing ", "plain", "plain", "list"),
    ("", "is", "is", "clauses"),
    ("", "there", "there", "clauses"),
    ("there is ", "plain", "plain", "list"),
    ("", "there", "is", "clauses"),
)
NUM_CAPTION_TEMPLATES = len(_TEMPLATES)
_RETRIEVAL_TEMPLATES = (0, 1, 2, 3, 4)  # distinct strings for every description


@dataclass(frozen=True)
class DemoObject:
    """One shape in an image."""

    color: str
    shape: str
    position: str
    size: str = "small"


Description = tuple[DemoObject, ...]


@dataclass(frozen=True)
class DemoWorldFiles:
    """Paths of everything :func:`generate_demo_world` wrote (dicts keyed by dataset)."""

    root: Path
    train_image_dir: Path
    eval_image_dir: Path
    nli_csv: Path
    mmeb_train_dir: Path
    mmeb_train: dict[str, Path]
    mmeb_eval_dir: Path
    mmeb_eval: dict[str, Path]
    sugarcrepe_dir: Path
    sugarcrepe: dict[str, Path]
    retrieval_json: Path
    descriptions_jsonl: Path
    readme: Path
    world_json: Path


@dataclass(frozen=True)
class _Image:
    """A generated image: its relative path and description (canonical object order)."""

    path: str
    objects: Description


# --- descriptions and captions -----------------------------------------------------------

def _rng(seed: int, stream: str, index: int = 0) -> np.random.Generator:
    """An independent random stream per purpose (and per item), so parts stay stable."""
    return np.random.default_rng([seed, _STREAMS[stream], index])


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    """One element of ``items`` (deterministic for a given rng state)."""
    return items[int(rng.integers(len(items)))]


def _canonical(objects: Iterable[DemoObject]) -> Description:
    """Objects sorted in the canonical position order."""
    return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))


def description_key(objects: Iterable[DemoObject]) -> frozenset[tuple[str, str, str]]:
    """What a caption says about an image: the set of (colour, shape, position); no sizes."""
    return frozenset((o.color, o.shape, o.position) for o in objects)


def _sample_description(rng: np.random.Generator) -> Description:
    """1-3 objects with distinct colours, shapes and positions; exactly one is large."""
    count = int(rng.choice(len(_OBJECT_COUNT_PROBS), p=_OBJECT_COUNT_PROBS)) + 1
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    colors = rng.choice(len(COLORS), size=count, replace=False)
    shapes = rng.choice(len(SHAPES), size=count, replace=False)
    large = int(rng.integers(count))
    objects = (
        DemoObject(COLORS[c], SHAPES[s], POSITIONS[p], "large" if i == large else "small")
        for i, (c, s, p) in enumerate(zip(colors, shapes, positions, strict=True))
    )
    return _canonical(objects)


def _sample_unique(rng: np.random.Generator, count: int, taken: set) -> list[Description]:
    """``count`` descriptions whose keys are not in ``taken`` (which is updated)."""
    out: list[Description] = []
    for _ in range(50 * count + 1000):
        objects = _sample_description(rng)
        key = description_key(objects)
        if key not in taken:
            taken.add(key)
            out.append(objects)
            if len(out) == count:
                return out
    raise RuntimeError(f"could not sample {count} distinct descriptions (got {len(out)})")


def _join(parts: Sequence[str], joiner: str) -> str:
    """'a and b' / 'a, b and c' (list) or 'a, and b' / 'a, b, and c' (clauses)."""
    if len(parts) == 1:
        return parts[0]
    last = " and " if joiner == "list" else ", and "
    return ", ".join(parts[:-1]) + last + parts[-1]


def render_caption(
    objects: Sequence[DemoObject], template: int = 0, show_size: bool | Sequence[bool] = False,
) -> str:
    """Caption of ``objects`` in the given order; template 0 + canonical order = canonical.

    ``show_size`` prefixes every (or, given a mask, some) object with its size word.
    """
    prefix, first, other, joiner = _TEMPLATES[template]
    mask = [show_size] * len(objects) if isinstance(show_size, bool) else list(show_size)
    clauses = []
    for i, (obj, sized) in enumerate(zip(objects, mask, strict=True)):
        words = f"{obj.size + ' ' if sized else ''}{obj.color} {obj.shape}"
        noun = f"{'an' if words[0] in 'aeiou' else 'a'} {words}"
        clause = _CLAUSES[first if i == 0 else other]
        clauses.append(clause.format(obj=noun, pos=POSITION_PHRASES[obj.position]))
    return prefix + _join(clauses, joiner)


def canonical_caption(objects: Sequence[DemoObject]) -> str:
    """The canonical caption: template 0, objects in canonical position order, no sizes."""
    return render_caption(_canonical(objects))


def class_label(objects: Sequence[DemoObject]) -> str:
    """Classification label: colour and shape of the large object (one of CLASS_LABELS)."""
    large = next(o for o in objects if o.size == "large")
    return f"{large.color} {large.shape}"


def _random_rendering(rng: np.random.Generator, objects: Description) -> tuple[Description, int]:
    """A random object order and template."""
    order = tuple(objects[int(i)] for i in rng.permutation(len(objects)))
    return order, int(rng.integers(NUM_CAPTION_TEMPLATES))


# --- perturbations (keep object order, so the rendered text is a minimal edit) -------------

def _with(objects: Description, index: int, **changes: str) -> Description:
    """``objects`` with object ``index`` changed."""
    out = list(objects)
    out[index] = dataclasses.replace(out[index], **changes)
    return tuple(out)


def _replace(objects: Description, rng: np.random.Generator, attr: str) -> Description:
    """Give one object a colour / shape / position that no object of the image has."""
    vocab = {"color": COLORS, "shape": SHAPES, "position": POSITIONS}[attr]
    used = {getattr(o, attr) for o in objects}
    free = [v for v in vocab if v not in used]
    return _with(objects, int(rng.integers(len(objects))), **{attr: _pick(rng, free)})


def _swap(objects: Description, rng: np.random.Generator, attr: str) -> Description | None:
    """Swap one attribute between two objects (None for single-object images)."""
    if len(objects) < 2:
        return None
    i, j = (int(v) for v in sorted(rng.choice(len(objects), size=2, replace=False)))
    swapped = _with(objects, i, **{attr: getattr(objects[j], attr)})
    return _with(swapped, j, **{attr: getattr(objects[i], attr)})


def _add_object(objects: Description, rng: np.random.Generator) -> Description:
    """Append an object at an empty position (with an unused colour and shape)."""
    free = {
        attr: [v for v in vocab if v not in {getattr(o, attr) for o in objects}]
        for attr, vocab in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS))
    }
    extra = DemoObject(*(_pick(rng, free[a]) for a in ("color", "shape", "position")))
    return (*objects, extra)


_PERTURBATIONS = {
    "replace_att": lambda o, r: _replace(o, r, "color"),
    "replace_obj": lambda o, r: _replace(o, r, "shape"),
    "replace_rel": lambda o, r: _replace(o, r, "position"),
    "swap_att": lambda o, r: _swap(o, r, "color"),
    "swap_obj": lambda o, r: _swap(o, r, "shape"),
    "swap_pos": lambda o, r: _swap(o, r, "position"),
    "add_obj": _add_object,
}
_CONTRADICTIONS = ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj", "swap_pos")


def _contradiction(objects: Description, rng: np.random.Generator) -> Description:
    """Change one attribute of one object, or swap an attribute between two objects."""
    kinds = _CONTRADICTIONS if len(objects) > 1 else _CONTRADICTIONS[:3]
    return _PERTURBATIONS[_pick(rng, kinds)](objects, rng)


def _binding_permutations(objects: Description) -> list[Description]:
    """Every re-binding of the same colours and shapes to the same positions (not the truth).

    Their captions use exactly the same words as the true caption.
    """
    n = len(objects)
    identity = tuple(range(n))
    out = []
    for colors in itertools.permutations(range(n)):
        for shapes in itertools.permutations(range(n)):
            if colors == shapes == identity:
                continue
            out.append(tuple(
                dataclasses.replace(o, color=objects[colors[k]].color,
                                    shape=objects[shapes[k]].shape)
                for k, o in enumerate(objects)
            ))
    return out


def _single_replacements(objects: Description) -> list[Description]:
    """Every description with one attribute of one object replaced by an unused value."""
    out = []
    for attr, vocab in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS)):
        used = {getattr(o, attr) for o in objects}
        for i in range(len(objects)):
            out.extend(_with(objects, i, **{attr: v}) for v in vocab if v not in used)
    return out


def _compositional_distractors(
    objects: Description, rng: np.random.Generator, count: int,
) -> list[str]:
    """``count`` distinct false captions: re-bindings first, then single, then double edits."""
    truth = render_caption(objects)
    groups = (
        lambda: _binding_permutations(objects),
        lambda: _single_replacements(objects),
        lambda: [d2 for d in _single_replacements(objects) for d2 in _single_replacements(d)],
    )
    chosen: dict[str, None] = {}
    for build in groups:  # later groups are only built when the earlier ones run short
        group = build()
        for i in rng.permutation(len(group)):
            caption = render_caption(group[int(i)])
            if caption != truth:
                chosen.setdefault(caption)
            if len(chosen) == count:
                return list(chosen)
    raise RuntimeError(f"only {len(chosen)} compositional distractors for {truth!r}")


# --- images ------------------------------------------------------------------------------

def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, center: tuple[float, float], radius: float,
    rgb: tuple[int, int, int],
) -> None:
    """Draw one filled shape; its centre pixel is always inside it."""
    cx, cy = center
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=rgb)
    elif shape == "square":
        half = 0.85 * radius
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=rgb)
    elif shape == "triangle":
        base_y, half_w = cy + 0.75 * radius, 0.95 * radius
        draw.polygon([(cx, cy - radius), (cx + half_w, base_y), (cx - half_w, base_y)], fill=rgb)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.55 * radius)
        points = [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a)))
                  for r, a in zip(radii, angles, strict=True)]
        draw.polygon(points, fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_image(
    objects: Sequence[DemoObject], size_px: int, rng: np.random.Generator,
) -> Image.Image:
    """Draw ``objects`` with slight position/size jitter, a tinted background and mild noise."""
    background = np.clip(np.array(BACKGROUND_RGB) + rng.integers(-6, 7, size=3), 0, 255)
    image = Image.new("RGB", (size_px, size_px), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fx, fy = POSITION_CENTERS[obj.position]
        jitter = rng.uniform(-_CENTER_JITTER_FRACTION, _CENTER_JITTER_FRACTION, size=2)
        center = ((fx + jitter[0]) * size_px, (fy + jitter[1]) * size_px)
        radius = _RADIUS_FRACTION[obj.size] * rng.uniform(0.95, 1.05) * size_px
        _draw_shape(draw, obj.shape, center, radius, COLOR_RGB[obj.color])
    pixels = np.asarray(image, dtype=np.float64)
    pixels = pixels + rng.normal(0.0, _NOISE_STD, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _write_images(
    root: Path, split: str, descriptions: list[Description], size_px: int, seed: int,
) -> list[_Image]:
    """Render and save one split's images as ``images/<split>/<index:05d>.png``."""
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index, objects in enumerate(descriptions):
        rel = f"images/{split}/{index:05d}.png"
        image = render_image(objects, size_px, _rng(seed, f"{split}_image", index))
        image.save(root / rel, format="PNG")
        images.append(_Image(rel, objects))
    return images


# --- writers -----------------------------------------------------------------------------

def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """One JSON object per line (UTF-8, keys in the given order); returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _write_json(path: Path, obj: Any) -> None:
    """Pretty JSON with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _write_nli(path: Path, descriptions: list[Description], seed: int) -> int:
    """SimCSE ``nli_for_simcse.csv``: anchor, paraphrase, contradiction (minimal edit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, "nli")
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(NLI_COLUMNS)
        for objects in descriptions:
            order, template = _random_rendering(rng, objects)
            anchor = render_caption(order, template)
            paraphrase = anchor
            while paraphrase == anchor:
                paraphrase = render_caption(*_random_rendering(rng, objects))
            hard_neg = render_caption(_contradiction(order, rng), template)
            writer.writerow((anchor, paraphrase, hard_neg))
    return len(descriptions)


def _train_caption(rng: np.random.Generator, objects: Description) -> tuple[Description, int, bool]:
    """A random rendering for training text: order, template and whether sizes are shown."""
    order, template = _random_rendering(rng, objects)
    return order, template, bool(rng.random() < _SIZE_WORDS_PROBABILITY)


def _mmeb_row(
    qry: str, pos_text: str, qry_image: str = "", pos_image: str = "", neg_text: str = "",
    neg_image: str = "",
) -> dict[str, str]:
    """An MMEB-train row with exactly :data:`MMEB_TRAIN_KEYS`."""
    values = (qry, qry_image, pos_text, pos_image, neg_text, neg_image)
    return dict(zip(MMEB_TRAIN_KEYS, values, strict=True))


def _hardest_other(
    images: list[_Image], index: int, rng: np.random.Generator,
) -> _Image:
    """Among a random pool of other images, the one sharing most attributes with ``index``."""
    def attrs(objects: Description) -> set[tuple[str, str]]:
        return {(a, getattr(o, a)) for o in objects for a in ("color", "shape", "position")}

    target = attrs(images[index].objects)
    pool = [int(i) for i in rng.choice(len(images), size=min(_T2I_NEG_POOL, len(images)),
                                       replace=False) if int(i) != index]
    best = max(pool, key=lambda i: (len(target & attrs(images[i].objects)), -i))
    return images[best]


def _vqa(objects: Description, rng: np.random.Generator) -> tuple[str, str, tuple[str, ...]]:
    """A question about ``objects``: (question, answer, answers of the same type)."""
    obj = _pick(rng, objects)
    kind = _pick(rng, ("color", "shape", "position", "count"))
    if kind == "color":
        question = f"What color is the {obj.shape} {POSITION_PHRASES[obj.position]}?"
        return question, obj.color, COLORS
    if kind == "shape":
        return f"What shape is the {obj.color} object?", obj.shape, SHAPES
    if kind == "position":
        return f"Where is the {obj.color} {obj.shape}?", obj.position, POSITIONS
    return "How many shapes are there?", COUNT_WORDS[len(objects) - 1], COUNT_WORDS


def _wrong(rng: np.random.Generator, answer: str, choices: Sequence[str]) -> str:
    """A random element of ``choices`` other than ``answer``."""
    return _pick(rng, [c for c in choices if c != answer])


def _wrong_label(rng: np.random.Generator, label: str) -> str:
    """A label sharing the colour or the shape with ``label`` (a hard negative)."""
    color, shape = label.split(" ")
    related = [x for x in CLASS_LABELS if x != label and (x.startswith(f"{color} ")
                                                         or x.endswith(f" {shape}"))]
    return _pick(rng, related)


def _mmeb_train_rows(images: list[_Image], seed: int) -> dict[str, list[dict[str, str]]]:
    """One row per training image and dataset; about half the rows carry a hard negative."""
    rows: dict[str, list[dict[str, str]]] = {name: [] for name in TRAIN_DATASETS}
    rng = _rng(seed, "mmeb_train")
    for index, image in enumerate(images):
        objects, path = image.objects, image.path
        caption = render_caption(*_train_caption(rng, objects))
        neg = rng.random(4) < _NEG_PROBABILITY
        other = _hardest_other(images, index, rng).path if neg[0] else ""
        rows["demo_t2i"].append(_mmeb_row(
            T2I_INSTRUCTION + caption, IMAGE_TARGET_TEXT, pos_image=path,
            neg_text=IMAGE_TARGET_TEXT if other else "", neg_image=other))
        order, template, sized = _train_caption(rng, objects)
        contradiction = render_caption(_contradiction(order, rng), template, sized)
        rows["demo_i2t"].append(_mmeb_row(
            I2T_QUERY, render_caption(order, template, sized), qry_image=path,
            neg_text=contradiction if neg[1] else ""))
        label = class_label(objects)
        rows["demo_cls"].append(_mmeb_row(
            CLS_QUERY, label, qry_image=path,
            neg_text=_wrong_label(rng, label) if neg[2] else ""))
        question, answer, same_kind = _vqa(objects, rng)
        rows["demo_vqa"].append(_mmeb_row(
            VQA_INSTRUCTION + question, answer, qry_image=path,
            neg_text=_wrong(rng, answer, same_kind) if neg[3] else ""))
    return rows


def _eval_row(
    qry_text: str, qry_img: str, tgt_text: Sequence[str], tgt_img: Sequence[str] | None = None,
) -> dict[str, Any]:
    """An MMEB-eval row; ``tgt_img`` defaults to no image for every candidate."""
    images = [""] * len(tgt_text) if tgt_img is None else list(tgt_img)
    return dict(zip(MMEB_EVAL_KEYS, (qry_text, qry_img, list(tgt_text), images), strict=True))


def _others(rng: np.random.Generator, n_total: int, index: int, count: int) -> list[int]:
    """``count`` random indices in ``range(n_total)`` other than ``index``."""
    chosen = rng.choice(n_total - 1, size=count, replace=False)
    return [int(i) + (int(i) >= index) for i in chosen]


def _vqa_candidates(
    rng: np.random.Generator, answer: str, same_kind: Sequence[str], count: int,
) -> list[str]:
    """The answer, then shuffled answers of the same type, then shuffled other answers."""
    same = [a for a in same_kind if a != answer]
    rest = [a for a in VQA_ANSWERS if a not in same_kind]
    ordered = [answer] + [same[int(i)] for i in rng.permutation(len(same))]
    ordered += [rest[int(i)] for i in rng.permutation(len(rest))]
    return ordered[:count]


def _mmeb_eval_rows(
    images: list[_Image], seed: int, num_candidates: int,
) -> dict[str, list[dict[str, Any]]]:
    """Held-out MMEB-eval rows; ground truth is candidate 0 in every row."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in EVAL_DATASETS}
    rng = _rng(seed, "mmeb_eval")
    captions = [canonical_caption(im.objects) for im in images]
    vqa_count = min(num_candidates, len(VQA_ANSWERS))
    for index, image in enumerate(images):
        others = _others(rng, len(images), index, num_candidates - 1)
        paths = [image.path] + [images[i].path for i in others]
        rows["demo_t2i"].append(_eval_row(
            T2I_INSTRUCTION + captions[index], "", [IMAGE_TARGET_TEXT] * len(paths), paths))
        others = _others(rng, len(images), index, num_candidates - 1)
        rows["demo_i2t"].append(_eval_row(
            I2T_QUERY, image.path, [captions[index]] + [captions[i] for i in others]))
        label = class_label(image.objects)
        labels = [label] + [x for x in CLASS_LABELS if x != label]
        rows["demo_cls"].append(_eval_row(CLS_QUERY, image.path, labels))
        question, answer, same_kind = _vqa(image.objects, rng)
        rows["demo_vqa"].append(_eval_row(
            VQA_INSTRUCTION + question, image.path,
            _vqa_candidates(rng, answer, same_kind, vqa_count)))
        if len(image.objects) > 1:
            distractors = _compositional_distractors(image.objects, rng, num_candidates - 1)
            rows["demo_compositional"].append(_eval_row(
                I2T_QUERY, image.path, [captions[index], *distractors]))
    return rows


def _sugarcrepe_negative(
    objects: Description, category: str, rng: np.random.Generator,
) -> str | None:
    """The negative caption of one category (canonical template and order), or None."""
    if category == "add_att":
        index = int(rng.integers(len(objects)))
        flipped = "small" if objects[index].size == "large" else "large"
        mask = [i == index for i in range(len(objects))]
        return render_caption(_with(objects, index, size=flipped), 0, mask)
    perturbed = _PERTURBATIONS[category](objects, rng)
    return None if perturbed is None else render_caption(perturbed)


def _sugarcrepe(images: list[_Image], seed: int) -> dict[str, dict[str, dict[str, str]]]:
    """Per category: {"<i>": {filename, caption, negative_caption}} over the eval images."""
    rng = _rng(seed, "sugarcrepe")
    out: dict[str, dict[str, dict[str, str]]] = {c: {} for c in SUGARCREPE_CATEGORIES}
    for image in images:
        caption = canonical_caption(image.objects)
        for category in SUGARCREPE_CATEGORIES:
            negative = _sugarcrepe_negative(image.objects, category, rng)
            if negative is not None:
                entries = out[category]
                entries[str(len(entries))] = {
                    "filename": image.path, "caption": caption, "negative_caption": negative,
                }
    return out


def _retrieval(images: list[_Image], seed: int) -> dict[str, Any]:
    """Karpathy-style caption file: five distinct captions per eval image, canonical first."""
    rng = _rng(seed, "retrieval")
    entries = []
    for index, image in enumerate(images):
        sentences = [canonical_caption(image.objects)]
        for template in _RETRIEVAL_TEMPLATES[1:]:
            order, _ = _random_rendering(rng, image.objects)
            sentences.append(render_caption(order, template, show_size=template == 1))
        entries.append({
            "imgid": index, "filename": image.path, "split": "test",
            "sentences": [{"raw": s, "sentid": 5 * index + k} for k, s in enumerate(sentences)],
        })
    return {"dataset": "demo", "images": entries}


def _descriptions(images: Iterable[_Image], split: str) -> Iterable[dict[str, Any]]:
    """Rows of descriptions.jsonl."""
    for image in images:
        yield {
            "image_path": image.path, "split": split,
            "objects": [dataclasses.asdict(o) for o in image.objects],
            "caption": canonical_caption(image.objects), "label": class_label(image.objects),
        }


# --- the entry point -----------------------------------------------------------------------

def _validate(arguments: dict[str, Any]) -> None:
    """Fail early, naming the argument."""
    for name, value in arguments.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    minimum = {"seed": 0, "num_train_images": 2, "num_eval_images": 2, "num_nli_groups": 1,
               "num_eval_candidates": 2, "image_size_px": 32}
    for name, low in minimum.items():
        if arguments[name] < low:
            raise ValueError(f"{name} must be >= {low}, got {arguments[name]}")
    if arguments["num_eval_candidates"] > arguments["num_eval_images"]:
        raise ValueError("num_eval_candidates must be <= num_eval_images "
                         "(retrieval candidates are other eval images)")
    largest = max(arguments["num_train_images"], arguments["num_nli_groups"])
    if arguments["num_eval_images"] + largest > _MAX_UNIQUE_DESCRIPTIONS:
        raise ValueError(f"num_eval_images + max(num_train_images, num_nli_groups) must be <= "
                         f"{_MAX_UNIQUE_DESCRIPTIONS} (each needs distinct descriptions)")


def _prepare_root(root: Path) -> None:
    """Create ``root``; clear an earlier demo world there; refuse any foreign folder."""
    if root.exists() and any(root.iterdir()):
        foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWNED_ENTRIES)
        if foreign:
            raise FileExistsError(f"{root} is not empty and not a demo world (found {foreign}); "
                                  "pass an empty or new folder")
        logger.warning("replacing the existing demo world in %s", root)
        for name in _OWNED_ENTRIES:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    root.mkdir(parents=True, exist_ok=True)


def _readme(arguments: dict[str, Any], counts: dict[str, int]) -> str:
    """Text of README.md."""
    lines = [
        "# UniME demo world", "",
        f"Synthetic data written by `pipeline.data.demo_world.generate_demo_world` "
        f"(version {DEMO_WORLD_VERSION}); arguments and counts in `world.json`.",
        "Images show 1-3 shapes (distinct colours, shapes and positions; exactly one large).",
        "All image paths are relative to this folder.", "",
        "| path | format |", "|---|---|",
        "| `images/{train,eval}/NNNNN.png` | RGB PNG, square; eval descriptions unseen in train |",
        "| `nli/nli_for_simcse.csv` | SimCSE csv: `sent0,sent1,hard_neg` "
        "(anchor, paraphrase, one-edit contradiction) |",
        "| `mmeb_train/<dataset>.jsonl` | MMEB-train: `qry, qry_image_path, pos_text, "
        "pos_image_path, neg_text, neg_image_path`; `\"\"` = none; "
        f"`{IMAGE_PLACEHOLDER}` iff an image path is set |",
        "| `mmeb_eval/<dataset>.jsonl` | MMEB-eval: `qry_text, qry_img_path, tgt_text[], "
        "tgt_img_path[]`; ground truth = candidate 0 |",
        "| `sugarcrepe/<category>.json` | `{\"0\": {filename, caption, negative_caption}}` |",
        "| `retrieval/captions.json` | Karpathy style, 5 captions per eval image "
        "(canonical first) |",
        "| `descriptions.jsonl` | per image: `image_path, split, objects, caption, label` |",
        "", "Counts:", "",
    ]
    lines += [f"- `{name}`: {count}" for name, count in counts.items()]
    lines += ["", "Arguments: " + ", ".join(f"`{k}={v}`" for k, v in arguments.items()), ""]
    return "\n".join(lines)


def _files(root: Path) -> DemoWorldFiles:
    """The paths of a demo world under ``root``."""
    return DemoWorldFiles(
        root=root,
        train_image_dir=root / "images" / "train",
        eval_image_dir=root / "images" / "eval",
        nli_csv=root / "nli" / "nli_for_simcse.csv",
        mmeb_train_dir=root / "mmeb_train",
        mmeb_train={d: root / "mmeb_train" / f"{d}.jsonl" for d in TRAIN_DATASETS},
        mmeb_eval_dir=root / "mmeb_eval",
        mmeb_eval={d: root / "mmeb_eval" / f"{d}.jsonl" for d in EVAL_DATASETS},
        sugarcrepe_dir=root / "sugarcrepe",
        sugarcrepe={c: root / "sugarcrepe" / f"{c}.json" for c in SUGARCREPE_CATEGORIES},
        retrieval_json=root / "retrieval" / "captions.json",
        descriptions_jsonl=root / "descriptions.jsonl",
        readme=root / "README.md",
        world_json=root / "world.json",
    )


def generate_demo_world(
    root: str | Path,
    *,
    seed: int = 0,
    num_train_images: int = 320,
    num_eval_images: int = 96,
    num_nli_groups: int = 1024,
    num_eval_candidates: int = 16,
    image_size_px: int = 64,
) -> DemoWorldFiles:
    """Write the demo world under the local folder ``root`` (see the module docstring).

    Same arguments give byte-identical files. ``root`` must be new, empty or an earlier
    demo world (which is replaced). Eval descriptions are unseen in train images and in
    NLI rows. VQA rows have ``min(num_eval_candidates, len(VQA_ANSWERS))`` candidates and
    classification rows the full label set; every other eval row ``num_eval_candidates``.
    """
    arguments = {"seed": seed, "num_train_images": num_train_images,
                 "num_eval_images": num_eval_images, "num_nli_groups": num_nli_groups,
                 "num_eval_candidates": num_eval_candidates, "image_size_px": image_size_px}
    _validate(arguments)
    if num_eval_candidates > len(VQA_ANSWERS):
        logger.warning("demo_vqa rows get %d candidates, not %d: only %d distinct answers",
                       len(VQA_ANSWERS), num_eval_candidates, len(VQA_ANSWERS))
    start = time.perf_counter()
    root = Path(root)
    _prepare_root(root)
    files = _files(root)

    eval_keys: set = set()
    eval_desc = _sample_unique(_rng(seed, "eval"), num_eval_images, eval_keys)
    train_desc = _sample_unique(_rng(seed, "train"), num_train_images, set(eval_keys))
    nli_desc = _sample_unique(_rng(seed, "nli"), num_nli_groups, set(eval_keys))
    eval_images = _write_images(root, "eval", eval_desc, image_size_px, seed)
    train_images = _write_images(root, "train", train_desc, image_size_px, seed)
    logger.info("demo world: %d train + %d eval images in %.2f s", len(train_images),
                len(eval_images), time.perf_counter() - start)

    counts = {"images/train": len(train_images), "images/eval": len(eval_images)}
    counts["nli/nli_for_simcse.csv"] = _write_nli(files.nli_csv, nli_desc, seed)
    for name, rows in _mmeb_train_rows(train_images, seed).items():
        counts[f"mmeb_train/{name}.jsonl"] = _write_jsonl(files.mmeb_train[name], rows)
    eval_rows = _mmeb_eval_rows(eval_images, seed, num_eval_candidates)
    for name, rows in eval_rows.items():
        counts[f"mmeb_eval/{name}.jsonl"] = _write_jsonl(files.mmeb_eval[name], rows)
    for category, entries in _sugarcrepe(eval_images, seed).items():
        _write_json(files.sugarcrepe[category], entries)
        counts[f"sugarcrepe/{category}.json"] = len(entries)
    _write_json(files.retrieval_json, _retrieval(eval_images, seed))
    counts["retrieval/captions.json"] = len(eval_images)
    _write_jsonl(files.descriptions_jsonl, itertools.chain(
        _descriptions(train_images, "train"), _descriptions(eval_images, "eval")))
    files.readme.write_text(_readme(arguments, counts), encoding="utf-8")
    _write_json(files.world_json, {
        "version": DEMO_WORLD_VERSION, "generator": f"{__name__}.generate_demo_world",
        "arguments": arguments, "counts": counts,
        "vocabulary": {"colors": list(COLORS), "shapes": list(SHAPES),
                       "positions": list(POSITIONS), "sizes": list(SIZES)},
    })
    logger.info("demo world written to %s in %.2f s (%s)", root, time.perf_counter() - start,
                ", ".join(f"{k}={v}" for k, v in counts.items()))
    return files
