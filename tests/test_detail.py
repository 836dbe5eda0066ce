"""`detail` scenes: deterministic, answers correct by construction (re-derived here from the scene description and
from the rendered pixels), balanced answers, objects of 10-30% of the side."""

from __future__ import annotations

import io
import re

from mmcompress.evals import detail as D
from mmcompress.evals.tasks import get_task


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    D.render(D.make_scene(seed)).save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_bytes_and_splits_differ():
    assert png(2_000_003) == png(2_000_003)
    assert png(2_000_003) != png(2_000_004)
    assert D.split_questions("test", 5) == D.split_questions("test", 5)
    assert {q[3] for q in D.split_questions("train", 30)} != {q[3] for q in D.split_questions("test", 30)}


def rederive(scene: D.Scene, qtype: str, question: str) -> str:
    """The answer from the object list alone, written independently of the generator's question logic."""
    objs = scene.objects
    if qtype == "colour":
        shape = re.fullmatch(r"what color is the (\w+)\?", question).group(1)
        (hit,) = [o for o in objs if o.shape == shape]  # unique by construction
        return hit.color
    if qtype == "shape":
        color = re.fullmatch(r"what shape is the (\w+) object\?", question).group(1)
        (hit,) = [o for o in objs if o.color == color]
        return hit.shape
    if qtype == "exist":
        color, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", question).groups()
        return "yes" if any(o.color == color and o.shape == shape for o in objs) else "no"
    if qtype == "count":
        shape = re.fullmatch(r"how many (\w+)s are there\?", question).group(1)
        return str(sum(o.shape == shape for o in objs))
    c1, s1, c2, s2 = re.fullmatch(r"where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", question).groups()
    (a,) = [o for o in objs if (o.color, o.shape) == (c1, s1)]
    (b,) = [o for o in objs if (o.color, o.shape) == (c2, s2)]
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def test_answers_are_correct_by_construction():
    rows = D.split_questions("test", 300)
    assert {t for _, _, t, _, _ in rows} == set(D.QUESTION_TYPES)
    for _, scene, t, q, a in rows:
        assert rederive(scene, t, q) == a, (scene.seed, q, a)


def test_objects_are_drawn_where_described():
    from PIL import Image

    for seed in range(2_000_000, 2_000_020):
        scene = D.make_scene(seed)
        img = D.render(scene)
        assert img.size == (112, 112)
        for o in scene.objects:
            assert 0.1 * 112 - 1e-6 <= 2 * o.r <= 0.3 * 112 + 1e-6
            assert img.getpixel((round(o.x), round(o.y))) == D.COLORS[o.color]  # the centre has the object colour
        assert isinstance(img, Image.Image)


def test_balance_and_size():
    rows = D.split_questions("test")
    assert len(rows) >= 2000
    bal = D.answer_balance(rows)
    for t in ("colour", "shape", "count", "relation"):
        assert max(bal[t].values()) <= 0.27, (t, bal[t])
    assert abs(bal["exist"]["yes"] - 0.5) < 0.05


def test_task_samples_and_per_type_accuracy():
    task = get_task("detail")
    s = task.samples(None, None, 50, seed=0)
    assert len(s) == 50 and len({x.id for x in s}) == 50
    assert s[0].load_image().size == (112, 112)
    recs = [{"meta": x.meta, **task.score(x.answer + ".", x)} for x in s]
    agg = task.aggregate(recs)
    assert agg["accuracy"] == 1.0 and all(agg[f"{t}_accuracy"] == 1.0 for t in {x.meta["type"] for x in s})


def test_train_projector_unfold_inverts_fold():
    """--init-from loads a raw-feature projector into the standardised trainer without changing its outputs."""
    import torch

    from tests.script_module import load_script

    tp = load_script("scripts/train_projector.py")

    class P(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_1, self.linear_2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)

        def forward(self, x):  # [B, N, 6] -> [B, N, 4]
            return self.linear_2(torch.nn.functional.gelu(self.linear_1(x)))

    torch.manual_seed(0)
    raw = P()
    x = torch.randn(2, 3, 6) * 3 + 1  # [B, N, C]
    std = tp.StdProjector(P(), x.mean(dim=(0, 1)), x.std(dim=(0, 1)))
    tp.unfold_into(std, raw.state_dict())
    assert torch.allclose(std(x), raw(x), atol=1e-5)
    back = P()
    back.load_state_dict(std.folded_state_dict())
    assert torch.allclose(back(x), raw(x), atol=1e-5)


def test_question_types_default_all_relation():
    """`detail` asks the default types (no relation); `detail_all` every type; `detail_relation` relation only."""
    types = {name: {s.meta["type"] for s in get_task(name).samples(None, None, None, seed=0)}
             for name in ("detail", "detail_all", "detail_relation")}
    assert types["detail"] == set(D.DEFAULT_TYPES) and "relation" not in types["detail"]
    assert types["detail_all"] == set(D.QUESTION_TYPES)
    assert types["detail_relation"] == {"relation"}
    n = {name: len(get_task(name).samples(None, None, None, seed=0)) for name in types}
    assert n["detail"] + n["detail_relation"] == n["detail_all"] == len(D.split_questions("test"))
