"""UniME losses and the gradient-preserving gather: tensors in, tensors out.

No Ray, no files, no configs: every function here is a pure function of its tensor
arguments (plus the ``torch.distributed`` default group for the gather), so it can be
tested against plain float64 references.

- Stage 1, textual discriminative knowledge distillation: :func:`distillation_loss`.
- Stage 2, hard-negative enhanced instruction tuning: ``hard_negative_loss`` (below,
  still to be written).
- Global batches across data-parallel ranks: :func:`all_gather_with_grad`.
"""
from __future__ import annotations

from typing import Literal, get_args

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
# hard_negative_loss(q_emb, pos_emb, neg_emb, *, temperature=0.02, ...) belongs here:
# cross-entropy over [q.pos, q.neg_1 .. q.neg_k] / tau with label 0 (UNIME_METHOD.md,
# stage 2). Not written yet (a later issue).


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
