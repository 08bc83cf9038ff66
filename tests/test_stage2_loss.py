"""Stage-2 hard-negative loss: a float64 loop reference for every knob, hand-made edge cases with
exactly representable cosines, two gloo ranks, and the gradient cache."""
from __future__ import annotations

import contextlib
import itertools
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses import (
    HardNegativeStats,
    all_gather_with_grad,
    hard_negative_loss,
    select_hard_negatives,
)
from pipeline.train.grad_cache import full_batch_backward, grad_cache_backward, split_batch
from tests.test_losses import free_port

F64 = torch.float64
ROWS, MINED, DIM = 10, 5, 6


# -- the plain reference ----------------------------------------------------------------------------
def reference_loss(q_emb: Tensor, pos_emb: Tensor, pos_keys: Tensor, neg_emb: Tensor,
                   neg_keys: Tensor, neg_valid: Tensor, *, negatives: str,
                   num_hard_negatives: int, temperature: float, fn_margin: float | None,
                   fn_ratio: float | None, mode: str) -> tuple[Tensor, dict[str, float]]:
    """UniME stage-2 loss with loops per query, in float64, and the audit counts by hand.

    The choice is made on Python floats (``.item()``), so no gradient flows through it; the
    chosen cosines are the autograd tensors themselves."""
    def unit(v: Tensor) -> Tensor:
        return v / v.norm()

    counts = dict.fromkeys(["num_candidates", "dropped_duplicate", "dropped_margin",
                            "dropped_ratio", "rows_with_false_negative", "rows_short",
                            "rows_without_negatives"], 0)
    rows, pos_sims, neg_means, margins = [], [], [], []
    n = q_emb.shape[0]
    for i in range(n):
        q = unit(q_emb[i].double())  # (D,)
        s_pos = q @ unit(pos_emb[i].double())  # ()
        candidates = []  # (cosine, key) in column order: in-batch targets, then mined slots
        if negatives in ("batch", "both"):
            candidates += [(q @ unit(pos_emb[j].double()), int(pos_keys[j]))
                           for j in range(n) if j != i]
        if negatives in ("mined", "both"):
            candidates += [(q @ unit(neg_emb[i, m].double()), int(neg_keys[i, m]))
                           for m in range(neg_emb.shape[1]) if neg_valid[i, m]]
        counts["num_candidates"] += len(candidates)
        if mode == "full_batch":
            negs = [sim for sim, _ in candidates]
        else:
            p = s_pos.item()
            kept, false_negative = [], False
            for sim, key in candidates:
                if key == int(pos_keys[i]):
                    counts["dropped_duplicate"] += 1
                elif fn_margin is not None and sim.item() > p + fn_margin:
                    counts["dropped_margin"] += 1
                    false_negative = True
                elif fn_ratio is not None and sim.item() > (
                        fn_ratio * p if p >= 0 else (2 - fn_ratio) * p):
                    counts["dropped_ratio"] += 1
                    false_negative = True
                else:
                    kept.append(sim)
            counts["rows_with_false_negative"] += false_negative
            counts["rows_short"] += 0 < len(kept) < num_hard_negatives
            ranked = sorted(kept, key=lambda sim: -sim.item())  # stable: ties keep column order
            negs = [ranked[j % len(ranked)] for j in range(num_hard_negatives)] if ranked else []
        counts["rows_without_negatives"] += not negs
        logits = torch.stack([s_pos, *negs]) / temperature  # (1 + k,)
        rows.append(-(logits[0] - torch.log(torch.exp(logits).sum())))
        pos_sims.append(s_pos.item())
        if negs:
            neg_means.append(sum(sim.item() for sim in negs) / len(negs))
            margins.append(s_pos.item() - neg_means[-1])
    counts["mean_pos_sim"] = sum(pos_sims) / n
    counts["mean_neg_sim"] = sum(neg_means) / len(neg_means) if neg_means else math.nan
    counts["mean_margin"] = sum(margins) / len(margins) if margins else math.nan
    return torch.stack(rows).sum() / n, counts


