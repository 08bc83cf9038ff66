"""One false-negative rule for the offline miner and the stage-2 loss.

The numpy filter of ``select_negatives`` (:mod:`pipeline.mining.filters`) and the torch
filter of ``hard_negative_loss`` (:mod:`pipeline.losses`), fed the SAME float32 similarity
rows, must drop exactly the same candidates, and those of a plain-Python float64 reference
written here: with s+ the positive's score, a candidate is a false negative if
``sim > s+ + fn_margin`` ("margin", checked first) or ``sim > fn_ratio * s+`` for s+ >= 0,
``sim > (2 - fn_ratio) * s+`` for s+ < 0 ("ratio"); None = off; strict ``>``, in float64.

The rows sit where float32 arithmetic decides otherwise than float64 (pos 0.7, sim 0.8,
margin 0.1: 0.7f + 0.1 = 0.79999998807907 < 0.8f = 0.80000001192093 in float64, dropped,
but 0.7f + 0.1f rounds to 0.8f in float32, a tie, kept), at exact ties (kept), at negative
positives (mirrored ratio), and hold NaN. NaN is never over a threshold (a comparison with
NaN is false): a NaN similarity is kept, a NaN positive score drops nothing in its row.
``test_rows_catch_wrong_rules`` shows that the rows tell each such wrong rule apart.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    _false_negative_drops,
    exceeds_fn_margin,
    exceeds_fn_ratio,
    hard_negative_loss,
)
from pipeline.mining import select_negatives
from pipeline.mining.filters import _filter_masks

F32 = np.float32
NAN, INF = math.nan, math.inf
TINY = float(np.nextafter(F32(0), F32(1)))  # the smallest float32 above 0
VERDICTS = ("margin", "ratio", "kept")
Knobs = tuple[float | None, float | None]  # (fn_margin, fn_ratio)


def _up(x: float) -> float:
    """The next float32 above ``x``."""
    return float(np.nextafter(F32(x), F32(INF)))


# -- the plain reference ------------------------------------------------------------------
def reference_verdict(sim: float, pos: float, fn_margin: float | None, fn_ratio: float | None,
                      *, num: Callable[[float], Any] = float,
                      over: Callable[[Any, Any], bool] = operator.gt,
                      mirror: bool = True) -> str:
    """"margin", "ratio" or "kept" for one candidate, by the first rule that drops it.

    The defaults are THE rule, in Python floats (float64). ``num``, ``over`` and
    ``mirror`` only exist to build wrong rules for ``test_rows_catch_wrong_rules``."""
    sim, pos = num(sim), num(pos)
    if fn_margin is not None and over(sim, pos + num(fn_margin)):
        return "margin"
    if fn_ratio is not None:
        scale = num(fn_ratio) if pos >= 0 or not mirror else num(2 - fn_ratio)
        if over(sim, scale * pos):
            return "ratio"
    return "kept"


def reference_masks(sims: np.ndarray, pos: np.ndarray, knobs: Knobs,
                    **wrong: Any) -> dict[str, np.ndarray]:
    """(R, C) masks per verdict from :func:`reference_verdict`, candidate by candidate."""
    verdicts = np.array([[reference_verdict(float(s), float(p), *knobs, **wrong) for s in row]
                         for row, p in zip(sims, pos, strict=True)])  # (R, C) str
    return {name: verdicts == name for name in VERDICTS}


# -- the two implementations, fed float32 rows as they arrive ------------------------------
def numpy_masks(sims: np.ndarray, pos: np.ndarray, knobs: Knobs) -> dict[str, np.ndarray]:
    """The offline miner: ``_filter_masks`` (what ``select_negatives`` runs), with its drop
    order (a candidate counts for the first filter that drops it). Ids 1..C, distinct keys:
    no candidate is the positive or a duplicate of it."""
    n_rows, n_cols = sims.shape
    ids = np.tile(np.arange(1, n_cols + 1), (n_rows, 1))  # (R, C)
    zeros = np.zeros(n_rows, dtype=np.int64)  # (R,) positive id 0, key 0
    masks = dict(_filter_masks(sims, ids, pos, zeros, np.arange(n_cols + 1), zeros, *knobs,
                               None))
    assert not (masks["self"] | masks["duplicate"] | masks["max_score"]).any()
    margin = masks["margin"]  # (R, C)
    ratio = masks["ratio"] & ~margin  # (R, C)
    return {"margin": margin, "ratio": ratio, "kept": ~(margin | ratio)}


def torch_masks(sims: np.ndarray, pos: np.ndarray, knobs: Knobs) -> dict[str, np.ndarray]:
    """The stage-2 loss: ``_false_negative_drops`` on float32 tensors (all candidates)."""
    candidate = torch.ones(sims.shape, dtype=torch.bool)  # (R, C)
    drops = _false_negative_drops(torch.from_numpy(sims), torch.from_numpy(pos), candidate,
                                  ~candidate, fn_margin=knobs[0], fn_ratio=knobs[1])
    assert not drops["duplicate"].any()
    return {name: drops[name].numpy() for name in VERDICTS}


def assert_one_rule(sims: np.ndarray, pos: np.ndarray, knobs: Knobs) -> None:
    """numpy == torch == reference, mask by mask."""
    assert sims.dtype == pos.dtype == np.float32
    expected = reference_masks(sims, pos, knobs)
    for side, masks in (("numpy", numpy_masks(sims, pos, knobs)),
                        ("torch", torch_masks(sims, pos, knobs))):
        for name in VERDICTS:
            np.testing.assert_array_equal(masks[name], expected[name],
                                          err_msg=f"{side} {name} mask, knobs {knobs}")


# -- the rows -----------------------------------------------------------------------------
# (id, pos, sim, (fn_margin, fn_ratio), verdict, verdict if computed in float32 or None)
HAND = [
    ("margin-f64-over-f32-tie", 0.7, 0.8, (0.1, None), "margin", "kept"),
    ("margin-f64-under-f32-over", -0.5, -0.05, (0.45, None), "kept", "margin"),
    ("margin-exact-tie", 0.5, 0.75, (0.25, None), "kept", "kept"),
    ("margin-ulp-above-tie", 0.5, _up(0.75), (0.25, None), "margin", "margin"),
    ("ratio-f64-over-f32-tie", 0.7, 0.63, (None, 0.9), "ratio", "kept"),
    ("mirrored-f64-over-f32-tie", -0.4, -0.42, (None, 0.95), "ratio", "kept"),
    ("mirrored-f64-under-f32-over", -0.65, -0.78, (None, 0.8), "kept", "ratio"),
    ("ratio-exact-tie", 0.5, 0.75, (None, 1.5), "kept", "kept"),
    ("ratio-ulp-above-tie", 0.5, _up(0.75), (None, 1.5), "ratio", "ratio"),
    ("mirrored-exact-tie", -0.5, -0.625, (None, 0.75), "kept", "kept"),
    ("mirrored-not-scaled", -0.5, -0.5, (None, 0.75), "ratio", "ratio"),  # 0.75 s+ keeps it
    ("zero-positive-tie", 0.0, 0.0, (None, 0.95), "kept", "kept"),
    ("zero-positive-above", 0.0, TINY, (None, 0.95), "ratio", "ratio"),
    ("both-margin-first", 0.5, 0.875, (0.25, 0.75), "margin", "margin"),
    ("both-ratio-only", 0.5, 0.5, (0.25, 0.75), "ratio", "ratio"),
    ("both-off", 0.5, 1.0, (None, None), "kept", "kept"),
    ("infinite-similarity", 0.5, INF, (0.1, None), "margin", "margin"),
    ("nan-similarity", 0.5, NAN, (0.1, 0.95), "kept", "kept"),
    ("nan-positive", NAN, 1.0, (0.1, 0.95), "kept", "kept"),
    ("nan-positive-below", NAN, -1.0, (-0.5, 0.5), "kept", "kept"),
]
SETTINGS: list[Knobs] = [
    (None, None), (0.1, None), (0.25, None), (0.45, None), (-0.05, None), (None, 0.95),
    (None, 0.9), (None, 0.8), (None, 1.5), (None, 0.75), (0.1, 0.95), (0.25, 0.75),
]


def hand_matrix() -> tuple[np.ndarray, np.ndarray]:
    """Every hand-made similarity against every hand-made positive, NaN included."""
    pos = np.array(sorted({p for _, p, *_ in HAND}, key=repr), dtype=F32)  # (R,)
    sims = np.array(sorted({s for _, _, s, *_ in HAND}, key=repr), dtype=F32)  # (C,)
    return np.tile(sims, (pos.size, 1)), pos  # (R, C), (R,)


def boundary_matrix(knobs: Knobs, n_rows: int = 64,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded positives in [-1, 1] with candidates at each active threshold: its float64
    value rounded to float32 and 1-2 ulps either side, and the float32-computed value."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(-1, 1, n_rows).astype(F32)  # (R,)
    pos[:4] = [0.7, -0.4, 0.0, -0.0]
    fn_margin, fn_ratio = knobs
    pos64 = pos.astype(np.float64)  # (R,)
    thresholds = [rng.uniform(-1, 1, n_rows)]  # (R,) a random column, whatever the knobs
    if fn_margin is not None:
        thresholds += [pos64 + fn_margin, pos + F32(fn_margin)]
    if fn_ratio is not None:
        thresholds += [np.where(pos >= 0, fn_ratio * pos64, (2 - fn_ratio) * pos64),
                       np.where(pos >= 0, F32(fn_ratio) * pos, F32(2 - fn_ratio) * pos)]
    columns = []
    for threshold in thresholds:
        value = threshold.astype(F32)  # (R,)
        for _ in range(2):
            value = np.nextafter(value, F32(-INF))
        for _ in range(5):
            columns.append(value)
            value = np.nextafter(value, F32(INF))
    return np.stack(columns, axis=1), pos  # (R, C), (R,)


# -- the tests ----------------------------------------------------------------------------
@pytest.mark.parametrize(("pos", "sim", "knobs", "verdict", "float32_verdict"),
                         [case[1:] for case in HAND], ids=[case[0] for case in HAND])
def test_hand_rows(pos: float, sim: float, knobs: Knobs, verdict: str,
                   float32_verdict: str) -> None:
    pos32, sim32 = F32(pos), F32(sim)
    assert reference_verdict(float(sim32), float(pos32), *knobs) == verdict
    # The precision trap the case is built on: float32 arithmetic would decide this.
    assert reference_verdict(sim32, pos32, *knobs, num=F32) == float32_verdict
    assert_one_rule(np.array([[sim32]]), np.array([pos32]), knobs)


@pytest.mark.parametrize("knobs", SETTINGS, ids=str)
def test_implementations_agree_on_every_row(knobs: Knobs) -> None:
    for sims, pos in (hand_matrix(), boundary_matrix(knobs)):
        assert_one_rule(sims, pos, knobs)


def test_rows_catch_wrong_rules() -> None:
    """Each plausible mistake changes some verdict on the rows above, so an implementation
    that made it would fail ``test_implementations_agree_on_every_row``."""
    wrong_rules = {
        "float32 arithmetic": {"num": F32},
        ">= instead of >": {"over": operator.ge},
        "NaN dropped": {"over": lambda sim, threshold: not sim <= threshold},
        "ratio not mirrored": {"mirror": False},
    }
    for name, wrong in wrong_rules.items():
        caught = [knobs for knobs in SETTINGS for sims, pos in (hand_matrix(),
                                                                 boundary_matrix(knobs))
                  if any((reference_masks(sims, pos, knobs, **wrong)[v]
                          != reference_masks(sims, pos, knobs)[v]).any() for v in VERDICTS)]
        assert caught, f"no row tells apart the wrong rule: {name}"


def test_the_rule_compares_in_float64_only() -> None:
    scores, pos = np.zeros((2, 3)), np.zeros((2, 1))  # float64
    for wrap in (np.asarray, torch.from_numpy):
        for fn in (exceeds_fn_margin, exceeds_fn_ratio):
            assert not fn(wrap(scores), wrap(pos), 0.5).any()
            with pytest.raises(TypeError, match="compares in float64"):
                fn(wrap(scores.astype(F32)), wrap(pos), 0.5)


def unit_with_cosine(cosine: float) -> torch.Tensor:
    """A float32 unit vector (2,) whose float32 cosine to (1, 0) is exactly ``F32(cosine)``
    after the loss's own ``F.normalize``."""
    first = torch.tensor(cosine, dtype=torch.float32)
    second = torch.tensor(math.sqrt(1 - float(first) ** 2), dtype=torch.float32)
    for _ in range(8):  # walk up the float32 grid until the norm rounds to exactly 1
        vector = torch.stack([first, second])  # (2,)
        if F.normalize(vector, dim=-1)[0] == first:
            return vector
        second = torch.nextafter(second, torch.tensor(2.0))
    raise AssertionError(f"no float32 unit vector with cosine {cosine}")


