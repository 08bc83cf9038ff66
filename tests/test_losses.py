"""pipeline.losses against plain float64 references, and the gather across two gloo ranks."""
from __future__ import annotations

import itertools
import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from pipeline.losses import all_gather_with_grad, distillation_loss

DIRECTIONS = ["student||teacher", "teacher||student"]
REDUCTIONS = ["sum", "mean", "batchmean"]
TEMPERATURES = [0.02, 0.05, 1.0]
KNOBS = list(itertools.product(DIRECTIONS, [True, False], REDUCTIONS, TEMPERATURES))


def reference_distillation(student_emb: Tensor, teacher_emb: Tensor, *, temperature: float,
                           direction: str, mask_self: bool, reduction: str) -> Tensor:
    """UniME stage-1 loss written out with loops, in float64: sum_i KL(P_s[i] || P_t[i])."""
    student = student_emb.double()  # (n, d_s)
    teacher = teacher_emb.detach().double()  # (n, d_t)
    n = student.shape[0]
    rows = []
    for i in range(n):
        cols = [j for j in range(n) if not (mask_self and j == i)]
        sims_s, sims_t = [], []
        for j in cols:
            sims_s.append(student[i] @ student[j] / (student[i].norm() * student[j].norm()))
            sims_t.append(teacher[i] @ teacher[j] / (teacher[i].norm() * teacher[j].norm()))
        logits_s = torch.stack(sims_s) / temperature  # (m,)
        logits_t = torch.stack(sims_t) / temperature  # (m,)
        p_s = torch.exp(logits_s - logits_s.max())  # (m,)
        p_s = p_s / p_s.sum()  # (m,)
        p_t = torch.exp(logits_t - logits_t.max())  # (m,)
        p_t = p_t / p_t.sum()  # (m,)
        p, q = (p_s, p_t) if direction == "student||teacher" else (p_t, p_s)
        rows.append(sum(p[k] * (torch.log(p[k]) - torch.log(q[k])) for k in range(len(cols))))
    total = torch.stack(rows).sum()  # ()
    return total if reduction == "sum" else total / n


def _inputs(n: int = 6, d_s: int = 5, d_t: int = 9, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, d_s, generator=gen, dtype=torch.float64)  # (n, d_s)
    teacher = torch.randn(n, d_t, generator=gen, dtype=torch.float64)  # (n, d_t)
    return student, teacher


@pytest.mark.parametrize(("direction", "mask_self", "reduction", "temperature"), KNOBS)
def test_distillation_matches_reference_value_and_gradient(
        direction: str, mask_self: bool, reduction: str, temperature: float) -> None:
    knobs = dict(temperature=temperature, direction=direction, mask_self=mask_self,
                 reduction=reduction)
    student, teacher = _inputs()
    student_ours = student.clone().requires_grad_()
    student_ref = student.clone().requires_grad_()

    loss = distillation_loss(student_ours, teacher, **knobs)
    expected = reference_distillation(student_ref, teacher, **knobs)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)

    loss.backward()
    expected.backward()
    assert student_ours.grad.abs().sum() > 0
    torch.testing.assert_close(student_ours.grad, student_ref.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("direction", "mask_self", "reduction"),
                         list(itertools.product(DIRECTIONS, [True, False], REDUCTIONS)))
def test_distillation_gradcheck(direction: str, mask_self: bool, reduction: str) -> None:
    student, teacher = _inputs(n=4, d_s=3, d_t=5, seed=1)
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: distillation_loss(s, teacher, temperature=0.1, direction=direction,
                                    mask_self=mask_self, reduction=reduction),
        (student,))


def test_distillation_float32_close_to_float64_reference() -> None:
    student, teacher = _inputs(n=16, d_s=32, d_t=48, seed=2)
    loss = distillation_loss(student.float(), teacher.float())
    assert loss.dtype == torch.float32
    expected = reference_distillation(student, teacher, temperature=0.05,
                                      direction="student||teacher", mask_self=True,
                                      reduction="sum")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


def test_distillation_low_precision_inputs_give_float32_loss() -> None:
    student, teacher = _inputs()
    loss = distillation_loss(student.bfloat16(), teacher.half())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mask_self", [True, False])
