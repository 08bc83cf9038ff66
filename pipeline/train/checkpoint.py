"""Checkpoints, frozen-weight guards and LoRA export for the training loop.

A Ray Train checkpoint of this project is one folder, merged by Ray from every worker::

    engine/               DeepSpeed ``save_checkpoint`` (tag ``engine``): trainable (LoRA)
                          weights only (``exclude_frozen_parameters``), the ZeRO optimizer
                          partitions of every rank, the LR scheduler
    latest                DeepSpeed's pointer to the tag
    train_state.json      step (= the data position), epoch, world size, elapsed seconds

Frozen weights are never written: they come from the model source on resume. The data
position is the global step alone because the data order is a pure function of (seed,
epoch) (see :mod:`pipeline.train.loop`), so a resumed run continues with exactly the
batch the interrupted one would have taken next.

Export (end of a stage): the trainable weights are gathered to full fp32 tensors on every
rank (a collective under ZeRO), then rank 0 loads the model source fresh on CPU in
float32, attaches the same LoRA layers, loads the trained weights, saves the PEFT adapter,
merges, casts to the export dtype, saves the Hugging Face folder and checks that the
merged model reproduces the embeddings of the model as trained on a few probe texts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline import storage

logger = logging.getLogger(__name__)

ENGINE_TAG = "engine"
STATE_FILE = "train_state.json"
EXPORT_CHECK_FILE = "export_check.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


class FrozenParameterError(RuntimeError):
    """A parameter that must stay frozen changed during training."""


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed with this run's settings."""


class ExportMismatchError(RuntimeError):
    """The exported model does not reproduce the trained model's embeddings."""


@dataclasses.dataclass
class TrainState:
    """Where training stands; saved by rank 0 into every checkpoint."""

    step: int = 0                 # optimizer steps done = the data position
    epoch: int = 0
    world_size: int = 1
    elapsed_s: float = 0.0        # training time of every attempt so far
    loss: float | None = None     # loss of the last step done

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


# -- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(engine: Any, state: TrainState, *, rank: int,
                    report: Callable[..., None], metrics: dict[str, Any]) -> None:
    """Save the engine (every rank) and the state (rank 0) and report them to Ray Train.

    Every rank writes its DeepSpeed files into its own temporary folder; Ray merges the
    folders of all ranks into ``checkpoint_<step>`` under the run's storage path.
    """
    import ray.train

    with tempfile.TemporaryDirectory(prefix="unime-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=ENGINE_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(state.to_json())
        report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
               checkpoint_dir_name=f"checkpoint_{state.step:07d}")
    logger.debug("rank %d: checkpoint at step %d reported", rank, state.step)


def load_checkpoint(engine: Any, checkpoint: Any, *, world_size: int) -> TrainState:
    """Restore the engine from a Ray checkpoint; returns the saved :class:`TrainState`."""
    with checkpoint.as_directory() as folder:
        state = TrainState.from_json(Path(folder, STATE_FILE).read_text())
        if state.world_size != world_size:
            raise ResumeError(
                f"the checkpoint at step {state.step} was written by {state.world_size} "
                f"workers but this run has {world_size}: DeepSpeed's optimizer partitions "
                f"follow the world size; set train.num_workers={state.world_size} to resume")
        path, _ = engine.load_checkpoint(folder, tag=ENGINE_TAG, load_module_strict=False)
        if path is None:
            raise ResumeError(f"DeepSpeed found no checkpoint '{ENGINE_TAG}' in {folder}")
    logger.info("resumed from step %d (epoch %d, %.0f s trained before)", state.step,
                state.epoch, state.elapsed_s)
    return state


# -- frozen weights ------------------------------------------------------------------------------
FINGERPRINT_CHUNK = 1 << 22  # elements per pass: bounds the int64 temporaries (32 MiB)
WORD_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def frozen_fingerprint(module: torch.nn.Module) -> dict[str, str]:
    """A bit-exact digest of every frozen parameter (this rank's partition under ZeRO-3):
    sha1 of the bytes on the CPU; on a GPU a checksum computed there
    (:func:`tensor_checksum`), instead of copying the frozen backbone (~15 GB at 7B) to the
    CPU at the start and end of every launch."""
    out = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            continue
        data = getattr(param, "ds_tensor", param).detach()
        if data.device.type == "cpu":
            digest = hashlib.sha1(data.contiguous().view(-1).view(torch.uint8).numpy()
                                  .tobytes()).hexdigest()
        else:
            digest = str(tensor_checksum(data))
        out[name] = f"{tuple(data.shape)}:{data.dtype}:{digest}"
    return out