def random_batch(seed: int = 0) -> dict[str, Tensor]:
    """Queries around 3 topics (so in-batch targets compete), positives at growing noise (one
    with a negative cosine), mined negatives at growing noise; shared keys and padding."""
    gen = torch.Generator().manual_seed(seed)
    topics = torch.randn(3, DIM, generator=gen, dtype=F64)  # (3, D)
    q = topics[torch.arange(ROWS) % 3] + 0.7 * torch.randn(ROWS, DIM, generator=gen,
                                                           dtype=F64)  # (B, D)
    pos_noise = torch.linspace(0.3, 1.5, ROWS, dtype=F64)[:, None]  # (B, 1)
    pos = q + pos_noise * torch.randn(ROWS, DIM, generator=gen, dtype=F64)  # (B, D)
    pos[-1] = -q[-1] + 0.5 * torch.randn(DIM, generator=gen, dtype=F64)  # s+ < 0
    neg_noise = torch.linspace(0.4, 1.6, MINED, dtype=F64)[None, :, None]  # (1, M, 1)
    neg = q[:, None] + neg_noise * torch.randn(ROWS, MINED, DIM, generator=gen,
                                               dtype=F64)  # (B, M, D)
    pos_keys = torch.arange(ROWS)  # (B,)
    pos_keys[7] = pos_keys[2]  # two rows share a target content
    neg_keys = 100 + torch.arange(ROWS * MINED).reshape(ROWS, MINED)  # (B, M)
    neg_keys[1, 0], neg_keys[4, 3], neg_keys[7, 1] = pos_keys[1], pos_keys[4], pos_keys[2]
    neg_valid = torch.rand(ROWS, MINED, generator=gen) > 0.25  # (B, M)
    neg_valid[5] = False  # a row without mined negatives
    return {"q_emb": q, "pos_emb": pos, "pos_keys": pos_keys, "neg_emb": neg,
            "neg_keys": neg_keys, "neg_valid": neg_valid}


HARD_KNOBS = [dict(mode="hard_negative", negatives=negatives, fn_margin=margin, fn_ratio=ratio,
                   num_hard_negatives=k)
              for negatives, margin, ratio, k in itertools.product(
                  ["batch", "mined", "both"], [None, 0.1, -0.2], [None, 0.95], [1, 8, 40])]
FULL_KNOBS = [dict(mode="full_batch", negatives=negatives, fn_margin=0.1, fn_ratio=None,
                   num_hard_negatives=8) for negatives in ["batch", "mined", "both"]]


def _knob_id(knobs: dict) -> str:
    return "-".join(f"{value}" for value in knobs.values())


@pytest.mark.parametrize("knobs", HARD_KNOBS + FULL_KNOBS, ids=_knob_id)
def test_matches_reference_value_gradient_and_stats(knobs: dict) -> None:
    batch = random_batch()
    leaves = {name: batch[name].clone().requires_grad_() for name in ("q_emb", "pos_emb",
                                                                        "neg_emb")}
    ref_leaves = {name: batch[name].clone().requires_grad_() for name in leaves}
    keys = {name: batch[name] for name in ("pos_keys", "neg_keys", "neg_valid")}

    loss, stats = hard_negative_loss(leaves["q_emb"], leaves["pos_emb"],
                                     neg_emb=leaves["neg_emb"], temperature=0.02, **keys,
                                     **knobs)
    expected, counts = reference_loss(ref_leaves["q_emb"], ref_leaves["pos_emb"],
                                      neg_emb=ref_leaves["neg_emb"], temperature=0.02, **keys,
                                      **knobs)
    assert loss.dtype == F64
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)
    assert stats.as_dict() == pytest.approx(counts | {"num_queries": ROWS}, rel=1e-9,
                                            nan_ok=True)

    loss.backward()
    expected.backward()
    assert leaves["q_emb"].grad.abs().sum() > 0
    for name, leaf in leaves.items():
        ref_grad = ref_leaves[name].grad
        ours = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        ref = torch.zeros_like(leaf) if ref_grad is None else ref_grad
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


def _stats(**knobs: Any) -> HardNegativeStats:
    return hard_negative_loss(temperature=0.02, **random_batch(), **knobs)[1]


