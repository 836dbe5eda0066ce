"""`detail`: generated multi-object scenes whose answers live in small regions, so careless compression shows.

Each scene (seeded, deterministic) is a 112 x 112 image (ref-vlm's input: 8 x 8 patches of 14 px) with 3-8 small
objects (circle, square, triangle, star, cross; 7 colours; 10-30% of the side, i.e. 1-2.5 patches wide) on a textured,
non-uniform background (a colour gradient, stripes and pixel noise, in muted tones unlike any object colour), and
single-word questions whose answer lives in one or two objects:

| type | question | answers |
|---|---|---|
| colour | what color is the {shape}? (the shape is unique in the scene) | 7 colours |
| shape | what shape is the {color} object? (the colour is unique) | 5 shapes |
| exist | is there a {color} {shape}? | yes / no (balanced) |
| count | how many {shape}s are there? | 1-4 (balanced: the scene is built around the count) |
| relation | where is the {color} {shape} relative to the {color} {shape}? | left / right / above / below (balanced) |

Splits use disjoint seeds (train 0.., val 1,000,000.., test 2,000,000..); the test split has 500 scenes and 2,322
questions (a type is skipped where a scene cannot ask it unambiguously): 1,898 of the default types (task `detail`:
colour 414, shape 484, exist 500, count 500) and 424 relation questions (tasks `detail_all`, `detail_relation`).
Answers are correct by construction and re-derivable from `Scene.objects`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mmcompress.evals.tasks import Sample, Task, register_task, seeded_subset

__all__ = ["Obj", "Scene", "make_scene", "questions", "render", "split_questions", "answer_balance", "DetailTask",
           "SHAPES", "COLORS", "QUESTION_TYPES", "DEFAULT_TYPES", "image_features"]

SIDE = 112
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 230), "yellow": (240, 220, 20),
          "purple": (150, 40, 190), "orange": (250, 130, 10), "white": (250, 250, 250)}
QUESTION_TYPES = ("colour", "shape", "exist", "count", "relation")
# The default mix leaves out relation: from 112-px DINOv2-S tokens it stays at chance even for a readout given token
# coordinates and 20,000 scenes (docs/reference-models.md); `detail_all` and `detail_relation` ask it on request.
DEFAULT_TYPES = ("colour", "shape", "exist", "count")
SPLIT_SEEDS = {"train": 0, "val": 1_000_000, "test": 2_000_000}
SPLIT_SCENES = {"train": 20_000, "val": 500, "test": 500}


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour name, centre (x, y) in pixels and radius (half the side of its bounding box)."""

    shape: str
    color: str
    x: float
    y: float
    r: float


@dataclass
class Scene:
    """A scene description: its seed, objects and background parameters; `render` draws it."""

    seed: int
    objects: list[Obj]
    background: dict[str, Any] = field(default_factory=dict)
    count_shape: str = "circle"  # the shape the count question asks about (only its copies have that shape)


def make_scene(seed: int) -> Scene:
    """The scene of `seed`: 3-8 non-overlapping objects, one shape present 1-4 times (for the count question)."""
    rng = random.Random(seed)
    n = rng.randint(3, 8)
    count_shape, count = rng.choice(SHAPES), 1 + seed % 4  # counts cycle over scenes: 25% each
    kinds = [count_shape] * count + [rng.choice([s for s in SHAPES if s != count_shape]) for _ in range(n - count)]
    objs: list[Obj] = []
    for shape in kinds:
        for _ in range(200):  # rejection sampling of a free spot
            r = rng.uniform(0.05, 0.15) * SIDE  # diameter 10-30% of the side
            x, y = rng.uniform(r + 1, SIDE - r - 1), rng.uniform(r + 1, SIDE - r - 1)
            if all(math.hypot(x - o.x, y - o.y) > r + o.r + 3 for o in objs):
                objs.append(Obj(shape, rng.choice(list(COLORS)), round(x, 2), round(y, 2), round(r, 2)))
                break
    bg = {"c0": [rng.randint(70, 140) for _ in range(3)], "c1": [rng.randint(70, 140) for _ in range(3)],
          "stripe": rng.randint(5, 11), "angle": rng.choice([0, 1]), "noise_seed": rng.randrange(2**31)}
    return Scene(seed, objs, bg, count_shape)


