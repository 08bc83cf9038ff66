"""LoRA on an Embedder, and the frozen-vision guards both training stages use.

Stage 1 puts LoRA on the language model only (vision tower and projector frozen, in eval
mode, unused); stage 2 puts it on the whole MLLM by default (``stage2.lora_vision``).
Each stage's ``lora`` section (:class:`pipeline.config.LoraConfig`) sets rank, alpha, dropout.
"""
from __future__ import annotations

from typing import Any

import torch

from pipeline.config import LoraConfig as LoraSettings
from pipeline.train.checkpoint import FrozenParameterError


def attach_lora(embedder: Any, lora: LoraSettings, *, include_vision: bool,
                seed: int) -> Any:
    """Wrap ``embedder.model`` with PEFT LoRA (``lora``: a stage's ``lora`` section:
    rank, alpha, dropout) in place; LoRA is then the only trainable part.

    Without ``include_vision`` the vision tower and projector are frozen first. The LoRA
    init is drawn from ``seed`` alone: identical on every rank and under every ZeRO stage
    (loading consumes the global RNG differently under ZeRO-3's zero.Init).
    """
    from peft import LoraConfig, get_peft_model

    from pipeline.models import freeze_vision, lora_target_regex

    if not include_vision:
        freeze_vision(embedder.model, embedder.spec)
    peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora_target_regex(embedder.spec,
                                                              include_vision=include_vision))
    for param in embedder.parameters():
        param.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embedder.model = get_peft_model(embedder.model, peft_config)
    trainable = [n for n, p in embedder.named_parameters() if p.requires_grad]
    if not trainable or any("lora_" not in name for name in trainable):
        raise RuntimeError(f"LoRA must be the only trainable part, got {trainable[:5]}")
    return embedder


def parameter_counts(module: Any) -> tuple[int, int]:
    """(trainable, all) parameter elements of ``module``."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def train_mode(module: Any, *, vision_frozen: bool) -> None:
    """Train mode for the module; eval mode for a frozen vision tower and projector."""
    from pipeline.models import resolve_path

    module.train()
    if not vision_frozen:
        return
    for path in module.spec.vision_paths:
        part = resolve_path(module.model, path)
        if isinstance(part, torch.nn.Module):
            part.eval()


def check_lora_only(module: Any, *, vision_frozen: bool, stage: str) -> None:
    """Raise :class:`FrozenParameterError` if anything but LoRA trains, or if a frozen
    vision part trains or is in train mode."""
    from pipeline.models import resolve_path, vision_parameters

    if vision_frozen:
        for path in module.spec.vision_paths:
            part = resolve_path(module.model, path)
            if isinstance(part, torch.nn.Module) and any(m.training for m in part.modules()):
                raise FrozenParameterError(f"{stage}: {path} is in train mode")
        if any(p.requires_grad for p in vision_parameters(module.model, module.spec)):
            raise FrozenParameterError(f"{stage}: the vision tower or projector trains")
    wrong = [name for name, p in module.named_parameters()
             if p.requires_grad and "lora_" not in name]
    if wrong:
        raise FrozenParameterError(f"{stage}: non-LoRA parameters train, e.g. {wrong[0]}")