def test_random_batch_exercises_every_rule() -> None:
    """The reference comparison only proves something for rules the data actually trigger."""
    both = _stats(fn_margin=0.1, fn_ratio=0.95, num_hard_negatives=8)
    assert both.dropped_duplicate >= 3 and both.dropped_margin > 0 and both.dropped_ratio > 0
    assert both.rows_short > 0
    mined = _stats(negatives="mined", fn_margin=-0.2, num_hard_negatives=8)
    assert mined.rows_without_negatives >= 2 and mined.rows_short > 0
    batch = _stats(negatives="batch", fn_margin=None, num_hard_negatives=40)
    assert batch.rows_short == ROWS and batch.rows_without_negatives == 0
    assert random_batch()["pos_emb"][-1] @ random_batch()["q_emb"][-1] < 0


def test_gradcheck_hard_negative() -> None:
    batch = random_batch(seed=1)
    keys = {name: batch[name] for name in ("pos_keys", "neg_keys", "neg_valid")}
    inputs = tuple(batch[name].clone().requires_grad_() for name in ("q_emb", "pos_emb",
                                                                     "neg_emb"))
    assert torch.autograd.gradcheck(
        lambda q, pos, neg: hard_negative_loss(q, pos, neg_emb=neg, temperature=0.1,
                                               num_hard_negatives=4, **keys)[0], inputs)


def test_low_precision_inputs_give_float32_loss() -> None:
    batch = random_batch()
    loss, _ = hard_negative_loss(batch["q_emb"].bfloat16(), batch["pos_emb"].half(),
                                 pos_keys=batch["pos_keys"], neg_emb=batch["neg_emb"].bfloat16(),
                                 neg_keys=batch["neg_keys"], neg_valid=batch["neg_valid"])
    expected, _ = hard_negative_loss(**batch)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=0.1, atol=0.1)


def test_full_batch_is_in_batch_cross_entropy_and_ignores_filters() -> None:
    batch = random_batch()
    q, pos = F.normalize(batch["q_emb"], dim=-1), F.normalize(batch["pos_emb"], dim=-1)
    expected = F.cross_entropy(q @ pos.T / 0.02, torch.arange(ROWS))
    loss, stats = hard_negative_loss(batch["q_emb"], batch["pos_emb"], pos_keys=batch["pos_keys"],
                                     negatives="batch", mode="full_batch", fn_margin=-0.2,
                                     fn_ratio=0.95, num_hard_negatives=1)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert stats.dropped_duplicate == stats.dropped_margin == stats.dropped_ratio == 0
    assert stats.num_candidates == ROWS * (ROWS - 1) and stats.rows_short == 0


# -- hand-made cases with exactly representable cosines ---------------------------------------------
# 16-d vectors of +-0.25 are unit vectors, and every dot product is a multiple of 1/8 computed
# exactly in float32 and float64; QUERY . unit_at(c) = c.
HAND_DIM = 16
QUERY = torch.full((HAND_DIM,), 0.25, dtype=F64)


def unit_at(cosine: float) -> Tensor:
    """A unit vector with cosine exactly ``cosine`` (a multiple of 1/8) to QUERY."""
    agree = round((cosine + 1) * 8)
    assert agree / 8 - 1 == cosine
    return torch.tensor([0.25] * agree + [-0.25] * (HAND_DIM - agree), dtype=F64)


def mined_case(pos_cos: list[float], neg_cos: list[list[float]],
               dtype: torch.dtype = F64) -> dict[str, Tensor]:
    """Rows with query QUERY, positive at ``pos_cos[i]``, mined negatives at ``neg_cos[i]``
    (``nan`` = a padded slot, filled with NaN), distinct keys."""
    n, m = len(pos_cos), max(len(row) for row in neg_cos)
    neg = torch.full((n, m, HAND_DIM), math.nan, dtype=F64)  # (B, M, D)
    valid = torch.zeros(n, m, dtype=torch.bool)  # (B, M)
    for i, row in enumerate(neg_cos):
        for j, cosine in enumerate(row):
            if not math.isnan(cosine):
                neg[i, j], valid[i, j] = unit_at(cosine), True
    return {"q_emb": QUERY.repeat(n, 1).to(dtype),
            "pos_emb": torch.stack([unit_at(c) for c in pos_cos]).to(dtype),
            "pos_keys": torch.arange(n), "neg_emb": neg.to(dtype),
            "neg_keys": 100 + torch.arange(n * m).reshape(n, m), "neg_valid": valid}


