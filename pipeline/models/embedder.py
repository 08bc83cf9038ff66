"""Embedder: an MLLM backbone as an embedding model (UniME / E5-V style).

embedding = L2-normalised hidden state of the last token of the last layer, with left
padding so that position -1 is each row's last real token. One class serves training
(``prepare`` + ``forward``, with grad), mining and evaluation (``encode``, no grad).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.models.inputs import ImageInput, InputBuilder, load_image
from pipeline.models.loading import (
    load_backbone,
    read_backbone_meta,
    resolve_local,
    write_backbone_meta,
    write_sentence_transformers_files,
)
from pipeline.models.registry import (
    IMAGE_PLACEHOLDER,
    PROMPT_MODES,
    BackboneSpec,
    PromptMode,
    chat_template,
    format_text,
    resolve_path,
)

logger = logging.getLogger(__name__)


class Embedder(torch.nn.Module):
    """Last-token, L2-normalised embeddings from a multimodal LLM.

    ``model`` is the Hugging Face model (wrap it with PEFT in place, e.g. with
    ``registry.lora_target_regex``); ``inputs`` turns prompts and images into tensors.
    """

    def __init__(self, model: torch.nn.Module, inputs: InputBuilder, spec: BackboneSpec, *,
                 prompt_mode: PromptMode = "one_word") -> None:
        super().__init__()
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {prompt_mode!r}; expected one of "
                             f"{PROMPT_MODES}")
        self.model = model
        self.inputs = inputs
        self.spec = spec
        self.prompt_mode: PromptMode = prompt_mode

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, family: str | None = None,
                        trust_remote_code: bool = False, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None) -> Embedder:
        """Load a backbone or exported embedder folder (local path or ``s3://`` URI)."""
        local = resolve_local(path)
        model, inputs, spec = load_backbone(local, family=family,
                                            trust_remote_code=trust_remote_code,
                                            dtype=dtype, device=device)
        meta = read_backbone_meta(local)
        return cls(model, inputs, spec, prompt_mode=meta.get("prompt_mode", "one_word"))

    def save_pretrained(self, out_dir: str | Path) -> str:
        """Model (safetensors), tokenizer, image processor and full processor config (whose
        chat template renders this embedder's prompts), the sentence-transformers modules
        (last-token pooling, normalisation, prompts) and ``unime_backbone.json``."""
        if hasattr(self.model, "peft_config"):
            raise ValueError("the model still carries LoRA adapters: call merge_lora() first "
                             "(or save the adapter with model.save_pretrained)")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.inputs.save_pretrained(out, chat_template=chat_template(self.spec, self.prompt_mode))
        write_sentence_transformers_files(out, embedding_dim=self.embedding_dim(),
                                          prompt_mode=self.prompt_mode)
        write_backbone_meta(out, family=self.spec.family, prompt_mode=self.prompt_mode)
        logger.info("saved %s embedder to %s", self.spec.family, out)
        return str(out)

    def merge_lora(self) -> None:
        """Fold PEFT LoRA weights into the base model, in place."""
        if hasattr(self.model, "merge_and_unload"):
            self.model = self.model.merge_and_unload()

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing (``train.gradient_checkpointing``) in the language model
        and, where the model supports it, the vision tower; with or without LoRA attached.

        In train mode each layer then keeps only its input and recomputes its activations in
        the backward pass. Non-reentrant ``torch.utils.checkpoint``: LoRA weights inside a
        layer get their gradient although the layer's input needs none (frozen embeddings,
        pixels), dropout masks are replayed, and the gradient equals the plain one
        (tests/test_gradient_checkpointing.py). Eval mode (``encode``) is unaffected.
        ``forward`` passes ``use_cache=False``, so the model config stays untouched.
        """
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise _no_checkpointing(self.spec.family, base)
        try:
            base.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        except ValueError as err:  # no module of the model has the checkpointing flag
            raise _no_checkpointing(self.spec.family, base) from err
        language, vision = _checkpointed_modules(base, self.spec)
        if not language:
            raise _no_checkpointing(self.spec.family, base)
        if not vision:
            logger.warning("activation checkpointing: the %s vision tower does not support it; "
                           "its activations are kept", self.spec.family)
        logger.info("activation checkpointing (non-reentrant) on for %s: language model %s; "
                    "vision %s", self.spec.family, language, vision or "off")

    # -- properties -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        return self.inputs.tokenizer

    # -- training path --------------------------------------------------------------------
    def prepare(self, texts: Sequence[str], images: Sequence[ImageInput] | None = None, *,
                mode: PromptMode | None = None) -> dict[str, torch.Tensor]:
        """One left-padded batch (CPU tensors); rows with and without images may mix.

        ``texts`` use the canonical ``<|image_1|>`` placeholder; ``images`` holds encoded
        bytes, PIL images or ``None`` per row.
        """
        mode = mode or self.prompt_mode
        images = list(images) if images is not None else [None] * len(texts)
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        pil: list[Image.Image | None] = [load_image(image) for image in images]
        prompts = [format_text(self.spec, text, has_image=image is not None, mode=mode)
                   for text, image in zip(texts, pil, strict=True)]
        return self.inputs(prompts, pil)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """(N, D) float32 unit rows: last-layer hidden state of each row's last token."""
        attention_mask = batch["attention_mask"]
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("batch is not left-padded: the last position must be a real "
                             "token of every row (use Embedder.prepare)")
        batch = {key: self._to_device(value) for key, value in batch.items()}
        core = resolve_path(self.model, self.spec.core_path)
        out = core(**batch, use_cache=False, return_dict=True)
        last = out.last_hidden_state[:, -1]  # (N, D)
        return F.normalize(last.float(), dim=-1)  # (N, D)

    def _to_device(self, value: torch.Tensor) -> torch.Tensor:
        if value.is_floating_point():  # non_blocking: the prefetch pins training inputs
            return value.to(self.device, self.dtype, non_blocking=True)
        return value.to(self.device, non_blocking=True)

    # -- inference path -------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts: Sequence[str] | None = None,
               images: Sequence[ImageInput] | None = None, *, batch_size: int = 16,
               mode: PromptMode | None = None) -> torch.Tensor:
        """(N, D) float32 CPU tensor of unit rows, no grad, in input order.

        Give texts, images or both (same length). Image-only input gets the bare
        placeholder as text. Rows are batched by modality and length; a row's embedding
        does not depend on its batch, so the order is restored unchanged.
        """
        texts, images = _align(texts, images)
        if not texts:
            return torch.zeros((0, self.embedding_dim()), dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: (images[i] is not None, len(texts[i])))
        start = time.perf_counter()
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            chunks = [self(**self.prepare([texts[i] for i in idx], [images[i] for i in idx],
                                          mode=mode)).cpu()
                      for idx in _batches(order, batch_size)]
        finally:  # per module: a frozen tower stays in eval mode during training
            for module, training in modes.items():
                module.training = training
        emb = torch.empty((len(texts), chunks[0].shape[1]), dtype=torch.float32)  # (N, D)
        emb[torch.tensor(order)] = torch.cat(chunks)  # (N, D)
        logger.debug("encoded %d rows in %.2fs", len(texts), time.perf_counter() - start)
        return emb

    def embedding_dim(self) -> int:
        config = getattr(self.model.config, "text_config", self.model.config)
        return int(config.hidden_size)


