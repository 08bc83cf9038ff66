"""UniME losses and the gradient-preserving gather: tensors in, tensors out.

No Ray, no files, no configs: every function here is a pure function of its tensor
arguments (plus the ``torch.distributed`` default group for the gather), so it can be
tested against plain float64 references.

- Stage 1, textual discriminative knowledge distillation: :func:`distillation_loss`.
- Stage 2, hard-negative enhanced instruction tuning: :func:`hard_negative_loss` (with
  :func:`select_hard_negatives`), and its false-negative rule :func:`exceeds_fn_margin` /
  :func:`exceeds_fn_ratio`, written with operators only so that the offline miner
  (:mod:`pipeline.mining.filters`) applies the very same functions to numpy arrays.
- Global batches across data-parallel ranks: :func:`all_gather_with_grad`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, TypeVar, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

DistillDirection = Literal["student||teacher", "teacher||student"]
Reduction = Literal["sum", "mean", "batchmean"]

DISTILL_DIRECTIONS: tuple[str, ...] = get_args(DistillDirection)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


# -- Stage 1: distillation ------------------------------------------------------------------------
def similarity_log_probs(emb: Tensor, *, temperature: float, mask_self: bool) -> Tensor:
    """Row-wise log-softmax of in-batch cosine similarities: ``log P = log_softmax(S S^T / tau)``.

    ``S`` is ``emb`` L2-normalised row by row. With ``mask_self`` the diagonal
    (self-similarity) is excluded from every row's distribution: its logit is ``-inf``
    and its log-probability is returned as ``-inf`` (probability exactly 0).
    """
    unit = F.normalize(emb, dim=-1)  # (n, d)
    logits = unit @ unit.T / temperature  # (n, n)
    if mask_self:
        eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)  # (n, n)
        logits = logits.masked_fill(eye, float("-inf"))  # (n, n)
    return F.log_softmax(logits, dim=-1)  # (n, n)


def distillation_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    *,
    temperature: float = 0.05,
    direction: DistillDirection = "student||teacher",
    mask_self: bool = True,
    reduction: Reduction = "sum",
) -> Tensor:
    """UniME stage-1 loss: KL divergence between in-batch similarity distributions.

    For n texts with student embeddings ``S_s`` (n, d_s) and teacher embeddings ``S_t``
    (n, d_t), both L2-normalised here (the dimensions may differ: only the n x n
    similarity matrices are compared)::

        P_s = softmax(S_s S_s^T / tau)   P_t = softmax(S_t S_t^T / tau)   (row-wise)
        L   = sum_i KL(P_s[i] || P_t[i]),   KL(p || q) = sum_j p_j (log p_j - log q_j)

    which is the loss as printed in the UniME paper (``direction="student||teacher"``);
    ``"teacher||student"`` gives ``sum_i KL(P_t[i] || P_s[i])``, the form most
    distillation code uses. With ``mask_self`` the diagonal is left out of every row's
    softmax (entries of probability 0 contribute exactly 0, never NaN).

    ``reduction`` over the n per-row divergences: ``"sum"`` (the paper's equation),
    ``"mean"`` (sum / n), or ``"batchmean"`` - an alias of ``"mean"``, named after
    ``F.kl_div(reduction="batchmean")``, which is the same sum / n. (``F.kl_div``'s own
    ``"mean"``, sum / n^2, is deliberately not offered: it is not a KL divergence.)

    The teacher side is detached: no gradient flows into ``teacher_emb``. The softmaxes
    run in float32 at least (float64 if either input is), so the loss of bf16/fp16
    embeddings is a float32 scalar.
    """
    if direction not in DISTILL_DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DISTILL_DIRECTIONS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_emb.ndim != 2 or teacher_emb.ndim != 2:
        raise ValueError(f"expected 2-d embeddings, got student {tuple(student_emb.shape)} "
                         f"and teacher {tuple(teacher_emb.shape)}")
    n = student_emb.shape[0]
    if teacher_emb.shape[0] != n:
        raise ValueError(f"student has {n} rows but teacher has {teacher_emb.shape[0]}")
    if mask_self and n < 2:
        raise ValueError("mask_self needs at least 2 rows: a single row has nothing to compare to")

    # Softmaxes in float32 at least (bf16/fp16 embeddings), float64 when either input is.
    dtype = torch.promote_types(torch.promote_types(student_emb.dtype, teacher_emb.dtype),
                                torch.float32)
    log_p_s = similarity_log_probs(student_emb.to(dtype), temperature=temperature,
                                   mask_self=mask_self)  # (n, n)
    log_p_t = similarity_log_probs(teacher_emb.detach().to(dtype), temperature=temperature,
                                   mask_self=mask_self)  # (n, n)
    if direction == "student||teacher":
        log_p, log_q = log_p_s, log_p_t  # (n, n), (n, n)
    else:
        log_p, log_q = log_p_t, log_p_s  # (n, n), (n, n)
    if mask_self:
        # Masked entries have p = 0 and log p = log q = -inf: set both logs to 0 so that the
        # term is 0 * 0 = 0 (and its gradient 0) instead of 0 * (-inf + inf) = NaN.
        eye = torch.eye(n, dtype=torch.bool, device=log_p.device)  # (n, n)
        log_p = log_p.masked_fill(eye, 0.0)  # (n, n)
        log_q = log_q.masked_fill(eye, 0.0)  # (n, n)
    kl_rows = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (n,)
    return kl_rows.sum() if reduction == "sum" else kl_rows.mean()  # ()


# -- Stage 2: hard-negative InfoNCE ---------------------------------------------------------------
NegativeSource = Literal["batch", "mined", "both"]
Stage2Mode = Literal["hard_negative", "full_batch"]

NEGATIVE_SOURCES: tuple[str, ...] = get_args(NegativeSource)
STAGE2_MODES: tuple[str, ...] = get_args(Stage2Mode)


@dataclass(frozen=True)
class HardNegativeStats:
    """Per-step audit of :func:`hard_negative_loss` over the global batch, as Python numbers.

    Candidates are counted once, by the first rule that drops them, in the order
    duplicate -> margin -> ratio (as in :mod:`pipeline.mining.filters`), so
    ``num_candidates = dropped_duplicate + dropped_margin + dropped_ratio + kept`` where
    kept is the candidates left for the top-k. ``full_batch`` drops nothing (all 0).

    - ``num_candidates``: (query, candidate) pairs before the filters: every in-batch
      target but the query's own positive and/or every valid mined slot of its row.
    - ``dropped_duplicate``: candidates with the positive's content key.
    - ``dropped_margin`` / ``dropped_ratio``: false negatives by ``fn_margin`` / ``fn_ratio``.
    - ``rows_with_false_negative``: queries with at least one margin or ratio drop (the
      paper reports 22.9% of samples at beta = 0.1).
    - ``rows_short``: queries with 0 < kept < k (their negatives are repeated);
      ``rows_without_negatives``: queries with nothing kept (loss 0). Disjoint counts.
    - ``mean_pos_sim``: mean cosine ``q . pos`` over all queries.
    - ``mean_neg_sim``: mean over the queries that have negatives of the mean cosine of
      their negative slots (the k chosen, repeats included; all candidates in
      ``full_batch``); ``mean_margin``: the same mean of ``q . pos - that row mean``.
      Both are NaN when no query has a negative.
    """

    num_queries: int
    num_candidates: int
    dropped_duplicate: int
    dropped_margin: int
    dropped_ratio: int
    rows_with_false_negative: int
    rows_short: int
    rows_without_negatives: int
    mean_pos_sim: float
    mean_neg_sim: float
    mean_margin: float

    def as_dict(self) -> dict[str, int | float]:
        """The fields as a flat dict, e.g. for a metrics logger."""
        return asdict(self)


# The false-negative rule, shared with the offline miner: plain operators only (no torch.where,
# no np.where), so the same two functions decide on torch tensors here and on numpy arrays in
# pipeline.mining.filters, bit for bit.
Scores = TypeVar("Scores")  # a float64 torch tensor or numpy array
_FLOAT64 = ("float64", "torch.float64")  # str(dtype) of numpy's and torch's float64


def exceeds_fn_margin(scores: Scores, pos_scores: Scores, fn_margin: float) -> Scores:
    """UniME's false-negative margin (beta): the bool mask ``scores > pos_scores + fn_margin``.

    ``scores`` (Q, C) and ``pos_scores`` (Q, 1): float64 torch tensors or numpy arrays
    (float32 raises: it rounds ``pos + fn_margin`` differently, e.g. pos 0.7f, sim 0.8f,
    margin 0.1 is over the margin in float64 but a tie in float32). Strict ``>``: a score
    exactly at ``pos + fn_margin`` is kept. NaN is never over a threshold (any comparison
    with NaN is false): a NaN score is kept and a NaN positive score drops nothing in its
    row. The rule is no NaN filter: :func:`pipeline.mining.filters.select_negatives`
    rejects NaN scores up front, :func:`hard_negative_loss` lets a NaN cosine reach the loss.
    """
    _require_float64(scores, pos_scores)
    return scores > pos_scores + fn_margin  # (Q, C)


def exceeds_fn_ratio(scores: Scores, pos_scores: Scores, fn_ratio: float) -> Scores:
    """Positive-aware false-negative ratio (NV-Retriever): the bool mask ``scores > t`` with
    ``t = fn_ratio * pos`` for ``pos >= 0`` and ``t = (2 - fn_ratio) * pos`` for ``pos < 0``.

    The mirrored threshold (= ``pos - |pos| * (1 - fn_ratio)`` in exact arithmetic) stays
    below a negative positive score, as sentence-transformers' ``relative_margin``; -0.0
    counts as ``>= 0``. Inputs, strict ``>`` and NaN as in :func:`exceeds_fn_margin`.
    """
    _require_float64(scores, pos_scores)
    non_negative = pos_scores >= 0  # (Q, 1) False for NaN
    over_scaled = scores > fn_ratio * pos_scores  # (Q, C)
    over_mirrored = scores > (2.0 - fn_ratio) * pos_scores  # (Q, C)
    return (non_negative & over_scaled) | (~non_negative & over_mirrored)  # (Q, C)


def _require_float64(*arrays: Scores) -> None:
    """The rule compares in float64 only, so both callers round alike."""
    for array in arrays:
        if str(array.dtype) not in _FLOAT64:
            raise TypeError(f"the false-negative rule compares in float64, got {array.dtype}; "
                            "cast first (.double() / .astype(np.float64))")


def select_hard_negatives(scores: Tensor, keep: Tensor,
                          num_hard_negatives: int) -> tuple[Tensor, Tensor]:
    """Column indices of the k best kept candidates per row, repeated cyclically if short.

    Row i has ``r_i = keep[i].sum()`` kept candidates; ranked by score (descending, ties
    to the lower column) they are ``c_0 .. c_{r_i - 1}``, and the row's k slots are
    ``c_{j mod r_i}`` for j = 0..k-1 (UniME: "if fewer than k remain, repeat existing
    ones"), e.g. r = 3, k = 8 -> c0 c1 c2 c0 c1 c2 c0 c1. A row with r_i = 0 gets column
    0 in every slot: the caller must mask it. The choice is made on detached scores under
    ``no_grad``: the result is integer, no gradient flows through the selection.

    Returns ``indices`` (B, k) int64 and ``num_kept`` (B,) int64.
    """
    with torch.no_grad():
        ranked = scores.detach().masked_fill(~keep, float("-inf"))  # (B, C)
        order = ranked.sort(dim=1, descending=True, stable=True).indices  # (B, C)
        num_kept = keep.sum(dim=1)  # (B,)
        slots = torch.arange(num_hard_negatives, device=scores.device)  # (k,)
        slots = slots[None, :] % num_kept.clamp_min(1)[:, None]  # (B, k)
        return order.gather(1, slots), num_kept  # (B, k), (B,)


def hard_negative_loss(
    q_emb: Tensor,
    pos_emb: Tensor,
    *,
    pos_keys: Tensor | None,
    neg_emb: Tensor | None = None,
    neg_keys: Tensor | None = None,
    neg_valid: Tensor | None = None,
    negatives: NegativeSource = "both",
    num_hard_negatives: int = 8,
    temperature: float = 0.02,
    fn_margin: float | None = 0.1,
    fn_ratio: float | None = None,
    mode: Stage2Mode = "hard_negative",
) -> tuple[Tensor, HardNegativeStats]:
    """UniME stage-2 loss: InfoNCE over the positive and k filtered hard negatives.

    For query i with cosines ``s+_i = cos(q_i, pos_i)`` and ``s_ic = cos(q_i, c)`` to its
    candidates c (UniME, arXiv 2504.17432, stage 2)::

        N_i = top-k { c in C_i : key(c) != key(pos_i),  not s_ic > s+_i + fn_margin,
                                 not s_ic > ratio_threshold(s+_i) }
        L_i = -log( exp(s+_i / tau) / (exp(s+_i / tau) + sum_{n in N_i} exp(s_in / tau)) )
        L   = (1 / B) sum_i L_i

    - Candidates ``C_i`` (``negatives``): "batch" = the B targets of the (global) batch
      except row i's own positive; "mined" = the valid mined negatives of row i only;
      "both" = their union.
    - Masks: a candidate with the positive's content key (``pos_keys`` / ``neg_keys``,
      int64 codes) is the same content and never a negative; padded mined slots
      (``neg_valid`` False) are no candidates (their content is zeroed first, so even
      NaN padding cannot leak). ``pos_keys=None`` turns the key mask off.
    - False-negative filter, strict ``>`` (a candidate exactly at a threshold is kept),
      compared in float64 like the offline miner, which calls the same two functions
      (:func:`exceeds_fn_margin`, :func:`exceeds_fn_ratio`): ``fn_margin`` (UniME beta,
      0.1) drops ``s > s+ + fn_margin``; ``fn_ratio`` (positive-aware, e.g. 0.95) drops
      ``s > fn_ratio * s+`` for ``s+ >= 0`` and ``s > (2 - fn_ratio) * s+`` for
      ``s+ < 0`` (the threshold mirrored so it stays below the positive). None = off.
      NaN is never over a threshold: a NaN cosine is not dropped (it reaches the loss).
    - Selection: the k = ``num_hard_negatives`` highest remaining cosines, chosen on
      detached scores (:func:`select_hard_negatives`); the chosen cosines keep their
      gradient. Fewer than k left: repeated cyclically in rank order (the paper; a
      repeated negative counts once per slot in the denominator). None left: the row's
      logits are ``[s+_i]`` alone, ``L_i = log 1 = 0`` with zero gradient, and the row
      still counts in the mean over B (see ``HardNegativeStats.rows_without_negatives``).
    - ``mode="full_batch"``: the VLM2Vec-style baseline, InfoNCE over the positive and
      every candidate of ``C_i`` (label = own positive): no key mask, no filter, no
      top-k (``num_hard_negatives``, ``fn_margin`` and ``fn_ratio`` unused). With
      ``negatives="batch"`` this is ``cross_entropy(Q P^T / tau, arange(B))``.

    Query -> target direction only. All embeddings are L2-normalised here (idempotent
    for the already-normalised output of the embedder), and the cosines, logits and
    loss run in float32 at least (float64 if any input is).

    Shapes: ``q_emb``, ``pos_emb`` (B, D); ``pos_keys`` (B,); ``neg_emb`` (B, M, D),
    ``neg_keys`` (B, M), ``neg_valid`` (B, M) bool (None = all valid), needed when
    ``negatives`` is "mined" or "both" (``neg_keys`` unless ``pos_keys`` is None), ignored
    for "batch". Returns the scalar loss and :class:`HardNegativeStats` (one host sync).
    Under the gradient cache, pass ``lambda g: hard_negative_loss(*split(g), ...)[0]``.
    """
    _check_stage2_args(q_emb, pos_emb, pos_keys, neg_emb, neg_keys, neg_valid,
                       negatives=negatives, num_hard_negatives=num_hard_negatives,
                       temperature=temperature, fn_ratio=fn_ratio, mode=mode)
    dtype = torch.promote_types(torch.promote_types(q_emb.dtype, pos_emb.dtype), torch.float32)
    if negatives != "batch":
        dtype = torch.promote_types(dtype, neg_emb.dtype)
    q = F.normalize(q_emb.to(dtype), dim=-1)  # (B, D)
    pos = F.normalize(pos_emb.to(dtype), dim=-1)  # (B, D)
    pos_sim = (q * pos).sum(dim=-1)  # (B,)
    sims, is_candidate, same_key = _stage2_candidates(
        q, pos, pos_keys, neg_emb, neg_keys, neg_valid, negatives)  # (B, C) x 3

    if mode == "full_batch":
        drops = {name: torch.zeros_like(is_candidate) for name in _DROPS}  # (B, C) each
        neg_sims, neg_slot = sims, is_candidate  # (B, C), (B, C)
        num_kept = is_candidate.sum(dim=1)  # (B,)
    else:
        drops = _false_negative_drops(sims, pos_sim, is_candidate, same_key,
                                      fn_margin=fn_margin, fn_ratio=fn_ratio)  # (B, C) each
        chosen, num_kept = select_hard_negatives(sims, drops["kept"],
                                                 num_hard_negatives)  # (B, k), (B,)
        neg_sims = sims.gather(1, chosen)  # (B, k) the chosen cosines, with gradient
        neg_slot = (num_kept > 0)[:, None].expand_as(chosen)  # (B, k)

    logits = torch.cat([pos_sim[:, None], neg_sims.masked_fill(~neg_slot, float("-inf"))],
                       dim=1) / temperature  # (B, 1+k) or (B, 1+C) for full_batch
    row_loss = torch.logsumexp(logits, dim=1) - logits[:, 0]  # (B,) 0 for a row without negs
    stats = _stage2_stats(pos_sim, neg_sims, neg_slot, is_candidate, drops, num_kept,
                          num_hard_negatives=num_hard_negatives,
                          count_short=mode == "hard_negative")
    return row_loss.mean(), stats


_DROPS = ("duplicate", "margin", "ratio", "kept")


def _stage2_candidates(q: Tensor, pos: Tensor, pos_keys: Tensor | None, neg_emb: Tensor | None,
                       neg_keys: Tensor | None, neg_valid: Tensor | None,
                       negatives: str) -> tuple[Tensor, Tensor, Tensor]:
    """Cosines ``sims`` (B, C) of each query to its candidate columns (the B in-batch
    targets, then the row's M mined slots), ``is_candidate`` (B, C) (not the own
    positive, not a padded slot) and ``same_key`` (B, C) (the positive's content key)."""
    n = q.shape[0]
    sims, is_candidate, same_key = [], [], []
    if negatives != "mined":
        sims.append(q @ pos.T)  # (B, B)
        is_candidate.append(~torch.eye(n, dtype=torch.bool, device=q.device))  # (B, B)
        if pos_keys is not None:
            same_key.append(pos_keys[None, :] == pos_keys[:, None])  # (B, B)
    if negatives != "batch":
        valid = (torch.ones(neg_emb.shape[:2], dtype=torch.bool, device=q.device)
                 if neg_valid is None else neg_valid.to(q.device, torch.bool))  # (B, M)
        neg = neg_emb.to(q.dtype).masked_fill(~valid[..., None], 0.0)  # (B, M, D)
        neg = F.normalize(neg, dim=-1)  # (B, M, D) padded slots stay 0
        sims.append(torch.einsum("bd,bmd->bm", q, neg))  # (B, M)
        is_candidate.append(valid)  # (B, M)
        if pos_keys is not None:
            same_key.append(neg_keys == pos_keys[:, None])  # (B, M)
    sims_all = torch.cat(sims, dim=1)  # (B, C)
    is_candidate_all = torch.cat(is_candidate, dim=1)  # (B, C)
    same_key_all = (torch.cat(same_key, dim=1) if pos_keys is not None
                    else torch.zeros_like(is_candidate_all))  # (B, C)
    if sims_all.shape[1] == 0:  # no column at all (B = 1 in-batch, or M = 0): one dummy
        sims_all = q.new_zeros(n, 1)  # (B, 1) constant, never a candidate
        is_candidate_all = same_key_all = torch.zeros(n, 1, dtype=torch.bool,
                                                      device=q.device)  # (B, 1)
    return sims_all, is_candidate_all, same_key_all


def _false_negative_drops(sims: Tensor, pos_sim: Tensor, is_candidate: Tensor,
                          same_key: Tensor, *, fn_margin: float | None,
                          fn_ratio: float | None) -> dict[str, Tensor]:
    """Disjoint (B, C) masks: each candidate is dropped by the first of duplicate ->
    margin -> ratio that hits it, or ``kept``. Margin and ratio are the shared rule
    (:func:`exceeds_fn_margin`, :func:`exceeds_fn_ratio`), compared in float64."""
    with torch.no_grad():
        scores = sims.detach().double()  # (B, C)
        pos = pos_sim.detach().double()[:, None]  # (B, 1)
        never = torch.zeros_like(is_candidate)  # (B, C)
        duplicate = is_candidate & same_key  # (B, C)
        alive = is_candidate & ~same_key  # (B, C)
        over_margin = (never if fn_margin is None
                       else exceeds_fn_margin(scores, pos, fn_margin))  # (B, C)
        margin = alive & over_margin  # (B, C)
        alive = alive & ~margin  # (B, C)
        over_ratio = (never if fn_ratio is None
                      else exceeds_fn_ratio(scores, pos, fn_ratio))  # (B, C)
        ratio = alive & over_ratio  # (B, C)
        return {"duplicate": duplicate, "margin": margin, "ratio": ratio,
                "kept": alive & ~ratio}


def _stage2_stats(pos_sim: Tensor, neg_sims: Tensor, neg_slot: Tensor, is_candidate: Tensor,
                  drops: dict[str, Tensor], num_kept: Tensor, *, num_hard_negatives: int,
                  count_short: bool) -> HardNegativeStats:
    """:class:`HardNegativeStats` with a single device-to-host copy."""
    with torch.no_grad():
        slot = neg_slot.to(neg_sims.dtype)  # (B, S)
        has_neg = neg_slot.any(dim=1)  # (B,)
        row_neg_mean = (neg_sims.detach() * slot).sum(dim=1) / slot.sum(dim=1).clamp_min(1)  # (B,)
        rows_with_neg = has_neg.sum()  # ()
        short = (num_kept > 0) & (num_kept < num_hard_negatives) & count_short  # (B,)
        false_neg_rows = (drops["margin"] | drops["ratio"]).any(dim=1)  # (B,)
        values = torch.stack([
            is_candidate.sum(), drops["duplicate"].sum(), drops["margin"].sum(),
            drops["ratio"].sum(), false_neg_rows.sum(), short.sum(), (~has_neg).sum(),
        ]).tolist()  # 7 ints
        means = torch.stack([
            pos_sim.detach().mean(),
            (row_neg_mean * has_neg).sum() / rows_with_neg,  # NaN when no row has negatives
            ((pos_sim.detach() - row_neg_mean) * has_neg).sum() / rows_with_neg,
        ]).double().tolist()  # 3 floats
    return HardNegativeStats(pos_sim.shape[0], *values, *means)


def _check_stage2_args(q_emb: Tensor, pos_emb: Tensor, pos_keys: Tensor | None,
                       neg_emb: Tensor | None, neg_keys: Tensor | None,
                       neg_valid: Tensor | None, *, negatives: str, num_hard_negatives: int,
                       temperature: float, fn_ratio: float | None, mode: str) -> None:
    if negatives not in NEGATIVE_SOURCES:
        raise ValueError(f"unknown negatives {negatives!r}; expected one of {NEGATIVE_SOURCES}")
    if mode not in STAGE2_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {STAGE2_MODES}")
    if num_hard_negatives < 1:
        raise ValueError(f"num_hard_negatives must be >= 1, got {num_hard_negatives}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if fn_ratio is not None and not fn_ratio > 0:
        raise ValueError(f"fn_ratio must be > 0, got {fn_ratio}")
    if q_emb.ndim != 2 or q_emb.shape != pos_emb.shape or q_emb.shape[0] == 0:
        raise ValueError(f"expected q_emb and pos_emb of the same shape (B >= 1, D), got "
                         f"{tuple(q_emb.shape)} and {tuple(pos_emb.shape)}")
    n, dim = q_emb.shape
    if pos_keys is not None and tuple(pos_keys.shape) != (n,):
        raise ValueError(f"pos_keys must have shape ({n},), got {tuple(pos_keys.shape)}")
    if negatives == "batch":
        return
    if neg_emb is None:
        raise ValueError(f"negatives={negatives!r} needs neg_emb (B, M, D); "
                         "use negatives='batch' for in-batch negatives only")
    if neg_emb.ndim != 3 or neg_emb.shape[0] != n or neg_emb.shape[2] != dim:
        raise ValueError(f"neg_emb must have shape ({n}, M, {dim}), got {tuple(neg_emb.shape)}")
    slots = tuple(neg_emb.shape[:2])
    if pos_keys is not None and (neg_keys is None or tuple(neg_keys.shape) != slots):
        raise ValueError(f"neg_keys must have shape {slots} when pos_keys is given, got "
                         f"{None if neg_keys is None else tuple(neg_keys.shape)}")
    if neg_valid is not None and (tuple(neg_valid.shape) != slots
                                  or neg_valid.dtype != torch.bool):
        raise ValueError(f"neg_valid must be a bool tensor of shape {slots}, got "
                         f"{neg_valid.dtype} {tuple(neg_valid.shape)}")


# -- Global batch across ranks --------------------------------------------------------------------
def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` over all ranks in rank order, keeping the local shard in the graph.

    Every rank passes its own shard ``x`` of shape (n_r, ...) with the same n_r on all
    ranks (``torch.distributed.all_gather`` needs equal shapes). The result is
    ``cat([x_0, .., x_{W-1}])`` of shape (W * n_r, ...), where the slice of this rank *is*
    ``x`` itself: gradients of a loss over the global batch flow into the local rows,
    while the other ranks' rows are constants. When every rank computes the same global
    loss L, rank r thus receives exactly ``dL/dx_r``, the full-batch gradient of its own
    rows. (The UniME authors' example loss gathers into fresh tensors only, so the local
    shard drops out of the graph and multi-GPU training gets no gradient at all.)

    Returns ``x`` unchanged when ``torch.distributed`` is not initialised or has one rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size())]  # W x (n_r, ...)
    dist.all_gather(shards, x.detach().contiguous())
    shards[dist.get_rank()] = x  # (n_r, ...) the local shard, still in the graph
    return torch.cat(shards, dim=0)  # (W * n_r, ...)