def infonce(pos_sim: Tensor, neg_sims: list[Tensor], temperature: float = 0.02) -> Tensor:
    """-log(e^{s+/tau} / (e^{s+/tau} + sum_n e^{s_n/tau})), written out."""
    denominator = torch.exp(pos_sim / temperature) + sum(torch.exp(s / temperature)
                                                         for s in neg_sims)
    return -(pos_sim / temperature - torch.log(denominator))


def test_select_repeats_cyclically_in_rank_order() -> None:
    scores = torch.tensor([[0.25, 0.0, 0.375, 0.9, 0.375],
                           [0.1, 0.2, 0.3, 0.4, 0.5],
                           [0.5, 0.5, 0.5, 0.5, 0.5]])  # (3, 5)
    keep = torch.tensor([[True, True, True, False, False],
                         [False] * 5,
                         [True] * 5])  # (3, 5)
    indices, num_kept = select_hard_negatives(scores, keep, 8)
    assert indices[0].tolist() == [2, 0, 1, 2, 0, 1, 2, 0]
    assert indices[2].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]  # ties: lower column first
    assert num_kept.tolist() == [3, 0, 5]
    indices, _ = select_hard_negatives(scores, keep, 2)
    assert indices[0].tolist() == [2, 0]


def test_fewer_than_k_left_repeats_in_the_loss() -> None:
    case = mined_case([0.5], [[0.25, 0.0, 0.375, 0.875]])  # 0.875 > 0.5 + 0.1: dropped
    neg = case.pop("neg_emb").requires_grad_()
    loss, stats = hard_negative_loss(neg_emb=neg, num_hard_negatives=8, **case)
    ref_neg = neg.detach().clone().requires_grad_()
    sims = F.normalize(ref_neg[0], dim=-1) @ QUERY  # (4,) the loss normalises its inputs
    expected = infonce(torch.tensor(0.5, dtype=F64), [sims[j] for j in [2, 0, 1, 2, 0, 1, 2, 0]])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(neg.grad, ref_neg.grad, rtol=1e-9, atol=1e-12)
    assert neg.grad[0, 3].abs().sum() == 0  # the false negative gets no gradient
    assert stats.rows_short == 1 and stats.dropped_margin == 1
    assert stats.mean_neg_sim == pytest.approx((3 * 0.375 + 3 * 0.25 + 0) / 8)


def test_row_with_no_candidate_left_contributes_zero() -> None:
    case = mined_case([0.5, 0.5], [[0.75, 0.875], [0.25, math.nan]])
    q = case.pop("q_emb").requires_grad_()
    loss, stats = hard_negative_loss(q, negatives="mined", fn_margin=0.1, **case)
    expected = infonce(torch.tensor(0.5, dtype=F64), [torch.tensor(0.25, dtype=F64)] * 8) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    assert q.grad[0].abs().sum() == 0 and q.grad[1].abs().sum() > 0
    assert stats.rows_without_negatives == 1 and stats.dropped_margin == 2
    assert stats.rows_with_false_negative == 1 and stats.rows_short == 1


def test_no_candidate_at_all_gives_zero_loss() -> None:
    q = unit_at(0.5)[None].requires_grad_()  # (1, D): a batch of one has no in-batch negative
    loss, stats = hard_negative_loss(q, QUERY[None], pos_keys=torch.zeros(1, dtype=torch.long),
                                     negatives="batch")
    loss.backward()
    assert loss.item() == 0 and q.grad.abs().sum() == 0
    assert stats.num_candidates == 0 and stats.rows_without_negatives == 1
    assert math.isnan(stats.mean_neg_sim) and math.isnan(stats.mean_margin)
    case = mined_case([0.5], [[math.nan, math.nan]])  # every mined slot padded
    loss, stats = hard_negative_loss(negatives="mined", mode="full_batch", **case)
    assert loss.item() == 0 and stats.rows_without_negatives == 1