def _no_checkpointing(family: str, model: torch.nn.Module) -> ValueError:
    return ValueError(f"train.gradient_checkpointing=true, but the {family} model "
                      f"({type(model).__name__}) does not support activation checkpointing in "
                      "its language model; set train.gradient_checkpointing=false")


def _checkpointed_modules(model: torch.nn.Module, spec: BackboneSpec) -> tuple[str, str]:
    """Modules with activation checkpointing on, as ``'Class xN, ...'`` ('' = none): those
    of the language model, and those under ``spec.vision_paths``."""
    language: Counter[str] = Counter()
    vision: Counter[str] = Counter()
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        under_vision = any(name == path or name.startswith(f"{path}.")
                           for path in spec.vision_paths)
        (vision if under_vision else language)[type(module).__name__] += 1
    return _count_list(language), _count_list(vision)


def _count_list(counts: Counter[str]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counts.items())


def _align(texts: Sequence[str] | None, images: Sequence[ImageInput] | None
           ) -> tuple[list[str], list[ImageInput]]:
    if texts is None and images is None:
        raise ValueError("encode needs texts, images or both")
    if texts is None:
        texts = [IMAGE_PLACEHOLDER] * len(images or [])
    if images is None:
        images = [None] * len(texts)
    if len(texts) != len(images):
        raise ValueError(f"{len(texts)} texts but {len(images)} images")
    return list(texts), list(images)


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
