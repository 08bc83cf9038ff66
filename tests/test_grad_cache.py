"""Gradient cache == plain full-batch gradient: a stub engine, then DeepSpeed ZeRO-2/3 on CPU
with one and two gloo processes, against plain torch autograd in float64 on the same weights."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

from pipeline.losses import distillation_loss
from pipeline.train import grad_cache
from pipeline.train.grad_cache import full_batch_backward, grad_cache_backward, split_batch
from tests.test_losses import free_port

VOCAB, SEQ_LEN, HIDDEN, EMB_DIM, TEACHER_DIM = 32, 5, 16, 8, 12
GLOBAL_ROWS = 14


class TinyEncoder(nn.Module):
    """Token embedding -> 2 linear layers (GELU, dropout between) -> mean over positions."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, HIDDEN)
        self.hidden = nn.Linear(HIDDEN, HIDDEN)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(HIDDEN, EMB_DIM)

    def forward(self, token_ids: Tensor) -> Tensor:
        states = self.dropout(torch.nn.functional.gelu(self.hidden(self.tokens(token_ids))))
        return self.out(states).mean(dim=1)  # (n, EMB_DIM)


def make_model(dropout: float = 0.0) -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder(dropout)


def global_batch(step: int) -> tuple[Tensor, Tensor]:
    """Token ids (GLOBAL_ROWS, SEQ_LEN) and teacher embeddings (GLOBAL_ROWS, TEACHER_DIM)."""
    gen = torch.Generator().manual_seed(100 + step)
    token_ids = torch.randint(0, VOCAB, (GLOBAL_ROWS, SEQ_LEN), generator=gen)
    teacher_emb = torch.randn(GLOBAL_ROWS, TEACHER_DIM, generator=gen)
    return token_ids, teacher_emb


def loss_for(teacher_emb: Tensor):
    return lambda global_emb: distillation_loss(global_emb, teacher_emb, temperature=0.1)


def reference_grads(params: dict[str, Tensor], step: int) -> dict[str, Tensor]:
    """Plain float64 autograd of the global loss, no DeepSpeed, no chunks, one process."""
    model = make_model().double()
    model.load_state_dict({name: value.double() for name, value in params.items()})
    token_ids, teacher_emb = global_batch(step)
    loss_for(teacher_emb.double())(model(token_ids)).backward()
    return {name: param.grad for name, param in model.named_parameters()}


# -- a stub engine: the cache logic without DeepSpeed ----------------------------------------------
class PlainEngine:
    """The engine surface the gradient cache uses, on a plain module (plain autograd)."""

    def __init__(self, module: nn.Module, dp_world_size: int = 1) -> None:
        self.module = module
        self.dp_world_size = dp_world_size
        self.boundaries: list[bool] = []

    def __call__(self, *args: Any) -> Tensor:
        return self.module(*args)

    def backward(self, loss: Tensor, retain_graph: bool = False,
                 scale_wrt_gas: bool = True) -> Tensor:
        loss.backward(retain_graph=retain_graph)
        return loss

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self.boundaries.append(is_boundary)


def _grads(module: nn.Module) -> dict[str, Tensor]:
    return {name: param.grad.clone() for name, param in module.named_parameters()}