def test_duplicate_of_the_positive_is_never_chosen() -> None:
    # Mined: a copy of the positive (its key) at the top score, inside the margin.
    case = mined_case([0.5], [[0.5, 0.25, 0.0]])
    case["neg_keys"][0, 0] = case["pos_keys"][0]
    loss, stats = hard_negative_loss(num_hard_negatives=1, **case)
    expected = infonce(torch.tensor(0.5, dtype=F64), [torch.tensor(0.25, dtype=F64)])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert stats.dropped_duplicate == 1
    # In-batch: rows 0 and 1 have the same target content (key 7); all queries are QUERY.
    targets = torch.stack([unit_at(0.5), unit_at(0.5), unit_at(0.25)])  # (3, D)
    loss, stats = hard_negative_loss(QUERY.repeat(3, 1), targets,
                                     pos_keys=torch.tensor([7, 7, 8]), negatives="batch",
                                     num_hard_negatives=1)
    # Rows 0 and 1 take target 2 (0.25); row 2 (s+ 0.25) loses both 0.5 targets to the margin.
    torch.testing.assert_close(loss, 2 * expected / 3, rtol=1e-12, atol=0)
    assert (stats.dropped_duplicate, stats.dropped_margin, stats.rows_without_negatives) == (
        2, 2, 1)


def test_padded_slots_are_never_chosen_and_get_no_gradient() -> None:
    case = mined_case([0.5], [[math.nan, 0.0, math.nan]])
    case["neg_emb"][0, 2] = unit_at(0.375)  # a padded slot with a high, finite score
    neg = case.pop("neg_emb").requires_grad_()
    for mode in ("hard_negative", "full_batch"):
        neg.grad = None
        loss, stats = hard_negative_loss(neg_emb=neg, num_hard_negatives=2, mode=mode, **case)
        n_slots = 2 if mode == "hard_negative" else 1
        expected = infonce(torch.tensor(0.5, dtype=F64), [torch.tensor(0.0, dtype=F64)] * n_slots)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
        loss.backward()
        assert torch.isfinite(neg.grad).all() and neg.grad[0, 1].abs().sum() > 0
        assert neg.grad[0, 0].abs().sum() == 0 and neg.grad[0, 2].abs().sum() == 0
        assert stats.num_candidates == 1


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("pos_cos", "cand_cos", "knobs", "dropped"), [
    (0.5, 0.75, {"fn_margin": 0.25}, 0),  # exactly at s+ + margin: kept
    (0.5, 0.75, {"fn_margin": 0.25 - 2 ** -20}, 1),  # just above: dropped
    (0.5, 0.75, {"fn_margin": None, "fn_ratio": 1.5}, 0),  # exactly at ratio * s+: kept
    (0.5, 0.75, {"fn_margin": None, "fn_ratio": 1.5 - 2 ** -20}, 1),
    (-0.5, -0.625, {"fn_margin": None, "fn_ratio": 0.75}, 0),  # s+ < 0: threshold 1.25 * s+
    (-0.5, -0.5, {"fn_margin": None, "fn_ratio": 0.75}, 1),  # (0.75 * s+ would keep it)
])
def test_threshold_edges(dtype: torch.dtype, pos_cos: float, cand_cos: float, knobs: dict,
                         dropped: int) -> None:
    case = mined_case([pos_cos], [[cand_cos]], dtype=dtype)
    _, stats = hard_negative_loss(**case, **knobs)
    assert stats.dropped_margin + stats.dropped_ratio == dropped
    assert stats.rows_without_negatives == dropped