FINITE_HAND = [case for case in HAND if not any(map(math.isnan, case[1:3]))
               and math.isfinite(case[2])]


@pytest.mark.parametrize(("pos", "sim", "knobs", "verdict"),
                         [case[1:5] for case in FINITE_HAND], ids=[c[0] for c in FINITE_HAND])
def test_public_entry_points_agree(pos: float, sim: float, knobs: Knobs, verdict: str) -> None:
    """``select_negatives`` on the scores and ``hard_negative_loss`` on float32 embeddings
    with exactly those cosines count the same drop."""
    fn_margin, fn_ratio = knobs
    counts = select_negatives(np.array([[sim]], dtype=F32), np.array([[1]]),
                              np.array([pos], dtype=F32), np.array([0]), np.arange(2),
                              np.array([0]), num_negatives=1, fn_margin=fn_margin,
                              fn_ratio=fn_ratio).counts
    query = torch.tensor([[1.0, 0.0]])  # (1, 2)
    _, stats = hard_negative_loss(query, unit_with_cosine(pos)[None], pos_keys=None,
                                  neg_emb=unit_with_cosine(sim)[None, None], negatives="mined",
                                  num_hard_negatives=1, fn_margin=fn_margin, fn_ratio=fn_ratio)
    expected = {"margin": (1, 0), "ratio": (0, 1), "kept": (0, 0)}[verdict]
    assert (int(counts["dropped_margin"][0]), int(counts["dropped_ratio"][0])) == expected
    assert (stats.dropped_margin, stats.dropped_ratio) == expected
    assert stats.mean_pos_sim == float(F32(pos))