def _polygon(o: Obj) -> list[tuple[float, float]]:
    if o.shape == "triangle":
        return [(o.x + o.r * math.cos(a), o.y - o.r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6,
                                                                            11 * math.pi / 6)]
    if o.shape == "star":
        pts = []
        for i in range(10):
            rr = o.r if i % 2 == 0 else o.r * 0.45
            a = math.pi / 2 + i * math.pi / 5
            pts.append((o.x + rr * math.cos(a), o.y - rr * math.sin(a)))
        return pts
    raise ValueError(o.shape)


def render(scene: Scene) -> Any:
    """The scene as a 112 x 112 RGB ``PIL.Image`` (same scene -> same pixels)."""
    import numpy as np
    from PIL import Image, ImageDraw

    bg = scene.background
    t = np.linspace(0, 1, SIDE)[:, None] if bg["angle"] else np.linspace(0, 1, SIDE)[None, :]
    base = (1 - t)[..., None] * np.array(bg["c0"]) + t[..., None] * np.array(bg["c1"])  # gradient
    base = np.broadcast_to(base, (SIDE, SIDE, 3)).copy()
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    base += 12.0 * (((xx + yy) // bg["stripe"]) % 2)[..., None]  # diagonal stripes
    base += np.random.default_rng(bg["noise_seed"]).normal(0, 8, (SIDE, SIDE, 3))  # pixel noise
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        c = COLORS[o.color]
        box = (o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r)
        if o.shape == "circle":
            d.ellipse(box, fill=c)
        elif o.shape == "square":
            s = o.r * 0.85
            d.rectangle((o.x - s, o.y - s, o.x + s, o.y + s), fill=c)
        elif o.shape == "cross":
            w = o.r * 0.35
            d.rectangle((o.x - o.r, o.y - w, o.x + o.r, o.y + w), fill=c)
            d.rectangle((o.x - w, o.y - o.r, o.x + w, o.y + o.r), fill=c)
        else:
            d.polygon(_polygon(o), fill=c)
    return img


def _relation(a: Obj, b: Obj) -> str | None:
    """Where `a` is relative to `b`: the dominant axis, when clearly dominant (>= 1.5x) and >= 8 px apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= 1.5 * abs(dy) and abs(dx) >= 8:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 1.5 * abs(dx) and abs(dy) >= 8:
        return "above" if dy < 0 else "below"
    return None


def questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Up to one ``(type, question, answer)`` per question type for `scene`, chosen from its seed."""
    rng = random.Random(scene.seed * 7 + 1)
    objs = scene.objects
    shapes, colors = Counter(o.shape for o in objs), Counter(o.color for o in objs)
    pairs = Counter((o.color, o.shape) for o in objs)
    out: list[tuple[str, str, str]] = []
    unique_shapes = sorted(s for s, c in shapes.items() if c == 1)
    if unique_shapes:
        s = rng.choice(unique_shapes)
        out.append(("colour", f"what color is the {s}?", next(o.color for o in objs if o.shape == s)))
    unique_colors = sorted(c for c, n in colors.items() if n == 1)
    if unique_colors:
        c = rng.choice(unique_colors)
        out.append(("shape", f"what shape is the {c} object?", next(o.shape for o in objs if o.color == c)))
    if rng.random() < 0.5:
        c, s = rng.choice(sorted(pairs))
        out.append(("exist", f"is there a {c} {s}?", "yes"))
    else:
        absent = sorted((c, s) for c in COLORS for s in SHAPES if (c, s) not in pairs)
        c, s = rng.choice(absent)
        out.append(("exist", f"is there a {c} {s}?", "no"))
    s = scene.count_shape
    if shapes[s]:  # (0 only if no free spot was found for any copy)
        out.append(("count", f"how many {s}s are there?", str(shapes[s])))
    named = [o for o in objs if pairs[(o.color, o.shape)] == 1]  # nameable by colour + shape
    want = ("left", "right", "above", "below")[(scene.seed // 4) % 4]  # directions cycle over scenes
    cands = [(a, b) for a in named for b in named if a is not b and _relation(a, b) == want]
    if cands:
        a, b = rng.choice(cands)
        out.append(("relation", f"where is the {a.color} {a.shape} relative to the {b.color} {b.shape}?", want))
    return out


def split_questions(split: str, n_scenes: int | None = None) -> list[tuple[str, Scene, str, str, str]]:
    """``(id, scene, type, question, answer)`` of every question of a split (ids ``<split>/<scene>/<type>``)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split: expected one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    n = SPLIT_SCENES[split] if n_scenes is None else n_scenes
    out = []
    for i in range(n):
        scene = make_scene(SPLIT_SEEDS[split] + i)
        out += [(f"{split}/{i}/{t}", scene, t, q, a) for t, q, a in questions(scene)]
    return out


def answer_balance(rows: list[tuple[str, Scene, str, str, str]]) -> dict[str, dict[str, float]]:
    """Share of each answer within each question type."""
    by: dict[str, Counter] = {}
    for _, _, t, _, a in rows:
        by.setdefault(t, Counter())[a] += 1
    return {t: {a: n / sum(c.values()) for a, n in sorted(c.items())} for t, c in by.items()}


def image_features(split: str, n_scenes: int, vision_tower: object, image_processor: object,
                   vision_feature_layer: int = -1, drop_cls: bool = True, batch_size: int = 50,
                   cache: bool = True) -> Any:
    """Vision-tower features ``[n_scenes, N, C]`` of the first `n_scenes` scenes of `split`, cached; see
    `mmcompress.evals.features.tower_features` for the arguments."""
    from mmcompress.evals.features import tower_features

    if split not in SPLIT_SEEDS:
        raise ValueError(f"split: expected one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    return tower_features(
        f"detail_{split}_{n_scenes}", n_scenes,
        lambda a, b: [render(make_scene(SPLIT_SEEDS[split] + i)) for i in range(a, b)],
        vision_tower, image_processor, vision_feature_layer, drop_cls, batch_size, cache,
    )


@register_task("detail")
class DetailTask(Task):
    """The detail benchmark (see the module docstring) on the default question types (colour, shape, exist,
    count); accuracy per question type in the summary's metrics."""

    modality = "image"
    default_split = "test"
    max_new_tokens = 5
    types: tuple[str, ...] = DEFAULT_TYPES

    def samples(self, data=None, split=None, limit=None, seed=0, skip_bad=False) -> list[Sample]:
        if data is not None:
            raise ValueError("data: detail scenes are generated; do not pass --data")
        rows = [r for r in split_questions(split or self.default_split) if r[2] in self.types]
        samples = [Sample(id=i, prompt=q, answer=a, image=lambda s=scene: render(s), meta={"type": t})
                   for i, scene, t, q, a in rows]
        return seeded_subset(samples, limit, seed)

    def score(self, prediction, sample):
        from mmcompress.evals.easyvqa import normalize_answer

        return {"score": float(normalize_answer(prediction) == sample.answer)}

    def aggregate(self, records):
        out = super().aggregate(records)
        by: dict[str, list[float]] = {}
        for r in records:
            by.setdefault(r["meta"]["type"], []).append(float(r["score"]))
        out.update({f"{t}_accuracy": sum(v) / len(v) for t, v in sorted(by.items())})
        return out


@register_task("detail_all")
class DetailAllTask(DetailTask):
    """`detail` with every question type, relation included."""

    types = QUESTION_TYPES


@register_task("detail_relation")
class DetailRelationTask(DetailTask):
    """`detail`'s relation questions only (left / right / above / below)."""

    types = ("relation",)