def test_stats_match_hand_counts() -> None:
    """Three queries (all QUERY) with targets at 0.75 / 0.5 / 0.25 and mined negatives;
    margin 0.1, ratio 0.95, k = 3. By hand:
    row 0 (s+ .75): batch .5 .25, mined .625 (duplicate) 0 -> kept .5 .25 0 (full k)
    row 1 (s+ .5):  batch .75 .25, mined .875 .5 -.25 -> margin .75 .875, ratio .5 (> .475),
                    kept .25 -.25 -> slots .25 -.25 .25 (short)
    row 2 (s+ .25): batch .75 .5 (margin, first rule), mined all padded -> none."""
    case = mined_case([0.75, 0.5, 0.25], [[0.625, 0.0, math.nan], [0.875, 0.5, -0.25],
                                          [math.nan] * 3])
    case["neg_keys"][0, 0] = case["pos_keys"][0]
    loss, stats = hard_negative_loss(fn_margin=0.1, fn_ratio=0.95, num_hard_negatives=3, **case)
    row_means = [0.25, 0.25 / 3]
    assert stats.as_dict() == pytest.approx({
        "num_queries": 3, "num_candidates": 4 + 5 + 2, "dropped_duplicate": 1,
        "dropped_margin": 4, "dropped_ratio": 1, "rows_with_false_negative": 2,
        "rows_short": 1, "rows_without_negatives": 1, "mean_pos_sim": 0.5,
        "mean_neg_sim": sum(row_means) / 2,
        "mean_margin": ((0.75 - row_means[0]) + (0.5 - row_means[1])) / 2}, rel=1e-12)
    for key in ("num_candidates", "dropped_margin", "rows_short"):
        assert isinstance(stats.as_dict()[key], int)
    t = [torch.tensor(c, dtype=F64) for c in (0.75, 0.5, 0.25, 0.0, -0.25)]
    expected = (infonce(t[0], [t[1], t[2], t[3]]) + infonce(t[1], [t[2], t[4], t[2]])) / 3
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"negatives": "all"}, "unknown negatives"),
    ({"mode": "infonce"}, "unknown mode"),
    ({"num_hard_negatives": 0}, "num_hard_negatives"),
    ({"temperature": 0.0}, "temperature"),
    ({"fn_ratio": 0.0}, "fn_ratio"),
    ({"neg_emb": None}, "needs neg_emb"),
    ({"neg_keys": None}, "neg_keys"),
    ({"neg_valid": torch.ones(ROWS, MINED)}, "neg_valid"),
    ({"pos_keys": torch.arange(ROWS - 1)}, "pos_keys"),
    ({"pos_emb": torch.zeros(ROWS, DIM + 1)}, "same shape"),
    ({"neg_emb": torch.zeros(ROWS, MINED, DIM + 1)}, "neg_emb must have shape"),
])
def test_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hard_negative_loss(**(random_batch() | kwargs))


def test_batch_negatives_need_no_mined_inputs_and_keys_can_be_off() -> None:
    batch = random_batch()
    loss, stats = hard_negative_loss(batch["q_emb"], batch["pos_emb"], pos_keys=None,
                                     negatives="batch")
    assert torch.isfinite(loss) and stats.dropped_duplicate == 0
    _, with_keys = hard_negative_loss(batch["q_emb"], batch["pos_emb"],
                                      pos_keys=batch["pos_keys"], negatives="batch")
    assert with_keys.dropped_duplicate == 2  # rows 2 and 7 share a key


# -- two gloo ranks ---------------------------------------------------------------------------------
WORLD_SIZE, FEATURES = 2, 7
STAGE2_KNOBS = dict(negatives="both", num_hard_negatives=4, temperature=0.05, fn_margin=0.1,
                    fn_ratio=0.95)


def make_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, DIM)).double()


def feature_batch(seed: int = 3) -> dict[str, Tensor]:
    """Input features of ROWS examples: x_q (B, F), x_pos (B, F), x_neg (B, M, F) + keys."""
    gen = torch.Generator().manual_seed(seed)
    x_q = torch.randn(ROWS, FEATURES, generator=gen, dtype=F64)  # (B, F)
    x_pos = x_q + 0.8 * torch.randn(ROWS, FEATURES, generator=gen, dtype=F64)  # (B, F)
    x_neg = x_q[:, None] + torch.randn(ROWS, MINED, FEATURES, generator=gen, dtype=F64)
    keys = {name: random_batch()[name] for name in ("pos_keys", "neg_keys", "neg_valid")}
    return {"x_q": x_q, "x_pos": x_pos, "x_neg": x_neg, **keys}


