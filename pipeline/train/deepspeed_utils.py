"""DeepSpeed helpers: the engine config dict and the CPU shared-memory comm-op switch.

Imports of ``deepspeed`` happen inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Literal

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]


def deepspeed_config(*, zero_stage: int, micro_batch_size_per_gpu: int,
                     gradient_accumulation_steps: int = 1, precision: Precision = "fp32",
                     lr: float = 1e-4, weight_decay: float = 0.0,
                     betas: tuple[float, float] = (0.9, 0.999), gradient_clipping: float = 0.0,
                     stage3_param_persistence_threshold: int | None = None,
                     steps_per_print: int = 10**9) -> dict[str, Any]:
    """A DeepSpeed config dict: ZeRO stage, precision and a torch AdamW optimizer.

    ``torch_adam: true`` keeps DeepSpeed on ``torch.optim.AdamW`` (no FusedAdam /
    CPUAdam JIT build). With the gradient cache one optimizer step is one global batch,
    so ``gradient_accumulation_steps`` stays 1 and ``micro_batch_size_per_gpu`` is the
    rank's whole local batch (all its chunks). ``stage3_param_persistence_threshold``
    (ZeRO-3 only): parameters below this many elements are not partitioned; 0
    partitions everything (useful to exercise partitioning with tiny test models).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3 and stage3_param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = stage3_param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size_per_gpu,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "steps_per_print": steps_per_print,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": weight_decay, "betas": list(betas),
                       "torch_adam": True},
        },
    }


def disable_shm_comm_op() -> None:
    """Make DeepSpeed's CPU shared-memory comm op a no-op (plain gloo collectives instead).

    On CPU, DeepSpeed's torch comm backend JIT-compiles the ``ShareMemCommBuilder`` op when
    it is created (``deepspeed.init_distributed`` / ``deepspeed.initialize``): about 50 s
    cold, cached in ``~/.cache/torch_extensions``, and it needs a C++ compiler. Gloo gives
    the same results; use this in tests and on CPU-only workers before DeepSpeed creates
    its backend. ``import deepspeed.comm.torch as m`` would bind the ``torch`` *package*
    re-exported by ``deepspeed.comm``, so the module is looked up by name instead.
    """
    module = importlib.import_module("deepspeed.comm.torch")
    if getattr(module.build_shm_op, "_unime_disabled", False):
        return

    def build_shm_op() -> None:
        return None

    build_shm_op._unime_disabled = True  # type: ignore[attr-defined]
    module.build_shm_op = build_shm_op
    logger.info("DeepSpeed's shared-memory comm op is disabled: collectives use plain gloo")