def test_kl_is_zero_for_the_same_similarity_structure(direction: str, mask_self: bool) -> None:
    """A teacher with other dimensions but the same cosines (rotated, scaled) gives KL = 0."""
    student, _ = _inputs(n=7, d_s=5)
    rotation, _ = torch.linalg.qr(torch.randn(11, 5, dtype=torch.float64))  # (d_t, d_s)
    teacher = 3.0 * student @ rotation.T  # (n, d_t): same cosines, d_t = 11
    student.requires_grad_()
    loss = distillation_loss(student, teacher, direction=direction, mask_self=mask_self)
    loss.backward()
    assert abs(loss.item()) < 1e-10
    assert student.grad.abs().max() < 1e-8


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", [0.01, 0.05])
def test_no_nan_with_masked_self_and_two_rows(direction: str, temperature: float) -> None:
    for dtype in (torch.float32, torch.float64):
        student, teacher = _inputs(n=2, seed=3)
        student = student.to(dtype).requires_grad_()
        loss = distillation_loss(student, teacher.to(dtype), temperature=temperature,
                                 direction=direction)
        loss.backward()
        # Each row's only candidate has probability 1 for both sides: KL = 0 exactly.
        assert torch.isfinite(loss) and loss.abs().item() < 1e-6
        assert torch.isfinite(student.grad).all()


def test_teacher_gets_no_gradient() -> None:
    student, teacher = _inputs()
    student.requires_grad_()
    teacher.requires_grad_()
    distillation_loss(student, teacher, direction="teacher||student").backward()
    assert teacher.grad is None and student.grad is not None


def test_duplicate_rows_stay_finite() -> None:
    student, teacher = _inputs(n=5)
    student = torch.cat([student, student[:2]]).requires_grad_()  # (7, d_s) with duplicates
    teacher = torch.cat([teacher, teacher[:2]])  # (7, d_t)
    loss = distillation_loss(student, teacher, temperature=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"direction": "both"}, "unknown direction"),
    ({"reduction": "none"}, "unknown reduction"),
    ({"temperature": 0.0}, "temperature"),
])
def test_distillation_rejects_bad_knobs(kwargs: dict, message: str) -> None:
    student, teacher = _inputs()
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, teacher, **kwargs)


def test_distillation_rejects_bad_shapes() -> None:
    student, teacher = _inputs()
    with pytest.raises(ValueError, match="rows"):
        distillation_loss(student, teacher[:-1])
    with pytest.raises(ValueError, match="at least 2 rows"):
        distillation_loss(student[:1], teacher[:1])
    assert math.isclose(distillation_loss(student[:1], teacher[:1], mask_self=False).item(), 0.0,
                        abs_tol=1e-12)


# -- all_gather_with_grad ------------------------------------------------------------------------
WORLD_SIZE = 2
ROWS_PER_RANK = 3


def test_gather_is_identity_without_process_group() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x


def _global_batch() -> tuple[Tensor, Tensor]:
    return _inputs(n=WORLD_SIZE * ROWS_PER_RANK, d_s=4, d_t=6, seed=5)


def _all_gather_without_local_grad(x: Tensor) -> Tensor:
    """The authors' bug: gather into fresh tensors only; the local shard leaves the graph."""
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size())]  # W x (n_r, d)
    dist.all_gather(shards, x.detach().contiguous())
    return torch.cat(shards, dim=0)  # (W * n_r, d)


def _gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        student, teacher = _global_batch()  # (N, d_s), (N, d_t): same on every rank
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        result = {}
        for name, gather in [("with_grad", all_gather_with_grad),
                             ("buggy", _all_gather_without_local_grad)]:
            local = student[rows].clone().requires_grad_()  # (n_r, d_s)
            global_emb = gather(local)  # (N, d_s)
            loss = distillation_loss(global_emb, teacher, direction="teacher||student")
            if loss.requires_grad:
                loss.backward()
            result[name] = {"loss": loss.detach(), "grad": local.grad,
                            "gathered": global_emb.detach()}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on loopback (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gathered_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("gather")
    mp.spawn(_gather_worker, args=(WORLD_SIZE, free_port(), str(out_dir)), nprocs=WORLD_SIZE,
             join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_gather_keeps_local_shard_in_graph(gathered_results: list[dict]) -> None:
    student, teacher = _global_batch()
    student.requires_grad_()
    loss = distillation_loss(student, teacher, direction="teacher||student")
    loss.backward()
    for rank, result in enumerate(gathered_results):
        ours = result["with_grad"]
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        torch.testing.assert_close(ours["gathered"], student.detach(), rtol=0, atol=0)
        torch.testing.assert_close(ours["loss"], loss.detach(), rtol=1e-12, atol=1e-14)
        assert ours["grad"] is not None and ours["grad"].abs().sum() > 0
        # Each rank's loss is the whole global loss, so its local gradient is exactly the
        # full-batch gradient of its own rows (up to float64 rounding).
        torch.testing.assert_close(ours["grad"], student.grad[rows], rtol=1e-12, atol=1e-14)


def test_buggy_gather_gives_no_gradient(gathered_results: list[dict]) -> None:
    """The same check fails for a gather that drops the local shard from the graph."""
    for result in gathered_results:
        buggy = result["buggy"]
        torch.testing.assert_close(buggy["loss"], result["with_grad"]["loss"])
        assert buggy["grad"] is None or buggy["grad"].abs().sum() == 0
