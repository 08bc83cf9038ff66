"""Gradient cache (GradCache, Gao et al. 2021) for a DeepSpeed engine.

A global contrastive / distillation batch that does not fit in memory is processed in
three passes per optimizer step:

1. forward every local chunk without grad -> local embeddings E (n_local, D), saving
   the RNG state before each chunk;
2. make E a leaf, gather the global batch with the local shard in the graph
   (:func:`pipeline.losses.all_gather_with_grad`), compute the loss L and
   ``G = dL/dE`` (n_local, D): exactly the full-batch gradient of this rank's rows;
3. re-forward each chunk c with grad under its saved RNG state (same dropout masks)
   and back-propagate the surrogate ``s * sum(E_c * G_c)`` through the engine, whose
   parameter gradient is ``s * (dE_c/dtheta)^T G_c`` by the chain rule.

Scaling ``s``. Rank r back-propagates only its own rows, so its parameter gradient is
``g_r = sum_{c in rank r} (dE_c/dtheta)^T G_c`` and the full-batch gradient is
``dL/dtheta = sum_r g_r``. DeepSpeed *averages* gradients over the W data-parallel
ranks, giving ``(1/W) sum_r s * g_r``; and ``engine.backward`` divides the loss by
``gradient_accumulation_steps`` unless ``scale_wrt_gas=False``. Hence

    s = W  (with scale_wrt_gas=False)   =>   DeepSpeed's gradient = sum_r g_r = dL/dtheta,

the plain full-batch gradient of the global loss. The same holds for the uncached path
(:func:`full_batch_backward`), which back-propagates ``W * L`` once.

One call is one optimizer step: the engine's accumulation boundary is off for every
chunk but the last, so ZeRO accumulates the chunks' gradients (with ZeRO-2 and
``gradient_accumulation_steps=1`` a boundary on every chunk would keep only the last
chunk's gradient) and finalises them once; the caller then calls ``engine.step()``.
ZeRO-2/3 still reduce-scatter after every chunk's backward (they must, to partition
gradients); ZeRO-0/1 all-reduce once, at the boundary. ``reduce_once=True`` uses
DeepSpeed's ``coalesce_grad_reduction`` for a single reduction under every ZeRO stage.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from pipeline.losses import all_gather_with_grad

logger = logging.getLogger(__name__)

Embed = Callable[[Any], Tensor]
LossFn = Callable[[Tensor], Tensor]


class Engine(Protocol):
    """What the gradient cache needs of a ``deepspeed.DeepSpeedEngine``."""

    dp_world_size: int

    def backward(self, loss: Tensor, retain_graph: bool = False,
                 scale_wrt_gas: bool = True) -> Tensor: ...

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None: ...

    def coalesce_grad_reduction(self) -> contextlib.AbstractContextManager[None]: ...


# -- RNG replay (GradCache's RandContext) ---------------------------------------------------------
@dataclass(frozen=True)
class RngState:
    """The CPU and CUDA generator states at one moment, to replay a forward's randomness."""

    cpu: Tensor
    cuda: tuple[Tensor, ...]

    @classmethod
    def capture(cls) -> RngState:
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the global RNG streams are left as they were."""
        with torch.random.fork_rng(devices=list(range(len(self.cuda)))):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(list(self.cuda))
            yield


# -- batches -------------------------------------------------------------------------------------
def split_batch(batch: Any, chunk_size: int) -> list[Any]:
    """Split a batch along dim 0 into chunks of ``chunk_size`` rows (the last may be smaller).

    ``batch`` is a tensor, a sequence (list/tuple) of rows, or a mapping whose values are
    either; every value must have the same number of rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_rows = _num_rows(batch)
    return [_take_rows(batch, start, min(start + chunk_size, n_rows))
            for start in range(0, n_rows, chunk_size)]


def _num_rows(batch: Any) -> int:
    if isinstance(batch, Mapping):
        counts = {key: _num_rows(value) for key, value in batch.items()}
        if not counts:
            raise ValueError("cannot split an empty mapping")
        if len(set(counts.values())) != 1:
            raise ValueError(f"batch fields have different numbers of rows: {counts}")
        return next(iter(counts.values()))
    if isinstance(batch, Tensor | Sequence):
        return len(batch)
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}")


def _take_rows(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Mapping):
        return {key: _take_rows(value, start, stop) for key, value in batch.items()}
    return batch[start:stop]