def _assert_grads_close(actual: dict[str, Tensor], expected: dict[str, Tensor],
                        rtol: float = 1e-4) -> None:
    """Close elementwise up to rtol, with an absolute floor of rtol x the tensor's largest entry
    (float32 rounding of near-zero entries is relative to the scale of the whole gradient)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        atol = rtol * expected[name].abs().max().item()
        torch.testing.assert_close(actual[name].double(), expected[name].double(), rtol=rtol,
                                   atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 14, 20])
def test_grad_cache_equals_full_batch_with_stub_engine(chunk_size: int) -> None:
    token_ids, teacher_emb = global_batch(0)
    expected = reference_grads(make_model().state_dict(), 0)

    full = PlainEngine(make_model())
    full_loss = full_batch_backward(full, token_ids, full, loss_for(teacher_emb))
    cached = PlainEngine(make_model())
    chunks = split_batch(token_ids, chunk_size)
    cached_loss = grad_cache_backward(cached, chunks, cached, loss_for(teacher_emb))

    assert not cached_loss.requires_grad
    torch.testing.assert_close(cached_loss, full_loss)
    _assert_grads_close(_grads(full.module), expected)
    _assert_grads_close(_grads(cached.module), expected)
    assert cached.boundaries == [False] * (len(chunks) - 1) + [True]
    assert full.boundaries == [True]


def test_world_size_scales_the_surrogate() -> None:
    """With W ranks DeepSpeed averages: a stub 'rank' must back-propagate W times its part."""
    token_ids, teacher_emb = global_batch(0)
    one = PlainEngine(make_model())
    grad_cache_backward(one, split_batch(token_ids, 4), one, loss_for(teacher_emb))
    three = PlainEngine(make_model(), dp_world_size=3)
    grad_cache_backward(three, split_batch(token_ids, 4), three, loss_for(teacher_emb))
    for name, grad in _grads(three.module).items():
        torch.testing.assert_close(grad, 3 * _grads(one.module)[name])


def _chunked_dropout_reference(token_ids: Tensor, teacher_emb: Tensor,
                               chunk_size: int) -> dict[str, Tensor]:
    """Chunk-by-chunk forwards with grad, one backward: the dropout masks of the cache's pass 1."""
    model = make_model(dropout=0.5)
    torch.manual_seed(7)
    emb = torch.cat([model(chunk) for chunk in split_batch(token_ids, chunk_size)])  # (N, D)
    loss_for(teacher_emb)(emb).backward()
    return _grads(model)


def _cached_dropout_grads(token_ids: Tensor, teacher_emb: Tensor,
                          chunk_size: int) -> tuple[dict[str, Tensor], Tensor]:
    engine = PlainEngine(make_model(dropout=0.5))
    torch.manual_seed(7)
    grad_cache_backward(engine, split_batch(token_ids, chunk_size), engine, loss_for(teacher_emb))
    return _grads(engine.module), torch.rand(4)


def test_dropout_masks_are_replayed_in_the_re_forward() -> None:
    token_ids, teacher_emb = global_batch(1)
    expected = _chunked_dropout_reference(token_ids, teacher_emb, chunk_size=4)
    after_reference = torch.rand(4)
    actual, after_cache = _cached_dropout_grads(token_ids, teacher_emb, chunk_size=4)
    _assert_grads_close(actual, expected, rtol=1e-5)
    # The replay runs in a forked RNG: the global stream continues as after pass 1 only.
    torch.testing.assert_close(after_cache, after_reference)


def test_without_rng_replay_the_dropout_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    @contextlib.contextmanager
    def no_replay(self: grad_cache.RngState) -> Iterator[None]:
        yield

    monkeypatch.setattr(grad_cache.RngState, "replay", no_replay)
    token_ids, teacher_emb = global_batch(1)
    expected = _chunked_dropout_reference(token_ids, teacher_emb, chunk_size=4)
    actual, _ = _cached_dropout_grads(token_ids, teacher_emb, chunk_size=4)
    with pytest.raises(AssertionError):
        _assert_grads_close(actual, expected, rtol=1e-5)


def test_split_batch() -> None:
    token_ids = torch.arange(10).reshape(5, 2)
    assert [len(chunk) for chunk in split_batch(token_ids, 2)] == [2, 2, 1]
    chunks = split_batch({"ids": token_ids, "text": list("abcde")}, 3)
    assert [chunk["text"] for chunk in chunks] == [list("abc"), list("de")]
    torch.testing.assert_close(chunks[1]["ids"], token_ids[3:])
    with pytest.raises(ValueError, match="different numbers of rows"):
        split_batch({"ids": token_ids, "text": ["a"]}, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        split_batch(token_ids, 0)
    with pytest.raises(ValueError, match="at least one chunk"):
        grad_cache_backward(PlainEngine(make_model()), [], lambda c: c, lambda e: e.sum())


# -- DeepSpeed ZeRO-2/3 on CPU, one and two gloo processes -----------------------------------------
# Engine variants: name -> deepspeed_config kwargs (ZeRO-3 partitions even tiny parameters).
ENGINES = {
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3, "stage3_param_persistence_threshold": 0},
    "zero2_gas2": {"zero_stage": 2, "gradient_accumulation_steps": 2},
}
CHUNK_SIZE = {1: 4, 2: 3}  # local rows 14 -> chunks 4,4,4,2; local rows 7 -> chunks 3,3,1
# Each engine runs these optimizer steps in order, step i on global_batch(i):
# (path, world_size override for the scaling, reduce_once).
STEPS = [("grad_cache", None, False), ("full_batch", None, False), ("grad_cache", None, True),
         ("grad_cache", 1, False)]