@torch.no_grad()
def tensor_checksum(data: torch.Tensor) -> int:
    """sum_i word_i * w_i (mod 2^64) over the tensor's raw words, with distinct odd weights
    w_i: any change of a single element changes it (an odd weight times a nonzero word
    difference below 2^32 is never 0 mod 2^64); on the tensor's own device, in chunks."""
    words = data.contiguous().view(-1).view(WORD_DTYPES[data.element_size()])  # (n,)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), FINGERPRINT_CHUNK):
        chunk = words[start:start + FINGERPRINT_CHUNK].to(torch.int64)  # (c,)
        index = torch.arange(start, start + chunk.numel(), dtype=torch.int64,
                             device=words.device)  # (c,)
        weights = index * 0x9E3779B97F4A7C15 | 1  # (c,) odd, wrapping int64 arithmetic
        total += (chunk * weights).sum()
    return int(total.item())


def verify_frozen(module: torch.nn.Module, before: dict[str, str]) -> int:
    """Raise :class:`FrozenParameterError` if any frozen parameter changed; returns the count."""
    after = frozen_fingerprint(module)
    changed = sorted(name for name in before if after.get(name) != before[name])
    if changed or after.keys() != before.keys():
        raise FrozenParameterError(
            f"{len(changed)} frozen parameter(s) changed or appeared/disappeared during "
            f"training, e.g. {changed[:3]}: frozen weights must stay bitwise unchanged")
    return len(before)


# -- export --------------------------------------------------------------------------------------
def gather_trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of the trainable parameters. Call on every rank (a collective
    under ZeRO: ``safe_get_full_fp32_param`` reassembles the partitions)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        out[name] = (param if full is None else full).detach().float().cpu().clone()
    return out


def export_lora_model(fresh: Any, trainable: dict[str, torch.Tensor], *, stage_dir: str,
                      dtype: torch.dtype, probe_texts: list[str], probe_emb: torch.Tensor,
                      check_device: torch.device, min_cosine: float,
                      probe_images: list[bytes | None] | None = None,
                      probe_mode: str | None = None) -> dict[str, Any]:
    """Write ``<stage_dir>/adapter`` (PEFT) and ``<stage_dir>/model`` (merged HF folder).

    ``fresh`` is an ``Embedder`` loaded from the model source with the same LoRA layers
    attached (untrained); ``trainable`` its trained weights by parameter name. The merged
    model must give ``probe_emb`` (the trained model's embeddings of ``probe_texts`` with
    ``probe_images`` in prompt mode ``probe_mode``) to within ``min_cosine``, else
    :class:`ExportMismatchError`. ``export_check.json`` records the probe (images as
    base64) and the trained embeddings, so an exported copy can be checked again later.
    """
    import base64

    expected = {name for name, p in fresh.named_parameters() if p.requires_grad}
    if expected != set(trainable):
        raise ExportMismatchError(f"trained and export models differ in trainable parameters: "
                                  f"{sorted(expected ^ set(trainable))[:5]}")
    fresh.load_state_dict(trainable, strict=False)
    with tempfile.TemporaryDirectory(prefix="unime-export-") as tmp:
        adapter_local, model_local = os.path.join(tmp, ADAPTER_DIR), os.path.join(tmp, MODEL_DIR)
        fresh.model.save_pretrained(adapter_local)
        fresh.merge_lora()
        fresh.to(dtype)
        fresh.save_pretrained(model_local)
        merged_emb = fresh.to(check_device).encode(probe_texts, probe_images,
                                                   mode=probe_mode)  # (P, D)
        cosine = (merged_emb * probe_emb).sum(-1)                    # (P,) unit rows
        min_seen = float(cosine.min())
        if min_seen < min_cosine:
            raise ExportMismatchError(f"the merged model's embeddings differ from the trained "
                                      f"model's: min cosine {min_seen:.6f} < {min_cosine}")
        adapter_uri = storage.upload_folder(adapter_local, storage.join(stage_dir, ADAPTER_DIR))
        model_uri = storage.upload_folder(model_local, storage.join(stage_dir, MODEL_DIR))
    check: dict[str, Any] = {"texts": probe_texts, "trained_emb": probe_emb.tolist(),
                             "min_cosine": min_seen, "threshold": min_cosine}
    if probe_images is not None:
        check["images"] = [None if image is None else base64.b64encode(image).decode()
                           for image in probe_images]
    if probe_mode is not None:
        check["mode"] = probe_mode
    storage.write_json(storage.join(stage_dir, EXPORT_CHECK_FILE), check)
    logger.info("exported adapter to %s and merged %s model to %s (probe min cosine %.6f)",
                adapter_uri, str(dtype).removeprefix("torch."), model_uri, min_seen)
    return {"adapter": adapter_uri, "model": model_uri, "export_dtype": str(dtype),
            "export_check_min_cosine": min_seen}