# -- backward passes -----------------------------------------------------------------------------
def full_batch_backward(engine: Engine, batch: Any, embed: Embed, loss_fn: LossFn, *,
                        world_size: int | None = None) -> Tensor:
    """Plain path (no cache): embed the whole local batch with grad, back-propagate ``W * L``.

    ``L = loss_fn(all_gather_with_grad(embed(batch)))`` is the global loss; the factor
    ``W`` (default ``engine.dp_world_size``) undoes DeepSpeed's average over ranks (see
    the module docstring), so the parameter gradients equal ``dL/dtheta``. Marks the
    accumulation boundary; the caller then calls ``engine.step()``. Returns L, detached.

    Like :func:`grad_cache_backward`, this sets the engine's accumulation boundary by
    hand (``set_gradient_accumulation_boundary``), which overrides DeepSpeed's
    micro-step counter from then on: one call = one optimizer step, whatever
    ``gradient_accumulation_steps`` says (``scale_wrt_gas=False``).
    """
    scale = _world_size(engine, world_size)
    local_emb = embed(batch)  # (n_local, D)
    loss = loss_fn(all_gather_with_grad(local_emb))  # ()
    engine.set_gradient_accumulation_boundary(True)
    engine.backward(loss * scale, scale_wrt_gas=False)
    return loss.detach()


def grad_cache_backward(engine: Engine, chunks: Sequence[Any], embed: Embed, loss_fn: LossFn, *,
                        world_size: int | None = None, reduce_once: bool = False) -> Tensor:
    """Gradient-cached backward of ``L = loss_fn(global embeddings)`` for one optimizer step.

    ``chunks`` are this rank's pieces of its local batch (see :func:`split_batch`; sizes
    may differ). ``embed(chunk)`` returns the chunk's (n_chunk, D) embeddings and must
    call the engine itself (``engine(...)``, not ``engine.module(...)``): DeepSpeed's
    backward hooks are installed by the engine's forward. ``loss_fn`` maps the gathered
    global embeddings (W * n_local, D) to a scalar; it must hold no trainable parameters
    (only the embedding gradient is kept). Every rank must pass the same number of
    local rows (the gather needs equal shapes) and the same number of chunks: ZeRO-3
    gathers parameters in every forward and ZeRO-2/3 reduce after every backward, so
    unequal chunk counts would leave ranks waiting in different collectives.

    Parameter gradients afterwards equal those of :func:`full_batch_backward` on the
    concatenated chunks: the surrogate of chunk c is ``W * sum(E_c * dL/dE_c)`` with
    ``W = world_size`` (default ``engine.dp_world_size``), see the module docstring.
    Dropout masks match between the two forwards of a chunk (its RNG state is
    replayed). The caller then calls ``engine.step()``. Returns L, detached.

    ``reduce_once`` wraps the re-forward pass in DeepSpeed's
    ``engine.coalesce_grad_reduction()`` (ZeRO 1/2/3 only; DeepSpeed raises for stage
    0): one gradient reduction per step instead of one per chunk under ZeRO-2/3, at the
    price of holding this rank's full, unpartitioned gradients until the last chunk
    (cheap for LoRA adapters, not for full fine-tuning under ZeRO-3).
    """
    if not chunks:
        raise ValueError("grad_cache_backward needs at least one chunk")
    scale = _world_size(engine, world_size)

    # 1. Embeddings of every chunk without grad, remembering each chunk's RNG state.
    rng_states: list[RngState] = []
    chunk_embs: list[Tensor] = []
    with torch.no_grad():
        for chunk in chunks:
            rng_states.append(RngState.capture())
            chunk_embs.append(embed(chunk))  # (n_c, D)
    chunk_sizes = [chunk_emb.shape[0] for chunk_emb in chunk_embs]
    local_emb = torch.cat(chunk_embs).requires_grad_()  # (n_local, D) leaf
    del chunk_embs

    # 2. Global loss and its gradient w.r.t. this rank's embeddings (the cache).
    loss = loss_fn(all_gather_with_grad(local_emb))  # ()
    (emb_grad,) = torch.autograd.grad(loss, local_emb)  # (n_local, D)
    grad_chunks = emb_grad.split(chunk_sizes)  # n_chunks x (n_c, D)
    logger.debug("grad cache: %d chunks of %s rows", len(chunks), chunk_sizes)

    # 3. Re-forward each chunk with grad under the same RNG state; back-propagate the
    #    surrogate through the engine, accumulation boundary on the last chunk only.
    last = len(chunks) - 1
    with engine.coalesce_grad_reduction() if reduce_once else contextlib.nullcontext():
        for index, (chunk, grad_chunk, rng) in enumerate(zip(chunks, grad_chunks, rng_states,
                                                             strict=True)):
            engine.set_gradient_accumulation_boundary(index == last)
            with rng.replay():
                chunk_emb = embed(chunk)  # (n_c, D)
            if chunk_emb.shape != grad_chunk.shape:
                raise RuntimeError(f"chunk {index}: re-forward gave {tuple(chunk_emb.shape)}, "
                                   f"the cached forward {tuple(grad_chunk.shape)}")
            surrogate = (chunk_emb * grad_chunk.to(chunk_emb.dtype)).sum() * scale  # ()
            engine.backward(surrogate, scale_wrt_gas=False)
    return loss.detach()


def _world_size(engine: Engine, world_size: int | None) -> int:
    """The number of ranks DeepSpeed averages gradients over (its data-parallel size)."""
    size = engine.dp_world_size if world_size is None else world_size
    if size < 1:
        raise ValueError(f"world_size must be >= 1, got {size}")
    return size