def test_nan_at_the_public_entry_points() -> None:
    """The rule keeps NaN; the miner refuses NaN scores before it, the loss lets a NaN
    cosine through to a NaN loss (it is not hidden as a false negative)."""
    ids, keys, zero = np.array([[1, 2]]), np.arange(3), np.array([0])
    with pytest.raises(ValueError, match="no nan"):
        select_negatives(np.array([[0.5, NAN]], dtype=F32), ids, np.array([0.5], dtype=F32),
                         zero, keys, zero, num_negatives=1)
    with pytest.raises(ValueError, match="pos_scores must be finite"):
        select_negatives(np.array([[0.5, 0.25]], dtype=F32), ids, np.array([NAN], dtype=F32),
                         zero, keys, zero, num_negatives=1)
    neg = torch.full((1, 1, 2), NAN)  # (1, M, 2) a valid slot with a NaN embedding
    loss, stats = hard_negative_loss(torch.tensor([[1.0, 0.0]]), unit_with_cosine(0.5)[None],
                                     pos_keys=None, neg_emb=neg, negatives="mined",
                                     fn_margin=0.1, fn_ratio=0.95)
    assert (stats.dropped_margin, stats.dropped_ratio, stats.rows_without_negatives) == (0, 0, 0)
    assert math.isnan(loss.item())