CORRECT_STEPS = [0, 1, 2]
WRONG_SCALE_STEP = 3


def _deepspeed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pipeline.train.deepspeed_utils import deepspeed_config, disable_shm_comm_op

    disable_shm_comm_op()
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    local_rows = GLOBAL_ROWS // world_size
    results: dict[str, list[dict[str, Any]]] = {}
    for engine_name, engine_kwargs in ENGINES.items():
        model = make_model()
        config = deepspeed_config(micro_batch_size_per_gpu=local_rows, lr=1e-2, **engine_kwargs)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=config)
        results[engine_name] = []
        for step, (path, scale_world_size, reduce_once) in enumerate(STEPS):
            params = {name: safe_get_full_fp32_param(param).detach().clone()
                      for name, param in engine.module.named_parameters()}
            token_ids, teacher_emb = global_batch(step)
            local_ids = token_ids[rank * local_rows:(rank + 1) * local_rows]  # (n_local, L)
            loss_fn = loss_for(teacher_emb)
            if path == "grad_cache":
                chunks = split_batch(local_ids, CHUNK_SIZE[world_size])
                loss = grad_cache_backward(engine, chunks, engine, loss_fn,
                                           world_size=scale_world_size, reduce_once=reduce_once)
            else:
                loss = full_batch_backward(engine, local_ids, engine, loss_fn)
            grads = {name: safe_get_full_grad(param).detach().clone()
                     for name, param in engine.module.named_parameters()}
            engine.step()
            results[engine_name].append({"params": params, "grads": grads, "loss": loss})
    if rank == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    # Leave together and close gloo before the process exits: a rank that exits while the
    # other still holds the connection can die in teardown ("terminate called without an
    # active exception", SIGABRT), failing the whole fixture.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _run_deepspeed(world_size: int, out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    mp.spawn(_deepspeed_worker, args=(world_size, free_port(), str(out_dir)), nprocs=world_size,
             join=True)
    return torch.load(out_dir / "results.pt")


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """{world_size: {engine name: [one record per step of STEPS]}}."""
    return {world_size: _run_deepspeed(world_size, tmp_path_factory.mktemp(f"ds{world_size}"))
            for world_size in (1, 2)}


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("engine_name", list(ENGINES))
@pytest.mark.parametrize("step", CORRECT_STEPS)
def test_deepspeed_gradients_equal_plain_full_batch(deepspeed_results: dict, world_size: int,
                                                    engine_name: str, step: int) -> None:
    """Steps (after AdamW updates): grad cache, full batch, grad cache with reduce_once."""
    record = deepspeed_results[world_size][engine_name][step]
    _assert_grads_close(record["grads"], reference_grads(record["params"], step))
    token_ids, teacher_emb = global_batch(step)
    model = make_model()
    model.load_state_dict(record["params"])
    with torch.no_grad():
        global_loss = loss_for(teacher_emb)(model(token_ids))
    torch.testing.assert_close(record["loss"], global_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine_name", list(ENGINES))
def test_deepspeed_without_world_size_factor_fails_with_two_ranks(deepspeed_results: dict,
                                                                  engine_name: str) -> None:
    """world_size=1 is right for one process and gives half the gradient with two."""
    one = deepspeed_results[1][engine_name][WRONG_SCALE_STEP]
    two = deepspeed_results[2][engine_name][WRONG_SCALE_STEP]
    _assert_grads_close(one["grads"], reference_grads(one["params"], WRONG_SCALE_STEP))
    expected = reference_grads(two["params"], WRONG_SCALE_STEP)
    with pytest.raises(AssertionError):
        _assert_grads_close(two["grads"], expected)
    _assert_grads_close({name: 2 * grad for name, grad in two["grads"].items()}, expected)