def flat_items(batch: dict[str, Tensor], rows: slice) -> Tensor:
    """One rank's flat list of inputs: [x_q; x_pos; x_neg row-major], (n (2 + M), F)."""
    return torch.cat([batch["x_q"][rows], batch["x_pos"][rows],
                      batch["x_neg"][rows].reshape(-1, FEATURES)])


def split_ranks(global_emb: Tensor, world_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Plain slicing of a gathered ``cat_r [q_r; pos_r; neg_r row-major]`` (each rank's
    ``flat_items`` embedded): q (B, D), pos (B, D), neg (B, M, D) in rank order."""
    n = ROWS // world_size
    ranks = global_emb.reshape(world_size, n * (2 + MINED), -1)  # (W, n (2 + M), D)
    q = ranks[:, :n].reshape(ROWS, -1)  # (B, D)
    pos = ranks[:, n:2 * n].reshape(ROWS, -1)  # (B, D)
    neg = ranks[:, 2 * n:].reshape(ROWS, MINED, -1)  # (B, M, D)
    return q, pos, neg


def stage2_loss_fn(batch: dict[str, Tensor], world_size: int):
    """``loss_fn(global_emb)`` for a global batch gathered from ``world_size`` ranks (ranks hold
    consecutive rows, so the gathered keys are the batch's own)."""
    def loss_fn(global_emb: Tensor) -> Tensor:
        q, pos, neg = split_ranks(global_emb, world_size)
        return hard_negative_loss(q, pos, pos_keys=batch["pos_keys"], neg_emb=neg,
                                  neg_keys=batch["neg_keys"], neg_valid=batch["neg_valid"],
                                  **STAGE2_KNOBS)[0]

    return loss_fn


def _rank_rows(world_size: int) -> list[slice]:
    n = ROWS // world_size
    return [slice(r * n, (r + 1) * n) for r in range(world_size)]


def full_batch_reference() -> tuple[Tensor, HardNegativeStats, Tensor, dict[str, Tensor]]:
    """One process, no gather: loss, stats, d loss / d inputs and d loss / d weights."""
    batch = feature_batch()
    model = make_encoder()
    x_q, x_pos, x_neg = (batch[name].clone().requires_grad_() for name in ("x_q", "x_pos",
                                                                          "x_neg"))
    loss, stats = hard_negative_loss(model(x_q), model(x_pos), neg_emb=model(x_neg),
                                     pos_keys=batch["pos_keys"], neg_keys=batch["neg_keys"],
                                     neg_valid=batch["neg_valid"], **STAGE2_KNOBS)
    loss.backward()
    input_grads = torch.cat([x_q.grad[:, None], x_pos.grad[:, None], x_neg.grad], dim=1)
    return loss.detach(), stats, input_grads, {n: p.grad for n, p in model.named_parameters()}


def _stage2_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        batch = feature_batch()
        rows = _rank_rows(world_size)[rank]
        n = ROWS // world_size
        model = make_encoder()
        items = flat_items(batch, rows).requires_grad_()  # (n (2 + M), F)
        global_emb = all_gather_with_grad(model(items))  # (W n (2 + M), D)
        q, pos, neg = split_ranks(global_emb, world_size)  # (B, D), (B, D), (B, M, D)
        # Keys and validity travel through the same gather (as integers), then plain slicing.
        local_meta = torch.cat([batch["pos_keys"][rows], batch["neg_keys"][rows].flatten()])
        meta = all_gather_with_grad(local_meta).reshape(world_size, n * (1 + MINED))  # (W, .)
        pos_keys = meta[:, :n].reshape(ROWS)  # (B,)
        neg_keys = meta[:, n:].reshape(ROWS, MINED)  # (B, M)
        local_valid = batch["neg_valid"][rows].flatten().long()  # gloo: no bool gather
        neg_valid = all_gather_with_grad(local_valid).reshape(ROWS, MINED)  # (B, M)
        loss, stats = hard_negative_loss(q, pos, pos_keys=pos_keys, neg_emb=neg,
                                         neg_keys=neg_keys, neg_valid=neg_valid.bool(),
                                         **STAGE2_KNOBS)
        loss.backward()
        # Control: the naive split reads [all q; all pos; all neg], which is not the layout.
        naive = global_emb.detach()
        naive_loss, _ = hard_negative_loss(
            naive[:ROWS], naive[ROWS:2 * ROWS], neg_emb=naive[2 * ROWS:].reshape(ROWS, MINED, -1),
            pos_keys=pos_keys, neg_keys=neg_keys, neg_valid=neg_valid.bool(), **STAGE2_KNOBS)
        torch.save({"loss": loss.detach(), "stats": stats.as_dict(), "items_grad": items.grad,
                    "weight_grads": {k: p.grad for k, p in model.named_parameters()},
                    "naive_loss": naive_loss}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("stage2_gloo")
    mp.spawn(_stage2_worker, args=(WORLD_SIZE, free_port(), str(out_dir)), nprocs=WORLD_SIZE,
             join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_two_ranks_equal_the_single_process_full_batch(gloo_results: list[dict]) -> None:
    loss, stats, input_grads, weight_grads = full_batch_reference()  # (B, 2 + M, F) grads
    n = ROWS // WORLD_SIZE
    for rank, result in enumerate(gloo_results):
        torch.testing.assert_close(result["loss"], loss, rtol=1e-12, atol=1e-14)
        assert result["stats"] == pytest.approx(stats.as_dict(), rel=1e-12)
        local = input_grads[rank * n:(rank + 1) * n]  # (n, 2 + M, F)
        expected = torch.cat([local[:, 0], local[:, 1], local[:, 2:].reshape(-1, FEATURES)])
        assert result["items_grad"].abs().sum() > 0
        torch.testing.assert_close(result["items_grad"], expected, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(result["naive_loss"], loss)
    # Each rank's weight gradient covers only its rows: their sum (= W x DeepSpeed's average,
    # the grad cache's world-size factor) is the full-batch gradient.
    for name, grad in weight_grads.items():
        summed = sum(result["weight_grads"][name] for result in gloo_results)
        torch.testing.assert_close(summed, grad, rtol=1e-10, atol=1e-12)
        one_rank = gloo_results[0]["weight_grads"][name]
        assert not torch.allclose(one_rank, grad)


# -- the gradient cache -----------------------------------------------------------------------------
class StubEngine:
    """The engine surface grad_cache uses, on a plain module (as tests/test_grad_cache.py)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.dp_world_size = 1

    def __call__(self, items: Tensor) -> Tensor:
        return self.module(items)

    def backward(self, loss: Tensor, retain_graph: bool = False,
                 scale_wrt_gas: bool = True) -> Tensor:
        loss.backward(retain_graph=retain_graph)
        return loss

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        pass

    def coalesce_grad_reduction(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@pytest.mark.parametrize("chunk_size", [1, 4, 7, ROWS * (2 + MINED)])
def test_grad_cache_equals_full_batch(chunk_size: int) -> None:
    """Chunks of the flat item list (straddling q / pos / neg) give the full-batch gradient."""
    batch = feature_batch()
    items = flat_items(batch, slice(None))  # (B (2 + M), F)
    loss_fn = stage2_loss_fn(batch, world_size=1)
    loss, _, _, expected = full_batch_reference()

    plain = StubEngine(make_encoder())
    plain_loss = full_batch_backward(plain, items, plain, loss_fn)
    cached = StubEngine(make_encoder())
    cached_loss = grad_cache_backward(cached, split_batch(items, chunk_size), cached, loss_fn)
    torch.testing.assert_close(plain_loss, loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cached_loss, loss, rtol=1e-12, atol=1e-14)
    for name, param in cached.module.named_parameters():
        assert param.grad.abs().sum() > 0
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(dict(plain.module.named_parameters())[name].grad,
                                   expected[name], rtol=1e-5, atol=1e-12)
